"""Bounding-box helpers: format conversion, area, IoU and generalised IoU.

The layout is always in the name: `cxcywh` is (center_x, center_y, width, height), `xyxy` is
(x_min, y_min, x_max, y_max). Nothing here checks that boxes are well formed; boxes with a negative width or
height give meaningless overlaps (validate targets where they enter, see `lwdetr.loss`).

Two flavours of overlap:
- pairwise (`box_iou`, `generalized_box_iou`): every box of `a` [N, 4] against every box of `b` [M, 4] -> [N, M],
  what the matcher needs;
- paired (`paired_box_iou`, `paired_generalized_box_iou`): box `i` of `a` against box `i` of `b` -> [N], what the
  loss needs for matched pairs. The result equals the diagonal of the pairwise matrix, bit for bit, without
  building the N x N matrix.

Both flavours run the same arithmetic through `_overlap` and `_hull_area` on broadcast shapes, so they cannot drift
apart.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "generalized_box_iou",
    "paired_box_iou",
    "paired_generalized_box_iou",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(center_x, center_y, width, height) [..., 4] -> (x_min, y_min, x_max, y_max) [..., 4]."""
    center_x, center_y, width, height = boxes.unbind(-1)
    half_width, half_height = 0.5 * width, 0.5 * height
    return torch.stack(
        [center_x - half_width, center_y - half_height, center_x + half_width, center_y + half_height], dim=-1
    )


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x_min, y_min, x_max, y_max) [..., 4] -> (center_x, center_y, width, height) [..., 4]."""
    x_min, y_min, x_max, y_max = boxes.unbind(-1)
    return torch.stack([(x_min + x_max) / 2, (y_min + y_max) / 2, x_max - x_min, y_max - y_min], dim=-1)


def at_least_float32(x: Tensor) -> Tensor:
    """`x` in float32 when it is in a half-precision dtype (float16, bfloat16), else `x` itself (float64 stays).

    For areas (products of two coordinates: in half precision they lose most of their digits and overflow for pixel
    coordinates, hence float32 as in detr and torchvision), and for scores and costs that must not saturate.
    """
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def box_area(boxes: Tensor) -> Tensor:
    """Area of xyxy boxes [..., 4] -> [...]; float32 for half-precision inputs."""
    boxes = at_least_float32(boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _overlap(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU and union area of xyxy boxes whose leading dimensions broadcast, e.g. [N, 1, 4] with [1, M, 4]."""
    top_left = torch.maximum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.minimum(boxes1[..., 2:], boxes2[..., 2:])
    # Disjoint boxes have a "negative" intersection extent: clamp it to an empty one.
    extent = (bottom_right - top_left).clamp(min=0)
    intersection = extent[..., 0] * extent[..., 1]
    union = box_area(boxes1) + box_area(boxes2) - intersection
    return intersection / union, union


def _hull_area(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Area of the smallest box enclosing both xyxy boxes (broadcast like `_overlap`)."""
    top_left = torch.minimum(boxes1[..., :2], boxes2[..., :2])
    bottom_right = torch.maximum(boxes1[..., 2:], boxes2[..., 2:])
    extent = (bottom_right - top_left).clamp(min=0)
    return extent[..., 0] * extent[..., 1]


def _generalized(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    iou, union = _overlap(boxes1, boxes2)
    hull = _hull_area(boxes1, boxes2)
    # GIoU = IoU - (part of the hull covered by neither box) / hull; it is in [-1, 1] and, unlike IoU, still
    # says how far apart two disjoint boxes are.
    return iou - (hull - union) / hull


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of xyxy boxes [N, 4] and [M, 4].

    Returns:
        (iou [N, M], union [N, M]); the union area is returned because GIoU needs it too.
    """
    return _overlap(boxes1[:, None, :], boxes2[None, :, :])


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al. 2019) of xyxy boxes [N, 4] and [M, 4] -> [N, M]."""
    return _generalized(boxes1[:, None, :], boxes2[None, :, :])


def paired_box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """IoU of xyxy box `i` of [N, 4] with box `i` of [N, 4].

    Returns:
        (iou [N], union [N]) — the diagonal of `box_iou(boxes1, boxes2)`.
    """
    _check_paired(boxes1, boxes2)
    return _overlap(boxes1, boxes2)


def paired_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalised IoU of xyxy box `i` of [N, 4] with box `i` of [N, 4] -> [N], the diagonal of the pairwise one."""
    _check_paired(boxes1, boxes2)
    return _generalized(boxes1, boxes2)


def _check_paired(boxes1: Tensor, boxes2: Tensor) -> None:
    # Without this, [N, 4] against [1, 4] would silently broadcast into a one-to-many comparison.
    if boxes1.shape != boxes2.shape or boxes1.dim() != 2 or boxes1.shape[-1] != 4:
        raise ValueError(f"paired box ops need two [N, 4] tensors, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}")
