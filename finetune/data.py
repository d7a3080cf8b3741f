"""Find, load and validate a detection dataset; hand back clean splits and a report of what was fixed.

`load_detection_data(data, val_data)` accepts:

- a Roboflow-style export folder: `train/`, `valid/` (or `val/`, `validation/`), optional `test/`, each holding
  images and `_annotations.coco.json` (or that folder's only `.json`);
- plain COCO: an annotation `.json` file, or a folder holding exactly one `.json` plus the images;
- a `.zip` of either (extracted by `finetune.archive.safe_extract_zip`);
- a Hugging Face `datasets` dataset in the object-detection layout (a `save_to_disk` folder, a hub id, or a
  `Dataset`/`DatasetDict` object); `finetune.hf_datasets` converts it to a Roboflow-style export on disk first, so
  every source goes through the same checks below.

Image files are looked up, for a `file_name` in a json, as (first hit wins): `file_name` relative to the json's
folder, then under an `images/` folder beside the json, then the bare basename beside the json, then the basename
under `images/`. Backslashes in `file_name` are read as folder separators. Every image must resolve inside the
json's folder, symlinks included (`finetune.safe_paths`): an absolute name, a `../` climbing out or a symlink
leading out is reported as "outside the dataset" and skipped, and nothing outside is ever opened.

Images are decoded as inference decodes them (`finetune.pixels`: EXIF orientation applied, 16-bit scaled,
transparency on white, inference's pixel limit), once at loading, so an image that would fail in training is
reported here. The real (upright) image size wins over the json's `width`/`height`; boxes are in the upright frame,
except those of an image whose json size is its stored, unrotated size, which are turned upright with the pixels.
Ids may be ints, integral floats or decimal strings (`finetune.coco_json.normalise_id`); the annotation file is
size-bounded and read defensively.

Category ids may be anything: the categories of all splits are merged by id (a name conflict is an error),
categories without a single annotation anywhere are dropped (Roboflow's super-category), and the rest become
contiguous label ids 0..K-1 in the order of their original ids.

Problems are fixed where that is safe and always reported (`DetectionData.report`): missing or unreadable images
are skipped, boxes with width or height <= 0 and annotations pointing to unknown images or categories are
dropped, boxes past the image edge are clipped, crowd boxes are kept for evaluation only, images without boxes
stay as negatives. Only a dataset with no training image holding a box is an error (`DataError`).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from finetune import hf_datasets  # light: it imports `datasets` only when a dataset is really loaded
from finetune.archive import dataset_root, safe_extract_zip
from finetune.coco_json import normalise_id, read_coco_json
from finetune.errors import DataError
from finetune.pixels import decode_image, orient_boxes, probe_image
from finetune.safe_paths import OutsideRootError, climbs_out, resolve_inside, shorten

__all__ = [
    "DataError",
    "DetectionData",
    "DetectionRecord",
    "DetectionSplit",
    "SplitProblems",
    "SplitReport",
    "ValidationReport",
    "load_detection_data",
    "train_targets",
]

SPLIT_NAMES = ("train", "val", "test")
# Folder names of a Roboflow-style export, per split, in order of preference.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
_ROBOFLOW_JSON = "_annotations.coco.json"
# A box may overshoot the image by rounding (Roboflow writes 800.0004); only larger overshoots are reported.
_CLIP_REPORT_TOLERANCE = 0.5
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ----------------------------------------------------------------------------------------------- data structures


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


@dataclass
class SplitProblems:
    """What was wrong in one annotation file, and what was done about it. Lists name the file (and annotation)."""

    missing_images: list[str] = field(default_factory=list)  # skipped
    unreadable_images: list[str] = field(default_factory=list)  # skipped
    outside_images: list[str] = field(default_factory=list)  # resolve outside the dataset folder: skipped, not read
    malformed_images: list[str] = field(default_factory=list)  # no integer id or no file_name: skipped
    size_mismatches: list[str] = field(default_factory=list)  # json size differs from the file; file wins
    exif_rotated: list[str] = field(default_factory=list)  # an EXIF orientation tag; pixels turned upright
    stored_frame_boxes: list[str] = field(default_factory=list)  # boxes drawn on the unrotated pixels: turned too
    degenerate_boxes: list[str] = field(default_factory=list)  # width or height <= 0: dropped
    outside_boxes: list[str] = field(default_factory=list)  # entirely outside the image: dropped
    malformed_boxes: list[str] = field(default_factory=list)  # not 4 finite numbers: dropped
    clipped_boxes: int = 0  # partly outside: clipped, kept
    malformed_annotations: int = 0  # not a JSON object: dropped
    unknown_image_annotations: int = 0  # image_id not in the file: dropped
    unknown_category_annotations: int = 0  # category_id not in the file: dropped
    skipped_image_annotations: int = 0  # belonged to a missing or unreadable image: dropped

    def is_empty(self) -> bool:
        return not any(dataclasses.astuple(self))


@dataclass
class SplitReport:
    """Counts for one split (after cleaning) and the problems of the file it came from."""

    name: str
    source: str
    images: int
    annotations: int  # kept, crowd included
    crowd: int
    negatives: int  # images without a training box
    class_counts: dict[str, int]  # label name -> boxes, crowd excluded
    problems: SplitProblems


@dataclass
class ValidationReport:
    """What `load_detection_data` found: sizes, classes, fixed problems, notes and warnings."""

    source: str
    layout: str
    classes: list[str]
    splits: dict[str, SplitReport]
    dropped_categories: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able data."""
        return dataclasses.asdict(self)

    def to_text(self, max_listed: int = 5) -> str:
        """A readable summary: split table, per-class table, problems (at most `max_listed` names each)."""
        return _format_report(self, max_listed)


@dataclass
class DetectionData:
    """The loaded dataset: splits with contiguous labels, the label maps and the validation report."""

    train: DetectionSplit
    val: DetectionSplit
    test: DetectionSplit | None
    id2label: dict[int, str]
    label2id: dict[str, int]
    category_to_label: dict[int, int]  # original category id -> label id
    report: ValidationReport

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


# ------------------------------------------------------------------------------------------------------- loading


@dataclass
class _Source:
    """Where the annotation files of a source are: split name -> COCO json."""

    description: str
    layout: str
    splits: dict[str, Path]


@dataclass
class _ImageEntry:
    file_name: str
    path: Path
    width: int  # upright, as decoded
    height: int
    orientation: int  # EXIF orientation to apply to its boxes: 1 unless they were drawn on the stored pixels
    stored_size: tuple[int, int]


@dataclass
class _ParsedSplit:
    """One annotation file after checking; record labels still hold the original category ids."""

    name: str
    json_path: Path
    categories: dict[int, str]
    records: list[DetectionRecord]
    problems: SplitProblems


def load_detection_data(
    data: str | os.PathLike[str] | Any,
    val_data: str | os.PathLike[str] | Any | None = None,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
) -> DetectionData:
    """Load, check and clean a detection dataset (the accepted forms are in the module docstring).

    `val_data` (same forms) replaces the source's own validation split. When there is none, `val_fraction` of the
    train images (clamped to 10-20 %, at least 1 image) is held out, chosen reproducibly by `seed`. Zips are
    extracted and Hugging Face datasets converted under `work_dir` (and reused by later calls), or else under a
    temporary folder removed when the process exits. Raises `DataError` for unreadable sources, conflicting
    category names, or when no training image with a box remains.
    """
    source = _resolve_source(data, work_dir)
    annotation_files = dict(source.splits)
    notes = []
    if val_data is not None:
        val_source = _resolve_source(val_data, work_dir)
        if "val" in annotation_files:
            notes.append(f"val: taken from {val_source.description}, replacing the source's own validation split")
        annotation_files["val"] = _single_split(val_source)
    parsed = {name: _parse_split(name, path) for name, path in annotation_files.items()}

    category_to_label, id2label, dropped = _contiguous_labels(parsed, source)
    records = {name: [_relabel(r, category_to_label) for r in split.records] for name, split in parsed.items()}
    if "val" not in records:
        records["train"], records["val"], note = _hold_out(records["train"], val_fraction, seed, source)
        notes.append(note)
    splits = {name: DetectionSplit(name, records[name], id2label) for name in SPLIT_NAMES if name in records}
    if not any((~r.iscrowd).any() for r in splits["train"]):
        raise _no_training_data(source, parsed)
    if not splits["val"].records:
        raise DataError(f"{annotation_files['val']}: the validation split has no usable image")

    report = _build_report(source, parsed, splits, dropped, notes)
    return DetectionData(
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        id2label=id2label,
        label2id={name: label for label, name in id2label.items()},
        category_to_label=category_to_label,
        report=report,
    )


# ----------------------------------------------------------------------------------------------------- discovery


def _resolve_source(data: Any, work_dir: str | os.PathLike[str] | None) -> _Source:
    """Find the annotation files of `data` (extracting or converting it first when needed)."""
    if type(data).__module__.startswith("datasets."):  # a Dataset/DatasetDict object; no import needed to tell
        return _from_hugging_face(data, work_dir, f"Hugging Face {type(data).__name__}")
    path = Path(data)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".zip":
            inner = _resolve_folder(_extract_zip(path, work_dir), work_dir)
            return dataclasses.replace(inner, description=f"{path}", layout=f"zip of a {inner.layout}")
        if suffix == ".json":
            return _Source(str(path), "COCO annotation file", {"train": path})
        raise DataError(f"{path}: expected a dataset folder, a COCO .json file or a .zip")
    if path.is_dir():
        return _resolve_folder(path, work_dir)
    if isinstance(data, str) and _HUB_ID.match(data) and not data.lower().endswith((".json", ".zip")):
        return _from_hugging_face(data, work_dir, f"Hugging Face hub dataset {data}")
    raise DataError(f"{data}: no such file or folder")


def _resolve_folder(folder: Path, work_dir: str | os.PathLike[str] | None) -> _Source:
    if hf_datasets.is_saved_dataset_folder(folder):
        return _from_hugging_face(folder, work_dir, f"Hugging Face dataset folder {folder}")
    splits = _split_folders(folder)
    if splits:
        if "train" not in splits:
            raise DataError(f"{folder}: found {', '.join(splits)} split folders but no train/ folder")
        return _Source(str(folder), "Roboflow-style export", splits)
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) == 1:
        return _Source(str(folder), "COCO folder", {"train": jsons[0]})
    if not jsons:
        raise DataError(
            f"{folder}: no annotations found: expected train/ and valid/ folders each holding images and "
            f"{_ROBOFLOW_JSON}, or a single COCO .json beside the images (YOLO or VOC exports: export as COCO)"
        )
    names = ", ".join(j.name for j in jsons)
    raise DataError(f"{folder}: several .json files ({names}); pass the annotation file itself")


def _split_folders(folder: Path) -> dict[str, Path]:
    """Split name -> annotation file, for the split folders of a Roboflow-style export that hold one."""
    found = {}
    for split, names in _SPLIT_FOLDERS.items():
        for name in names:
            annotation_file = _split_annotation_file(folder / name)
            if annotation_file is not None:
                found[split] = annotation_file
                break
    return found


def _split_annotation_file(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    if (folder / _ROBOFLOW_JSON).is_file():
        return folder / _ROBOFLOW_JSON
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) > 1:
        raise DataError(f"{folder}: several .json files and no {_ROBOFLOW_JSON}; keep only one")
    return jsons[0] if jsons else None


def _single_split(source: _Source) -> Path:
    """The annotation file of a `val_data` source: its validation split, or its only split."""
    if "val" in source.splits:
        return source.splits["val"]
    if len(source.splits) == 1:
        return next(iter(source.splits.values()))
    raise DataError(f"{source.description}: val_data has several splits and none is a validation split")


def _scratch_root(work_dir: str | os.PathLike[str] | None) -> Path:
    if work_dir is None:
        return _temporary_root()
    root = Path(work_dir)
    root.mkdir(parents=True, exist_ok=True)
    return root


@functools.cache
def _temporary_root() -> Path:
    """One temporary folder per process for extracted and converted data, removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="lwdetr-data-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


def _extract_zip(zip_path: Path, work_dir: str | os.PathLike[str] | None) -> Path:
    """Extract once per zip version: the folder name carries the zip's path, size and modification time."""
    stat = zip_path.stat()
    key = hashlib.sha256(f"{zip_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = _scratch_root(work_dir) / "extracted" / f"{zip_path.stem}-{key}"
    if dest.is_dir():  # complete: extraction renames into place atomically
        return dataset_root(dest)
    try:
        return safe_extract_zip(zip_path, dest)
    except (DataError, OSError):
        if dest.is_dir():  # another process (a second training rank) extracted it first
            return dataset_root(dest)
        raise


def _from_hugging_face(source: Any, work_dir: str | os.PathLike[str] | None, description: str) -> _Source:
    dataset = hf_datasets.load_hf_dataset(source)
    root = hf_datasets.export_as_coco(dataset, _scratch_root(work_dir) / "hf", _hf_image_roots(source))
    return _Source(description, "Hugging Face dataset", _split_folders(root))


def _hf_image_roots(source: Any) -> list[Path] | None:
    """Where the images of a Hugging Face dataset stored as local paths may be: its `save_to_disk` folder, or the
    Hugging Face caches for a hub dataset; anywhere (None) for a dataset object built by the calling program."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return [Path(source)]
    if isinstance(source, str):
        import datasets
        from huggingface_hub import constants

        return [Path(datasets.config.HF_DATASETS_CACHE), Path(constants.HF_HUB_CACHE)]
    return None


# ------------------------------------------------------------------------------------------------------- parsing


def _parse_split(name: str, json_path: Path) -> _ParsedSplit:
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
    return _ParsedSplit(name, json_path, categories, records, problems)


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


# -------------------------------------------------------------------------------------------- labels and splits


def _merge_categories(parsed: Any) -> dict[int, str]:
    """The union of the splits' categories by id; the same id must carry the same name everywhere."""
    merged: dict[int, tuple[str, Path]] = {}
    for split in parsed:
        for category_id, name in split.categories.items():
            seen_name, seen_in = merged.setdefault(category_id, (name, split.json_path))
            if seen_name != name:
                raise DataError(
                    f"{split.json_path}: category {category_id} is {name!r} here but {seen_name!r} in {seen_in}"
                )
    return {category_id: name for category_id, (name, _) in merged.items()}


def _contiguous_labels(
    parsed: dict[str, _ParsedSplit], source: _Source
) -> tuple[dict[int, int], dict[int, str], list[str]]:
    """(category id -> label, label -> name, dropped categories as "<id> '<name>'") for the used categories."""
    categories = _merge_categories(parsed.values())
    used = {int(c) for split in parsed.values() for record in split.records for c in record.labels.tolist()}
    if not used:
        raise _no_training_data(source, parsed)
    category_to_label = {category: label for label, category in enumerate(sorted(used))}
    id2label = {label: categories[category] for category, label in category_to_label.items()}
    # Checked on the used categories only: Roboflow's super-category may share its name with a class.
    repeated = [name for name, count in Counter(id2label.values()).items() if count > 1]
    if repeated:
        raise DataError(f"{source.description}: several category ids share the name(s) {', '.join(repeated)}")
    dropped = [f"{cid} {name!r}" for cid, name in sorted(categories.items()) if cid not in used]
    return category_to_label, id2label, dropped


def _relabel(record: DetectionRecord, category_to_label: dict[int, int]) -> DetectionRecord:
    labels = np.array([category_to_label[c] for c in record.labels.tolist()], dtype=np.int64)
    return dataclasses.replace(record, labels=labels)


def _hold_out(
    records: list[DetectionRecord], fraction: float, seed: int, source: _Source
) -> tuple[list[DetectionRecord], list[DetectionRecord], str]:
    """Split off a validation set: (train, val, a note saying what was done)."""
    clamped = min(max(fraction, 0.10), 0.20)
    if len(records) < 2:
        raise DataError(f"{source.description}: {len(records)} train image(s) is too few to hold out a validation set")
    count = max(1, round(len(records) * clamped))
    chosen = set(np.random.default_rng(seed).permutation(len(records))[:count].tolist())
    train = [record for index, record in enumerate(records) if index not in chosen]
    val = [record for index, record in enumerate(records) if index in chosen]
    note = f"val: {count} of {len(records)} train images held out ({clamped:.0%}, seed {seed})"
    if clamped != fraction:
        note += f"; val_fraction {fraction:g} was clamped to {clamped:g}"
    return train, val, note


def _no_training_data(source: _Source, parsed: dict[str, _ParsedSplit]) -> DataError:
    problems = parsed["train"].problems
    found = [
        f"{len(problems.missing_images)} missing images",
        f"{len(problems.unreadable_images)} unreadable images",
        f"{len(problems.outside_images)} images outside the dataset",
        f"{len(problems.malformed_images)} malformed image entries",
        f"{len(problems.degenerate_boxes) + len(problems.outside_boxes) + len(problems.malformed_boxes)} bad boxes",
        f"{problems.unknown_image_annotations + problems.unknown_category_annotations} annotations with unknown ids",
    ]
    return DataError(
        f"{source.description}: no usable training data: no train image has a box ({', '.join(found)} in "
        f"{parsed['train'].json_path})"
    )


# -------------------------------------------------------------------------------------------------------- report


def _build_report(
    source: _Source,
    parsed: dict[str, _ParsedSplit],
    splits: dict[str, DetectionSplit],
    dropped: list[str],
    notes: list[str],
) -> ValidationReport:
    split_reports = {}
    for name, split in splits.items():
        if name in parsed:
            source_file, problems = str(parsed[name].json_path), parsed[name].problems
        else:  # held out of train: its file's problems are reported under train
            source_file, problems = f"held out of {parsed['train'].json_path}", SplitProblems()
        split_reports[name] = _split_report(split, source_file, problems)
    classes = [name for _, name in sorted(splits["train"].id2label.items())]
    report = ValidationReport(source.description, source.layout, classes, split_reports, notes=list(notes))
    report.dropped_categories = dropped
    if dropped:
        report.notes.append(f"categories dropped (no annotations in any split): {', '.join(dropped)}")
    report.warnings = _class_warnings(report)
    return report


def _split_report(split: DetectionSplit, source: str, problems: SplitProblems) -> SplitReport:
    counts: Counter[int] = Counter()
    annotations = crowd = negatives = 0
    for record in split.records:
        _, labels = train_targets(record)
        annotations += len(record.labels)
        crowd += int(record.iscrowd.sum())
        negatives += int(labels.size == 0)
        counts.update(labels.tolist())
    class_counts = {name: counts[label] for label, name in sorted(split.id2label.items())}
    return SplitReport(split.name, source, len(split.records), annotations, crowd, negatives, class_counts, problems)


# Fewer training boxes than this is worth a warning: the class will barely be learned.
_FEW_BOXES = 5


def _class_warnings(report: ValidationReport) -> list[str]:
    warnings = []
    for name, count in report.splits["train"].class_counts.items():
        if count == 0:
            warnings.append(f"class {name!r} has no training box: the model cannot learn it")
        elif count < _FEW_BOXES:
            warnings.append(f"class {name!r} has only {count} training box{'es' if count > 1 else ''}")
    if sum(report.splits["val"].class_counts.values()) == 0:
        warnings.append("the validation split has no box: its metrics are undefined")
    return warnings


def _format_report(report: ValidationReport, max_listed: int) -> str:
    splits = list(report.splits.values())
    lines = [f"Dataset: {report.source} ({report.layout})", f"Classes ({len(report.classes)}): "]
    lines[-1] += ", ".join(report.classes)
    lines += ["", *_table(["split", "images", "boxes", "crowd", "no boxes"], _split_rows(splits)), ""]
    class_rows = [[name, *(split.class_counts[name] for split in splits)] for name in report.classes]
    lines += _table(["class", *(split.name for split in splits)], class_rows)
    for title, items in (("Notes", report.notes), ("Warnings", report.warnings)):
        if items:
            lines += ["", f"{title}:", *(f"  - {item}" for item in items)]
    problem_lines = []
    for split in splits:
        found = _problem_lines(split, max_listed)
        if found:
            problem_lines += [f"  {split.name} ({split.source}):", *(f"    - {line}" for line in found)]
    lines += ["", "Problems:" if problem_lines else "Problems: none", *problem_lines]
    return "\n".join(lines)


def _split_rows(splits: list[SplitReport]) -> list[list[Any]]:
    return [[s.name, s.images, s.annotations - s.crowd, s.crowd, s.negatives] for s in splits]


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [header, *([str(value) for value in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths))
        )
        for row in cells
    ]


def _problem_lines(split: SplitReport, max_listed: int) -> list[str]:
    """One line per kind of problem: "<count> <what>, <what was done>[: the first few names]"."""
    problems = split.problems
    listed = [
        (problems.missing_images, "missing image{s}", "skipped"),
        (problems.unreadable_images, "unreadable image{s}", "skipped"),
        (problems.outside_images, "image{s} outside the dataset", "skipped, not read"),
        (problems.malformed_images, "malformed image entr{ies}", "skipped"),
        (problems.size_mismatches, "image{s} whose json width/height differ from the file", "file size used"),
        (problems.exif_rotated, "image{s} with an EXIF orientation tag", "turned upright as inference does"),
        (
            problems.stored_frame_boxes,
            "image{s} annotated on the unrotated pixels (json width/height)",
            "boxes turned upright with the image",
        ),
        (problems.degenerate_boxes, "box{es} with width or height <= 0", "dropped"),
        (problems.outside_boxes, "box{es} entirely outside the image", "dropped"),
        (problems.malformed_boxes, "malformed bbox{es}", "dropped"),
    ]
    counted = [
        (problems.clipped_boxes, "box{es} partly outside the image", "clipped"),
        (problems.malformed_annotations, "annotation{s} that are not JSON objects", "dropped"),
        (problems.unknown_image_annotations, "annotation{s} with an unknown image_id", "dropped"),
        (problems.unknown_category_annotations, "annotation{s} with an unknown category_id", "dropped"),
        (problems.skipped_image_annotations, "annotation{s} of skipped images", "dropped"),
        (split.crowd, "crowd annotation{s}", "used in evaluation only"),
        (split.negatives, "image{s} without boxes", "kept as negatives"),
    ]
    lines = []
    for items, what, action in listed:
        if items:
            shown = "; ".join(items[:max_listed])
            if len(items) > max_listed:
                shown += f"; ... and {len(items) - max_listed} more"
            lines.append(f"{_counted(len(items), what)}, {action}: {shown}")
    lines += [f"{_counted(count, what)}, {action}" for count, what, action in counted if count]
    return lines


def _counted(count: int, what: str) -> str:
    """'1 box', '2 boxes', '1 entry', '2 entries': `what` marks its plural ending as {s}, {es} or {ies}."""
    ending = "" if count == 1 else "s"
    what = what.replace("{s}", ending).replace("{es}", "e" + ending if ending else "")
    return f"{count} " + what.replace("{ies}", "ies" if ending else "y")
