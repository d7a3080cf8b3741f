"""The examples of transformers' LW-DETR model page and object-detection task guide, run with lwdetr's classes.

Each test is one example as the page writes it, with lwdetr's classes swapped in and three replacements: hub ids by
the bundled `examples/demo_model` (a nano detector of circles, squares and triangles), URLs by a local http server
on 127.0.0.1, and the CPPE-5 dataset by a few synthetic shape images built in memory in CPPE-5's format. Where the
reference can run the same example (transformers' classes on the same folder), the outputs must agree within 1e-4.

Sources: docs/source/en/model_doc/lw_detr.md (Pipeline, AutoModel) and docs/source/en/tasks/object_detection.md
(dataset, augmentation and annotation formatting, image processor with annotations, collate_fn, compute_metrics,
Trainer, evaluate, inference) of huggingface/transformers.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import albumentations as A
import datasets
import numpy as np
import pytest
import requests
import torch
import transformers
from PIL import Image
from transformers.image_transforms import center_to_corners_format

from finetune.synthetic import make_synthetic_dataset
from lwdetr import Detector, LwDetrForObjectDetection, LwDetrImageProcessor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL_NAME = str(EXAMPLES / "demo_model")  # stands in for the hub ids of the pages
IMAGE_SIZE = 128  # the guide's 480, scaled down; the synthetic images are larger, so they get resized

# transformers' deformable attention warns about the head size of the nano model; the guide's Trainer about the
# processing class and non-PreTrainedModel models.
pytestmark = [pytest.mark.filterwarnings("ignore:You'd better set embed_dim"), pytest.mark.filterwarnings("ignore")]


def assert_detections_equal(ours: list[dict], reference: list[dict], tolerance: float = 1e-4) -> None:
    """Post-processed results (one dict of scores, labels, boxes per image) agree within `tolerance`; boxes in
    pixels are compared relative to the image scale."""
    assert len(ours) == len(reference)
    for own, theirs in zip(ours, reference):
        assert torch.equal(own["labels"], theirs["labels"])
        assert torch.allclose(own["scores"], theirs["scores"], atol=tolerance, rtol=0)
        scale = max(theirs["boxes"].abs().max().item(), 1.0)
        assert torch.allclose(own["boxes"] / scale, theirs["boxes"] / scale, atol=tolerance, rtol=0)


# ---------------------------------------------------------------- the model page


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def image_url():
    """The URL of a bundled example image on a local http server (the pages open COCO and Pexels URLs)."""
    handler = functools.partial(_QuietHandler, directory=str(EXAMPLES / "images"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/shapes_1.jpg"
    server.shutdown()
    server.server_close()


def test_model_page_pipeline(image_url):
    # pipeline("object-detection", model=..., device_map=0)(url): lwdetr's Detector, with output="pipeline"
    pipeline = Detector.from_pretrained(MODEL_NAME, device="cpu")
    got = pipeline(image_url, output="pipeline")

    reference = transformers.pipeline("object-detection", model=MODEL_NAME, device="cpu")
    expected = reference(image_url)
    assert len(expected) >= 2, "the demo model should find the shapes of the example image"
    assert [d["label"] for d in got] == [d["label"] for d in expected]
    for own, theirs in zip(got, expected):
        assert abs(own["score"] - theirs["score"]) < 1e-4
        assert own["box"] == theirs["box"]  # whole pixels, as the pipeline gives them


def _model_page_automodel(url: str, processor_class, model_class) -> tuple[list[dict], list[str]]:
    """The page's AutoModel example, with the classes given; returns the results and the printed lines."""
    image = Image.open(requests.get(url, stream=True).raw)

    image_processor = processor_class.from_pretrained(MODEL_NAME)
    model = model_class.from_pretrained(MODEL_NAME, device_map="auto")

    # prepare image for the model
    inputs = image_processor(images=image, return_tensors="pt").to(model.device)

    with torch.no_grad():
        outputs = model(**inputs)

    results = image_processor.post_process_object_detection(
        outputs, target_sizes=torch.tensor([image.size[::-1]]), threshold=0.3
    )

    printed = []
    for result in results:
        for score, label_id, box in zip(result["scores"], result["labels"], result["boxes"]):
            score, label = score.item(), label_id.item()
            box = [round(i, 2) for i in box.tolist()]
            printed.append(f"{model.config.id2label[label]}: {score:.2f} {box}")
    return results, printed


def test_model_page_automodel(image_url):
    results, printed = _model_page_automodel(image_url, LwDetrImageProcessor, LwDetrForObjectDetection)
    expected, expected_printed = _model_page_automodel(
        image_url, transformers.AutoImageProcessor, transformers.AutoModelForObjectDetection
    )
    assert len(printed) >= 2
    assert_detections_equal(results, expected)
    assert [line.split(":")[0] for line in printed] == [line.split(":")[0] for line in expected_printed]


# ---------------------------------------------------------------- the object-detection guide: data


def _cppe5_like(folder: Path) -> datasets.Dataset:
    """A COCO export (`make_synthetic_dataset`) as a `datasets.Dataset` with CPPE-5's columns and features."""
    coco = json.loads((folder / "_annotations.coco.json").read_text())
    names = [c["name"] for c in sorted(coco["categories"], key=lambda c: c["id"]) if c["id"] > 0]  # 0: Roboflow's
    rows = {"image_id": [], "image": [], "width": [], "height": [], "objects": []}
    for info in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"]]
        rows["image_id"].append(info["id"])
        rows["image"].append(Image.open(folder / info["file_name"]))
        rows["width"].append(info["width"])
        rows["height"].append(info["height"])
        rows["objects"].append(
            {
                "id": [a["id"] for a in anns],
                "area": [a["area"] for a in anns],
                "bbox": [a["bbox"] for a in anns],
                "category": [a["category_id"] - 1 for a in anns],
            }
        )
    objects = {
        "id": datasets.List(datasets.Value("int64")),
        "area": datasets.List(datasets.Value("float32")),
        "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
        "category": datasets.List(datasets.ClassLabel(names=names)),
    }
    features = datasets.Features(
        {
            "image_id": datasets.Value("int64"),
            "image": datasets.Image(),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": objects,
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory) -> Path:
    return make_synthetic_dataset(
        tmp_path_factory.mktemp("shapes"), num_train=10, num_val=0, num_test=3, image_size=160, seed=3
    )


def load_cppe5(root: Path) -> datasets.DatasetDict:
    """`load_dataset("cppe-5")` and the guide's validation split."""
    cppe5 = datasets.DatasetDict({"train": _cppe5_like(root / "train"), "test": _cppe5_like(root / "test")})
    if "validation" not in cppe5:
        split = cppe5["train"].train_test_split(0.15, seed=1337)
        cppe5["train"] = split["train"]
        cppe5["validation"] = split["test"]
    return cppe5


def label_maps(cppe5: datasets.DatasetDict) -> tuple[dict[int, str], dict[str, int]]:
    categories = cppe5["train"].features["objects"]["category"].feature.names
    id2label = {index: x for index, x in enumerate(categories, start=0)}
    label2id = {v: k for k, v in id2label.items()}
    return id2label, label2id


def make_image_processor(processor_class):
    MAX_SIZE = IMAGE_SIZE  # noqa: N806 - the guide's name
    return processor_class.from_pretrained(
        MODEL_NAME,
        do_resize=True,
        size={"max_height": MAX_SIZE, "max_width": MAX_SIZE},
        do_pad=True,
        pad_size={"height": MAX_SIZE, "width": MAX_SIZE},
    )


def make_transforms(seed: int | None = None) -> tuple[A.Compose, A.Compose]:
    """The guide's augmentations (a `seed` makes two runs see the same ones)."""
    train_augment_and_transform = A.Compose(
        [
            A.Perspective(p=0.1),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(p=0.5),
            A.HueSaturationValue(p=0.1),
        ],
        bbox_params=A.BboxParams(format="coco", label_fields=["category"], clip=True, min_area=25),
        seed=seed,
    )
    validation_transform = A.Compose(
        [A.NoOp()],
        bbox_params=A.BboxParams(format="coco", label_fields=["category"], clip=True),
    )
    return train_augment_and_transform, validation_transform


def format_image_annotations_as_coco(image_id, categories, areas, bboxes):
    """Format one set of image annotations to the COCO format (the guide's function)."""
    annotations = []
    for category, area, bbox in zip(categories, areas, bboxes):
        formatted_annotation = {
            "image_id": image_id,
            "category_id": category,
            "iscrowd": 0,
            "area": area,
            "bbox": list(bbox),
        }
        annotations.append(formatted_annotation)

    return {
        "image_id": image_id,
        "annotations": annotations,
    }


def augment_and_transform_batch(examples, transform, image_processor, return_pixel_mask=False):
    """Apply augmentations and format annotations in COCO format for object detection task (the guide's)."""
    images = []
    annotations = []
    for image_id, image, objects in zip(examples["image_id"], examples["image"], examples["objects"]):
        image = np.array(image.convert("RGB"))

        # apply augmentations
        output = transform(image=image, bboxes=objects["bbox"], category=objects["category"])
        images.append(output["image"])

        # format annotations in COCO format
        formatted_annotations = format_image_annotations_as_coco(
            image_id, output["category"], objects["area"], output["bboxes"]
        )
        annotations.append(formatted_annotations)

    # Apply the image processor transformations: resizing, rescaling, normalization
    result = image_processor(images=images, annotations=annotations, return_tensors="pt")

    if not return_pixel_mask:
        result.pop("pixel_mask", None)

    return result


def prepared_cppe5(root: Path, image_processor, seed: int | None = None) -> datasets.DatasetDict:
    """The guide's dataset after `with_transform`."""
    cppe5 = load_cppe5(root)
    train_augment_and_transform, validation_transform = make_transforms(seed)
    # Make transform functions for batch and apply for dataset splits
    train_transform_batch = partial(
        augment_and_transform_batch, transform=train_augment_and_transform, image_processor=image_processor
    )
    validation_transform_batch = partial(
        augment_and_transform_batch, transform=validation_transform, image_processor=image_processor
    )
    cppe5["train"] = cppe5["train"].with_transform(train_transform_batch)
    cppe5["validation"] = cppe5["validation"].with_transform(validation_transform_batch)
    cppe5["test"] = cppe5["test"].with_transform(validation_transform_batch)
    return cppe5


def collate_fn(batch):
    data = {}
    data["pixel_values"] = torch.stack([x["pixel_values"] for x in batch])
    data["labels"] = [x["labels"] for x in batch]
    if "pixel_mask" in batch[0]:
        data["pixel_mask"] = torch.stack([x["pixel_mask"] for x in batch])
    return data


def test_guide_dataset_exploration(shapes_data):
    cppe5 = load_cppe5(shapes_data)
    id2label, label2id = label_maps(cppe5)
    assert id2label == {0: "circle", 1: "square", 2: "triangle"} and label2id["triangle"] == 2
    # the demo model (the guide's checkpoint) knows the same classes, so its heads fit without re-initialising
    assert LwDetrForObjectDetection.from_pretrained(MODEL_NAME).config.id2label == id2label
    assert set(cppe5) == {"train", "validation", "test"} and len(cppe5["validation"]) >= 1


def test_guide_image_processor_with_annotations(shapes_data):
    """The guide's preprocessing (augment, format as COCO, the processor with annotations=) gives the reference's
    pixel values and training labels."""
    ours = prepared_cppe5(shapes_data, make_image_processor(LwDetrImageProcessor))
    reference = prepared_cppe5(shapes_data, make_image_processor(transformers.AutoImageProcessor))
    for split in ("validation", "test"):
        for index in range(len(ours[split])):
            got, expected = ours[split][index], reference[split][index]
            assert set(got) == set(expected) == {"pixel_values", "labels"}
            assert got["pixel_values"].shape == (3, IMAGE_SIZE, IMAGE_SIZE)
            assert torch.allclose(got["pixel_values"], expected["pixel_values"], atol=1e-4, rtol=0)
            assert list(got["labels"]) == list(expected["labels"])
            for key, value in expected["labels"].items():
                assert got["labels"][key].dtype == value.dtype, key
                assert torch.allclose(got["labels"][key].double(), value.double(), atol=1e-4, rtol=0), key
    augmented = ours["train"][0]  # the random augmentations: labels stay normalised boxes of known classes
    boxes = augmented["labels"]["boxes"]
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and ((boxes >= 0) & (boxes <= 1)).all()
    assert set(augmented["labels"]["class_labels"].tolist()) <= {0, 1, 2}


def test_guide_collate_fn_trains_as_the_reference(shapes_data):
    """A collated batch: the model's training loss (Group DETR matching, auxiliary and encoder losses) is the
    reference's."""
    cppe5 = prepared_cppe5(shapes_data, make_image_processor(LwDetrImageProcessor))
    batch = collate_fn([cppe5["validation"][i] for i in range(len(cppe5["validation"]))] + [cppe5["test"][0]])
    assert set(batch) == {"pixel_values", "labels"}
    ours = LwDetrForObjectDetection.from_pretrained(MODEL_NAME).train()
    reference = transformers.AutoModelForObjectDetection.from_pretrained(MODEL_NAME).train()
    got, expected = ours(**batch), reference(**batch)
    assert torch.isfinite(got.loss)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()
    assert set(got.loss_dict) >= {"loss_ce", "loss_bbox", "loss_giou"}
    for key in ("loss_ce", "loss_bbox", "loss_giou"):
        assert abs(got.loss_dict[key].item() - expected.loss_dict[key].item()) < 1e-4, key

    # Evaluation (the Trainer's eval_loss) matches the inference queries alone. The reference means to do the same
    # (its criterion uses `group_detr if self.training else 1`) but builds a fresh criterion per call, which is
    # always in training mode, so it splits the 50 inference queries into 4 groups: compare with group_detr=1.
    with torch.no_grad():
        got = ours.eval()(**batch)
        reference.eval().config.group_detr = 1
        expected = reference(**batch)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-4 * expected.loss.item()


# ---------------------------------------------------------------- the guide: metrics, training, evaluation


class MeanAveragePrecision:
    """What the guide uses of `torchmetrics.detection.mean_ap.MeanAveragePrecision` (not installed here), computed
    with pycocotools, as torchmetrics does by default: `map`, `map_50`, `mar_100` and the per-class lists."""

    def __init__(self, box_format: str = "xyxy", class_metrics: bool = False):
        assert box_format == "xyxy" and class_metrics
        self.predictions, self.targets = [], []

    def update(self, predictions: list[dict], targets: list[dict]) -> None:
        self.predictions += predictions
        self.targets += targets

    def compute(self) -> dict[str, torch.Tensor]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        def xywh(boxes: torch.Tensor) -> list[list[float]]:
            return torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), 1).tolist()

        classes = sorted({int(c) for t in self.targets for c in t["labels"]})
        gt = {"images": [], "annotations": [], "categories": [{"id": c} for c in classes]}
        detections = []
        for image_id, (target, prediction) in enumerate(zip(self.targets, self.predictions)):
            gt["images"].append({"id": image_id})
            for box, label in zip(xywh(target["boxes"]), target["labels"].tolist()):
                gt["annotations"].append(
                    {"id": len(gt["annotations"]) + 1, "image_id": image_id, "category_id": label, "bbox": box}
                )
                gt["annotations"][-1].update(area=box[2] * box[3], iscrowd=0)
            for box, label, score in zip(xywh(prediction["boxes"]), prediction["labels"], prediction["scores"]):
                detections.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(detections) if detections else COCO(), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        stats = evaluation.stats
        precision, recall = evaluation.eval["precision"], evaluation.eval["recall"]  # [T, R, K, A, M], [T, K, A, M]

        def mean_valid(values: np.ndarray) -> float:
            return float(values[values > -1].mean()) if (values > -1).any() else -1.0

        return {
            "map": torch.tensor(stats[0]),
            "map_50": torch.tensor(stats[1]),
            "mar_100": torch.tensor(stats[8]),
            "classes": torch.tensor(classes),
            "map_per_class": torch.tensor([mean_valid(precision[:, :, k, 0, -1]) for k in range(len(classes))]),
            "mar_100_per_class": torch.tensor([mean_valid(recall[:, k, 0, -1]) for k in range(len(classes))]),
        }


def convert_bbox_yolo_to_pascal(boxes, image_size):
    """Convert bounding boxes from YOLO format (x_center, y_center, width, height) in range [0, 1]
    to Pascal VOC format (x_min, y_min, x_max, y_max) in absolute coordinates (the guide's)."""
    # convert center to corners format
    boxes = center_to_corners_format(boxes)

    # convert to absolute coordinates
    height, width = image_size
    boxes = boxes * torch.tensor([[width, height, width, height]])

    return boxes


@dataclass
class ModelOutput:
    logits: torch.Tensor
    pred_boxes: torch.Tensor


@torch.no_grad()
def compute_metrics(evaluation_results, image_processor, threshold=0.0, id2label=None):
    """Compute mean average mAP, mAR and their variants for the object detection task (the guide's)."""
    predictions, targets = evaluation_results.predictions, evaluation_results.label_ids

    image_sizes = []
    post_processed_targets = []
    post_processed_predictions = []

    # Collect targets in the required format for metric computation
    for batch in targets:
        # collect image sizes, we will need them for predictions post processing
        batch_image_sizes = torch.tensor(np.array([x["orig_size"] for x in batch]))
        image_sizes.append(batch_image_sizes)
        for image_target in batch:
            boxes = torch.tensor(image_target["boxes"])
            boxes = convert_bbox_yolo_to_pascal(boxes, image_target["orig_size"])
            labels = torch.tensor(image_target["class_labels"])
            post_processed_targets.append({"boxes": boxes, "labels": labels})

    # Collect predictions in the required format for metric computation,
    # model produce boxes in YOLO format, then image_processor convert them to Pascal VOC format
    for batch, target_sizes in zip(predictions, image_sizes):
        batch_logits, batch_boxes = batch[1], batch[2]
        output = ModelOutput(logits=torch.tensor(batch_logits), pred_boxes=torch.tensor(batch_boxes))
        post_processed_output = image_processor.post_process_object_detection(
            output, threshold=threshold, target_sizes=target_sizes
        )
        post_processed_predictions.extend(post_processed_output)

    # Compute metrics
    metric = MeanAveragePrecision(box_format="xyxy", class_metrics=True)
    metric.update(post_processed_predictions, post_processed_targets)
    metrics = metric.compute()

    # Replace list of per class metrics with separate metric for each class
    classes = metrics.pop("classes")
    map_per_class = metrics.pop("map_per_class")
    mar_100_per_class = metrics.pop("mar_100_per_class")
    for class_id, class_map, class_mar in zip(classes, map_per_class, mar_100_per_class):
        class_name = id2label[class_id.item()] if id2label is not None else class_id.item()
        metrics[f"map_{class_name}"] = class_map
        metrics[f"mar_100_{class_name}"] = class_mar

    metrics = {k: round(v.item(), 4) for k, v in metrics.items()}

    return metrics


@dataclass
class GuideRun:
    trainer: transformers.Trainer
    cppe5: datasets.DatasetDict
    image_processor: object
    train_metrics: transformers.trainer_utils.TrainOutput
    test_metrics: dict[str, float]


def run_guide(root: Path, output_dir: Path, processor_class, model_class) -> GuideRun:
    """The guide's training and evaluation, with the classes given and a few steps on the CPU."""
    image_processor = make_image_processor(processor_class)
    cppe5 = prepared_cppe5(root, image_processor, seed=0)
    id2label, label2id = label_maps(load_cppe5(root))
    eval_compute_metrics_fn = partial(
        compute_metrics, image_processor=image_processor, id2label=id2label, threshold=0.0
    )
    model = model_class.from_pretrained(
        MODEL_NAME,
        id2label=id2label,
        label2id=label2id,
        ignore_mismatched_sizes=True,
    )
    training_args = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,  # the guide: num_train_epochs=30
        fp16=False,
        per_device_train_batch_size=4,  # 8
        dataloader_num_workers=0,  # 4
        learning_rate=5e-5,
        lr_scheduler_type="cosine",
        weight_decay=1e-4,
        max_grad_norm=0.01,
        metric_for_best_model="eval_map",
        greater_is_better=True,
        load_best_model_at_end=True,
        eval_strategy="steps",  # "epoch"
        eval_steps=2,
        save_strategy="steps",  # "epoch"
        save_steps=2,
        save_total_limit=2,
        remove_unused_columns=False,
        eval_do_concat_batches=False,
        push_to_hub=False,  # True
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        seed=0,
    )
    trainer = transformers.Trainer(
        model=model,
        args=training_args,
        train_dataset=cppe5["train"],
        eval_dataset=cppe5["validation"],
        processing_class=image_processor,  # the guide's tokenizer=, renamed in transformers 5
        data_collator=collate_fn,
        compute_metrics=eval_compute_metrics_fn,
    )
    train_metrics = trainer.train()
    metrics = trainer.evaluate(eval_dataset=cppe5["test"], metric_key_prefix="test")
    return GuideRun(trainer, cppe5, image_processor, train_metrics, metrics)


@pytest.fixture(scope="module")
def guide_runs(shapes_data, tmp_path_factory) -> tuple[GuideRun, GuideRun]:
    """(ours, the reference's) runs of the guide's training on the same data, augmentations and seed."""
    ours = run_guide(shapes_data, tmp_path_factory.mktemp("ours"), LwDetrImageProcessor, LwDetrForObjectDetection)
    reference = run_guide(
        shapes_data,
        tmp_path_factory.mktemp("reference"),
        transformers.AutoImageProcessor,
        transformers.AutoModelForObjectDetection,
    )
    return ours, reference


def _history(run: GuideRun, key: str) -> list[float]:
    return [entry[key] for entry in run.trainer.state.log_history if key in entry]


def test_guide_training_matches_the_reference(guide_runs):
    ours, reference = guide_runs
    losses, expected = _history(ours, "loss"), _history(reference, "loss")
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert np.allclose(losses, expected, rtol=1e-4, atol=0), (losses, expected)
    assert ours.train_metrics.global_step == 4
    # load_best_model_at_end went through the Trainer's checkpoints of our model
    assert ours.trainer.state.best_model_checkpoint is not None
    assert ours.trainer.state.best_model_checkpoint.endswith(reference.trainer.state.best_model_checkpoint[-12:])


def test_guide_compute_metrics_match_the_reference(guide_runs):
    """Evaluation during training: the Trainer's predictions (`batch[1]`, `batch[2]` of each batch: logits and
    boxes), post-processed by our processor, give the reference's metrics."""
    ours, reference = guide_runs
    got, expected = _history(ours, "eval_map"), _history(reference, "eval_map")
    assert len(got) == 2 and got == pytest.approx(expected, abs=1e-4)
    # (eval_loss differs on purpose: see test_guide_collate_fn_trains_as_the_reference)
    assert ours.trainer.state.best_metric == pytest.approx(reference.trainer.state.best_metric, abs=1e-4)


def test_guide_evaluate(guide_runs):
    ours, reference = guide_runs
    metrics, expected = ours.test_metrics, reference.test_metrics
    assert {"test_loss", "test_map", "test_map_50", "test_mar_100", "test_map_circle"} <= set(metrics)
    for key, value in expected.items():
        if key.endswith(("_runtime", "_per_second", "_loss")):
            continue
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key
    assert metrics["test_map"] > 0.1, "the demo model (trained at 256 px) detects the synthetic shapes"


def _guide_inference(image, model_repo, processor_class, model_class) -> tuple[dict, list[str]]:
    """The guide's inference section, with the classes given."""
    device = "cpu"  # "cuda"

    image_processor = processor_class.from_pretrained(model_repo)
    model = model_class.from_pretrained(model_repo)
    model = model.to(device)

    with torch.no_grad():
        inputs = image_processor(images=[image], return_tensors="pt")
        outputs = model(**inputs.to(device))
        target_sizes = torch.tensor([[image.size[1], image.size[0]]])
        results = image_processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=target_sizes)[0]

    printed = []
    for score, label, box in zip(results["scores"], results["labels"], results["boxes"]):
        box = [round(i, 2) for i in box.tolist()]
        printed.append(
            f"Detected {model.config.id2label[label.item()]} with confidence {round(score.item(), 3)} at location {box}"
        )
    return results, printed


def test_guide_inference_with_the_fine_tuned_model(guide_runs, image_url, tmp_path):
    """What `trainer.push_to_hub()` would publish, saved with lwdetr's classes, loads in lwdetr and in
    transformers, and the guide's inference gives the same detections with both."""
    ours, _ = guide_runs
    model_repo = tmp_path / "detr_finetuned_cppe5"
    ours.trainer.model.save_pretrained(model_repo)
    ours.image_processor.save_pretrained(model_repo)
    image = Image.open(requests.get(image_url, stream=True).raw)

    results, printed = _guide_inference(image, model_repo, LwDetrImageProcessor, LwDetrForObjectDetection)
    expected, expected_printed = _guide_inference(
        image, model_repo, transformers.AutoImageProcessor, transformers.AutoModelForObjectDetection
    )
    assert printed and printed[0].startswith("Detected ")
    assert_detections_equal([results], [expected])
    assert len(printed) == len(expected_printed)


def test_inference_after_a_fused_optimizer_step_uses_the_new_weights():
    """Regression (found by the guide's evaluation during training): transformers.Trainer steps a fused AdamW, which
    leaves the parameters' version counters alone; inference once kept using weights packed before the step."""
    model = LwDetrForObjectDetection.from_pretrained(MODEL_NAME)
    pixels = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}]
    with torch.no_grad():
        model(pixels)  # packs the inference weights
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model.train()(pixels, labels=labels).loss.backward()
    optimizer.step()
    fresh = LwDetrForObjectDetection(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        got, expected = model.eval()(pixels), fresh(pixels)
    assert torch.allclose(got.pred_boxes, expected.pred_boxes, atol=1e-5)
    assert torch.allclose(got.logits, expected.logits, atol=1e-4)
