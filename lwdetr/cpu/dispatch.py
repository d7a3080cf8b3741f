"""The seam between the model and the CPU speed code: one function per model module that has a fast path.

Each takes the module and its inputs and returns the module's result computed the fast way, or None when no fast
path applies to this call (another device, tracing or `torch.compile`, autocast, dropout, an unsupported dtype or
head size, a CPU or build without the kernel); the module then runs its own plain ops, as the reference does:

    if (fast := cpu.fast_vit_block(self, x)) is not None:
        return fast

The fast paths: our compiled attention and deformable-sampling kernels (`attention`, `sampling`) in training and
inference, oneDNN's fused GEMMs and convolutions at inference (`fused`), and the training MLP whose backward reuses
its buffers (`buffer_reusing_mlp`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import fused
from .attention import attention_kernel
from .buffer_reusing_mlp import buffer_reusing_mlp, buffer_reusing_mlp_applies
from .guards import onednn_usable, outside_tracing_on_cpu
from .sampling import deformable_kernel

if TYPE_CHECKING:
    from ..decoder import Decoder, FeedForward, GroupSelfAttention
    from ..deformable import MultiScaleDeformableAttention
    from ..layers import ConvBnAct
    from ..vit import ViTAttention, ViTBlock, ViTEmbeddings, ViTMlp

__all__ = [
    "fast_conv_bn_act",
    "fast_decoder_ffn",
    "fast_decoder_values",
    "fast_deformable_sampling",
    "fast_group_attention",
    "fast_patch_embedding",
    "fast_vit_attention",
    "fast_vit_block",
    "fast_vit_mlp",
]


def fast_vit_attention(attn: ViTAttention, qkv: torch.Tensor) -> torch.Tensor | None:
    """`ViTAttention.attend` on our attention kernel: qkv [batch, tokens, 3 * dim] -> [batch, tokens, dim]."""
    if (attn.training and attn.dropout != 0.0) or not outside_tracing_on_cpu(qkv):  # our kernel has no dropout
        return None
    needs_grad = torch.is_grad_enabled() and qkv.requires_grad
    kernel = attention_kernel(qkv.shape[2] // 3 // attn.num_heads, qkv.dtype, needs_grad=needs_grad)
    return None if kernel is None else kernel(qkv, attn.num_heads)


def fast_vit_mlp(mlp: ViTMlp, x: torch.Tensor) -> torch.Tensor | None:
    """`ViTMlp` in a training step (without dropout) through `buffer_reusing_mlp`: x [..., dim] -> [..., dim]."""
    if (mlp.training and mlp.dropout > 0) or not buffer_reusing_mlp_applies(x, mlp.fc1, mlp.act):
        return None
    return buffer_reusing_mlp(x.reshape(-1, x.shape[-1]), mlp.fc1, mlp.act, mlp.fc2).view(x.shape)


def fast_vit_block(block: ViTBlock, x: torch.Tensor) -> torch.Tensor | None:
    """`ViTBlock` at inference in oneDNN's fused GEMMs (`fused.vit_block`)."""
    # the fused path has no dropout: a training-mode model with dropout takes the plain one even without autograd
    if not onednn_usable(x, block.attn.qkv.weight) or (block.training and block.dropout > 0):
        return None
    return fused.vit_block(block, x)


def fast_patch_embedding(embeddings: ViTEmbeddings, pixel_values: torch.Tensor) -> torch.Tensor | None:
    """The bfloat16 patch embedding at inference as one GEMM (`fused.patch_embedding`)."""
    gemm = pixel_values.dtype == torch.bfloat16 and outside_tracing_on_cpu(pixel_values)
    if torch.is_grad_enabled() or not gemm:
        return None
    return fused.patch_embedding(embeddings, pixel_values)


def fast_group_attention(attn: GroupSelfAttention, q_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor | None:
    """`GroupSelfAttention._attend` on our attention kernel: [entries, n, dim] query/key and value inputs ->
    attention output before o_proj, [entries, n, dim]."""
    if (attn.training and attn.dropout != 0.0) or not outside_tracing_on_cpu(v_in):  # our kernel has no dropout
        return None
    kernel = attention_kernel(v_in.shape[2] // attn.heads, v_in.dtype, needs_grad=torch.is_grad_enabled())
    if kernel is None:
        return None
    # our kernel takes q, k, v side by side per token: q and k (same input) from one GEMM, then v
    qk_weight = torch.cat((attn.q_proj.weight, attn.k_proj.weight))
    qk_bias = None if attn.q_proj.bias is None else torch.cat((attn.q_proj.bias, attn.k_proj.bias))
    return kernel(torch.cat((F.linear(q_in, qk_weight, qk_bias), attn.v_proj(v_in)), -1), attn.heads)


def fast_decoder_ffn(ffn: FeedForward, x: torch.Tensor) -> torch.Tensor | None:
    """The decoder's residual FFN `x + fc2(act(fc1(x)))`: at inference (ReLU) in oneDNN's fused GEMMs, in a training
    step without dropout through `buffer_reusing_mlp`. x: [batch, queries, dim] -> [batch, queries, dim]."""
    rows = x.reshape(-1, x.shape[-1])
    if not ffn.training and isinstance(ffn.act, nn.ReLU) and onednn_usable(x, ffn.fc1.weight):
        return fused.decoder_ffn(ffn, rows).view(x.shape)
    if (not ffn.training or ffn.dropout == 0) and buffer_reusing_mlp_applies(rows, ffn.fc1, ffn.act):
        return x + buffer_reusing_mlp(rows, ffn.fc1, ffn.act, ffn.fc2).view(x.shape)
    return None


def fast_decoder_values(decoder: Decoder, memory: torch.Tensor) -> list[torch.Tensor] | None:
    """Every decoder layer's projected values at inference in one oneDNN GEMM (`fused.decoder_values`): memory
    [batch, tokens, dim] -> one [batch, dim, tokens] view per layer."""
    projections = [layer.cross_attn.value_proj for layer in decoder.layers]
    if not onednn_usable(memory, projections[0].weight):
        return None
    return fused.decoder_values(decoder, projections, memory)


def fast_deformable_sampling(
    attn: MultiScaleDeformableAttention,
    memory: torch.Tensor,
    memory_mask: torch.Tensor | None,
    spatial_shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
    value: torch.Tensor | None,
) -> torch.Tensor | None:
    """The deformable attention's value projection, masking and sampling (before `output_proj`) on our sampling
    kernel; arguments as in `MultiScaleDeformableAttention.forward` -> [batch, queries, dim]."""
    kernel = deformable_kernel(attn.dim // attn.heads, memory.dtype) if outside_tracing_on_cpu(memory) else None
    if kernel is None:
        return None
    # the kernel reads each head's features in place from token-major values
    tokens = attn.value_proj(memory) if value is None else value.transpose(1, 2)  # [batch, tokens, dim]
    if memory_mask is not None:
        tokens = tokens.masked_fill(~memory_mask[..., None], 0.0)
    return kernel(tokens.unflatten(-1, (attn.heads, -1)), spatial_shapes, locations, weights)


def fast_conv_bn_act(layer: ConvBnAct, x: torch.Tensor) -> torch.Tensor | None:
    """`ConvBnAct` at inference in one oneDNN convolution (`fused.conv_bn_act`)."""
    if layer.training or type(layer.activation) not in fused.ONEDNN_ACTIVATIONS:
        return None
    if not onednn_usable(x, layer.conv.weight):
        return None
    return fused.conv_bn_act(layer, x)
