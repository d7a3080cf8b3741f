"""A synthetic detection dataset of filled shapes, written as a Roboflow-style COCO export.

Easy on purpose (a tiny detector learns it in a few CPU minutes): a few large, non-overlapping shapes (15-45 % of
the image side) in saturated colours on muted textured backgrounds (smooth noise, gradients, stripes, checks).
The class is the shape, never the colour (every instance gets its own hue). Boxes are exact: each is the extent
of the pixels actually painted. Backgrounds never hold a fully saturated pixel, so with `image_format="png"` the
pixels of an instance are exactly those of its colour.

The export mimics Roboflow's, quirks included: category 0 is an unused super-category, image and annotation ids
start at 0. Deterministic for a seed (each image has its own generator), about 100 images per second.

    python -m finetune.synthetic OUT_DIR [--num-train 200] [--num-val 40] [--num-test 0] [--image-size 256]
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SHAPES", "make_synthetic_dataset"]

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
_SPLIT_FOLDERS = ("train", "valid", "test")
_SIZE_RANGE = (0.15, 0.45)  # shape side, as a fraction of the image side
_PLACEMENT_TRIES = 50
_GAP = 2  # pixels kept free between shapes, so that no two boxes touch


def make_synthetic_dataset(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 200,
    num_val: int = 40,
    num_test: int = 0,
    image_size: int = 256,
    classes: Sequence[str] = ("circle", "square", "triangle"),
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 4,
    image_format: str = "jpg",
) -> Path:
    """Write `train/`, `valid/` (and `test/` when `num_test` > 0) under `out_dir`; return `out_dir`.

    Each split holds `<split>_<index>.<image_format>` images ("jpg" or "png") and `_annotations.coco.json`.
    Each image has between `min_objects` and `max_objects` shapes (fewer when they do not fit without
    overlapping). `classes` are names from `SHAPES`, in label order.
    """
    unknown = [name for name in classes if name not in SHAPES]
    if unknown or not classes:
        raise ValueError(f"unknown shape classes {unknown}; choose from {', '.join(SHAPES)}")
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes must be distinct, got {list(classes)}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 0 <= min_objects <= max_objects:
        raise ValueError(f"need 0 <= min_objects <= max_objects, got {min_objects} and {max_objects}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    out_dir = Path(out_dir)
    for split_index, (folder, count) in enumerate(zip(_SPLIT_FOLDERS, (num_train, num_val, num_test))):
        if count > 0:
            objects = (min_objects, max_objects)
            _write_split(out_dir / folder, split_index, count, image_size, list(classes), seed, objects, image_format)
    return out_dir


def _write_split(
    folder: Path,
    split_index: int,
    count: int,
    image_size: int,
    classes: list[str],
    seed: int,
    object_range: tuple[int, int],
    image_format: str,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([seed, split_index, index])
        pixels, objects = _draw_image(rng, image_size, classes, object_range)
        file_name = f"{folder.name}_{index:05d}.{image_format}"
        Image.fromarray(pixels).save(folder / file_name, quality=90)
        images.append({"id": index, "file_name": file_name, "width": image_size, "height": image_size})
        for box, label, colour in objects:
            annotations.append(
                {
                    "id": len(annotations),
                    "image_id": index,
                    "category_id": label + 1,
                    "bbox": box,
                    "area": box[2] * box[3],
                    "iscrowd": 0,
                    "color": colour,  # extra field: lets tests find the instance's pixels
                }
            )
    categories = [{"id": 0, "name": "shapes", "supercategory": "none"}]
    categories += [{"id": i + 1, "name": name, "supercategory": "shapes"} for i, name in enumerate(classes)]
    coco = {
        "info": {"description": "finetune.synthetic shapes"},
        "licenses": [],
        "categories": categories,
        "images": images,
        "annotations": annotations,
    }
    (folder / "_annotations.coco.json").write_text(json.dumps(coco), encoding="utf-8")


def _draw_image(
    rng: np.random.Generator, size: int, classes: list[str], object_range: tuple[int, int]
) -> tuple[np.ndarray, list[tuple[list[int], int, list[int]]]]:
    """One image uint8 [size, size, 3] and its objects: (box [x, y, w, h], label, colour [r, g, b])."""
    pixels = _background(rng, size)
    regions = _place_squares(rng, size, int(rng.integers(object_range[0], object_range[1] + 1)))
    first_hue = rng.random()
    objects = []
    for i, (x, y, side) in enumerate(regions):
        label = int(rng.integers(len(classes)))
        # Evenly spaced hues keep the instances of an image distinct; full saturation keeps them off the background.
        hue = (first_hue + i / len(regions)) % 1.0
        colour = [round(255 * c) for c in colorsys.hsv_to_rgb(hue, 1.0, rng.uniform(0.75, 1.0))]
        mask = _shape_mask(classes[label], side)
        pixels[y : y + side, x : x + side][mask] = colour
        rows, cols = np.nonzero(mask)
        box = [
            x + int(cols.min()),
            y + int(rows.min()),
            int(cols.max() - cols.min()) + 1,
            int(rows.max() - rows.min()) + 1,
        ]
        objects.append((box, label, colour))
    return pixels, objects


def _place_squares(rng: np.random.Generator, size: int, count: int) -> list[tuple[int, int, int]]:
    """Up to `count` non-overlapping squares (x, y, side) inside the image; fewer when they do not fit."""
    placed: list[tuple[int, int, int]] = []
    for _ in range(count):
        for _ in range(_PLACEMENT_TRIES):
            side = int(rng.uniform(*_SIZE_RANGE) * size)
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if all(_apart((x, y, side), other) for other in placed):
                placed.append((x, y, side))
                break
    return placed


def _apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    (ax, ay, aside), (bx, by, bside) = a, b
    return ax + aside + _GAP <= bx or bx + bside + _GAP <= ax or ay + aside + _GAP <= by or by + bside + _GAP <= ay


def _shape_mask(shape: str, side: int) -> np.ndarray:
    """bool [side, side]: the filled shape, touching the square's edges (not antialiased, so edges are exact)."""
    canvas = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(canvas)
    last = side - 1
    if shape == "circle":
        draw.ellipse((0, 0, last, last), fill=255)
    elif shape == "square":
        draw.rectangle((0, 0, last, last), fill=255)
    else:
        draw.polygon(_polygon(shape, last), fill=255)
    return np.asarray(canvas) > 0


def _polygon(shape: str, last: int) -> list[tuple[float, float]]:
    """The corners of a polygonal shape inscribed in the square [0, last]^2."""
    half = last / 2
    if shape == "triangle":
        return [(half, 0), (last, last), (0, last)]
    if shape == "diamond":
        return [(half, 0), (last, half), (half, last), (0, half)]
    if shape == "hexagon":
        return [(half + half * math.cos(a), half + half * math.sin(a)) for a in np.arange(6) * math.pi / 3]
    # star: five outer points on the circle, five inner ones at 40 % of the radius
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, half, 0.4 * half)
    return [(half + r * math.cos(a), half + r * math.sin(a)) for r, a in zip(radii, angles)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: a random texture, tinted at most 35 %, so no pixel is close to fully saturated."""
    texture = _TEXTURES[int(rng.integers(len(_TEXTURES)))](rng, size).astype(np.float32)
    texture += rng.standard_normal(texture.shape, dtype=np.float32) * 0.03
    np.clip(texture, 0.0, 1.0, out=texture)
    value = 255.0 * (0.2 + 0.7 * texture)  # never black: a black pixel would count as saturated
    tint_amount = rng.uniform(0.0, 0.35)
    tint = ((1.0 - tint_amount) + tint_amount * rng.random(3)).astype(np.float32)
    return (value[..., None] * tint + 0.5).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.random((int(rng.integers(3, 9)),) * 2).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.BILINEAR))


def _gradient(rng: np.random.Generator, size: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size
    ramp = xs * math.cos(angle) + ys * math.sin(angle)
    return (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-6)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    angle, period = rng.uniform(0, math.pi), rng.uniform(8, 40)
    ys, xs = np.mgrid[0:size, 0:size]
    return 0.5 + 0.3 * np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)


def _checks(rng: np.random.Generator, size: int) -> np.ndarray:
    cell = int(rng.integers(8, 40))
    ys, xs = np.mgrid[0:size, 0:size] // cell
    return 0.35 + 0.3 * ((xs + ys) % 2)


_TEXTURES = (_smooth_noise, _gradient, _stripes, _checks)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m finetune.synthetic OUT_DIR ...`: write a dataset and print where."""
    parser = argparse.ArgumentParser(prog="python -m finetune.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--num-train", type=int, default=200)
    parser.add_argument("--num-val", type=int, default=40)
    parser.add_argument("--num-test", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--classes", default="circle,square,triangle", help=f"comma-separated, from {','.join(SHAPES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-objects", type=int, default=1)
    parser.add_argument("--max-objects", type=int, default=4)
    parser.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    args = parser.parse_args(argv)
    out = make_synthetic_dataset(
        args.out_dir,
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        image_size=args.image_size,
        classes=tuple(args.classes.split(",")),
        seed=args.seed,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        image_format=args.image_format,
    )
    print(out)


if __name__ == "__main__":
    main()
