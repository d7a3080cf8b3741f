"""Multi-scale deformable attention (Deformable DETR): over `grid_sample`, or our CPU kernel for the sampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu

__all__ = ["MultiScaleDeformableAttention", "sample_levels"]


def sample_levels(
    value: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    heads: int,
) -> torch.Tensor:
    """Bilinearly sample every level at the given locations and sum them with the attention weights.

    value: [batch, heads * head_dim, sum(h*w)] (channels first: each level is then a [batch * heads, head_dim, h, w]
    map for `grid_sample`, a free view when it is contiguous); sampling_locations: [batch, queries, heads, levels,
    points, 2] in [0, 1] (x, y); attention_weights: [batch, queries, heads, levels, points]
    -> [batch, queries, heads * head_dim].
    """
    batch, dim, _ = value.shape
    head_dim = dim // heads
    _, queries, _, levels, points, _ = sampling_locations.shape
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1)  # [batch*heads, queries, levels, points, 2]
    per_level = value.split([h * w for h, w in spatial_shapes], dim=2)
    sampled = []
    for level, (height, width) in enumerate(spatial_shapes):
        level_value = per_level[level].reshape(batch * heads, head_dim, height, width)
        sampled.append(
            F.grid_sample(level_value, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # [batch*heads, head_dim, queries, levels*points] weighted by [batch*heads, 1, queries, levels*points]
    stacked = torch.stack(sampled, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * weights).sum(-1).view(batch, dim, queries)
    return out.transpose(1, 2)


class MultiScaleDeformableAttention(nn.Module):
    """Each query attends to `points` learned offsets around its reference box on every feature level."""

    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"d_model {dim} is not divisible by {heads} cross-attention heads")
        self.dim, self.heads, self.levels, self.points = dim, heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's init: offsets start on a ring of directions, one per head, growing with the point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * math.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        ring = directions.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        ring *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(ring.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: torch.Tensor,
        reference_boxes: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        value: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query: [batch, queries, dim] (position embedding already added); reference_boxes: [batch, queries, levels, 4]
        cxcywh in [0, 1]; memory: [batch, sum(h*w), dim]; memory_mask: [batch, sum(h*w)] True on real pixels;
        value: `project_values(memory)` when the caller has it already ([batch, dim, tokens], any strides).
        Returns [batch, queries, dim].
        """
        batch, queries, _ = query.shape
        shape = (batch, queries, self.heads, self.levels, self.points)
        offsets = self.sampling_offsets(query).view(*shape, 2)
        weights = self.attention_weights(query).view(batch, queries, self.heads, -1).softmax(-1).view(shape)
        # offsets are in units of half the reference box, spread over the points
        centre, size = reference_boxes[:, :, None, :, None, :2], reference_boxes[:, :, None, :, None, 2:]
        locations = centre + offsets * (size * (0.5 / self.points))
        sampled = cpu.fast_deformable_sampling(self, memory, memory_mask, spatial_shapes, locations, weights, value)
        if sampled is None:
            if value is None:
                value = self.project_values(memory)  # [batch, dim, tokens]
            if memory_mask is not None:
                value = value.masked_fill(~memory_mask[:, None], 0.0)
            sampled = sample_levels(value, spatial_shapes, locations, weights, self.heads)
        return self.output_proj(sampled)

    def project_values(self, memory: torch.Tensor) -> torch.Tensor:
        """value_proj(memory) channels first: [batch, tokens, dim] -> [batch, dim, tokens].

        At inference the product is taken as W memory^T, which writes the channels-first layout directly; with
        autograd it is the usual linear layer (whose rounding the reference shares), transposed as a view.
        """
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            return self.value_proj(memory).transpose(1, 2)
        value = torch.matmul(self.value_proj.weight, memory.transpose(1, 2))
        return value.add_(self.value_proj.bias[:, None])
