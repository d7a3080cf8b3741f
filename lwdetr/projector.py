"""The multi-scale projector: ViT feature maps -> one C2f-fused map per output scale (0.5x, 1x or 2x)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import LwDetrConfig
from .layers import ConvBnAct

__all__ = ["MultiScaleProjector"]


def _resampled_channels(channels: int, scale: float) -> int:
    """Channels of a ViT map after resampling to `scale` (up-sampling halves them, or quarters them past 512)."""
    if scale == 2.0:
        return channels // 4 if channels > 512 else channels // 2
    return channels


class Resample(nn.Module):
    """Brings one ViT feature map to the target scale: identity (1x), strided conv (0.5x), transposed conv (2x)."""

    def __init__(self, channels: int, scale: float, eps: float):
        super().__init__()
        layers: list[nn.Module] = []
        if scale == 2.0 and channels > 512:
            # wide maps are squeezed first so the transposed conv stays cheap
            layers.append(ConvBnAct(channels, channels // 2, 1, 1, "relu", eps))
            layers.append(nn.ConvTranspose2d(channels // 2, channels // 4, kernel_size=2, stride=2))
        elif scale == 2.0:
            layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
        elif scale == 0.5:
            layers.append(ConvBnAct(channels, channels, 3, 2, "relu", eps))
        elif scale != 1.0:
            raise ValueError(f"unsupported projector scale factor {scale}; use 0.5, 1.0 or 2.0")
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class Bottleneck(nn.Module):
    """Two 3x3 ConvBnAct layers (no shortcut, as in LW-DETR's C2f)."""

    def __init__(self, channels: int, activation: str, eps: float):
        super().__init__()
        self.conv1 = ConvBnAct(channels, channels, 3, 1, activation, eps)
        self.conv2 = ConvBnAct(channels, channels, 3, 1, activation, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x))


class C2f(nn.Module):
    """CSP block with two-way split: 1x1 conv, a chain of bottlenecks on one half, concat of every stage, 1x1 conv."""

    def __init__(self, config: LwDetrConfig, in_channels: int):
        super().__init__()
        act, eps = config.activation_function, config.batch_norm_eps
        self.hidden = int(config.d_model * config.hidden_expansion)
        self.conv1 = ConvBnAct(in_channels, 2 * self.hidden, 1, 1, act, eps)
        self.bottlenecks = nn.ModuleList(Bottleneck(self.hidden, act, eps) for _ in range(config.c2f_num_blocks))
        self.conv2 = ConvBnAct((2 + config.c2f_num_blocks) * self.hidden, config.d_model, 1, 1, act, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = list(self.conv1(x).split(self.hidden, dim=1))
        for bottleneck in self.bottlenecks:
            stages.append(bottleneck(stages[-1]))
        return self.conv2(torch.cat(stages, dim=1))


class ChannelsFirstLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of a [batch, channels, H, W] map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ScaleProjector(nn.Module):
    """Fuses all ViT maps at one scale: resample each, concatenate, C2f, LayerNorm -> [batch, d_model, h, w]."""

    def __init__(self, config: LwDetrConfig, scale: float):
        super().__init__()
        vit_dim = config.backbone_config.hidden_size
        num_maps = len(config.backbone_config.out_indices)
        self.sampling_layers = nn.ModuleList(Resample(vit_dim, scale, config.batch_norm_eps) for _ in range(num_maps))
        self.projector_layer = C2f(config, _resampled_channels(vit_dim, scale) * num_maps)
        self.layer_norm = ChannelsFirstLayerNorm(config.d_model, eps=1e-6)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> torch.Tensor:
        resampled = [layer(x) for layer, x in zip(self.sampling_layers, feature_maps)]
        return self.layer_norm(self.projector_layer(torch.cat(resampled, dim=1)))


class MultiScaleProjector(nn.Module):
    """One `ScaleProjector` per entry of `config.projector_scale_factors`."""

    def __init__(self, config: LwDetrConfig):
        super().__init__()
        self.scale_layers = nn.ModuleList(ScaleProjector(config, s) for s in config.projector_scale_factors)

    def forward(self, feature_maps: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        return [layer(feature_maps) for layer in self.scale_layers]
