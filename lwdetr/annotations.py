"""COCO detection annotations -> training labels, as `DeformableDetrImageProcessor(annotations=...)` returns them.

One image's annotation is `{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": int, "area":
float, "iscrowd": 0 or 1}, ...]}` in pixels of the original image. Its label is a dict of arrays in the reference's
key order: size [2] (h, w of the padded input), image_id [1], class_labels [n], boxes [n, 4] (cxcywh normalised by
that size), area [n] (scaled with the resize), iscrowd [n], orig_size [2]. Crowd regions are dropped and boxes are
clipped to the image, empty ones dropped, as in the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["coco_detection_label", "rescale_label_to_canvas"]


def coco_detection_label(
    annotation: Mapping[str, Any],
    original: tuple[int, int],
    resized: tuple[int, int],
    normalise: bool = True,
    name: str = "annotation",
) -> dict[str, np.ndarray]:
    """The label of one image of `original` (h, w) size resized to `resized` (h, w), before padding: boxes are
    cxcywh normalised by `resized` (absolute xyxy in resized pixels with `normalise=False`).

    Raises:
        ValueError: `annotation` is not in the COCO detection format; the message names it by `name`.
    """
    try:
        objects = [o for o in annotation["annotations"] if o.get("iscrowd", 0) == 0]
        boxes = np.asarray([o["bbox"] for o in objects], dtype=np.float32).reshape(-1, 4)
        classes = np.asarray([o["category_id"] for o in objects], dtype=np.int64)
        area = np.asarray([o.get("area", o["bbox"][2] * o["bbox"][3]) for o in objects], dtype=np.float32)
        image_id = np.asarray([annotation["image_id"]], dtype=np.int64)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(
            f"{name}: not a COCO detection annotation ({type(error).__name__}: {error}); expected "
            '{"image_id": ..., "annotations": [{"bbox": [x, y, w, h], "category_id": ..., "area": ...}]}'
        ) from None
    height, width = original
    xyxy = np.concatenate((boxes[:, :2], boxes[:, :2] + boxes[:, 2:]), 1)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, height)
    keep = (xyxy[:, 2] > xyxy[:, 0]) & (xyxy[:, 3] > xyxy[:, 1])
    scale_x, scale_y = resized[1] / width, resized[0] / height
    xyxy = xyxy[keep] * np.asarray([scale_x, scale_y, scale_x, scale_y], dtype=np.float32)
    if normalise:
        centres, sizes = (xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]
        xyxy = np.concatenate((centres, sizes), 1) / np.asarray([resized[1], resized[0]] * 2, dtype=np.float32)
    return {
        "size": np.asarray(resized, dtype=np.int64),
        "image_id": image_id,
        "class_labels": classes[keep],
        "boxes": xyxy.astype(np.float32).reshape(-1, 4),
        "area": (area[keep] * np.float32(scale_x * scale_y)).astype(np.float32),
        "iscrowd": np.zeros(int(keep.sum()), dtype=np.int64),
        "orig_size": np.asarray(original, dtype=np.int64),
    }


def rescale_label_to_canvas(label: dict[str, Any], canvas: tuple[int, int], normalised: bool = True) -> dict:
    """A label after its image was padded (bottom/right) to `canvas` (h, w): normalised boxes are relative to the
    padded image, whose size the label now records."""
    height, width = (int(v) for v in label["size"])
    out = dict(label)
    if normalised:
        factors = np.asarray([width / canvas[1], height / canvas[0]] * 2, dtype=np.float32)
        out["boxes"] = (np.asarray(label["boxes"], dtype=np.float32) * factors).astype(np.float32)
    out["size"] = np.asarray(canvas, dtype=np.int64)
    return out
