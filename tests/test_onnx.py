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


def test_onnxruntime_matches_pytorch(nano: LwDetrForObjectDetection, tmp_path: Path) -> None:
    side = 4 * nano.model.backbone.backbone.size_divisor
    path = export_onnx(nano, tmp_path / "nano.onnx", image_size=(side, side))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "pred_boxes"]
    for batch in (1, 2):
        pixels = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = nano(pixel_values=pixels)
        logits, boxes = session.run(None, {"pixel_values": pixels.numpy()})
        np.testing.assert_allclose(logits, expected.logits.numpy(), atol=1e-3, rtol=0)
        np.testing.assert_allclose(boxes, expected.pred_boxes.numpy(), atol=1e-3, rtol=0)


def test_old_opset_is_refused(nano: LwDetrForObjectDetection, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grid_sample"):
        export_onnx(nano, tmp_path / "nano.onnx", opset=13)
