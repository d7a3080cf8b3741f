"""ONNX export: onnxruntime reproduces the PyTorch outputs of a random nano model, at more than one batch size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lwdetr.config import preset_config
from lwdetr.modeling import LwDetrForObjectDetection
from lwdetr.onnx_export import export_onnx

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def nano() -> LwDetrForObjectDetection:
    torch.manual_seed(0)
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=5)).eval()
    with torch.no_grad():  # off the zero init, so that the box heads and deformable offsets matter
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def _proposal_score_gap(model: LwDetrForObjectDetection, pixels: torch.Tensor) -> float:
    """Smallest gap between neighbouring encoder proposal scores among the top k + 1 of any image."""
    seen = []
    hook = model.model.encoder_heads.enc_out_class_embed[0].register_forward_hook(
        lambda module, args, output: seen.append(output.max(-1).values)
    )
    with torch.no_grad():
        model(pixel_values=pixels)
    hook.remove()
    token_scores = seen[0]  # the first call scores every token; a second one re-scores the winners
    k = model.config.num_queries
    top = token_scores.sort(dim=1, descending=True).values[:, : k + 1]
    return float((top[:, :-1] - top[:, 1:]).min())


def _well_conditioned_pixels(model: LwDetrForObjectDetection, batch: int, side: int) -> torch.Tensor:
    """Random pixels whose top-k proposal selection has no near-tie.

    With random weights two proposals can score within 1e-5 of each other; then a rounding difference of 1e-6
    between any two correct implementations legitimately swaps them (each query slot has its own learned
    embedding, so the swap changes outputs). Such inputs test nothing about the export, so they are skipped.
    """
    for seed in range(100):
        pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))
        if _proposal_score_gap(model, pixels) > 1e-4:
            return pixels
    raise AssertionError("no well-conditioned input found in 100 seeds")


def test_onnxruntime_matches_pytorch(nano: LwDetrForObjectDetection, tmp_path: Path) -> None:
    side = 4 * nano.model.backbone.backbone.size_divisor
    path = export_onnx(nano, tmp_path / "nano.onnx", image_size=(side, side))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "pred_boxes"]
    for batch in (1, 2):
        pixels = _well_conditioned_pixels(nano, batch, side)
        with torch.no_grad():
            expected = nano(pixel_values=pixels)
        logits, boxes = session.run(None, {"pixel_values": pixels.numpy()})
        np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-3, rtol=0)
        np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), atol=1e-3, rtol=0)


def test_old_opset_is_refused(nano: LwDetrForObjectDetection, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grid_sample"):
        export_onnx(nano, tmp_path / "nano.onnx", opset=13)
