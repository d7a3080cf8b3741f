"""Small building blocks shared by the encoder, projector and decoder."""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["activation_layer", "MLP", "ConvBnAct", "refine_boxes", "outside_tracing_on_cpu"]

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


def outside_tracing_on_cpu(x: torch.Tensor) -> bool:
    """Whether `x` is on the CPU outside tracing (ONNX) and `torch.compile`, which should see the plain ops that
    our kernels (`cpu_kernels`) and oneDNN's fused ones replace."""
    return x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


# oneDNN's names for the activations it can apply inside a convolution
_ONEDNN_ACTIVATIONS: dict[type[nn.Module], str] = {nn.SiLU: "swish", nn.ReLU: "relu", nn.Identity: "none"}


class ConvBnAct(nn.Module):
    """Conv2d (no bias, 'same' padding) -> BatchNorm2d -> activation."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, activation: str | None, eps: float):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_ch, eps=eps)
        self.activation = activation_layer(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_usable(x):
            return self.fused_forward(x)
        return self.activation(self.norm(self.conv(x)))

    def fused_usable(self, x: torch.Tensor) -> bool:
        return (
            not self.training
            and not torch.is_grad_enabled()
            and outside_tracing_on_cpu(x)
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.dtype == self.conv.weight.dtype
            and not torch.is_autocast_enabled("cpu")
            and torch.backends.mkldnn.is_available()
            and type(self.activation) in _ONEDNN_ACTIVATIONS
        )

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference in one oneDNN convolution: BatchNorm folded into the weights and bias (`gamma (W x - mean) /
        sqrt(var + eps) + beta`), the activation applied as the convolution writes its output, weights prepacked."""
        conv = self.conv
        weight, bias = self.fused_weights(tuple(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            _ONEDNN_ACTIVATIONS[type(self.activation)], [], "",
        )  # fmt: skip

    def fused_weights(self, input_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(packed folded weight, folded bias), cached per input shape and keyed by the parameters' storage and
        version counters (loading or training the weights refolds them); kept outside the module like the ViT's."""
        conv, norm = self.conv, self.norm
        sources = (conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        key = (input_shape, *((t.data_ptr(), t._version, t.dtype) for t in sources))
        cached = _FOLDED_CONVS.get(self)
        if cached is None or cached[0] != key:
            factor = (norm.running_var.float() + norm.eps).rsqrt() * norm.weight.float()
            weight = (conv.weight.float() * factor[:, None, None, None]).to(conv.weight.dtype)
            bias = (norm.bias.float() - norm.running_mean.float() * factor).to(conv.weight.dtype)
            weight = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(input_shape)
            )
            cached = _FOLDED_CONVS[self] = (key, (weight, bias))
        return cached[1]


_FOLDED_CONVS: weakref.WeakKeyDictionary[ConvBnAct, tuple[tuple, tuple[torch.Tensor, torch.Tensor]]] = (
    weakref.WeakKeyDictionary()
)


def refine_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Apply box deltas to anchor boxes, both cxcywh: shift the centre by `d_xy * wh`, scale the size by `exp(d_wh)`.

    anchors: [..., 4], deltas: [..., 4] (broadcastable) -> [..., 4].
    """
    centre = deltas[..., :2] * anchors[..., 2:] + anchors[..., :2]
    size = deltas[..., 2:].exp() * anchors[..., 2:]
    return torch.cat((centre, size), dim=-1)
