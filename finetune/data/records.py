"""The loaded dataset's records: one image with its boxes (`DetectionRecord`), and one split of them with its COCO
ground truth for evaluation (`DetectionSplit`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from finetune.pixels import decode_image
from finetune.safe_paths import shorten

__all__ = ["DetectionRecord", "DetectionSplit", "train_targets"]


@dataclass
class DetectionRecord:
    """One image and its boxes.

    `boxes`: float32 [n, 4] absolute (x, y, w, h) in pixels of the upright image (as `load_image` decodes it),
    clipped to it, w and h > 0. `labels`: int64 [n] contiguous label ids. `iscrowd`: bool [n]; crowd boxes count
    in evaluation only. `width`/`height` are the real upright image size (read from the file).
    """

    image_id: int
    file_name: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    iscrowd: np.ndarray

    def load_image(self) -> Image.Image:
        """The image as inference sees it (`lwdetr.images.load_image`: RGB, upright, same pixel limit);
        `DataError` naming the file (by its `file_name`) if it cannot be decoded."""
        return decode_image(self.path, shorten(self.file_name))


def train_targets(record: DetectionRecord) -> tuple[np.ndarray, np.ndarray]:
    """The boxes a model learns from: (boxes float32 [m, 4] absolute xywh, labels int64 [m]), crowd boxes left out."""
    keep = ~record.iscrowd
    return record.boxes[keep], record.labels[keep]


@dataclass
class DetectionSplit:
    """The records of one split, and its COCO ground truth for evaluation."""

    name: str
    records: list[DetectionRecord]
    id2label: dict[int, str]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> DetectionRecord:
        return self.records[index]

    def __iter__(self) -> Iterator[DetectionRecord]:
        return iter(self.records)

    def to_coco_gt(self) -> dict[str, Any]:
        """A COCO ground-truth dict for pycocotools.

        Category ids are the contiguous label ids (all K labels, present here or not). Annotation ids are
        renumbered from 1: COCOeval stores a match as the matched ground-truth id, so an id of 0 reads as
        "unmatched" and a perfect prediction would score below 1.0. Crowd boxes keep `iscrowd=1`; area = w * h.
        """
        images, annotations = [], []
        for record in self.records:
            images.append(
                {"id": record.image_id, "file_name": record.file_name, "width": record.width, "height": record.height}
            )
            for box, label, crowd in zip(record.boxes.tolist(), record.labels.tolist(), record.iscrowd.tolist()):
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": record.image_id,
                        "category_id": label,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": int(crowd),
                    }
                )
        categories = [{"id": label, "name": name} for label, name in sorted(self.id2label.items())]
        return {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
