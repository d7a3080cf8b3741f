"""Hand-written CPU kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

One kernel so far: softmax attention for head sizes 16..64 on AVX-512 CPUs (`kernels/attention_avx512.c`), which
runs the ViT's attention at inference about 1.2-1.8x faster than PyTorch's CPU flash attention for LW-DETR's
head_dim 16. Everything here is optional: without x86-64 Linux, AVX-512, a C compiler or PyTorch's OpenMP runtime,
or with `LWDETR_CPU_KERNELS=0`, `attention_kernel()` returns None and the model uses
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
    function = library.lwdetr_attention_f32
    function.restype = ctypes.c_int
    function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4
    function.argtypes += [ctypes.POINTER(ctypes.c_int64), ctypes.c_float, ctypes.c_int]
    return library


def attention_kernel(head_dim: int) -> AttentionFn | None:
    """`kernel_attention` when the compiled kernel can serve heads of `head_dim` features here, else None."""
    if head_dim not in _HEAD_SIZES or _attention_library() is None:
        return None
    return kernel_attention


def kernel_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax attention (scale 1/sqrt(head_dim), no mask) with the compiled kernel.

    qkv: [batch, tokens, 3 * dim], the fused projection's output (q, k, v each `num_heads` heads wide), on the CPU
    -> [batch, tokens, dim] in the input's dtype. Computes in float32. No autograd.
    """
    library = _attention_library()
    if library is None:
        raise RuntimeError("the CPU attention kernel is not available on this machine")
    dtype = qkv.dtype
    qkv = qkv.to(torch.float32).contiguous()
    batch, tokens, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = dim // num_heads
    out = torch.empty(batch, tokens, dim, dtype=torch.float32)
    in_strides = (qkv.stride(0), qkv.stride(1), head_dim)
    out_strides = (out.stride(0), out.stride(1), head_dim)
    strides = (ctypes.c_int64 * 12)(*in_strides, *in_strides, *in_strides, *out_strides)
    base, item = qkv.data_ptr(), qkv.element_size()
    status = library.lwdetr_attention_f32(
        base, base + dim * item, base + 2 * dim * item, out.data_ptr(),
        batch, num_heads, tokens, head_dim, strides, head_dim**-0.5, torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CPU attention kernel failed with status {status}")
    return out.to(dtype)
