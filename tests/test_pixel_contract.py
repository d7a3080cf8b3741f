"""One pixel contract: training, evaluation and inference decode, pre-process and post-process alike.

Awkward images (16-bit grey, RGBA and palette transparency, EXIF-rotated JPEGs) in a small COCO dataset go through
the training loader (without augmentation), the evaluator and the `Detector` (and the processor called directly):
the model must receive the same tensors from all of them, and the boxes of the training targets must land on the
objects after EXIF rotation. The same raw outputs must give the same COCO records from the evaluator, the CLI and
the app.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from finetune.data import load_detection_data
from finetune.evaluate import detections_from_outputs, gather_detections
from finetune.transforms import DetectionDataset, PreprocessCollate
from lwdetr.__main__ import _predict_all
from lwdetr.detector import Detector
from lwdetr.processing import square_processor
from lwdetr_app import detection as app_detection

SIDE = 64  # the model's square input
QUERIES, CLASSES = 30, 3  # 90 (query, class) pairs: all of them survive evaluation's top 100
RED = (230, 20, 20)
_ORIENTATION = 0x0112


class SpyModel(torch.nn.Module):
    """Records the pixels it is given; its outputs depend on them only, so equal inputs give equal outputs.

    Some boxes reach past the image's edges, so that clipping is part of what the records must agree on.
    """

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("logits", torch.randn(QUERIES, CLASSES, generator=generator) * 2)
        boxes = torch.rand(QUERIES, 4, generator=generator) * torch.tensor([1.0, 1.0, 0.6, 0.6]) + 0.05
        boxes[:3] = torch.tensor([[0.05, 0.5, 0.3, 0.2], [0.98, 0.97, 0.2, 0.3], [0.5, 0.5, 1.4, 0.5]])
        self.register_buffer("boxes", boxes)
        self.seen: list[torch.Tensor] = []

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None) -> SimpleNamespace:
        self.seen.extend(pixel_values.detach().cpu().clone())
        shift = pixel_values.mean(dim=(1, 2, 3))[:, None, None]
        return SimpleNamespace(
            logits=self.logits[None] + shift, pred_boxes=self.boxes[None].expand(len(pixel_values), -1, -1) + 0
        )


def _save_rotated_jpeg(path: Path, orientation: int) -> None:
    """A 90 x 50 (w x h) stored JPEG tagged with `orientation`; a red block at stored x 10..40, y 5..25."""
    stored = np.full((50, 90, 3), 200, dtype=np.uint8)
    stored[5:25, 10:40] = RED
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    Image.fromarray(stored).save(path, quality=95, exif=exif)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """The awkward images and a COCO json, one box around each image's object."""
    root = tmp_path_factory.mktemp("contract")
    ramp = np.linspace(0, 65535, 80 * 56).reshape(56, 80)
    Image.fromarray(ramp.astype(np.uint16)).save(root / "grey16.png")  # mode I;16
    assert Image.open(root / "grey16.png").mode.startswith("I")
    rgba = np.zeros((60, 70, 4), dtype=np.uint8)  # transparent pixels store black
    rgba[10:40, 20:50] = (*RED, 255)
    rgba[45:55, 5:15] = (0, 0, 255, 128)  # half transparent
    Image.fromarray(rgba, mode="RGBA").save(root / "rgba.png")
    palette = Image.new("P", (48, 64), 0)
    palette.putpalette([0, 0, 0, *RED, 0, 255, 0] + [0] * 759)
    palette.paste(1, (8, 8, 30, 40))
    palette.paste(2, (32, 44, 44, 60))
    palette.save(root / "palette.png", transparency=0)  # colour 0 (black) is transparent
    _save_rotated_jpeg(root / "turned6.jpg", 6)
    _save_rotated_jpeg(root / "turned8.jpg", 8)
    images = [
        ("grey16.png", 80, 56, [10, 10, 30, 20]),
        ("rgba.png", 70, 60, [20, 10, 30, 30]),
        ("palette.png", 48, 64, [8, 8, 22, 32]),
        # drawn on the stored pixels (the json gives the stored size): carried into the upright frame
        ("turned6.jpg", 90, 50, [10, 5, 30, 20]),
        # drawn on the upright image, as viewers show it (the json gives the upright size): kept as it is.
        # Orientation 8 turns the stored block (x 10..40, y 5..25) to upright x 5..25, y 50..80.
        ("turned8.jpg", 50, 90, [5, 50, 20, 30]),
    ]
    content = {
        "images": [{"id": i, "file_name": n, "width": w, "height": h} for i, (n, w, h, _) in enumerate(images)],
        "annotations": [
            {"id": i + 1, "image_id": i, "category_id": 1, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, (*_, box) in enumerate(images)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    (root / "annotations.json").write_text(json.dumps(content))
    return root / "annotations.json"


@pytest.fixture(scope="module")
def data(dataset):
    return load_detection_data(dataset, val_data=dataset)


def _training_pixels(data) -> tuple[list[torch.Tensor], list[dict]]:
    loader = torch.utils.data.DataLoader(
        DetectionDataset(data.train, train=True), batch_size=2, collate_fn=PreprocessCollate([SIDE], size_divisor=32)
    )
    pixels, targets = [], []
    for pixel_values, _, batch_targets in loader:
        pixels.extend(pixel_values)
        targets.extend(batch_targets)
    return pixels, targets


def _evaluator_pixels(data) -> tuple[list[torch.Tensor], list[dict]]:
    spy = SpyModel()
    accelerator = SimpleNamespace(
        process_index=0, num_processes=1, device=torch.device("cpu"), mixed_precision="no", is_main_process=True
    )
    records = gather_detections(spy, DetectionDataset(data.val, train=False), accelerator, 2, image_size=SIDE)
    return spy.seen, records


def test_training_evaluation_and_inference_feed_the_model_the_same_tensors(data):
    paths = [record.path for record in data.val.records]
    assert [r.path for r in data.train.records] == paths
    training, _ = _training_pixels(data)
    evaluation, _ = _evaluator_pixels(data)
    spy = SpyModel()
    Detector(spy, square_processor(SIDE), id2label={0: "thing"}, device="cpu").predict(paths, batch_size=3)
    processor = square_processor(SIDE)([str(path) for path in paths])["pixel_values"]
    assert len(training) == len(evaluation) == len(spy.seen) == len(processor) == 5
    for index, path in enumerate(paths):
        for other in (evaluation[index], spy.seen[index], processor[index]):
            assert torch.equal(training[index], other), path.name


def test_decoding_is_the_one_of_inference(data):
    """16-bit samples scaled to 8 bits, transparency on white, EXIF orientation applied: in every loader."""
    by_name = {record.file_name: record for record in data.train.records}
    dataset = DetectionDataset(data.train, train=True)
    images = {record.file_name: dataset[i][0] for i, record in enumerate(data.train.records)}
    grey = np.asarray(images["grey16.png"])
    assert grey.shape == (56, 80, 3) and grey[0, 0].tolist() == [0, 0, 0] and grey[-1, -1].tolist() == [255] * 3
    rgba = np.asarray(images["rgba.png"])
    assert rgba[0, 0].tolist() == [255, 255, 255]  # transparent black shows as the white background
    assert rgba[20, 30].tolist() == list(RED) and rgba[50, 10].tolist() == [127, 127, 255]
    palette = np.asarray(images["palette.png"])
    assert palette[0, 0].tolist() == [255, 255, 255] and palette[20, 20].tolist() == list(RED)
    for name in ("turned6.jpg", "turned8.jpg"):
        assert images[name].size == (50, 90) == (by_name[name].width, by_name[name].height)


@pytest.mark.parametrize("name", ["turned6.jpg", "turned8.jpg", "rgba.png", "palette.png"])
def test_training_boxes_cover_their_objects_after_exif_rotation(data, name):
    """The normalised target box, applied to the model's input tensor, frames the red object."""
    pixels, targets = _training_pixels(data)
    index = [record.file_name for record in data.train.records].index(name)
    cx, cy, w, h = targets[index]["boxes"][0].tolist()
    image = pixels[index]
    red = (image[0] > 1.0) & (image[1] < -1.0)  # normalised: a strong red, little green
    rows, columns = torch.nonzero(red, as_tuple=True)
    found = [columns.min() / SIDE, rows.min() / SIDE, (columns.max() + 1) / SIDE, (rows.max() + 1) / SIDE]
    expected = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    assert np.allclose([float(v) for v in found], expected, atol=2.5 / SIDE), (found, expected)


def test_the_same_outputs_give_the_same_coco_records_everywhere(data):
    """Evaluation (which scores the model card's AP), `python -m lwdetr predict` and the app's JSON download."""
    _, evaluated = _evaluator_pixels(data)
    records = data.val.records
    detector = Detector(SpyModel(), square_processor(SIDE), id2label={0: "thing"}, device="cpu")
    options = argparse.Namespace(threshold=0.0, max_detections=100, batch_size=2, save_annotated=None)
    cli, failed = _predict_all(detector, [record.path for record in records], options)
    assert failed == 0
    for record in cli:
        assert record.pop("file_name") == str(records[record["image_id"]].path)
        record["image_id"] = records[record["image_id"]].image_id
    app = []
    for record in records:
        found = detector.predict(record.path, threshold=0.0, max_detections=100)
        app += app_detection.coco_results(found, (record.height, record.width), record.image_id)

    def ordered(items: list[dict]) -> list[str]:
        return sorted(json.dumps(item, sort_keys=True) for item in items)

    assert len(evaluated) == len(records) * QUERIES * CLASSES
    assert ordered(evaluated) == ordered(cli) == ordered(app)
    widths = {record.image_id: record.width for record in records}
    assert all(0 <= r["bbox"][0] and r["bbox"][0] + r["bbox"][2] <= widths[r["image_id"]] + 1e-6 for r in cli)


def test_evaluation_records_are_rounded_once():
    logits = torch.tensor([[[3.0, -2.0]]])
    boxes = torch.tensor([[[1 / 3, 0.5, 0.2, 0.4]]])
    records = detections_from_outputs(logits, boxes, image_ids=[4], image_sizes=[(90, 70)])
    best = max(records, key=lambda r: r["score"])
    assert best["bbox"] == [16.333, 27.0, 14.0, 36.0] and best["score"] == 0.952574
