"""The data layer of finetune/: discovery, validation report, safe zips, HF datasets, transforms, synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import stat
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from shared_data import microcontrollers_dataset

from finetune.archive import safe_extract_zip
from finetune.data import DataError, load_detection_data, train_targets
from finetune.synthetic import make_synthetic_dataset
from finetune.transforms import (
    DetectionDataset,
    PreprocessCollate,
    build_train_transform,
    check_image_size,
    multiscale_sizes,
)
from lwdetr.processing import square_processor


@pytest.fixture
def microcontrollers() -> Path:
    return microcontrollers_dataset()


# ----------------------------------------------------------------------------------------------------- helpers


def write_image(path: Path, width: int = 64, height: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 120, 150)).save(path)


def write_coco(path: Path, images: list[dict], annotations: list[dict], categories: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def annotation(ann_id: int, image_id: int, bbox: list[float], category_id: int = 1, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox, "iscrowd": iscrowd}


def plain_coco(folder: Path, num_images: int, image_dir: str = "images", first_id: int = 0) -> Path:
    """A plain COCO layout: `annotations.json` beside an `images/` folder, one box per image."""
    images, annotations = [], []
    for i in range(first_id, first_id + num_images):
        write_image(folder / image_dir / f"im{i}.png")
        images.append({"id": i, "file_name": f"im{i}.png", "width": 64, "height": 48})
        annotations.append(annotation(i, i, [4, 4, 20, 20], category_id=1 + i % 2))
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    return write_coco(folder / "annotations.json", images, annotations, categories)


def coco_ap(gt: dict, detections: list[dict]) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluator = COCOeval(coco, coco.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=24, num_val=6, num_test=4, image_size=96, image_format="png"
    )


# ------------------------------------------------------------------------------------------ the real dataset A


def test_microcontrollers_ingest_with_an_accurate_report(microcontrollers: Path):
    data = load_detection_data(microcontrollers)
    report = data.report
    assert [len(data.train), len(data.val), len(data.test)] == [120, 15, 15]
    assert [report.splits[s].annotations for s in ("train", "val", "test")] == [144, 16, 19]
    assert data.id2label == {0: "Arduino", 1: "Arduino_Nano", 2: "ESP8266", 3: "Heltec", 4: "Raspberry"}
    assert data.category_to_label == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}
    assert data.label2id["Raspberry"] == 4
    assert report.splits["train"].class_counts == {
        "Arduino": 38, "Arduino_Nano": 1, "ESP8266": 37, "Heltec": 36, "Raspberry": 32
    }  # fmt: skip
    assert report.splits["val"].class_counts["Arduino_Nano"] == 0
    assert report.splits["test"].class_counts["Raspberry"] == 7
    assert report.dropped_categories == ["0 'microcontroller'"]
    assert all(split.problems.is_empty() for split in report.splits.values())
    assert all(split.negatives == 0 and split.crowd == 0 for split in report.splits.values())
    assert any("Arduino_Nano" in warning for warning in report.warnings)
    json.dumps(report.to_dict())
    text = report.to_text()
    assert "train     120    144" in text and "Problems: none" in text

    record = data.train[0]
    assert (record.width, record.height) == (800, 600)
    assert record.boxes.dtype == np.float32 and record.labels.dtype == np.int64 and record.iscrowd.dtype == bool


def test_coco_ground_truth_scores_one_against_itself(microcontrollers: Path):
    data = load_detection_data(microcontrollers)
    for split in (data.train, data.val, data.test):
        gt = split.to_coco_gt()
        assert min(a["id"] for a in gt["annotations"]) == 1  # the id-0 quirk
        assert [c["id"] for c in gt["categories"]] == [0, 1, 2, 3, 4]
        detections = [
            {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
            for a in gt["annotations"]
        ]
        assert coco_ap(gt, detections) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------- layouts and splits


def test_plain_coco_json_holds_out_a_reproducible_validation_split(tmp_path):
    json_path = plain_coco(tmp_path / "coco", 40)
    first = load_detection_data(json_path, seed=3)
    again = load_detection_data(json_path, seed=3)
    other = load_detection_data(json_path, seed=4)
    val_ids = [r.image_id for r in first.val]
    assert len(first.val) == 6 and len(first.train) == 34  # 15 % of 40
    assert val_ids == [r.image_id for r in again.val]
    assert val_ids != [r.image_id for r in other.val]
    assert not set(val_ids) & {r.image_id for r in first.train}
    assert first.test is None
    assert any("held out" in note for note in first.report.notes)

    folder = load_detection_data(tmp_path / "coco", seed=3)  # a folder with exactly one json
    assert [r.image_id for r in folder.val] == val_ids


@pytest.mark.parametrize(("fraction", "expected"), [(0.01, 4), (0.15, 6), (0.9, 8)])
def test_val_fraction_is_clamped_to_10_to_20_percent(tmp_path, fraction, expected):
    data = load_detection_data(plain_coco(tmp_path, 40), val_fraction=fraction)
    assert len(data.val) == expected


def test_plain_coco_with_separate_val_data(tmp_path):
    train_json = plain_coco(tmp_path / "train", 10)
    val_json = plain_coco(tmp_path / "val", 3, first_id=100)
    data = load_detection_data(train_json, val_data=val_json)
    assert len(data.train) == 10
    assert sorted(r.image_id for r in data.val) == [100, 101, 102]


def test_image_files_are_found_by_the_documented_rule(tmp_path):
    write_image(tmp_path / "beside.png")
    write_image(tmp_path / "images" / "under_images.png")
    write_image(tmp_path / "sub" / "nested.png")
    write_image(tmp_path / "images" / "basename_only.png")
    names = ["beside.png", "under_images.png", "sub/nested.png", "elsewhere/basename_only.png", "sub\\nested.png"]
    images = [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name in enumerate(names)]
    annotations = [annotation(i, i, [1, 1, 10, 10]) for i in range(len(names))]
    json_path = write_coco(tmp_path / "coco.json", images, annotations, [{"id": 1, "name": "thing"}])
    data = load_detection_data(json_path, val_data=json_path)
    assert data.report.splits["train"].problems.missing_images == []
    assert len(data.train) == len(names)


def test_roboflow_export_with_val_folder_alias(shapes_dir, tmp_path):
    copy = tmp_path / "export"
    shutil.copytree(shapes_dir, copy)
    (copy / "valid").rename(copy / "val")
    data = load_detection_data(copy)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 4)
    assert data.id2label == {0: "circle", 1: "square", 2: "triangle"}


# ----------------------------------------------------------------------------------------------------- zips


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(zip_path, "w") as archive:
        for path in sorted(folder.rglob("*")):
            archive.write(path, prefix + path.relative_to(folder).as_posix())
    return zip_path


def test_zipped_dataset_loads_and_extraction_is_reused(shapes_dir, tmp_path):
    zip_path = zip_folder(shapes_dir, tmp_path / "shapes.zip", prefix="shapes/")
    work = tmp_path / "work"
    data = load_detection_data(zip_path, work_dir=work)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 4)
    assert data.train[0].path.is_relative_to(work)
    again = load_detection_data(zip_path, work_dir=work)
    assert again.train[0].path == data.train[0].path
    assert len(list((work / "extracted").iterdir())) == 1

    flat = zip_folder(shapes_dir, tmp_path / "flat.zip")  # no top-level folder, no work_dir: a temporary folder
    assert len(load_detection_data(flat).train) == 24


def make_zip(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for info, payload in entries:
            archive.writestr(info, payload)
    return path


def symlink_entry() -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("data/link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def lying_zip(path: Path) -> Path:
    """An entry declaring 10 uncompressed bytes that really holds 100,000."""
    make_zip(path, [("data/big.bin", bytes(100_000))])
    raw = bytearray(path.read_bytes())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 22 : local + 26] = (10).to_bytes(4, "little")
    raw[central + 24 : central + 28] = (10).to_bytes(4, "little")
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("case", "limits", "needle"),
    [
        ("dotdot", {}, "'..'"),
        ("absolute", {}, "absolute"),
        ("symlink", {}, "symbolic link"),
        ("backslash", {}, "backslash"),
        ("drive", {}, "drive letter"),
        ("too_many_files", {"max_files": 3}, "entries"),
        ("too_many_bytes", {"max_total_bytes": 1000}, "limit"),
        ("lying_header", {"max_total_bytes": 1000}, "big.bin"),
    ],
)
def test_unsafe_zips_are_refused_and_leave_nothing_behind(tmp_path, case, limits, needle):
    good = ("data/ok.txt", b"fine")
    entries = {
        "dotdot": [good, ("data/../../evil.txt", b"x")],
        "absolute": [good, ("/tmp/evil.txt", b"x")],
        "symlink": [good, (symlink_entry(), b"/etc/passwd")],
        "backslash": [good, ("data\\..\\evil.txt", b"x")],
        "drive": [good, ("C:/evil.txt", b"x")],
        "too_many_files": [(f"data/{i}.txt", b"x") for i in range(5)],
        "too_many_bytes": [good, ("data/big.bin", bytes(5000))],
    }
    zip_path = tmp_path / f"{case}.zip"
    lying_zip(zip_path) if case == "lying_header" else make_zip(zip_path, entries[case])
    out = tmp_path / "out"
    with pytest.raises(DataError) as caught:
        safe_extract_zip(zip_path, out / "dataset", **limits)
    message = str(caught.value)
    assert "\n" not in message and str(zip_path) in message and needle in message
    assert not out.exists() or list(out.iterdir()) == []
    assert not (tmp_path / "evil.txt").exists()


def test_safe_zip_returns_the_single_top_folder(tmp_path):
    zip_path = make_zip(tmp_path / "one.zip", [("top/a.txt", b"a"), ("top/sub/b.txt", b"b")])
    root = safe_extract_zip(zip_path, tmp_path / "out")
    assert root == tmp_path / "out" / "top" and (root / "sub" / "b.txt").read_bytes() == b"b"
    with pytest.raises(DataError, match="exists"):
        safe_extract_zip(zip_path, tmp_path / "out")


# --------------------------------------------------------------------------------------------------- problems


@pytest.fixture()
def problem_dataset(tmp_path) -> Path:
    """One image per problem, plus two good ones; 'problems.json' beside the images."""
    for name in ("good.png", "good2.png", "clip.png", "crowd.png", "empty.png", "sized.png"):
        write_image(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.new("RGB", (64, 48)).save(tmp_path / "rotated.jpg", exif=exif)
    names = ["good.png", "good2.png", "clip.png", "crowd.png", "empty.png", "sized.png", "missing.png", "broken.png"]
    names.append("rotated.jpg")
    images = [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name in enumerate(names)]
    images[5].update(width=640, height=480)  # the file is 64x48
    annotations = [
        annotation(0, 0, [2, 2, 20, 20]),
        annotation(1, 1, [5, 5, 10, 10], category_id=2),
        annotation(2, 0, [10, 10, 0, 5]),  # zero width
        annotation(3, 1, [10, 10, 5, -3]),  # negative height
        annotation(4, 2, [50, 40, 30, 30]),  # partly outside: clipped to 14 x 8
        annotation(5, 2, [100, 100, 5, 5]),  # entirely outside: dropped
        annotation(6, 3, [1, 1, 30, 30], iscrowd=1),
        annotation(7, 3, [30, 10, 10, 10]),
        annotation(8, 99, [1, 1, 5, 5]),  # unknown image
        annotation(9, 0, [1, 1, 5, 5], category_id=7),  # unknown category
        annotation(10, 6, [1, 1, 5, 5]),  # of the missing image
        annotation(11, 0, [1, 1, "x", 5]),  # malformed
        annotation(12, 5, [1, 1, 10, 10]),
        annotation(13, 8, [1, 1, 10, 10]),
    ]
    categories = [{"id": 0, "name": "super"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    write_coco(tmp_path / "problems.json", images, annotations, categories)
    return tmp_path / "problems.json"


def test_each_data_problem_is_fixed_and_reported(problem_dataset):
    data = load_detection_data(problem_dataset, val_data=problem_dataset)
    train = data.report.splits["train"]
    problems = train.problems
    assert problems.missing_images == ["missing.png"]
    assert problems.unreadable_images == ["broken.png"]
    assert problems.size_mismatches == ["sized.png: json 640x480, file 64x48"]
    assert problems.exif_rotated == ["rotated.jpg"]
    assert len(problems.degenerate_boxes) == 2 and "good.png (annotation 2)" in problems.degenerate_boxes[0]
    assert len(problems.outside_boxes) == 1 and "annotation 5" in problems.outside_boxes[0]
    assert len(problems.malformed_boxes) == 1
    assert problems.clipped_boxes == 1
    assert problems.unknown_image_annotations == 1
    assert problems.unknown_category_annotations == 1
    assert problems.skipped_image_annotations == 1
    assert (train.images, train.annotations, train.crowd, train.negatives) == (7, 7, 1, 1)
    assert data.report.dropped_categories == ["0 'super'"]

    records = {r.file_name: r for r in data.train}
    assert set(records) == {"good.png", "good2.png", "clip.png", "crowd.png", "empty.png", "sized.png", "rotated.jpg"}
    np.testing.assert_allclose(records["clip.png"].boxes, [[50, 40, 14, 8]])
    assert (records["sized.png"].width, records["sized.png"].height) == (64, 48)
    assert len(records["empty.png"].boxes) == 0
    crowd = records["crowd.png"]
    assert crowd.iscrowd.tolist() == [True, False]
    assert train_targets(crowd)[0].tolist() == [[30, 10, 10, 10]]
    gt = data.val.to_coco_gt()
    assert sorted(a["iscrowd"] for a in gt["annotations"]) == [0, 0, 0, 0, 0, 0, 1]

    json.dumps(data.report.to_dict())
    text = data.report.to_text()
    for phrase in (
        "1 missing image, skipped: missing.png",
        "1 image with an EXIF orientation tag",
        "1 unreadable image, skipped: broken.png",
        "2 boxes with width or height <= 0, dropped",
        "1 box entirely outside the image, dropped",
        "1 box partly outside the image, clipped",
        "1 crowd annotation, used in evaluation only",
        "1 image without boxes, kept as negatives",
        "1 annotation with an unknown category_id, dropped",
        "1 annotation with an unknown image_id, dropped",
    ):
        assert phrase in text, phrase


def test_nothing_usable_is_one_clear_error(tmp_path):
    images = [{"id": 0, "file_name": "gone.png", "width": 64, "height": 48}]
    json_path = write_coco(tmp_path / "c.json", images, [annotation(0, 0, [1, 1, 5, 5])], [{"id": 1, "name": "a"}])
    with pytest.raises(DataError, match="no usable training data") as caught:
        load_detection_data(json_path)
    assert "1 missing images" in str(caught.value) and "\n" not in str(caught.value)


def test_non_contiguous_category_ids_map_to_contiguous_labels(tmp_path):
    images, annotations = [], []
    for i, category in enumerate([42, 3, 17, 3]):
        write_image(tmp_path / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 48})
        annotations.append(annotation(i, i, [1, 1, 9, 9], category_id=category))
    categories = [{"id": 42, "name": "z"}, {"id": 3, "name": "x"}, {"id": 17, "name": "y"}, {"id": 5, "name": "no"}]
    json_path = write_coco(tmp_path / "c.json", images, annotations, categories)
    data = load_detection_data(json_path, val_data=json_path)
    assert data.category_to_label == {3: 0, 17: 1, 42: 2}
    assert data.id2label == {0: "x", 1: "y", 2: "z"}
    assert [r.labels.tolist() for r in data.train] == [[2], [0], [1], [0]]
    assert [c["id"] for c in data.train.to_coco_gt()["categories"]] == [0, 1, 2]
    assert data.report.dropped_categories == ["5 'no'"]


def test_conflicting_category_names_across_splits_are_an_error(tmp_path):
    train_json = plain_coco(tmp_path / "train", 3)
    val_json = plain_coco(tmp_path / "val", 2)
    coco = json.loads(val_json.read_text())
    coco["categories"][0]["name"] = "renamed"
    val_json.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="'renamed' here but 'a'"):
        load_detection_data(train_json, val_data=val_json)


# ------------------------------------------------------------------------------------------ Hugging Face datasets


def hf_split(names: list[str], count: int, objects_as_list: bool):
    from datasets import ClassLabel, Dataset, Features, List, Value
    from datasets import Image as HFImage

    box = List(Value("float32"), length=4)
    if objects_as_list:
        objects = List({"bbox": box, "category": ClassLabel(names=names)})
        rows = [[{"bbox": [2.0, 3.0, 10.0, 12.0], "category": i % 2}] for i in range(count)]
    else:
        objects = {"bbox": List(box), "category": List(ClassLabel(names=names))}
        rows = [{"bbox": [[2.0, 3.0, 10.0, 12.0]], "category": [i % 2]} for i in range(count)]
    features = Features({"image_id": Value("int64"), "image": HFImage(), "objects": objects})
    images = [Image.new("RGB", (40, 30), (i * 10, 50, 90)) for i in range(count)]
    return Dataset.from_dict({"image_id": list(range(count)), "image": images, "objects": rows}, features=features)


@pytest.mark.parametrize("objects_as_list", [False, True])
def test_hugging_face_saved_dataset_folder_loads(tmp_path, objects_as_list):
    from datasets import DatasetDict

    names = ["cat", "dog", "unused"]
    folder = tmp_path / "hf"
    dataset = DatasetDict({"train": hf_split(names, 6, objects_as_list), "validation": hf_split(names, 2, False)})
    dataset.save_to_disk(str(folder))
    data = load_detection_data(folder, work_dir=tmp_path / "work")
    assert (len(data.train), len(data.val), data.test) == (6, 2, None)
    assert data.id2label == {0: "cat", 1: "dog"}
    assert data.report.dropped_categories == ["2 'unused'"]
    assert data.train[1].labels.tolist() == [1] and data.train[0].boxes.tolist() == [[2, 3, 10, 12]]
    assert (data.train[0].width, data.train[0].height) == (40, 30)


def test_hugging_face_single_dataset_gets_a_held_out_split(tmp_path):
    hf_split(["cat", "dog"], 10, False).save_to_disk(str(tmp_path / "hf"))
    data = load_detection_data(tmp_path / "hf", work_dir=tmp_path / "work")
    assert (len(data.train), len(data.val)) == (8, 2)


def test_hub_id_fails_fast_offline(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    started = time.monotonic()
    with pytest.raises(DataError, match="no-such-dataset"):
        load_detection_data("nobody-here/no-such-dataset")
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------------- transforms


def test_sizes_are_multiples_of_the_divisor():
    assert multiscale_sizes(640, 64) == [448, 512, 576, 640, 704, 768, 832, 896]
    assert all(size % 32 == 0 for size in multiscale_sizes(256, 32))
    with pytest.raises(ValueError, match="multiple"):
        check_image_size(300, 32)
    with pytest.raises(ValueError, match="multiple"):
        PreprocessCollate([64, 80], size_divisor=32)


def assert_valid_target(target: dict) -> None:
    boxes = target["boxes"]
    assert boxes.dtype == torch.float32 and target["class_labels"].dtype == torch.int64
    assert boxes.shape == (len(target["class_labels"]), 4)
    assert ((boxes >= 0) & (boxes <= 1)).all() and (boxes[:, 2:] > 0).all()
    # cxcywh: the box's edges stay inside the image
    assert (boxes[:, :2] - boxes[:, 2:] / 2 >= -1e-5).all() and (boxes[:, :2] + boxes[:, 2:] / 2 <= 1 + 1e-5).all()


def test_train_items_are_valid_reproducible_and_vary_by_epoch(shapes_dir):
    data = load_detection_data(shapes_dir)
    dataset = DetectionDataset(data.train, build_train_transform(), train=True, seed=1)
    image, target = dataset[2]
    assert image.mode == "RGB" and image.width <= 96 and image.height <= 96  # cropped at most, never resized
    assert target["orig_size"] == (96, 96) and target["image_id"] == data.train[2].image_id
    for index in range(len(dataset)):
        assert_valid_target(dataset[index][1])
    assert np.array_equal(np.asarray(dataset[2][0]), np.asarray(image))
    changed = []
    for epoch in range(1, 4):
        dataset.set_epoch(epoch)
        changed.append(not np.array_equal(np.asarray(dataset[2][0]), np.asarray(image)))
    assert any(changed)


def test_eval_items_scale_boxes_exactly(shapes_dir):
    data = load_detection_data(shapes_dir)
    dataset = DetectionDataset(data.val, train=False)
    image, target = dataset[0]
    record = data.val[0]
    assert np.array_equal(np.asarray(image), np.asarray(record.load_image()))  # the decoded image, untouched
    x, y, w, h = record.boxes.T
    expected = np.stack([(x + w / 2) / 96, (y + h / 2) / 96, w / 96, h / 96], axis=1)
    np.testing.assert_allclose(target["boxes"].numpy(), expected, atol=1e-5)
    assert target["class_labels"].tolist() == record.labels.tolist()
    pixel_values, pixel_mask, targets = PreprocessCollate([64])([dataset[0], dataset[1]])
    assert pixel_values.shape == (2, 3, 64, 64) and bool(pixel_mask.all()) and targets[0] is not None
    assert -2.5 < pixel_values.mean().item() < 2.5  # normalised, not raw 0..255


def test_multiscale_batches_share_one_size_resized_once_by_the_processor(shapes_dir):
    data = load_detection_data(shapes_dir)
    sizes = multiscale_sizes(96, 32, min_scale=0.6, max_scale=1.4)
    dataset = DetectionDataset(data.train, build_train_transform(), train=True)
    collate = PreprocessCollate(sizes, seed=0, size_divisor=32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, shuffle=False, collate_fn=collate)
    seen = set()
    for start, (pixel_values, pixel_mask, targets) in zip(range(0, len(dataset), 4), loader):
        batch, _, height, width = pixel_values.shape
        assert height == width and height in sizes and height % 32 == 0
        assert pixel_mask.shape == (batch, height, width) and pixel_mask.dtype == torch.int64
        assert bool(pixel_mask.all()) and len(targets) == batch
        assert height == collate.choose_size([t["image_id"] for t in targets])
        # one resize, from the augmented image to the batch's size, by the processor inference uses
        items = [dataset[i][0] for i in range(start, start + batch)]
        assert torch.equal(pixel_values, square_processor(height).process_loaded(items)["pixel_values"])
        seen.add(height)
    assert len(seen) > 1


# ------------------------------------------------------------------------------------------------------ synthetic


def test_synthetic_dataset_is_deterministic(tmp_path):
    first = make_synthetic_dataset(tmp_path / "a", num_train=5, num_val=2, seed=7)
    second = make_synthetic_dataset(tmp_path / "b", num_train=5, num_val=2, seed=7)
    other = make_synthetic_dataset(tmp_path / "c", num_train=5, num_val=2, seed=8)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert len(files) == 9
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)
    assert (first / "train" / "train_00000.jpg").read_bytes() != (other / "train" / "train_00000.jpg").read_bytes()


def test_synthetic_boxes_match_the_drawn_shapes(shapes_dir):
    coco = json.loads((shapes_dir / "train" / "_annotations.coco.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["shapes", "circle", "square", "triangle"]
    by_image = {image["id"]: image for image in coco["images"]}
    for ann in coco["annotations"]:
        pixels = np.asarray(Image.open(shapes_dir / "train" / by_image[ann["image_id"]]["file_name"]))
        rows, cols = np.nonzero((pixels == ann["color"]).all(axis=2))
        x, y, w, h = ann["bbox"]
        assert [cols.min(), rows.min(), cols.max() + 1 - cols.min(), rows.max() + 1 - rows.min()] == [x, y, w, h]
        assert 0.15 * 96 - 1 <= max(w, h) <= 0.45 * 96 + 1
