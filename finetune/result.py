"""What a fine-tuning run produced: `TrainResult`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TrainResult", "eval_metrics"]


@dataclass
class TrainResult:
    """What a run produced. `stopped` is True when a `stop_event` ended it before its planned steps."""

    output_dir: Path
    best_dir: Path | None = None
    last_dir: Path | None = None
    best_ap: float | None = None
    best_epoch: int | None = None
    epochs_completed: int = 0
    step: int = 0
    total_steps: int = 0
    stopped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl rows
    report: str = ""  # the data validation report


def eval_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The evaluation metrics of a history row (AP..., AR..., AP/<class>)."""
    return {k: v for k, v in row.items() if k.startswith(("AP", "AR"))}
