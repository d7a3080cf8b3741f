"""`load_detection_data`: a dataset's splits parsed and checked, merged into contiguous labels, a validation split
held out when there is none, and the report of what was found (the forms and checks are in `finetune.data`)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.data.coco import ParsedSplit, parse_split
from finetune.data.records import DetectionRecord, DetectionSplit
from finetune.data.report import ValidationReport, build_report
from finetune.data.sources import Source, resolve_source, single_split
from finetune.errors import DataError

__all__ = ["SPLIT_NAMES", "DetectionData", "load_detection_data"]

SPLIT_NAMES = ("train", "val", "test")


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


def load_detection_data(
    data: str | os.PathLike[str] | Any,
    val_data: str | os.PathLike[str] | Any | None = None,
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
) -> DetectionData:
    """Load, check and clean a detection dataset (the accepted forms are in `finetune.data`).

    `val_data` (same forms) replaces the source's own validation split. When there is none, `val_fraction` of the
    train images (clamped to 10-20 %, at least 1 image) is held out, chosen reproducibly by `seed`. Zips are
    extracted and Hugging Face datasets converted under `work_dir` (and reused by later calls), or else under a
    temporary folder removed when the process exits. Raises `DataError` for unreadable sources, conflicting
    category names, or when no training image with a box remains.
    """
    source = resolve_source(data, work_dir)
    annotation_files = dict(source.splits)
    notes = []
    if val_data is not None:
        val_source = resolve_source(val_data, work_dir)
        if "val" in annotation_files:
            notes.append(f"val: taken from {val_source.description}, replacing the source's own validation split")
        annotation_files["val"] = single_split(val_source)
    parsed = {name: parse_split(name, path) for name, path in annotation_files.items()}

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

    report = build_report(source, parsed, splits, dropped, notes)
    return DetectionData(
        train=splits["train"],
        val=splits["val"],
        test=splits.get("test"),
        id2label=id2label,
        label2id={name: label for label, name in id2label.items()},
        category_to_label=category_to_label,
        report=report,
    )


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
    parsed: dict[str, ParsedSplit], source: Source
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
    records: list[DetectionRecord], fraction: float, seed: int, source: Source
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


def _no_training_data(source: Source, parsed: dict[str, ParsedSplit]) -> DataError:
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
