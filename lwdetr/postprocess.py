"""Post-processing, one path for everyone: raw outputs -> `Detection`s -> COCO result records.

The processor's `post_process_object_detection` (and through it the `Detector`, the CLI and the app) and
finetune's evaluation (which measures the AP written in a model card) all decode boxes with `top_k_detections`,
turn them into `Detection`s with `to_detections` and write COCO records with `coco_record`. A box and its score are
therefore the same numbers in a `Detector` answer, a `results.json` of the CLI, the app's JSON download and the
evaluation that scored the model.

Decoding follows Deformable DETR (transformers' processors): every (query, class) pair competes in one sigmoid
top-k per image, and normalised cxcywh boxes become xyxy scaled by each image's own (height, width). The model sees
a resize of the whole image (a squash for the square sizes LW-DETR is trained at), so normalised coordinates map
straight onto the original pixels. Boxes are not clipped here, as in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .box_ops import at_least_float32, box_cxcywh_to_xyxy

__all__ = ["Detection", "coco_record", "to_detections", "top_k_detections"]

# Digits kept in a COCO record: a thousandth of a pixel is far below any annotation's precision, and six decimals
# keep the ranking of scores (what AP depends on) for all but ties below one in a million.
_BOX_DIGITS = 3
_SCORE_DIGITS = 6


@dataclass(frozen=True)
class Detection:
    """One detected object. `box` is (x0, y0, x1, y1) in pixels of the original (EXIF-rotated) image."""

    label_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]

    @property
    def xywh(self) -> tuple[float, float, float, float]:
        """The box as COCO's (x, y, width, height)."""
        x0, y0, x1, y1 = self.box
        return (x0, y0, x1 - x0, y1 - y0)

    def scaled(self, factor: float) -> Detection:
        """The same detection with its box multiplied by `factor` (for drawing on a shrunken copy of the image)."""
        return Detection(self.label_id, self.label, self.score, tuple(value * factor for value in self.box))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able dict: `{"label", "label_id", "score", "box": [x0, y0, x1, y1]}`."""
        return {"label": self.label, "label_id": self.label_id, "score": self.score, "box": list(self.box)}

    def as_pipeline_dict(self) -> dict[str, Any]:
        """The shape `transformers.pipeline("object-detection")` returns: score, label and an integer box
        (truncated, as the pipeline does) with xmin, ymin, xmax, ymax."""
        xmin, ymin, xmax, ymax = (int(value) for value in self.box)
        return {
            "score": self.score,
            "label": self.label,
            "box": {"xmin": xmin, "ymin": ymin, "xmax": xmax, "ymax": ymax},
        }


def top_k_detections(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    target_sizes: torch.Tensor | Sequence[Sequence[int]] | None = None,
    top_k: int = 100,
    threshold: float | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Per image, the `top_k` best (query, class) pairs, then those scoring strictly above `threshold` (if given).

    Args:
        logits: `[B, Q, C]` class logits.
        pred_boxes: `[B, Q, 4]` normalised (cx, cy, w, h).
        target_sizes: `[B, 2]` tensor or a list of `(height, width)`; boxes are scaled to these pixel sizes.
            Without it boxes stay normalised.
        top_k: candidates kept per image, over all (query, class) pairs.
        threshold: keep the candidates scoring strictly above it; `None` keeps all `top_k`.

    Returns:
        One dict per image with `scores` `[N]`, `labels` `[N]` (int64) and `boxes` `[N, 4]` (x0, y0, x1, y1),
        best first, in float32 at least: float16 scores would tie in the top-k and float16 boxes are ~0.3 px apart
        at 640.
    """
    logits, pred_boxes = at_least_float32(logits), at_least_float32(pred_boxes)
    batch, _, num_classes = logits.shape
    if target_sizes is not None and len(target_sizes) != batch:
        raise ValueError(f"got {len(target_sizes)} target sizes for a batch of {batch}")
    probs = logits.sigmoid().reshape(batch, -1)
    scores, flat_index = probs.topk(min(top_k, probs.shape[1]), dim=1)
    labels = flat_index % num_classes
    query_index = torch.div(flat_index, num_classes, rounding_mode="floor")
    boxes = box_cxcywh_to_xyxy(pred_boxes).gather(1, query_index.unsqueeze(-1).expand(-1, -1, 4))
    if target_sizes is not None:
        sizes = torch.as_tensor(target_sizes, dtype=torch.float32).reshape(batch, 2).to(boxes.device)
        height, width = sizes.unbind(1)
        boxes = boxes * torch.stack([width, height, width, height], dim=1)[:, None, :]
    results = []
    for image_scores, image_labels, image_boxes in zip(scores, labels, boxes):
        keep = image_scores > threshold if threshold is not None else slice(None)
        results.append({"scores": image_scores[keep], "labels": image_labels[keep], "boxes": image_boxes[keep]})
    return results


def to_detections(result: Mapping[str, torch.Tensor], id2label: Mapping[int, str] | None = None) -> list[Detection]:
    """One image's `top_k_detections` dict as `Detection`s, in its order; labels named by `id2label` (else the id)."""
    names = id2label or {}
    scores, labels, boxes = result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()
    return [
        Detection(label, names.get(label, str(label)), score, tuple(box))
        for score, label, box in zip(scores, labels, boxes)
    ]


def coco_record(detection: Detection, image_id: int, image_size: tuple[int, int]) -> dict[str, Any]:
    """A COCO result record `{"image_id", "category_id", "bbox": [x, y, width, height], "score"}`.

    The box is clipped to the image (`image_size` is its (height, width)): COCO's ground truth never leaves the
    image, so an edge predicted outside it could only lower the overlap. Values are rounded to `_BOX_DIGITS` and
    `_SCORE_DIGITS` decimals, everywhere the same.
    """
    height, width = image_size
    x0, y0, x1, y1 = detection.box
    x0, x1 = min(max(x0, 0.0), width), min(max(x1, 0.0), width)
    y0, y1 = min(max(y0, 0.0), height), min(max(y1, 0.0), height)
    bbox = [round(value, _BOX_DIGITS) for value in (x0, y0, x1 - x0, y1 - y0)]
    return {
        "image_id": int(image_id),
        "category_id": int(detection.label_id),
        "bbox": bbox,
        "score": round(float(detection.score), _SCORE_DIGITS),
    }
