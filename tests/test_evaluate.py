"""COCO evaluation (finetune.evaluate): perfect detections score 1.0, wrong labels score less, per-class keys."""

from __future__ import annotations

import random

import pytest
import torch

from finetune.evaluate import STAT_NAMES, coco_metrics, detections_from_outputs

ID2LABEL = {0: "circle", 1: "square", 2: "triangle"}


def _ground_truth(num_images: int = 12, seed: int = 0) -> dict:
    """A COCO ground truth with boxes of all three COCO size ranges and all three classes."""
    rng = random.Random(seed)
    images, annotations = [], []
    for image_id in range(num_images):
        images.append({"id": image_id, "file_name": f"{image_id}.jpg", "width": 640, "height": 480})
        for k in range(3):
            side = rng.choice([20, 60, 200])  # small (< 32^2), medium, large
            x, y = rng.uniform(0, 640 - side), rng.uniform(0, 480 - side)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": (image_id + k) % 3,
                    "bbox": [x, y, side, side],
                    "area": side * side,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": n} for i, n in ID2LABEL.items()]
    return {"images": images, "annotations": annotations, "categories": categories}


def _as_detections(ground_truth: dict) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]), "score": 1.0}
        for a in ground_truth["annotations"]
    ]


def test_perfect_predictions_score_one():
    gt = _ground_truth()
    metrics = coco_metrics(gt, _as_detections(gt), ID2LABEL)
    for name in ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large"):
        assert metrics[name] == pytest.approx(1.0), name
    assert {f"AP/{n}" for n in ID2LABEL.values()} <= metrics.keys()
    assert all(metrics[f"AP/{n}"] == pytest.approx(1.0) for n in ID2LABEL.values())
    assert set(STAT_NAMES) <= metrics.keys()


def test_shuffled_labels_score_lower():
    gt = _ground_truth()
    detections = _as_detections(gt)
    for d in detections[::2]:
        d["category_id"] = (d["category_id"] + 1) % 3
    metrics = coco_metrics(gt, detections, ID2LABEL)
    assert metrics["AP"] < 0.75
    assert all(metrics[f"AP/{n}"] < 1.0 for n in ID2LABEL.values())


def test_no_detections_and_absent_classes():
    gt = _ground_truth()
    assert coco_metrics(gt, [], ID2LABEL)["AP"] == 0.0
    gt["annotations"] = [a for a in gt["annotations"] if a["category_id"] != 2]  # no triangle in this split
    metrics = coco_metrics(gt, _as_detections(gt), ID2LABEL)
    assert metrics["AP"] == pytest.approx(1.0)
    assert "AP/triangle" not in metrics and "AP/circle" in metrics


def test_detections_from_outputs_scale_to_original_pixels():
    """Normalised cxcywh boxes become xywh in each image's own pixels (the eval resize is a plain squash)."""
    logits = torch.full((2, 3, 2), -10.0)
    logits[0, 1, 1] = 5.0
    logits[1, 0, 0] = 4.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(2, 3, 1)
    boxes[0, 1] = torch.tensor([0.25, 0.5, 0.5, 0.2])
    detections = detections_from_outputs(logits, boxes, image_ids=[7, 8], image_sizes=[(100, 200), (50, 40)])
    best = {d["image_id"]: d for d in sorted(detections, key=lambda d: d["score"])}
    assert best[7]["category_id"] == 1 and best[7]["bbox"] == pytest.approx([0.0, 40.0, 100.0, 20.0])
    assert best[8]["category_id"] == 0 and best[8]["bbox"] == pytest.approx([16.0, 20.0, 8.0, 10.0])
    assert len(detections) == 2 * 6  # every (query, class) pair, at most 100 per image
