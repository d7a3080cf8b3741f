"""The LW-DETR decoder: self-attention (split by group in training), deformable cross-attention, FFN; post-norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LwDetrConfig
from .cpu_kernels import attention_kernel
from .deformable import MultiScaleDeformableAttention
from .feedforward import buffer_reusing_mlp, buffer_reusing_mlp_applies
from .layers import MLP, activation_layer, derived_weights, onednn_usable, outside_tracing_on_cpu, pack_linear_weight

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
        entries, n, dim = v_in.shape
        head_dim = dim // self.heads
        dropout = self.dropout if self.training else 0.0
        usable = dropout == 0.0 and outside_tracing_on_cpu(v_in)
        kernel = attention_kernel(head_dim, v_in.dtype, needs_grad=torch.is_grad_enabled()) if usable else None
        if kernel is not None:
            # our kernel takes q, k, v side by side per token: q and k (same input) from one GEMM, then v
            qk_weight = torch.cat((self.q_proj.weight, self.k_proj.weight))
            qk_bias = None if self.q_proj.bias is None else torch.cat((self.q_proj.bias, self.k_proj.bias))
            return kernel(torch.cat((F.linear(q_in, qk_weight, qk_bias), self.v_proj(v_in)), -1), self.heads)

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
        rows = x.reshape(-1, x.shape[-1])
        if not self.training and isinstance(self.act, nn.ReLU) and onednn_usable(x, self.fc1.weight):
            return self.fused_forward(rows).view(x.shape)
        if (not self.training or self.dropout == 0) and buffer_reusing_mlp_applies(rows, self.fc1, self.act):
            return x + buffer_reusing_mlp(rows, self.fc1, self.act, self.fc2).view(x.shape)
        # on 2-D rows fc1 returns a fresh tensor; on 3-D input it would return a view of one, and an in-place ReLU
        # on a view makes autograd copy the whole [rows, ffn_dim] gradient in the backward (CopySlices)
        y = F.dropout(self.act(self.fc1(rows)), self.dropout, self.training)
        return x + F.dropout(self.fc2(y), self.dropout, self.training).view(x.shape)

    def fused_forward(self, rows: torch.Tensor) -> torch.Tensor:
        """Inference in two oneDNN GEMMs with packed weights: the first applies ReLU, the second adds the residual."""
        linear = torch.ops.mkldnn._linear_pointwise
        fc1, fc2 = self.fc1, self.fc2

        def pack() -> tuple[torch.Tensor, torch.Tensor]:
            return pack_linear_weight(fc1.weight, rows.shape[0]), pack_linear_weight(fc2.weight, rows.shape[0])

        w1, w2 = derived_weights(self, (fc1.weight, fc2.weight), pack)
        return linear.binary(linear(rows, w1, fc1.bias, "relu", [], ""), rows, w2, fc2.bias, "add")


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
        """Every layer's deformable-attention values at once, at inference: [batch, dim, tokens] views.

        All layers sample the same memory, each through its own `value_proj`; one GEMM with the weights side by side
        (packed once, see `derived_weights`) replaces a small one per layer. Elsewhere (training, tracing, other
        devices) each layer projects its own (None here).
        """
        projections = [layer.cross_attn.value_proj for layer in self.layers]
        if not onednn_usable(memory, projections[0].weight):
            return [None] * len(projections)
        sources = tuple(t for proj in projections for t in (proj.weight, proj.bias))

        def pack() -> tuple[torch.Tensor, torch.Tensor]:
            weight = torch.cat([proj.weight for proj in projections])
            return pack_linear_weight(weight, memory.shape[1]), torch.cat([proj.bias for proj in projections])

        weight, bias = derived_weights(self, sources, pack)
        values = torch.ops.mkldnn._linear_pointwise(memory, weight, bias, "none", [], "")  # [batch, tokens, L * dim]
        return [chunk.transpose(1, 2) for chunk in values.chunk(len(projections), dim=-1)]
