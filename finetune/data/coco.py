"""One COCO annotation file, checked: its categories, its images (found inside the dataset's folder and decoded once
as training will decode them) and its boxes (cleaned or dropped), as records and a list of what was wrong."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from finetune.coco_json import normalise_id, read_coco_json
from finetune.data.records import DetectionRecord
from finetune.data.report import SplitProblems
from finetune.errors import DataError
from finetune.pixels import orient_boxes, probe_image
from finetune.safe_paths import OutsideRootError, climbs_out, resolve_inside, shorten

__all__ = ["ParsedSplit", "parse_split"]

# A box may overshoot the image by rounding (Roboflow writes 800.0004); only larger overshoots are reported.
_CLIP_REPORT_TOLERANCE = 0.5


@dataclass
class _ImageEntry:
    file_name: str
    path: Path
    width: int  # upright, as decoded
    height: int
    orientation: int  # EXIF orientation to apply to its boxes: 1 unless they were drawn on the stored pixels
    stored_size: tuple[int, int]


@dataclass
class ParsedSplit:
    """One annotation file after checking; record labels still hold the original category ids."""

    name: str
    json_path: Path
    categories: dict[int, str]
    records: list[DetectionRecord]
    problems: SplitProblems


def parse_split(name: str, json_path: Path) -> ParsedSplit:
    """Read one COCO annotation file, check its images and boxes, and build records (labels = category ids)."""
    coco = read_coco_json(json_path)
    categories = _read_categories(coco["categories"], json_path)
    problems = SplitProblems()
    images, skipped = _read_images(coco["images"], json_path, problems)
    per_image: dict[int, list[tuple[tuple[float, ...], int, bool]]] = {image_id: [] for image_id in images}
    for annotation in coco["annotations"]:
        if not isinstance(annotation, dict):
            problems.malformed_annotations += 1
            continue
        image_id = normalise_id(annotation.get("image_id"))
        category_id = normalise_id(annotation.get("category_id"))
        if image_id in skipped:
            problems.skipped_image_annotations += 1
        elif image_id not in per_image:
            problems.unknown_image_annotations += 1
        elif category_id not in categories:
            problems.unknown_category_annotations += 1
        elif (box := _clean_box(annotation, images[image_id], problems)) is not None:
            per_image[image_id].append((box, category_id, _is_crowd(annotation.get("iscrowd", 0))))
    records = [_make_record(image_id, images[image_id], boxes) for image_id, boxes in per_image.items()]
    return ParsedSplit(name, json_path, categories, records, problems)


def _read_categories(entries: list[Any], json_path: Path) -> dict[int, str]:
    categories: dict[int, str] = {}
    for entry in entries:
        category_id = normalise_id(entry.get("id")) if isinstance(entry, dict) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if category_id is None or not isinstance(name, (str, int, float)) or isinstance(name, bool):
            raise DataError(f"{json_path}: malformed category {_shown_entry(entry)} (needs an integer id and a name)")
        name = shorten(str(name))
        if categories.get(category_id, name) != name:
            raise DataError(f"{json_path}: category id {category_id} is listed twice with different names")
        categories[category_id] = name
    return categories


def _read_images(
    entries: list[Any], json_path: Path, problems: SplitProblems
) -> tuple[dict[int, _ImageEntry], set[int]]:
    """Image id -> found and readable image; and the ids of the images skipped."""
    root = json_path.parent.resolve()
    found: dict[int, _ImageEntry] = {}
    skipped: set[int] = set()
    for entry in entries:
        image_id = normalise_id(entry.get("id")) if isinstance(entry, dict) else None
        file_name = entry.get("file_name") if isinstance(entry, dict) else None
        if image_id is None or not isinstance(file_name, str) or not file_name:
            problems.malformed_images.append(_shown_entry(entry))
            continue
        if image_id in found or image_id in skipped:
            raise DataError(f"{json_path}: image id {image_id} is listed twice")
        image = _check_image(root, file_name, _declared_size(entry), problems)
        if image is None:
            skipped.add(image_id)
        else:
            found[image_id] = image
    return found, skipped


def _check_image(
    root: Path, file_name: str, declared: tuple[int, int] | None, problems: SplitProblems
) -> _ImageEntry | None:
    """The image `file_name` names, decoded once as training will decode it; None (and a problem noted) if it is
    outside the dataset, missing or unreadable."""
    shown = shorten(file_name)
    try:
        path = _find_image(root, file_name)
    except OutsideRootError:
        problems.outside_images.append(shown)
        return None
    if path is None:
        problems.missing_images.append(shown)
        return None
    try:
        probe = probe_image(path, shown)
    except DataError:
        problems.unreadable_images.append(shown)
        return None
    (width, height), orientation = probe.size, probe.orientation
    stored_frame = orientation in (5, 6, 7, 8) and declared == probe.stored_size
    if orientation != 1:
        problems.exif_rotated.append(shown)
    if stored_frame:
        problems.stored_frame_boxes.append(shown)
    elif declared is not None and declared != probe.size:
        problems.size_mismatches.append(f"{shown}: json {declared[0]}x{declared[1]}, file {width}x{height}")
    return _ImageEntry(file_name, path, width, height, orientation if stored_frame else 1, probe.stored_size)


def _find_image(root: Path, file_name: str) -> Path | None:
    """The first regular file of: root/name, root/images/name, root/basename, root/images/basename, all resolved
    inside `root` (`OutsideRootError` for a name that is absolute, climbs out or leads out through a symlink)."""
    relative = PurePosixPath(file_name.replace("\\", "/"))
    if climbs_out(file_name):
        raise OutsideRootError(file_name)
    candidates = [str(relative), f"images/{relative}", relative.name, f"images/{relative.name}"]
    outside = None
    for candidate in dict.fromkeys(candidates):  # once each, in order
        try:
            path = resolve_inside(root, candidate)
        except OutsideRootError as error:
            outside = outside or error
            continue
        if path is not None:
            return path
    if outside is not None:
        raise outside
    return None


def _declared_size(entry: dict[str, Any]) -> tuple[int, int] | None:
    width, height = entry.get("width"), entry.get("height")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (width, height)):
        return None
    return round(width), round(height)


def _is_crowd(value: Any) -> bool:
    """COCO writes iscrowd as 0 or 1; anything that is not a non-zero number counts as not crowd."""
    return value is True or (isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0)


def _box_values(bbox: Any) -> list[float] | None:
    """The 4 finite floats of a COCO bbox, or None when it is anything else."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        return None
    try:
        values = [float(v) for v in bbox]
    except OverflowError:  # an int of thousands of digits
        return None
    return values if all(math.isfinite(v) for v in values) else None


def _clean_box(annotation: dict[str, Any], image: _ImageEntry, problems: SplitProblems) -> tuple[float, ...] | None:
    """The box clipped to the image as (x, y, w, h), or None (and a problem recorded) when it must be dropped.

    A box drawn on the stored pixels of an EXIF-tagged image (see `finetune.pixels`) is first turned upright.
    """
    where = f"{shorten(image.file_name)} (annotation {_shown_value(annotation.get('id'))})"
    values = _box_values(annotation.get("bbox"))
    if values is None:
        problems.malformed_boxes.append(f"{where}: bbox {_shown_value(annotation.get('bbox'))}")
        return None
    x, y, w, h = values
    if w <= 0 or h <= 0:
        problems.degenerate_boxes.append(f"{where}: w={w:g} h={h:g}")
        return None
    if image.orientation != 1:
        box = orient_boxes(np.array([[x, y, w, h]], dtype=np.float64), image.orientation, image.stored_size)
        x, y, w, h = box[0].tolist()
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(image.width)), min(y + h, float(image.height))
    if x1 <= x0 or y1 <= y0:
        problems.outside_boxes.append(f"{where}: bbox [{x:g}, {y:g}, {w:g}, {h:g}] in {image.width}x{image.height}")
        return None
    if max(-x, -y, x + w - image.width, y + h - image.height) > _CLIP_REPORT_TOLERANCE:
        problems.clipped_boxes += 1
    return x0, y0, x1 - x0, y1 - y0


def _shown_value(value: Any, limit: int = 80) -> str:
    """A short repr for a report: a hostile json may hold huge values."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # deeply nested, or an int of more than 4300 digits
        text = f"<{type(value).__name__}>"
    return shorten(text, limit)


def _shown_entry(entry: Any) -> str:
    return _shown_value(entry, 160)


def _make_record(
    image_id: int, image: _ImageEntry, boxes: list[tuple[tuple[float, ...], int, bool]]
) -> DetectionRecord:
    return DetectionRecord(
        image_id=image_id,
        file_name=image.file_name,
        path=image.path,
        width=image.width,
        height=image.height,
        boxes=np.array([box for box, _, _ in boxes], dtype=np.float32).reshape(-1, 4),
        labels=np.array([category for _, category, _ in boxes], dtype=np.int64),
        iscrowd=np.array([crowd for _, _, crowd in boxes], dtype=bool),
    )
