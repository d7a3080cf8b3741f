"""`LwDetrImageProcessor` against transformers' `DeformableDetrImageProcessorPil` (the processor LW-DETR uses)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, DeformableDetrImageProcessorPil
from transformers.image_transforms import get_size_with_aspect_ratio
from transformers.image_utils import get_image_size_for_max_height_width

from lwdetr.hub import ModelNotFoundError
from lwdetr.images import ImageLoadError
from lwdetr.processing import LwDetrImageProcessor, output_size

SIZES = [(480, 640), (333, 517), (1000, 300), (64, 64), (50, 71)]

CONFIGS = {
    "lwdetr_640": {"size": {"height": 640, "width": 640}},
    "detr_800_1333": {"size": {"shortest_edge": 800, "longest_edge": 1333}},
    "short_long_small": {"size": {"shortest_edge": 300, "longest_edge": 500}},
    "max_height_width": {"size": {"max_height": 500, "max_width": 700}},
    "custom_norm_bicubic": {
        "size": {"height": 256, "width": 320},
        "image_mean": [0.5, 0.4, 0.3],
        "image_std": [0.2, 0.3, 0.4],
        "rescale_factor": 1 / 127.5,
        "resample": 3,
    },
    "no_normalize": {"size": {"height": 128, "width": 128}, "do_normalize": False},
    "no_rescale": {"size": {"height": 128, "width": 128}, "do_rescale": False},
    "no_resize": {"do_resize": False},
    "no_pad_square": {"size": {"height": 96, "width": 160}, "do_pad": False},
}


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in SIZES]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_pixels_match_reference(name: str, images: list[Image.Image]) -> None:
    reference = DeformableDetrImageProcessorPil(**CONFIGS[name])(images, return_tensors="pt")
    ours = LwDetrImageProcessor(**CONFIGS[name])(images)
    assert ours["pixel_values"].dtype == torch.float32 and ours["pixel_mask"].dtype == torch.int64
    assert ours["pixel_values"].shape == reference["pixel_values"].shape
    assert (ours["pixel_values"] - reference["pixel_values"].float()).abs().max().item() <= 1e-5
    if "pixel_mask" in reference:
        assert torch.equal(ours["pixel_mask"], reference["pixel_mask"])
    else:  # do_pad=False: the reference returns no mask, ours is all ones
        assert bool((ours["pixel_mask"] == 1).all())
    assert ours.original_sizes == SIZES


def test_every_input_kind_gives_the_same_pixels(images: list[Image.Image], tmp_path: Path) -> None:
    image = images[1]
    path = tmp_path / "image.png"
    image.save(path)
    encoded = io.BytesIO()
    image.save(encoded, "PNG")
    processor = LwDetrImageProcessor(size={"height": 96, "width": 96})
    expected = processor(image)["pixel_values"]
    for source in (str(path), path, encoded.getvalue(), np.asarray(image)):
        assert torch.equal(processor(source)["pixel_values"], expected)
    batch = processor([path, image])
    assert batch["pixel_values"].shape == (2, 3, 96, 96) and torch.equal(batch["pixel_values"][0], expected[0])


@pytest.mark.parametrize(
    "size",
    [
        {"shortest_edge": 800, "longest_edge": 1333},
        {"shortest_edge": 333, "longest_edge": 400},
        {"max_height": 123, "max_width": 457},
    ],
)
def test_output_size_matches_reference_over_many_shapes(size: dict[str, int]) -> None:
    # The reference's own size helpers (what its resize calls), on many shapes, squares and exact fits included.
    shapes = [(int(h), int(w)) for h, w in np.random.default_rng(1).integers(2, 4000, size=(2000, 2))]
    shapes += [(800, 800), (800, 1200), (1333, 800), (600, 800), (123, 457), (1, 4000)]
    for height, width in shapes:
        if "max_height" in size:
            expected = get_image_size_for_max_height_width((height, width), size["max_height"], size["max_width"])
        else:
            expected = get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"])
        assert output_size(height, width, size) == tuple(expected), (height, width)


def test_single_edge_sizes_keep_the_aspect_ratio() -> None:
    # Accepted by us only (the reference rejects these forms); the named edge is met exactly.
    assert output_size(300, 500, {"shortest_edge": 200}) == (200, 333)
    assert output_size(500, 300, {"shortest_edge": 200}) == (333, 200)
    assert output_size(300, 500, {"longest_edge": 400}) == (240, 400)
    assert output_size(500, 300, {"longest_edge": 400}) == (400, 240)


def test_batch_padding_and_pad_size(images: list[Image.Image]) -> None:
    processor = LwDetrImageProcessor(do_resize=False, pad_size={"height": 1024, "width": 1024})
    batch = processor(images[:2])
    assert batch["pixel_values"].shape == (2, 3, 1024, 1024)
    assert batch["pixel_mask"][0].sum().item() == 480 * 640 and batch["pixel_mask"][1, 333:, :].sum().item() == 0
    assert batch["pixel_values"][1, :, 333:, :].abs().max().item() == 0.0  # zero after normalisation, as reference
    reference = DeformableDetrImageProcessorPil(do_resize=False, pad_size={"height": 1024, "width": 1024})
    assert torch.equal(batch["pixel_values"], reference(images[:2], return_tensors="pt")["pixel_values"])
    with pytest.raises(ValueError, match="pad_size"):
        LwDetrImageProcessor(do_resize=False, pad_size={"height": 64, "width": 64})(images[:1])
    with pytest.raises(ValueError, match="do_pad"):
        LwDetrImageProcessor(do_resize=False, do_pad=False)(images[:2])


def _random_outputs(batch: int, queries: int, classes: int, seed: int) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, queries, classes, generator=generator) * 3
    boxes = torch.rand(batch, queries, 4, generator=generator) * 0.5 + 0.1
    return SimpleNamespace(logits=logits, pred_boxes=boxes)


@pytest.mark.parametrize(
    ("threshold", "top_k", "target_sizes"),
    [
        (0.5, 100, [(480, 640), (1000, 300), (50, 71)]),
        (0.3, 20, torch.tensor([[480, 640], [1000, 300], [50, 71]])),
        (0.9, 300, None),
        (0.0, 1000, [(17, 23), (640, 640), (2, 4000)]),
    ],
)
def test_post_processing_matches_reference(threshold, top_k, target_sizes) -> None:
    outputs = _random_outputs(3, 60, 11, seed=top_k)
    reference = DeformableDetrImageProcessorPil().post_process_object_detection(
        outputs, threshold=threshold, target_sizes=target_sizes, top_k=top_k
    )
    ours = LwDetrImageProcessor().post_process_object_detection(
        {"logits": outputs.logits, "pred_boxes": outputs.pred_boxes},
        threshold=threshold,
        target_sizes=target_sizes,
        top_k=top_k,
    )
    assert sum(len(r["scores"]) for r in reference) > 0
    for mine, theirs in zip(ours, reference):
        assert torch.equal(mine["labels"], theirs["labels"])
        assert torch.allclose(mine["scores"], theirs["scores"], atol=1e-6, rtol=0)
        assert torch.allclose(mine["boxes"], theirs["boxes"], atol=1e-4, rtol=0)


def test_post_processing_rejects_wrong_target_count() -> None:
    with pytest.raises(ValueError, match="target sizes"):
        LwDetrImageProcessor().post_process_object_detection(_random_outputs(2, 5, 3, 0), target_sizes=[(1, 1)])


def test_ours_saved_loads_in_transformers(images: list[Image.Image], tmp_path: Path) -> None:
    ours = LwDetrImageProcessor(size={"shortest_edge": 200, "longest_edge": 300}, image_mean=[0.4, 0.5, 0.6])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "DeformableDetrImageProcessor" and saved["resample"] == 2
    theirs = AutoImageProcessor.from_pretrained(tmp_path)
    assert isinstance(theirs, DeformableDetrImageProcessorPil)
    assert tuple(theirs.image_mean) == (0.4, 0.5, 0.6) and theirs.size.shortest_edge == 200
    expected = theirs(images, return_tensors="pt")
    got = ours(images)
    assert torch.equal(got["pixel_values"], expected["pixel_values"])
    assert torch.equal(got["pixel_mask"], expected["pixel_mask"])


def test_transformers_saved_loads_in_ours(images: list[Image.Image], tmp_path: Path) -> None:
    theirs = DeformableDetrImageProcessorPil(size={"max_height": 321, "max_width": 222}, image_std=[0.3, 0.3, 0.3])
    theirs.save_pretrained(tmp_path)
    ours = LwDetrImageProcessor.from_pretrained(tmp_path)
    assert ours.size == {"max_height": 321, "max_width": 222} and ours.image_std == (0.3, 0.3, 0.3)
    assert torch.equal(ours(images)["pixel_values"], theirs(images, return_tensors="pt")["pixel_values"])
    # Our re-save keeps the reference's keys and values.
    ours.save_pretrained(tmp_path / "again")
    first = json.loads((tmp_path / "preprocessor_config.json").read_text())
    second = json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())
    assert {key: second[key] for key in first} == first
    assert LwDetrImageProcessor.from_pretrained(tmp_path / "again" / "preprocessor_config.json").to_dict() == second


def test_legacy_config_spellings() -> None:
    legacy = {"size": 400, "max_size": 600, "pad_and_return_pixel_mask": False}
    ours = LwDetrImageProcessor.from_dict(legacy)
    theirs = DeformableDetrImageProcessorPil.from_dict(legacy)
    assert ours.size == {"shortest_edge": 400, "longest_edge": 600}
    assert (theirs.size.shortest_edge, theirs.size.longest_edge) == (400, 600)
    assert ours.do_pad is False and theirs.do_pad is False
    assert LwDetrImageProcessor.from_dict({"size": [300, 200]}).size == {"height": 300, "width": 200}
    with pytest.raises(ValueError, match="size must be"):
        LwDetrImageProcessor(size={"height": 10})


def test_folder_without_config_gets_lwdetr_default(tmp_path: Path) -> None:
    processor = LwDetrImageProcessor.from_pretrained(tmp_path)
    assert processor.size == {"height": 640, "width": 640}
    assert LwDetrImageProcessor.from_pretrained(tmp_path, do_pad=False).do_pad is False


def test_unknown_hub_id_fails_fast_offline() -> None:
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        LwDetrImageProcessor.from_pretrained("nobody-has/this-processor")


def test_bad_inputs_raise_image_load_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    processor = LwDetrImageProcessor(size={"height": 32, "width": 32}, max_pixels=100)
    with pytest.raises(ImageLoadError, match="empty.jpg: file is empty"):
        processor([Image.new("RGB", (5, 5)), empty])
    with pytest.raises(ImageLoadError, match="more than the limit of 100"):
        processor(_png_bytes(20, 20))


def _png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_post_processing_of_half_precision_outputs_is_float32(dtype):
    """A half-precision model's outputs (autocast on a GPU) give float32 scores and boxes: ranked and scaled as the
    float32 outputs they round to, not in half precision (where scores tie and boxes lose pixels)."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 30, 4, generator=generator) * 3).to(dtype)
    boxes = (0.2 + 0.6 * torch.rand(2, 30, 4, generator=generator)).to(dtype)
    processor = LwDetrImageProcessor()
    sizes = [(480, 640), (1000, 1333)]
    outputs = SimpleNamespace(logits=logits, pred_boxes=boxes)
    widened = SimpleNamespace(logits=logits.float(), pred_boxes=boxes.float())
    half = processor.post_process_object_detection(outputs, 0.1, sizes, top_k=50)
    full = processor.post_process_object_detection(widened, 0.1, sizes, top_k=50)
    for got, expected in zip(half, full):
        assert got["scores"].dtype == got["boxes"].dtype == torch.float32
        for key in ("scores", "labels", "boxes"):
            assert torch.equal(got[key], expected[key]), key
