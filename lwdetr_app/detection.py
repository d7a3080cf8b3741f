"""Detection for the app, without gradio: run the model once at a low floor, then filter in Python.

A prediction is kept as plain JSON-able dicts `{"label", "label_id", "score", "box": [x0, y0, x1, y1]}` (box in
pixels of the original image), so it fits in a `gr.State`, in the `/detect` API answer and in a COCO results file.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lwdetr.detector import Detection, Detector
from lwdetr.draw import draw_detections

__all__ = [
    "COLUMNS",
    "FLOOR_MAX_DETECTIONS",
    "FLOOR_THRESHOLD",
    "as_dicts",
    "coco_results",
    "draw",
    "filter_detections",
    "image_id_from_name",
    "run_detection",
    "status_line",
    "table_rows",
]

# The model runs once per image/model at this floor; the sliders then only filter (no second forward pass).
FLOOR_THRESHOLD = 0.01
FLOOR_MAX_DETECTIONS = 300
COLUMNS = ["label", "score", "x0", "y0", "x1", "y1"]


def _as_dict(detection: Detection) -> dict[str, Any]:
    return {
        "label": detection.label,
        "label_id": int(detection.label_id),
        "score": float(detection.score),
        "box": [float(value) for value in detection.box],
    }


def as_dicts(detections: Iterable[Detection]) -> list[dict[str, Any]]:
    """`Detection`s as the app's plain dicts, best first."""
    return sorted((_as_dict(d) for d in detections), key=lambda d: d["score"], reverse=True)


def run_detection(
    detector: Detector,
    image: Image.Image,
    threshold: float = FLOOR_THRESHOLD,
    max_detections: int = FLOOR_MAX_DETECTIONS,
) -> tuple[list[dict[str, Any]], float]:
    """All detections scoring above `threshold` (best first, at most `max_detections`) and the seconds it took."""
    start = time.perf_counter()
    detections = detector.predict(image, threshold=threshold, max_detections=max_detections)
    seconds = time.perf_counter() - start
    return as_dicts(detections), seconds


def filter_detections(
    detections: Iterable[dict[str, Any]],
    threshold: float,
    max_detections: int,
    classes: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The detections scoring at least `threshold`, of the given class names (all when empty), best first, capped."""
    wanted = set(classes or ())
    kept = [d for d in detections if d["score"] >= threshold and (not wanted or d["label"] in wanted)]
    kept.sort(key=lambda d: d["score"], reverse=True)
    return kept[: max(0, int(max_detections))]


def status_line(
    candidates: Sequence[dict[str, Any]],
    kept: Sequence[dict[str, Any]],
    threshold: float,
    classes: Sequence[str],
    name: str,
) -> str:
    """What the Detect tab says under the result; when the filters leave no box, why, and what to change."""
    if not candidates:
        return f"No object found in {name}, not even at a score of {FLOOR_THRESHOLD}: try another model."
    if kept:
        return f"{len(candidates)} candidate boxes from {name}; filters apply instantly."
    wanted = [d for d in candidates if not classes or d["label"] in classes]
    if not wanted:
        return f"No box of the chosen classes in {name}: clear the class filter to see the other classes."
    best = max(wanted, key=lambda d: d["score"])
    return (
        f"No box scores {threshold:.2f} or more in {name}: the best is {best['label']} at {best['score']:.2f}. "
        f"Lower the score threshold to about {max(FLOOR_THRESHOLD, best['score'] - 0.005):.2f} to see it."
    )


def table_rows(detections: Iterable[dict[str, Any]]) -> list[list[Any]]:
    """Rows for the table: label, score (3 decimals), x0, y0, x1, y1 (1 decimal)."""
    return [[d["label"], round(d["score"], 3), *(round(v, 1) for v in d["box"])] for d in detections]


def image_id_from_name(name: str | None) -> int:
    """COCO-style numeric id from a file name's digits (`000000039769.jpg` -> 39769), else 0."""
    digits = re.fullmatch(r"\D*?(\d{1,12})", Path(name or "").stem)
    return int(digits.group(1)) if digits else 0


def coco_results(detections: Iterable[dict[str, Any]], image_id: int = 0) -> list[dict[str, Any]]:
    """The detections in COCO results format: image_id, category_id, bbox [x, y, width, height], score."""
    results = []
    for d in detections:
        x0, y0, x1, y1 = d["box"]
        bbox = [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]
        results.append(
            {"image_id": image_id, "category_id": d["label_id"], "bbox": bbox, "score": round(d["score"], 4)}
        )
    return results


def draw(image: Image.Image, detections: Iterable[dict[str, Any]]) -> Image.Image:
    """`image` with a coloured box (one colour per class) and a "label score" tag per detection."""
    boxes = [Detection(d["label_id"], d["label"], d["score"], tuple(d["box"])) for d in detections]
    return draw_detections(image, boxes)
