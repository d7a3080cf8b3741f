"""The training losses a run logs: read from the device without stalling it, summed per epoch, averaged over the
processes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from lwdetr import host_sync

if TYPE_CHECKING:
    from finetune.train import Run

__all__ = ["DEVICE_READ_EVERY", "LOGGED_LOSSES", "LossLog", "epoch_losses"]

LOGGED_LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
# On a GPU the logged losses are read (one wait for the device) every this many steps; on the CPU every step.
DEVICE_READ_EVERY = 20


class LossLog:
    """The logged losses of the steps not yet read, summed where they were computed.

    Reading them (`tolist`) is free on the CPU, so there every step is read and reported. On a GPU it would wait
    for the device after every step, so they are read every `DEVICE_READ_EVERY` steps and at the end of the epoch
    (and before a stop), and a step event in between reports the learning rate only. `read` adds the steps to the
    epoch's sums in `progress` and raises `FloatingPointError` on a non-finite loss.
    """

    def __init__(self, run: Run):
        self.run = run
        self.sums: torch.Tensor | None = None  # float64 [len(LOGGED_LOSSES)]
        self.steps = 0

    def add(self, losses: torch.Tensor) -> None:
        self.sums = losses if self.sums is None else self.sums + losses
        self.steps += 1

    def read_if_due(self) -> dict[str, float]:
        """The mean losses of the steps since the last read when it is time to read them, else {}."""
        if self.sums is None:
            return {}
        progress, plan = self.run.progress, self.run.plan
        due = (
            host_sync.reads_are_free(self.sums)
            or progress.step % DEVICE_READ_EVERY == 0
            or progress.step >= plan.total_steps
            or progress.batch_in_epoch >= plan.batches_per_epoch
        )
        return self.read() if due else {}

    def read(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums, steps = self.sums.tolist(), self.steps
        self.sums, self.steps = None, 0
        progress = self.run.progress
        if not math.isfinite(sums[0]):
            raise FloatingPointError(f"the loss became {sums[0]} by step {progress.step}; try a lower --lr")
        progress.loss_steps += steps
        for name, value in zip(LOGGED_LOSSES, sums):
            progress.loss_sums[name] = progress.loss_sums.get(name, 0.0) + value
        return {name: value / steps for name, value in zip(LOGGED_LOSSES, sums)}


def epoch_losses(run: Run) -> dict[str, float]:
    """Mean per-step training losses of the epoch, averaged over the processes."""
    progress = run.progress
    values = torch.tensor(
        [progress.loss_sums.get(k, 0.0) for k in LOGGED_LOSSES] + [float(progress.loss_steps)],
        device=run.accelerator.device,
    )
    if run.accelerator.num_processes > 1:
        values = run.accelerator.reduce(values, reduction="sum")
    steps = max(values[-1].item(), 1.0)
    return {name: round(values[i].item() / steps, 5) for i, name in enumerate(LOGGED_LOSSES)}
