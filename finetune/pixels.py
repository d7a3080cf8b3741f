"""One pixel contract: training, evaluation and the dataset check decode images exactly as inference does.

Every dataset image goes through `lwdetr.images.load_image` with inference's pixel limit
(`lwdetr.images.DEFAULT_MAX_PIXELS`): EXIF orientation applied, 16-bit samples scaled to 8 bits, transparency
composited on white, decompression bombs refused. A model thus learns from the pixels it will see when deployed.

EXIF orientation and boxes. Decoding turns a tagged image upright, the way image viewers, browsers and annotation
tools (CVAT, Label Studio, labelme) show it, so boxes are taken to be in that upright frame. One case proves the
annotator saw the stored pixels instead: the json's width/height equal the stored size but not the upright one
(a non-square image whose tag turns it by 90 degrees). Those boxes are carried into the upright frame
(`orient_boxes`). Roboflow exports are already upright and carry no tag, so they are unaffected.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from finetune.errors import DataError
from lwdetr.images import DEFAULT_MAX_PIXELS, ImageLoadError, load_image

__all__ = ["MAX_PIXELS", "ImageProbe", "decode_image", "orient_boxes", "probe_image"]

MAX_PIXELS = DEFAULT_MAX_PIXELS
# The formats the project reads; the header is only ever parsed by these (never EPS, PSD, ... decoders).
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class ImageProbe(NamedTuple):
    """What decoding a dataset image found: `size` (width, height) upright as decoded, `stored_size` as in the
    file, and the EXIF `orientation` applied (1 = none, 2-8 as in the EXIF standard)."""

    size: tuple[int, int]
    stored_size: tuple[int, int]
    orientation: int


def decode_image(path: Path, name: str) -> Image.Image:
    """The image at `path` as inference sees it (RGB, upright); `DataError` "<name>: <reason>" if it cannot be.

    `name` is how the dataset calls the file (its `file_name`), so no server path reaches a message.
    """
    try:
        return load_image(path, max_pixels=MAX_PIXELS)
    except ImageLoadError as error:
        raise DataError(f"{name}: {_reason(error, path)}") from None
    except (OSError, MemoryError) as error:  # load_image should not let these out; a safety net for one file
        raise DataError(f"{name}: cannot read the image ({type(error).__name__})") from None


def probe_image(path: Path, name: str) -> ImageProbe:
    """Decode `path` once, fully (truncated TIFF, GIF or BMP files only fail when decoded), and report its sizes
    and EXIF orientation. Raises `DataError` as `decode_image` does."""
    image = decode_image(path, name)
    stored, orientation = image.size, 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning: load_image applied our limit
            with Image.open(path, formats=_FORMATS) as header:
                stored, orientation = header.size, int(header.getexif().get(_EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a malformed EXIF block: load_image left the pixels as stored too
        stored, orientation = image.size, 1
    turned = (stored[1], stored[0]) if orientation in _SWAPS_AXES else stored
    if orientation not in range(1, 9) or image.size != turned:
        orientation, stored = 1, image.size  # load_image could not apply the tag either: pixels as stored
    return ImageProbe(image.size, stored, orientation)


def orient_boxes(boxes: np.ndarray, orientation: int, stored_size: tuple[int, int]) -> np.ndarray:
    """Boxes (x, y, w, h) [n, 4] drawn on the stored pixels, moved to the upright frame `load_image` decodes.

    `stored_size` is (width, height) of the stored pixels. Orientation 1 returns the boxes unchanged.
    """
    width, height = stored_size
    x, y, w, h = (boxes[:, i] for i in range(4))
    right, bottom = width - x - w, height - y - h  # distances to the far edges
    upright = {
        1: (x, y, w, h),
        2: (right, y, w, h),  # mirrored left-right
        3: (right, bottom, w, h),  # turned 180 degrees
        4: (x, bottom, w, h),  # mirrored top-bottom
        5: (y, x, h, w),  # transposed
        6: (bottom, x, h, w),  # turned 90 degrees clockwise to display
        7: (bottom, right, h, w),  # transversed
        8: (y, right, h, w),  # turned 90 degrees counter-clockwise to display
    }[orientation]
    return np.stack(upright, axis=1).astype(boxes.dtype).reshape(-1, 4)


def _reason(error: ImageLoadError, path: Path) -> str:
    """The message of `error` without the path it starts with."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    for prefix in (f"{path}: ", f"{Path(path).name}: "):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text
