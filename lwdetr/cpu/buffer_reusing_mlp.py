"""Two-layer MLP (linear, activation, linear) for training on the CPU, with a backward that allocates no
[rows, hidden] tensor.

Autograd's backward of `fc2(act(fc1(x)))` allocates two fresh [rows, hidden] tensors (the gradient of the
activation's output, then of its input). At LW-DETR's training sizes these are 20-43 MB each (the decoder's FFN
with Group DETR's 13 query groups: 5200 x 2048 floats), and glibc hands blocks that large out as fresh mmaps
(always above 32 MB) that fault in page by page: up to 15 ms per block on a 2-core machine, more than the
element-wise work on them.

Here the backward takes fc2's weight gradient first, after which the activation's output (saved for it) is dead: the
hidden gradient is computed in row chunks of cache size and written over it, and fc1's gradients and the input
gradient are then read from that same buffer. The arithmetic is the one autograd does (the same ops on the same
values; in the tests the gradients come out bitwise equal). Calling backward twice on one graph
(`retain_graph=True`) raises autograd's "modified by an inplace operation" error instead of returning wrong
gradients; double backward is unsupported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .guards import outside_tracing_on_cpu

__all__ = ["buffer_reusing_mlp_applies", "buffer_reusing_mlp"]

_CHUNK_ROWS = 512  # rows of the hidden gradient computed at once: 0.4-4 MB at LW-DETR's widths (L2 to L3 sized)


def _activation_name(act: nn.Module) -> str | None:
    """The activation's name in this module's terms, or None for one it does not handle."""
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return None


def buffer_reusing_mlp_applies(x: torch.Tensor, fc1: nn.Linear, act: nn.Module) -> bool:
    """Whether `buffer_reusing_mlp` serves this call: a CPU training step (something needs a gradient) outside
    tracing and compiling, without autocast, all in one floating dtype, with a supported activation."""
    return (
        torch.is_grad_enabled()
        and (x.requires_grad or fc1.weight.requires_grad)
        and outside_tracing_on_cpu(x)
        and not torch.is_autocast_enabled("cpu")
        and x.dtype == fc1.weight.dtype
        and x.is_floating_point()
        and _activation_name(act) is not None
    )


def buffer_reusing_mlp(rows: torch.Tensor, fc1: nn.Linear, act: nn.Module, fc2: nn.Linear) -> torch.Tensor:
    """fc2(act(fc1(rows))) for rows [n, in] -> [n, out], with the backward described in the module docstring."""
    name = _activation_name(act)
    if name is None:
        raise ValueError(f"buffer_reusing_mlp supports ReLU, SiLU and GELU, not {type(act).__name__}")
    return _BufferReusingMLP.apply(rows.contiguous(), fc1.weight, fc1.bias, fc2.weight, fc2.bias, name)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, x, weight.t()) if bias is not None else x.mm(weight.t())


def _activation_backward(grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor, name: str, out: torch.Tensor):
    """out = d act / d pre * grad, for one chunk of rows (`out` may be `post` itself)."""
    if name == "relu":  # from the output: positive exactly where the input was
        torch.ops.aten.threshold_backward.grad_input(grad, post, 0, grad_input=out)
    elif name == "silu":
        torch.ops.aten.silu_backward.grad_input(grad, pre, grad_input=out)
    else:
        approximate = "tanh" if name == "gelu_tanh" else "none"
        torch.ops.aten.gelu_backward.grad_input(grad, pre, approximate=approximate, grad_input=out)


class _BufferReusingMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight1, bias1, weight2, bias2, name: str):
        pre = _linear(rows, weight1, bias1)
        if name == "relu":
            post = pre.relu_()  # the backward needs only the output; fc1's backward needs neither
        elif name == "silu":
            post = F.silu(pre)
        else:
            post = F.gelu(pre, approximate="tanh" if name == "gelu_tanh" else "none")
        ctx.name = name
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.save_for_backward(rows, weight1, weight2, pre, post)
        return _linear(post, weight2, bias2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        rows, weight1, weight2, pre, post = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        needs = ctx.needs_input_grad
        grad_w2 = grad_out.t().mm(post) if needs[3] else None
        grad_b2 = grad_out.sum(0) if needs[4] and ctx.has_bias[1] else None
        if not (needs[0] or needs[1] or needs[2]):
            return None, None, None, grad_w2, grad_b2, None
        # `post` is dead from here on: it becomes the gradient of fc1's output, chunk by chunk
        hidden_grad = post
        scratch = grad_out.new_empty(min(_CHUNK_ROWS, grad_out.shape[0]), weight2.shape[1])
        for start in range(0, grad_out.shape[0], _CHUNK_ROWS):
            stop = start + _CHUNK_ROWS
            chunk = scratch[: min(stop, grad_out.shape[0]) - start]
            torch.mm(grad_out[start:stop], weight2, out=chunk)
            _activation_backward(chunk, pre[start:stop], post[start:stop], ctx.name, hidden_grad[start:stop])
        grad_rows = hidden_grad.mm(weight1) if needs[0] else None
        grad_w1 = hidden_grad.t().mm(rows) if needs[1] else None
        grad_b1 = hidden_grad.sum(0) if needs[2] and ctx.has_bias[0] else None
        return grad_rows, grad_w1, grad_b1, grad_w2, grad_b2, None
