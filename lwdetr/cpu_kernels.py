"""Hand-written CPU kernels, compiled once per machine with its C compiler and loaded with ctypes.

Softmax attention for LW-DETR's short heads, faster than PyTorch's CPU flash attention (`benchmarks/bench.py`):
- `kernels/attention_avx512.c`: float32, forward and backward, head sizes 16, 32, 48 and 64, AVX-512;
- `kernels/attention_portable.c`: the same in GCC's generic vector types, compiled for the CPU's vector width
  (AVX2 + FMA on CPUs without AVX-512): where the AVX-512 kernel cannot run;
- `kernels/attention_amx_bf16.c`: bfloat16 forward, head size 16, on the AMX tile unit (Sapphire Rapids and later).
And the deformable attention's sampling, in place of a `grid_sample` per level:
- `kernels/deformable_avx512.c`: float32, forward and backward, head sizes 16, 32, 48 and 64, AVX-512;
- `kernels/deformable_portable.c`: the same in generic vector types, where the AVX-512 one cannot run.

Everything here is optional: without x86-64 Linux, the CPU features, a C compiler or PyTorch's OpenMP runtime, or
with `LWDETR_CPU_KERNELS=0`, `attention_kernel()` and `deformable_kernel()` return None and the model uses
`F.scaled_dot_product_attention` and `F.grid_sample`. `LWDETR_CPU_ISA=avx2` holds the kernels to AVX2 on a CPU
that has more (the AVX-512 and AMX ones off, the portable one built for AVX2): how an AVX2-only CPU is played.
The compiled libraries are cached under `$LWDETR_CACHE` (default `~/.cache/lwdetr/kernels`), keyed by the source
and compiler command, built under a file lock and written atomically. They are built on first use, or ahead of
it: `start_background_build()` (the app and the predict CLI; PyTorch's ops run until it is done) and
`prepare_kernels()` (training, so that every step runs the same ops). `kernel_status()` says which are active and
why the others are off; the float32 kernels' absence is logged once at WARNING.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .cpu_features import _onednn_capped_below_avx512, cpu_flags

__all__ = [
    "amx_attention",
    "attention_kernel",
    "deformable_kernel",
    "forget_loaded",
    "kernel_attention",
    "kernel_deformable_sampling",
    "kernel_status",
    "kernel_summary",
    "prepare_kernels",
    "start_background_build",
]

logger = logging.getLogger(__name__)

_KERNELS = Path(__file__).with_name("kernels")
_BASE_FLAGS = ["-O3", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp", "-fPIC", "-shared"]


# The vector instruction sets a portable kernel is compiled for, widest first: compiler flags and the CPU features
# (/proc/cpuinfo) they need. Explicit flags rather than -march=native: the cache key (the compiler command) then says
# what a library needs, so a cache shared between machines never hands one a library built for another CPU.
_ISA_LEVELS = {
    "avx512": (
        ("-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma"),
        ("avx512f", "avx512dq", "avx512bw", "avx512vl", "fma"),
    ),
    "avx2": (("-mavx2", "-mfma"), ("avx2", "fma")),
}
_PORTABLE_FLAGS = ["-O3", "-fopenmp", "-fPIC", "-shared"]


@dataclasses.dataclass(frozen=True)
class _Build:
    """One kernel library: its source, the extra compiler flags and the CPU features (/proc/cpuinfo) it needs.

    A portable build's source is written for any vector width: it is compiled for the widest of `_ISA_LEVELS` that
    the CPU has (and `LWDETR_CPU_ISA` allows), and its flags and features are that level's."""

    source: str
    functions: tuple[tuple[str, tuple[type, ...]], ...]  # (name, ctypes argument types)
    flags: tuple[str, ...] = ()
    cpu_features: tuple[str, ...] = ("avx512f", "avx512dq", "avx512bw", "avx512vl")
    probe: str | None = None  # a function returning nonzero when the library may run in this process
    portable: bool = False


_POINTER, _I64 = ctypes.c_void_p, ctypes.c_int64
_ATTENTION_SIZES = (_I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int)  # batch, heads, n, d, scale, threads
_DEFORMABLE_SIZES = (_I64,) * 9 + (ctypes.c_int,)  # batch ... value_batch_step, threads
_FLOAT32 = _Build(
    "attention_avx512.c",
    (
        ("lwdetr_attention_forward", (_POINTER,) * 3 + _ATTENTION_SIZES),
        ("lwdetr_attention_backward", (_POINTER,) * 5 + _ATTENTION_SIZES),
    ),
)
_DEFORMABLE = _Build(
    "deformable_avx512.c",
    (
        ("lwdetr_deformable_forward", (_POINTER,) * 5 + _DEFORMABLE_SIZES),
        ("lwdetr_deformable_backward", (_POINTER,) * 8 + _DEFORMABLE_SIZES),
    ),
)
_PORTABLE_ATTENTION = _Build(
    "attention_portable.c",
    (
        ("lwdetr_attention_forward", (_POINTER,) * 3 + _ATTENTION_SIZES),
        ("lwdetr_attention_backward", (_POINTER,) * 5 + _ATTENTION_SIZES),
        ("lwdetr_vector_lanes", ()),
    ),
    portable=True,
)
_PORTABLE_DEFORMABLE = _Build(
    "deformable_portable.c",
    (
        ("lwdetr_deformable_forward", (_POINTER,) * 5 + _DEFORMABLE_SIZES),
        ("lwdetr_deformable_backward", (_POINTER,) * 8 + _DEFORMABLE_SIZES),
        ("lwdetr_vector_lanes", ()),
    ),
    portable=True,
)
_AMX_BF16 = _Build(
    "attention_amx_bf16.c",
    (("lwdetr_attention_forward_amx", (_POINTER,) * 2 + _ATTENTION_SIZES),),
    ("-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
    ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"),
    probe="lwdetr_amx_available",  # Linux grants AMX tile state per process, on request
)
_BUILDS = (_FLOAT32, _PORTABLE_ATTENTION, _DEFORMABLE, _PORTABLE_DEFORMABLE, _AMX_BF16)
# portable build -> the hand-written one it stands in for where that cannot run
_STANDS_IN_FOR = {_PORTABLE_ATTENTION: _FLOAT32, _PORTABLE_DEFORMABLE: _DEFORMABLE}
_DESCRIPTIONS = {
    _FLOAT32: "float32 attention (AVX-512)",
    _PORTABLE_ATTENTION: "float32 attention (portable)",
    _DEFORMABLE: "deformable sampling (AVX-512)",
    _PORTABLE_DEFORMABLE: "deformable sampling (portable)",
    _AMX_BF16: "bf16 attention (AMX)",
}
_FLOAT32_HEAD_SIZES = (16, 32, 48, 64)
_AMX_HEAD_SIZES = (16,)

AttentionFn = Callable[[torch.Tensor, int], torch.Tensor]
DeformableFn = Callable[[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor], torch.Tensor]


def _cache_dir() -> Path:
    if os.environ.get("LWDETR_CACHE"):
        return Path(os.environ["LWDETR_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lwdetr" / "kernels"


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


def _isa_cap() -> str:
    """The widest of `_ISA_LEVELS` our kernels may use: `LWDETR_CPU_ISA` (avx2 plays an AVX2-only CPU), or avx512."""
    cap = os.environ.get("LWDETR_CPU_ISA", "").strip().lower() or "avx512"
    if cap not in _ISA_LEVELS:
        raise ValueError(f"LWDETR_CPU_ISA={cap!r} is not one of {', '.join(_ISA_LEVELS)}")
    return cap


def _portable_level() -> str | None:
    """The widest of `_ISA_LEVELS` this CPU has and `LWDETR_CPU_ISA` allows (what a portable build compiles for)."""
    levels = list(_ISA_LEVELS)
    allowed = levels[levels.index(_isa_cap()) :]
    return next((level for level in allowed if set(_ISA_LEVELS[level][1]) <= cpu_flags()), None)


def _target(build: _Build) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(compiler flags, CPU features needed) of `build` on this machine."""
    if not build.portable:
        return (*_BASE_FLAGS, *build.flags), build.cpu_features
    level = _portable_level() or "avx2"  # without any level, `_unsupported` names the missing features of the last
    return (*_PORTABLE_FLAGS, *_ISA_LEVELS[level][0]), _ISA_LEVELS[level][1]


def _unsupported(build: _Build) -> str | None:
    """Why `build` cannot run here (one phrase), or None when it can."""
    if os.environ.get("LWDETR_CPU_KERNELS", "1") == "0":
        return "switched off by LWDETR_CPU_KERNELS=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"they need x86-64 Linux, this is {platform.system()} {platform.machine()}"
    try:
        cap = _isa_cap()
    except ValueError as error:
        return str(error)
    if not build.portable and cap != "avx512":
        return f"held to {cap.upper()} by LWDETR_CPU_ISA"
    missing = [flag for flag in _target(build)[1] if flag not in cpu_flags()]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if not _openmp_runtime_loaded():
        return "PyTorch runs without an OpenMP runtime"
    return None


def _compile(build: _Build) -> Path:
    """The shared library of `build`, from the cache when an identical build is there.

    Built once per machine: a file lock makes concurrent processes (app workers, DDP ranks) wait for the first
    one's build instead of compiling too. The file name holds a key of the compiler command and one of the
    sources, so builds with other flags or compilers sharing the cache keep their files; only older builds of the
    same command are removed. An unwritable cache falls back to a private folder for this process.
    """
    import fcntl  # POSIX only, like the kernels (`_unsupported` turns other systems away before this)

    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc or cc) on PATH")
    source = _KERNELS / build.source
    command = [compiler, *_target(build)[0]]
    sources = b"".join(path.read_bytes() for path in (source, _KERNELS / "attention_common.h"))
    command_key = hashlib.sha256(" ".join(command).encode()).hexdigest()[:8]
    source_key = hashlib.sha256(sources).hexdigest()[:12]
    folder = _writable_cache()
    target = folder / f"{source.stem}-{command_key}-{source_key}.so"
    with open(folder / f".{source.stem}-{command_key}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
        if target.exists():
            return target
        for leftover in folder.glob("tmp*"):  # a build whose process was killed mid-way
            if leftover.is_dir() and time.time() - leftover.stat().st_mtime > 3600:
                shutil.rmtree(leftover, ignore_errors=True)
        logger.info("compiling the CPU kernel %s (once per machine)", build.source)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run(
                [*command, "-o", str(built), str(source)], capture_output=True, text=True, timeout=300
            )
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[:500]}")
            os.replace(built, target)  # atomic: a process that does not lock sees no library or the whole one
        # older sources with the same command, and builds named before the command had a key of its own
        for stale in [*folder.glob(f"{source.stem}-{command_key}-*.so"), *folder.glob(f"{source.stem}-{'?' * 16}.so")]:
            if stale != target:
                stale.unlink(missing_ok=True)
    return target


@functools.cache
def _private_cache() -> Path:
    return Path(tempfile.mkdtemp(prefix="lwdetr-kernels-"))


def _writable_cache() -> Path:
    folder = _cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    logger.info("kernel cache %s is not writable; building into a private folder", folder)
    return _private_cache()


# build -> its library, or None where it cannot run; and why each is off (for `kernel_status`)
_LOADED: dict[_Build, ctypes.CDLL | None] = {}
_OFF_REASONS: dict[str, str] = {}
_LOAD_LOCK = threading.Lock()
_background: threading.Thread | None = None


def _load(build: _Build) -> ctypes.CDLL | None:
    """`build`'s library, built and loaded on first use; None where it cannot run, and also (without waiting)
    while `start_background_build` is still compiling: callers run PyTorch's ops meanwhile."""
    if build in _LOADED:
        return _LOADED[build]
    if _background is not None and _background.is_alive() and threading.current_thread() is not _background:
        return None
    with _LOAD_LOCK:
        if build not in _LOADED:
            _LOADED[build] = _load_now(build)
    return _LOADED[build]


def _load_now(build: _Build) -> ctypes.CDLL | None:
    reason = _unsupported(build)
    if reason is None:
        try:
            library = ctypes.CDLL(str(_compile(build)))
            if build.probe is not None and not getattr(library, build.probe)():
                reason = "the OS refused this process the AMX tile state"
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            reason = f"the build failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
    if reason is not None:
        _OFF_REASONS[build.source] = reason
        # the float32 attention is the main fast path: when neither of its builds runs, that is said once at
        # WARNING (by the portable one, asked last), the rest at INFO
        if build in _STANDS_IN_FOR.values():
            logger.info("fast CPU kernel %s off (%s): the portable one runs where it can", build.source, reason)
        else:
            warn = build is _PORTABLE_ATTENTION and not reason.startswith("switched off")
            level = logging.WARNING if warn else logging.INFO
            logger.log(level, "fast CPU kernel %s off (%s): PyTorch's ops run instead", build.source, reason)
        return None
    _OFF_REASONS.pop(build.source, None)
    for name, argtypes in build.functions:
        getattr(library, name).argtypes = list(argtypes)
        getattr(library, name).restype = ctypes.c_int
    return library


def forget_loaded() -> None:
    """Forget every loaded library and build result (tests that change the environment call this)."""
    with _LOAD_LOCK:
        _LOADED.clear()
        _OFF_REASONS.clear()


def _needed(build: _Build) -> bool:
    """Whether `build` may be of use here: a portable build only while the AVX-512 one it stands in for is not known
    to run."""
    return build not in _STANDS_IN_FOR or _LOADED.get(_STANDS_IN_FOR[build]) is None


def prepare_kernels() -> str:
    """Build and load every kernel this machine can run, now (a training run calls this before its first step, so
    every step runs the same ops); returns `kernel_status()`."""
    for build in _BUILDS:
        if _needed(build):
            _load(build)
    return kernel_status()


def start_background_build() -> threading.Thread | None:
    """Build and load every kernel this machine can run in a daemon thread, so a server or CLI starts at once; until
    it finishes, `attention_kernel` and `deformable_kernel` return None (PyTorch's ops run). Returns the thread
    (join it to wait), or None when there is nothing to build."""
    global _background
    pending = [build for build in _BUILDS if build not in _LOADED and _needed(build)]
    if not pending:
        return None

    def build_all() -> None:
        for build in pending:
            with _LOAD_LOCK:
                if build not in _LOADED and _needed(build):
                    _LOADED[build] = _load_now(build)
        logger.info("%s", kernel_status())

    logger.info("preparing the CPU kernels in the background (a first build takes 10-60 s; cached afterwards)")
    _background = threading.Thread(target=build_all, name="lwdetr-kernel-build", daemon=True)
    _background.start()
    return _background


def kernel_summary() -> str:
    """A few words for a UI next to a timing: which attention ran on this CPU."""
    if _background is not None and _background.is_alive():
        return "PyTorch attention; our CPU kernels are building"
    if _LOADED.get(_FLOAT32) is not None:
        return "our AVX-512 kernels"
    if _LOADED.get(_PORTABLE_ATTENTION) is not None:
        return f"our portable kernels ({_portable_isa(_PORTABLE_ATTENTION)})"
    reason = _OFF_REASONS.get(_PORTABLE_ATTENTION.source) or _OFF_REASONS.get(_FLOAT32.source)
    if reason and reason.startswith("the build failed"):
        reason = "the build failed"  # a UI shows this: not the compiler's message, which names server paths
    return f"PyTorch attention ({reason})" if reason else "PyTorch attention"


def _portable_isa(build: _Build) -> str:
    """The vector instructions the loaded portable `build` was compiled for, from its vector width."""
    lanes = _LOADED[build].lwdetr_vector_lanes()
    return {8: "AVX2", 16: "AVX-512"}.get(lanes, f"{lanes} lanes")


def kernel_status() -> str:
    """One line for logs and status bars: which fast CPU kernels are active, or why they are off."""
    if _background is not None and _background.is_alive() and threading.current_thread() is not _background:
        return "CPU kernels: building in the background (PyTorch's ops until then)"
    active = [
        name.replace("(portable)", f"(portable, {_portable_isa(build)})")  # the width it was compiled for
        for build, name in _DESCRIPTIONS.items()
        if _LOADED.get(build) is not None
    ]
    off = [
        f"{name} ({_OFF_REASONS[build.source]})"
        for build, name in _DESCRIPTIONS.items()
        if build.source in _OFF_REASONS
    ]
    parts = [f"active: {', '.join(active)}"] if active else []
    parts += [f"off: {'; '.join(off)}"] if off else []
    return "CPU kernels " + (" | ".join(parts) if parts else "not loaded yet")


def attention_kernel(head_dim: int, dtype: torch.dtype = torch.float32, needs_grad: bool = False) -> AttentionFn | None:
    """The compiled attention for heads of `head_dim` features in `dtype` on this machine, or None.

    float32: `kernel_attention` (with autograd), head sizes 16, 32, 48, 64: AVX-512, or the portable kernel (AVX2).
    bfloat16: `amx_attention` (inference only, so None when the caller `needs_grad`), head size 16, AMX.
    """
    if dtype == torch.float32 and head_dim in _FLOAT32_HEAD_SIZES and _float32_build() is not None:
        return kernel_attention
    if dtype == torch.bfloat16 and not needs_grad and head_dim in _AMX_HEAD_SIZES and _load(_AMX_BF16) is not None:
        return amx_attention
    return None


def _float32_build() -> _Build | None:
    """The float32 attention build that runs here: the AVX-512 kernel, else the portable one; None when neither."""
    return next((build for build in (_FLOAT32, _PORTABLE_ATTENTION) if _load(build) is not None), None)


def _library(build: _Build | None = None) -> ctypes.CDLL:
    """`build`'s library (default: the float32 attention's, `_float32_build`); raises where it cannot run."""
    build = build or _float32_build() or _FLOAT32
    library = _load(build)
    if library is None:
        raise RuntimeError(f"the CPU kernel {build.source} is not available on this machine")
    return library


def _check(status: int, what: str) -> None:
    if status != 0:
        reason = {1: "out of memory", 2: "unsupported shape", 3: "AMX refused"}.get(status, f"status {status}")
        raise RuntimeError(f"CPU kernel ({what}) failed: {reason}")


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


def gelu_in_gemm() -> bool:
    """Whether oneDNN should apply the ViT's exact GELU inside its fc1 GEMM (else a separate PyTorch GELU follows).

    With AVX-512 the fused GELU costs a few % of the GEMM; held to AVX2, oneDNN's erf post-op costs more than the
    GEMM's output pass plus PyTorch's own vectorised GELU (1600 x 768 tokens: +1.2 ms fused, +0.7 ms apart).
    """
    return "avx512f" in cpu_flags() and not _onednn_capped_below_avx512()


_DEFORMABLE_HEAD_SIZES = (16, 32, 48, 64)


def deformable_kernel(head_dim: int, dtype: torch.dtype = torch.float32) -> DeformableFn | None:
    """The compiled deformable sampling (`kernel_deformable_sampling`, with autograd) for heads of `head_dim`
    features in `dtype` on this machine, or None: float32, head sizes 16, 32, 48 and 64, AVX-512 or the portable
    kernel (AVX2)."""
    if dtype == torch.float32 and head_dim in _DEFORMABLE_HEAD_SIZES and _deformable_build() is not None:
        return kernel_deformable_sampling
    return None


def _deformable_build() -> _Build | None:
    """The deformable sampling build that runs here: the AVX-512 kernel, else the portable one; None when neither."""
    return next((build for build in (_DEFORMABLE, _PORTABLE_DEFORMABLE) if _load(build) is not None), None)


def _deformable_sizes(value: torch.Tensor, locations: torch.Tensor) -> tuple[int, ...]:
    batch, tokens, heads, head_dim = value.shape
    queries, num_levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    return (batch, tokens, heads, head_dim, queries, num_levels, points, value.stride(1), value.stride(0))


class _DeformableSampling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, locations, weights, levels):
        out = value.new_empty(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
        sizes = _deformable_sizes(value, locations)
        status = _library(_deformable_build() or _DEFORMABLE).lwdetr_deformable_forward(
            value.data_ptr(), locations.data_ptr(), weights.data_ptr(), out.data_ptr(), levels.data_ptr(), *sizes,
            torch.get_num_threads(),
        )  # fmt: skip
        _check(status, "deformable forward")
        ctx.save_for_backward(value, locations, weights, levels)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        value, locations, weights, levels = ctx.saved_tensors
        grad_out = grad_out.to(torch.float32).contiguous()
        grad_value = torch.zeros(value.shape, dtype=value.dtype)  # the kernel scatters into it
        grad_locations, grad_weights = torch.empty_like(locations), torch.empty_like(weights)
        status = _library(_deformable_build() or _DEFORMABLE).lwdetr_deformable_backward(
            value.data_ptr(), locations.data_ptr(), weights.data_ptr(), grad_out.data_ptr(), grad_value.data_ptr(),
            grad_locations.data_ptr(), grad_weights.data_ptr(), levels.data_ptr(),
            *_deformable_sizes(value, locations), torch.get_num_threads(),
        )  # fmt: skip
        _check(status, "deformable backward")
        return grad_value, grad_locations, grad_weights, None


def kernel_deformable_sampling(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`deformable.sample_levels` with the compiled kernel, with autograd; float32 on the CPU.

    value: [batch, tokens, heads, head_dim], the levels' tokens one after another (any batch and token strides;
    heads and features contiguous, as in the value projection's output); sampling_locations: [batch, queries,
    heads, levels, points, 2] in [0, 1] (x, y); attention_weights: [batch, queries, heads, levels, points]
    -> [batch, queries, heads * head_dim].
    """
    if value.device.type != "cpu" or value.dim() != 4:
        raise ValueError(f"value must be a CPU [batch, tokens, heads, head_dim] tensor, got {tuple(value.shape)}")
    batch, _, heads, _ = value.shape
    expected = (batch, sampling_locations.shape[1], heads, len(spatial_shapes))
    if sampling_locations.dim() != 6 or sampling_locations.shape[:4] != expected or sampling_locations.shape[5] != 2:
        raise ValueError(
            f"sampling_locations must be [batch, queries, heads, levels, points, 2] = [{', '.join(map(str, expected))}"
            f", points, 2], got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:5]:
        raise ValueError(
            f"attention_weights must be {tuple(sampling_locations.shape[:5])} (the locations' shape without the "
            f"last axis), got {tuple(attention_weights.shape)}"
        )
    if value.stride(3) != 1 or value.stride(2) != value.shape[3]:
        value = value.contiguous()
    levels = torch.tensor(spatial_shapes, dtype=torch.int64).reshape(-1, 2)
    return _DeformableSampling.apply(
        value.float(), sampling_locations.float().contiguous(), attention_weights.float().contiguous(), levels
    )
