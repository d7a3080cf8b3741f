"""Our own fast LW-DETR: a light-weight detection transformer (Chen et al., arXiv 2406.03459).

Checkpoints share the format of `transformers.LwDetrForObjectDetection` in both directions.
"""

from .checkpoint import ModelLoadError
from .config import PRESETS, LwDetrConfig, LwDetrViTConfig, preset_config
from .detector import Detection, Detector
from .draw import draw_detections
from .images import ImageLoadError, load_image
from .modeling import LwDetrForObjectDetection, LwDetrModel
from .processing import LwDetrImageProcessor
from .vit import LwDetrViTBackbone

__all__ = [
    "PRESETS",
    "Detection",
    "Detector",
    "ImageLoadError",
    "LwDetrConfig",
    "LwDetrForObjectDetection",
    "LwDetrImageProcessor",
    "LwDetrModel",
    "LwDetrViTBackbone",
    "LwDetrViTConfig",
    "ModelLoadError",
    "draw_detections",
    "load_image",
    "preset_config",
]
