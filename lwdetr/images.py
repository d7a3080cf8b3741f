"""Robust image loading: anything a user may hand us becomes an 8-bit RGB `PIL.Image.Image`.

Accepted sources: a PIL image, a numpy array (`[H, W]` or `[H, W, C]` with C in 1, 3, 4; uint8 or uint16), a file
path (`str` or `os.PathLike`) or the raw bytes of an encoded file. Every failure raises `ImageLoadError` with a
one-line message that names the source, so a command-line tool can print it as it is and move on.

Conversion choices:
- EXIF orientation is applied first, so boxes are reported in the frame people see in an image viewer.
- Transparency (RGBA, LA, PA, palette images with a transparent colour) is composited on a white background, the
  way viewers show it. Transparent pixels often store black or leftover colours that would otherwise leak into
  the detector's input. (transformers' pipeline drops alpha instead; the two agree for every opaque image.)
- 16-bit data (`I;16*` modes, uint16 arrays) is scaled to 8 bits with `round(v / 257)`, which maps 0..65535 onto
  0..255 exactly; `I` (32-bit) images are assumed to hold 16-bit samples unless their values fall outside 0..65535,
  in which case they are stretched min..max. `F` (float) images in 0..1 are scaled by 255, otherwise clipped.
- Decompression bombs: encoded sources whose header announces more than `max_pixels` pixels are refused before
  any pixel is decoded. Pillow's own hard limit (2 x `PIL.Image.MAX_IMAGE_PIXELS`) still applies on top.

Hostile files (the public app and the CLI read whatever they are given):
- Only `DECODED_FORMATS` reach a decoder. Pillow would otherwise pick a plugin by the file's content, whatever its
  name: EPS content named `.jpg` would be handed to Ghostscript, an external interpreter.
- A file larger than `max_bytes` (default `DEFAULT_MAX_IMAGE_BYTES`, 256 MiB, or the `LWDETR_MAX_IMAGE_BYTES`
  environment variable) is refused from its size alone, and a file is decoded from its handle, so the decoder
  reads the header (and the pixel count is checked) before the rest. A 12 GiB sparse `.jpg` costs one `stat`.
- Only regular files are opened, and without blocking: reading a FIFO named `.jpg` would wait forever for a writer,
  a device such as `/dev/zero` would never end.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DECODED_FORMATS",
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_IMAGE_BYTES_ENV",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSource",
    "find_images",
    "load_image",
    "source_name",
]

DEFAULT_MAX_PIXELS = 64_000_000
# Pillow format ids we decode; MPO (multi-picture JPEG from cameras) comes through the JPEG plugin.
DECODED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
MAX_IMAGE_BYTES_ENV = "LWDETR_MAX_IMAGE_BYTES"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

ImageSource = Image.Image | np.ndarray | str | os.PathLike | bytes | bytearray | memoryview

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message is one line naming the source."""


def max_image_bytes_setting() -> int:
    """The file-size limit set by `LWDETR_MAX_IMAGE_BYTES` (a positive number of bytes), else 256 MiB.

    Raises:
        ValueError: one line naming the variable when it is set to anything but a positive integer.
    """
    text = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
    if not text:
        return 256 * 2**20
    value = int(text) if text.isascii() and text.isdigit() else 0
    if value < 1:
        raise ValueError(f"{MAX_IMAGE_BYTES_ENV}={text!r} is not a positive whole number of bytes")
    return value


def _default_max_bytes() -> int:
    try:
        return max_image_bytes_setting()
    except ValueError:  # reported by the command line; a library import must not fail over it
        return 256 * 2**20


DEFAULT_MAX_IMAGE_BYTES = _default_max_bytes()


def source_name(source: Any) -> str:
    """A short one-line name for `source` in messages: the path, or `<bytes>`, `<array>`, `<PIL image>`.

    Control characters and undecodable bytes in a file name are escaped, so that a hostile name cannot add lines.
    """
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        text = text if isinstance(text, str) else os.fsdecode(text)
        return text if text.isprintable() else repr(text)[1:-1]
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return f"<{type(source).__name__}>"


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand folders into the image files below them; return every path once, sorted.

    Folders are walked recursively for `IMAGE_EXTENSIONS` (any case), skipping hidden files and folders (such as
    macOS `._name.jpg` resource forks, which are not images) and not following links to folders. Anything else is
    kept as given, missing paths included, so that the caller's `load_image` reports them; so are FIFOs and broken
    links with an image's name, which would otherwise vanish from the results without a word.
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            found.add(path)
            continue
        for candidate in path.rglob("*"):
            hidden = any(part.startswith(".") for part in candidate.relative_to(path).parts)
            if not hidden and candidate.suffix.lower() in IMAGE_EXTENSIONS and not candidate.is_dir():
                found.add(candidate)
    return sorted(found, key=str)


def load_image(
    source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES
) -> Image.Image:
    """Load `source` as an 8-bit RGB image with EXIF orientation applied.

    This is the one decoder of the project: inference, evaluation and training all load images through it.

    Args:
        source: a PIL image, a numpy array `[H, W]` / `[H, W, C]` (C in 1, 3, 4; uint8 or uint16), a file path or
            the raw bytes of an encoded image.
        max_pixels: refuse encoded images (paths, bytes) larger than this many pixels; `None` disables our check.
        max_bytes: refuse files (and bytes) larger than this many bytes before reading them; `None`: no limit.

    Returns:
        A new RGB `PIL.Image.Image`; the caller's image or array is never modified.

    Raises:
        ImageLoadError: one-line message naming the source (missing, empty, too large or not a regular file, not
            an image or not one of `DECODED_FORMATS`, truncated data, too many pixels, unsupported array shape or
            dtype, unsupported type).
    """
    name = source_name(source)
    if isinstance(source, Image.Image):
        return _finish(source, name, copy=True)
    if isinstance(source, np.ndarray):
        return _finish(_image_from_array(source, name), name)
    if isinstance(source, (str, os.PathLike)):
        with _open_regular_file(source, name, max_bytes) as file:
            return _decode(file, name, max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        size = memoryview(source).nbytes
        if size == 0:
            raise ImageLoadError(f"{name}: empty data (0 bytes)")
        if max_bytes is not None and size > max_bytes:
            raise ImageLoadError(f"{name}: {size:,} bytes, more than the limit of {max_bytes:,}")
        return _decode(io.BytesIO(source), name, max_pixels)
    raise ImageLoadError(f"{name}: unsupported input type; pass a path, bytes, a numpy array or a PIL image")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _open_regular_file(path: str | os.PathLike, name: str, max_bytes: int | None) -> io.BufferedReader:
    """Open `path` for reading after checking that it is a non-empty regular file within `max_bytes`.

    The file is checked by `stat` before it is opened (opening some devices has side effects), opened without
    blocking (a FIFO swapped in meanwhile must not hang us), and checked again on the open handle.
    """
    try:
        _check_regular(os.stat(path), name, max_bytes)
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except ImageLoadError:
        raise
    except FileNotFoundError:
        raise ImageLoadError(f"{name}: no such file") from None
    except (OSError, ValueError) as error:  # permissions, a too-long name, an embedded NUL...
        raise ImageLoadError(f"{name}: cannot read file ({_first_line(error)})") from None
    file = os.fdopen(descriptor, "rb")
    try:
        _check_regular(os.fstat(descriptor), name, max_bytes)
    except BaseException:
        file.close()
        raise
    return file


def _check_regular(info: os.stat_result, name: str, max_bytes: int | None) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        raise ImageLoadError(f"{name}: not a regular file (a FIFO, socket or device), refused")
    if info.st_size == 0:
        raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    if max_bytes is not None and info.st_size > max_bytes:
        raise ImageLoadError(
            f"{name}: file is {info.st_size:,} bytes, more than the limit of {max_bytes:,} ({MAX_IMAGE_BYTES_ENV})"
        )


def _decode(file: io.IOBase, name: str, max_pixels: int | None) -> Image.Image:
    """Decode `file` to RGB after checking its format and the pixel count announced by its header.

    Everything that may read the file (EXIF of a TIFF is read lazily) happens here, while it is open.
    """
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning would only duplicate it. Pillow also warns (as raw
            # two-line UserWarnings) about corrupt EXIF, short TIFF directories or malformed MPO data: a damaged
            # file either decodes, or fails below with its one-line error; the warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)
            image = Image.open(file, formats=DECODED_FORMATS)
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    f"{name}: image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                    f"{max_pixels:,} (possible decompression bomb)"
                )
            image.load()
            return _finish(image, name)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: too many pixels, possible decompression bomb ({_first_line(error)})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(
            f"{name}: not a recognised image file (corrupt, or not JPEG, PNG, WebP, BMP, GIF or TIFF)"
        ) from None
    except MemoryError:
        raise ImageLoadError(f"{name}: not enough memory to decode this image") from None
    except Exception as error:  # noqa: BLE001 - Pillow reports malformed data with many types; all are this file's
        raise ImageLoadError(f"{name}: corrupt or truncated image data ({_first_line(error)})") from None


def _finish(image: Image.Image, name: str, copy: bool = False) -> Image.Image:
    """EXIF orientation, then RGB; a new image whenever `copy` (the caller's own image is never modified)."""
    try:
        rgb = _to_rgb(_apply_exif_orientation(image))
    except (OSError, ValueError) as error:  # conversion of exotic modes can still fail inside Pillow
        raise ImageLoadError(f"{name}: cannot convert {image.mode} image to RGB ({_first_line(error)})") from None
    return rgb.copy() if copy and rgb is image else rgb


def _image_from_array(array: np.ndarray, name: str) -> Image.Image:
    """Wrap an `[H, W]` or `[H, W, C]` uint8/uint16 array as a PIL image (8 bits per channel)."""
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageLoadError(f"{name}: expected shape [H, W] or [H, W, C] with C in 1, 3, 4; got {list(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageLoadError(f"{name}: empty image of shape {list(array.shape)}")
    if array.dtype == np.uint16:
        array = _uint16_to_uint8(array)
    elif array.dtype != np.uint8:
        raise ImageLoadError(f"{name}: expected a uint8 (or uint16) array; got dtype {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[array.ndim if array.ndim == 2 else array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def _uint16_to_uint8(array: np.ndarray) -> np.ndarray:
    # 65535 / 255 = 257 exactly, so full scale maps to full scale and rounding keeps mid-grey mid-grey.
    return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block should not cost us an otherwise good image
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB (see the module docstring for the choices made)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _16BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_high_depth_to_uint8(image), mode="L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's own conversions are exact for these.
    return image.convert("RGB")


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    """Map a single-channel 16-bit, 32-bit integer or float image to uint8 `[H, W]`."""
    array = np.asarray(image)
    if image.mode == "F":
        values = array.astype(np.float32)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        return np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() > 65535):
        # Not 16-bit data in a 32-bit container: stretch the actual range to 0..255.
        low, high = int(array.min()), int(array.max())
        return np.round((array - low) * (255.0 / max(high - low, 1))).astype(np.uint8)
    return _uint16_to_uint8(array.astype(np.uint16))
