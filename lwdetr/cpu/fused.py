"""CPU inference forwards that replace a module's plain ops (`dispatch` decides when): oneDNN GEMMs and convolutions
that also add the bias, apply the activation or add the residual, on weights folded and packed once
(`packing.derived_weights`); and the bfloat16 patch embedding as one GEMM. Each computes what the module's own
forward does, up to float rounding (`tests/test_perf_paths.py`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .features import cpu_flags, onednn_capped_below_avx512
from .packing import derived_weights, pack_conv_weight, pack_linear_weight

if TYPE_CHECKING:
    from ..decoder import Decoder, FeedForward
    from ..layers import ConvBnAct
    from ..vit import ViTBlock, ViTEmbeddings

__all__ = ["ONEDNN_ACTIVATIONS", "conv_bn_act", "decoder_ffn", "decoder_values", "patch_embedding", "vit_block"]

# oneDNN's names for the activations it can apply inside a convolution
ONEDNN_ACTIVATIONS: dict[type[nn.Module], str] = {nn.SiLU: "swish", nn.ReLU: "relu", nn.Identity: "none"}


def vit_block(block: ViTBlock, x: torch.Tensor) -> torch.Tensor:
    """A ViT block in four oneDNN GEMMs that also add the bias, apply GELU or add the residual.

    x: [batch * windows, tokens_per_window, dim] -> the same shape. The layer scale is folded into the output
    projections (`gamma * (W h + b) = (gamma W) h + gamma b`), so the residual sum happens inside the GEMM: no
    separate pass over the activations for the bias, GELU, scale or sum. The weights come prepacked in oneDNN's
    blocked layout (`_vit_block_weights`), which spares each GEMM a reorder.
    """
    linear = torch.ops.mkldnn._linear_pointwise
    w = _vit_block_weights(block, rows=x.shape[0] * x.shape[1])
    qkv = linear(block.attention_input(x), w["qkv"], w["qkv_bias"], "none", [], "")
    attended = block.attn.attend(qkv).reshape(x.shape)
    x = linear.binary(attended, x, w["proj"], w["proj_bias"], "add")
    hidden = block.norm2(x)
    mlp = block.mlp
    exact_gelu = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
    if exact_gelu and gelu_in_gemm():
        hidden = linear(hidden, w["fc1"], w["fc1_bias"], "gelu", [], "none")
    elif exact_gelu:
        hidden = torch.ops.aten.gelu_(linear(hidden, w["fc1"], w["fc1_bias"], "none", [], ""))
    else:
        hidden = mlp.act(linear(hidden, w["fc1"], w["fc1_bias"], "none", [], ""))
    return linear.binary(hidden, x, w["fc2"], w["fc2_bias"], "add")


def gelu_in_gemm() -> bool:
    """Whether oneDNN should apply the ViT's exact GELU inside its fc1 GEMM (else a separate PyTorch GELU follows).

    With AVX-512 the fused GELU costs a few % of the GEMM; held to AVX2, oneDNN's erf post-op costs more than the
    GEMM's output pass plus PyTorch's own vectorised GELU (1600 x 768 tokens: +1.2 ms fused, +0.7 ms apart).
    """
    return "avx512f" in cpu_flags() and not onednn_capped_below_avx512()


def _vit_block_weights(block: ViTBlock, rows: int) -> dict[str, torch.Tensor | None]:
    """The block's GEMM weights for `vit_block`: layer scales folded in, packed for oneDNN (no autograd), rebuilt
    when any source parameter changes (see `derived_weights`)."""
    attn, mlp = block.attn, block.mlp
    sources = (attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj.weight, attn.proj.bias, block.gamma_1)
    sources += (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, block.gamma_2)

    def pack() -> dict[str, torch.Tensor | None]:
        return {
            "qkv": pack_linear_weight(attn.qkv.weight, rows),
            "qkv_bias": attn.qkv_bias(),
            "proj": pack_linear_weight(attn.proj.weight * block.gamma_1[:, None], rows),
            "proj_bias": attn.proj.bias * block.gamma_1,
            "fc1": pack_linear_weight(mlp.fc1.weight, rows),
            "fc1_bias": mlp.fc1.bias,
            "fc2": pack_linear_weight(mlp.fc2.weight * block.gamma_2[:, None], rows),
            "fc2_bias": mlp.fc2.bias * block.gamma_2,
        }

    return derived_weights(block, sources, pack)


def patch_embedding(embeddings: ViTEmbeddings, pixel_values: torch.Tensor) -> torch.Tensor:
    """The patch embedding as one GEMM over the image cut into patches (a reshape and a copy, as the patches do not
    overlap): [batch, 3, H, W] -> [batch, H/patch, W/patch, dim]. In bf16, oneDNN's convolution handles 3 input
    channels at half the GEMM's speed (in fp32 the two are even)."""
    projection = embeddings.projection
    batch, channels, height, width = pixel_values.shape
    p = embeddings.patch_size
    patches = pixel_values.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
    weight = projection.weight.reshape(projection.out_channels, -1)
    return F.linear(patches.reshape(batch, height // p, width // p, -1), weight, projection.bias)


def decoder_ffn(ffn: FeedForward, rows: torch.Tensor) -> torch.Tensor:
    """The decoder's residual FFN (ReLU) in two oneDNN GEMMs with packed weights: the first applies ReLU, the second
    adds the residual. rows: [n, dim] -> [n, dim]."""
    linear = torch.ops.mkldnn._linear_pointwise
    fc1, fc2 = ffn.fc1, ffn.fc2

    def pack() -> tuple[torch.Tensor, torch.Tensor]:
        return pack_linear_weight(fc1.weight, rows.shape[0]), pack_linear_weight(fc2.weight, rows.shape[0])

    w1, w2 = derived_weights(ffn, (fc1.weight, fc2.weight), pack)
    return linear.binary(linear(rows, w1, fc1.bias, "relu", [], ""), rows, w2, fc2.bias, "add")


def decoder_values(decoder: Decoder, projections: list[nn.Linear], memory: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's deformable-attention values in one GEMM, the layers' `value_proj` weights side by side
    (packed once): memory [batch, tokens, dim] -> one [batch, dim, tokens] view per layer."""
    sources = tuple(t for proj in projections for t in (proj.weight, proj.bias))

    def pack() -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.cat([proj.weight for proj in projections])
        return pack_linear_weight(weight, memory.shape[1]), torch.cat([proj.bias for proj in projections])

    weight, bias = derived_weights(decoder, sources, pack)
    values = torch.ops.mkldnn._linear_pointwise(memory, weight, bias, "none", [], "")  # [batch, tokens, L * dim]
    return [chunk.transpose(1, 2) for chunk in values.chunk(len(projections), dim=-1)]


def conv_bn_act(layer: ConvBnAct, x: torch.Tensor) -> torch.Tensor:
    """Conv -> BatchNorm -> activation in one oneDNN convolution: BatchNorm folded into the weights and bias
    (`gamma (W x - mean) / sqrt(var + eps) + beta`), the activation applied as the convolution writes its output,
    weights packed. x: [batch, in_ch, H, W] -> [batch, out_ch, H', W']."""
    conv, norm = layer.conv, layer.norm
    geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def fold() -> tuple[torch.Tensor, torch.Tensor]:
        factor = (norm.running_var.float() + norm.eps).rsqrt() * norm.weight.float()
        weight = (conv.weight.float() * factor[:, None, None, None]).to(conv.weight.dtype)
        bias = (norm.bias.float() - norm.running_mean.float() * factor).to(conv.weight.dtype)
        return pack_conv_weight(weight, geometry, list(x.shape)), bias

    sources = (conv.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var)
    weight, bias = derived_weights(layer, sources, fold, tuple(x.shape))
    activation = ONEDNN_ACTIVATIONS[type(layer.activation)]
    return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, *geometry, activation, [], "")
