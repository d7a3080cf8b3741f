"""Augmentations, the torch dataset and batching for detection fine-tuning.

Pixels reach the model the way they reach it at inference: decoded by `lwdetr.images.load_image` (through
`DetectionRecord.load_image`), then resized, rescaled and normalised by `lwdetr.processing.square_processor(S)`,
the processor saved with the fine-tuned model and used by its `Detector`. Images are squashed to a square S x S (no
aspect preservation), as LW-DETR is trained and evaluated. S must be a multiple of the model's `size_divisor`
(patch size x windows per side: 32 for `nano`, 64 for the published presets; `size_divisor_of(config)` computes it).

A `DetectionDataset` item is the decoded image (augmented in training: flip, a crop that keeps every box, colour
jitter, all at the image's own resolution) and its target; the collate function `PreprocessCollate` resizes and
normalises the batch in one step with the processor. Multi-scale training (LW-DETR draws a square size per batch
around its base size, e.g. 448..896 for 640) only changes which size the collate function draws: every batch is
resized once, from the decoded image, never resized again. The draw needs no shared counter, so it is the same in
any DataLoader worker and under accelerate (which wraps the sampler, not the collate function):

    sizes = multiscale_sizes(640, 64)                                  # [448, 512, ..., 896]
    train = DetectionDataset(data.train, build_train_transform(), train=True)
    loader = DataLoader(train, batch_size=4, shuffle=True, collate_fn=PreprocessCollate(sizes, seed=0))
    val = DataLoader(DetectionDataset(data.val, train=False), batch_size=4, collate_fn=PreprocessCollate([640]))

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
from PIL import Image

from finetune.data import DetectionRecord, DetectionSplit, train_targets
from finetune.errors import DataError
from lwdetr.processing import square_processor

__all__ = [
    "DetectionDataset",
    "PreprocessCollate",
    "build_train_transform",
    "check_image_size",
    "multiscale_sizes",
    "size_divisor_of",
]

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
    *,
    crop_probability: float = 0.5,
    flip_probability: float = 0.5,
    jitter_probability: float = 0.8,
    brightness: tuple[float, float] = (0.8, 1.2),
    contrast: tuple[float, float] = (0.8, 1.2),
    saturation: tuple[float, float] = (0.8, 1.2),
    hue: tuple[float, float] = (-0.02, 0.02),
) -> A.Compose:
    """Training augmentation at the image's own resolution (the resize is `PreprocessCollate`'s, as at inference).

    Horizontal flip; with `crop_probability` a random crop that keeps every box whole; then colour jitter (factors as
    ranges; hue as a fraction of the colour wheel; albumentations' own hue default of +-0.5 would recolour
    everything).
    """
    return A.Compose(
        [
            A.HorizontalFlip(p=flip_probability),
            A.BBoxSafeRandomCrop(p=crop_probability),
            A.ColorJitter(brightness, contrast, saturation, hue, p=jitter_probability),
        ],
        bbox_params=_bbox_params(),
    )


def _xywh_to_normalized_cxcywh(boxes: np.ndarray, width: int, height: int) -> torch.Tensor:
    """Absolute (x, y, w, h) [n, 4] -> (cx, cy, w, h) [n, 4] as fractions of the image size, in [0, 1]."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scale = np.array([width, height, width, height], dtype=np.float32)
    centre = boxes[:, :2] + boxes[:, 2:] / 2
    return torch.from_numpy((np.concatenate([centre, boxes[:, 2:]], axis=1) / scale).clip(0.0, 1.0))


# ------------------------------------------------------------------------------------------------------- dataset


class DetectionDataset(torch.utils.data.Dataset):
    """A `DetectionSplit` as items `(image, target)` for `PreprocessCollate`.

    image: the decoded RGB `PIL.Image.Image` (as `lwdetr.images.load_image` gives it), after `transform` when one is
    given (an albumentations `Compose` with coco bbox params, e.g. `build_train_transform()`); evaluation passes
    none. target: `class_labels` int64 [n], `boxes` float32 [n, 4] (cx, cy, w, h) normalised to the image, which a
    squash resize leaves unchanged, `image_id` int, `orig_size` (height, width) of the original image. Crowd boxes
    are never in `target` (they only count in COCO evaluation, see `DetectionSplit.to_coco_gt`).

    `train=True` draws the random augmentation of item i from (seed, epoch, i) (see `set_epoch`).

    An image that cannot be decoded is reported once (a warning line naming it, whichever worker meets it first)
    and skipped: in training, item i becomes the next decodable record after it (in index order, so a resumed run
    sees the same substitute); in evaluation, a blank grey image without boxes keeps the item's image id, so its
    ground truth counts as missed rather than shifting onto another image.
    """

    def __init__(
        self, split: DetectionSplit, transform: A.Compose | None = None, *, train: bool, seed: int = 0
    ) -> None:
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

    def __getitem__(self, index: int) -> tuple[Image.Image, dict[str, Any]]:
        record, image = self._decodable(index)
        if image is None:  # evaluation of an undecodable image
            image = Image.new("RGB", (_BLANK_SIDE, _BLANK_SIDE), (_BLANK_GREY,) * 3)
            boxes, labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
        else:
            boxes, labels = train_targets(record)
        if self.transform is not None:
            if self.train:
                self._seed_transform(index)
            out = self.transform(image=np.asarray(image), bboxes=boxes, labels=labels)
            image, boxes, labels = Image.fromarray(out["image"]), out["bboxes"], out["labels"]
        target = {
            "class_labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1),
            "boxes": _xywh_to_normalized_cxcywh(boxes, image.width, image.height),
            "image_id": record.image_id,
            "orig_size": (record.height, record.width),
        }
        return image, target

    def _decodable(self, index: int) -> tuple[DetectionRecord, Image.Image | None]:
        """(record, its decoded RGB image) for item `index`, skipping undecodable images (see the class)."""
        count = len(self.split)
        for step in range(count if self.train else 1):
            position = (index + step) % count
            record = self.split.records[position]
            if bool(self._bad[position]):
                continue
            try:
                return record, record.load_image()
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


class PreprocessCollate:
    """The collate function: a batch of `DetectionDataset` items as model inputs at one square size from `sizes`.

    Every image is resized, rescaled and normalised by `lwdetr.processing.square_processor(size)`, the model's own
    inference pre-processing, in one step from the decoded (and augmented) image. Returns `(pixel_values
    [B, 3, S, S] float32, pixel_mask [B, S, S] int64 ones, targets list)`.

    With several sizes (multi-scale training), the size is a hash of (seed, epoch, the batch's image ids in order):
    reproducible, and the same whichever worker or process collates the batch. Shuffling changes batches every
    epoch, and so their sizes; `set_epoch` varies them further (optional). Normalised boxes need no change.
    """

    def __init__(self, sizes: Sequence[int], seed: int = 0, size_divisor: int | None = None) -> None:
        if not sizes:
            raise ValueError("PreprocessCollate needs at least one size")
        if size_divisor is not None:
            for size in sizes:
                check_image_size(size, size_divisor)
        self.sizes = sorted({int(size) for size in sizes})
        self.processors = {size: square_processor(size) for size in self.sizes}
        self.seed = seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()  # see DetectionDataset

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def choose_size(self, image_ids: Sequence[int]) -> int:
        """The square size of the batch holding `image_ids` (in batch order)."""
        if len(self.sizes) == 1:
            return self.sizes[0]
        key = repr((self.seed, int(self._epoch), [int(i) for i in image_ids])).encode()
        draw = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")
        return self.sizes[draw % len(self.sizes)]

    def __call__(
        self, batch: Sequence[tuple[Image.Image, dict[str, Any]]]
    ) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        images = [image for image, _ in batch]
        targets = [target for _, target in batch]
        size = self.choose_size([target["image_id"] for target in targets])
        inputs = self.processors[size].process_loaded(images)
        return inputs["pixel_values"], inputs["pixel_mask"], targets
