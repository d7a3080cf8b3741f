"""Our own fast LW-DETR: a light-weight detection transformer (Chen et al., arXiv 2406.03459)."""

from .config import PRESETS, LwDetrConfig, LwDetrViTConfig, preset_config

__all__ = ["PRESETS", "LwDetrConfig", "LwDetrViTConfig", "preset_config"]
