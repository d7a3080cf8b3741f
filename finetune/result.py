"""What a fine-tuning run produced (`TrainResult`), kept in the run folder as result.json, and which weights a run
offers (`offered_model_dir`: best/, else last/).

`train` returns its `TrainResult`; its main process also writes it to `RUN/result.json` when a session ends (done or
stopped, before the last event), so a program that runs training as a child process (the app) reads the same
result with `read_result`. A session that is killed leaves none: the file is removed when a session starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lwdetr.atomic import atomic_write_text

__all__ = ["RESULT_FILE", "TrainResult", "eval_metrics", "offered_model_dir", "read_result", "write_result"]

RESULT_FILE = "result.json"
# The folders of a result, stored by name: a run folder may be moved or copied.
_FOLDERS = ("best_dir", "last_dir", "model_dir")


@dataclass
class TrainResult:
    """What a run produced. `stopped` is True when a `stop_event` ended it before its planned steps. `model_dir` is
    the weights the run offers (`offered_model_dir`), `model_metrics` their evaluation."""

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
    model_dir: Path | None = None  # best/, else last/

    @property
    def model_metrics(self) -> dict[str, float]:
        """The evaluation metrics of `model_dir`'s weights: the best epoch's, else (no best/) the last evaluation."""
        row = next((r for r in self.history if r.get("epoch") == self.best_epoch), None)
        return eval_metrics(row) if row is not None and self.best_epoch is not None else dict(self.metrics)


def eval_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The evaluation metrics of a history row (AP..., AR..., AP/<class>)."""
    return {k: v for k, v in row.items() if k.startswith(("AP", "AR"))}


def offered_model_dir(run_dir: str | os.PathLike) -> Path | None:
    """The weights a run offers to use or download: best/ (the highest validation AP), else last/ (a run stopped
    before its first evaluation, or whose validation split has no box); None while neither holds a model.

    The one place this is decided: `train`'s result, the app's run list, weights bundle and "Use in Detect", and
    `python -m finetune.analysis` all ask here.
    """
    for name in ("best", "last"):
        folder = Path(run_dir) / name
        if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
            return folder
    return None


def write_result(result: TrainResult) -> Path:
    """Write `result` to its run folder's result.json, atomically; folders are stored by name."""
    values = dataclasses.asdict(result)
    del values["output_dir"]
    for name in _FOLDERS:
        values[name] = getattr(result, name).name if getattr(result, name) is not None else None
    return atomic_write_text(Path(result.output_dir) / RESULT_FILE, json.dumps(values, indent=1))


def read_result(run_dir: str | os.PathLike) -> TrainResult | None:
    """The result.json of the run at `run_dir` (its folders inside `run_dir`, wherever the run now is); None when
    there is none (the last session has not ended, or was killed) or it cannot be read."""
    run_dir = Path(run_dir)
    try:
        values = json.loads((run_dir / RESULT_FILE).read_text(encoding="utf-8"))
        for name in _FOLDERS:
            values[name] = run_dir / values[name] if values.get(name) in ("best", "last") else None
        return TrainResult(output_dir=run_dir, **values)
    except (OSError, ValueError, TypeError, AttributeError):
        return None
