"""The forms a dataset comes in, and where their annotation files are: a Roboflow-style export folder, a plain COCO
json (or a folder holding one), a zip of either (extracted once), or a Hugging Face dataset (converted once to a
Roboflow-style export on disk). See `finetune.data` for the layouts accepted."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import hf_datasets  # light: it imports `datasets` only when a dataset is really loaded
from finetune.archive import dataset_root, safe_extract_zip
from finetune.errors import DataError

__all__ = ["Source", "resolve_source", "single_split"]

# Folder names of a Roboflow-style export, per split, in order of preference.
_SPLIT_FOLDERS = {"train": ("train",), "val": ("valid", "val", "validation"), "test": ("test",)}
_ROBOFLOW_JSON = "_annotations.coco.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class Source:
    """Where the annotation files of a source are: split name -> COCO json."""

    description: str
    layout: str
    splits: dict[str, Path]


def resolve_source(data: Any, work_dir: str | os.PathLike[str] | None) -> Source:
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
            return Source(str(path), "COCO annotation file", {"train": path})
        raise DataError(f"{path}: expected a dataset folder, a COCO .json file or a .zip")
    if path.is_dir():
        return _resolve_folder(path, work_dir)
    if isinstance(data, str) and _HUB_ID.match(data) and not data.lower().endswith((".json", ".zip")):
        return _from_hugging_face(data, work_dir, f"Hugging Face hub dataset {data}")
    raise DataError(f"{data}: no such file or folder")


def _resolve_folder(folder: Path, work_dir: str | os.PathLike[str] | None) -> Source:
    if hf_datasets.is_saved_dataset_folder(folder):
        return _from_hugging_face(folder, work_dir, f"Hugging Face dataset folder {folder}")
    splits = _split_folders(folder)
    if splits:
        if "train" not in splits:
            raise DataError(f"{folder}: found {', '.join(splits)} split folders but no train/ folder")
        return Source(str(folder), "Roboflow-style export", splits)
    jsons = sorted(folder.glob("*.json"))
    if len(jsons) == 1:
        return Source(str(folder), "COCO folder", {"train": jsons[0]})
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


def single_split(source: Source) -> Path:
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


def _from_hugging_face(source: Any, work_dir: str | os.PathLike[str] | None, description: str) -> Source:
    dataset = hf_datasets.load_hf_dataset(source)
    root = hf_datasets.export_as_coco(dataset, _scratch_root(work_dir) / "hf", _hf_image_roots(source))
    return Source(description, "Hugging Face dataset", _split_folders(root))


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
