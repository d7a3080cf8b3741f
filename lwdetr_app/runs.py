"""Who a visitor is, and the app's record of each run on disk: who owns it, its settings, how it ended.

A visitor is their Spaces login when the Space has OAuth on (`gr.Request.username`), else a random token the app
gives their browser (kept in its localStorage, so a reload or an app restart finds their runs again), else, for a
client without that storage, their Gradio session. Each becomes an opaque owner key: compared in memory and written
inside app_run.json, never used to build a path. The token is secret to its browser; the file keeps only a hash.

Each run folder under runs/ holds finetune's own files (events.jsonl, metrics.jsonl, best/, last/, state/,
result.json), the child's console output (train.log) and app_run.json, written atomically by the app: `RunRecord`.
What a run produced is not copied into the record: `owned_runs` reads finetune's own `TrainResult`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config import TrainConfig, config_from_json
from finetune.result import TrainResult, read_result
from lwdetr.atomic import atomic_write_text

__all__ = [
    "EVENTS_FILE",
    "LOG_FILE",
    "RECORD_FILE",
    "OwnedRun",
    "RunRecord",
    "new_token",
    "owned_runs",
    "owner_key",
    "read_record",
    "valid_token",
    "write_record",
]

RECORD_FILE = "app_run.json"
EVENTS_FILE = "events.jsonl"  # written by `python -m finetune` (finetune.callbacks.EventLog)
LOG_FILE = "train.log"
_TOKEN = re.compile(r"[0-9a-f]{32}")


def new_token() -> str:
    return uuid.uuid4().hex


def valid_token(token: Any) -> bool:
    return isinstance(token, str) and _TOKEN.fullmatch(token) is not None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def owner_key(token: Any, request: Any) -> str | None:
    """The visitor's owner key: `user:<name>` when logged in, else from the browser token, else the session."""
    username = getattr(request, "username", None)
    if username:
        return f"user:{username}"
    if valid_token(token):
        return f"browser:{_digest(token)}"
    session = getattr(request, "session_hash", None)
    return f"session:{_digest(str(session))}" if session else None


@dataclass
class RunRecord:
    """app_run.json: the run's owner and `config` (finetune's `TrainConfig`, as the child was started), its state
    (running, stopping, done, stopped, failed, interrupted), the child's pid while it runs, and how it ended."""

    name: str
    owner: str | None
    config: TrainConfig
    state: str = "running"
    pid: int | None = None
    started: float = 0.0  # seconds since the epoch
    finished: float | None = None
    weights_zip: str | None = None  # file name inside the run folder
    error: str | None = None
    resumable: bool = False  # state/ was saved: `python -m finetune --resume` continues the run


@dataclass(frozen=True)
class OwnedRun:
    """One of a visitor's runs: its folder, the app's record, and finetune's result of its last session when that
    session ended (done or stopped; else None)."""

    folder: Path
    record: RunRecord
    result: TrainResult | None

    @property
    def best_ap(self) -> float | None:
        return self.result.best_ap if self.result else None


def read_record(run_dir: Path) -> RunRecord | None:
    """The run's record, or None when it has none (or an unreadable one: not a run of this app)."""
    try:
        data = json.loads((run_dir / RECORD_FILE).read_text(encoding="utf-8"))
        # An earlier app kept the Fine-tune tab's fields (all TrainConfig fields) as "request".
        data["config"] = config_from_json(data.get("config") or data.get("request") or {})
        known = {f.name for f in dataclasses.fields(RunRecord)}
        return RunRecord(**{key: value for key, value in data.items() if key in known})
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def write_record(run_dir: Path, record: RunRecord) -> None:
    """Write app_run.json atomically (beside, then renamed)."""
    atomic_write_text(run_dir / RECORD_FILE, json.dumps(dataclasses.asdict(record), indent=2))


def owned_runs(runs_dir: Path, owner: str | None) -> list[OwnedRun]:
    """The runs of `owner` under `runs_dir`, newest first (none for an unknown visitor)."""
    if not owner or not runs_dir.is_dir():
        return []
    runs = []
    for run_dir in runs_dir.iterdir():
        record = read_record(run_dir) if run_dir.is_dir() and not run_dir.name.startswith(".") else None
        if record is not None and record.owner == owner:
            result = read_result(run_dir) if record.state in ("done", "stopped") else None
            runs.append(OwnedRun(run_dir, record, result))
    return sorted(runs, key=lambda run: (run.record.started, run.folder.name), reverse=True)
