"""ONNX export of `LwDetrForObjectDetection`: pixels in, class logits and normalised cxcywh boxes out."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

__all__ = ["OnnxMissingError", "export_onnx", "require_onnx"]

# torch's exporter serialises the graph through the onnx package, which the base install leaves out.
ONNX_MISSING = "ONNX export needs the onnx package: pip install onnx (or pip install 'lwdetr[onnx]')"


class OnnxMissingError(ImportError):
    """The onnx package is not installed; the message says what to install."""


def require_onnx() -> None:
    """Raise `OnnxMissingError` (one line) unless the onnx package can be imported."""
    if importlib.util.find_spec("onnx") is None:
        raise OnnxMissingError(ONNX_MISSING)


class _ExportWrapper(nn.Module):
    """Plain-tensor interface for tracing: pixel_values [B, 3, H, W] -> (logits [B, Q, C], pred_boxes [B, Q, 4])."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values=pixel_values)
        return out.logits, out.pred_boxes


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    image_size: tuple[int, int] = (640, 640),
    opset: int = 17,
) -> Path:
    """Write `model` (eval mode, fp32, CPU copy) to `path` with a dynamic batch axis; returns the path.

    The graph is traced at `image_size` (height, width): the image size is fixed in the exported graph (window
    and level shapes are baked in), the batch size is not. Inputs are the processor's normalised pixels without a
    padding mask. Uses the TorchScript-based exporter (`dynamo=False`), which handles `grid_sample` from opset 16.
    """
    if opset < 16:
        raise ValueError(f"opset {opset} is too old: grid_sample needs opset 16 or newer")
    require_onnx()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _ExportWrapper(copy.deepcopy(model).float().cpu().eval())
    dummy = torch.zeros(1, 3, *image_size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(path),
            input_names=["pixel_values"],
            output_names=["logits", "pred_boxes"],
            dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}, "pred_boxes": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path
