"""Weights derived for CPU inference: oneDNN's prepacked (blocked) layouts, and the cache that keeps them per module
until a source parameter changes."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["derived_weights", "pack_conv_weight", "pack_linear_weight", "weights_generation"]

T = TypeVar("T")

# owner module -> (key, value): weights derived for inference (folded, packed), kept outside the modules so that
# copies and state dicts never see them, and dropped with their module
_DERIVED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Any]] = weakref.WeakKeyDictionary()
_optimizer_steps = 0


def _count_optimizer_step(*_: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


# Fused optimizers (torch.optim.AdamW(fused=True), transformers.Trainer's default) update parameters without bumping
# their version counters, so a version alone would keep serving weights packed before the step.
register_optimizer_step_post_hook(_count_optimizer_step)


def weights_generation() -> int:
    """The number of optimizer steps taken so far in this process (any optimizer): part of every cache key of
    tensors derived from parameters, with their version counters."""
    return _optimizer_steps


def derived_weights(owner: nn.Module, sources: tuple[torch.Tensor | None, ...], build: Callable[[], T], *extra) -> T:
    """`build()`, cached for `owner` until a source tensor changes: the key holds each source's storage, version
    counter (bumped by in-place edits: load_state_dict, unfused optimizer steps) and dtype, the optimizer steps taken
    (`weights_generation`), plus `extra`."""
    key = (*extra, weights_generation(), *((t.data_ptr(), t._version, t.dtype) for t in sources if t is not None))
    cached = _DERIVED_WEIGHTS.get(owner)
    if cached is None or cached[0] != key:
        cached = _DERIVED_WEIGHTS[owner] = (key, build())
    return cached[1]


def pack_linear_weight(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """An [out, in] weight in oneDNN's blocked layout for `torch.ops.mkldnn._linear_pointwise`, which then skips
    reordering it on every call; `rows` hints the GEMM's M."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def pack_conv_weight(weight: torch.Tensor, geometry: tuple, input_shape: list[int]) -> torch.Tensor:
    """A convolution weight in oneDNN's blocked layout for `torch.ops.mkldnn._convolution_pointwise`;
    `geometry` is (padding, stride, dilation, groups) as lists and an int."""
    return torch.ops.mkldnn._reorder_convolution_weight(weight, *geometry, input_shape)
