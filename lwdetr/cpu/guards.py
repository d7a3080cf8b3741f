"""The per-call checks every fast path asks first: does the call run eagerly on the CPU, and may oneDNN's fused
inference ops run on it. (What the machine itself can do is asked once, in `features`.)"""

from __future__ import annotations

import torch

from . import features

__all__ = ["onednn_usable", "outside_tracing_on_cpu"]


def outside_tracing_on_cpu(x: torch.Tensor) -> bool:
    """Whether `x` is on the CPU outside tracing (ONNX) and `torch.compile`, which should see the plain ops that
    our kernels and oneDNN's fused ones replace."""
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
        and (x.dtype != torch.bfloat16 or features.native_bfloat16())
    )
