"""The CPU capability checks that every fast path asks before it runs."""

from __future__ import annotations

import pytest
import torch

from lwdetr.cpu import features


def test_half_precision_is_kept_where_it_runs_natively_and_off_the_cpu(monkeypatch):
    monkeypatch.setattr(features, "native_bfloat16", lambda: True)
    assert features.reduced_precision_fallback(torch.bfloat16, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(features, "native_bfloat16", lambda: False)
    monkeypatch.setattr(features, "native_float16", lambda: False)
    for dtype in (torch.bfloat16, torch.float16):
        assert features.reduced_precision_fallback(dtype, torch.device("cpu")) == torch.float32
        assert features.reduced_precision_fallback(dtype, torch.device("cuda")) == dtype  # the GPU decides
    assert features.reduced_precision_fallback(torch.float64, torch.device("cpu")) == torch.float64


@pytest.mark.parametrize("variable", ["ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"])
def test_onednn_capped_below_avx512_has_no_native_bfloat16(monkeypatch, variable):
    """Playing an AVX2 machine on a bigger one: oneDNN refuses bf16 there, whatever the CPU's flags say."""
    monkeypatch.setenv(variable, "avx2")
    assert features.native_bfloat16() is False


def test_isa_summary_names_the_cpu_and_pytorchs_choice(monkeypatch):
    monkeypatch.setattr(features, "_cpuinfo", lambda: ("Some CPU", frozenset({"avx2", "fma", "sse4_2"})))
    summary = features.isa_summary()
    assert summary.startswith("Some CPU [avx2;") and torch.backends.cpu.get_cpu_capability() in summary
    assert "avx512f" not in summary
