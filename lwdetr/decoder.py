"""The LW-DETR decoder: self-attention (split by group in training), deformable cross-attention, FFN; post-norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu
from .config import LwDetrConfig
from .deformable import MultiScaleDeformableAttention
from .layers import MLP, activation_layer

__all__ = ["Decoder", "sine_embedding"]


def sine_embedding(coords: torch.Tensor, dim_per_coord: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of normalised coordinates, interleaved sin/cos per frequency.

    coords: [..., n] (x, y, w, h) -> [..., n * dim_per_coord]; x and y swap places so the result reads
    (y, x, w, h), the order DETR's position embeddings use.
    """
    freq_index = torch.arange(dim_per_coord, dtype=torch.float32, device=coords.device)
    periods = temperature ** (2 * torch.div(freq_index, 2, rounding_mode="floor") / dim_per_coord)
    phases = coords[..., None] * (2 * math.pi) / periods  # [..., n, dim_per_coord]
    embedded = torch.stack((phases[..., 0::2].sin(), phases[..., 1::2].cos()), dim=-1).flatten(-2)
    if coords.shape[-1] >= 2:
        embedded = torch.cat((embedded[..., 1:2, :], embedded[..., 0:1, :], embedded[..., 2:, :]), dim=-2)
    return embedded.flatten(-2).to(coords.dtype)


class GroupSelfAttention(nn.Module):
    """Multi-head self-attention over the queries; in training each Group DETR group attends only to itself."""

    def __init__(self, dim: int, heads: int, bias: bool, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, hidden: torch.Tensor, position: torch.Tensor, groups: int) -> torch.Tensor:
        """hidden, position: [batch, queries, dim] -> [batch, queries, dim]."""
        batch, queries, dim = hidden.shape
        per_group = queries // groups
        # the queries of one group are contiguous, so [batch * groups, per_group, dim] is a free view in which every
        # group is its own batch entry (attention is per entry: the order of the entries does not matter)
        q_in = (hidden + position).reshape(batch * groups, per_group, dim)
        v_in = hidden.reshape(batch * groups, per_group, dim)
        out = self._attend(q_in, v_in)
        return self.o_proj(out).reshape(batch, queries, dim)

    def _attend(self, q_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
        """[entries, n, dim] query/key input and value input -> attention output before o_proj, [entries, n, dim]."""
        if (fast := cpu.fast_group_attention(self, q_in, v_in)) is not None:
            return fast
        entries, n, dim = v_in.shape
        head_dim = dim // self.heads
        dropout = self.dropout if self.training else 0.0

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(entries, n, self.heads, head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(q_in)), heads(self.k_proj(q_in)), heads(self.v_proj(v_in))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return out.transpose(1, 2).reshape(entries, n, dim)


class FeedForward(nn.Module):
    """Residual two-layer MLP: x + fc2(act(fc1(x)))."""

    def __init__(self, config: LwDetrConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.d_model, config.decoder_ffn_dim)
        self.act = activation_layer(config.decoder_activation_function, inplace=True)  # on fc1's fresh output
        self.fc2 = nn.Linear(config.decoder_ffn_dim, config.d_model)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, queries, dim] -> [batch, queries, dim]."""
        if (fast := cpu.fast_decoder_ffn(self, x)) is not None:
            return fast
        rows = x.reshape(-1, x.shape[-1])
        # on 2-D rows fc1 returns a fresh tensor; on 3-D input it would return a view of one, and an in-place ReLU
        # on a view makes autograd copy the whole [rows, ffn_dim] gradient in the backward (CopySlices)
        y = F.dropout(self.act(self.fc1(rows)), self.dropout, self.training)
        return x + F.dropout(self.fc2(y), self.dropout, self.training).view(x.shape)


class DecoderLayer(nn.Module):
    def __init__(self, config: LwDetrConfig):
        super().__init__()
        dim = config.d_model
        self.dropout = config.dropout
        self.self_attn = GroupSelfAttention(
            dim, config.decoder_self_attention_heads, config.attention_bias, config.attention_dropout
        )
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.cross_attn = MultiScaleDeformableAttention(
            dim, config.decoder_cross_attention_heads, config.num_feature_levels, config.decoder_n_points
        )
        self.cross_attn_layer_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(config)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, hidden, position, reference_boxes, memory, memory_mask, spatial_shapes, groups, value=None):
        """hidden, position: [batch, queries, dim] -> [batch, queries, dim]; value: this layer's projected memory, if
        the decoder has computed it (see `Decoder.projected_values`)."""
        attended = self.self_attn(hidden, position, groups)
        hidden = self.self_attn_layer_norm(hidden + F.dropout(attended, self.dropout, self.training))
        sampled = self.cross_attn(hidden + position, reference_boxes, memory, memory_mask, spatial_shapes, value)
        hidden = self.cross_attn_layer_norm(hidden + F.dropout(sampled, self.dropout, self.training))
        return self.layer_norm(self.mlp(hidden))


class Decoder(nn.Module):
    """`decoder_layers` layers sharing one query position embedding computed from the initial reference boxes.

    LW-DETR does not refine the reference boxes between layers: every layer samples around the boxes from query
    selection, and the heads refine them once at the end.
    """

    def __init__(self, config: LwDetrConfig):
        super().__init__()
        self.d_model = config.d_model
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.layernorm = nn.LayerNorm(config.d_model)
        self.ref_point_head = MLP(2 * config.d_model, config.d_model, config.d_model, num_layers=2)

    def forward(
        self,
        queries: torch.Tensor,
        reference_boxes: torch.Tensor,
        valid_ratios: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor | None,
        spatial_shapes: list[tuple[int, int]],
        groups: int,
    ) -> torch.Tensor:
        """queries: [batch, Q, dim]; reference_boxes: [batch, Q, 4]; valid_ratios: [batch, levels, 2] (w, h);
        memory_mask: [batch, tokens] True on real pixels, or None when nothing is padded.

        Returns the layer-normed output of every layer: [layers, batch, Q, dim].
        """
        # reference boxes relative to each level's valid (unpadded) area
        per_level = reference_boxes[:, :, None] * valid_ratios.repeat(1, 1, 2)[:, None]
        position = self.ref_point_head(sine_embedding(per_level[:, :, 0], self.d_model // 2))
        hidden, outputs = queries, []
        for layer, value in zip(self.layers, self.projected_values(memory)):
            hidden = layer(hidden, position, per_level, memory, memory_mask, spatial_shapes, groups, value)
            outputs.append(self.layernorm(hidden))
        return torch.stack(outputs)

    def projected_values(self, memory: torch.Tensor) -> list[torch.Tensor | None]:
        """Every layer's deformable-attention values at once where the CPU computes them in one GEMM (inference):
        [batch, dim, tokens] views. All layers sample the same memory, each through its own `value_proj`; elsewhere
        each layer projects its own (None here)."""
        values = cpu.fast_decoder_values(self, memory)
        return [None] * len(self.layers) if values is None else values
