"""`lwdetr.images.load_image`: every kind of input becomes RGB, every bad one an `ImageLoadError` naming it."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lwdetr import images as images_module
from lwdetr.images import ImageLoadError, find_images, load_image

REPO = Path(__file__).resolve().parents[1]
# A minimal EPS file: Pillow recognises it by its first line, whatever the file is called, and renders it with
# Ghostscript, an external PostScript interpreter.
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header announces `width` x `height` pixels, with (almost) no pixel data behind it."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    files = {
        "empty": tmp_path / "empty.jpg",
        "corrupt": tmp_path / "corrupt.jpg",
        "text": tmp_path / "notes.png",
        "bomb": tmp_path / "bomb.png",
        "large": tmp_path / "large.png",
        "truncated": tmp_path / "truncated.png",
    }
    files["empty"].write_bytes(b"")
    files["corrupt"].write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    files["text"].write_text("this is not an image\n")
    files["bomb"].write_bytes(_png_header_only(100_000, 100_000))
    files["large"].write_bytes(_png_header_only(10_000, 8_000))
    full = _encoded(Image.new("RGB", (64, 64), (10, 200, 30)), "PNG", compress_level=0)
    files["truncated"].write_bytes(full[: len(full) // 2])
    return files


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "file is empty (0 bytes)"),
        ("corrupt", "not a recognised image file"),
        ("text", "not a recognised image file"),
        ("bomb", "possible decompression bomb"),  # beyond Pillow's own hard limit
        ("large", "80,000,000 pixels, more than the limit of 64,000,000"),  # beyond our default limit only
        ("truncated", "corrupt or truncated"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(bad_files: dict[str, Path], kind: str, message: str) -> None:
    with pytest.raises(ImageLoadError) as caught:
        load_image(bad_files[kind])
    text = str(caught.value)
    assert str(bad_files[kind]) in text and message in text
    assert "\n" not in text


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageLoadError, match=r"nothere\.jpg: no such file"):
        load_image(tmp_path / "nothere.jpg")
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(path)
    with pytest.raises(ImageLoadError, match="1,200 pixels, more than the limit of 1,000"):
        load_image(path, max_pixels=1000)
    assert load_image(path, max_pixels=1200).size == (40, 30)
    assert load_image(path, max_pixels=None).size == (40, 30)


def test_bytes_inputs() -> None:
    image = Image.new("RGB", (5, 4), (1, 2, 3))
    assert np.array_equal(np.asarray(load_image(_encoded(image, "PNG"))), np.asarray(image))
    with pytest.raises(ImageLoadError, match="^<bytes>: empty data"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match="^<bytes>: not a recognised image"):
        load_image(b"GIF89a-but-not-really")
    with pytest.raises(ImageLoadError, match="^<bytes>: .*decompression bomb"):
        load_image(bytearray(_png_header_only(50_000, 50_000)))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 5, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 5, 3), np.uint8), "shape"),
        (np.zeros((0, 5, 3), np.uint8), "empty image"),
        (np.zeros((4, 5, 3), np.float32), "dtype float32"),
        (np.zeros((4, 5), np.int64), "dtype int64"),
    ],
)
def test_bad_arrays(array: np.ndarray, message: str) -> None:
    with pytest.raises(ImageLoadError, match=f"^<array>: .*{message}"):
        load_image(array)


def test_unsupported_type() -> None:
    with pytest.raises(ImageLoadError, match="^<int>: unsupported input type"):
        load_image(42)


def test_arrays_become_rgb() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(rgb)), rgb)
    gray = rgb[:, :, 0]
    assert np.array_equal(np.asarray(load_image(gray)), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(np.asarray(load_image(gray[:, :, None])), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.dstack([rgb, np.full((6, 7), 255, np.uint8)])
    assert np.array_equal(np.asarray(load_image(rgba)), rgb)
    deep = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    assert np.asarray(load_image(deep))[0, :, 0].tolist() == [0, 1, 255, 128]


def test_modes_become_rgb() -> None:
    transparent = Image.new("RGBA", (3, 2), (0, 0, 0, 0))
    half = Image.new("RGBA", (3, 2), (0, 0, 0, 128))
    assert np.asarray(load_image(transparent))[0, 0].tolist() == [255, 255, 255]  # composited on white
    assert np.asarray(load_image(half))[0, 0].tolist() == [127, 127, 127]
    assert np.asarray(load_image(Image.new("L", (3, 2), 77)))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(load_image(Image.new("LA", (3, 2), (77, 0))))[0, 0].tolist() == [255, 255, 255]
    palette = Image.new("RGB", (3, 2), (200, 10, 10)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert np.asarray(load_image(palette))[0, 0].tolist() == [200, 10, 10]
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    sixteen = Image.fromarray(np.full((2, 3), 65535, np.uint16))
    assert sixteen.mode == "I;16"
    assert np.asarray(load_image(sixteen))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image(Image.new("I", (3, 2), 32896)))[0, 0].tolist() == [128, 128, 128]
    assert np.asarray(load_image(Image.new("F", (3, 2), 0.5)))[0, 0].tolist() == [128, 128, 128]
    for image in (transparent, palette, cmyk, sixteen):
        assert load_image(image).mode == "RGB"


def test_transparent_palette_png(tmp_path: Path) -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 250, 0, 0] + [0] * 762)
    image.putpixel((1, 1), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    loaded = np.asarray(load_image(path))
    assert loaded[0, 0].tolist() == [255, 255, 255] and loaded[1, 1].tolist() == [250, 0, 0]


def test_sixteen_bit_png_file(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535], [257 * 100, 257 * 200]], np.uint16)).save(path)
    assert np.asarray(load_image(path))[:, :, 0].tolist() == [[0, 255], [100, 200]]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 40 wide x 20 high with a red left half; orientation 6 means "rotate 90 degrees clockwise to view".
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (20, 40)
    top, bottom = np.asarray(loaded)[5, 10], np.asarray(loaded)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the red half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_caller_image_is_not_modified() -> None:
    image = Image.new("RGB", (3, 3), (5, 6, 7))
    loaded = load_image(image)
    assert loaded is not image
    loaded.putpixel((0, 0), (0, 0, 0))
    assert image.getpixel((0, 0)) == (5, 6, 7)


def test_find_images_walks_folders(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "sub/c.webp", "sub/deeper/d.tiff", "notes.txt", ".hidden/e.jpg", "._f.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    found = find_images([tmp_path, tmp_path / "a.png", tmp_path / "missing.jpg"])
    relative = [p.relative_to(tmp_path).as_posix() for p in found]
    assert relative == ["a.png", "b.JPG", "missing.jpg", "sub/c.webp", "sub/deeper/d.tiff"]


def test_folders_report_fifos_and_broken_links_named_as_images(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    assert sorted(p.name for p in find_images([tmp_path])) == ["gone.png", "pipe.jpg"]


# ---------------------------------------------------------------- hostile files

# Loads each path in a fresh process whose address space is capped at 1 GiB above what it uses after the import:
# a file read whole would fail there (or hang, for a FIFO) instead of eating the test machine's memory.
_LOAD_CAPPED = """
import resource, sys
from lwdetr.images import ImageLoadError, load_image
with open("/proc/self/status") as status:
    used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (used + 2**30, resource.RLIM_INFINITY))
for path in sys.argv[1:]:
    try:
        print("ok", load_image(path).size)
    except ImageLoadError as error:
        print("error", error)
"""


def _load_in_capped_process(*paths: Path) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_CAPPED, *map(str, paths)], capture_output=True, text=True, env=env, timeout=120
    )
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    return result.stdout.splitlines()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and RLIMIT_AS to cap the memory")
def test_huge_sparse_file_and_fifo_are_refused_without_reading(tmp_path: Path) -> None:
    sparse = tmp_path / "sparse.jpg"
    with open(sparse, "wb") as file:  # a JPEG start, then 12 GiB of holes: no disk space used
        file.write(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00")
        file.truncate(12 * 2**30)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    good = tmp_path / "good.png"
    Image.new("RGB", (30, 20)).save(good)
    lines = _load_in_capped_process(sparse, fifo, good)
    assert lines[0] == f"error {sparse}: file is 12,884,901,888 bytes, more than the limit of 268,435,456 " + (
        "(LWDETR_MAX_IMAGE_BYTES)"
    )
    assert lines[1] == f"error {fifo}: not a regular file (a FIFO, socket or device), refused"
    assert lines[2] == "ok (30, 20)"


def test_byte_limit_is_configurable(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(path, compress_level=0)
    size = path.stat().st_size
    with pytest.raises(ImageLoadError, match=rf"small\.png: file is {size:,} bytes, more than the limit of 1,000"):
        load_image(path, max_bytes=1000)
    with pytest.raises(ImageLoadError, match=rf"^<bytes>: {size:,} bytes, more than the limit of 1,000"):
        load_image(path.read_bytes(), max_bytes=1000)
    assert load_image(path, max_bytes=size).size == load_image(path, max_bytes=None).size == (40, 30)


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 256 * 2**20), ("1000", 1000), ("0", None), ("-5", None), ("1e9", None)]
)
def test_byte_limit_setting(monkeypatch: pytest.MonkeyPatch, value: str | None, expected: int | None) -> None:
    if value is None:
        monkeypatch.delenv("LWDETR_MAX_IMAGE_BYTES", raising=False)
    else:
        monkeypatch.setenv("LWDETR_MAX_IMAGE_BYTES", value)
    if expected is None:
        with pytest.raises(ValueError, match=f"^LWDETR_MAX_IMAGE_BYTES='{value}' is not a positive whole number"):
            images_module.max_image_bytes_setting()
    else:
        assert images_module.max_image_bytes_setting() == expected


def test_eps_named_jpg_never_reaches_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import EpsImagePlugin

    calls = []

    def fake_ghostscript(*args, **kwargs):
        calls.append(args)
        raise OSError("Ghostscript was called")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", fake_ghostscript)
    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    for source in (path, EPS):
        with pytest.raises(ImageLoadError, match=r"(photo\.jpg|<bytes>): not a recognised image file") as caught:
            load_image(source)
        assert "JPEG, PNG, WebP, BMP, GIF or TIFF" in str(caught.value)
    assert calls == []


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA", "PCX"])
def test_formats_outside_the_supported_ones_are_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "image.png"
    path.write_bytes(_encoded(Image.new("RGB", (16, 16), (9, 9, 9)), fmt))
    with pytest.raises(ImageLoadError, match=r"image\.png: not a recognised image file"):
        load_image(path)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"])
def test_supported_formats_load_from_files(tmp_path: Path, fmt: str) -> None:
    image = Image.new("RGB", (24, 16), (250, 10, 10))
    extra = {"save_all": True, "append_images": [image]} if fmt == "MPO" else {}
    path = tmp_path / f"image.{fmt.lower()}"
    path.write_bytes(_encoded(image, fmt, **extra))
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (24, 16)
    assert np.asarray(loaded)[8, 12, 0] > 200
    assert fmt in (*images_module.DECODED_FORMATS, "MPO")


def test_tiff_exif_orientation_is_read_while_the_file_is_open(tmp_path: Path) -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.tif"
    stored.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_no_decompression_bomb_warning_reaches_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow warns above this, and refuses above twice it
    warned, refused = tmp_path / "warned.png", tmp_path / "refused.png"
    Image.new("RGB", (40, 30)).save(warned)
    Image.new("RGB", (60, 40)).save(refused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_image(warned, max_pixels=None).size == (40, 30)
        with pytest.raises(ImageLoadError, match=r"refused\.png: too many pixels, possible decompression bomb"):
            load_image(refused, max_pixels=None)
    assert caught == []


def test_hostile_file_names_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "two\nlines\x1b[31m.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError) as caught:
        load_image(path)
    assert "\n" not in str(caught.value) and "\x1b" not in str(caught.value)
    assert "two\\nlines\\x1b[31m.jpg: file is empty" in str(caught.value)
