"""Augmentations, the torch dataset and batching for detection fine-tuning.

Images are squashed to a square S x S (no aspect preservation), as LW-DETR is trained and evaluated. S must be a
multiple of the model's `size_divisor` (patch size x windows per side: 32 for `nano`, 64 for the published
presets; `size_divisor_of(config)` computes it).

Multi-scale training (LW-DETR draws a square size per batch around its base size, e.g. 448..896 for 640): the
dataset augments every image to the largest size, and `MultiScaleCollate` resizes each batch to one size drawn
from the batch content and a seed. The draw needs no shared counter, so it is the same in any DataLoader worker
and under accelerate (which wraps the sampler, not the collate function):

    sizes = multiscale_sizes(640, 64)                                  # [448, 512, ..., 896]
    train = DetectionDataset(data.train, build_train_transform(max(sizes), 64), train=True)
    loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=MultiScaleCollate(sizes, seed=0))
    val = DataLoader(DetectionDataset(data.val, build_eval_transform(640, 64), train=False),
                     batch_size=4, collate_fn=collate_detection)

Call `train.set_epoch(epoch)` at the start of every epoch: the augmentation of item i is drawn from
(seed, epoch, i), reproducible whatever the number of workers.

An image that was fine when the data was checked but cannot be decoded any more (deleted, truncated) does not
stop a run: it is reported once, as one warning line naming it, and skipped (see `DetectionDataset`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F

from finetune.data import DetectionRecord, DetectionSplit, train_targets
from finetune.errors import DataError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DetectionDataset",
    "MultiScaleCollate",
    "build_eval_transform",
    "build_train_transform",
    "check_image_size",
    "collate_detection",
    "multiscale_sizes",
    "normalize_image",
    "size_divisor_of",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Stands in for an image that cannot be decoded during evaluation: a small grey square without boxes.
_BLANK_SIDE = 32
_BLANK_GREY = 114

_logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------- sizes


def size_divisor_of(config: Any) -> int:
    """The number every input side must be a multiple of: ViT patch size x windows per side.

    `config` is an `LwDetrConfig` (or its backbone config).
    """
    backbone = getattr(config, "backbone_config", config)
    return int(backbone.patch_size) * math.isqrt(int(backbone.num_windows))


def check_image_size(size: int, size_divisor: int) -> int:
    """`size` itself if it is a positive multiple of `size_divisor`, else `ValueError`."""
    if size_divisor <= 0 or size <= 0 or size % size_divisor:
        raise ValueError(f"image size {size} must be a positive multiple of size_divisor {size_divisor}")
    return size


def multiscale_sizes(base_size: int, size_divisor: int, *, min_scale: float = 0.7, max_scale: float = 1.4) -> list[int]:
    """The multiples of `size_divisor` within [min_scale, max_scale] x `base_size` (LW-DETR: 448..896 for 640)."""
    check_image_size(base_size, size_divisor)
    low = max(size_divisor, math.ceil(base_size * min_scale / size_divisor) * size_divisor)
    high = math.floor(base_size * max_scale / size_divisor) * size_divisor
    return sorted({*range(low, high + 1, size_divisor), base_size})


# ---------------------------------------------------------------------------------------------------- transforms


def _bbox_params() -> A.BboxParams:
    # clip: rounding can put an edge a hair outside; filter: boxes a crop leaves behind are dropped with their label.
    return A.BboxParams(
        format="coco", label_fields=["labels"], min_visibility=0.3, clip=True, filter_invalid_bboxes=True
    )


def build_train_transform(
    size: int,
    size_divisor: int,
    *,
    crop_probability: float = 0.5,
    flip_probability: float = 0.5,
    jitter_probability: float = 0.8,
    brightness: tuple[float, float] = (0.8, 1.2),
    contrast: tuple[float, float] = (0.8, 1.2),
    saturation: tuple[float, float] = (0.8, 1.2),
    hue: tuple[float, float] = (-0.02, 0.02),
) -> A.Compose:
    """Training augmentation to a `size` x `size` image (with `MultiScaleCollate`, pass `max(sizes)`).

    Horizontal flip; with `crop_probability` a random crop that keeps every box whole, resized to the square;
    otherwise a plain square resize; then colour jitter (factors as ranges; hue as a fraction of the colour wheel;
    albumentations' own hue default of +-0.5 would recolour everything).
    """
    check_image_size(size, size_divisor)
    return A.Compose(
        [
            A.HorizontalFlip(p=flip_probability),
            A.RandomSizedBBoxSafeCrop(height=size, width=size, p=crop_probability),
            A.Resize(size, size, area_for_downscale="image"),  # a no-op after the crop
            A.ColorJitter(brightness, contrast, saturation, hue, p=jitter_probability),
        ],
        bbox_params=_bbox_params(),
    )


def build_eval_transform(size: int, size_divisor: int) -> A.Compose:
    """A plain resize to `size` x `size`: how LW-DETR is evaluated; map boxes back with `orig_size`."""
    check_image_size(size, size_divisor)
    return A.Compose([A.Resize(size, size, area_for_downscale="image")], bbox_params=_bbox_params())


def normalize_image(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] RGB -> float32 [3, H, W] normalised with the ImageNet mean and std."""
    # a writable C-ordered array (a copy only when the decoder handed out a read-only buffer): torch warns otherwise
    pixels = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def _xywh_to_normalized_cxcywh(boxes: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Absolute (x, y, w, h) [n, 4] -> (cx, cy, w, h) [n, 4] as fractions of the image size, in [0, 1]."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    return torch.from_numpy((np.concatenate([centre, boxes[:, 2:]], axis=1) / scale).clip(0.0, 1.0))


# ------------------------------------------------------------------------------------------------------- dataset


class DetectionDataset(torch.utils.data.Dataset):
    """A `DetectionSplit` as torch items `(image, target)`.

    image: float32 [3, S, S] normalised (ImageNet mean/std). target: `class_labels` int64 [n], `boxes` float32
    [n, 4] (cx, cy, w, h) normalised to the output image, `image_id` int, `orig_size` (height, width) of the
    original image. Crowd boxes are never in `target` (they only count in COCO evaluation, see
    `DetectionSplit.to_coco_gt`).

    `train=True` draws the random augmentation of item i from (seed, epoch, i) (see `set_epoch`).

    An image that cannot be decoded is reported once (a warning line naming it, whichever worker meets it first)
    and skipped: in training, item i becomes the next decodable record after it (in index order, so a resumed run
    sees the same substitute); in evaluation, a blank grey image without boxes keeps the item's image id, so its
    ground truth counts as missed rather than shifting onto another image.
    """

    def __init__(self, split: DetectionSplit, transform: A.Compose, *, train: bool, seed: int = 0) -> None:
        self.split = split
        self.transform = transform
        self.train = train
        self.seed = seed
        # In shared memory, so that set_epoch in the main process reaches DataLoader workers, persistent ones too.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        # Records found undecodable, shared the same way: each is reported once per run, not once per worker.
        self._bad = torch.zeros(len(split), dtype=torch.bool).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Choose the augmentations of this epoch (call it before iterating)."""
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record, image = self._decodable(index)
        if image is None:  # evaluation of an undecodable image
            image = np.full((_BLANK_SIDE, _BLANK_SIDE, 3), _BLANK_GREY, dtype=np.uint8)
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            boxes, labels = train_targets(record)
        if self.train:
            self._seed_transform(index)
        out = self.transform(image=image, bboxes=boxes, labels=labels)
        height, width = out["image"].shape[:2]
        target = {
            "class_labels": torch.as_tensor(np.asarray(out["labels"]), dtype=torch.int64).reshape(-1),
            "boxes": _xywh_to_normalized_cxcywh(out["bboxes"], width, height),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        return normalize_image(out["image"]), target

    def _decodable(self, index: int) -> tuple[DetectionRecord, np.ndarray | None]:
        """(record, its pixels [H, W, 3] uint8) for item `index`, skipping undecodable images (see the class)."""
        count = len(self.split)
        for step in range(count if self.train else 1):
            position = (index + step) % count
            record = self.split.records[position]
            if bool(self._bad[position]):
                continue
            try:
                return record, np.asarray(record.load_image())
            except DataError as error:
                self._report_bad(position, error)
        if not self.train:
            return self.split.records[index], None
        raise DataError(f"{self.split.name} split: none of its {count} images can be decoded any more")

    def _report_bad(self, position: int, error: DataError) -> None:
        if not bool(self._bad[position]):
            self._bad[position] = True
            _logger.warning("warning: %s; image skipped", error)

    def _seed_transform(self, index: int) -> None:
        # One generator per item makes an item's augmentation independent of worker count and order. All transforms
        # share it: albumentations' Compose(seed=...) seeds every transform identically, correlating their draws.
        seeds = np.random.SeedSequence([self.seed, int(self._epoch), index])
        py_random = random.Random(int(seeds.generate_state(1)[0]))
        self.transform.set_random_state(np.random.default_rng(seeds), py_random)


# ------------------------------------------------------------------------------------------------------ batching


def collate_detection(
    batch: Sequence[tuple[torch.Tensor, dict[str, Any]]],
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
    """Stack same-size items: (pixel_values [B, 3, S, S], pixel_mask [B, S, S] int64 ones, targets list)."""
    images = [image for image, _ in batch]
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) != 1:
        raise ValueError(f"the images of a batch must share one size, got {sorted(shapes)}")
    pixel_values = torch.stack(images)
    batch_size, _, height, width = pixel_values.shape
    pixel_mask = torch.ones((batch_size, height, width), dtype=torch.int64)
    return pixel_values, pixel_mask, [target for _, target in batch]


class MultiScaleCollate:
    """A collate function resizing each batch to one square size drawn from `sizes`.

    The size is a hash of (seed, epoch, the batch's image ids in order): reproducible, and the same whichever
    worker or process collates the batch. Shuffling changes batches every epoch, and so their sizes; `set_epoch`
    varies them further (optional). Build the items at `max(sizes)` so that batches are only downscaled (bilinear,
    antialiased); normalised boxes need no change.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0, size_divisor: int | None = None) -> None:
        if not sizes:
            raise ValueError("MultiScaleCollate needs at least one size")
        if size_divisor is not None:
            for size in sizes:
                check_image_size(size, size_divisor)
        self.sizes = sorted({int(size) for size in sizes})
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # see DetectionDataset

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def choose_size(self, image_ids: Sequence[int]) -> int:
        """The square size of the batch holding `image_ids` (in batch order)."""
        key = repr((self.seed, int(self._epoch), [int(i) for i in image_ids])).encode()
        draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return self.sizes[draw % len(self.sizes)]

    def __call__(
        self, batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        pixel_values, pixel_mask, targets = collate_detection(batch)
        size = self.choose_size([target["image_id"] for target in targets])
        if tuple(pixel_values.shape[-2:]) != (size, size):
            pixel_values = F.interpolate(
                pixel_values, size=(size, size), mode="bilinear", align_corners=False, antialias=True
            )
            pixel_mask = torch.ones((pixel_values.shape[0], size, size), dtype=torch.int64)
        return pixel_values, pixel_mask, targets
