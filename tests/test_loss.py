"""The training loss, matcher and box ops against transformers' LW-DETR reference, plus input validation."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_for_object_detection import box_iou as ref_box_iou
from transformers.loss.loss_for_object_detection import generalized_box_iou as ref_generalized_box_iou
from transformers.loss.loss_lw_detr import LwDetrForObjectDetectionLoss, LwDetrHungarianMatcher

from lwdetr.box_ops import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    paired_box_iou,
    paired_generalized_box_iou,
)
from lwdetr.config import preset_config
from lwdetr.loss import _average_num_boxes, detection_loss
from lwdetr.matcher import HungarianMatcher

NUM_LABELS = 5


def _config(**overrides):
    return preset_config("nano", num_labels=NUM_LABELS, **overrides)


def _random_labels(sizes: list[int], generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Per-image targets: class ids in [0, NUM_LABELS) and cxcywh boxes that stay inside the image."""
    labels = []
    for n in sizes:
        centers = 0.2 + 0.6 * torch.rand(n, 2, generator=generator)
        sizes_wh = 0.05 + 0.3 * torch.rand(n, 2, generator=generator)
        classes = torch.randint(0, NUM_LABELS, (n,), generator=generator)
        labels.append({"class_labels": classes, "boxes": torch.cat([centers, sizes_wh], dim=-1)})
    return labels


def _random_outputs(config, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Leaf tensors shaped like the model's training outputs: all decoder layers (last one included) + encoder."""
    layers, queries = config.decoder_layers, config.num_queries * config.group_detr

    def leaf(tensor):
        return tensor.requires_grad_()

    return {
        "layer_logits": leaf(3 * torch.randn(layers, batch_size, queries, NUM_LABELS, generator=generator)),
        "layer_boxes": leaf(torch.randn(layers, batch_size, queries, 4, generator=generator).sigmoid()),
        "enc_logits": leaf(3 * torch.randn(batch_size, queries, NUM_LABELS, generator=generator)),
        "enc_boxes": leaf(torch.randn(batch_size, queries, 4, generator=generator).sigmoid()),
    }


def _ours(config, outputs, labels, group_detr=None):
    return detection_loss(
        config,
        outputs["layer_logits"][-1],
        outputs["layer_boxes"][-1],
        labels,
        aux_logits=outputs["layer_logits"][:-1],
        aux_boxes=outputs["layer_boxes"][:-1],
        enc_logits=outputs["enc_logits"],
        enc_boxes=outputs["enc_boxes"],
        group_detr=config.group_detr if group_detr is None else group_detr,
    )


def _reference(config, outputs, labels):
    total, loss_dict, _ = LwDetrForObjectDetectionLoss(
        outputs["layer_logits"][-1],
        labels,
        "cpu",
        outputs["layer_boxes"][-1],
        config,
        outputs["layer_logits"],
        outputs["layer_boxes"],
        outputs["enc_logits"],
        outputs["enc_boxes"],
    )
    return total, loss_dict


def _max_relative_difference(expected: torch.Tensor, actual: torch.Tensor) -> float:
    scale = expected.abs().clamp(min=1e-12)
    return ((expected - actual).abs() / scale).max().item()


@pytest.mark.parametrize(
    ("overrides", "sizes", "seed"),
    [
        ({}, [4, 0, 7], 0),  # group_detr=4, auxiliary loss, one image without objects
        ({}, [1, 12, 3], 1),
        ({"group_detr": 1}, [2, 5, 0], 2),
        ({"auxiliary_loss": False}, [3, 3, 3], 3),
        ({}, [0, 0, 0], 4),  # a batch without any object
    ],
)
def test_loss_matches_reference(overrides, sizes, seed):
    config = _config(**overrides)
    generator = torch.Generator().manual_seed(seed)
    labels = _random_labels(sizes, generator)
    outputs = _random_outputs(config, len(sizes), generator)

    ref_total, ref_dict = _reference(config, outputs, labels)
    our_total, our_dict = _ours(config, outputs, labels)

    assert list(our_dict) == list(ref_dict)
    for key, expected in ref_dict.items():
        assert our_dict[key].shape == expected.shape, key
        assert _max_relative_difference(expected, our_dict[key]) <= 1e-5, key
    assert _max_relative_difference(ref_total, our_total) <= 1e-5

    inputs = list(outputs.values())
    ref_grads = torch.autograd.grad(ref_total, inputs)
    our_grads = torch.autograd.grad(our_total, inputs)
    for name, expected, actual in zip(outputs, ref_grads, our_grads):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-7, msg=f"gradient w.r.t. {name}")


def test_total_is_weighted_sum_of_terms():
    config = _config()
    generator = torch.Generator().manual_seed(5)
    total, loss_dict = _ours(config, _random_outputs(config, 2, generator), _random_labels([3, 2], generator))
    weights = {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}  # the nano config's coefficients

    def weight(key):  # "loss_bbox_0" and "loss_bbox_enc" weigh like "loss_bbox"; cardinality_error not at all
        return next((w for base, w in weights.items() if key == base or key.startswith(base + "_")), 0)

    expected = sum(value * weight(key) for key, value in loss_dict.items())
    torch.testing.assert_close(total, expected)
    assert not loss_dict["cardinality_error"].requires_grad


def test_matcher_matches_reference():
    generator = torch.Generator().manual_seed(6)
    group_detr, batch_size, queries = 3, 3, 3 * 8
    logits = 3 * torch.randn(batch_size, queries, NUM_LABELS, generator=generator)
    logits[0, 1, 2] = float("nan")  # NaN costs are replaced by the dtype's max, not an error
    boxes = torch.randn(batch_size, queries, 4, generator=generator).sigmoid()
    targets = _random_labels([5, 0, 10], generator)  # 10 > 8 queries per group: some targets stay unmatched

    expected = LwDetrHungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)(
        {"logits": logits, "pred_boxes": boxes}, targets, group_detr
    )
    actual = HungarianMatcher(2, 5, 2).match(logits, boxes, targets, group_detr)

    assert len(actual) == batch_size
    for (ref_pred, ref_target), (pred, target) in zip(expected, actual):
        assert pred.dtype == target.dtype == torch.int64
        assert torch.equal(pred, ref_pred) and torch.equal(target, ref_target)


def test_matcher_rejects_bad_groups_and_costs():
    with pytest.raises(ValueError, match="non-zero"):
        HungarianMatcher(0, 0, 0)
    logits, boxes = torch.zeros(1, 10, NUM_LABELS), torch.full((1, 10, 4), 0.5)
    with pytest.raises(ValueError, match="equal groups"):
        HungarianMatcher(1, 1, 1).match(logits, boxes, _random_labels([2], torch.Generator()), group_detr=3)


def _random_xyxy(n: int, generator: torch.Generator) -> torch.Tensor:
    corners = torch.rand(n, 2, generator=generator)
    return torch.cat([corners, corners + 0.5 * torch.rand(n, 2, generator=generator)], dim=-1)


def test_box_formats_round_trip_and_area():
    generator = torch.Generator().manual_seed(7)
    xyxy = _random_xyxy(50, generator)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(xyxy)), xyxy)
    cxcywh = torch.rand(4, 6, 4, generator=generator)  # any leading dimensions
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    torch.testing.assert_close(box_area(box_cxcywh_to_xyxy(cxcywh)), cxcywh[..., 2] * cxcywh[..., 3])
    assert box_area(xyxy.half()).dtype == torch.float32
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([0.5, 0.5, 0.2, 0.4])), torch.tensor([0.4, 0.3, 0.6, 0.7]))


def test_pairwise_and_paired_overlaps():
    generator = torch.Generator().manual_seed(8)
    boxes1, boxes2 = _random_xyxy(40, generator), _random_xyxy(40, generator)
    boxes2[:5] = boxes1[:5]  # identical pairs: IoU = GIoU = 1
    boxes2[5] = torch.tensor([5.0, 5.0, 6.0, 6.0])  # far away: IoU 0, GIoU < 0

    iou, union = box_iou(boxes1, boxes2)
    ref_iou, ref_union = ref_box_iou(boxes1, boxes2)
    assert torch.equal(iou, ref_iou) and torch.equal(union, ref_union)
    assert torch.equal(generalized_box_iou(boxes1, boxes2), ref_generalized_box_iou(boxes1, boxes2))

    paired_iou, paired_union = paired_box_iou(boxes1, boxes2)
    assert torch.equal(paired_iou, iou.diagonal()) and torch.equal(paired_union, union.diagonal())
    giou = paired_generalized_box_iou(boxes1, boxes2)
    assert torch.equal(giou, generalized_box_iou(boxes1, boxes2).diagonal())
    torch.testing.assert_close(giou[:5], torch.ones(5))
    assert paired_iou[5] == 0 and giou[5] < 0
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        paired_box_iou(boxes1, boxes2[:1])


def test_saturated_logits_stay_finite():
    """Where sigmoid rounds to 0 or 1 the reference's log() gives inf/NaN; ours must give the exact value."""
    config = _config(auxiliary_loss=False, group_detr=1)
    generator = torch.Generator().manual_seed(9)
    labels = _random_labels([2, 3], generator)
    logits = 3 * torch.randn(2, config.num_queries, NUM_LABELS, generator=generator)
    logits[0, :5] = 25.0  # confident wrong or right: 1 - sigmoid rounds to 0 in float32
    logits[1, :5] = -120.0  # sigmoid underflows to 0 in float32
    boxes = torch.randn(2, config.num_queries, 4, generator=generator).sigmoid()

    def loss_and_grad(dtype):
        leaf = logits.to(dtype).requires_grad_()
        total, loss_dict = detection_loss(config, leaf, boxes.to(dtype), labels)
        return loss_dict["loss_ce"], torch.autograd.grad(total, leaf)[0]

    loss32, grad32 = loss_and_grad(torch.float32)
    loss64, grad64 = loss_and_grad(torch.float64)  # float64 does not saturate at these logits
    assert torch.isfinite(loss32) and torch.isfinite(grad32).all()
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad32.double(), grad64, rtol=1e-3, atol=1e-6)


def test_half_precision_runs():
    config = _config(auxiliary_loss=False, group_detr=2)
    generator = torch.Generator().manual_seed(10)
    queries = config.num_queries * 2
    logits = (3 * torch.randn(2, queries, NUM_LABELS, generator=generator)).bfloat16()
    boxes = torch.randn(2, queries, 4, generator=generator).sigmoid().bfloat16()
    total, _ = detection_loss(config, logits, boxes, _random_labels([2, 1], generator), group_detr=2)
    assert torch.isfinite(total)


def test_num_boxes_is_averaged_over_processes(tmp_path):
    """Runs the all-reduce branch in a one-process gloo group."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert _average_num_boxes(12, torch.device("cpu")) == 12.0
        assert _average_num_boxes(0, torch.device("cpu")) == 1.0
    finally:
        torch.distributed.destroy_process_group()


def _one_image_call(config, labels, **kwargs):
    logits, boxes = torch.zeros(1, 8, NUM_LABELS), torch.full((1, 8, 4), 0.5)
    return detection_loss(config, logits, boxes, labels, **kwargs)


def _target(classes, boxes):
    return [{"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes, dtype=torch.float32)}]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (_target([1], [[0.5, 0.5, 1.2, 0.3]]), r"\[0, 1\]"),  # outside the image (pixel boxes?)
        (_target([1], [[0.5, -0.1, 0.2, 0.3]]), r"\[0, 1\]"),
        (_target([1], [[float("nan"), 0.5, 0.2, 0.3]]), r"\[0, 1\]"),
        (_target([1, 2], [[0.5, 0.5, 0.2, 0.3]]), "must be \\[n\\] with n = 1"),  # count mismatch
        (_target([1], [[0.5, 0.5, 0.2]]), r"\[n, 4\]"),
        (_target([NUM_LABELS], [[0.5, 0.5, 0.2, 0.3]]), "outside \\[0, num_labels=5\\)"),
        (_target([-1], [[0.5, 0.5, 0.2, 0.3]]), "outside \\[0, num_labels=5\\)"),
        ([{"class_labels": torch.tensor([0.0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}], "integer"),
        ([{"boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}], "'class_labels' and 'boxes'"),
        (_target([1], [[0.5, 0.5, 0.2, 0.3]]) * 2, "2 label dicts for a batch of 1"),
    ],
)
def test_invalid_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        _one_image_call(_config(auxiliary_loss=False), labels)


def test_invalid_outputs_raise():
    labels = _target([1], [[0.5, 0.5, 0.2, 0.3]])
    with pytest.raises(ValueError, match="aux_logits and aux_boxes"):
        _one_image_call(_config(), labels)
    all_layers = torch.zeros(3, 1, 8, NUM_LABELS), torch.full((3, 1, 8, 4), 0.5)  # last layer wrongly included
    with pytest.raises(ValueError, match="without the last one"):
        _one_image_call(_config(), labels, aux_logits=all_layers[0], aux_boxes=all_layers[1])
    with pytest.raises(ValueError, match="both enc_logits and enc_boxes"):
        _one_image_call(_config(auxiliary_loss=False), labels, enc_logits=torch.zeros(1, 8, NUM_LABELS))
    with pytest.raises(ValueError, match="logits must be"):
        detection_loss(_config(auxiliary_loss=False), torch.zeros(1, 8, 3), torch.zeros(1, 8, 4), labels)


def test_empty_targets_given_as_lists():
    config = _config(auxiliary_loss=False, group_detr=1)
    total, loss_dict = _one_image_call(config, [{"class_labels": [], "boxes": []}])
    assert torch.isfinite(total) and loss_dict["loss_bbox"] == 0 and loss_dict["loss_giou"] == 0


def _saturated_outputs(generator: torch.Generator, queries: int = 40) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Logits up to ~12 (sigmoid 1 - 6e-6, which rounds to exactly 1 in float16) and targets the confident
    queries already predict: the case where half-precision costs turn the best pairs into the worst."""
    logits = torch.randn(2, queries, NUM_LABELS, generator=generator) - 4
    boxes = (0.2 + 0.6 * torch.rand(2, queries, 4, generator=generator)).clamp(0.05, 0.95)
    labels = []
    for image in range(2):
        confident = torch.arange(image, queries, 7)[:4]
        classes = torch.randint(0, NUM_LABELS, (len(confident),), generator=generator)
        logits[image, confident, classes] = 11 + torch.rand(len(confident), generator=generator)
        labels.append({"class_labels": classes, "boxes": boxes[image, confident] + 0.01})
    return logits, boxes, labels


def test_float16_matching_equals_float32():
    logits, boxes, labels = _saturated_outputs(torch.Generator().manual_seed(3))
    matcher = HungarianMatcher(class_cost=2, bbox_cost=5, giou_cost=2)
    expected = matcher.match(logits, boxes, labels, group_detr=2)
    assert torch.sigmoid(logits.half()).max() == 1  # the inputs do saturate in float16
    for got in (
        matcher.match(logits.half(), boxes.half(), labels, group_detr=2),
        matcher.match(logits.bfloat16(), boxes.bfloat16(), labels, group_detr=2),
    ):
        for (pred, target), (pred32, target32) in zip(got, expected):
            assert torch.equal(pred, pred32) and torch.equal(target, target32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_loss_equals_float32_loss_on_saturated_logits(dtype):
    """The loss of half-precision outputs (as autocast hands them over) is the float32 loss of those outputs."""
    config = _config(auxiliary_loss=False, group_detr=2)
    logits, boxes, labels = _saturated_outputs(torch.Generator().manual_seed(4), queries=config.num_queries * 2)
    reference, _ = detection_loss(config, logits, boxes, labels, group_detr=2)
    with torch.autocast("cpu", dtype=dtype):
        half, _ = detection_loss(config, logits.to(dtype), boxes.to(dtype), labels, group_detr=2)
    assert half.dtype == torch.float32
    # only the rounding of the inputs to half precision differs (was x4 for float16 before matching in float32)
    assert abs(half.item() - reference.item()) <= 0.05 * reference.item()
