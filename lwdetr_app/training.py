"""One fine-tuning job at a time, run in a child process and owned by the visitor who started it.

The Fine-tune tab builds finetune's own `TrainConfig`; it crosses into the child as its command-line arguments
(`TrainConfig.to_args`), and what the run produced comes back as finetune's own `TrainResult` (the run's
result.json, `finetune.result.read_result`), with the weights the run offers chosen by `offered_model_dir`.

The child is `python -m finetune ...` (or `accelerate launch --multi_gpu --num_processes N -m finetune ...` when N > 1
GPUs are visible): training never shares the web server's interpreter, memory or GIL, a crash or `kill -9` of the
child is reported as a failed run while the app keeps serving, and the training memory goes with the process. The
child writes its run folder; a monitor thread follows its events.jsonl (`finetune.callbacks.EventLog`) and its exit
status, and folds the events into a `RunProgress`. Stop sends SIGTERM: finetune saves last/ and state/ at the next
step, so the run can be resumed (`--resume`), also after an app restart (`runs_after_restart` marks runs whose
process is gone). `JOB` is the app's one job; `lwdetr_app.handlers` decides who sees what of it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.analysis import ONNX_FILE, ONNX_MISSING_FILE
from finetune.config import TrainConfig
from finetune.result import TrainResult, offered_model_dir, read_result

from .runs import EVENTS_FILE, LOG_FILE, RunRecord, read_record, write_record
from .settings import REPO_ROOT

__all__ = [
    "JOB",
    "JobBusyError",
    "JobSnapshot",
    "RunProgress",
    "TrainingJob",
    "format_duration",
    "mark_interrupted_runs",
    "read_events",
    "snapshot_from_disk",
    "train_command",
    "visible_gpus",
    "zip_model_folder",
]

RUNNING_STATES = ("starting", "running", "stopping")
_MAX_LOSS_POINTS = 2000
_MAX_LOG_LINES = 400
_POLL_SECONDS = 0.5


class JobBusyError(RuntimeError):
    """A training job is already running; the message says for about how long."""


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def train_command(config: TrainConfig, gpus: int) -> list[str]:
    """The child's command line for `config`: a new run, or with `resume` the continuation of the run in its
    `output` (with its saved settings).

    With several GPUs, `accelerate launch` starts one process per GPU (data shared out, gradients all-reduced).
    """
    args = config.to_args()  # data loader workers: the child's auto choice (none on a small CPU Space)
    if gpus > 1:
        launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus)]
        launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        return [sys.executable, *launcher, "-m", "finetune", *args]
    return [sys.executable, "-m", "finetune", *args]


def read_events(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """The complete JSON lines of `path` after byte `offset`, and the offset after them (a line being written is
    left for the next call; a malformed line, e.g. cut by a kill, is skipped)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    events = []
    for line in data[:end].splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and isinstance(event.get("kind"), str):
            events.append(event)
    return events, offset + end


def format_duration(seconds: float | None) -> str:
    """`75` -> `1:15`, `3725` -> `1:02:05`; `?` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# The note a bundle holds instead of model.onnx when finetune did not export one (a stopped run, or no onnx).
ONNX_NOT_EXPORTED = (
    "model.onnx is not included: finetune exports it when a run finishes its epochs. Export this folder with\n"
    "    python -m lwdetr export --model THIS_FOLDER --output model.onnx --image-size SIZE SIZE\n"
)


def zip_model_folder(model_dir: Path, zip_path: Path, folder_name: str, run_dir: Path | None = None) -> Path:
    """Zip the files of `model_dir` (the HF folder, with its model card README.md) under `folder_name/`, atomically
    (written beside, then renamed). With `run_dir`, the run's model.onnx goes beside them, else a note saying why
    it is missing (finetune's ONNX_MISSING.txt, or `ONNX_NOT_EXPORTED`)."""
    partial = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(model_dir.rglob("*")):
            if path.is_file():
                archive.write(path, f"{folder_name}/{path.relative_to(model_dir).as_posix()}")
        if run_dir is not None:
            onnx, missing = run_dir / ONNX_FILE, run_dir / ONNX_MISSING_FILE
            if onnx.is_file():
                archive.write(onnx, f"{folder_name}/{ONNX_FILE}")
            elif missing.is_file():
                archive.write(missing, f"{folder_name}/{ONNX_MISSING_FILE}")
            else:
                archive.writestr(f"{folder_name}/{ONNX_MISSING_FILE}", ONNX_NOT_EXPORTED)
    partial.replace(zip_path)
    return zip_path


class RunProgress:
    """A run's progress folded from its events: counters, plot points, log lines, the last evaluation."""

    def __init__(self) -> None:
        self.step = self.total = self.epoch = self.epochs = 0
        self.eta: float | None = None
        self.loss: list[tuple[float, str, float]] = []
        self.ap: list[tuple[float, str, float]] = []
        self.log: deque[str] = deque(maxlen=_MAX_LOG_LINES)
        self.last_eval: dict[str, float] = {}
        self.last_kind: str | None = None  # the last event's kind: "done" / "stopped" mean the child ended well

    def note(self, line: str, when: float | None = None) -> None:
        self.log.append(f"[{time.strftime('%H:%M:%S', time.localtime(when))}] {line}")

    def apply(self, event: dict[str, Any]) -> None:
        """One events.jsonl record (a `finetune.callbacks.TrainEvent` and its `time`)."""
        kind = event["kind"]
        self.last_kind = kind
        self.step, self.total = int(event.get("step") or 0), int(event.get("total_steps") or 0)
        self.epoch, self.epochs = int(event.get("epoch") or 0), int(event.get("epochs") or 0)
        self.eta = event.get("eta_seconds")
        metrics = {k: v for k, v in (event.get("metrics") or {}).items() if isinstance(v, (int, float))}
        if kind == "start":  # a resumed run replays from its saved step: drop what the killed session did after it
            self.loss = [p for p in self.loss if p[1] != "loss (step)" or p[0] <= self._x(self.step)]
        if kind == "step":
            self._record_step(metrics, event.get("time"))
        elif kind == "epoch":
            self._record_eval(metrics)
        if event.get("message"):
            self.note(str(event["message"]), event.get("time"))

    def _x(self, step: int) -> float:
        return round(step / self.total * max(self.epochs, 1), 4) if self.total else 0.0

    def _record_step(self, metrics: dict[str, float], when: float | None) -> None:
        if "loss" in metrics and self.total:
            self.loss.append((self._x(self.step), "loss (step)", float(metrics["loss"])))
            if len(self.loss) > _MAX_LOSS_POINTS:
                self.loss = self.loss[::2]
        every = max(1, self.total // 40)
        if self.step % every == 0 or self.step == self.total:
            parts = [f"{key} {value:.4g}" for key, value in metrics.items()]
            self.note(f"step {self.step}/{self.total} (epoch {self.epoch}/{self.epochs}): {', '.join(parts)}", when)

    def _record_eval(self, metrics: dict[str, float]) -> None:
        ap_keys = [key for key in ("AP", "AP50", "AP75") if key in metrics]
        for key in ap_keys:
            self.ap.append((float(self.epoch), key, float(metrics[key])))
        if ap_keys:
            self.last_eval = {k: v for k, v in metrics.items() if k.startswith(("AP", "AR"))}
        if "loss" in metrics:
            self.loss.append((float(self.epoch), "loss (epoch mean)", float(metrics["loss"])))


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a run's state for the UI. `version` changes whenever anything else does."""

    version: Any
    runs_version: int
    state: str  # idle, starting, running, stopping, done, stopped, failed, interrupted
    owner: str | None = None
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
    resumable: bool = False

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
        resume = " It can be resumed." if self.resumable else ""
        if self.state == "failed":
            return f"Run {self.run_name} failed: {self.error}{resume}"
        if self.state == "interrupted":
            return f"Run {self.run_name} was interrupted at step {self.step}/{self.total_steps} (app restart).{resume}"
        ap = self.metrics.get("AP")
        verb = "Stopped" if self.state == "stopped" else "Finished"
        text = f"{verb} {self.run_name} after {format_duration(self.elapsed)}"
        return text + (f": best AP {ap:.3f}" if ap is not None else "") + (resume if self.state == "stopped" else "")

    def busy_line(self) -> str:
        """What other visitors learn about this job: that the trainer is busy, and for about how long."""
        left = f"about {format_duration(self.eta_seconds)} left" if self.eta_seconds is not None else "just started"
        return f"The trainer is busy with another visitor's run ({left}); try again then."


class _Process:
    """What the monitor needs of a child: `poll()` (None while it runs, else its exit status) and `terminate()`.
    A `subprocess.Popen` for a child of this app; for a child that outlived an earlier app process, its pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not _alive(self.pid):
            self.returncode = -1  # not our child: its real status is unknown; the events tell how it ended
        return self.returncode

    def terminate(self) -> None:
        os.kill(self.pid, signal.SIGTERM)


def _alive(pid: int | None) -> bool:
    """Whether `pid` is a running `finetune` process (not a reused pid of something else)."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
        return b"finetune" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False


class TrainingJob:
    """The app's one training job. `start`/`resume` refuse a second job while one runs; only its owner stops it."""

    def __init__(self, gpus: int | None = None, command=train_command):
        self.gpus = gpus
        self.command = command  # (TrainConfig, gpus) -> argv; tests put a stand-in child here
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._process: Any = None
        self._runs_version = 0
        self._version = 0
        self._clear("idle")

    def _clear(self, state: str, owner: str | None = None, run_dir: Path | None = None, data: str | None = None):
        self._version += 1
        self._state, self._owner, self._run_dir, self._data = state, owner, run_dir, data
        self._progress = RunProgress()
        self._started = time.monotonic()
        self._finished: float | None = None
        self._record: RunRecord | None = None
        self._result: TrainResult | None = None

    # ------------------------------------------------------------------ public
    def start(self, config: TrainConfig, runs_dir: Path, owner: str | None) -> str:
        """Start a run of `config` in a child process, in a new folder of `runs_dir` (its `output`); return the
        run's name. `JobBusyError` if a job is running."""
        with self._lock:
            self._refuse_if_busy()
            run_name = _unique_run_name(runs_dir, config.model)
            run_dir = runs_dir / run_name
            run_dir.mkdir(parents=True)  # reserves the name
            config = dataclasses.replace(config, output=str(run_dir))
            record = RunRecord(run_name, owner, config, started=time.time())
            self._launch(run_dir, record, config, f"Run {run_name}: {config.to_command()}")
            return run_name

    def resume(self, run_dir: Path, owner: str | None) -> str:
        """Continue the owner's stopped, failed or interrupted run in `run_dir` from its saved state."""
        with self._lock:
            self._refuse_if_busy()
            record = read_record(run_dir)
            if record is None or record.owner != owner:
                raise PermissionError("no such run of yours")
            if not (run_dir / "state" / "trainer.json").is_file():
                raise ValueError(f"run {record.name} saved no state to resume from")
            record = dataclasses.replace(record, state="running", finished=None, error=None, resumable=False)
            resume = TrainConfig(output=str(run_dir), resume=True)
            self._launch(run_dir, record, resume, f"Resuming {record.name} from its saved state")
            return record.name

    def adopt(self, run_dir: Path, record: RunRecord) -> None:
        """Follow a child that an earlier app process started and that still runs (its pid is in the record)."""
        with self._lock:
            self._clear("running", record.owner, run_dir, record.config.data)
            self._record, self._process = record, _Process(int(record.pid or 0))
            self._started = time.monotonic() - max(0.0, time.time() - record.started)
            self._progress.note(f"Following {record.name}, started before the app restarted")
            self._spawn_monitor()

    def stop(self, owner: str | None = None) -> bool:
        """Ask the owner's running job to stop (it saves its last state); False when nothing of theirs runs."""
        with self._lock:
            if self._state not in ("starting", "running") or owner != self._owner:
                return False
            try:
                self._process.terminate()
            except OSError:
                return False  # it ended meanwhile; the monitor reports how
            self._state = "stopping"
            self._progress.note("Stop requested: finishing the current step and saving the last state…")
            self._version += 1
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the monitor has recorded the job's end (for tests and shutdown); True when it has."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return thread is None or not thread.is_alive()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            end = self._finished if self._finished is not None else time.monotonic()
            return _snapshot(
                self._progress, self._record, self._result, self._run_dir, self._state,
                (self._version, self._runs_version), self._runs_version, end - self._started, data=self._data,
            )  # fmt: skip

    @property
    def runs_version(self) -> int:
        """Changes whenever a run starts or ends (model pickers and run lists refresh then)."""
        return self._runs_version

    # ------------------------------------------------------------------ the child and its monitor
    def _refuse_if_busy(self) -> None:  # caller holds the lock
        if self._state in RUNNING_STATES:
            left = self._progress.eta
            when = f"about {format_duration(left)} left" if left is not None else "it has just started"
            raise JobBusyError(f"The trainer is busy with another run ({when}); try again when it has finished.")

    def _launch(self, run_dir: Path, record: RunRecord, config: TrainConfig, first_line: str) -> None:
        gpus = visible_gpus() if self.gpus is None else self.gpus
        self._clear("starting", record.owner, run_dir, record.config.data)
        self._progress.note(first_line)
        if config.resume:  # a resumed run: its plots start from what it did before
            for event in read_events(run_dir / EVENTS_FILE, 0)[0]:
                self._progress.apply(event)
            self._progress.last_kind = None  # how the earlier session ended says nothing of how this one will
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(run_dir / LOG_FILE, "ab") as log:
            self._process = subprocess.Popen(
                self.command(config, gpus), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self._record = dataclasses.replace(record, pid=self._process.pid)
        write_record(run_dir, self._record)
        self._runs_version += 1
        self._spawn_monitor()

    def _spawn_monitor(self) -> None:
        offset = (self._run_dir / EVENTS_FILE).stat().st_size if (self._run_dir / EVENTS_FILE).is_file() else 0
        if self._state == "running":  # adopted: replay what the child already reported
            offset = 0
        self._thread = threading.Thread(
            target=self._monitor, args=(self._process, self._run_dir, offset), name="lwdetr-train-monitor", daemon=True
        )
        self._thread.start()

    def _monitor(self, process: Any, run_dir: Path, offset: int) -> None:
        try:
            while True:
                ended = process.poll() is not None
                events, offset = read_events(run_dir / EVENTS_FILE, offset)
                if events:
                    with self._lock:
                        for event in events:
                            self._progress.apply(event)
                        if self._state == "starting" and self._progress.last_kind == "start":
                            self._state = "running"
                        self._version += 1
                if ended:
                    break
                time.sleep(_POLL_SECONDS)
            self._finish(run_dir, process.poll())
        except Exception as error:  # noqa: BLE001 - a broken run folder must never take the app down
            with self._lock:
                self._end("failed", f"the app lost track of the run ({type(error).__name__})")

    def _finish(self, run_dir: Path, returncode: int | None) -> None:
        """Record how the child ended: its last event says done or stopped; anything else is a failure."""
        kind = self._progress.last_kind
        state = {"done": "done", "stopped": "stopped"}.get(kind or "", "failed")
        result = read_result(run_dir) if state != "failed" else None  # written before its last event
        model_dir = offered_model_dir(run_dir)
        zip_name = None
        if model_dir is not None and state != "failed":
            zip_name = f"{run_dir.name}-weights.zip"
            zip_model_folder(model_dir, run_dir / zip_name, run_dir.name, run_dir)
        error = None if state != "failed" else _failure_reason(run_dir / LOG_FILE, returncode)
        with self._lock:
            self._result = result
            self._record = dataclasses.replace(
                self._record, state=state, pid=None, finished=time.time(), weights_zip=zip_name, error=error,
                resumable=state != "done" and (run_dir / "state" / "trainer.json").is_file(),
            )  # fmt: skip
            write_record(run_dir, self._record)
            if error:
                self._progress.note(f"Failed: {error}")
            elif model_dir is None:
                self._progress.note("No model folder was saved.")
            self._end(state, error)

    def _end(self, state: str, error: str | None) -> None:  # caller holds the lock
        self._state = state
        if error and self._record is not None:
            self._record = dataclasses.replace(self._record, error=error)
        self._finished = time.monotonic()
        self._version += 1
        self._runs_version += 1


def _failure_reason(log_path: Path, returncode: int | None) -> str:
    """One line on why the child failed: its `error: ...` line (finetune's one-line errors), else the last line of
    a traceback, else how it ended (a signal, e.g. `kill -9` or the out-of-memory killer)."""
    try:
        lines = [line.strip() for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines[-200:] if line]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1]
    if returncode is not None and returncode < -1:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else -returncode
        return f"the training process was killed ({name})"
    if lines and re.match(r"^[A-Za-z_.]*(Error|Exception)\b", lines[-1]):
        return lines[-1]
    return f"the training process ended with status {returncode} before finishing"


def _snapshot(
    progress: RunProgress, record: RunRecord | None, result: TrainResult | None, run_dir: Path | None, state: str,
    version: Any, runs_version: int, elapsed: float, data: str | None = None,
) -> JobSnapshot:  # fmt: skip
    """What the UI shows of a run: its progress from the events and, once it ended, finetune's result (metrics of
    the weights it offers) and those weights (`offered_model_dir`)."""
    ended = run_dir is not None and state not in (*RUNNING_STATES, "idle")
    model_dir = offered_model_dir(run_dir) if ended else None
    zip_path = run_dir / record.weights_zip if run_dir and record and record.weights_zip else None
    return JobSnapshot(
        version=version, runs_version=runs_version, state=state, owner=record.owner if record else None,
        run_name=record.name if record else None, run_dir=str(run_dir) if run_dir else None, data=data,
        step=progress.step, total_steps=progress.total, epoch=progress.epoch, epochs=progress.epochs,
        eta_seconds=progress.eta if state in RUNNING_STATES else None, elapsed=elapsed,
        loss_points=tuple(progress.loss), ap_points=tuple(progress.ap), log=tuple(progress.log),
        metrics=result.model_metrics if result else dict(progress.last_eval),
        weights_zip=str(zip_path) if zip_path and zip_path.is_file() else None,
        model_dir=str(model_dir) if model_dir and model_dir.is_dir() else None,
        error=record.error if record else None, resumable=bool(record and record.resumable),
    )  # fmt: skip


def snapshot_from_disk(run_dir: Path) -> JobSnapshot | None:
    """A finished (or interrupted) run's last state, rebuilt from its files: for its owner after an app restart."""
    record = read_record(run_dir)
    if record is None:
        return None
    progress = RunProgress()
    progress.note(f"Run {record.name}: {record.config.to_command()}", record.started or None)
    events = read_events(run_dir / EVENTS_FILE, 0)[0]
    for event in events:
        progress.apply(event)
    if record.error:
        progress.note(f"Failed: {record.error}", record.finished)
    end = record.finished or (events[-1].get("time") if events else None) or record.started
    stamp = tuple(_mtime(run_dir / name) for name in (EVENTS_FILE, "app_run.json"))
    result = read_result(run_dir) if record.state in ("done", "stopped") else None
    version = ("disk", run_dir.name, stamp)
    return _snapshot(progress, record, result, run_dir, record.state, version, 0, end - record.started)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def mark_interrupted_runs(runs_dir: Path, job: TrainingJob) -> None:
    """At start-up: a run recorded as running whose child still runs is followed by `job` again; one whose child
    is gone (the app or the machine restarted) becomes "interrupted", resumable when it saved a state."""
    if not runs_dir.is_dir():
        return
    for run_dir in sorted(runs_dir.iterdir()):
        record = read_record(run_dir) if run_dir.is_dir() else None
        if record is None or record.state not in RUNNING_STATES:
            continue
        if _alive(record.pid) and job.snapshot().state == "idle":
            job.adopt(run_dir, record)
            continue
        resumable = (run_dir / "state" / "trainer.json").is_file()
        write_record(run_dir, dataclasses.replace(record, state="interrupted", pid=None, resumable=resumable))


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
