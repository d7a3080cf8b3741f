"""COCO evaluation of a detector on a validation split, with pycocotools.

Three steps, each a function:

1. `predict_detections` runs the model over this process's share of the split and turns its outputs into COCO
   detections (`{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`) in original-image pixels. This is
   the inference pipeline of the saved model, step for step: images decoded by `lwdetr.images.load_image`,
   pre-processed by the processor saved with the model (`lwdetr.processing.square_processor`), outputs decoded and
   written by `lwdetr.postprocess`, as the `Detector` and `python -m lwdetr predict` do; so the AP in a model card
   is the AP of what users get. The top 100 (query, class) pairs per image are kept, COCO's `maxDets`.
2. `evaluate_split` shards the split over the processes (image `i` goes to rank `i % world_size`, so nothing is
   duplicated or dropped), gathers every rank's detections on all ranks and scores them on the main process,
   then shares the metrics so that every rank takes the same decisions (best checkpoint).
3. `coco_metrics` is the scoring itself: a ground-truth dict (`DetectionSplit.to_coco_gt()`, category ids =
   contiguous label ids, annotation ids from 1) and the detections give AP, AP50, AP75, AP_small/medium/large,
   AR100 and per-class AP (`AP/<class name>`, for the classes with ground truth in the split).

pycocotools prints a lot; all of it is swallowed.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lwdetr.postprocess import coco_record, to_detections, top_k_detections

__all__ = [
    "STAT_NAMES",
    "coco_metrics",
    "detections_from_outputs",
    "evaluate_split",
    "gather_detections",
    "predict_detections",
    "run_cocoeval",
]

# The first entries of COCOeval.stats, in order, under the names we log.
STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100")
MAX_DETECTIONS = 100


def coco_metrics(
    ground_truth: Mapping[str, Any], detections: Sequence[Mapping[str, Any]], id2label: Mapping[int, str]
) -> dict[str, float]:
    """Score `detections` against a COCO ground-truth dict.

    Returns the `STAT_NAMES` metrics, except the size ranges without ground truth (COCO's -1: e.g. `AP_small`
    when no box is small), and `AP/<name>` per class with ground truth in the split. With no detections at all,
    everything is 0.0.
    """
    classes_with_gt = sorted({a["category_id"] for a in ground_truth["annotations"] if not a.get("iscrowd", 0)})
    evaluator = run_cocoeval(ground_truth, detections)
    if evaluator is None:
        metrics = dict.fromkeys(STAT_NAMES, 0.0)
        metrics.update({f"AP/{id2label[c]}": 0.0 for c in classes_with_gt})
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.summarize()
    # COCO writes -1 for a size range without ground truth (e.g. no small objects): leave it out, not 0.
    metrics = {name: float(value) for name, value in zip(STAT_NAMES, evaluator.stats) if value > -1}
    metrics.setdefault("AP", 0.0)
    metrics.setdefault("AP50", 0.0)
    metrics.update(_per_class_ap(evaluator, classes_with_gt, id2label))
    return metrics


def run_cocoeval(ground_truth: Mapping[str, Any], detections: Sequence[Mapping[str, Any]]):
    """pycocotools' `COCOeval` (bbox) after `evaluate()` and `accumulate()`, quietly; None when there are no
    detections or no ground truth (nothing to match). Its `eval["precision"]` is [iou, recall, category, area,
    max_dets] with IoU thresholds .50:.05:.95 and 101 recall points."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not detections or not ground_truth["annotations"]:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = copy.deepcopy(dict(ground_truth))
        gt.createIndex()
        dt = gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _per_class_ap(evaluator, classes: Sequence[int], id2label: Mapping[int, str]) -> dict[str, float]:
    """AP@[.5:.95] per category: precision is [iou, recall, category, area, max_dets]; area 'all', 100 dets."""
    precision = evaluator.eval["precision"]
    cat_ids = list(evaluator.params.catIds)
    result = {}
    for category in classes:
        values = precision[:, :, cat_ids.index(category), 0, -1]
        values = values[values > -1]
        result[f"AP/{id2label[category]}"] = float(values.mean()) if values.size else 0.0
    return result


def detections_from_outputs(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    image_ids: Sequence[int],
    image_sizes: Sequence[tuple[int, int]],
    max_detections: int = MAX_DETECTIONS,
) -> list[dict[str, Any]]:
    """COCO detections from raw outputs: logits [B, Q, C], pred_boxes [B, Q, 4] normalised cxcywh, and each
    image's id and original (height, width). Every (query, class) pair competes for the top `max_detections`.

    Decoded and written exactly as for inference (`lwdetr.postprocess`): the same boxes and records as the
    `Detector` and `python -m lwdetr predict` give for the same outputs.
    """
    results = top_k_detections(logits, pred_boxes, image_sizes, top_k=max_detections)
    return [
        coco_record(detection, image_id, size)
        for result, image_id, size in zip(results, image_ids, image_sizes)
        for detection in to_detections(result)
    ]


@torch.no_grad()
def predict_detections(model: torch.nn.Module, batches, device: torch.device, autocast=None) -> list[dict[str, Any]]:
    """Run `model` (eval mode) over `batches` and return COCO detections.

    Each batch is `(pixel_values [B, 3, S, S], pixel_mask [B, S, S], targets)` as `finetune.transforms`'
    `PreprocessCollate` makes it; each target gives `image_id` and `orig_size` (height, width).
    `autocast` is an optional context-manager factory (mixed precision).
    """
    was_training = model.training
    model.eval()
    detections = []
    try:
        for pixel_values, pixel_mask, targets in batches:
            with autocast() if autocast is not None else contextlib.nullcontext():
                out = model(pixel_values.to(device), pixel_mask.to(device))
            ids, sizes = [t["image_id"] for t in targets], [t["orig_size"] for t in targets]
            detections += detections_from_outputs(out.logits, out.pred_boxes, ids, sizes)
    finally:
        model.train(was_training)
    return detections


def gather_detections(
    model: torch.nn.Module, dataset, accelerator, batch_size: int = 8, num_workers: int = 0, *, image_size: int
):
    """COCO detections of `model` (unwrapped, not DDP) on the whole eval `dataset`, fed at `image_size` x
    `image_size` through the processor the model is saved with (`finetune.transforms.PreprocessCollate`), each
    process predicting its share (image `i` on rank `i % world_size`); the full list on the main process, None on
    the others."""
    from accelerate.utils import gather_object

    from finetune.transforms import PreprocessCollate

    rank, world = accelerator.process_index, accelerator.num_processes
    shard = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    loader = torch.utils.data.DataLoader(
        shard,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=PreprocessCollate([image_size]),
        pin_memory=accelerator.device.type == "cuda",
    )
    autocast = accelerator.autocast if accelerator.mixed_precision != "no" else None
    mine = predict_detections(model, loader, accelerator.device, autocast)
    everything = gather_object([mine]) if world > 1 else [mine]  # one list per rank, on every rank
    return [d for part in everything for d in part] if accelerator.is_main_process else None


def evaluate_split(
    model: torch.nn.Module, dataset, accelerator, batch_size: int = 8, num_workers: int = 0, *, image_size: int
) -> dict[str, float]:
    """COCO metrics of `model` (unwrapped, not DDP) on the whole eval `dataset` (a `DetectionDataset` without a
    transform) at `image_size`, computed with every process's help. Every rank gets the same metrics back."""
    from accelerate.utils import broadcast_object_list

    detections = gather_detections(model, dataset, accelerator, batch_size, num_workers, image_size=image_size)
    metrics = [None]
    if accelerator.is_main_process:
        split = dataset.split
        metrics[0] = coco_metrics(split.to_coco_gt(), detections, split.id2label)
    if accelerator.num_processes > 1:
        broadcast_object_list(metrics, from_process=0)
    return metrics[0]
