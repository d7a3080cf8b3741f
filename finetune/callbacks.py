"""What a training run tells the outside world while it runs: `TrainEvent`, and the terminal's progress bar.

`finetune.train.train` calls `callback(event)` on the main process only, after every optimizer step (`"step"`),
after every evaluation (`"epoch"`), once at the start and once at the end (`"done"`, or `"stopped"` when a
`stop_event` ended the run early). A program (the Gradio app) passes its own callable; the CLI passes
`TqdmProgress()` and an `EventLog` (the run folder's events.jsonl, which the app's job monitor reads). A callback
should return quickly: it runs inside the training loop.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = ["Callback", "EtaClock", "EventKind", "EventLog", "TqdmProgress", "TrainEvent", "fan_out"]

EventKind = Literal["start", "step", "epoch", "done", "stopped"]


@dataclass(frozen=True)
class TrainEvent:
    """One progress report.

    `step` counts optimizer steps done so far (of `total_steps` planned), `epoch` the epochs begun (1-based while an
    epoch runs, so `epoch == epochs` during the last one). `metrics` holds the train losses and learning rate for
    `"step"`, and the validation metrics (AP, AP50, ...) plus the epoch's mean losses for `"epoch"`, `"done"` and
    `"stopped"`. `eta_seconds` is the estimated time left (None until it can be estimated).
    """

    kind: EventKind
    step: int
    total_steps: int
    epoch: int
    epochs: int
    metrics: dict[str, float] = field(default_factory=dict)
    message: str = ""
    eta_seconds: float | None = None


Callback = Callable[[TrainEvent], None]


class EtaClock:
    """Time left from the mean duration of the steps taken in this session.

    The first step is left out of the average: it pays for warm-up (allocations, first evaluation compile) and
    would make the estimate too pessimistic for the whole run.
    """

    def __init__(self, first_step: int):
        self.first_step = first_step
        self.start_time: float | None = None
        self.start_step = first_step

    def eta(self, step: int, total_steps: int) -> float | None:
        now = time.monotonic()
        if self.start_time is None:
            self.start_time, self.start_step = now, step
            return None
        done = step - self.start_step
        if done <= 0:
            return None
        return (now - self.start_time) / done * max(total_steps - step, 0)


class TqdmProgress:
    """A callback drawing a tqdm bar over the optimizer steps, with the loss and the last AP in its postfix."""

    def __init__(self, **tqdm_kwargs):
        self.tqdm_kwargs = {"dynamic_ncols": True, "unit": "step", **tqdm_kwargs}
        self.bar = None
        self.last_ap: float | None = None

    def __call__(self, event: TrainEvent) -> None:
        from tqdm.auto import tqdm

        if event.kind == "start":
            self.bar = tqdm(total=event.total_steps, initial=event.step, **self.tqdm_kwargs)
            if event.message:
                self.bar.write(event.message)
            return
        if self.bar is None:
            return
        if event.kind == "step":
            self.bar.update(event.step - self.bar.n)
            self.bar.set_description(f"epoch {event.epoch}/{event.epochs}")
            postfix = {
                "loss": f"{event.metrics.get('loss', float('nan')):.3f}",
                "lr": f"{event.metrics.get('lr', 0):.1e}",
            }
            if self.last_ap is not None:
                postfix["AP"] = f"{self.last_ap:.3f}"
            self.bar.set_postfix(postfix, refresh=False)
        elif event.kind == "epoch":
            self.last_ap = event.metrics.get("AP")
            self.bar.write(event.message)
        else:  # done / stopped
            self.bar.update(event.step - self.bar.n)
            self.close()
            print(event.message)

    def close(self) -> None:
        """End the bar's line (also when the run fails, so that the error starts a line of its own)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class EventLog:
    """A callback appending each event to a JSON-lines file (the `TrainEvent` fields and `time`, seconds since the
    epoch), flushed per line so another process can follow the run. A resumed run appends to the same file.

    The file is opened at the first event, so a run that never starts (bad data, `--dry-run`) leaves none.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.handle = None

    def __call__(self, event: TrainEvent) -> None:
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole run
        record = {**dataclasses.asdict(event), "time": round(time.time(), 3)}
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()
        if event.kind in ("done", "stopped"):
            self.handle.close()
            self.handle = None


def fan_out(*callbacks: Callback) -> Callback:
    """One callback calling each of `callbacks` in turn."""

    def call(event: TrainEvent) -> None:
        for callback in callbacks:
            callback(event)

    return call
