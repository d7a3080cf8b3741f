"""Softmax attention for LW-DETR's short heads on our compiled kernels, faster than PyTorch's CPU flash attention
(`benchmarks/bench.py`): float32 with autograd (AVX-512, or the portable kernel built for AVX2; head sizes 16
to 64) and a bfloat16 forward (AMX, head
size 16). `attention_kernel` picks the one for a call, or None: PyTorch's attention runs then."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .build import ATTENTION_AMX_BF16, ATTENTION_AVX512, ATTENTION_PORTABLE, check, library, load

__all__ = ["AttentionFn", "amx_attention", "attention_kernel", "kernel_attention"]

AttentionFn = Callable[[torch.Tensor, int], torch.Tensor]
_FLOAT32_HEAD_SIZES = (16, 32, 48, 64)
_AMX_HEAD_SIZES = (16,)


def attention_kernel(head_dim: int, dtype: torch.dtype = torch.float32, needs_grad: bool = False) -> AttentionFn | None:
    """The compiled attention for heads of `head_dim` features in `dtype` on this machine, or None.

    float32: `kernel_attention` (with autograd), head sizes 16, 32, 48, 64: AVX-512, or the portable kernel.
    bfloat16: `amx_attention`
    (inference only, so None when the caller `needs_grad`), head size 16, AMX.
    """
    if dtype == torch.float32 and head_dim in _FLOAT32_HEAD_SIZES and _float32_build() is not None:
        return kernel_attention
    amx = dtype == torch.bfloat16 and not needs_grad and head_dim in _AMX_HEAD_SIZES
    if amx and load(ATTENTION_AMX_BF16) is not None:
        return amx_attention
    return None


def _float32_build():
    """The float32 attention build that runs here: the AVX-512 kernel, else the portable one; None when neither."""
    return next((build for build in (ATTENTION_AVX512, ATTENTION_PORTABLE) if load(build) is not None), None)


def _sizes(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int, float, int]:
    """The kernels' size arguments; checks that qkv is a CPU [batch, tokens, 3 * num_heads * head_dim] tensor."""
    if qkv.device.type != "cpu" or qkv.dim() != 3 or qkv.shape[2] % (3 * num_heads):
        raise ValueError(f"qkv must be a CPU [batch, tokens, 3 * {num_heads} * head_dim] tensor, got {qkv.shape}")
    batch, tokens, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = dim // num_heads
    return batch, num_heads, tokens, head_dim, head_dim**-0.5, torch.get_num_threads()


def _forward(qkv: torch.Tensor, num_heads: int, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv: contiguous float32 [batch, tokens, 3 * dim] -> (out [batch, tokens, dim], lse [batch, heads, tokens])."""
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    lse = qkv.new_empty(qkv.shape[0], num_heads, qkv.shape[1]) if with_lse else None
    status = library(_float32_build() or ATTENTION_AVX512).lwdetr_attention_forward(
        qkv.data_ptr(), out.data_ptr(), None if lse is None else lse.data_ptr(), *_sizes(qkv, num_heads)
    )
    check(status, "forward")
    return out, lse


class _KernelAttention(torch.autograd.Function):
    """Autograd for the kernel: the forward keeps each row's log-sum-exp, the backward recomputes the scores."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
        out, lse = _forward(qkv, num_heads, with_lse=True)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads = num_heads
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        qkv, out, lse = ctx.saved_tensors
        grad_out = grad_out.to(torch.float32).contiguous()
        grad_qkv = torch.empty_like(qkv)
        status = library(_float32_build() or ATTENTION_AVX512).lwdetr_attention_backward(
            qkv.data_ptr(), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(), grad_qkv.data_ptr(),
            *_sizes(qkv, ctx.num_heads),
        )  # fmt: skip
        check(status, "backward")
        return grad_qkv, None


def kernel_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax attention (scale 1/sqrt(head_dim), no mask) with the compiled kernel, with autograd.

    qkv: [batch, tokens, 3 * dim], the fused projection's output (q, k, v each `num_heads` heads wide), on the CPU
    -> [batch, tokens, dim] in the input's dtype. Computes in float32.
    """
    dtype = qkv.dtype
    qkv = qkv.to(torch.float32).contiguous()
    if torch.is_grad_enabled() and qkv.requires_grad:
        out = _KernelAttention.apply(qkv, num_heads)
    else:
        out, _ = _forward(qkv, num_heads, with_lse=False)
    return out.to(dtype)


def amx_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax attention for bfloat16 [batch, tokens, 3 * dim] (head_dim 16) on AMX -> bfloat16
    [batch, tokens, dim]. Scores and softmax in float32; no autograd."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError("amx_attention has no backward; use it under torch.no_grad()")
    qkv = qkv.to(torch.bfloat16).contiguous()
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    amx = library(ATTENTION_AMX_BF16)
    status = amx.lwdetr_attention_forward_amx(qkv.data_ptr(), out.data_ptr(), *_sizes(qkv, num_heads))
    check(status, "AMX forward")
    return out
