"""Detection for the app, without gradio: run the model once at a low floor, then filter in Python.

A prediction is kept as the `Detector`'s own `Detection`s (box in pixels of the original image) in a `gr.State`;
the `/detect` API answers with `Detection.as_dict()` and the JSON download holds `lwdetr.postprocess.coco_record`s,
the records the CLI writes and evaluation scores.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from lwdetr.detector import Detector
from lwdetr.draw import draw_detections
from lwdetr.postprocess import Detection, coco_record

__all__ = [
    "COLUMNS",
    "FLOOR_MAX_DETECTIONS",
    "FLOOR_THRESHOLD",
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


def run_detection(
    detector: Detector,
    image: Image.Image,
    threshold: float = FLOOR_THRESHOLD,
    max_detections: int = FLOOR_MAX_DETECTIONS,
) -> tuple[list[Detection], float]:
    """All detections scoring above `threshold` (best first, at most `max_detections`) and the seconds it took."""
    start = time.perf_counter()
    detections = detector.predict(image, threshold=threshold, max_detections=max_detections)
    seconds = time.perf_counter() - start
    return sorted(detections, key=lambda d: d.score, reverse=True), seconds


def filter_detections(
    detections: Iterable[Detection],
    threshold: float,
    max_detections: int,
    classes: Sequence[str] | None = None,
) -> list[Detection]:
    """The detections scoring at least `threshold`, of the given class names (all when empty), best first, capped."""
    wanted = set(classes or ())
    kept = [d for d in detections if d.score >= threshold and (not wanted or d.label in wanted)]
    kept.sort(key=lambda d: d.score, reverse=True)
    return kept[: max(0, int(max_detections))]


def status_line(
    candidates: Sequence[Detection],
    kept: Sequence[Detection],
    threshold: float,
    classes: Sequence[str],
    name: str,
) -> str:
    """What the Detect tab says under the result; when the filters leave no box, why, and what to change."""
    if not candidates:
        return f"No object found in {name}, not even at a score of {FLOOR_THRESHOLD}: try another model."
    if kept:
        return f"{len(candidates)} candidate boxes from {name}; filters apply instantly."
    wanted = [d for d in candidates if not classes or d.label in classes]
    if not wanted:
        return f"No box of the chosen classes in {name}: clear the class filter to see the other classes."
    best = max(wanted, key=lambda d: d.score)
    return (
        f"No box scores {threshold:.2f} or more in {name}: the best is {best.label} at {best.score:.2f}. "
        f"Lower the score threshold to about {max(FLOOR_THRESHOLD, best.score - 0.005):.2f} to see it."
    )


def table_rows(detections: Iterable[Detection]) -> list[list[Any]]:
    """Rows for the table: label, score (3 decimals), x0, y0, x1, y1 (1 decimal)."""
    return [[d.label, round(d.score, 3), *(round(v, 1) for v in d.box)] for d in detections]


def image_id_from_name(name: str | None) -> int:
    """COCO-style numeric id from a file name's digits (`000000039769.jpg` -> 39769), else 0."""
    digits = re.fullmatch(r"\D*?(\d{1,12})", Path(name or "").stem)
    return int(digits.group(1)) if digits else 0


def coco_results(
    detections: Iterable[Detection], image_size: tuple[int, int], image_id: int = 0
) -> list[dict[str, Any]]:
    """The detections as COCO result records (`lwdetr.postprocess.coco_record`) of an image of `image_size`
    (height, width): image_id, category_id, bbox [x, y, width, height] clipped to the image, score."""
    return [coco_record(d, image_id, image_size) for d in detections]


def draw(image: Image.Image, detections: Iterable[Detection]) -> Image.Image:
    """`image` with a coloured box (one colour per class) and a "label score" tag per detection."""
    return draw_detections(image, detections)
