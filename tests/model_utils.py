"""Shared helpers for model tests: a reference model and ours with identical, perturbed weights."""

from __future__ import annotations

import torch
import transformers

from lwdetr.checkpoint import from_reference_state_dict
from lwdetr.config import LwDetrConfig, preset_config
from lwdetr.modeling import LwDetrForObjectDetection


def perturbed_reference(config: LwDetrConfig, seed: int = 0) -> transformers.LwDetrForObjectDetection:
    """A reference model whose every parameter and BatchNorm statistic is moved off its (often zero) init,
    so that no zero-initialised layer can hide a bug."""
    torch.manual_seed(seed)
    model = transformers.LwDetrForObjectDetection(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
        for name, buffer in model.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
    return model


def twin_models(preset: str, num_labels: int = 7, seed: int = 0, **overrides):
    """(reference, ours) with the same weights."""
    config = preset_config(preset, num_labels=num_labels, **overrides)
    reference = perturbed_reference(config, seed)
    ours = LwDetrForObjectDetection(config)
    ours.load_state_dict(from_reference_state_dict(reference.state_dict()), strict=True)
    return reference, ours


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Max absolute difference over the reference tensor's scale (its max magnitude)."""
    scale = reference.detach().abs().max().clamp_min(1e-12)
    return ((ours.detach() - reference.detach()).abs().max() / scale).item()


def ragged_batch(height: int, width: int, step: int, batch: int = 2, seed: int = 0):
    """Random pixels and a padding mask in which every image after the first is smaller by a different amount."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(batch, 3, height, width, generator=generator)
    mask = torch.ones(batch, height, width, dtype=torch.long)
    for i in range(1, batch):
        mask[i, height - i * step // 2 :, :] = 0
        mask[i, :, width - i * step :] = 0
    return pixels, mask


def outputs_with_the_same_proposals(reference, ours, make_inputs, tries: int = 5, labels=None):
    """(reference outputs, our outputs) on the first input, of `make_inputs(seed)` for seed 0, 1, ..., on which both
    models select the same top-k proposals (the same `enc_outputs_coord_logits`). With `labels`, the models run with
    autograd and compute their losses (for training mode).

    Top-k order decides which learned query slot each proposal meets. Our inference kernels (channels-last
    convolutions, fused GEMMs) round differently from the reference's at the 1e-6 level, and with random weights
    and 300 queries two proposal scores are often closer than that: then the two models may legitimately swap
    those proposals, and the slots' outputs differ wholesale. Such an input tests nothing; a real bug in the
    selection never matches on any input and fails here.
    """
    for seed in range(tries):
        pixels, mask = make_inputs(seed)
        with torch.set_grad_enabled(labels is not None):
            expected = reference(pixel_values=pixels, pixel_mask=mask, labels=labels)
            got = ours(pixels, mask, labels=labels)
        if relative_error(got.enc_outputs_coord_logits, expected.enc_outputs_coord_logits) < 1e-4:
            return expected, got
    raise AssertionError(f"the models selected different proposals on each of {tries} inputs")


def random_labels(batch: int, num_labels: int, counts: list[int], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for i in range(batch):
        n = counts[i % len(counts)]
        centres = torch.rand(n, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(n, 2, generator=generator) * 0.3 + 0.05
        labels.append(
            {
                "class_labels": torch.randint(0, num_labels, (n,), generator=generator),
                "boxes": torch.cat((centres, sizes), -1),
            }
        )
    return labels


def missing_detections(
    found: list, reference: list, score_tolerance: float | None = 0.05, min_iou: float = 0.9
) -> list:
    """The detections of `reference` (one list per image) that `found` lacks: none of its detections of the same
    image has the same label, IoU >= `min_iou` and (unless `score_tolerance` is None) a score that close."""
    from lwdetr.box_ops import box_iou

    def matches(ours, expected) -> bool:
        close_score = score_tolerance is None or abs(ours.score - expected.score) <= score_tolerance
        iou = box_iou(torch.tensor([ours.box]), torch.tensor([expected.box]))[0].item()
        return ours.label_id == expected.label_id and close_score and iou >= min_iou

    return [e for ours, wanted in zip(found, reference) for e in wanted if not any(matches(d, e) for d in ours)]
