"""The deformable attention's sampling on our compiled kernel, in place of a `grid_sample` per level: float32,
forward and backward, AVX-512 or the portable kernel (built for AVX2 where AVX-512 is missing).
`deformable_kernel` says whether it runs for a call (None: `grid_sample` runs)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .build import DEFORMABLE_AVX512, DEFORMABLE_PORTABLE, check, library, load

__all__ = ["DeformableFn", "deformable_kernel", "kernel_deformable_sampling"]

DeformableFn = Callable[[torch.Tensor, list[tuple[int, int]], torch.Tensor, torch.Tensor], torch.Tensor]
_DEFORMABLE_HEAD_SIZES = (16, 32, 48, 64)


def deformable_kernel(head_dim: int, dtype: torch.dtype = torch.float32) -> DeformableFn | None:
    """The compiled deformable sampling (`kernel_deformable_sampling`, with autograd) for heads of `head_dim`
    features in `dtype` on this machine, or None: float32, head sizes 16, 32, 48 and 64, AVX-512 or the portable
    kernel."""
    if dtype == torch.float32 and head_dim in _DEFORMABLE_HEAD_SIZES and _deformable_build() is not None:
        return kernel_deformable_sampling
    return None


def _deformable_build():
    """The deformable sampling build that runs here: the AVX-512 kernel, else the portable one; None when neither."""
    return next((build for build in (DEFORMABLE_AVX512, DEFORMABLE_PORTABLE) if load(build) is not None), None)


def _deformable_sizes(value: torch.Tensor, locations: torch.Tensor) -> tuple[int, ...]:
    batch, tokens, heads, head_dim = value.shape
    queries, num_levels, points = locations.shape[1], locations.shape[3], locations.shape[4]
    return (batch, tokens, heads, head_dim, queries, num_levels, points, value.stride(1), value.stride(0))


class _DeformableSampling(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, locations, weights, levels):
        out = value.new_empty(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])
        sizes = _deformable_sizes(value, locations)
        status = library(_deformable_build() or DEFORMABLE_AVX512).lwdetr_deformable_forward(
            value.data_ptr(), locations.data_ptr(), weights.data_ptr(), out.data_ptr(), levels.data_ptr(), *sizes,
            torch.get_num_threads(),
        )  # fmt: skip
        check(status, "deformable forward")
        ctx.save_for_backward(value, locations, weights, levels)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        value, locations, weights, levels = ctx.saved_tensors
        grad_out = grad_out.to(torch.float32).contiguous()
        grad_value = torch.zeros(value.shape, dtype=value.dtype)  # the kernel scatters into it
        grad_locations, grad_weights = torch.empty_like(locations), torch.empty_like(weights)
        status = library(_deformable_build() or DEFORMABLE_AVX512).lwdetr_deformable_backward(
            value.data_ptr(), locations.data_ptr(), weights.data_ptr(), grad_out.data_ptr(), grad_value.data_ptr(),
            grad_locations.data_ptr(), grad_weights.data_ptr(), levels.data_ptr(),
            *_deformable_sizes(value, locations), torch.get_num_threads(),
        )  # fmt: skip
        check(status, "deformable backward")
        return grad_value, grad_locations, grad_weights, None


def kernel_deformable_sampling(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """`lwdetr.deformable.sample_levels` with the compiled kernel, with autograd; float32 on the CPU.

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
