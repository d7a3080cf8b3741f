"""Our own fast LW-DETR: a light-weight detection transformer (Chen et al., arXiv 2406.03459).

Checkpoints share the format of `transformers.LwDetrForObjectDetection` in both directions.

The public names load on first use (PEP 562): `import lwdetr` itself imports neither torch nor transformers, so
a command's `--help`, or a program that only needs `load_image`, does not pay seconds for the model's imports.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

# public name -> the module defining it
_EXPORTS = {
    "ModelLoadError": "checkpoint",
    "PRESETS": "config",
    "LwDetrConfig": "config",
    "LwDetrViTConfig": "config",
    "preset_config": "config",
    "Detection": "postprocess",
    "Detector": "detector",
    "draw_detections": "draw",
    "ImageLoadError": "images",
    "load_image": "images",
    "LwDetrForObjectDetection": "modeling",
    "LwDetrModel": "modeling",
    "LwDetrImageProcessor": "processing",
    "LwDetrViTBackbone": "vit",
}

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

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these on first use
    from .checkpoint import ModelLoadError
    from .config import PRESETS, LwDetrConfig, LwDetrViTConfig, preset_config
    from .detector import Detector
    from .draw import draw_detections
    from .images import ImageLoadError, load_image
    from .modeling import LwDetrForObjectDetection, LwDetrModel
    from .postprocess import Detection
    from .processing import LwDetrImageProcessor
    from .vit import LwDetrViTBackbone


def __getattr__(name: str) -> Any:
    """Import a public name's module on first access (and a submodule, as the eager imports once made
    `lwdetr.processing` reachable after `import lwdetr`)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
