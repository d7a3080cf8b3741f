"""An exponential moving average of the model's weights, as rf-detr's / LW-DETR's `ModelEma`.

After every optimizer step: `ema = d * ema + (1 - d) * weights`, with a decay that warms up,
`d = decay * (1 - exp(-updates / tau))`. Early on `d` is near 0, so the average follows the fast-changing
weights instead of remembering the random initialisation; after a few `tau` updates it settles at `decay`.
rf-detr's defaults (decay 0.993, tau 100) suit fine-tuning runs of a few thousand steps; LW-DETR's COCO recipe
used 0.9997 for runs 100 times longer.

The averaged copy is what gets evaluated and exported: it is usually a few AP points better than the raw
weights at the end of a short run.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ModelEma"]


class ModelEma:
    """Keeps `module`, an eval-mode copy of a model whose floating tensors (parameters and buffers) are averaged."""

    def __init__(self, model: nn.Module, decay: float = 0.993, tau: float = 100.0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model).eval()
        self.module.requires_grad_(False)
        self.decay = decay
        self.tau = tau
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if self.tau <= 0:
            return self.decay
        return self.decay * (1 - math.exp(-(self.updates + 1) / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average toward `model`'s current weights (same architecture, unwrapped from DDP)."""
        decay = self.current_decay()
        current = model.state_dict()
        for name, average in self.module.state_dict().items():
            value = current[name].detach()
            if average.is_floating_point():
                average.mul_(decay).add_(value.to(average.dtype), alpha=1 - decay)
            else:  # counters such as BatchNorm's num_batches_tracked are copied, not averaged
                average.copy_(value)
        self.updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors (the module's own state dict); `updates` is stored beside it by the caller."""
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = updates
