"""One fine-tuning job at a time, in a background thread of the app process.

The job lives in a module-level object (`JOB`), not in a browser session: every page (and a reloaded page) polls
`JOB.snapshot()` and sees the same progress. `finetune.train.train` reports through a callback (`TrainEvent`) and
stops on a `threading.Event`; `finetune_runner` is the only function that names finetune's training API.
"""

from __future__ import annotations

import dataclasses
import json
import re
import threading
import time
import traceback
import zipfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "JOB",
    "JobBusyError",
    "JobSnapshot",
    "RunOutcome",
    "TrainRequest",
    "TrainingJob",
    "format_duration",
    "finetune_runner",
    "zip_model_folder",
]

RUNNING_STATES = ("starting", "running", "stopping")
_MAX_LOSS_POINTS = 2000
_MAX_LOG_LINES = 400


class JobBusyError(RuntimeError):
    """A training job is already running; the message says which."""


@dataclass(frozen=True)
class TrainRequest:
    """The settings a user picks in the Fine-tune tab."""

    data: str
    model: str
    epochs: int = 10
    batch_size: int = 4
    image_size: int = 512
    lr: float = 1e-4
    freeze_backbone: bool = False

    def train_config(self, run_dir: Path) -> dict[str, Any]:
        """Keyword arguments for `finetune.train.TrainConfig` (unknown names are dropped by the runner)."""
        return {
            "data": self.data,
            "model": self.model,
            "output": str(run_dir),
            "epochs": int(self.epochs),
            "batch_size": int(self.batch_size),
            "image_size": int(self.image_size),
            "lr": float(self.lr),
            "freeze_backbone": bool(self.freeze_backbone),
            "num_workers": 0,  # no worker processes inside a web server
            "eval_every": 1,
            "seed": 0,
        }


@dataclass(frozen=True)
class RunOutcome:
    """What a finished (or stopped) run left behind."""

    run_dir: Path
    best_dir: Path | None
    last_dir: Path | None
    best_metrics: dict[str, float]
    stopped: bool


Runner = Callable[[dict[str, Any], Callable[[Any], None], threading.Event], RunOutcome]


def finetune_runner(config: dict[str, Any], callback: Callable[[Any], None], stop_event: threading.Event) -> RunOutcome:
    """Run `finetune.train.train` with the fields of `config` that `TrainConfig` knows."""
    from finetune.train import TrainConfig, train

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    result = train(
        TrainConfig(**{k: v for k, v in config.items() if k in known}), callback=callback, stop_event=stop_event
    )

    def folder(value: Any) -> Path | None:
        return Path(value) if value else None

    return RunOutcome(
        run_dir=Path(getattr(result, "output_dir", None) or config["output"]),
        best_dir=folder(getattr(result, "best_dir", None)),
        last_dir=folder(getattr(result, "last_dir", None)),
        best_metrics=_best_metrics(result),
        stopped=bool(getattr(result, "stopped", False)),
    )


def _best_metrics(result: Any) -> dict[str, float]:
    """The evaluation metrics (AP..., AR..., AP/<class>) of the best epoch, else of the last evaluation."""
    history = getattr(result, "history", None) or []
    best_epoch = getattr(result, "best_epoch", None)
    row = next((r for r in history if r.get("epoch") == best_epoch), None) or getattr(result, "metrics", {}) or {}
    return {k: float(v) for k, v in row.items() if k.startswith(("AP", "AR")) and isinstance(v, (int, float))}


def format_duration(seconds: float | None) -> str:
    """`75` -> `1:15`, `3725` -> `1:02:05`; `?` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def zip_model_folder(model_dir: Path, zip_path: Path, folder_name: str) -> Path:
    """Zip the files of `model_dir` under `folder_name/` (atomically: written beside, then renamed)."""
    partial = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder_name}/{path.relative_to(model_dir).as_posix()}")
    partial.replace(zip_path)
    return zip_path


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of the job's state for the UI. `version` changes whenever anything else does."""

    version: int
    runs_version: int
    state: str  # idle, starting, running, stopping, done, stopped, failed
    run_name: str | None = None
    run_dir: str | None = None
    data: str | None = None  # the dataset the job trains on (in use: never evicted while it runs)
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    eta_seconds: float | None = None
    elapsed: float = 0.0
    loss_points: tuple[tuple[float, str, float], ...] = ()  # (epoch, series, value)
    ap_points: tuple[tuple[float, str, float], ...] = ()
    log: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    weights_zip: str | None = None
    model_dir: str | None = None
    error: str | None = None

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    def summary(self) -> str:
        """One line for a status box."""
        if self.state == "idle":
            return "No training job yet."
        if self.state == "starting":
            return f"Starting {self.run_name}: loading the data and the model…"
        if self.running:
            text = f"{'Stopping' if self.state == 'stopping' else 'Training'} {self.run_name}: epoch {self.epoch}/"
            text += f"{self.epochs}, step {self.step}/{self.total_steps}, ETA {format_duration(self.eta_seconds)}"
            return text
        if self.state == "failed":
            return f"Run {self.run_name} failed: {self.error}"
        ap = self.metrics.get("AP")
        verb = "Stopped" if self.state == "stopped" else "Finished"
        text = f"{verb} {self.run_name} after {format_duration(self.elapsed)}"
        return text + (f": best AP {ap:.3f}" if ap is not None else "")


class TrainingJob:
    """The one training job of the app process. `start` refuses a second job while one runs."""

    def __init__(self, runner: Runner | None = None):
        self.runner = runner or finetune_runner
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._runs_version = 0
        self._reset("idle")

    def _reset(
        self, state: str, run_name: str | None = None, run_dir: Path | None = None, data: str | None = None
    ) -> None:
        self._version = getattr(self, "_version", 0) + 1
        self._state, self._run_name, self._run_dir, self._data = state, run_name, run_dir, data
        self._step = self._total = self._epoch = self._epochs = 0
        self._eta: float | None = None
        self._started = time.monotonic()
        self._finished: float | None = None
        self._loss: list[tuple[float, str, float]] = []
        self._ap: list[tuple[float, str, float]] = []
        self._log: deque[str] = deque(maxlen=_MAX_LOG_LINES)
        self._metrics: dict[str, float] = {}
        self._last_eval: dict[str, float] = {}
        self._weights_zip: str | None = None
        self._model_dir: str | None = None
        self._error: str | None = None

    # ------------------------------------------------------------------ public
    def start(self, request: TrainRequest, runs_dir: Path) -> str:
        """Start `request` in the background; return the run's name. Raises `JobBusyError` if a job is running."""
        with self._lock:
            if self._state in RUNNING_STATES:
                raise JobBusyError(
                    f"A training job is already running ({self._run_name}, epoch {self._epoch}/{self._epochs}); "
                    "wait for it to finish or stop it first."
                )
            run_name = _unique_run_name(runs_dir, request.model)
            run_dir = runs_dir / run_name
            run_dir.mkdir(parents=True)  # reserves the name
            self._reset("starting", run_name, run_dir, request.data)
            self._append_log(f"Run {run_name}: {json.dumps(dataclasses.asdict(request))}")
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._work, args=(request, run_dir, self._stop), name="lwdetr-train", daemon=True
            )
            self._thread.start()
            return run_name

    def stop(self) -> bool:
        """Ask the running job to stop (it saves its last state); False when nothing runs."""
        with self._lock:
            if self._state not in ("starting", "running"):
                return False
            self._stop.set()
            self._state = "stopping"
            self._append_log("Stop requested: finishing the current step and saving the last state…")
            self._version += 1
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job's thread ends (for tests and shutdown); True when it did."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            end = self._finished if self._finished is not None else time.monotonic()
            return JobSnapshot(
                version=self._version,
                runs_version=self._runs_version,
                state=self._state,
                run_name=self._run_name,
                run_dir=str(self._run_dir) if self._run_dir else None,
                data=self._data,
                step=self._step,
                total_steps=self._total,
                epoch=self._epoch,
                epochs=self._epochs,
                eta_seconds=self._eta,
                elapsed=end - self._started,
                loss_points=tuple(self._loss),
                ap_points=tuple(self._ap),
                log=tuple(self._log),
                metrics=dict(self._metrics),
                weights_zip=self._weights_zip,
                model_dir=self._model_dir,
                error=self._error,
            )

    # ------------------------------------------------------------------ the training thread
    def _append_log(self, line: str) -> None:  # caller holds the lock
        self._log.append(f"[{time.strftime('%H:%M:%S')}] {line}")

    def on_event(self, event: Any) -> None:
        """The training callback (a `finetune.callbacks.TrainEvent`); quick, under the lock."""
        with self._lock:
            self._version += 1
            self._step, self._total = int(event.step), int(event.total_steps)
            self._epoch, self._epochs = int(event.epoch), int(event.epochs)
            self._eta = event.eta_seconds
            metrics = dict(event.metrics or {})
            if event.kind == "start" and self._state == "starting":
                self._state = "running"
            if event.kind == "step":
                self._record_step(metrics)
            elif event.kind in ("epoch", "done", "stopped"):
                self._record_eval(event.kind, metrics)
            if event.message:
                self._append_log(event.message)

    def _record_step(self, metrics: dict[str, float]) -> None:
        if "loss" in metrics and self._total:
            x = self._step / self._total * max(self._epochs, 1)
            self._loss.append((round(x, 4), "loss (step)", float(metrics["loss"])))
            if len(self._loss) > _MAX_LOSS_POINTS:
                self._loss = self._loss[::2]
        every = max(1, self._total // 40)
        if self._step % every == 0 or self._step == self._total:
            parts = [f"{key} {value:.4g}" for key, value in metrics.items() if isinstance(value, (int, float))]
            self._append_log(
                f"step {self._step}/{self._total} (epoch {self._epoch}/{self._epochs}): {', '.join(parts)}"
            )

    def _record_eval(self, kind: str, metrics: dict[str, float]) -> None:
        if kind != "epoch":
            return
        ap_keys = [key for key in ("AP", "AP50", "AP75") if key in metrics]
        for key in ap_keys:
            self._ap.append((float(self._epoch), key, float(metrics[key])))
        if ap_keys:
            self._last_eval = {k: v for k, v in metrics.items() if k.startswith(("AP", "AR"))}
        if "loss" in metrics:
            self._loss.append((float(self._epoch), "loss (epoch mean)", float(metrics["loss"])))

    def _work(self, request: TrainRequest, run_dir: Path, stop_event: threading.Event) -> None:
        try:
            outcome = self.runner(request.train_config(run_dir), self.on_event, stop_event)
            self._finish(request, outcome)
        except Exception as error:  # noqa: BLE001 - a failed run must never take the app down
            with self._lock:
                self._state, self._error = "failed", (str(error).strip().splitlines() or [type(error).__name__])[0]
                self._finished = time.monotonic()
                for line in traceback.format_exc().strip().splitlines()[-6:]:
                    self._append_log(line)
                self._version += 1
                self._runs_version += 1

    def _finish(self, request: TrainRequest, outcome: RunOutcome) -> None:
        model_dir = next((d for d in (outcome.best_dir, outcome.last_dir) if d and (d / "config.json").is_file()), None)
        zip_path = None
        if model_dir is not None:
            name = self._run_name or model_dir.parent.name
            zip_path = zip_model_folder(model_dir, outcome.run_dir / f"{name}-weights.zip", name)
        metrics = outcome.best_metrics or self._last_eval
        info = {
            "best_ap": metrics.get("AP"),
            "metrics": metrics,
            "request": dataclasses.asdict(request),
            "stopped": outcome.stopped,
            "model_dir": str(model_dir) if model_dir else None,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        outcome.run_dir.mkdir(parents=True, exist_ok=True)
        (outcome.run_dir / "app_run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        with self._lock:
            self._metrics = dict(metrics)
            self._model_dir = str(model_dir) if model_dir else None
            self._weights_zip = str(zip_path) if zip_path else None
            self._state = "stopped" if outcome.stopped else "done"
            self._finished = time.monotonic()
            if model_dir is None:
                self._append_log("No model folder was saved.")
            self._version += 1
            self._runs_version += 1


def _unique_run_name(runs_dir: Path, model: str) -> str:
    path = Path(str(model))
    name = f"from-{path.parent.name}" if path.name in ("best", "last") and path.parent.name else path.name
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:48] or "model"
    base = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
    name, index = base, 2
    while (runs_dir / name).exists():
        name, index = f"{base}-{index}", index + 1
    return name


JOB = TrainingJob()
