"""The validation report of a loaded dataset: counts per split and class, what was wrong and fixed, warnings, and
its plain-text form."""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.data.records import DetectionSplit, train_targets

if TYPE_CHECKING:
    from finetune.data.coco import ParsedSplit
    from finetune.data.sources import Source

__all__ = ["SplitProblems", "SplitReport", "ValidationReport", "build_report"]


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


def build_report(
    source: Source,
    parsed: dict[str, ParsedSplit],
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
