"""Datasets for the Fine-tune tab: extract an uploaded zip or make the synthetic sample, validate, preview.

Everything is written under the app's `datasets/` folder. An uploaded zip is extracted once per content (the folder
name carries a hash of the bytes); the synthetic sample once per size. A zip that is refused, or whose extraction
turns out not to be a usable dataset, leaves nothing behind. The preview draws only images inside the dataset's
own folder, whatever the annotation file says (`../../etc/x` or `/srv/x` as a `file_name` shows nothing).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from finetune.defaults import DataSize
from lwdetr.detector import Detection
from lwdetr.draw import draw_detections

from .storage import touch

__all__ = ["DatasetPreview", "ZipLimits", "dataset_entry", "inspect_dataset", "prepare_synthetic", "prepare_zip"]


_PREVIEW_SIDE = 512
PREVIEW_FONT_FRACTION = 1 / 20  # label text height as a fraction of the preview's longer side


@dataclass(frozen=True)
class ZipLimits:
    """What an uploaded dataset zip may be: its own size, what it expands to, its entries, its compression ratio."""

    max_zip_bytes: int = 200 << 20
    max_extracted_bytes: int = 4 << 30
    max_entries: int = 20_000
    max_ratio: float = 100.0


@dataclass
class DatasetPreview:
    """What the tab shows about a dataset: the report text, a few images with their boxes, whether it is usable, and
    the size of its training split (what the auto training settings are chosen from)."""

    ok: bool
    report: str
    root: Path | None = None
    images: list[tuple[Image.Image, str]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    data_size: DataSize | None = None


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def prepare_zip(zip_path: str | os.PathLike, datasets_dir: Path, limits: ZipLimits | None = None) -> Path:
    """Extract `zip_path` safely under `datasets_dir` (reusing an earlier extraction of the same bytes).

    Returns the dataset root. Raises `finetune.errors.DataError` for unsafe, unreadable or too large zips.
    """
    from finetune.archive import dataset_root, safe_extract_zip
    from finetune.errors import DataError

    limits = limits or ZipLimits()
    zip_path = Path(zip_path)
    if zip_path.suffix.lower() != ".zip":
        raise DataError(f"{zip_path.name}: expected a .zip file")
    try:
        size = zip_path.stat().st_size
    except OSError:
        raise DataError(f"{zip_path.name}: the upload could not be read") from None
    if size > limits.max_zip_bytes:
        raise DataError(f"{zip_path.name}: {size} bytes, more than the upload limit of {limits.max_zip_bytes} bytes")
    dest = datasets_dir / f"upload-{_file_digest(zip_path)}"
    if dest.is_dir() and any(dest.iterdir()):
        touch(dest)  # used again: evicted last
        return dataset_root(dest)
    return safe_extract_zip(
        zip_path,
        dest,
        max_total_bytes=limits.max_extracted_bytes,
        max_files=limits.max_entries,
        max_ratio=limits.max_ratio,
    )


def dataset_entry(root: Path, datasets_dir: Path) -> Path | None:
    """The direct child of `datasets_dir` holding dataset `root` (what eviction and clean-up remove), or None."""
    try:
        parts = Path(root).resolve().relative_to(Path(datasets_dir).resolve()).parts
    except ValueError:
        return None
    return Path(datasets_dir) / parts[0] if parts else None


def prepare_synthetic(datasets_dir: Path, num_train: int, num_val: int, image_size: int, seed: int = 0) -> Path:
    """The built-in synthetic sample (circles, squares, triangles), generated on first use."""
    from finetune.synthetic import make_synthetic_dataset

    dest = datasets_dir / f"synthetic-{num_train}-{num_val}-{image_size}-seed{seed}"
    if (dest / "train" / "_annotations.coco.json").is_file():
        touch(dest)
        return dest
    datasets_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=datasets_dir))
    try:
        make_synthetic_dataset(staging, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
        if dest.exists():  # another session made it meanwhile
            shutil.rmtree(staging, ignore_errors=True)
        else:
            os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _preview(record, id2label: dict[int, str]) -> tuple[Image.Image, str]:
    boxes = [
        Detection(int(label), id2label.get(int(label), str(label)), 1.0, (x, y, x + w, y + h))
        for (x, y, w, h), label in zip(record.boxes.tolist(), record.labels.tolist())
    ]
    image = record.load_image()
    image.thumbnail((_PREVIEW_SIDE, _PREVIEW_SIDE))  # boxes are drawn after scaling them the same way
    scale = image.width / max(record.width, 1)
    scaled = [Detection(b.label_id, b.label, b.score, tuple(v * scale for v in b.box)) for b in boxes]
    # The gallery shows the preview at about half its size: labels drawn at 1/60 of the side came out ~5 px high.
    font_size = max(12, round(max(image.size) * PREVIEW_FONT_FRACTION))
    drawn = draw_detections(image, scaled, show_scores=False, font_size=font_size)
    return drawn, f"{record.file_name} ({len(boxes)} boxes)"


def _inside(path: Path, folders: list[Path]) -> bool:
    """Whether `path`, symlinks resolved, lies in one of `folders` (already resolved)."""
    try:
        resolved = Path(path).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return False
    return any(resolved.is_relative_to(folder) for folder in folders)


def inspect_dataset(root: str | os.PathLike, work_dir: Path | None = None, max_images: int = 6) -> DatasetPreview:
    """Validate `root` with `finetune.data` and draw the ground truth of the first few training images.

    `work_dir` receives anything `finetune.data` needs to convert (kept inside the app's data folder). Only images
    inside `root` (or converted under `work_dir/hf`) are ever opened for the preview.
    """
    from finetune.data import load_detection_data
    from finetune.errors import DataError

    try:
        data = load_detection_data(str(root), work_dir=work_dir)
    except DataError as error:
        return DatasetPreview(False, f"This dataset cannot be used: {error}")
    except Exception as error:  # noqa: BLE001 - a hostile file must not break the page; the server log keeps it
        traceback.print_exc()
        return DatasetPreview(False, f"This dataset cannot be used: it could not be read ({type(error).__name__})")
    allowed = [Path(root).resolve()] + ([Path(work_dir, "hf").resolve()] if work_dir else [])
    previews = []
    for record in [r for r in data.train if len(r.boxes)]:
        if len(previews) == max_images:
            break
        if not _inside(record.path, allowed):  # finetune.data should have skipped it already; never serve it
            continue
        try:
            previews.append(_preview(record, data.id2label))
        except (DataError, OSError):
            continue
    classes = [data.id2label[key] for key in sorted(data.id2label)]
    return DatasetPreview(True, data.report.to_text(), Path(root), previews, classes, DataSize.of(data.train))
