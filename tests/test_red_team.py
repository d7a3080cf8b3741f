"""Regressions found by a red-team pass over issue 13 (hostile images, zips and app requests) with a fresh corpus.

Each test holds a hostile input that got through the first round of fixes: a raw warning or traceback, a message
naming a server-side staging folder, or an owner check that a forged request could pass.
"""

from __future__ import annotations

import io
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from finetune.archive import safe_extract_zip
from finetune.errors import DataError
from lwdetr.images import ImageLoadError, load_image


def _jpeg(size: tuple[int, int] = (24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 120, 200)).save(buffer, "JPEG")
    return buffer.getvalue()


def _truncated_lzw_tiff() -> bytes:
    """An LZW TIFF cut short: Pillow warns about its EXIF directory before failing to identify it."""
    buffer = io.BytesIO()
    Image.effect_noise((96, 80), 40).convert("RGB").save(buffer, "TIFF", compression="tiff_lzw")
    return buffer.getvalue()[:-300]


def _malformed_mpo() -> bytes:
    """A JPEG whose APP2 'MPF' block claims 100000 pictures: Pillow warns, then decodes the base JPEG."""
    entries = struct.pack("<H", 3) + struct.pack("<HHII", 0xB000, 7, 4, 0x30303130)
    entries += struct.pack("<HHII", 0xB001, 4, 1, 100000) + struct.pack("<HHII", 0xB002, 7, 16 * 100000, 50)
    mpf = b"MPF\x00" + b"II*\x00\x08\x00\x00\x00" + entries + b"\x00" * 4
    jpeg = _jpeg()
    return jpeg[:2] + b"\xff\xe2" + struct.pack(">H", len(mpf) + 2) + mpf + jpeg[2:]


@pytest.mark.parametrize("kind", ["truncated_lzw_tiff", "malformed_mpo"])
def test_pillow_warnings_never_reach_the_user(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.jpg"
    path.write_bytes({"truncated_lzw_tiff": _truncated_lzw_tiff, "malformed_mpo": _malformed_mpo}[kind]())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            image = load_image(path)
        except ImageLoadError as error:
            assert str(error).startswith(str(path)) and "\n" not in str(error)
        else:
            assert image.mode == "RGB"
    assert [str(w.message) for w in caught] == []


def _zip(path: Path, entries: list[tuple[str, bytes] | zipfile.ZipInfo]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("set/train/a.jpg", _jpeg())
        for entry in entries:
            if isinstance(entry, zipfile.ZipInfo):
                archive.writestr(entry, b"")
            else:
                archive.writestr(*entry)
    return path


@pytest.mark.parametrize(
    "entries",
    [
        [("set/clash", b"a file"), ("set/clash/inside.txt", b"then a file below it")],
        [("set/clash", b"a file"), zipfile.ZipInfo("set/clash/")],
        [zipfile.ZipInfo("set/" + "d" * 300 + "/")],
    ],
    ids=["file_then_file_below", "file_then_folder_entry", "folder_name_too_long"],
)
def test_unextractable_zip_entries_are_one_line_data_errors(tmp_path: Path, entries: list) -> None:
    archive = _zip(tmp_path / "upload.zip", entries)
    dest = tmp_path / "datasets" / "upload-1"
    with pytest.raises(DataError) as caught:
        safe_extract_zip(archive, dest)
    message = str(caught.value)
    assert message.startswith(f"{archive}: cannot extract entry 'set/") and "\n" not in message
    assert ".partial" not in message and "datasets" not in message  # no staging folder named
    assert list((tmp_path / "datasets").iterdir()) == []  # nothing left behind


@pytest.fixture
def app_context(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from test_app import bundled_or_test_assets

    from lwdetr_app.handlers import AppContext
    from lwdetr_app.models import ModelChoice, ModelRegistry
    from lwdetr_app.settings import AppSettings
    from lwdetr_app.training import TrainingJob

    model, examples, _ = bundled_or_test_assets(tmp_path / "assets")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "data" / "gradio"))
    settings = AppSettings(data_dir=tmp_path / "data", demo_model_dir=model, examples_dir=examples[0].parent)
    default = ModelChoice(str(model), "demo model (test)")
    return AppContext(settings, default, ModelRegistry(device="cpu"), TrainingJob())


def test_app_detects_on_a_thin_strip_image(app_context) -> None:
    """A 20000x1 image is valid (the model sees it padded); shrinking it for display must not make it 0 px high."""
    path = app_context.paths.gradio / ("0" * 32) / "strip.png"
    path.parent.mkdir(parents=True)
    Image.new("RGB", (20000, 1), (90, 90, 90)).save(path)
    payload = {"path": str(path), "orig_name": "strip.png"}
    raw, drawn, *_, status = app_context.detect(payload, app_context.default.ref, 0.3, 100, [])
    assert raw is not None and raw["width"] == 20000, status
    assert drawn.height >= 1 and "strip.png" in status
