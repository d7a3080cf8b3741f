"""Reading a COCO annotation file that may be hostile: bounded size, bounded nesting, one clear error.

`read_coco_json` returns the top-level dict with `images`, `categories` and `annotations` checked to be lists
of bounded length; every other failure (unreadable, not JSON, nested thousands deep, a number with thousands of
digits, too many entries) is a one-line `DataError` naming the file. The entries themselves are checked by
`finetune.data`, which skips and reports bad ones.

Ids: COCO ids are integers, but exports also write them as integral floats (`1.0`) or decimal strings (`"1"`).
`normalise_id` maps all three to one `int`, for image ids and annotations' `image_id` alike, so `"1"` and `1`
name the same image; anything else (booleans, fractions, other strings, lists, objects, ints beyond 64 bits) is
not an id.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import DataError

__all__ = ["LIMITS", "CocoLimits", "normalise_id", "read_coco_json"]

_DECIMAL = re.compile(r"^[+-]?\d{1,18}$")
_INT64 = 2**63


@dataclass(frozen=True)
class CocoLimits:
    """Upper bounds for one annotation file (COCO 2017 train: 448 MB, 118k images, 860k annotations, 80 classes).

    `max_containers` bounds the JSON objects and arrays, counted on the raw text before parsing: Python needs
    about 64 bytes per empty object, so 512 MB of `[{},{},...]` would otherwise take about 11 GB of memory.
    """

    max_bytes: int = 512 * 2**20
    max_containers: int = 20_000_000
    max_images: int = 2_000_000
    max_annotations: int = 10_000_000
    max_categories: int = 10_000


LIMITS = CocoLimits()


def normalise_id(value: Any) -> int | None:
    """`value` as an int id (from an int, an integral float or a decimal string), or None if it is not an id."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if -_INT64 <= value < _INT64 else None
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() and abs(value) < _INT64 else None
    if isinstance(value, str) and _DECIMAL.match(value.strip()):
        return int(value)
    return None


def read_coco_json(path: Path, limits: CocoLimits | None = None) -> dict[str, Any]:
    """The parsed annotation file: a dict whose `images`, `categories` and `annotations` are lists (the last
    one possibly empty). `limits` defaults to the module's `LIMITS`. Raises `DataError` (one line, naming
    `path`) for anything else."""
    limits = LIMITS if limits is None else limits
    data = _read_bytes(path, limits.max_bytes)
    containers = data.count(b"{") + data.count(b"[")  # braces inside strings count too: a safe over-estimate
    if containers > limits.max_containers:
        raise DataError(
            f"{path}: too many JSON objects and arrays ({containers:,} brackets, limit {limits.max_containers:,})"
        )
    try:
        coco = json.loads(data)
    except RecursionError:
        raise DataError(f"{path}: cannot read the annotation file (JSON nested too deeply)") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: cannot read the annotation file (not UTF-8 text: {error.reason})") from None
    except ValueError as error:  # JSONDecodeError, and ints of more than 4300 digits
        reason = "a number has too many digits" if "integer string conversion" in str(error) else _first_line(error)
        raise DataError(f"{path}: cannot read the annotation file ({reason})") from None
    if not isinstance(coco, dict):
        raise DataError(f"{path}: not a COCO annotation file (the top level is not an object)")
    coco.setdefault("annotations", [])
    bounds = {"images": limits.max_images, "categories": limits.max_categories}
    bounds["annotations"] = limits.max_annotations
    for key, bound in bounds.items():
        if not isinstance(coco.get(key), list):
            found = "missing" if key not in coco else f"a JSON {_json_type(coco[key])}"
            raise DataError(f"{path}: not a COCO annotation file ({key!r} must be a list, it is {found})")
        if len(coco[key]) > bound:
            raise DataError(f"{path}: too many {key} ({len(coco[key]):,}, limit {bound:,})")
    return coco


def _read_bytes(path: Path, max_bytes: int) -> bytes:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the read forever
            raise DataError(f"{path}: the annotation file is not a regular file")
        if info.st_size > max_bytes:
            raise DataError(f"{path}: the annotation file is too large ({info.st_size:,} bytes, limit {max_bytes:,})")
        with open(path, "rb") as file:
            data = file.read(max_bytes + 1)
    except OSError as error:
        raise DataError(f"{path}: cannot read the annotation file ({error.strerror or error})") from None
    if len(data) > max_bytes:  # grew since stat
        raise DataError(f"{path}: the annotation file is too large (more than {max_bytes:,} bytes)")
    return data


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
