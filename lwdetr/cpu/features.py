"""What this machine's CPU can do, asked once: the facts every fast path checks before it runs.

The speed code was first written on Xeons with AVX-512 and AMX; the same wheel runs on AVX2-only laptops and cloud
CPUs (most AMD EPYCs, many Hugging Face Spaces), on ARM and on Apple Silicon. Each fast path asks here and falls
back to PyTorch's plain ops when the answer is no, so no path can crash on a CPU it was not written for.
Tests patch these functions to play another CPU.
"""

from __future__ import annotations

import functools
import logging
import os
import platform

import torch

__all__ = ["cpu_flags", "cpu_name", "isa_summary", "native_bfloat16", "native_float16", "reduced_precision_fallback"]

logger = logging.getLogger(__name__)


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) of the first processor in /proc/cpuinfo; ("", {}) where there is none (macOS, Windows)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not name:
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them (`avx2`, `avx512f`, `avx512_bf16`, `amx_tile`, ...)."""
    return _cpuinfo()[1]


def cpu_name() -> str:
    """The CPU's model name, or the platform's processor string where /proc/cpuinfo is missing."""
    return _cpuinfo()[0] or platform.processor() or platform.machine()


def isa_summary() -> str:
    """One line for logs and benchmarks: the CPU, its widest vector ISA and PyTorch's kernel choice."""
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "avx_ne_convert")
    present = [flag for flag in wanted if flag in flags] or ["no x86 vector flags"]
    return f"{cpu_name()} [{', '.join(present)}; torch {torch.backends.cpu.get_cpu_capability()}]"


def native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 on this CPU (AVX-512 BW/VL/DQ, avx_ne_convert or ARM's bf16): its bf16 kernels
    (packed weights, fused linear and convolution) refuse to run elsewhere, and PyTorch's plain bf16 ops fall back
    to slow reference loops there, slower than float32."""
    return not onednn_capped_below_avx512() and _onednn_supports("bf16")


def onednn_capped_below_avx512() -> bool:
    """Whether ONEDNN_MAX_CPU_ISA (or its old name) holds oneDNN below AVX-512, as when an AVX2 machine is played
    on a bigger one: PyTorch's own check reads the CPU and would still say yes."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    return cap in ("SSE41", "AVX", "AVX2", "AVX2_VNNI")


def native_float16() -> bool:
    """Whether oneDNN runs float16 on this CPU (AVX-512 FP16 or AMX-FP16); elsewhere float16 ops are emulated."""
    return _onednn_supports("fp16")


@functools.cache
def _onednn_supports(kind: str) -> bool:
    """PyTorch's answer for oneDNN's "bf16" or "fp16" kernels on this CPU, asked once: `onednn_usable` asks on every
    layer of a bf16 forward, and the hardware does not change."""
    query = {"bf16": torch.ops.mkldnn._is_mkldnn_bf16_supported, "fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported}
    return bool(torch.backends.mkldnn.is_available() and query[kind]())


@functools.cache
def _warn_once(message: str) -> None:
    logger.warning(message)


def reduced_precision_fallback(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype to run a model asked for in `dtype` on `device`: `dtype` itself, except bfloat16 or float16 on a
    CPU without native support for it, which runs float32 (faster there than emulated half precision, and exact);
    says so once per process at WARNING."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return dtype
    native = native_bfloat16() if dtype == torch.bfloat16 else native_float16()
    if native:
        return dtype
    needs = "AVX-512 (BW, VL, DQ) or avx_ne_convert" if dtype == torch.bfloat16 else "AVX-512 FP16 or AMX-FP16"
    here = cpu_name() + (", oneDNN capped by ONEDNN_MAX_CPU_ISA" if onednn_capped_below_avx512() else "")
    _warn_once(f"{dtype} needs {needs} on the CPU, not available here ({here}): the model runs in float32")
    return torch.float32
