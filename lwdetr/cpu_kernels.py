"""Hand-written CPU kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

One kernel so far: softmax attention, forward and backward, for head sizes 16, 32, 48 and 64 on AVX-512 CPUs
(`kernels/attention_avx512.c`); for LW-DETR's head_dim 16 it is faster than PyTorch's CPU flash attention
(see `benchmarks/bench.py`). Everything here is optional: without x86-64 Linux, AVX-512, a C compiler or
PyTorch's OpenMP runtime, or with `LWDETR_CPU_KERNELS=0`, `attention_kernel()` returns None and the model uses
`F.scaled_dot_product_attention`. The compiled library is cached under `$LWDETR_CACHE` (default
`~/.cache/lwdetr/kernels`), keyed by the source and compiler flags, and written atomically.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["attention_kernel", "kernel_attention"]

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("kernels") / "attention_avx512.c"
_FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mfma", "-fopenmp", "-fPIC", "-shared"]
_HEAD_SIZES = (16, 32, 48, 64)

AttentionFn = Callable[[torch.Tensor, int], torch.Tensor]


def _cache_dir() -> Path:
    if os.environ.get("LWDETR_CACHE"):
        return Path(os.environ["LWDETR_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lwdetr" / "kernels"


def _openmp_runtime_loaded() -> bool:
    """Whether PyTorch runs on an OpenMP runtime (libgomp, or Intel's libiomp5, which serves GOMP calls too).

    The kernel's parallel region must run on the runtime PyTorch's own ops use: a second runtime would bring a
    second set of threads, which fight the first one's spinning workers for the same cores.
    """
    try:
        with open("/proc/self/maps") as maps:
            return any(re.search(r"/lib(gomp|iomp5)[^/]*\.so", line) for line in maps)
    except OSError:
        return False


def _supported_machine() -> bool:
    return (
        os.environ.get("LWDETR_CPU_KERNELS", "1") != "0"
        and platform.system() == "Linux"
        and platform.machine() in ("x86_64", "AMD64")
        and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
        and _openmp_runtime_loaded()
    )


def _compile(source: Path) -> Path:
    """The shared library built from `source`, from the cache when an identical build is there."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    key = hashlib.sha256(source.read_bytes() + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run(
            [compiler, *_FLAGS, "-o", str(built), str(source)], capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole library
    return target


@functools.cache
def _attention_library() -> ctypes.CDLL | None:
    if not _supported_machine():
        return None
    try:
        library = ctypes.CDLL(str(_compile(_SOURCE)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.info("CPU attention kernel unavailable, using PyTorch's attention: %s", error)
        return None
    sizes = [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    library.lwdetr_attention_forward.argtypes = [ctypes.c_void_p] * 3 + sizes
    library.lwdetr_attention_backward.argtypes = [ctypes.c_void_p] * 5 + sizes
    for function in (library.lwdetr_attention_forward, library.lwdetr_attention_backward):
        function.restype = ctypes.c_int
    return library


def attention_kernel(head_dim: int) -> AttentionFn | None:
    """`kernel_attention` when the compiled kernel can serve heads of `head_dim` features here, else None."""
    if head_dim not in _HEAD_SIZES or _attention_library() is None:
        return None
    return kernel_attention


def _library() -> ctypes.CDLL:
    library = _attention_library()
    if library is None:
        raise RuntimeError("the CPU attention kernel is not available on this machine")
    return library


def _check(status: int, what: str) -> None:
    if status != 0:
        reason = "out of memory" if status == 1 else "unsupported shape"
        raise RuntimeError(f"CPU attention kernel ({what}) failed: {reason}")


def _sizes(qkv: torch.Tensor, num_heads: int) -> tuple[int, int, int, int, float, int]:
    batch, tokens, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = dim // num_heads
    return batch, num_heads, tokens, head_dim, head_dim**-0.5, torch.get_num_threads()


def _forward(qkv: torch.Tensor, num_heads: int, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv: contiguous float32 [batch, tokens, 3 * dim] -> (out [batch, tokens, dim], lse [batch, heads, tokens])."""
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    lse = qkv.new_empty(qkv.shape[0], num_heads, qkv.shape[1]) if with_lse else None
    status = _library().lwdetr_attention_forward(
        qkv.data_ptr(), out.data_ptr(), None if lse is None else lse.data_ptr(), *_sizes(qkv, num_heads)
    )
    _check(status, "forward")
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
        status = _library().lwdetr_attention_backward(
            qkv.data_ptr(), out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(), grad_qkv.data_ptr(),
            *_sizes(qkv, ctx.num_heads),
        )  # fmt: skip
        _check(status, "backward")
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
