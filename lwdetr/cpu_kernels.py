"""Hand-written CPU kernels, compiled on first use with the machine's C compiler and loaded with ctypes.

Softmax attention for LW-DETR's short heads, faster than PyTorch's CPU flash attention (`benchmarks/bench.py`):
- `kernels/attention_avx512.c`: float32, forward and backward, head sizes 16, 32, 48 and 64, AVX-512;
- `kernels/attention_amx_bf16.c`: bfloat16 forward, head size 16, on the AMX tile unit (Sapphire Rapids and later).

Everything here is optional: without x86-64 Linux, the CPU features, a C compiler or PyTorch's OpenMP runtime, or
with `LWDETR_CPU_KERNELS=0`, `attention_kernel()` returns None and the model uses `F.scaled_dot_product_attention`.
The compiled libraries are cached under `$LWDETR_CACHE` (default `~/.cache/lwdetr/kernels`), keyed by the source
and compiler flags, and written atomically.
"""

from __future__ import annotations

import ctypes
import dataclasses
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

__all__ = ["amx_attention", "attention_kernel", "kernel_attention"]

logger = logging.getLogger(__name__)

_KERNELS = Path(__file__).with_name("kernels")
_BASE_FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-fPIC", "-shared"]


@dataclasses.dataclass(frozen=True)
class _Build:
    """One kernel library: its source, the extra compiler flags and the CPU features (/proc/cpuinfo) it needs."""

    source: str
    functions: tuple[tuple[str, int], ...]  # (name, number of pointer arguments before the sizes)
    flags: tuple[str, ...] = ()
    cpu_features: tuple[str, ...] = ("avx512f", "avx512dq", "avx512bw", "avx512vl")
    probe: str | None = None  # a function returning nonzero when the library may run in this process


_FLOAT32 = _Build("attention_avx512.c", (("lwdetr_attention_forward", 3), ("lwdetr_attention_backward", 5)))
_AMX_BF16 = _Build(
    "attention_amx_bf16.c",
    (("lwdetr_attention_forward_amx", 2),),
    ("-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
    ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"),
    probe="lwdetr_amx_available",  # Linux grants AMX tile state per process, on request
)
_FLOAT32_HEAD_SIZES = (16, 32, 48, 64)
_AMX_HEAD_SIZES = (16,)

AttentionFn = Callable[[torch.Tensor, int], torch.Tensor]


def _cache_dir() -> Path:
    if os.environ.get("LWDETR_CACHE"):
        return Path(os.environ["LWDETR_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lwdetr" / "kernels"


@functools.cache
def _cpu_features() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def _openmp_runtime_loaded() -> bool:
    """Whether PyTorch runs on an OpenMP runtime (libgomp, or Intel's libiomp5, which serves GOMP calls too).

    The kernels' parallel regions must run on the runtime PyTorch's own ops use: a second runtime would bring a
    second set of threads, which fight the first one's spinning workers for the same cores.
    """
    try:
        with open("/proc/self/maps") as maps:
            return any(re.search(r"/lib(gomp|iomp5)[^/]*\.so", line) for line in maps)
    except OSError:
        return False


def _supported_machine(build: _Build) -> bool:
    return (
        os.environ.get("LWDETR_CPU_KERNELS", "1") != "0"
        and platform.system() == "Linux"
        and platform.machine() in ("x86_64", "AMD64")
        and set(build.cpu_features) <= _cpu_features()
        and _openmp_runtime_loaded()
    )


def _compile(build: _Build) -> Path:
    """The shared library of `build`, from the cache when an identical build is there."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    source = _KERNELS / build.source
    command = [compiler, *_BASE_FLAGS, *build.flags]
    sources = b"".join(path.read_bytes() for path in (source, _KERNELS / "attention_common.h"))
    key = hashlib.sha256(sources + " ".join(command).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        result = subprocess.run([*command, "-o", str(built), str(source)], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
        os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole library
    for stale in target.parent.glob(f"{source.stem}-*.so"):  # builds of older sources or flags
        if stale != target:
            stale.unlink(missing_ok=True)
    return target


@functools.cache
def _load(build: _Build) -> ctypes.CDLL | None:
    if not _supported_machine(build):
        return None
    try:
        library = ctypes.CDLL(str(_compile(build)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.info("CPU kernel %s unavailable, using PyTorch's attention: %s", build.source, error)
        return None
    if build.probe is not None and not getattr(library, build.probe)():
        logger.info("CPU kernel %s refused by this process (%s)", build.source, build.probe)
        return None
    sizes = [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int]
    for name, pointers in build.functions:
        getattr(library, name).argtypes = [ctypes.c_void_p] * pointers + sizes
        getattr(library, name).restype = ctypes.c_int
    return library


def attention_kernel(head_dim: int, dtype: torch.dtype = torch.float32, needs_grad: bool = False) -> AttentionFn | None:
    """The compiled attention for heads of `head_dim` features in `dtype` on this machine, or None.

    float32: `kernel_attention` (with autograd), head sizes 16, 32, 48, 64, AVX-512. bfloat16: `amx_attention`
    (inference only, so None when the caller `needs_grad`), head size 16, AMX.
    """
    if dtype == torch.float32 and head_dim in _FLOAT32_HEAD_SIZES and _load(_FLOAT32) is not None:
        return kernel_attention
    if dtype == torch.bfloat16 and not needs_grad and head_dim in _AMX_HEAD_SIZES and _load(_AMX_BF16) is not None:
        return amx_attention
    return None


def _library(build: _Build = _FLOAT32) -> ctypes.CDLL:
    library = _load(build)
    if library is None:
        raise RuntimeError(f"the CPU kernel {build.source} is not available on this machine")
    return library


def _check(status: int, what: str) -> None:
    if status != 0:
        reason = {1: "out of memory", 2: "unsupported shape", 3: "AMX refused"}.get(status, f"status {status}")
        raise RuntimeError(f"CPU attention kernel ({what}) failed: {reason}")


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


def amx_attention(qkv: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head softmax attention for bfloat16 [batch, tokens, 3 * dim] (head_dim 16) on AMX -> bfloat16
    [batch, tokens, dim]. Scores and softmax in float32; no autograd."""
    if torch.is_grad_enabled() and qkv.requires_grad:
        raise RuntimeError("amx_attention has no backward; use it under torch.no_grad()")
    qkv = qkv.to(torch.bfloat16).contiguous()
    out = qkv.new_empty(qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3)
    status = _library(_AMX_BF16).lwdetr_attention_forward_amx(qkv.data_ptr(), out.data_ptr(), *_sizes(qkv, num_heads))
    _check(status, "AMX forward")
    return out
