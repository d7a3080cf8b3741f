"""Small building blocks shared by the encoder, projector and decoder."""

from __future__ import annotations

import torch
from torch import nn

from . import cpu

__all__ = [
    "activation_layer",
    "MLP",
    "ConvBnAct",
    "refine_boxes",
]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}


def activation_layer(name: str | None, inplace: bool = False) -> nn.Module:
    """An activation module by config name (`None` gives the identity).

    `inplace=True` lets ReLU overwrite its input, which is safe after a linear layer (its backward needs only its
    inputs) and saves a full-size buffer; GELU and SiLU need their input for the backward and ignore it.
    """
    if name is None:
        return nn.Identity()
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; choose one of {', '.join(_ACTIVATIONS)}")
    return nn.ReLU(inplace=True) if name == "relu" and inplace else _ACTIVATIONS[name]()


class MLP(nn.Module):
    """`num_layers` linear layers with ReLU between them (the DETR box/reference-point heads)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out) for d_in, d_out in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last:
                x = torch.relu(x)
        return x


class ConvBnAct(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, activation: str | None, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_ch, eps=eps)
        self.activation = activation_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, in_ch, H, W] -> [batch, out_ch, H / stride, W / stride]."""
        if (fast := cpu.fast_conv_bn_act(self, x)) is not None:
            return fast
        return self.activation(self.norm(self.conv(x)))


def refine_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Apply box deltas to anchor boxes, both cxcywh: shift the centre by `d_xy * wh`, scale the size by `exp(d_wh)`.

    anchors: [..., 4], deltas: [..., 4] (broadcastable) -> [..., 4].
    """
    centre = deltas[..., :2] * anchors[..., 2:] + anchors[..., :2]
    size = deltas[..., 2:].exp() * anchors[..., 2:]
    return torch.cat((centre, size), dim=-1)
