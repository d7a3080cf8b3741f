"""Hugging Face `datasets` object-detection data, converted to a Roboflow-style COCO export on disk.

The layout is the one of transformers' object-detection examples: an `image` column and an `objects` column
with `bbox` (COCO x, y, w, h in pixels) and `category` (a ClassLabel, whose names become the class names), plus
optional `objects.iscrowd`, `image_id`, `width` and `height` columns; splits `train`, `validation` (or `valid`,
`val`) and `test`.

Design choice: instead of a second in-memory path, each split is written as `<split>/_annotations.coco.json`
plus its images (the encoded bytes as stored, never re-encoded). `finetune.data` then loads it like any export, so
every check and report applies unchanged.

Images stored only as a local path are hard-linked (or copied) into the export, but only from inside the
dataset's own folders (`allowed_roots`: the `save_to_disk` folder, or the Hugging Face caches for a hub dataset;
symlinks checked by `finetune.safe_paths`): a dataset naming `/etc/passwd` as an image gets that name written as
is, and the loader reports it as outside the dataset, without anything outside having been read.
The export is cached under `cache_dir` by the datasets' fingerprints and appears atomically (written beside,
then renamed), so a second run, or a second training process, reuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from finetune.errors import DataError
from finetune.safe_paths import OutsideRootError, climbs_out, resolve_inside

__all__ = ["export_as_coco", "is_saved_dataset_folder", "load_hf_dataset"]

# Split names of the hub -> folder names of a Roboflow-style export.
_SPLIT_FOLDERS = {"train": "train", "validation": "valid", "valid": "valid", "val": "valid", "test": "test"}
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}
# Bump when the export format changes, so stale caches are not reused.
_EXPORT_VERSION = "2"
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")  # the only decoders a header is handed to
_EXIF_ORIENTATION = 0x0112


def is_saved_dataset_folder(folder: Path) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        return True
    return (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()


def load_hf_dataset(source: Any) -> Any:
    """A `DatasetDict` from a `save_to_disk` folder, a hub id, a `Dataset` (taken as train) or a `DatasetDict`.

    Raises `DataError` when it cannot be loaded; with `HF_HUB_OFFLINE=1` a hub id not in the local cache fails
    at once instead of waiting on the network.
    """
    import datasets  # heavy (about a second); only paid by users of this path

    if isinstance(source, datasets.DatasetDict):
        return source
    if isinstance(source, datasets.Dataset):
        return datasets.DatasetDict({"train": source})
    if Path(source).is_dir():
        try:
            loaded = datasets.load_from_disk(str(source))
        except Exception as error:  # datasets raises many types here; all mean "not a readable dataset"
            raise DataError(f"{source}: cannot load the saved Hugging Face dataset ({_first_line(error)})") from error
    else:
        loaded = _load_from_hub(str(source))
    if isinstance(loaded, datasets.Dataset):
        return datasets.DatasetDict({"train": loaded})
    return loaded


def _load_from_hub(repo_id: str) -> Any:
    import datasets

    offline = bool(datasets.config.HF_HUB_OFFLINE)
    if not offline and (reason := _hub_unreachable()) is not None:
        # Without this check load_dataset retries for about 25 s before giving up.
        raise DataError(
            f"{repo_id}: not a local file or folder, and the Hugging Face hub is unreachable ({reason}); pass a "
            f"local copy (a save_to_disk folder), or set HF_HUB_OFFLINE=1 to use the datasets cache"
        )
    try:
        # Offline, load_dataset still serves a cached copy, and fails fast when there is none.
        return datasets.load_dataset(repo_id)
    except Exception as error:
        mode = " (offline mode: HF_HUB_OFFLINE=1)" if offline else ""
        raise DataError(
            f"{repo_id}: not a local file or folder, and loading it from the Hugging Face hub failed{mode}: "
            f"{_first_line(error)}"
        ) from error


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None when it can (or when a proxy makes a direct probe meaningless)."""
    from huggingface_hub import constants

    if urllib.request.getproxies().get("https"):
        return None
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        return f"{endpoint.hostname}: {error}"
    return None


def export_as_coco(dataset: Any, cache_dir: Path, allowed_roots: list[Path] | None) -> Path:
    """Write `dataset` (a DatasetDict) as a Roboflow-style export under `cache_dir` and return its folder.

    Images stored only as a local path are taken from inside `allowed_roots` only (None: from anywhere, for a
    dataset object the calling program built itself). Splits other than train/validation/test are ignored.
    Raises `DataError` if there is no train split or the columns are not the object-detection layout.
    """
    splits = {_SPLIT_FOLDERS[name]: split for name, split in dataset.items() if name in _SPLIT_FOLDERS}
    if "train" not in splits:
        raise DataError(f"Hugging Face dataset: no train split (splits: {', '.join(dataset) or 'none'})")
    for name, split in splits.items():
        _check_columns(split, name)
    roots = None if allowed_roots is None else [Path(root).resolve() for root in allowed_roots]
    dest = Path(cache_dir) / _cache_name(splits, roots)
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        for name, split in splits.items():
            _export_split(split, staging / name, roots)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, dest)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not dest.is_dir():
            raise
        # else another process (a second training rank) finished the same export first
    return dest


def _check_columns(split: Any, name: str) -> None:
    missing = {"image", "objects"} - set(split.column_names)
    if missing:
        raise DataError(
            f"Hugging Face dataset, split {name}: no {' or '.join(sorted(missing))} column (columns: "
            f"{', '.join(split.column_names)}); expected `image` and `objects` with `bbox` and `category`"
        )


def _cache_name(splits: dict[str, Any], roots: list[Path] | None) -> str:
    """A folder name from the splits' fingerprints and the allowed roots (a new one per conversion when a split
    has no fingerprint)."""
    fingerprints = [getattr(split, "_fingerprint", None) for split in splits.values()]
    if None in fingerprints:
        return f"dataset-{os.getpid()}-{id(splits):x}"
    text = "|".join([_EXPORT_VERSION, *splits, *fingerprints, repr(roots)])
    return "dataset-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _export_split(split: Any, folder: Path, roots: list[Path] | None) -> None:
    """Write one split's images and `_annotations.coco.json` into `folder`."""
    import datasets

    folder.mkdir(parents=True)
    names = _class_names(split.features)
    image_ids = _image_ids(split)
    columns = [c for c in ("image", "objects", "width", "height") if c in split.column_names]
    rows = split.select_columns(columns).cast_column("image", datasets.Image(decode=False))
    images, annotations, seen_categories = [], [], set()
    for index, row in enumerate(rows):
        file_name, real_size = _write_image(row["image"], folder, index, roots)
        width = row.get("width") or real_size[0]
        height = row.get("height") or real_size[1]
        images.append({"id": image_ids[index], "file_name": file_name, "width": width, "height": height})
        try:
            objects = _objects(row["objects"])
        except (KeyError, TypeError, ValueError, OverflowError) as error:
            raise DataError(
                f"Hugging Face dataset, split {folder.name}, row {index}: malformed objects ({error})"
            ) from error
        for bbox, category, crowd in objects:
            seen_categories.add(category)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_ids[index],
                    "category_id": category,
                    "bbox": bbox,
                    "area": _area(bbox),
                    "iscrowd": crowd,
                }
            )
    if names is None:  # no ClassLabel: name the classes by their ids
        names = [f"class_{i}" for i in range(max(seen_categories, default=-1) + 1)]
    categories = [{"id": i, "name": name, "supercategory": "none"} for i, name in enumerate(names)]
    coco = {"info": {}, "licenses": [], "images": images, "annotations": annotations, "categories": categories}
    (folder / "_annotations.coco.json").write_text(json.dumps(coco), encoding="utf-8")


def _class_names(features: Any) -> list[str] | None:
    """The names of the ClassLabel of `objects.category`, or None if it is not a ClassLabel.

    `objects` is a dict of per-object lists or a list of per-object dicts, depending on how it was declared.
    """
    import datasets

    objects = features["objects"]
    inner = objects if isinstance(objects, dict) else getattr(objects, "feature", None)
    category = inner.get("category") if isinstance(inner, dict) else None
    while category is not None and not isinstance(category, datasets.ClassLabel):
        category = getattr(category, "feature", None)
    return list(category.names) if category is not None else None


def _image_ids(split: Any) -> list[int]:
    """The `image_id` column when it holds unique integers, else the row indices."""
    if "image_id" in split.column_names:
        ids = split["image_id"]
        if all(isinstance(i, int) and not isinstance(i, bool) for i in ids) and len(set(ids)) == len(ids):
            return list(ids)
    return list(range(len(split)))


def _objects(objects: Any) -> list[tuple[list[float], int, int]]:
    """(bbox, category, iscrowd) per object, from either layout of the `objects` column."""
    if isinstance(objects, dict):
        count = len(objects.get("bbox") or [])
        crowd = objects.get("iscrowd") or [0] * count
        return [(list(b), int(c), int(k)) for b, c, k in zip(objects["bbox"], objects["category"], crowd)]
    return [(list(o["bbox"]), int(o["category"]), int(o.get("iscrowd", 0))) for o in objects or []]


def _area(bbox: list[float]) -> float:
    try:
        return float(bbox[2]) * float(bbox[3])
    except (IndexError, TypeError, ValueError):
        return 0.0  # malformed boxes are reported (and dropped) by finetune.data


def _write_image(
    image: dict[str, Any], folder: Path, index: int, roots: list[Path] | None
) -> tuple[str, tuple[int, int]]:
    """Store one image of the `image` column; return its file name for the json and its upright (width, height).

    An unreadable image is still written (as `.bin`) so that the loader reports it by name; (0, 0) is returned.
    """
    data, path = image.get("bytes"), image.get("path")
    if data is None and path:
        return _link_local_image(str(path), folder, index, roots)
    data = data or b""
    image_format, size = _header_size(io.BytesIO(data))
    file_name = f"{index:06d}{_EXTENSIONS.get(image_format, '.bin')}"
    (folder / file_name).write_bytes(data)
    return file_name, size


def _link_local_image(path: str, folder: Path, index: int, roots: list[Path] | None) -> tuple[str, tuple[int, int]]:
    """Hard-link (or copy) an image stored as a local path into the export, if it lies inside an allowed root.

    Otherwise the json names it by the path it was given, which the loader reports (outside the dataset, or
    missing) without opening anything.
    """
    absolute = os.path.abspath(path)
    source = _inside_roots(absolute, roots)
    if source is None:
        return absolute, (0, 0)  # absolute: reported as outside the dataset, never looked at
    if source is False:
        return f"missing-{index:06d}-{Path(absolute).name}", (0, 0)  # reported as missing
    image_format, size = _header_size(source)
    file_name = f"{index:06d}{_EXTENSIONS.get(image_format, '.bin')}"
    try:
        os.link(source, folder / file_name)
    except OSError:  # another file system, or links not supported
        shutil.copyfile(source, folder / file_name)
    return file_name, size


def _inside_roots(path: str, roots: list[Path] | None) -> Path | bool | None:
    """The real regular file `path` is inside one of `roots`; False if it is inside but no such file; None if
    it is outside all of them. With `roots` None every path is allowed."""
    if roots is None:
        return Path(path) if Path(path).is_file() else False
    for root in roots:
        relative = os.path.relpath(path, root)
        if climbs_out(relative):
            continue
        try:
            found = resolve_inside(root, relative)
        except OutsideRootError:
            return None
        return found if found is not None else False
    return None


def _header_size(source: Path | io.BytesIO) -> tuple[str | None, tuple[int, int]]:
    """(format, upright (width, height)) from the image header, or (None, (0, 0)) when it is not an image.

    Upright: an EXIF tag turning the image by 90 degrees swaps the stored size, since `datasets` decodes images
    upright and their boxes are drawn on what it decodes (`finetune.pixels` tells the two frames apart by size).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: the loader applies inference's limit
            with Image.open(source, formats=_FORMATS) as image:
                width, height = image.size
                turned = image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
                return image.format, (height, width) if turned else (width, height)
    except Exception:  # noqa: BLE001 - any failure of a header parse means "not an image"
        return None, (0, 0)


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
