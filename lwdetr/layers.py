"""Small building blocks shared by the encoder, projector and decoder."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .cpu_features import native_bfloat16

__all__ = [
    "activation_layer",
    "MLP",
    "ConvBnAct",
    "refine_boxes",
    "outside_tracing_on_cpu",
    "onednn_usable",
    "derived_weights",
    "weights_generation",
    "pack_linear_weight",
    "pack_conv_weight",
]

T = TypeVar("T")

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


def onednn_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN's fused kernels (a GEMM or convolution that also adds the bias, applies the activation or adds
    a residual) may run on `x`: CPU inference only, as they have no autograd formula and know nothing of autocast
    (they need input and weight in one dtype)."""
    return (
        outside_tracing_on_cpu(x)
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dtype == weight.dtype
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and torch.backends.mkldnn.is_available()
        # oneDNN's bf16 kernels raise on CPUs without AVX-512 or avx_ne_convert (AVX2-only machines)
        and (x.dtype != torch.bfloat16 or native_bfloat16())
    )


# owner module -> (key, value): weights derived for inference (folded, packed), kept outside the modules so that
# copies and state dicts never see them, and dropped with their module
_DERIVED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]] = weakref.WeakKeyDictionary()
_optimizer_steps = 0


def _count_optimizer_step(*_: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (torch.optim.AdamW(fused=True), transformers.Trainer's default) update parameters without bumping
# their version counters, so a version alone would keep serving weights packed before the step.
register_optimizer_step_post_hook(_count_optimizer_step)


def weights_generation() -> int:
    """The number of optimizer steps taken so far in this process (any optimizer): part of every cache key of
    tensors derived from parameters, with their version counters."""
    return _optimizer_steps


def derived_weights(owner: nn.Module, sources: tuple[torch.Tensor | None, ...], build: Callable[[], T], *extra) -> T:
    """`build()`, cached for `owner` until a source tensor changes: the key holds each source's storage, version
    counter (bumped by in-place edits: load_state_dict, unfused optimizer steps) and dtype, the optimizer steps taken
    (`weights_generation`), plus `extra`."""
    key = (*extra, weights_generation(), *((t.data_ptr(), t._version, t.dtype) for t in sources if t is not None))
    cached = _DERIVED_WEIGHTS.get(owner)
    if cached is None or cached[0] != key:
        cached = _DERIVED_WEIGHTS[owner] = (key, build())
    return cached[1]


def pack_linear_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """An [out, in] weight in oneDNN's blocked layout for `torch.ops.mkldnn._linear_pointwise`, which then skips
    reordering it on every call; `rows` hints the GEMM's M."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def pack_conv_weight(weight: torch.Tensor, geometry: tuple, input_shape: list[int]) -> torch.Tensor:
    """A convolution weight in oneDNN's blocked layout for `torch.ops.mkldnn._convolution_pointwise`;
    `geometry` is (padding, stride, dilation, groups) as lists and an int."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, input_shape)


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
        if not self.training and onednn_usable(x, self.conv.weight) and type(self.activation) in _ONEDNN_ACTIVATIONS:
            return self.fused_forward(x)
        return self.activation(self.norm(self.conv(x)))

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference in one oneDNN convolution: BatchNorm folded into the weights and bias (`gamma (W x - mean) /
        sqrt(var + eps) + beta`), the activation applied as the convolution writes its output, weights packed."""
        conv, norm = self.conv, self.norm
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

        def fold() -> tuple[torch.Tensor, torch.Tensor]:
            factor = (norm.running_var.float() + norm.eps).rsqrt() * norm.weight.float()
            weight = (conv.weight.float() * factor[:, None, None, None]).to(conv.weight.dtype)
            bias = (norm.bias.float() - norm.running_mean.float() * factor).to(conv.weight.dtype)
            return pack_conv_weight(weight, geometry, list(x.shape)), bias

        sources = (conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
        weight, bias = derived_weights(self, sources, fold, tuple(x.shape))
        activation = _ONEDNN_ACTIVATIONS[type(self.activation)]
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, activation, [], "")


def refine_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """Apply box deltas to anchor boxes, both cxcywh: shift the centre by `d_xy * wh`, scale the size by `exp(d_wh)`.

    anchors: [..., 4], deltas: [..., 4] (broadcastable) -> [..., 4].
    """
    centre = deltas[..., :2] * anchors[..., 2:] + anchors[..., :2]
    size = deltas[..., 2:].exp() * anchors[..., 2:]
    return torch.cat((centre, size), dim=-1)
