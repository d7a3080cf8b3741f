"""The ViT encoder of LW-DETR: interleaved window / global attention in the window-major layout.

Tokens live as `[batch * windows, tokens_per_window, dim]` from the patch embedding to the last layer. A window
layer attends inside each row of that tensor; a global layer views the same memory as
`[batch, windows * tokens_per_window, dim]` (a free reshape), so no layer ever permutes tokens. Global attention
has no positional bias, so the unusual token order does not change its result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import PretrainedMixin
from .config import LwDetrViTConfig
from .cpu_kernels import attention_kernel, gelu_in_gemm
from .feedforward import buffer_reusing_mlp, buffer_reusing_mlp_applies
from .layers import (
    activation_layer,
    derived_weights,
    onednn_usable,
    outside_tracing_on_cpu,
    pack_linear_weight,
    weights_generation,
)
from .outputs import ModelOutput, finish_output, forward_options

__all__ = ["LwDetrViTBackbone", "ViTOutput"]


class ViTAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; the key has no bias (as in CAE/BEiT).

    `dropout` applies to the attention weights in training, as the reference's `dropout_prob` does."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, dropout: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def qkv_bias(self) -> torch.Tensor | None:
        """The fused projection's bias [3 * dim]: q_bias, zeros for the key, v_bias."""
        if self.q_bias is None:
            return None
        return torch.cat((self.q_bias, torch.zeros_like(self.q_bias), self.v_bias))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: [batch, tokens, 3 * dim] -> attention output before the projection, [batch, tokens, dim]."""
        batch, tokens, dim = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        head_dim = dim // self.num_heads
        needs_grad = torch.is_grad_enabled() and qkv.requires_grad
        dropout = self.dropout if self.training else 0.0
        usable = dropout == 0.0 and outside_tracing_on_cpu(qkv)  # our kernel has no dropout
        if usable and (kernel := attention_kernel(head_dim, qkv.dtype, needs_grad=needs_grad)):
            return kernel(qkv, self.num_heads)
        q, k, v = qkv.view(batch, tokens, 3, self.num_heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        return out.transpose(1, 2).reshape(batch, tokens, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, tokens, dim] -> [batch, tokens, dim]."""
        return self.proj(self.attend(F.linear(x, self.qkv.weight, self.qkv_bias())))


class ViTMlp(nn.Module):
    """fc1 -> activation -> fc2, with dropout after the activation and after fc2 in training (as the reference)."""

    def __init__(self, dim: int, hidden: int, activation: str, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = activation_layer(activation)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout > 0:
            hidden = F.dropout(self.act(self.fc1(x)), self.dropout, training=True)
            return F.dropout(self.fc2(hidden), self.dropout, training=True)
        if buffer_reusing_mlp_applies(x, self.fc1, self.act):
            return buffer_reusing_mlp(x.reshape(-1, x.shape[-1]), self.fc1, self.act, self.fc2).view(x.shape)
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block with layer scale (`gamma_1`, `gamma_2`)."""

    def __init__(self, config: LwDetrViTConfig, windowed: bool):
        super().__init__()
        dim = config.hidden_size
        self.windowed = windowed
        self.num_windows = config.num_windows
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = ViTAttention(dim, config.num_attention_heads, config.qkv_bias, config.dropout_prob)
        self.gamma_1 = nn.Parameter(torch.full((dim,), config.cae_init_values))
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = ViTMlp(dim, int(dim * config.mlp_ratio), config.hidden_act, config.dropout_prob)
        self.dropout = config.dropout_prob
        self.gamma_2 = nn.Parameter(torch.full((dim,), config.cae_init_values))

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """norm1(x), with all windows of an image joined into one sequence in a global layer."""
        attn_in = self.norm1(x)
        if not self.windowed:
            attn_in = attn_in.reshape(x.shape[0] // self.num_windows, self.num_windows * x.shape[1], x.shape[2])
        return attn_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch * windows, tokens_per_window, dim] in window-major order."""
        # the fused path has no dropout: a training-mode model with dropout takes the plain one even without autograd
        if onednn_usable(x, self.attn.qkv.weight) and not (self.training and self.dropout > 0):
            return self.fused_forward(x)
        x = x + self.attn(self.attention_input(x)).reshape(x.shape) * self.gamma_1
        return x + self.mlp(self.norm2(x)) * self.gamma_2

    def fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same block in four oneDNN GEMMs that also add the bias, apply GELU or add the residual.

        The layer scale is folded into the output projections (`gamma * (W h + b) = (gamma W) h + gamma b`), so the
        residual sum happens inside the GEMM: no separate pass over the activations for the bias, GELU, scale or sum.
        The weights come prepacked in oneDNN's blocked layout (`packed_weights`), which spares each GEMM a reorder.
        """
        linear = torch.ops.mkldnn._linear_pointwise
        w = self.packed_weights(rows=x.shape[0] * x.shape[1])
        qkv = linear(self.attention_input(x), w["qkv"], w["qkv_bias"], "none", [], "")
        attended = self.attn.attend(qkv).reshape(x.shape)
        x = linear.binary(attended, x, w["proj"], w["proj_bias"], "add")
        hidden = self.norm2(x)
        mlp = self.mlp
        exact_gelu = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
        if exact_gelu and gelu_in_gemm():
            hidden = linear(hidden, w["fc1"], w["fc1_bias"], "gelu", [], "none")
        elif exact_gelu:
            hidden = torch.ops.aten.gelu_(linear(hidden, w["fc1"], w["fc1_bias"], "none", [], ""))
        else:
            hidden = mlp.act(linear(hidden, w["fc1"], w["fc1_bias"], "none", [], ""))
        return linear.binary(hidden, x, w["fc2"], w["fc2_bias"], "add")

    def packed_weights(self, rows: int) -> dict[str, torch.Tensor | None]:
        """The block's GEMM weights for `fused_forward`: layer scales folded in, packed for oneDNN (no autograd),
        rebuilt when any source parameter changes (see `derived_weights`)."""
        attn, mlp = self.attn, self.mlp
        sources = (attn.qkv.weight, attn.q_bias, attn.v_bias, attn.proj.weight, attn.proj.bias, self.gamma_1)
        sources += (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, self.gamma_2)

        def pack() -> dict[str, torch.Tensor | None]:
            return {
                "qkv": pack_linear_weight(attn.qkv.weight, rows),
                "qkv_bias": attn.qkv_bias(),
                "proj": pack_linear_weight(attn.proj.weight * self.gamma_1[:, None], rows),
                "proj_bias": attn.proj.bias * self.gamma_1,
                "fc1": pack_linear_weight(mlp.fc1.weight, rows),
                "fc1_bias": mlp.fc1.bias,
                "fc2": pack_linear_weight(mlp.fc2.weight * self.gamma_2[:, None], rows),
                "fc2_bias": mlp.fc2.bias * self.gamma_2,
            }

        return derived_weights(self, sources, pack)


class ViTEmbeddings(nn.Module):
    """Patch embedding plus an absolute position embedding learned on the pretraining grid."""

    def __init__(self, config: LwDetrViTConfig):
        super().__init__()
        pretrain = config.pretrain_image_size
        pretrain = pretrain[0] if isinstance(pretrain, list | tuple) else pretrain
        patch = config.patch_size
        patch = patch[0] if isinstance(patch, list | tuple) else patch
        self.patch_size = patch
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=patch, stride=patch)
        self.position_embeddings = None
        self._grid_cache: tuple[tuple, torch.Tensor] | None = None  # (key, grid), see `position_grid`
        if config.use_absolute_position_embeddings:
            # one extra slot: the pretraining cls token, unused here but part of the checkpoint format
            grid = pretrain // patch
            self.position_embeddings = nn.Parameter(torch.zeros(1, grid * grid + 1, config.hidden_size))

    def position_grid(self, height: int, width: int) -> torch.Tensor:
        """The position embedding resized (bicubic) to a `height x width` token grid: [1, height, width, dim].

        Without autograd (inference) the resized grid is cached per size; the key includes the parameter's storage
        version counter and the optimizer steps taken, so loading, editing or training the weights recomputes it.
        """
        table = self.position_embeddings
        if torch.is_grad_enabled() or torch.jit.is_tracing():
            return self._resize_position_grid(height, width)
        key = (height, width, weights_generation(), table.data_ptr(), table._version, table.dtype, table.device)
        if self._grid_cache is None or self._grid_cache[0] != key:
            self._grid_cache = (key, self._resize_position_grid(height, width))
        return self._grid_cache[1]

    def _resize_position_grid(self, height: int, width: int) -> torch.Tensor:
        table = self.position_embeddings[:, 1:]
        side = math.isqrt(table.shape[1])
        grid = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        if (side, side) != (height, width) or torch.jit.is_tracing():
            grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The patch embedding: [batch, 3, H, W] -> [batch, H/patch, W/patch, dim].

        In bf16 at inference it runs as one GEMM over the image cut into patches (a reshape and a copy, as the
        patches do not overlap): oneDNN's bf16 convolution handles 3 input channels at half the GEMM's speed (in fp32
        the two are even).
        """
        gemm = pixel_values.dtype == torch.bfloat16 and outside_tracing_on_cpu(pixel_values)
        if torch.is_grad_enabled() or not gemm:
            return self.projection(pixel_values).permute(0, 2, 3, 1)
        batch, channels, height, width = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        weight = self.projection.weight.reshape(self.projection.out_channels, -1)
        return F.linear(patches.reshape(batch, height // p, width // p, -1), weight, self.projection.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [batch, 3, H, W] -> tokens [batch, H/patch, W/patch, dim]."""
        tokens = self.patchify(pixel_values)
        if self.position_embeddings is not None:
            tokens = tokens + self.position_grid(tokens.shape[1], tokens.shape[2])
        return tokens


class ViTEncoder(nn.Module):
    def __init__(self, config: LwDetrViTConfig):
        super().__init__()
        windowed = set(config.window_block_indices)
        self.layer = nn.ModuleList(ViTBlock(config, i in windowed) for i in range(config.num_hidden_layers))


@dataclass
class ViTOutput(ModelOutput):
    """What the backbone returns, as the reference's `BackboneOutput`: `feature_maps`, a tuple of
    [batch, dim, H/patch, W/patch] tensors; with `output_hidden_states`, `hidden_states`: the patch embedding and
    every block's output in the window-major layout, num_hidden_layers + 1 tensors [batch * windows, tokens, dim]."""

    feature_maps: tuple[torch.Tensor, ...] | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class LwDetrViTBackbone(PretrainedMixin, nn.Module):
    """ViT encoder returning the feature maps after the blocks named by `config.out_indices`.

    Stage 0 is the patch embedding and stage i the output of block i, as in transformers' backbones.
    """

    main_input_name = "pixel_values"

    def __init__(self, config: LwDetrViTConfig):
        super().__init__()
        self.config = config
        self.windows_per_side = math.isqrt(config.num_windows)
        if self.windows_per_side**2 != config.num_windows:
            raise ValueError(f"num_windows must be a perfect square, got {config.num_windows}")
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.out_indices = list(config.out_indices)

    @property
    def size_divisor(self) -> int:
        """Input height and width must be multiples of this (patch size times windows per side)."""
        return self.embeddings.patch_size * self.windows_per_side

    def check_input(self, pixel_values: torch.Tensor) -> None:
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be [batch, channels, height, width], got shape {tuple(pixel_values.shape)}"
            )
        batch, channels, height, width = pixel_values.shape
        if batch == 0:
            raise ValueError("pixel_values is an empty batch")
        if channels != self.embeddings.num_channels:
            raise ValueError(f"pixel_values has {channels} channels; the model expects {self.embeddings.num_channels}")
        step = self.size_divisor
        if height < step or width < step or height % step or width % step:
            raise ValueError(
                f"image size {height}x{width} does not fit the window grid: height and width must be positive "
                f"multiples of {step} (patch size {self.embeddings.patch_size} x {self.windows_per_side} windows "
                "per side)"
            )

    def to_windows(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, H, W, dim] -> [batch * windows, (H/s) * (W/s), dim], windows in row-major order."""
        batch, height, width, dim = tokens.shape
        s = self.windows_per_side
        tokens = tokens.reshape(batch, s, height // s, s, width // s, dim).permute(0, 1, 3, 2, 4, 5)
        return tokens.reshape(batch * s * s, (height // s) * (width // s), dim)

    def from_windows(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of `to_windows`, to a [batch, dim, H, W] map.

        The map stays in channels-last memory, the layout the token rows already have and the one in which the
        projector's convolutions run fastest, forward and backward (the 1x1 ones become plain matrix products; a
        training step of tiny at 640 is ~4 % faster than with a channels-first copy). They round differently from
        the reference's channels-first kernels, at the float32 rounding level.
        """
        s = self.windows_per_side
        dim = tokens.shape[-1]
        tokens = tokens.reshape(-1, s, s, height // s, width // s, dim).permute(0, 1, 3, 2, 4, 5)
        return tokens.reshape(-1, height, width, dim).permute(0, 3, 1, 2)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ViTOutput | tuple:
        """pixel_values: [batch, 3, H, W]. The options are transformers' (see `outputs.forward_options`)."""
        hidden_wanted, as_dict = forward_options(
            type(self).__name__, self.config, output_hidden_states, output_attentions, return_dict, kwargs
        )
        self.check_input(pixel_values)
        tokens = self.embeddings(pixel_values)
        height, width = tokens.shape[1:3]
        hidden = self.to_windows(tokens)
        wanted = set(self.out_indices)
        stages = {0: hidden} if 0 in wanted or hidden_wanted else {}
        for index, block in enumerate(self.encoder.layer, start=1):
            hidden = block(hidden)
            if index in wanted or hidden_wanted:
                stages[index] = hidden
        output = ViTOutput(
            feature_maps=tuple(self.from_windows(stages[i], height, width) for i in self.out_indices),
            hidden_states=tuple(stages[i] for i in range(len(self.encoder.layer) + 1)) if hidden_wanted else None,
        )
        return finish_output(output, as_dict)
