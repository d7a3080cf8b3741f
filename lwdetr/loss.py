"""The LW-DETR training criterion: Hungarian matching, IoU-aware classification, L1 and GIoU box losses.

`detection_loss` gives the same loss dict and total as transformers' `LwDetrForObjectDetectionLoss` for the same
inputs (keys `loss_ce`, `loss_bbox`, `loss_giou`, `cardinality_error`, repeated with `_0`, `_1`, ... for the
intermediate decoder layers and `_enc` for the two-stage encoder proposals). Where the reference would return
inf or NaN because a sigmoid saturated, this one stays finite (see `_log_probs`).

The criterion is a plain function of tensors and a config, independent of the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import host_sync
from .box_ops import at_least_float32, box_cxcywh_to_xyxy, paired_box_iou, paired_generalized_box_iou
from .matcher import HungarianMatcher

if TYPE_CHECKING:
    from transformers import LwDetrConfig

__all__ = ["detection_loss"]

# Loss name -> the config field weighting it; every `_i` / `_enc` copy gets its base key's weight.
# `cardinality_error` is for logging only and has no weight.
_WEIGHT_FIELDS = {
    "loss_ce": "class_loss_coefficient",
    "loss_bbox": "bbox_loss_coefficient",
    "loss_giou": "giou_loss_coefficient",
}
# Exponent of the down-weighting of negatives (p ** gamma); fixed in LW-DETR, not a config field.
_FOCAL_GAMMA = 2


@dataclass
class _Targets:
    """Validated ground truth of a batch, both per image (for the matcher) and concatenated (for the losses)."""

    per_image: list[dict[str, Tensor]]  # {"class_labels": int64 [n_i], "boxes": [n_i, 4]}, on the model's device
    classes: Tensor  # int64 [T], T = sum of n_i
    boxes: Tensor  # [T, 4] cxcywh normalised
    offsets: list[int]  # image i's targets are rows offsets[i] : offsets[i] + n_i of the concatenation
    counts: Tensor  # float [batch_size], n_i


def detection_loss(
    config: LwDetrConfig,
    logits: Tensor,
    pred_boxes: Tensor,
    labels: Sequence[Mapping[str, Any]],
    *,
    aux_logits: Tensor | None = None,
    aux_boxes: Tensor | None = None,
    enc_logits: Tensor | None = None,
    enc_boxes: Tensor | None = None,
    group_detr: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted training loss of LW-DETR and its parts.

    Args:
        config: reads class/bbox/giou_cost (matching), focal_alpha, class/bbox/giou_loss_coefficient (weights),
            auxiliary_loss, decoder_layers and num_labels.
        logits: [batch_size, num_queries, num_labels] last decoder layer's class logits.
        pred_boxes: [batch_size, num_queries, 4] its boxes, cxcywh normalised.
        labels: one dict per image: "class_labels" int [n_i] in [0, num_labels) and "boxes" [n_i, 4], cxcywh
            normalised to [0, 1]. Other keys are ignored.
        aux_logits, aux_boxes: [decoder_layers - 1, batch_size, num_queries, num_labels | 4], the intermediate
            decoder layers without the last one. Required when `config.auxiliary_loss`, ignored otherwise.
        enc_logits, enc_boxes: [batch_size, num_proposals, num_labels | 4], the two-stage encoder proposals;
            optional (no `_enc` terms without them).
        group_detr: number of query groups the queries consist of; each group is matched on its own. The model
            passes `config.group_detr` in training and 1 in evaluation, where it only runs the first group.
            The reference's criterion instead always uses `config.group_detr`, since it is a freshly built module
            that stays in training mode: in eval it splits the single group's queries into `group_detr` chunks.
            We follow the model's mode instead, so evaluation losses differ from the reference's there.

    Returns:
        (total, loss_dict): total is the weighted sum of every `loss_*` entry; loss_dict holds 0-dim tensors.
    """
    batch_size = logits.shape[0]
    levels = _output_levels(config, logits, pred_boxes, aux_logits, aux_boxes, enc_logits, enc_boxes)
    # Matching and losses run in float32 whatever the autocast: in half precision a saturated sigmoid rounds to
    # exactly 1, so `log(1 - p)` is -inf and the matcher would take the worst pair for the best.
    levels = [
        (suffix, at_least_float32(level_logits), at_least_float32(boxes)) for suffix, level_logits, boxes in levels
    ]
    with torch.autocast(logits.device.type, enabled=False):
        return _weighted_loss(config, levels, labels, batch_size, group_detr)


def _weighted_loss(
    config: LwDetrConfig,
    levels: list[tuple[str, Tensor, Tensor]],
    labels: Sequence[Mapping[str, Any]],
    batch_size: int,
    group_detr: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """`detection_loss` over its float32 (key suffix, logits, boxes) levels, outside autocast."""
    logits = levels[0][1]
    targets = _prepare_targets(labels, batch_size, config.num_labels, logits.device)
    # The matcher keeps its default focal alpha of 0.25: the reference's matcher ignores `config.focal_alpha`.
    matcher = HungarianMatcher(config.class_cost, config.bbox_cost, config.giou_cost)
    # Every group is a full copy of the supervision, so it counts towards the normaliser.
    num_boxes = _average_num_boxes(len(targets.classes) * group_detr, logits.device)
    weights = {name: getattr(config, field) for name, field in _WEIGHT_FIELDS.items()}

    loss_dict: dict[str, Tensor] = {}
    weighted: list[Tensor] = []
    for suffix, level_logits, level_boxes in levels:
        indices = matcher.match(level_logits, level_boxes, targets.per_image, group_detr)
        terms = _level_losses(level_logits, level_boxes, targets, indices, num_boxes, config.focal_alpha)
        loss_dict.update({name + suffix: value for name, value in terms.items()})
        # Summed in the reference's order (layer by layer, ce/bbox/giou), so the total matches to the last bit.
        weighted += [terms[name] * weight for name, weight in weights.items()]
    return sum(weighted), loss_dict


def _output_levels(
    config: LwDetrConfig,
    logits: Tensor,
    pred_boxes: Tensor,
    aux_logits: Tensor | None,
    aux_boxes: Tensor | None,
    enc_logits: Tensor | None,
    enc_boxes: Tensor | None,
) -> list[tuple[str, Tensor, Tensor]]:
    """(key suffix, logits [B, Q, C], boxes [B, Q, 4]) for every supervised output, in the reference's order."""
    levels = [("", logits, pred_boxes)]
    if config.auxiliary_loss:
        if aux_logits is None or aux_boxes is None:
            raise ValueError("config.auxiliary_loss is set: pass aux_logits and aux_boxes (or turn it off)")
        if len(aux_logits) != config.decoder_layers - 1 or len(aux_boxes) != len(aux_logits):
            raise ValueError(
                f"aux_logits/aux_boxes must hold the {config.decoder_layers - 1} intermediate decoder layers "
                f"(without the last one), got {len(aux_logits)} and {len(aux_boxes)}"
            )
        levels += [(f"_{i}", aux_logits[i], aux_boxes[i]) for i in range(len(aux_logits))]
    if (enc_logits is None) != (enc_boxes is None):
        raise ValueError("pass both enc_logits and enc_boxes, or neither")
    if enc_logits is not None:
        levels.append(("_enc", enc_logits, enc_boxes))

    for suffix, level_logits, level_boxes in levels:
        name = f"outputs{suffix or ' (last layer)'}"
        if level_logits.dim() != 3 or level_logits.shape[-1] != config.num_labels:
            raise ValueError(f"{name}: logits must be [B, Q, {config.num_labels}], got {tuple(level_logits.shape)}")
        if level_boxes.shape != (*level_logits.shape[:2], 4) or level_logits.shape[0] != logits.shape[0]:
            raise ValueError(
                f"{name}: boxes {tuple(level_boxes.shape)} do not fit logits {tuple(level_logits.shape)} "
                f"(batch size {logits.shape[0]})"
            )
    return levels


def _prepare_targets(
    labels: Sequence[Mapping[str, Any]], batch_size: int, num_labels: int, device: torch.device
) -> _Targets:
    """Check the ground truth and lay it out for the matcher and the losses (see `_Targets`).

    The values are checked where they are: labels the data loader gives on the host are checked there, for free,
    and then copied to `device` without waiting for it; labels already on a GPU cost one device read.
    """
    if len(labels) != batch_size:
        raise ValueError(f"got {len(labels)} label dicts for a batch of {batch_size} images")
    given = [_check_image_target(i, target) for i, target in enumerate(labels)]
    on_host = all(host_sync.reads_are_free(t) for target in given for t in target.values())
    if not on_host:
        given = [{k: v.to(device, non_blocking=True) for k, v in target.items()} for target in given]
    # One read for all range checks; the slow search for the culprit only runs on failure.
    classes = torch.cat([target["class_labels"] for target in given])
    boxes = torch.cat([target["boxes"] for target in given])
    in_range = ((boxes >= 0) & (boxes <= 1)).all() & ((classes >= 0) & (classes < num_labels)).all()
    if not bool(in_range):
        _raise_range_error(given, num_labels)
    per_image = [{k: v.to(device, non_blocking=True) for k, v in target.items()} for target in given]
    sizes = [len(target["boxes"]) for target in per_image]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    counts = torch.tensor(sizes, dtype=torch.float32).to(device, non_blocking=True)
    classes, boxes = classes.to(device, non_blocking=True), boxes.to(device, non_blocking=True)
    return _Targets(per_image=per_image, classes=classes, boxes=boxes, offsets=offsets, counts=counts)


def _check_image_target(index: int, target: Mapping[str, Any]) -> dict[str, Tensor]:
    """Shapes and dtypes of one image's target; returns it as tensors where they were (lists: on the host)."""
    if not isinstance(target, Mapping) or "class_labels" not in target or "boxes" not in target:
        raise ValueError(f"labels[{index}] must be a dict with 'class_labels' and 'boxes'")
    classes = torch.as_tensor(target["class_labels"])
    boxes = torch.as_tensor(target["boxes"])
    # An image without objects may come as [] lists, which become 1-D float tensors.
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4) if boxes.is_floating_point() else boxes.reshape(0, 4).float()
    if classes.numel() == 0:
        classes = classes.reshape(0).long()
    if boxes.dim() != 2 or boxes.shape[1] != 4 or not boxes.is_floating_point():
        raise ValueError(
            f"labels[{index}]['boxes'] must be a float [n, 4] tensor, got {boxes.dtype} {tuple(boxes.shape)}"
        )
    if classes.dim() != 1 or len(classes) != len(boxes):
        raise ValueError(
            f"labels[{index}]: 'class_labels' {tuple(classes.shape)} must be [n] with n = {len(boxes)} boxes"
        )
    if classes.is_floating_point() or classes.is_complex() or classes.dtype == torch.bool:
        raise ValueError(f"labels[{index}]['class_labels'] must be integer class ids, got {classes.dtype}")
    return {"class_labels": classes.long(), "boxes": boxes}


def _raise_range_error(per_image: list[dict[str, Tensor]], num_labels: int) -> None:
    for index, target in enumerate(per_image):
        boxes, classes = target["boxes"], target["class_labels"]
        if not ((boxes >= 0) & (boxes <= 1)).all():
            bad = boxes[~((boxes >= 0) & (boxes <= 1)).all(-1)][0].tolist()
            raise ValueError(
                f"labels[{index}]['boxes'] must be (center_x, center_y, width, height) normalised by the image size, "
                f"all in [0, 1]; found {bad} (pixel or xyxy boxes? convert them first)"
            )
        if not ((classes >= 0) & (classes < num_labels)).all():
            bad = classes[(classes < 0) | (classes >= num_labels)][0].item()
            raise ValueError(f"labels[{index}]['class_labels'] holds {bad}, outside [0, num_labels={num_labels})")


def _average_num_boxes(count: int, device: torch.device) -> float:
    """Number of target boxes per process, averaged over the processes, at least 1: the loss normaliser."""
    if not (dist.is_available() and dist.is_initialized()):
        return max(float(count), 1.0)
    # Averaging keeps the loss scale independent of how boxes fall across processes.
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return torch.clamp(total / dist.get_world_size(), min=1).item()


def _level_losses(
    logits: Tensor,
    boxes: Tensor,
    targets: _Targets,
    indices: list[tuple[Tensor, Tensor]],
    num_boxes: float,
    focal_alpha: float,
) -> dict[str, Tensor]:
    """loss_ce, loss_bbox, loss_giou and cardinality_error of one output level (logits [B, Q, C], boxes [B, Q, 4])."""
    image_idx, query_idx, target_idx = _matched_pairs(indices, targets.offsets, logits.device)
    matched_boxes = boxes[image_idx, query_idx]  # [K, 4], K matched pairs
    target_boxes = targets.boxes[target_idx]
    positives = (image_idx, query_idx, targets.classes[target_idx])  # index of each matched (query, class) logit
    probs = logits.sigmoid()
    return {
        "loss_ce": _iou_aware_bce(logits, probs, positives, matched_boxes, target_boxes, num_boxes, focal_alpha),
        **_box_losses(matched_boxes, target_boxes, num_boxes),
        "cardinality_error": _cardinality_error(probs, targets.counts),
    }


def _matched_pairs(
    indices: list[tuple[Tensor, Tensor]], offsets: list[int], device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Matcher output -> (image index, query index, index into the concatenated targets), each int64 [K]."""
    image_idx = torch.cat([torch.full_like(pred, i) for i, (pred, _) in enumerate(indices)])
    query_idx = torch.cat([pred for pred, _ in indices])
    target_idx = torch.cat([target + offset for (_, target), offset in zip(indices, offsets)])
    # The matcher works on the CPU: one host -> device copy for all three, queued without waiting for the device.
    return torch.stack([image_idx, query_idx, target_idx]).to(device, non_blocking=True).unbind(0)


def _iou_aware_bce(
    logits: Tensor,
    probs: Tensor,
    positives: tuple[Tensor, Tensor, Tensor],
    matched_boxes: Tensor,
    target_boxes: Tensor,
    num_boxes: float,
    alpha: float,
) -> Tensor:
    """IoU-aware binary cross-entropy over all [B, Q, C] logits (LW-DETR's classification loss), / num_boxes.

    A matched query's target class has the soft target t = max(p^alpha * IoU^(1-alpha), 0.01) (p its probability,
    IoU with its target box, both detached): the score learns to rank by localisation quality too. That element is
    weighted t for log(p) and 1 - t for log(1 - p); every other element is a negative weighted p^gamma (kept in
    the graph), so easy negatives fade out as in focal loss.
    """
    dtype = logits.dtype
    iou = paired_box_iou(box_cxcywh_to_xyxy(matched_boxes.detach()), box_cxcywh_to_xyxy(target_boxes))[0]
    quality = probs[positives].pow(alpha) * iou.to(dtype).pow(1 - alpha)
    quality = quality.clamp(min=0.01).detach().to(dtype)
    return _IouAwareBceSum.apply(logits, probs.detach(), positives, quality) / num_boxes


class _IouAwareBceSum(torch.autograd.Function):
    """The sum of `_iou_aware_bce` (before the division), with its gradient in closed form.

    The value comes from the same ops as the reference's graph, so it matches bit for bit; the backward is two
    passes instead of autograd's walk back through some twenty element-wise ops over [B, Q, C]. With p = sigmoid(x):
    a negative element, -p^2 log(1 - p), has gradient p^3 - 2 p^2 (1 - p) log(1 - p) (the weight p^2 is
    differentiated, as in the reference; in general p^(g+1) - g p^g (1 - p) log(1 - p) for the focal exponent
    g); a positive one, -t log(p) - (1 - t) log(1 - p), has p - t.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, probs: Tensor, positives: tuple[Tensor, Tensor, Tensor], quality: Tensor):
        dtype = logits.dtype
        log_p, log_not_p = _log_probs(logits, probs)
        pos_weights = torch.zeros_like(logits)
        pos_weights[positives] = quality
        neg_weights = probs.pow(_FOCAL_GAMMA).to(dtype)  # pow may upcast under autocast
        neg_weights[positives] = 1 - quality
        ctx.positives, ctx.dtype = positives, dtype
        ctx.save_for_backward(probs, log_not_p, quality)
        return (-pos_weights * log_p - neg_weights * log_not_p).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        probs, log_not_p, quality = ctx.saved_tensors
        # log_not_p is finite where p rounds to 1 (see _log_probs), and there 1 - p = 0 keeps the product at 0
        weight = probs.pow(_FOCAL_GAMMA)
        grad = weight * probs - _FOCAL_GAMMA * weight * (1 - probs) * log_not_p
        grad[ctx.positives] = probs[ctx.positives] - quality
        return (grad * grad_out).to(ctx.dtype), None, None, None


def _log_probs(logits: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """log(p) and log(1 - p) of p = sigmoid(logits), [B, Q, C] each; no autograd (see `_IouAwareBceSum`).

    Taken as probs.log() and (1 - probs).log(), like the reference, so values match it bit for bit. That form
    breaks where the sigmoid rounds to exactly 0 or 1 (logits below about -104 or above about 17 in float32, far
    less in half precision): log gives -inf, and inf * weight or 0 * -inf poison the loss and the gradients. Only
    there we use logsigmoid, which is exact. On the host we first test whether there are such elements (free, and
    it saves two passes); on a GPU the test would wait for the device, twice per output level, so we always select.
    """
    log_p, log_not_p = probs.log(), (1 - probs).log()
    zero, one = probs == 0, probs == 1
    test_first = host_sync.reads_are_free(probs)
    if not test_first or bool(zero.any()):
        log_p = torch.where(zero, F.logsigmoid(logits), log_p)
    if not test_first or bool(one.any()):
        log_not_p = torch.where(one, F.logsigmoid(-logits), log_not_p)
    return log_p, log_not_p


def _box_losses(matched_boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> dict[str, Tensor]:
    """L1 and GIoU losses of matched cxcywh pairs [K, 4], summed and divided by num_boxes."""
    loss_bbox = F.l1_loss(matched_boxes, target_boxes, reduction="none").sum() / num_boxes
    giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(matched_boxes), box_cxcywh_to_xyxy(target_boxes))
    return {"loss_bbox": loss_bbox, "loss_giou": (1 - giou).sum() / num_boxes}


@torch.no_grad()
def _cardinality_error(probs: Tensor, counts: Tensor) -> Tensor:
    """Mean |number of queries with some class above 0.5 - number of targets| over the images; logging only.

    probs: [B, Q, C]; counts: float [B]. Counts every query of every group, like the reference.
    """
    predicted = (probs.max(-1).values > 0.5).sum(1)
    return F.l1_loss(predicted.float(), counts)
