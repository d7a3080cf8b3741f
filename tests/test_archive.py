"""`finetune.archive.safe_extract_zip` against zip bombs: compression ratio and declared size are checked before
anything is written, and a refused zip leaves nothing behind."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from finetune.archive import safe_extract_zip
from finetune.errors import DataError

MIB = 1 << 20


def deflated_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return path


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ({"data/ok.txt": b"fine", "data/zeros.bin": bytes(4 * MIB)}, "compression ratio above the limit"),
        ({f"data/part{i}.bin": bytes(MIB) for i in range(20)}, "overall compression ratio"),
    ],
    ids=["one-bomb-entry", "many-small-bomb-entries"],
)
def test_zip_bombs_are_refused_before_extraction(tmp_path, entries, needle):
    zip_path = deflated_zip(tmp_path / "bomb.zip", entries)
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        safe_extract_zip(zip_path, out / "dataset")
    message = str(caught.value)
    assert needle in message and "bomb.zip" in message and "\n" not in message
    assert not out.exists() or list(out.iterdir()) == []  # nothing written, no staging folder left


def test_declared_total_past_the_limit_is_refused_before_extraction(tmp_path):
    zip_path = deflated_zip(tmp_path / "big.zip", {f"data/{i}.bin": bytes(range(256)) * 64 for i in range(8)})
    out = tmp_path / "out"
    with pytest.raises(DataError, match="declared uncompressed size past the limit of 100000 bytes"):
        safe_extract_zip(zip_path, out / "dataset", max_total_bytes=100_000)
    assert not out.exists() or list(out.iterdir()) == []


def test_small_very_compressible_files_are_accepted(tmp_path):
    """A COCO json of repeated annotations deflates far past 100:1; small files are exempt from the ratio."""
    annotations = [{"id": i, "image_id": 0, "category_id": 1, "bbox": [1, 2, 3, 4]} for i in range(5000)]
    payload = json.dumps({"annotations": annotations}).encode()
    zip_path = deflated_zip(tmp_path / "ok.zip", {"top/train/a.json": payload, "top/zeros.bin": bytes(MIB // 2)})
    root = safe_extract_zip(zip_path, tmp_path / "out")
    assert (root / "train" / "a.json").read_bytes() == payload
