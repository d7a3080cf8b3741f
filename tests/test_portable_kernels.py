"""The portable kernels (`lwdetr/cpu/kernels/attention_portable.c`, `deformable_portable.c`) against PyTorch's attention
and `grid_sample`, built for AVX2 (as on an AVX2-only CPU, also on an AVX-512 machine: `LWDETR_CPU_ISA=avx2`) and
for AVX-512; the model on them against the reference; and what runs when they cannot."""

from __future__ import annotations

import pytest
import torch
from model_utils import outputs_with_the_same_proposals, ragged_batch, relative_error, twin_models
from test_cpu_kernels import attention_forward_errors, attention_gradient_errors
from test_deformable_kernel import sampling_errors

from lwdetr import vit
from lwdetr.config import preset_config
from lwdetr.cpu import attention, build, dispatch, sampling
from lwdetr.cpu.features import cpu_flags
from lwdetr.modeling import LwDetrForObjectDetection

LANES = {"avx2": 8, "avx512": 16}


def _portable_on(level: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the kernels' entry points run the portable kernels built for `level` (skip where they cannot be built)."""
    if not set(build._ISA_LEVELS[level][1]) <= cpu_flags():
        pytest.skip(f"the CPU lacks {level}")
    monkeypatch.delenv("LWDETR_CPU_KERNELS", raising=False)
    monkeypatch.setenv("LWDETR_CPU_ISA", level)
    build.forget_loaded()
    for portable, avx512 in build.STANDS_IN_FOR.items():
        monkeypatch.setitem(build._LOADED, avx512, None)  # the AVX-512 kernels stand aside
        if build.load(portable) is None:
            pytest.skip(f"no portable kernel here: {build.kernel_status()}")


@pytest.fixture(params=list(LANES))
def portable(request, monkeypatch) -> str:
    """The portable kernel active, built for each vector width this CPU has; yields the level's name."""
    _portable_on(request.param, monkeypatch)
    yield request.param
    build.forget_loaded()


@pytest.fixture
def portable_avx2(monkeypatch) -> None:
    _portable_on("avx2", monkeypatch)
    yield
    build.forget_loaded()


def test_the_library_is_built_for_the_asked_vector_width(portable):
    for portable_build in build.STANDS_IN_FOR:
        assert build._LOADED[portable_build].lwdetr_vector_lanes() == LANES[portable]
    assert attention.attention_kernel(16) is attention.kernel_attention
    assert sampling.deformable_kernel(16) is sampling.kernel_deformable_sampling
    isa = "AVX2" if portable == "avx2" else "AVX-512"
    status = build.kernel_status()
    assert f"float32 attention (portable, {isa})" in status and f"deformable sampling (portable, {isa})" in status


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])
@pytest.mark.parametrize("tokens", [1, 7, 9, 37, 100, 257])
def test_forward_matches_torch_attention(portable, head_dim: int, tokens: int):
    # odd token counts: a partial last vector of keys, a last block of query rows that overlaps the one before it
    # (or, under one block, rows one by one)
    error, torch_error, scale = attention_forward_errors(head_dim, tokens)
    # as close to the float64 result as PyTorch's float32 attention, up to float32 rounding of scores up to ~30;
    # an indexing error would be off by O(scale)
    assert error <= 2 * torch_error + 2e-6 * scale
    assert error < 1e-5 * scale


@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])
@pytest.mark.parametrize("tokens", [1, 7, 37, 100])
def test_gradients_match_torch_attention(portable, head_dim: int, tokens: int):
    error, torch_error, scale = attention_gradient_errors(head_dim, tokens)
    assert error <= 2 * torch_error + 2e-6 * scale


def test_nan_in_a_key_reaches_the_output(portable_avx2):
    qkv = torch.randn(1, 20, 3 * 16)
    qkv[0, 5, 16 + 3] = float("nan")  # one feature of one key: every row attends to it
    assert torch.isnan(attention.kernel_attention(qkv, 1)).all()


@pytest.mark.parametrize(
    "heads, head_dim, shapes, points, on_the_lattice",
    [
        (16, 16, [(40, 40)], 2, False),  # tiny's decoder at 640
        (8, 32, [(20, 24), (10, 12)], 4, False),
        (4, 64, [(7, 5), (3, 2), (1, 1)], 3, False),
        (2, 48, [(6, 6)], 1, False),
        (16, 16, [(8, 16), (4, 8)], 2, True),  # on pixel centres: corners of weight 0 count in the gradient
    ],
)
def test_deformable_sampling_matches_grid_sample(portable, heads, head_dim, shapes, points, on_the_lattice):
    for name, error, torch_error, scale in sampling_errors(heads, head_dim, shapes, points, on_the_lattice):
        assert error <= 2 * torch_error + 1e-6 * scale, name


def _counting(calls: list[int]):
    def factory(head_dim: int, dtype: torch.dtype, needs_grad: bool = False):
        kernel = attention.attention_kernel(head_dim, dtype, needs_grad)
        return None if kernel is None else lambda qkv, heads: calls.append(qkv.shape[1]) or kernel(qkv, heads)

    return factory


@pytest.mark.parametrize("preset", ["tiny", "medium"])  # ViT heads of 16 and 32 features; decoder heads of 32
def test_model_on_the_avx2_kernels_matches_the_reference(portable_avx2, monkeypatch, preset: str):
    """Every attention of the ViT (window and global layers) and of the decoder, and the decoder's deformable
    sampling, run in the AVX2 builds, and the model's outputs stay within the parity tolerance of the reference's."""
    calls: list[int] = []
    monkeypatch.setattr(dispatch, "attention_kernel", _counting(calls))  # the ViT's and the decoder's
    samplings = []

    def counting_sampler(head_dim: int, dtype: torch.dtype):
        kernel = sampling.deformable_kernel(head_dim, dtype)
        return None if kernel is None else lambda *args: samplings.append(head_dim) or kernel(*args)

    monkeypatch.setattr(dispatch, "deformable_kernel", counting_sampler)
    reference, ours = twin_models(preset, num_queries=30)
    reference.eval()
    ours.eval()
    step = ours.model.backbone.backbone.size_divisor
    inputs = lambda seed: ragged_batch(2 * step, 3 * step, step, seed=seed)  # noqa: E731
    expected, got = outputs_with_the_same_proposals(reference, ours, inputs)
    patches = 6 * (step // 16) ** 2  # a 2 x 3 grid of windows, each (step / 16)^2 patches
    assert patches // ours.config.backbone_config.num_windows in calls and patches in calls  # window, global layers
    assert 30 in calls  # the decoder's self-attention over the queries
    assert len(samplings) >= ours.config.decoder_layers  # each decoder layer's cross-attention
    for key in ("logits", "pred_boxes", "last_hidden_state", "enc_outputs_class"):
        assert relative_error(got[key], expected[key]) < 1e-4, key


def test_vit_gradients_on_the_avx2_kernel(portable_avx2, monkeypatch):
    """Training runs the AVX2 build's backward: the ViT's parameter gradients agree with PyTorch's attention."""
    torch.manual_seed(0)
    backbone = vit.LwDetrViTBackbone(preset_config("tiny", num_labels=3).backbone_config)
    pixels = torch.randn(1, 3, 128, 128)

    def gradients(factory) -> list[torch.Tensor]:
        monkeypatch.setattr(dispatch, "attention_kernel", factory)
        backbone.zero_grad()
        sum(m.square().mean() for m in backbone(pixels).feature_maps).backward()
        return [p.grad.clone() for p in backbone.parameters()]

    calls: list[int] = []
    kernel_grads = gradients(_counting(calls))
    assert len(calls) == len(backbone.encoder.layer)
    torch_grads = gradients(lambda head_dim, dtype, needs_grad=False: None)
    for got, expected in zip(kernel_grads, torch_grads):
        assert (got - expected).abs().max().item() <= 1e-3 * expected.abs().max().item() + 1e-9


# ------------------------------------------------------------------------------------------------ fallbacks


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LWDETR_CACHE", str(tmp_path))
    monkeypatch.delenv("LWDETR_CPU_KERNELS", raising=False)
    monkeypatch.delenv("LWDETR_CPU_ISA", raising=False)
    build.forget_loaded()
    yield tmp_path
    build.forget_loaded()


def test_an_avx2_only_cpu_builds_the_portable_kernels_for_avx2(fresh_library, monkeypatch, caplog):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse4_2", "avx", "avx2", "fma"}))
    with caplog.at_level("INFO", logger="lwdetr.cpu.build"):
        attend, sample = attention.attention_kernel(16), sampling.deformable_kernel(16)
    if attend is None or sample is None:
        pytest.skip(f"no portable kernels here: {build.kernel_status()}")
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # fast kernels run: nothing to warn of
    built = sorted(p.name.split("-")[0] for p in (fresh_library / "kernels").glob("*.so"))
    assert built == ["attention_portable", "deformable_portable"]  # the AVX-512 kernels were not even compiled
    assert build._LOADED[build.ATTENTION_PORTABLE].lwdetr_vector_lanes() == 8
    assert build.kernel_summary() == "our portable kernels (AVX2)"


def test_a_failed_portable_build_runs_pytorch_attention(fresh_library, monkeypatch, caplog):
    monkeypatch.setenv("LWDETR_CPU_ISA", "avx2")
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level("WARNING", logger="lwdetr.cpu.build"):
        assert attention.attention_kernel(16) is None
    assert len(caplog.records) == 1 and "attention_portable.c" in caplog.records[0].getMessage()
    assert "build failed" in build.kernel_status()  # the log line says what the compiler said
    assert build.kernel_summary() == "PyTorch attention (the build failed)"  # the app's visitors see this
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=3)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 128, 128)).logits).all()


def test_an_unknown_isa_cap_turns_the_kernels_off_and_says_why(fresh_library, monkeypatch):
    monkeypatch.setenv("LWDETR_CPU_ISA", "avx3")
    assert attention.attention_kernel(16) is None
    assert "LWDETR_CPU_ISA='avx3' is not one of avx512, avx2" in build.kernel_status()
