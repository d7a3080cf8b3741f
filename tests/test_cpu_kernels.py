"""The compiled CPU attention kernel against PyTorch's attention, its fallbacks, and its use in the ViT."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from lwdetr import vit
from lwdetr.config import preset_config
from lwdetr.cpu import attention, build, dispatch, sampling
from lwdetr.modeling import LwDetrForObjectDetection

needs_kernel = pytest.mark.skipif(
    attention.attention_kernel(16) is None, reason="the kernel needs x86-64 Linux, AVX-512 and a C compiler"
)
needs_amx = pytest.mark.skipif(
    attention.attention_kernel(16, torch.bfloat16) is None, reason="the bf16 kernel needs AMX and a C compiler"
)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Forget the loaded library before and after the test; build into a private cache folder."""
    monkeypatch.setenv("LWDETR_CACHE", str(tmp_path))
    monkeypatch.delenv("LWDETR_CPU_KERNELS", raising=False)  # each test says what it plays
    monkeypatch.delenv("LWDETR_CPU_ISA", raising=False)
    build.forget_loaded()
    yield tmp_path
    build.forget_loaded()


def torch_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    q, k, v = qkv.view(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)


def attention_forward_errors(head_dim: int, tokens: int) -> tuple[float, float, float]:
    """(the active kernel's error, PyTorch's float32 error, the output's scale): largest deviations from float64
    attention on random qkv [2, tokens, 3 * 3 heads * head_dim] with sharp softmaxes."""
    torch.manual_seed(tokens + head_dim)
    heads = 3
    qkv = torch.randn(2, tokens, 3 * heads * head_dim) * 3  # sharp softmaxes: exp underflows in places
    with torch.no_grad():
        exact = torch_attention(qkv.double(), heads)
        torch_error = (torch_attention(qkv, heads) - exact).abs().max().item()
        got = attention.kernel_attention(qkv, heads)
    assert got.shape == exact.shape and got.dtype == torch.float32
    return (got - exact).abs().max().item(), torch_error, exact.abs().max().item()


def attention_gradient_errors(head_dim: int, tokens: int) -> tuple[float, float, float]:
    """The same for the qkv gradient of a random output gradient: (kernel error, PyTorch float32 error, scale)."""
    torch.manual_seed(0)
    heads = 3
    qkv = torch.randn(2, tokens, 3 * heads * head_dim) * 2
    grad_out = torch.randn(2, tokens, heads * head_dim)
    grads = {}
    for name, attend, dtype in [
        ("exact", torch_attention, torch.float64),
        ("torch", torch_attention, torch.float32),
        ("kernel", attention.kernel_attention, torch.float32),
    ]:
        x = qkv.to(dtype).clone().requires_grad_()
        attend(x, heads).backward(grad_out.to(dtype))
        grads[name] = x.grad.double()
    errors = [(grads[name] - grads["exact"]).abs().max().item() for name in ("kernel", "torch")]
    return errors[0], errors[1], grads["exact"].abs().max().item()


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])
@pytest.mark.parametrize("tokens", [1, 7, 16, 37, 100, 257])
def test_kernel_matches_torch_attention(head_dim: int, tokens: int):
    # odd token counts exercise the partial key chunk (n % 16) and the leftover query rows (n % 8)
    error, torch_error, scale = attention_forward_errors(head_dim, tokens)
    # about as close to the float64 result as PyTorch's own float32 attention is. Both err by ~1e-6 of the
    # output's scale (float32 rounding of scores up to ~30); which of the two is closer differs by case and by CPU
    # (PyTorch's own kernel differs between AVX2, AVX-512 and AMX machines), hence the term in the scale. A real
    # indexing error is off by O(scale).
    assert error <= 2 * torch_error + 2e-6 * scale
    assert error < 1e-5 * scale


@needs_kernel
def test_kernel_long_sequence_and_strided_input():
    torch.manual_seed(0)
    wide = torch.randn(1, 1600, 2 * 3 * 192)
    qkv = wide[..., ::2]  # not contiguous: the wrapper copies it into the kernel's layout
    got = attention.kernel_attention(qkv, 12)
    assert (got - torch_attention(qkv.contiguous(), 12)).abs().max().item() < 1e-5


@needs_kernel
def test_kernel_keeps_the_input_dtype():
    qkv = torch.randn(2, 50, 3 * 64).bfloat16()
    got = attention.kernel_attention(qkv, 4)
    assert got.dtype == torch.bfloat16
    assert (got.float() - torch_attention(qkv.float(), 4)).abs().max().item() < 2e-2


@needs_kernel
def test_unsupported_head_sizes_fall_back():
    assert attention.attention_kernel(24) is None
    assert attention.attention_kernel(128) is None


def test_switched_off_by_the_environment(fresh_library, monkeypatch):
    monkeypatch.setenv("LWDETR_CPU_KERNELS", "0")
    assert attention.attention_kernel(16) is None


@needs_kernel
def test_builds_once_into_the_cache_folder(fresh_library):
    assert attention.attention_kernel(16) is not None
    built = list((fresh_library / "kernels").glob("attention_avx512-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    build.forget_loaded()
    assert attention.attention_kernel(16) is not None
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    # no temporary left behind: the library and its lock file
    lock = ".attention_avx512-" + built[0].name.split("-")[1] + ".lock"
    assert sorted(p.name for p in (fresh_library / "kernels").iterdir()) == sorted([built[0].name, lock])


def test_a_failing_compiler_falls_back_to_torch(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    assert attention.attention_kernel(16) is None
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=3)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 128, 128)).logits).all()


@needs_kernel
@pytest.mark.parametrize("head_dim", [16, 32, 48, 64])  # dk and dv accumulate transposed for 16, per key otherwise
@pytest.mark.parametrize("tokens", [1, 7, 37, 100, 257])  # 1, 3 and 1 chunks of 16 keys after the 64-key tiles
def test_kernel_gradients_match_torch_attention(head_dim: int, tokens: int):
    error, torch_error, scale = attention_gradient_errors(head_dim, tokens)
    # float32 rounding of sums over up to 257 keys (in another order than PyTorch's): the kernel's error measured
    # 0.2-2x PyTorch's over these shapes; a wrong index or a lost tail would be off by O(1)
    assert error <= 2 * torch_error + 1e-6 * scale


@needs_kernel
def test_vit_attention_runs_in_the_kernel(monkeypatch):
    """Tiny's ViT (head_dim 16) runs every attention layer in the kernel, with and without autograd, and agrees with
    PyTorch's attention in outputs and gradients."""
    calls = []

    def counting(head_dim: int, dtype: torch.dtype, needs_grad: bool = False):
        kernel = attention.attention_kernel(head_dim, dtype, needs_grad)
        return None if kernel is None else lambda qkv, heads: calls.append(heads) or kernel(qkv, heads)

    torch.manual_seed(0)
    backbone = vit.LwDetrViTBackbone(preset_config("tiny", num_labels=3).backbone_config).eval()
    pixels = torch.randn(1, 3, 256, 256)

    def run(kernel_factory):
        monkeypatch.setattr(dispatch, "attention_kernel", kernel_factory)
        backbone.zero_grad()
        maps = backbone(pixels).feature_maps
        sum(m.square().mean() for m in maps).backward()
        grads = [p.grad.clone() for p in backbone.parameters()]
        with torch.no_grad():
            return [m.detach() for m in maps], grads, [m.detach() for m in backbone(pixels).feature_maps]

    kernel_maps, kernel_grads, kernel_eval = run(counting)
    assert len(calls) == 2 * len(backbone.encoder.layer)  # with autograd, then without
    torch_maps, torch_grads, _ = run(lambda head_dim, dtype, needs_grad=False: None)
    for got, expected in zip(kernel_maps + kernel_eval, torch_maps + torch_maps):
        assert (got - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    for got, expected in zip(kernel_grads, torch_grads):
        assert (got - expected).abs().max().item() <= 1e-3 * expected.abs().max().item() + 1e-9


@needs_amx
@pytest.mark.parametrize("tokens", [1, 7, 16, 33, 100, 257, 1600])
def test_amx_kernel_matches_torch_bf16_attention(tokens: int):
    # rows past a multiple of 16 take the zero-padded partial tile; keys are padded to multiples of 32
    torch.manual_seed(tokens)
    heads = 12 if tokens == 1600 else 3
    qkv = (torch.randn(2, tokens, 3 * heads * 16) * 2).bfloat16()
    with torch.no_grad():
        exact = torch_attention(qkv.double(), heads)
        torch_error = (torch_attention(qkv, heads).double() - exact).abs().max().item()
        got = attention.amx_attention(qkv, heads)
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    # as close to the exact result as PyTorch's own bf16 attention is
    assert (got.double() - exact).abs().max().item() <= 1.5 * torch_error + 1e-6


@needs_amx
def test_amx_kernel_refuses_autograd():
    assert attention.attention_kernel(16, torch.bfloat16, needs_grad=True) is None  # callers then use PyTorch's
    qkv = torch.randn(1, 16, 3 * 16, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward"):
        attention.amx_attention(qkv, 1)


@needs_amx
def test_bf16_vit_runs_its_attention_on_amx(monkeypatch):
    calls = []

    def counting(head_dim: int, dtype: torch.dtype, needs_grad: bool = False):
        kernel = attention.attention_kernel(head_dim, dtype, needs_grad)
        return None if kernel is None else lambda qkv, heads: calls.append(qkv.dtype) or kernel(qkv, heads)

    torch.manual_seed(0)
    backbone = vit.LwDetrViTBackbone(preset_config("tiny", num_labels=3).backbone_config).eval().bfloat16()
    pixels = torch.randn(1, 3, 256, 256).bfloat16()
    monkeypatch.setattr(dispatch, "attention_kernel", counting)
    with torch.no_grad():
        fast = backbone(pixels).feature_maps
    assert calls == [torch.bfloat16] * len(backbone.encoder.layer)
    monkeypatch.setattr(dispatch, "attention_kernel", lambda head_dim, dtype, needs_grad=False: None)
    with torch.no_grad():
        slow = backbone(pixels).feature_maps
    for a, b in zip(fast, slow):  # two bf16 computations: rounding of a few bf16 ulps of the maps' scale
        assert (a.float() - b.float()).abs().max().item() < 0.05 * b.float().abs().max().item()


@needs_kernel
def test_kernel_rejects_a_bad_qkv():
    with pytest.raises(ValueError, match="qkv must be"):
        attention.kernel_attention(torch.randn(2, 10, 3 * 16 + 1), 1)


# ---------------------------------------------------------------------------------------------- on any machine
# What follows needs no AVX-512: it proves the fallbacks and the build's bookkeeping on every CPU.


def test_a_cpu_without_avx2_runs_pytorch_and_says_why_once(fresh_library, monkeypatch, caplog):
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    with caplog.at_level("INFO", logger="lwdetr.cpu.build"):
        assert attention.attention_kernel(16) is None
        assert attention.attention_kernel(16) is None  # decided once
        assert sampling.deformable_kernel(32) is None
        assert attention.attention_kernel(16, torch.bfloat16) is None
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the AVX-512 kernel's absence is said at INFO (the portable one would run instead), the portable one's at WARNING
    assert len(warnings) == 1 and "lacks avx2, fma" in warnings[0] and "PyTorch" in warnings[0]
    assert not list(fresh_library.rglob("*.so"))  # nothing was compiled
    status = build.kernel_status()
    assert "off" in status and "lacks avx512f" in status and "lacks avx2" in status and "active" not in status
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=3)).eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 128, 128)).logits).all()


def test_a_missing_compiler_falls_back_with_a_warning(fresh_library, monkeypatch, caplog):
    monkeypatch.setattr(build, "_unsupported", lambda build: None)  # play a machine the kernels fit
    monkeypatch.setenv("CC", str(fresh_library / "no-such-compiler"))
    with caplog.at_level("WARNING", logger="lwdetr.cpu.build"):
        assert attention.attention_kernel(16) is None
    assert "build failed" in caplog.records[0].getMessage()
    assert "build failed" in build.kernel_status()


def test_requests_during_the_background_build_use_pytorch(fresh_library, monkeypatch):
    release = threading.Event()
    built = []

    def slow_load(build):
        release.wait(30)
        built.append(build.source)
        return object()  # stands for a loaded library: nothing calls into it here

    monkeypatch.setattr(build, "_load_now", slow_load)
    thread = build.start_background_build()
    assert thread is not None and thread.is_alive()
    assert attention.attention_kernel(16) is None  # does not wait for the build
    assert "building in the background" in build.kernel_status()
    release.set()
    thread.join(30)
    assert sorted(built) == ["attention_amx_bf16.c", "attention_avx512.c", "deformable_avx512.c"]
    assert attention.attention_kernel(16) is attention.kernel_attention
    assert build.start_background_build() is None  # nothing left to build


def test_concurrent_builds_compile_once_and_other_flags_keep_their_builds(tmp_path, monkeypatch):
    """Two builders asking at once: one compiles (file lock), the other reuses its library. A build with another
    compiler command (here another CC) shares the cache without deleting the first one's library. The "compilers"
    are stand-ins that log their call, take a second and write a file, so this runs on any machine."""
    log = tmp_path / "compiler.log"
    for name in ("cc-a", "cc-b"):
        stand_in = tmp_path / name
        stand_in.write_text(
            "#!/bin/sh\n"
            'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
            f'echo {name} >> "{log}"; sleep 1; echo library > "$out"\n'
        )
        stand_in.chmod(0o755)
    monkeypatch.setenv("LWDETR_CACHE", str(tmp_path / "cache"))

    monkeypatch.setenv("CC", str(tmp_path / "cc-a"))
    # threads stand for processes: flock locks belong to each open() of the lock file, not to the process
    with ThreadPoolExecutor(2) as pool:
        paths = set(pool.map(build._compile, [build.DEFORMABLE_AVX512] * 2))
    assert log.read_text().split() == ["cc-a"] and len(paths) == 1
    monkeypatch.setenv("CC", str(tmp_path / "cc-b"))
    other = build._compile(build.DEFORMABLE_AVX512)
    assert other not in paths and other.exists() and paths.pop().exists()


def test_an_unwritable_cache_builds_into_a_private_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LWDETR_CACHE", str(blocker / "cache"))  # mkdir fails, even for root
    folder = build._writable_cache()
    assert folder.is_dir() and os.access(folder, os.W_OK) and blocker not in folder.parents
