"""`Detector`: boxes from images in one call, for people who do not want to touch tensors.

    detector = Detector.from_pretrained("AnnaZhang/lwdetr_small_60e_coco")
    detections = detector.predict("street.jpg", threshold=0.5)          # list[Detection]
    per_image = detector.predict(["a.jpg", "b.png"])                     # list[list[Detection]]

Bad inputs in a list. `predict` raises the first `ImageLoadError` by default (`on_error="raise"`); with
`on_error="none"` a bad item gives `None` in its place and the others are still processed. `predict_many` is the
streaming form the CLI uses: a generator of `Prediction` records, in input order, each carrying either its
detections or the `ImageLoadError` that stopped it, so a caller can report failures one by one and keep going.
Whatever fails for one input (a hostile file, an image the model cannot take) is that input's error, never the
batch's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .cpu import reduced_precision_fallback
from .images import ImageLoadError, ImageSource, load_image, source_name
from .postprocess import Detection, to_detections
from .processing import LwDetrImageProcessor, output_size
from .remote import DEFAULT_TIMEOUT, fetch_url, is_url

__all__ = ["Detection", "Detector", "Prediction", "resolve_device"]

# The largest resized edge a preprocessor_config.json may ask for: LW-DETR runs at 640, DETR-style rules at 1333.
_MAX_INPUT_EDGE = 4096


@dataclass
class Prediction:
    """The outcome for one input of `Detector.predict_many`.

    `detections` is `None` exactly when `error` is set. `image` is the loaded RGB image (handy for drawing); it is
    `None` for failed inputs. `size` is the image's (height, width).
    """

    index: int
    source: Any
    detections: list[Detection] | None = None
    error: ImageLoadError | None = None
    image: Image.Image | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        return None if self.image is None else (self.image.height, self.image.width)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """`"auto"` picks CUDA when available, else the CPU; anything else goes to `torch.device` as it is."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _load_model(directory: str | os.PathLike) -> torch.nn.Module:
    """Build the detection model from an HF-format folder: the one place `Detector` names the model class (the CLI's
    ONNX export, convert's shape check and finetune's training and resume build it themselves)."""
    from .modeling import LwDetrForObjectDetection

    return LwDetrForObjectDetection.from_pretrained(directory)


def _load_processor(directory: Path) -> LwDetrImageProcessor:
    """The folder's image processor; an unusable preprocessor_config.json is a `ModelLoadError` naming it."""
    from .checkpoint import ModelLoadError
    from .processing import CONFIG_NAME

    path = directory / CONFIG_NAME
    if path.exists() and (not path.is_file() or path.stat().st_size > 2**20):
        raise ModelLoadError(f"{path}: not a regular file of at most 1 MiB, as an image processor configuration is")
    try:
        processor = LwDetrImageProcessor.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001 - JSON, field and type errors alike are this file's fault
        reason = " ".join(str(error).split())[:300]
        raise ModelLoadError(
            f"{path}: not a usable image processor configuration ({type(error).__name__}: {reason})"
        ) from None
    edges = [value for value in processor.size.values() if isinstance(value, int)]
    edges += list((processor.pad_size or {}).values())
    if not edges or not all(0 < value <= _MAX_INPUT_EDGE for value in edges):
        raise ModelLoadError(
            f"{path}: size {processor.size} and pad_size {processor.pad_size} must give edges of 1 to "
            f"{_MAX_INPUT_EDGE} pixels"
        )
    return processor


def _item_error(source: Any, what: str, error: BaseException) -> ImageLoadError:
    """One input's failure as the one-line `ImageLoadError` that `Prediction.error` carries (cause attached)."""
    text = str(error).strip().splitlines()
    item_error = ImageLoadError(f"{source_name(source)}: {what} ({type(error).__name__}: {text[0] if text else ''})")
    item_error.__cause__ = error
    return item_error


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'float16' or 'bfloat16'")
    return resolved


class Detector:
    """A model, its image processor and its label names, ready to turn images into `Detection`s.

    Attributes:
        model: the detection model (eval mode, on `device`).
        processor: the `LwDetrImageProcessor` matching the model.
        id2label: class id -> name.
        device: where the model runs.
        url_timeout: seconds allowed per connection and read when an input is an http(s) URL.
    """

    url_timeout: float = DEFAULT_TIMEOUT

    def __init__(
        self,
        model: torch.nn.Module,
        processor: LwDetrImageProcessor,
        id2label: dict[int, str] | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = _as_dtype(dtype)
        if self.dtype is not None:  # half precision on a CPU that only emulates it runs float32 (logged once)
            self.dtype = reduced_precision_fallback(self.dtype, self.device)
        if self.dtype in (torch.bfloat16, torch.float16) and hasattr(model, "to_mixed_precision"):
            # reduced precision for the encoder only; query selection, decoder and heads stay fp32
            self.model = model.to(device=self.device).to_mixed_precision(self.dtype).eval()
        else:
            self.model = model.to(device=self.device, dtype=self.dtype).eval()
        if compile:
            # a Detector never trains, so inductor may freeze the weights: constants it can pre-pack for its GEMM
            # and convolution kernels and fold (BatchNorm into the convolutions)
            self.model = torch.compile(self.model, options={"freezing": True})
        self.processor = processor
        labels = id2label if id2label is not None else getattr(model.config, "id2label", {})
        self.id2label = {int(key): str(value) for key, value in labels.items()}

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device = "auto",
        dtype: torch.dtype | str | None = None,
        compile: bool = False,
    ) -> Detector:
        """Load model, processor and label names from an HF-format folder or a hub id (one download).

        `dtype="bfloat16"` (or float16) runs the encoder in that precision and the decoder in fp32;
        `compile=True` wraps the model in `torch.compile` with frozen weights (the first call takes a minute).
        """
        from .hub import resolve_model_dir

        directory = resolve_model_dir(name_or_path)
        model = _load_model(directory)
        return cls(model, _load_processor(directory), device=device, dtype=dtype, compile=compile)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(labels={len(self.id2label)}, device={self.device}, processor={self.processor})"

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        threshold: float = 0.5,
        max_detections: int = 100,
        batch_size: int = 8,
        on_error: Literal["raise", "none"] = "raise",
        output: Literal["detections", "pipeline"] = "detections",
    ) -> list[Detection] | list[list[Detection] | None] | list[dict] | list[list[dict] | None]:
        """Detect objects in one image (returns `list[Detection]`) or a list of images (one list per image).

        Args:
            images: anything `load_image` accepts or an http(s) URL (downloaded with `url_timeout` seconds per
                read and the image byte cap), or a list/tuple of such.
            threshold: keep detections scoring strictly above it.
            max_detections: at most this many detections per image (the top-k before thresholding).
            batch_size: images per forward pass.
            on_error: for a list, `"raise"` raises the first `ImageLoadError`; `"none"` puts `None` in its place.
                A single image always raises.
            output: `"pipeline"` gives the dicts of `transformers.pipeline("object-detection")` (see
                `Detection.as_pipeline_dict`) in place of `Detection`s, so code written for the pipeline works as is.
        """
        if on_error not in ("raise", "none"):
            raise ValueError(f"on_error must be 'raise' or 'none'; got {on_error!r}")
        if output not in ("detections", "pipeline"):
            raise ValueError(f"output must be 'detections' or 'pipeline'; got {output!r}")
        single = not isinstance(images, (list, tuple))
        results: list[list[Detection] | None] = []
        for prediction in self.predict_many([images] if single else images, threshold, max_detections, batch_size):
            if prediction.error is not None and (single or on_error == "raise"):
                raise prediction.error
            detections = prediction.detections
            if output == "pipeline" and detections is not None:
                detections = [d.as_pipeline_dict() for d in detections]
            results.append(detections)
        return results[0] if single else results

    __call__ = predict

    def predict_many(
        self,
        images: Iterable[ImageSource],
        threshold: float = 0.5,
        max_detections: int = 100,
        batch_size: int = 8,
    ) -> Iterator[Prediction]:
        """Yield one `Prediction` per input, in order; a bad input yields its error instead of stopping the rest.

        Inputs are loaded and run `batch_size` at a time, so an iterable of paths streams with bounded memory.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        pending: list[Prediction] = []
        for index, source in enumerate(images):
            pending.append(self._load(index, source))
            if sum(p.error is None for p in pending) >= batch_size:
                yield from self._run(pending, threshold, max_detections)
                pending = []
        if pending:
            yield from self._run(pending, threshold, max_detections)

    def _load(self, index: int, source: ImageSource) -> Prediction:
        try:
            image = (
                self._load_url(source) if is_url(source) else load_image(source, max_pixels=self.processor.max_pixels)
            )
            height, width = (image.height, image.width)
            if self.processor.do_resize:
                height, width = output_size(height, width, self.processor.size)
            if height * width > _MAX_INPUT_EDGE**2:  # a thin strip under a shortest-edge rule, or no resizing
                raise ImageLoadError(
                    f"{source_name(source)}: the model would see it as {width}x{height} pixels, more than "
                    f"{_MAX_INPUT_EDGE}x{_MAX_INPUT_EDGE}"
                )
            return Prediction(index, source, image=image)
        except ImageLoadError as error:
            return Prediction(index, source, error=error)
        except Exception as error:  # noqa: BLE001 - whatever goes wrong with one input is that input's error
            return Prediction(index, source, error=_item_error(source, "cannot load", error))

    def _load_url(self, url: str) -> Image.Image:
        """Download and decode an http(s) image; errors name the URL (see `lwdetr.remote`)."""
        data = fetch_url(url, timeout=self.url_timeout)
        try:
            return load_image(data, max_pixels=self.processor.max_pixels)
        except ImageLoadError as error:
            raise ImageLoadError(str(error).replace(source_name(data), source_name(url), 1)) from None

    def _run(self, batch: list[Prediction], threshold: float, max_detections: int) -> list[Prediction]:
        """Fill in the detections of the loaded items of `batch` with one forward pass.

        When the batch fails, each image is run alone, so that one image the model cannot take (its resized size
        is unusable, say) costs only its own result.
        """
        loaded = [p for p in batch if p.error is None]
        if not loaded:
            return batch
        try:
            per_image = self._detect([p.image for p in loaded], threshold, max_detections)
        except (RuntimeError, ValueError, MemoryError) as error:
            if len(loaded) > 1:
                for prediction in loaded:
                    self._run([prediction], threshold, max_detections)
            else:
                loaded[0].error = _item_error(loaded[0].source, "the model cannot run on this image", error)
                loaded[0].image = None
        else:
            for prediction, detections in zip(loaded, per_image):
                prediction.detections = detections
        return batch

    @torch.inference_mode()
    def _detect(self, images: list[Image.Image], threshold: float, max_detections: int) -> list[list[Detection]]:
        """Forward pass and post-processing for RGB images; boxes come back in each image's own pixels."""
        inputs = self.processor.process_loaded(images).to(self.device, dtype=self.dtype)
        outputs = self.model(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        results = self.processor.post_process_object_detection(
            outputs, threshold=threshold, target_sizes=inputs.original_sizes, top_k=max_detections
        )
        return [to_detections(result, self.id2label) for result in results]
