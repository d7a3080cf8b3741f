"""Our hand-written CPU kernels (`kernels/*.c`), compiled once per machine with its C compiler and loaded with ctypes.

`_BUILDS` lists them, one `_Build` entry each (source, exported functions, compiler flags, CPU features):
- `kernels/attention_avx512.c`: float32 softmax attention, forward and backward, AVX-512 (`attention.py`);
- `kernels/attention_amx_bf16.c`: bfloat16 attention forward on the AMX tile unit (`attention.py`);
- `kernels/deformable_avx512.c`: the deformable attention's sampling, forward and backward, AVX-512 (`sampling.py`);
- `kernels/attention_portable.c`, `kernels/deformable_portable.c`: the same float32 kernels in GCC's generic vector
  types, compiled for the widest vector ISA the CPU has (AVX2 + FMA where AVX-512 is missing): where the AVX-512
  ones cannot run, they stand in (`STANDS_IN_FOR`).

Everything here is optional: without x86-64 Linux, the CPU features, a C compiler or PyTorch's OpenMP runtime, or
with `LWDETR_CPU_KERNELS=0`, `load()` returns None and the model runs PyTorch's ops. `LWDETR_CPU_ISA=avx2` holds
the kernels to AVX2 on a CPU that has more (the AVX-512 and AMX ones off, the portable ones built for AVX2): how an
AVX2-only CPU is played.
The compiled libraries are cached under `$LWDETR_CACHE` (default `~/.cache/lwdetr/kernels`), keyed by the source
and compiler command, built under a file lock and written atomically. They are built on first use, or ahead of
it: `start_background_build()` (the app and the predict CLI; PyTorch's ops run until it is done) and
`prepare_kernels()` (training, so that every step runs the same ops). `kernel_status()` says which are active and
why the others are off; the float32 attention's absence is logged once at WARNING.
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
from pathlib import Path

from .features import cpu_flags

__all__ = [
    "ATTENTION_AMX_BF16",
    "ATTENTION_AVX512",
    "ATTENTION_PORTABLE",
    "DEFORMABLE_AVX512",
    "DEFORMABLE_PORTABLE",
    "STANDS_IN_FOR",
    "check",
    "forget_loaded",
    "kernel_status",
    "kernel_summary",
    "library",
    "load",
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
    Adding a kernel is one entry in `_BUILDS` (and its selector beside the wrapper, as in `attention.py`).
    A portable build's source is written for any vector width: it is compiled for the widest of `_ISA_LEVELS` that
    the CPU has (and `LWDETR_CPU_ISA` allows), and its flags and features are that level's."""

    source: str
    functions: tuple[tuple[str, tuple[type, ...]], ...]  # (name, ctypes argument types)
    flags: tuple[str, ...] = ()
    cpu_features: tuple[str, ...] = ("avx512f", "avx512dq", "avx512bw", "avx512vl")
    probe: str | None = None  # a function returning nonzero when the library may run in this process
    portable: bool = False  # compiled for the CPU's vector width (`_ISA_LEVELS`) instead of `flags`/`cpu_features`
    description: str = dataclasses.field(kw_only=True)  # what it runs, for `kernel_status`


_POINTER, _I64 = ctypes.c_void_p, ctypes.c_int64
_ATTENTION_SIZES = (_I64, _I64, _I64, _I64, ctypes.c_float, ctypes.c_int)  # batch, heads, n, d, scale, threads
_DEFORMABLE_SIZES = (_I64,) * 9 + (ctypes.c_int,)  # batch ... value_batch_step, threads
# The entry points both builds of a kernel export; a portable library also says its vector width.
_ATTENTION_ENTRIES = (
    ("lwdetr_attention_forward", (_POINTER,) * 3 + _ATTENTION_SIZES),
    ("lwdetr_attention_backward", (_POINTER,) * 5 + _ATTENTION_SIZES),
)
_DEFORMABLE_ENTRIES = (
    ("lwdetr_deformable_forward", (_POINTER,) * 5 + _DEFORMABLE_SIZES),
    ("lwdetr_deformable_backward", (_POINTER,) * 8 + _DEFORMABLE_SIZES),
)
_LANES_ENTRY = (("lwdetr_vector_lanes", ()),)
ATTENTION_AVX512 = _Build("attention_avx512.c", _ATTENTION_ENTRIES, description="float32 attention (AVX-512)")
DEFORMABLE_AVX512 = _Build("deformable_avx512.c", _DEFORMABLE_ENTRIES, description="deformable sampling (AVX-512)")
ATTENTION_PORTABLE = _Build(
    "attention_portable.c",
    _ATTENTION_ENTRIES + _LANES_ENTRY,
    portable=True,
    description="float32 attention (portable)",
)
DEFORMABLE_PORTABLE = _Build(
    "deformable_portable.c",
    _DEFORMABLE_ENTRIES + _LANES_ENTRY,
    portable=True,
    description="deformable sampling (portable)",
)
ATTENTION_AMX_BF16 = _Build(
    "attention_amx_bf16.c",
    (("lwdetr_attention_forward_amx", (_POINTER,) * 2 + _ATTENTION_SIZES),),
    ("-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
    ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16"),
    probe="lwdetr_amx_available",  # Linux grants AMX tile state per process, on request
    description="bf16 attention (AMX)",
)
# every kernel, in build order (`prepare_kernels`, `start_background_build`) and status order (`kernel_status`)
_BUILDS = (ATTENTION_AVX512, ATTENTION_PORTABLE, DEFORMABLE_AVX512, DEFORMABLE_PORTABLE, ATTENTION_AMX_BF16)
# portable build -> the hand-written one it stands in for where that cannot run
STANDS_IN_FOR = {ATTENTION_PORTABLE: ATTENTION_AVX512, DEFORMABLE_PORTABLE: DEFORMABLE_AVX512}


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


def load(build: _Build) -> ctypes.CDLL | None:
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
        if build in STANDS_IN_FOR.values():
            logger.info("fast CPU kernel %s off (%s): the portable one runs where it can", build.source, reason)
        else:
            warn = build is ATTENTION_PORTABLE and not reason.startswith("switched off")
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
    return build not in STANDS_IN_FOR or _LOADED.get(STANDS_IN_FOR[build]) is None


def prepare_kernels() -> str:
    """Build and load every kernel this machine can run, now (a training run calls this before its first step, so
    every step runs the same ops); returns `kernel_status()`."""
    for build in _BUILDS:
        if _needed(build):
            load(build)
    return kernel_status()


def start_background_build() -> threading.Thread | None:
    """Build and load every kernel this machine can run in a daemon thread, so a server or CLI starts at once; until
    it finishes, `load` returns None (PyTorch's ops run). Returns the thread
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
    if _LOADED.get(ATTENTION_AVX512) is not None:
        return "our AVX-512 kernels"
    if _LOADED.get(ATTENTION_PORTABLE) is not None:
        return f"our portable kernels ({_portable_isa(ATTENTION_PORTABLE)})"
    reason = _OFF_REASONS.get(ATTENTION_PORTABLE.source) or _OFF_REASONS.get(ATTENTION_AVX512.source)
    if reason and reason.startswith("the build failed"):
        reason = "the build failed"  # a UI shows this: not the compiler's message, which names server paths
    return f"PyTorch attention ({reason})" if reason else "PyTorch attention"


def _portable_isa(build: _Build) -> str:
    """The vector instructions the loaded portable `build` was compiled for, from its vector width."""
    lanes = _LOADED[build].lwdetr_vector_lanes()
    return {8: "AVX2", 16: "AVX-512"}.get(lanes, f"{lanes} lanes")


def _described(build: _Build) -> str:
    """`build.description`, with the width a loaded portable build was compiled for."""
    if build.portable and _LOADED.get(build) is not None:
        return build.description.replace("(portable)", f"(portable, {_portable_isa(build)})")
    return build.description


def kernel_status() -> str:
    """One line for logs and status bars: which fast CPU kernels are active, or why they are off."""
    if _background is not None and _background.is_alive() and threading.current_thread() is not _background:
        return "CPU kernels: building in the background (PyTorch's ops until then)"
    active = [_described(build) for build in _BUILDS if _LOADED.get(build) is not None]
    off = [f"{build.description} ({_OFF_REASONS[build.source]})" for build in _BUILDS if build.source in _OFF_REASONS]
    parts = [f"active: {', '.join(active)}"] if active else []
    parts += [f"off: {'; '.join(off)}"] if off else []
    return "CPU kernels " + (" | ".join(parts) if parts else "not loaded yet")


def library(build: _Build) -> ctypes.CDLL:
    """`build`'s loaded library, for a kernel's wrapper that its selector (`load` not None) has let run."""
    loaded = load(build)
    if loaded is None:
        raise RuntimeError(f"the CPU kernel {build.source} is not available on this machine")
    return loaded


def check(status: int, what: str) -> None:
    """Raise when a kernel function returned a nonzero status (the C sources' error codes)."""
    if status != 0:
        reason = {1: "out of memory", 2: "unsupported shape", 3: "AMX refused"}.get(status, f"status {status}")
        raise RuntimeError(f"CPU kernel ({what}) failed: {reason}")
