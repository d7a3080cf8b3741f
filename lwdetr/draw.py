"""Draw detections on an image: one colour per class, a filled label tag above each box."""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

from .postprocess import Detection

__all__ = ["class_colour", "draw_detections"]

# Tableau-like colours, distinct and readable under white text.
_PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (57, 59, 121), (173, 73, 74),
)  # fmt: skip


def class_colour(label_id: int) -> tuple[int, int, int]:
    """A stable RGB colour for a class id (the palette repeats after 12 classes, shifted in brightness)."""
    base = _PALETTE[label_id % len(_PALETTE)]
    shift = (label_id // len(_PALETTE)) % 3 * 40
    return tuple(max(0, channel - shift) for channel in base)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: Image.Image, detections: Iterable[Detection], show_scores: bool = True, font_size: int | None = None
) -> Image.Image:
    """Return an RGB copy of `image` with each detection's box and "label score" tag drawn on it.

    Line width and text size follow the image size so that tags stay readable on large photos; `font_size` (pixels)
    overrides the text size, e.g. for an image that will be shown much smaller than it is.
    """
    canvas = image.convert("RGB") if image.mode != "RGB" else image.copy()
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(max(canvas.size) / 400))
    font = _font(font_size or max(10, round(max(canvas.size) / 60)))
    for detection in detections:
        colour = class_colour(detection.label_id)
        x0, y0, x1, y1 = detection.box
        draw.rectangle((x0, y0, max(x0, x1), max(y0, y1)), outline=colour, width=width)
        text = f"{detection.label} {detection.score:.2f}" if show_scores else detection.label
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_height = bottom - top + 2 * width
        # Put the tag above the box, or inside it when the box touches the top edge.
        tag_y = y0 - tag_height if y0 - tag_height >= 0 else y0
        draw.rectangle((x0, tag_y, x0 + right - left + 2 * width, tag_y + tag_height), fill=colour)
        draw.text((x0 + width - left, tag_y + width - top), text, fill=(255, 255, 255), font=font)
    return canvas
