"""`Detector` end to end on a small random model, against transformers' object-detection pipeline."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from lwdetr.config import preset_config
from lwdetr.detector import Detection, Detector, Prediction
from lwdetr.draw import class_colour, draw_detections
from lwdetr.images import ImageLoadError
from lwdetr.processing import LwDetrImageProcessor

LABELS = {0: "cat", 1: "dog", 2: "bird"}
SIZES = [(300, 400), (256, 256), (500, 200), (97, 131)]
THRESHOLD = 0.5

# transformers' deformable attention warns about non-power-of-two head sizes of the tiny test model.
pytestmark = pytest.mark.filterwarnings("ignore:You'd better set embed_dim")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A nano LW-DETR saved by transformers, its class head shifted so that a few detections pass 0.5."""
    folder = tmp_path_factory.mktemp("model")
    config = preset_config("nano", num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    torch.manual_seed(0)
    model = transformers.LwDetrForObjectDetection(config).eval()
    processor = LwDetrImageProcessor(size={"height": 256, "width": 256})
    with torch.no_grad():
        model.class_embed.weight.normal_(0, 0.1)
        model.bbox_embed.layers[-1].weight.normal_(0, 0.05)  # varied boxes, not the anchors themselves
        logits = model(**processor(_images(folder))).logits
        model.class_embed.bias.sub_(torch.quantile(logits.flatten(), 0.97))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _images(folder: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index, (height, width) in enumerate(SIZES):
        path = folder / f"image{index}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def detector(model_dir: Path) -> Detector:
    return Detector.from_pretrained(model_dir, device="auto")


def test_matches_transformers_pipeline(detector: Detector, model_dir: Path) -> None:
    paths = _images(model_dir)
    ours = detector.predict(paths, threshold=THRESHOLD, batch_size=3)
    pipe = transformers.pipeline("object-detection", model=str(model_dir), device="cpu")
    theirs = pipe([str(p) for p in paths], threshold=THRESHOLD)
    assert sum(len(r) for r in theirs) >= 8, "the random model should detect something"
    for mine, reference in zip(ours, theirs):
        assert [d.label for d in mine] == [r["label"] for r in reference]
        for detection, expected in zip(mine, reference):
            assert abs(detection.score - expected["score"]) < 1e-3
            # The pipeline truncates boxes to integers; ours keep their fractions.
            expected_box = [expected["box"][key] for key in ("xmin", "ymin", "xmax", "ymax")]
            assert max(abs(a - b) for a, b in zip(detection.box, expected_box)) < 1.0


def test_boxes_match_reference_floats(detector: Detector, model_dir: Path) -> None:
    """Exact float boxes: transformers' model, processor and post-processing against ours, within 0.5 px."""
    paths = _images(model_dir)
    reference_model = transformers.LwDetrForObjectDetection.from_pretrained(model_dir).eval()
    reference_processor = transformers.AutoImageProcessor.from_pretrained(model_dir)
    pictures = [Image.open(p).convert("RGB") for p in paths]
    with torch.no_grad():
        outputs = reference_model(**reference_processor(pictures, return_tensors="pt"))
    expected = reference_processor.post_process_object_detection(outputs, THRESHOLD, [(h, w) for h, w in SIZES])
    worst_box = worst_score = 0.0
    for mine, reference in zip(detector.predict(paths, threshold=THRESHOLD), expected):
        assert [d.label_id for d in mine] == reference["labels"].tolist()
        if mine:
            boxes = torch.tensor([d.box for d in mine])
            worst_box = max(worst_box, (boxes - reference["boxes"]).abs().max().item())
            scores = torch.tensor([d.score for d in mine])
            worst_score = max(worst_score, (scores - reference["scores"]).abs().max().item())
    assert worst_box < 0.5 and worst_score < 1e-3


def test_single_image_and_input_kinds(detector: Detector, model_dir: Path) -> None:
    path = _images(model_dir)[0]
    from_path = detector.predict(path, threshold=THRESHOLD)
    assert isinstance(from_path, list) and all(isinstance(d, Detection) for d in from_path)
    assert from_path and all(d.label in LABELS.values() and d.score > THRESHOLD for d in from_path)
    image = Image.open(path)
    for source in (str(path), image, np.asarray(image), path.read_bytes()):
        assert detector(source, threshold=THRESHOLD) == from_path
    assert detector.predict([path], threshold=THRESHOLD) == [from_path]


def test_batch_size_and_max_detections(detector: Detector, model_dir: Path) -> None:
    paths = _images(model_dir)
    one_by_one = detector.predict(paths, threshold=THRESHOLD, batch_size=1)
    together = detector.predict(paths, threshold=THRESHOLD, batch_size=8)
    for a, b in zip(one_by_one, together):
        assert [d.label_id for d in a] == [d.label_id for d in b]
        assert all(abs(x.score - y.score) < 1e-5 for x, y in zip(a, b))
    capped = detector.predict(paths, threshold=0.0, max_detections=7)
    assert [len(d) for d in capped] == [7] * len(paths)
    assert all(d[0].score >= d[-1].score for d in capped)


def test_bad_items_do_not_stop_the_others(detector: Detector, model_dir: Path, tmp_path: Path) -> None:
    good = _images(model_dir)[:2]
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    inputs = [good[0], empty, tmp_path / "missing.png", good[1]]
    expected = detector.predict(good, threshold=THRESHOLD)

    with pytest.raises(ImageLoadError, match="empty.jpg: file is empty"):
        detector.predict(inputs, threshold=THRESHOLD)
    results = detector.predict(inputs, threshold=THRESHOLD, on_error="none")
    assert results == [expected[0], None, None, expected[1]]

    records = list(detector.predict_many(inputs, threshold=THRESHOLD, batch_size=2))
    assert [r.index for r in records] == [0, 1, 2, 3]
    assert all(isinstance(r, Prediction) for r in records)
    assert [r.error is None for r in records] == [True, False, False, True]
    assert "missing.png: no such file" in str(records[2].error)
    assert records[0].detections == expected[0] and records[0].size == SIZES[0]
    with pytest.raises(ImageLoadError):
        detector.predict(empty)  # a single bad image always raises


@contextlib.contextmanager
def _fifo(path: Path) -> Iterator[Path]:
    """A FIFO at `path`. Whenever anything opens it for reading and waits for a writer, a helper thread writes
    nothing and closes, so that the reader sees an empty file instead of hanging the test."""
    os.mkfifo(path)
    done = threading.Event()

    def unblock_readers() -> None:
        while not done.is_set():
            open(path, "wb").close()  # returns once a reader has opened the FIFO

    helper = threading.Thread(target=unblock_readers, daemon=True)
    helper.start()
    try:
        yield path
    finally:
        done.set()
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # release the helper's last open()
        helper.join(timeout=30)


def test_hostile_files_in_a_batch_cost_only_their_own_results(
    detector: Detector, model_dir: Path, tmp_path: Path
) -> None:
    good = _images(model_dir)[:2]
    expected = detector.predict(good, threshold=THRESHOLD)
    sparse = tmp_path / "huge.jpg"
    with open(sparse, "wb") as file:  # 300 MiB of holes, above the 256 MiB default limit, using no disk space
        file.write(b"\xff\xd8\xff\xe0")
        file.truncate(300 * 2**20)
    eps = tmp_path / "eps.jpg"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n")
    with _fifo(tmp_path / "pipe.jpg") as fifo:
        inputs = [good[0], sparse, fifo, eps, good[1]]
        assert detector.predict(inputs, threshold=THRESHOLD, on_error="none") == [
            expected[0],
            None,
            None,
            None,
            expected[1],
        ]
        records = list(detector.predict_many(inputs, threshold=THRESHOLD, batch_size=2))
    errors = [str(r.error) for r in records[1:4]]
    assert f"{sparse}: file is 314,572,800 bytes, more than the limit of 268,435,456" in errors[0]
    assert errors[1] == f"{fifo}: not a regular file (a FIFO, socket or device), refused"
    assert errors[2].startswith(f"{eps}: not a recognised image file")
    assert [r.detections for r in records] == [expected[0], None, None, None, expected[1]]


def test_an_image_the_model_cannot_take_costs_only_its_own_result(detector: Detector) -> None:
    # With this resize rule a 1-pixel-high strip resizes to 0 rows, which Pillow refuses: in a batch with others.
    processor = LwDetrImageProcessor(size={"shortest_edge": 256, "longest_edge": 512})
    strict = Detector(detector.model, processor, device="cpu")
    good = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (200, 300), (30, 30, 200))]
    expected = [
        strict.predict(image, threshold=0.0, max_detections=3) for image in good
    ]  # the fallback runs each alone
    results = list(
        strict.predict_many([good[0], np.zeros((1, 4000, 3), np.uint8), good[1]], threshold=0.0, max_detections=3)
    )
    assert [r.detections for r in results] == [expected[0], None, expected[1]]
    assert str(results[1].error).startswith("<array>: the model cannot run on this image (ValueError: ")
    assert results[1].image is None and results[1].size is None


def test_attributes_and_injected_reference_model(detector: Detector, model_dir: Path) -> None:
    assert detector.id2label == LABELS
    assert detector.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert detector.processor.size == {"height": 256, "width": 256}
    assert not detector.model.training
    # The same interface works with transformers' model plugged in.
    reference = transformers.LwDetrForObjectDetection.from_pretrained(model_dir)
    swapped = Detector(reference, detector.processor, device="cpu")
    paths = _images(model_dir)
    for a, b in zip(swapped.predict(paths, threshold=THRESHOLD), detector.predict(paths, threshold=THRESHOLD)):
        assert [d.label_id for d in a] == [d.label_id for d in b]
        assert all(np.allclose(x.box, y.box, atol=1e-2) for x, y in zip(a, b))


def test_float64_model(model_dir: Path) -> None:
    path = _images(model_dir)[1]
    double = Detector.from_pretrained(model_dir, device="cpu", dtype="float64")
    single = Detector.from_pretrained(model_dir, device="cpu")
    assert next(double.model.parameters()).dtype == torch.float64
    a, b = double.predict(path, threshold=THRESHOLD), single.predict(path, threshold=THRESHOLD)
    assert [d.label_id for d in a] == [d.label_id for d in b]
    assert all(abs(x.score - y.score) < 1e-4 for x, y in zip(a, b))


def test_detection_is_a_frozen_record() -> None:
    detection = Detection(2, "bird", 0.75, (10.0, 20.0, 40.0, 60.0))
    assert detection.xywh == (10.0, 20.0, 30.0, 40.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        detection.score = 1.0  # type: ignore[misc]


def test_draw_detections() -> None:
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    detections = [Detection(0, "cat", 0.9, (20.0, 30.0, 120.0, 90.0)), Detection(13, "x", 0.6, (150, 0, 199, 99))]
    drawn = draw_detections(image, detections)
    assert drawn.size == image.size and drawn is not image
    assert image.getpixel((20, 60)) == (255, 255, 255)  # the input is left alone
    assert drawn.getpixel((20, 60)) == class_colour(0)  # left edge of the first box
    assert drawn.getpixel((199, 60)) == class_colour(13)
    assert class_colour(0) != class_colour(1) and class_colour(0) != class_colour(12)
    assert draw_detections(Image.new("L", (10, 10)), []).mode == "RGB"
