"""LW-DETR's optimizer: AdamW parameter groups with layer-wise decay in the ViT, and the learning-rate schedule.

Parameter groups (as LW-DETR's `get_param_dict` and its ViT's `get_vit_lr_decay_rate` / `get_vit_weight_decay_rate`):

- ViT parameters learn at `lr_encoder * layer_decay ** (num_layers - i) * component_decay ** 2` for block `i`
  (0-based), so the top block gets one factor of `layer_decay` and each block below one more; the patch and
  position embeddings sit below block 0 (`layer_decay ** (num_layers + 1)`). A pretrained ViT thus changes least
  at the bottom, where its features are most generic.
- Decoder parameters learn at `lr * component_decay`; everything else (projector, query selection, heads) at `lr`.
- No weight decay on biases, norms, layer-scale gammas, the q/v biases (all the 1-d tensors), nor on the position
  embedding and `nn.Embedding` tables (learned queries and reference points): decaying them only pulls them to 0.

Defaults are LW-DETR's published recipe: lr 1e-4, lr_encoder 1.5e-4, layer decay 0.8, component decay 0.7,
weight decay 1e-4 (rf-detr uses the same numbers).

The schedule is a pure function of the optimizer step (`lr_factor`): linear warmup from 0, then cosine decay to
`min_ratio` (or a ×0.1 step at `drop_step`, or constant). `set_lr` applies it to every group's base rate, so the
optimizer holds no scheduler state beyond the step number, which the checkpoint stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["OptimizerSettings", "build_optimizer", "lr_factor", "param_groups", "set_lr"]

Schedule = Literal["cosine", "step", "constant"]
_VIT_PREFIX = "model.backbone.backbone."
_DECODER_PREFIX = "model.decoder."


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float = 1e-4
    lr_encoder: float = 1.5e-4
    weight_decay: float = 1e-4
    layer_decay: float = 0.8
    component_decay: float = 0.7
    betas: tuple[float, float] = (0.9, 0.999)


def _vit_depth(name: str, num_layers: int) -> int:
    """LW-DETR's layer id: 0 for the embeddings, i + 1 for block i, num_layers + 1 for anything after the blocks."""
    rest = name[len(_VIT_PREFIX) :]
    if rest.startswith("embeddings."):
        return 0
    if rest.startswith("encoder.layer."):
        return int(rest.split(".")[2]) + 1
    return num_layers + 1


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take no weight decay (see the module docstring)."""
    embedding_weights = {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    }
    return {
        name
        for name, param in model.named_parameters()
        if param.ndim <= 1 or name in embedding_weights or "position_embeddings" in name
    }


def param_groups(model: nn.Module, settings: OptimizerSettings) -> list[dict]:
    """AdamW groups for the trainable parameters of an `LwDetrForObjectDetection`.

    Parameters with the same (lr, weight decay) share a group; each group records its `base_lr`, which `set_lr`
    scales, and a readable `name`.
    """
    num_layers = len(model.model.backbone.backbone.encoder.layer)
    no_decay = _no_decay_names(model)
    groups: dict[tuple[float, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(_VIT_PREFIX):
            depth = _vit_depth(name, num_layers)
            lr = settings.lr_encoder * settings.layer_decay ** (num_layers + 1 - depth) * settings.component_decay**2
            part = f"vit.{depth}"
        elif name.startswith(_DECODER_PREFIX):
            lr, part = settings.lr * settings.component_decay, "decoder"
        else:
            lr, part = settings.lr, "other"
        decay = 0.0 if name in no_decay else settings.weight_decay
        group = groups.setdefault(
            (lr, decay), {"params": [], "lr": lr, "base_lr": lr, "weight_decay": decay, "name": f"{part}/wd{decay:g}"}
        )
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, settings)`."""
    groups = param_groups(model, settings)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)


def lr_factor(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: Schedule = "cosine",
    min_ratio: float = 0.05,
    drop_step: int | None = None,
) -> float:
    """The multiplier of every base learning rate at optimizer step `step` (0-based).

    Linear warmup over `warmup_steps` (from 1/warmup_steps up to 1), then:
    `cosine` from 1 down to `min_ratio` at `total_steps`; `step` 1 until `drop_step`, 0.1 after (LW-DETR's StepLR);
    `constant` 1.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 if drop_step is not None and step >= drop_step else 1.0
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}; choose cosine, step or constant")
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's learning rate to its `base_lr` times `factor`."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
