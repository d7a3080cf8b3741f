"""Hostile datasets (issue 13, data side): paths leading outside, one pixel contract with inference, decoding
checks in the dry run, bad images met during training, and COCO files built to crash the parser."""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from finetune import coco_json
from finetune.__main__ import _one_line
from finetune.__main__ import main as finetune_main
from finetune.data import DataError, load_detection_data
from finetune.pixels import orient_boxes
from finetune.safe_paths import climbs_out, shorten
from finetune.transforms import DetectionDataset, PreprocessCollate
from lwdetr.images import load_image

# ----------------------------------------------------------------------------------------------------- helpers


def write_image(path: Path, size: tuple[int, int] = (64, 48), color=(90, 120, 150)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def noise_image(path: Path, image_format: str, size: tuple[int, int] = (96, 80)) -> Path:
    """A noisy image (so that truncating its file loses pixel data, not just padding)."""
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if image_format == "GIF":
        image = image.convert("P")
    image.save(path, format=image_format)
    return path


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def coco(folder: Path, file_names: list[str], name: str = "annotations.json", **extra) -> Path:
    """A COCO json in `folder` with one 20x20 box per image (category 1)."""
    images = [{"id": i, "file_name": file_name, "width": 64, "height": 48} for i, file_name in enumerate(file_names)]
    annotations = [
        {"id": i + 1, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20], "iscrowd": 0}
        for i in range(len(file_names))
    ]
    content = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}], **extra}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(content))
    return folder / name


_opened: list[str] = []
_recording = [False]


def _audit(event: str, args: tuple) -> None:
    if _recording[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _opened.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # audit hooks cannot be removed; this one records only while a test asks for it


@pytest.fixture()
def opened() -> list[str]:
    """The paths opened (any `open` audit event) while the test runs."""
    _opened.clear()
    _recording[0] = True
    yield _opened
    _recording[0] = False
    _opened.clear()


# ------------------------------------------------------------------------------ item 2: nothing outside is read


@pytest.fixture()
def outside(tmp_path) -> Path:
    """A folder beside the dataset holding a file an attacker would like to read."""
    write_image(tmp_path / "outside" / "secret.png")
    (tmp_path / "outside" / "sub").mkdir()
    write_image(tmp_path / "outside" / "sub" / "secret2.png")
    return tmp_path / "outside"


def test_image_paths_leading_outside_the_dataset_are_reported_and_never_opened(tmp_path, outside, opened):
    root = tmp_path / "dataset"
    for name in ("good.png", "good2.png", "images/inside.png"):
        write_image(root / name)
    (root / "link_out.png").symlink_to(outside / "secret.png")
    (root / "dir_out").symlink_to(outside / "sub")
    (root / "link_in.png").symlink_to("images/inside.png")  # a symlink staying inside is fine
    long_name = "/" + "x" * 5000 + ".png"
    names = [
        "good.png",
        "good2.png",
        "link_in.png",
        str(outside / "secret.png"),  # absolute, exists
        str(outside / "nothere.png"),  # absolute, does not exist: reported the same way
        "../outside/secret.png",
        "images/../../outside/secret.png",
        "link_out.png",
        "dir_out/secret2.png",
        long_name,
        "C:\\Windows\\win.ini",
    ]
    data = load_detection_data(coco(root, names), val_data=coco(root, ["good.png"], "val.json"))

    assert sorted(r.file_name for r in data.train) == ["good.png", "good2.png", "link_in.png"]
    problems = data.report.splits["train"].problems
    assert problems.missing_images == [] and problems.unreadable_images == []
    assert problems.outside_images[:-2] == names[3:-2]
    assert len(problems.outside_images[-2]) <= 120 and problems.outside_images[-2].startswith("/xxx")
    assert problems.outside_images[-1] == "C:\\Windows\\win.ini"
    text = data.report.to_text(max_listed=20)
    assert "8 images outside the dataset, skipped, not read" in text
    assert "x" * 200 not in text
    assert any(path.endswith("good.png") for path in opened)  # the audit hook does see the images read
    assert not [path for path in opened if str(outside) in path or path.startswith("/x")]


def test_zipped_dataset_naming_a_server_file_is_not_read(tmp_path, outside, opened):
    archive = tmp_path / "upload.zip"
    content = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
            {"id": 2, "file_name": str(outside / "secret.png"), "width": 64, "height": 48},
            {"id": 3, "file_name": "../../../outside/secret.png", "width": 64, "height": 48},
        ],
        "annotations": [
            {"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 10, 10], "iscrowd": 0} for i in (1, 2, 3)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    write_image(tmp_path / "a.png")
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("data/annotations.json", json.dumps(content))
        zipped.write(tmp_path / "a.png", "data/a.png")
    data = load_detection_data(archive, val_data=archive, work_dir=tmp_path / "work")
    assert [r.file_name for r in data.train] == ["a.png"]
    assert len(data.report.splits["train"].problems.outside_images) == 2
    assert not [path for path in opened if str(outside) in path]


def test_hugging_face_dataset_storing_only_paths_reads_nothing_outside_its_folder(tmp_path, outside, opened):
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    saved.mkdir()
    paths = [saved / "inside.png", saved / "inside2.png", outside / "secret.png"]
    for path in paths[:2]:
        write_image(path)
    rows = {
        "image": [{"path": str(path), "bytes": None} for path in paths],
        "objects": [{"bbox": [[2, 2, 10, 10]], "category": [0]}] * 3,
    }
    datasets.Dataset.from_dict(rows).save_to_disk(str(saved))  # a plain {path, bytes} column: paths kept as is
    _opened.clear()
    data = load_detection_data(saved, val_fraction=0.5, work_dir=tmp_path / "work")
    problems = data.report.splits["train"].problems
    assert problems.outside_images == [str(outside / "secret.png")]
    assert sorted(r.file_name for r in [*data.train, *data.val]) == ["000000.png", "000001.png"]
    assert not [path for path in opened if str(outside) in path]


def test_climbs_out_is_decided_on_the_text():
    assert climbs_out("/etc/passwd") and climbs_out("../x.png") and climbs_out("a/../../x.png")
    assert climbs_out("D:\\data\\x.png") and climbs_out("..\\x.png")
    assert not climbs_out("a/../x.png") and not climbs_out("images/x.png") and not climbs_out("./x.png")
    assert shorten("a" * 500) == "a" * 58 + "..." + "a" * 58
    assert shorten("bad\nname") == "bad\\nname"


# --------------------------------------------------------------------- item 6: one pixel contract with inference


def _records_by_name(folder: Path, names: list[str]) -> dict:
    data = load_detection_data(coco(folder, names), val_data=coco(folder, names[:1], "val.json"))
    return {record.file_name: record for record in data.train}


def test_training_decodes_exactly_as_inference(tmp_path):
    deep = np.linspace(0, 65535, 64 * 48, dtype=np.uint16).reshape(48, 64)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit grey
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[:, :32] = (200, 30, 30, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "transparent.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    noise_image(tmp_path / "plain.jpg", "JPEG", (64, 48))
    Image.open(tmp_path / "plain.jpg").save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    records = _records_by_name(tmp_path, ["deep.png", "transparent.png", "rotated.jpg"])
    for name, record in records.items():
        np.testing.assert_array_equal(np.asarray(record.load_image()), np.asarray(load_image(tmp_path / name)), name)
    assert np.asarray(records["deep.png"].load_image()).std() > 50  # not all white
    assert np.asarray(records["transparent.png"].load_image())[0, 63].tolist() == [255, 255, 255]
    assert (records["rotated.jpg"].width, records["rotated.jpg"].height) == (48, 64)  # upright size


def _tagged_image(path: Path, orientation: int, box: tuple[int, int, int, int], size=(60, 40)) -> None:
    """A black PNG of `size` (stored pixels) with a white box (x, y, w, h) and an EXIF orientation tag."""
    pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    x, y, w, h = box
    pixels[y : y + h, x : x + w] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)


def _white_box(image: Image.Image) -> list[float]:
    ys, xs = np.nonzero(np.asarray(image)[:, :, 0] > 127)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_boxes_drawn_on_unrotated_pixels_follow_the_exif_rotation(tmp_path, orientation):
    """json width/height = stored size and the tag turns the image by 90 degrees: the annotator saw the stored
    pixels, so boxes turn with them. Otherwise (same size either way) the boxes are taken as upright."""
    box = (5, 8, 20, 12)
    _tagged_image(tmp_path / "tagged.png", orientation, box)
    images = [{"id": 1, "file_name": "tagged.png", "width": 60, "height": 40}]
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": list(box)}]
    (tmp_path / "a.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    data = load_detection_data(tmp_path / "a.json", val_data=tmp_path / "a.json")
    record = data.train[0]
    expected = _white_box(record.load_image()) if orientation in (1, 5, 6, 7, 8) else list(map(float, box))
    assert record.boxes.tolist() == [expected]
    problems = data.report.splits["train"].problems
    assert problems.stored_frame_boxes == (["tagged.png"] if orientation >= 5 else [])
    assert problems.size_mismatches == []


def test_boxes_of_an_image_annotated_upright_are_kept(tmp_path):
    _tagged_image(tmp_path / "tagged.png", 6, (5, 8, 20, 12))
    upright_box = _white_box(load_image(tmp_path / "tagged.png"))
    images = [{"id": 1, "file_name": "tagged.png", "width": 40, "height": 60}]  # the upright size
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": upright_box}]
    (tmp_path / "a.json").write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})
    )
    data = load_detection_data(tmp_path / "a.json", val_data=tmp_path / "a.json")
    assert data.train[0].boxes.tolist() == [upright_box]
    assert "turned upright as inference does" in data.report.to_text()


def test_orient_boxes_maps_every_orientation_like_the_pixels(tmp_path):
    for orientation in range(1, 9):
        _tagged_image(tmp_path / "t.png", orientation, (7, 3, 11, 25))
        moved = orient_boxes(np.array([[7, 3, 11, 25]], dtype=np.float32), orientation, (60, 40))
        assert moved.tolist() == [_white_box(load_image(tmp_path / "t.png"))], orientation


# -------------------------------------------------------------------- items 5 and 8: decoding checked up front


def test_truncated_tiff_gif_and_bmp_are_unreadable_in_the_dry_run(tmp_path, capsys):
    for name, image_format in (("a.tif", "TIFF"), ("b.gif", "GIF"), ("c.bmp", "BMP"), ("ok.png", "PNG")):
        noise_image(tmp_path / name, image_format)
    for name in ("a.tif", "b.gif", "c.bmp"):
        truncate(tmp_path / name)
    coco(tmp_path, ["a.tif", "b.gif", "c.bmp", "ok.png", "ok.png"])
    code = finetune_main(["--data", str(tmp_path), "--dry-run", "--val-fraction", "0.2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "3 unreadable images, skipped: a.tif; b.gif; c.bmp" in out


def test_training_uses_inference_pixel_limit_without_a_raw_warning(tmp_path, recwarn):
    Image.new("1", (10_000, 10_000)).save(tmp_path / "huge.png")  # 100 M pixels, about 15 KB on disk
    write_image(tmp_path / "small.png")
    data = load_detection_data(
        coco(tmp_path, ["huge.png", "small.png"]), val_data=coco(tmp_path, ["small.png"], "v.json")
    )
    assert data.report.splits["train"].problems.unreadable_images == ["huge.png"]
    assert [r.file_name for r in data.train] == ["small.png"]
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def _two_epochs(dataset: DetectionDataset, num_workers: int) -> list[list[int]]:
    seen = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=2, num_workers=num_workers, collate_fn=PreprocessCollate([64])
        )
        seen.append([target["image_id"] for _, _, targets in loader for target in targets])
    return seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_image_broken_after_validation_is_skipped_and_reported_once(tmp_path, caplog, num_workers):
    names = [f"im{i}.png" for i in range(4)]
    for name in names:
        write_image(tmp_path / name)
    data = load_detection_data(coco(tmp_path, names), val_data=coco(tmp_path, names, "val.json"))
    truncate(tmp_path / "im1.png", 0.3)  # broken after the check
    train = DetectionDataset(data.train, train=True, seed=0)
    with caplog.at_level(logging.WARNING):
        seen = _two_epochs(train, num_workers)
    assert seen == [[0, 2, 2, 3], [0, 2, 2, 3]]  # item 1 replaced by the next decodable image, every time
    assert bool(train._bad[1])  # known to the main process whichever worker met it
    if num_workers == 0:  # workers log in their own process, out of caplog's sight
        assert len(caplog.records) == 1 and caplog.records[0].getMessage().startswith("warning: im1.png: ")
        assert str(tmp_path) not in caplog.text

    val = DetectionDataset(data.val, train=False)
    image, target = val[1]
    assert target["image_id"] == 1 and len(target["boxes"]) == 0 and image.size == (32, 32)


def test_worker_errors_print_as_one_line():
    wrapped = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1\nfinetune.errors.DataError: train split: no image left'
    )
    assert _one_line(wrapped) == "train split: no image left"
    assert _one_line(DataError("a.json: bad")) == "a.json: bad"


# -------------------------------------------------------------------------- item 7: hostile COCO files, no traceback


def _hostile(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_image(folder / "a.png")
    (folder / "a.json").write_text(text)
    return folder / "a.json"


GOOD_IMAGES = [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}]
GOOD = {"images": GOOD_IMAGES, "categories": [{"id": 1, "name": "x"}]}


def _with(**changes) -> str:
    annotations = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}]
    return json.dumps({**GOOD, "annotations": annotations, **changes})


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[" * 20000 + "]" * 20000, "nested too deeply"),
        ('{"images": ' + "[" * 20000 + "]" * 20000 + "}", "nested too deeply"),
        (_with(categories=[{"id": 1, "name": {"a": 1}}]), "malformed category"),
        ('{"images": [{"id": ' + "9" * 5000 + ', "file_name": "a.png"}], "categories": []}', "too many digits"),
    ],
    ids=["deep", "deep-in-images", "category-name-object", "huge-int"],
)
def test_hostile_coco_files_give_one_line_errors(tmp_path, text, needle):
    path = _hostile(tmp_path, text)
    with pytest.raises(DataError) as caught:
        load_detection_data(path, val_data=path)
    message = str(caught.value)
    assert needle in message and "\n" not in message and message.startswith(str(path))
    assert len(message) < 400


def test_hostile_entries_are_skipped_and_reported(tmp_path):
    images = [
        *GOOD_IMAGES,
        {"id": [3], "file_name": "a.png"},  # unhashable id
        {"id": {"x": 1}, "file_name": "a.png"},
        {"id": True, "file_name": "a.png"},  # bool id
        {"id": 1.5, "file_name": "a.png"},
        {"id": 7, "file_name": ["a.png"]},  # not a string
        "not an object",
    ]
    boxes = [[1, 1, 10, 10], "abcd", [[1], 2, 3, 4], {"a": 1}, [1, 1, True, 5], [1, 1, 10**400, 5], [1, "2", 3, 4]]
    annotations = [{"id": i, "image_id": 1, "category_id": 1, "bbox": box} for i, box in enumerate(boxes)]
    annotations += [
        {"id": 20, "image_id": [1], "category_id": 1, "bbox": [1, 1, 5, 5]},  # unhashable image_id
        {"id": 21, "image_id": {"a": 1}, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 22, "image_id": 2, "category_id": [1], "bbox": [1, 1, 5, 5]},  # unhashable category_id
        {"id": 23, "image_id": True, "category_id": 1, "bbox": [1, 1, 5, 5]},
        "oops",
        7,
    ]
    path = _hostile(tmp_path, json.dumps({**GOOD, "images": images, "annotations": annotations}))
    data = load_detection_data(path, val_data=path)
    problems = data.report.splits["train"].problems
    assert len(problems.malformed_images) == 6
    assert len(problems.malformed_boxes) == 6
    assert problems.unknown_image_annotations == 3 and problems.unknown_category_annotations == 1
    assert problems.malformed_annotations == 2
    assert [len(r.boxes) for r in data.train] == [1, 0]
    data.report.to_text()


def test_string_and_numeric_ids_name_the_same_image(tmp_path):
    images = [{"id": "0", "file_name": "a.png"}, {"id": "1", "file_name": "a.png"}, {"id": 2.0, "file_name": "a.png"}]
    annotations = [
        {"id": 1, "image_id": 0, "category_id": "1", "bbox": [1, 1, 10, 10]},
        {"id": 2, "image_id": "1", "category_id": 1, "bbox": [1, 1, 10, 10]},
        {"id": 3, "image_id": "2", "category_id": 1.0, "bbox": [1, 1, 10, 10]},
    ]
    path = _hostile(tmp_path, json.dumps({**GOOD, "images": images, "annotations": annotations}))
    data = load_detection_data(path, val_data=path)
    assert sorted((r.image_id, len(r.boxes)) for r in data.train) == [(0, 1), (1, 1), (2, 1)]
    assert data.report.splits["train"].problems.unknown_image_annotations == 0


def test_annotation_file_sizes_are_bounded(tmp_path, monkeypatch):
    path = _hostile(tmp_path, _with())
    limits = coco_json.CocoLimits(max_bytes=100)
    monkeypatch.setattr(coco_json, "LIMITS", limits)
    with pytest.raises(DataError, match=r"too large \(\d+ bytes, limit 100\)"):
        load_detection_data(path, val_data=path)
    for field, needle in (("max_images", "too many images"), ("max_containers", "too many JSON objects")):
        monkeypatch.setattr(coco_json, "LIMITS", coco_json.CocoLimits(**{field: 1}))
        with pytest.raises(DataError, match=needle):
            load_detection_data(path, val_data=path)
    fifo = tmp_path / "fifo" / "a.json"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        load_detection_data(fifo.parent)


def test_cli_prints_one_line_for_a_hostile_coco_file(tmp_path, capsys):
    path = _hostile(tmp_path, "[" * 20000 + "]" * 20000)
    with warnings.catch_warnings():
        assert finetune_main(["--data", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nested too deeply" in err and "Traceback" not in err
