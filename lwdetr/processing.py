"""Pre- and post-processing for LW-DETR: `LwDetrImageProcessor`.

This is the one pre-processing path of the project: the `Detector` (so the CLI and the app), finetune's training
batches (after augmentation, at every multi-scale size) and its evaluation all turn decoded images into model
inputs with `LwDetrImageProcessor.process_loaded`, and a fine-tuned model is saved with the very processor it was
trained and evaluated with (`square_processor`). Pillow resizes, because the reference does: every resize of the
project is the reference's, to the bit. Post-processing lives in `lwdetr.postprocess`.

The behaviour is that of transformers' `DeformableDetrImageProcessor` (the processor LW-DETR checkpoints name in
their `preprocessor_config.json`), PIL backend: resize with Pillow, rescale, normalise, pad bottom/right to the
largest image of the batch, and a `pixel_mask` that is 1 on real pixels. `preprocessor_config.json` files are read
and written with the same keys, so either project loads the other's file.

Differences, on purpose:
- Inputs go through `lwdetr.images.load_image` first: paths, bytes, arrays of any common layout, EXIF orientation,
  transparency and 16-bit images are handled, and bad inputs raise `ImageLoadError`.
- `size={"shortest_edge": s}` and `size={"longest_edge": l}` alone are accepted (the reference rejects them): the
  named edge becomes `s` (or `l`) and the other keeps the aspect ratio, truncated to an integer.
- `pixel_values` is always float32 and `pixel_mask` is always returned (all ones when `do_pad=False`).
- A model folder without `preprocessor_config.json` gets LW-DETR's 640x640 (not Deformable DETR's 800/1333).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .annotations import coco_detection_label, rescale_label_to_canvas
from .images import DEFAULT_MAX_PIXELS, ImageSource, load_image
from .postprocess import top_k_detections

__all__ = [
    "CONFIG_NAME",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LwDetrImageProcessor",
    "ProcessorOutput",
    "output_size",
    "square_processor",
]

CONFIG_NAME = "preprocessor_config.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = {"height": 640, "width": 640}

_SIZE_FORMS = (
    {"height", "width"},
    {"shortest_edge", "longest_edge"},
    {"shortest_edge"},
    {"longest_edge"},
    {"max_height", "max_width"},
)
# Keys the reference writes that only matter for training annotations; kept so that a round trip preserves them.
_PASSTHROUGH_DEFAULTS = {"format": "coco_detection"}


def normalize_size(size: Any, max_size: int | None = None) -> dict[str, int]:
    """Bring a `size` in any of the reference's spellings to one of the size dicts in `_SIZE_FORMS`.

    An int means the shortest edge (with `max_size`, default 1333, as the longest), a pair means (height, width):
    this mirrors how the reference reads legacy configs.
    """
    if isinstance(size, int):
        return {"shortest_edge": size, "longest_edge": max_size if max_size is not None else 1333}
    if isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, Mapping):
        result = {key: int(value) for key, value in size.items() if value is not None}
        if set(result) in _SIZE_FORMS:
            return result
    raise ValueError(f"size must be a dict with keys {' or '.join(map(str, map(sorted, _SIZE_FORMS)))}; got {size!r}")


def output_size(height: int, width: int, size: Mapping[str, int]) -> tuple[int, int]:
    """The `(height, width)` an image of `height` x `width` is resized to for a normalised `size` dict."""
    if "height" in size:
        return size["height"], size["width"]
    if "max_height" in size:
        # Largest scale that fits both limits; small images are scaled up until one edge touches its limit.
        scale = min(size["max_height"] / height, size["max_width"] / width)
        return int(height * scale), int(width * scale)
    if "shortest_edge" in size:
        return _shortest_edge_size(height, width, size["shortest_edge"], size.get("longest_edge"))
    longest = size["longest_edge"]
    if height >= width:
        return longest, int(longest * width / height)
    return int(longest * height / width), longest


def _shortest_edge_size(height: int, width: int, shortest: int, longest: int | None) -> tuple[int, int]:
    """Shortest edge to `shortest` unless the longest edge would exceed `longest` (DETR's rule, to the pixel)."""
    raw = None
    if longest is not None:
        short_side, long_side = float(min(height, width)), float(max(height, width))
        if long_side / short_side * shortest > longest:
            # The long edge limits: recompute the short edge from it, and keep the unrounded value for the
            # long edge so that it lands on `longest` after truncation.
            raw = longest * short_side / long_side
            shortest = int(round(raw))
    if min(height, width) == shortest:
        return height, width
    scale_short = raw if raw is not None else shortest
    if width < height:
        return int(scale_short * height / width), shortest
    return shortest, int(scale_short * width / height)


def _resample_id(resample: Any) -> int:
    return int(resample.value if isinstance(resample, Image.Resampling) else resample)


class ProcessorOutput(dict):
    """The processor's result: a dict with `pixel_values` float32 `[B, 3, H, W]` and `pixel_mask` int64 `[B, H, W]`.

    Keys are also attributes. `original_sizes` (not a key, so `model(**inputs)` still works) lists each image's
    `(height, width)` before resizing, the `target_sizes` that post-processing needs.
    """

    original_sizes: list[tuple[int, int]]

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ProcessorOutput:
        """Move every tensor to `device`; floating tensors are also cast to `dtype` when given."""
        moved = ProcessorOutput()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                value = value.to(device=device, dtype=cast)
            moved[key] = value
        moved.original_sizes = self.original_sizes
        return moved


class LwDetrImageProcessor:
    """Resize, rescale, normalise and pad images for LW-DETR; turn model outputs into boxes.

    Args:
        do_resize: resize each image according to `size`.
        size: one of `{"height", "width"}` (exact, aspect ratio not kept), `{"shortest_edge", "longest_edge"}`,
            `{"shortest_edge"}`, `{"longest_edge"}`, `{"max_height", "max_width"}` (aspect ratio kept).
        resample: Pillow resampling filter (int or `PIL.Image.Resampling`), bilinear by default.
        do_rescale / rescale_factor: multiply uint8 values by this factor (1/255 by default).
        do_normalize / image_mean / image_std: `(x - mean) / std` per channel.
        do_pad: pad bottom/right with zeros to the batch's largest image, or to `pad_size` when given.
        pad_size: optional fixed `{"height", "width"}` to pad every batch to.
        max_pixels: decompression-bomb limit for encoded inputs (see `lwdetr.images.load_image`); not saved.
        **extra: other keys of a `preprocessor_config.json` (e.g. `format`); kept and written back unchanged.
    """

    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(
        self,
        do_resize: bool = True,
        size: Mapping[str, int] | int | Sequence[int] | None = None,
        resample: int | Image.Resampling = Image.Resampling.BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] = IMAGENET_MEAN,
        image_std: float | Sequence[float] = IMAGENET_STD,
        do_pad: bool = True,
        pad_size: Mapping[str, int] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        **extra: Any,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = normalize_size(size if size is not None else DEFAULT_SIZE, extra.pop("max_size", None))
        self.resample = _resample_id(resample)
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = _per_channel(image_mean, "image_mean")
        self.image_std = _per_channel(image_std, "image_std")
        self.do_pad = bool(do_pad)
        self.pad_size = None if pad_size is None else {key: int(pad_size[key]) for key in ("height", "width")}
        self.max_pixels = max_pixels
        extra.pop("image_processor_type", None)
        extra.pop("pad_and_return_pixel_mask", None)
        self.extra = {**_PASSTHROUGH_DEFAULTS, "do_convert_annotations": self.do_normalize, **extra}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"

    # ------------------------------------------------------------------ configuration files
    def to_dict(self) -> dict[str, Any]:
        """The `preprocessor_config.json` content, in the reference's keys (loadable by `AutoImageProcessor`)."""
        config = {
            **self.extra,
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_pad": self.do_pad,
            "image_processor_type": "DeformableDetrImageProcessor",
        }
        if self.pad_size is not None:
            config["pad_size"] = dict(self.pad_size)
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], **overrides: Any) -> LwDetrImageProcessor:
        """Build from a `preprocessor_config.json` dict, legacy spellings included; `overrides` win."""
        fields = {**config, **overrides}
        if "do_pad" not in fields and "pad_and_return_pixel_mask" in fields:
            fields["do_pad"] = fields["pad_and_return_pixel_mask"]
        return cls(**fields)

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `preprocessor_config.json` into `save_directory` (created if needed); returns the file's path."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **overrides: Any) -> LwDetrImageProcessor:
        """Read `preprocessor_config.json` from a folder, a json file or a hub id (cache first, fails fast offline).

        A model folder without the file gets the LW-DETR defaults (640x640).
        """
        path = Path(name_or_path).expanduser()
        if path.is_file():
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")), **overrides)
        from .hub import resolve_model_dir

        config_path = resolve_model_dir(name_or_path, allow_patterns=[CONFIG_NAME]) / CONFIG_NAME
        if not config_path.is_file():
            return cls(**overrides)
        return cls.from_dict(json.loads(config_path.read_text(encoding="utf-8")), **overrides)

    def to_json_string(self) -> str:
        """`to_dict()` as the JSON text `save_pretrained` writes."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    # ------------------------------------------------------------------ pre-processing
    def __call__(
        self,
        images: ImageSource | Sequence[ImageSource],
        annotations: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        return_tensors: str | None = "pt",
    ) -> ProcessorOutput:
        """Pre-process one image or a list of images (anything `load_image` accepts).

        `annotations` (one COCO detection annotation per image, see `lwdetr.annotations`) adds `labels`: per image a
        dict with class_labels, boxes (cxcywh normalised by the padded input size), area, iscrowd, size, orig_size
        and image_id, as the reference returns them for training.

        Returns:
            `ProcessorOutput` with `pixel_values` float32 `[B, 3, H, W]` and `pixel_mask` int64 `[B, H, W]`, where
            `H, W` are the largest resized height and width in the batch (or `pad_size`): torch tensors for
            `return_tensors="pt"`, numpy arrays for "np", lists of per-image numpy arrays for None (as the reference).
        """
        _check_return_tensors(return_tensors)
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, Mapping) else list(annotations)
            if len(annotations) != len(batch):
                raise ValueError(f"got {len(annotations)} annotations for {len(batch)} images")
        output = self.process_loaded([load_image(image, max_pixels=self.max_pixels) for image in batch])
        if annotations is not None:
            output["labels"] = self._labels(annotations, output)
        return _converted(output, return_tensors)

    preprocess = __call__

    def _labels(self, annotations: Sequence[Mapping[str, Any]], output: ProcessorOutput) -> list[dict]:
        normalise = bool(self.extra.get("do_convert_annotations", True))
        canvas = tuple(output["pixel_values"].shape[-2:])
        labels = []
        for index, (annotation, (height, width)) in enumerate(zip(annotations, output.original_sizes)):
            resized = output_size(height, width, self.size) if self.do_resize else (height, width)
            label = coco_detection_label(annotation, (height, width), resized, normalise, f"annotations[{index}]")
            labels.append(rescale_label_to_canvas(label, canvas, normalise) if self.do_pad else label)
        return labels

    def pad(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        annotations: Sequence[Mapping[str, Any]] | None = None,
        return_pixel_mask: bool = True,
        return_tensors: str | None = "pt",
    ) -> ProcessorOutput:
        """Pad already processed `[3, h, w]` images bottom/right with zeros to the batch's largest (or `pad_size`).

        `annotations` are labels as `__call__` returns them (before padding); their normalised boxes are rescaled
        to the padded size. Returns pixel_values `[B, 3, H, W]`, pixel_mask `[B, H, W]` (1 on image pixels) and,
        with annotations, labels.
        """
        _check_return_tensors(return_tensors)
        arrays = [np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image) for image in images]
        if not arrays or any(a.ndim != 3 for a in arrays):
            raise ValueError("pad expects a non-empty list of [channels, height, width] images")
        heights, widths = [a.shape[1] for a in arrays], [a.shape[2] for a in arrays]
        height, width = (max(heights), max(widths)) if self.pad_size is None else tuple(self.pad_size.values())
        if max(heights) > height or max(widths) > width:
            raise ValueError(f"pad_size {self.pad_size} is smaller than an image")
        values = np.zeros((len(arrays), arrays[0].shape[0], height, width), dtype=np.float32)
        mask = np.zeros((len(arrays), height, width), dtype=np.int64)
        for index, array in enumerate(arrays):
            values[index, :, : array.shape[1], : array.shape[2]] = array
            mask[index, : array.shape[1], : array.shape[2]] = 1
        output = ProcessorOutput(pixel_values=torch.from_numpy(values))
        if return_pixel_mask:
            output["pixel_mask"] = torch.from_numpy(mask)
        if annotations is not None:
            normalise = bool(self.extra.get("do_convert_annotations", True))
            output["labels"] = [
                rescale_label_to_canvas({k: _as_numpy(v) for k, v in a.items()}, (height, width), normalise)
                for a in annotations
            ]
        output.original_sizes = list(zip(heights, widths))
        return _converted(output, return_tensors)

    def process_loaded(self, images: Sequence[Image.Image]) -> ProcessorOutput:
        """`__call__` for images already loaded as RGB by `load_image` (skips loading them again)."""
        if not images:
            raise ValueError("no images given")
        images = [image if image.mode == "RGB" else load_image(image) for image in images]
        pixel_values, pixel_mask = self._normalise_and_pad([self._resized_array(image) for image in images])
        output = ProcessorOutput(pixel_values=pixel_values, pixel_mask=pixel_mask)
        output.original_sizes = [(image.height, image.width) for image in images]
        return output

    def _resized_array(self, image: Image.Image) -> np.ndarray:
        """`[H', W', 3]` uint8 after resizing; Pillow does the interpolation, exactly as the reference does."""
        if self.do_resize:
            height, width = output_size(image.height, image.width, self.size)
            if (height, width) != (image.height, image.width):
                image = image.resize((width, height), resample=self.resample)
        return np.asarray(image)

    def _level_table(self) -> np.ndarray:
        """`[3, 256]` float32: the processed value of each uint8 level in each channel.

        The reference rescales in float64, rounds to float32, then normalises in float32. Doing exactly that on the
        256 possible levels and looking pixels up gives the same bits as doing it pixel by pixel, in one gather
        instead of three passes over the image.
        """
        levels = np.arange(256, dtype=np.float64)
        values = (levels * self.rescale_factor if self.do_rescale else levels).astype(np.float32)
        values = np.repeat(values[None, :], 3, axis=0)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=np.float32)[:, None]
            std = np.asarray(self.image_std, dtype=np.float32)[:, None]
            values = (values - mean) / std
        return values

    def _batch_size(self, arrays: list[np.ndarray]) -> tuple[int, int]:
        """The padded `(height, width)` of the batch: its largest image, or `pad_size`."""
        heights, widths = [a.shape[0] for a in arrays], [a.shape[1] for a in arrays]
        if not self.do_pad:
            if len(set(heights)) > 1 or len(set(widths)) > 1:
                raise ValueError("images of different sizes need do_pad=True (or a fixed size) to form one batch")
            return heights[0], widths[0]
        if self.pad_size is None:
            return max(heights), max(widths)
        height, width = self.pad_size["height"], self.pad_size["width"]
        if max(heights) > height or max(widths) > width:
            raise ValueError(f"pad_size {self.pad_size} is smaller than a resized image")
        return height, width

    def _normalise_and_pad(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale and normalise `[H, W, 3]` uint8 arrays into one zero-padded batch and its pixel mask.

        Returns `pixel_values` float32 `[B, 3, H, W]` (0 in the padding, as in the reference, i.e. after
        normalisation) and `pixel_mask` int64 `[B, H, W]`.
        """
        height, width = self._batch_size(arrays)
        table = self._level_table()
        # Uninitialised: every value is written once below, image or padding, instead of zeroing first.
        pixel_values = torch.empty(len(arrays), 3, height, width, dtype=torch.float32)
        pixel_mask = torch.zeros(len(arrays), height, width, dtype=torch.int64)
        planes = pixel_values.numpy()  # shares memory: numpy writes straight into the batch
        for index, array in enumerate(arrays):
            rows, columns = array.shape[:2]
            for channel in range(3):
                # A gather per channel, written in place; "clip" skips index checks uint8 cannot fail anyway.
                np.take(table[channel], array[:, :, channel], out=planes[index, channel, :rows, :columns], mode="clip")
            planes[index, :, rows:, :] = 0.0
            planes[index, :, :rows, columns:] = 0.0
            pixel_mask[index, :rows, :columns] = 1
        return pixel_values, pixel_mask

    # ------------------------------------------------------------------ post-processing
    def post_process_object_detection(
        self,
        outputs: Any,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
        top_k: int = 100,
    ) -> list[dict[str, torch.Tensor]]:
        """Turn raw outputs into per-image detections (Deformable DETR's sigmoid top-k rule): the reference's
        signature over `lwdetr.postprocess.top_k_detections`, the one decoder of the project.

        Args:
            outputs: an object with `.logits` `[B, Q, C]` and `.pred_boxes` `[B, Q, 4]` (normalised cxcywh), or a
                dict with those keys.
            threshold: keep detections whose score is strictly above it.
            target_sizes: `[B, 2]` tensor or list of `(height, width)`; boxes are scaled to these pixel sizes.
                Without it boxes stay normalised.
            top_k: candidates kept per image before thresholding, over all (query, class) pairs.

        Returns:
            One dict per image with `scores` `[N]`, `labels` `[N]` (int64) and `boxes` `[N, 4]` (x0, y0, x1, y1).
        """
        logits, pred_boxes = _outputs_fields(outputs)
        return top_k_detections(logits, pred_boxes, target_sizes, top_k=top_k, threshold=threshold)


def square_processor(side: int) -> LwDetrImageProcessor:
    """The processor of a model trained at `side` x `side`: a squash resize (no aspect ratio kept, as LW-DETR is
    trained and evaluated), ImageNet mean and std. Fine-tuning feeds its batches and its evaluation through it and
    saves it beside the weights, so the `Detector` sees a fine-tuned model's inputs exactly as training did."""
    return LwDetrImageProcessor(size={"height": side, "width": side})


def _per_channel(value: float | Sequence[float], name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 values (RGB); got {len(values)}")
    return tuple(values)


def _check_return_tensors(return_tensors: str | None) -> None:
    if return_tensors not in ("pt", "np", None):
        raise ValueError(f"return_tensors must be 'pt', 'np' or None; got {return_tensors!r}")


def _as_numpy(value: Any) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _converted(output: ProcessorOutput, return_tensors: str | None) -> ProcessorOutput:
    """`output` (torch pixels, numpy labels) with every array as `return_tensors` asks: torch tensors ("pt"),
    numpy arrays ("np"), or per-image lists of numpy arrays for the batched pixels and mask (None)."""
    convert = torch.as_tensor if return_tensors == "pt" else _as_numpy
    result = ProcessorOutput()
    for key, value in output.items():
        if key == "labels":
            result[key] = [{k: convert(v) for k, v in label.items()} for label in value]
        elif return_tensors is None:
            result[key] = list(_as_numpy(value))
        else:
            result[key] = convert(value)
    result.original_sizes = output.original_sizes
    return result


def _outputs_fields(outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(outputs, Mapping):
        return outputs["logits"], outputs["pred_boxes"]
    return outputs.logits, outputs.pred_boxes
