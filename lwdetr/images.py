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
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageLoadError",
    "ImageSource",
    "find_images",
    "load_image",
    "source_name",
]

DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

ImageSource = Image.Image | np.ndarray | str | os.PathLike | bytes | bytearray | memoryview

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageLoadError(ValueError):
    """An input could not be turned into an RGB image; the message is one line naming the source."""


def source_name(source: Any) -> str:
    """A short name for `source` in messages: the path, or `<bytes>`, `<array>`, `<PIL image>`."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
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
    macOS `._name.jpg` resource forks, which are not images). Anything else is kept as given, missing paths
    included, so that the caller's `load_image` reports them.
    """
    found: set[Path] = set()
    for path in map(Path, paths):
        if not path.is_dir():
            found.add(path)
            continue
        for candidate in path.rglob("*"):
            hidden = any(part.startswith(".") for part in candidate.relative_to(path).parts)
            if not hidden and candidate.suffix.lower() in IMAGE_EXTENSIONS and candidate.is_file():
                found.add(candidate)
    return sorted(found, key=str)


def load_image(source: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load `source` as an 8-bit RGB image with EXIF orientation applied.

    Args:
        source: a PIL image, a numpy array `[H, W]` / `[H, W, C]` (C in 1, 3, 4; uint8 or uint16), a file path or
            the raw bytes of an encoded image.
        max_pixels: refuse encoded images (paths, bytes) larger than this many pixels; `None` disables our check.

    Returns:
        A new RGB `PIL.Image.Image`; the caller's image or array is never modified.

    Raises:
        ImageLoadError: one-line message naming the source (missing or empty file, not an image, truncated data,
            too many pixels, unsupported array shape or dtype, unsupported type).
    """
    name = source_name(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _image_from_array(source, name)
    elif isinstance(source, (str, os.PathLike)):
        image = _open_encoded(_read_file(Path(source), name), name, max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"{name}: empty data (0 bytes)")
        image = _open_encoded(bytes(source), name, max_pixels)
    else:
        raise ImageLoadError(f"{name}: unsupported input type; pass a path, bytes, a numpy array or a PIL image")
    try:
        rgb = _to_rgb(_apply_exif_orientation(image))
    except (OSError, ValueError) as error:  # conversion of exotic modes can still fail inside Pillow
        raise ImageLoadError(f"{name}: cannot convert {image.mode} image to RGB ({_first_line(error)})") from None
    return rgb.copy() if rgb is source else rgb


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _read_file(path: Path, name: str) -> bytes:
    """Read the whole file so that the decoder never holds an open handle, and empty files are caught early."""
    if not path.exists():
        raise ImageLoadError(f"{name}: no such file")
    if path.is_dir():
        raise ImageLoadError(f"{name}: is a directory, not an image file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageLoadError(f"{name}: cannot read file ({_first_line(error)})") from None
    if not data:
        raise ImageLoadError(f"{name}: file is empty (0 bytes)")
    return data


def _open_encoded(data: bytes, name: str, max_pixels: int | None) -> Image.Image:
    """Decode `data` after checking the pixel count announced by its header."""
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if max_pixels is not None and width * height > max_pixels:
                raise ImageLoadError(
                    f"{name}: image is {width}x{height} = {width * height:,} pixels, more than the limit of "
                    f"{max_pixels:,} (possible decompression bomb)"
                )
            image.load()
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{name}: too many pixels, possible decompression bomb ({_first_line(error)})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not a recognised image file (corrupt or unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as error:
        # Pillow reports truncated or malformed data with any of these.
        raise ImageLoadError(f"{name}: corrupt or truncated image data ({_first_line(error)})") from None
    return image


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
