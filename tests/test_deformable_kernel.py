"""The compiled deformable sampling kernel against `sample_levels` (grid_sample), and its use in the decoder."""

from __future__ import annotations

import pytest
import torch

from lwdetr.cpu import dispatch, sampling
from lwdetr.deformable import MultiScaleDeformableAttention, sample_levels

needs_kernel = pytest.mark.skipif(
    sampling.deformable_kernel(16) is None, reason="the kernel needs x86-64 Linux, AVX-512 and a C compiler"
)


def _inputs(heads, head_dim, shapes, points, queries=37, batch=2, seed=0, on_the_lattice=False):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(h * w for h, w in shapes)
    value = torch.randn(batch, tokens, heads * head_dim, generator=generator, dtype=torch.float64)
    size = (batch, queries, heads, len(shapes), points)
    # locations from -0.2 to 1.2: some corners and whole samples fall off the maps
    locations = torch.rand(*size, 2, generator=generator, dtype=torch.float64) * 1.4 - 0.2
    if on_the_lattice:  # exactly on pixel centres (fractions 0): corners of weight 0 still count in the gradient
        extent = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64)[:, None]  # [levels, 1, 2]
        locations = ((locations * extent).floor() + 0.5) / extent
    weights = torch.rand(*size, generator=generator, dtype=torch.float64)
    grad_out = torch.randn(batch, queries, heads * head_dim, generator=generator, dtype=torch.float64)
    return value, locations, weights, grad_out


def _run(sampler, value, locations, weights, grad_out, dtype):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (value, locations, weights)]
    out = sampler(*leaves)
    out.backward(grad_out.to(dtype))
    return [out.detach().double()] + [t.grad.double() for t in leaves]


@needs_kernel
@pytest.mark.parametrize(
    "heads, head_dim, shapes, points, on_the_lattice",
    [
        (16, 16, [(40, 40)], 2, False),  # tiny's decoder at 640
        (8, 32, [(20, 24), (10, 12)], 4, False),
        (4, 64, [(7, 5), (3, 2), (1, 1)], 3, False),
        (2, 48, [(6, 6)], 1, False),
        (16, 16, [(8, 16), (4, 8)], 2, True),  # powers of two: pixel centres are exact in float32
    ],
)
def test_kernel_matches_grid_sample(heads, head_dim, shapes, points, on_the_lattice):
    for name, error, torch_error, scale in sampling_errors(heads, head_dim, shapes, points, on_the_lattice):
        # float32 rounding, in another order than grid_sample's; a wrong corner or weight is off by O(scale)
        assert error <= 2 * torch_error + 1e-6 * scale, name


def sampling_errors(heads, head_dim, shapes, points, on_the_lattice) -> list[tuple[str, float, float, float]]:
    """For the output and the value, location and weight gradients: (name, the active kernel's error, PyTorch's
    float32 error, scale), the largest deviations from float64 `sample_levels` on random inputs."""
    value, locations, weights, grad_out = _inputs(heads, head_dim, shapes, points, on_the_lattice=on_the_lattice)
    batch, tokens = value.shape[:2]

    def torch_sampler(v, loc, w):
        return sample_levels(v.transpose(1, 2), shapes, loc, w, heads)

    def kernel_sampler(v, loc, w):
        return sampling.kernel_deformable_sampling(v.view(batch, tokens, heads, head_dim), shapes, loc, w)

    exact = _run(torch_sampler, value, locations, weights, grad_out, torch.float64)
    single = _run(torch_sampler, value, locations, weights, grad_out, torch.float32)
    kernel = _run(kernel_sampler, value, locations, weights, grad_out, torch.float32)
    return [
        (name, (got - want).abs().max().item(), (torch_got - want).abs().max().item(), want.abs().max().item())
        for name, want, torch_got, got in zip(["out", "value", "locations", "weights"], exact, single, kernel)
    ]


@needs_kernel
def test_kernel_reads_strided_values():
    """Values as a slice of a wider tensor (the decoder's fused inference projection) give the same samples."""
    value, locations, weights, _ = _inputs(8, 32, [(12, 10)], 2)
    value, locations, weights = value.float(), locations.float(), weights.float()
    wide = torch.cat((torch.randn_like(value), value, torch.randn_like(value)), -1)  # token stride 3 * 256
    strided = wide[..., 256:512].unflatten(-1, (8, 32))
    assert strided.stride(1) == 3 * 256
    dense = sampling.kernel_deformable_sampling(value.unflatten(-1, (8, 32)), [(12, 10)], locations, weights)
    got = sampling.kernel_deformable_sampling(strided, [(12, 10)], locations, weights)
    assert torch.equal(got, dense)


@needs_kernel
def test_kernel_rejects_levels_that_do_not_add_up():
    value, locations, weights, _ = _inputs(2, 16, [(4, 4)], 1)
    with pytest.raises(RuntimeError, match="unsupported shape"):
        sampling.kernel_deformable_sampling(value.float().view(2, 16, 2, 16), [(4, 5)], locations, weights)


@needs_kernel
def test_kernel_rejects_mismatched_shapes():
    value, locations, weights, _ = _inputs(2, 16, [(4, 4)], 3)
    value, locations, weights = value.float().view(2, 16, 2, 16), locations.float(), weights.float()
    with pytest.raises(ValueError, match="sampling_locations must be"):
        sampling.kernel_deformable_sampling(value, [(4, 4)], locations[:1], weights[:1])
    with pytest.raises(ValueError, match="sampling_locations must be"):
        sampling.kernel_deformable_sampling(value, [(2, 4), (2, 4)], locations, weights)
    with pytest.raises(ValueError, match="attention_weights must be"):
        sampling.kernel_deformable_sampling(value, [(4, 4)], locations, weights[..., :2])
    with pytest.raises(ValueError, match="value must be"):
        sampling.kernel_deformable_sampling(value.flatten(2), [(4, 4)], locations, weights)


@needs_kernel
@pytest.mark.parametrize("with_value", [False, True])
def test_deformable_attention_runs_in_the_kernel(monkeypatch, with_value):
    """The module samples with the kernel (with and without a precomputed value, with a padding mask) and agrees
    with its grid_sample path in outputs and gradients."""
    torch.manual_seed(0)
    shapes = [(8, 10), (4, 5)]
    module = MultiScaleDeformableAttention(dim=64, heads=4, levels=2, points=3)
    module.reset_parameters()
    with torch.no_grad():  # offsets and weights that depend on the query
        module.sampling_offsets.weight.normal_(0, 0.5)
        module.attention_weights.weight.normal_(0, 0.5)
    query = torch.randn(2, 11, 64)
    boxes = torch.rand(2, 11, 2, 4) * 0.5 + 0.25
    memory = torch.randn(2, 100, 64)
    mask = torch.ones(2, 100, dtype=torch.bool)
    mask[1, 60:80] = False
    calls = []
    real = dispatch.deformable_kernel

    def counting(head_dim, dtype):
        kernel = real(head_dim, dtype)
        return None if kernel is None else lambda *args: calls.append(1) or kernel(*args)

    def run():
        module.zero_grad()
        memory_leaf = memory.clone().requires_grad_()
        value = module.project_values(memory_leaf) if with_value else None
        out = module(query, boxes, memory_leaf, mask, shapes, value)
        out.square().sum().backward()
        return [out.detach(), memory_leaf.grad, module.sampling_offsets.weight.grad, module.value_proj.weight.grad]

    monkeypatch.setattr(dispatch, "deformable_kernel", counting)
    fast = run()
    assert calls == [1]
    monkeypatch.setattr(dispatch, "deformable_kernel", lambda head_dim, dtype: None)
    slow = run()
    for name, a, b in zip(["out", "memory", "offsets", "value_proj"], fast, slow):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item(), name
