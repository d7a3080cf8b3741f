"""Configuration classes and the size presets.

The config classes are transformers' own (`LwDetrConfig`, `LwDetrViTConfig`), so a `config.json` written by
either project reads in the other unchanged. The presets are plain data: the five published architectures
(tiny .. xlarge, as on the hub under `AnnaZhang/lwdetr_*`) and `nano`, a much smaller model for CPU tests
and quick demos.

Importing transformers takes seconds, so the two classes are looked up on first use (`LwDetrConfig`,
`preset_config`); `PRESETS` alone (the CLI's `--size` choices) imports nothing.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LwDetrConfig, LwDetrViTConfig

__all__ = ["LwDetrConfig", "LwDetrViTConfig", "PRESETS", "preset_config"]

_WINDOWS_10 = [0, 1, 3, 6, 7, 9]

# backbone: the ViT encoder; everything else: LwDetrConfig fields.
PRESETS: dict[str, dict[str, Any]] = {
    "nano": {
        "backbone": {
            "hidden_size": 96,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "mlp_ratio": 2,
            "window_block_indices": [0, 2],
            "out_indices": [2, 4],
            "pretrain_image_size": 256,
            "num_windows": 4,
            "image_size": 256,
        },
        "projector_scale_factors": [1.0],
        "d_model": 96,
        "c2f_num_blocks": 1,
        "num_queries": 50,
        "group_detr": 4,
        "decoder_self_attention_heads": 4,
        "decoder_cross_attention_heads": 4,
        "decoder_n_points": 2,
        "decoder_ffn_dim": 256,
    },
    "tiny": {
        "backbone": {
            "hidden_size": 192,
            "num_hidden_layers": 6,
            "num_attention_heads": 12,
            "window_block_indices": [0, 2, 4],
            "out_indices": [2, 4, 6],
        },
        "projector_scale_factors": [1.0],
        "d_model": 256,
        "num_queries": 100,
        "decoder_self_attention_heads": 8,
        "decoder_cross_attention_heads": 16,
        "decoder_n_points": 2,
    },
    "small": {
        "backbone": {
            "hidden_size": 192,
            "num_hidden_layers": 10,
            "num_attention_heads": 12,
            "window_block_indices": _WINDOWS_10,
            "out_indices": [3, 5, 6, 10],
        },
        "projector_scale_factors": [1.0],
        "d_model": 256,
        "num_queries": 300,
        "decoder_self_attention_heads": 8,
        "decoder_cross_attention_heads": 16,
        "decoder_n_points": 2,
    },
    "medium": {
        "backbone": {
            "hidden_size": 384,
            "num_hidden_layers": 10,
            "num_attention_heads": 12,
            "window_block_indices": _WINDOWS_10,
            "out_indices": [3, 5, 6, 10],
        },
        "projector_scale_factors": [1.0],
        "d_model": 256,
        "num_queries": 300,
        "decoder_self_attention_heads": 8,
        "decoder_cross_attention_heads": 16,
        "decoder_n_points": 2,
    },
    "large": {
        "backbone": {
            "hidden_size": 384,
            "num_hidden_layers": 10,
            "num_attention_heads": 12,
            "window_block_indices": _WINDOWS_10,
            "out_indices": [3, 5, 6, 10],
        },
        "projector_scale_factors": [2.0, 0.5],
        "d_model": 384,
        "num_queries": 300,
        "decoder_self_attention_heads": 12,
        "decoder_cross_attention_heads": 24,
        "decoder_n_points": 4,
    },
    "xlarge": {
        "backbone": {
            "hidden_size": 768,
            "num_hidden_layers": 10,
            "num_attention_heads": 12,
            "window_block_indices": _WINDOWS_10,
            "out_indices": [3, 5, 6, 10],
        },
        "projector_scale_factors": [2.0, 0.5],
        "d_model": 384,
        "num_queries": 300,
        "decoder_self_attention_heads": 12,
        "decoder_cross_attention_heads": 24,
        "decoder_n_points": 4,
    },
}


def preset_config(name: str, **overrides: Any) -> LwDetrConfig:
    """Build the `LwDetrConfig` of a named preset.

    `overrides` replace top-level fields (e.g. `num_labels=3`, `id2label={...}`, `group_detr=1`); a
    `backbone` dict override is merged into the ViT fields.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    fields = copy.deepcopy(PRESETS[name])
    backbone = {"image_size": 1024, **fields.pop("backbone"), **overrides.pop("backbone", {})}
    backbone["model_type"] = "lw_detr_vit"
    fields.update(overrides)
    from transformers import LwDetrConfig

    return LwDetrConfig(backbone_config=backbone, **fields)


def __getattr__(name: str) -> Any:
    """`LwDetrConfig` and `LwDetrViTConfig`: transformers' classes, imported on first access."""
    if name in ("LwDetrConfig", "LwDetrViTConfig"):
        import transformers

        return getattr(transformers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
