"""Where the app keeps its files, which address it serves on, and the knobs tests turn (all from env or CLI).

Everything the app writes goes under one data folder (`--data-dir`, env `LWDETR_APP_DATA`, default `./app_data`;
on a Hugging Face Space with persistent storage, a writable /data, `/data/lwdetr_app`, which survives restarts):

    app_data/
      gradio/          Gradio's uploads and output cache (GRADIO_TEMP_DIR)
      cache/           matplotlib's config cache, Python's temporary files
      datasets/        extracted dataset zips and the synthetic sample
      runs/            fine-tuning runs (best/, last/, metrics, weights zip)
      results/         detection JSON files and annotated videos, one folder per detection (a server-side random id)

A public app must not let visitors fill its disk: uploads are capped (`max_upload`), a dataset zip may expand to at
most 20 times that (and at most `max_zip_ratio` times its compressed size), and datasets/, results/ and runs/ are
each kept under a size budget, oldest first (`lwdetr_app.storage`).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "AppPaths",
    "AppSettings",
    "DEFAULT_PORT",
    "REPO_ROOT",
    "configure_environment",
    "default_data_dir",
    "parse_size",
    "resolve_server",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PORT = 7860


PERSISTENT_STORAGE = Path("/data")  # where a Space's persistent storage is mounted


def default_data_dir(persistent: Path = PERSISTENT_STORAGE) -> Path:
    """`/data/lwdetr_app` on a Space (SPACE_ID set) with persistent storage mounted at a writable /data, else
    ./app_data (a Space's own disk is wiped at every restart)."""
    if os.environ.get("SPACE_ID") and persistent.is_dir() and os.access(persistent, os.W_OK):
        return persistent / "lwdetr_app"
    return Path("app_data")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40}


def parse_size(value: str | int) -> int:
    """Bytes from `"200mb"`, `"10 GB"`, `"512kb"` or a plain number (binary units, as Gradio's `max_file_size`)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?b?)\s*", str(value).lower())
    if not match:
        raise ValueError(f"not a size: {value!r} (expected e.g. 200mb or 10gb)")
    unit = match.group(2) if match.group(2) in _SIZE_UNITS else match.group(2) + "b"
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@dataclass(frozen=True)
class AppPaths:
    """The sub-folders of the data folder (see the module docstring)."""

    root: Path

    @property
    def gradio(self) -> Path:
        return self.root / "gradio"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def datasets(self) -> Path:
        return self.root / "datasets"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def results(self) -> Path:
        return self.root / "results"

    def create(self) -> AppPaths:
        for folder in (self.gradio, self.cache, self.datasets, self.runs, self.results):
            folder.mkdir(parents=True, exist_ok=True)
        return self


@dataclass
class AppSettings:
    """What the app needs to know at start-up. `from_env` reads the environment; the CLI overrides fields."""

    data_dir: Path = Path("app_data")
    model: str | None = None  # force the default model (CLI --model / LWDETR_APP_MODEL)
    demo_model_dir: Path = REPO_ROOT / "examples" / "demo_model"
    examples_dir: Path = REPO_ROOT / "examples" / "images"
    hub_timeout: float = 30.0  # seconds to wait for the hub when choosing the default model
    synthetic_train: int = 48
    synthetic_val: int = 16
    synthetic_image_size: int = 256
    max_upload: str = "200mb"
    max_image_pixels: int = 40_000_000
    max_zip_ratio: float = 100.0  # a dataset zip entry (or the whole zip) expanding more is refused as a bomb
    max_zip_entries: int = 20_000
    max_video_seconds: float = 120.0  # an uploaded video lasting longer (by its header or frame times) is refused
    max_video_frames: int = 300  # frames annotated per video: a longer one is sampled (by the frames' timestamps)
    max_video_pixels: int = 1920 * 1088  # per video or webcam frame (1080p, as codecs store it)
    max_video_fps: float = 120.0  # a header claiming more is not trusted; frames decoded <= seconds x fps
    datasets_budget: str = "10gb"  # datasets/, results/, runs/: oldest evicted past these (what is in use is kept)
    results_budget: str = "200mb"
    runs_budget: str = "20gb"
    custom_models: bool = False  # whether visitors may type any hub id or server folder in the model pickers
    paths: AppPaths = field(init=False)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().resolve()
        self.demo_model_dir = Path(self.demo_model_dir).expanduser()
        self.examples_dir = Path(self.examples_dir).expanduser()
        self.paths = AppPaths(self.data_dir)
        for name in ("max_upload", "datasets_budget", "results_budget", "runs_budget"):
            parse_size(getattr(self, name))  # a bad setting fails at start-up, not on the first upload

    @property
    def max_upload_bytes(self) -> int:
        return parse_size(self.max_upload)

    @property
    def max_extracted_bytes(self) -> int:
        """The most a dataset zip may expand to: 20 times the upload limit, and never past the datasets budget."""
        return min(20 * self.max_upload_bytes, parse_size(self.datasets_budget))

    @classmethod
    def from_env(cls, **overrides) -> AppSettings:
        env = os.environ
        values = {
            "data_dir": Path(env.get("LWDETR_APP_DATA") or default_data_dir()),
            "model": env.get("LWDETR_APP_MODEL") or None,
            "demo_model_dir": Path(env.get("LWDETR_APP_DEMO_MODEL") or REPO_ROOT / "examples" / "demo_model"),
            "examples_dir": Path(env.get("LWDETR_APP_EXAMPLES") or REPO_ROOT / "examples" / "images"),
            "hub_timeout": float(env.get("LWDETR_APP_HUB_TIMEOUT") or 30.0),
            "synthetic_train": _env_int("LWDETR_APP_SYNTH_TRAIN", 48),
            "synthetic_val": _env_int("LWDETR_APP_SYNTH_VAL", 16),
            "synthetic_image_size": _env_int("LWDETR_APP_SYNTH_SIZE", 256),
            "max_upload": env.get("LWDETR_APP_MAX_UPLOAD") or "200mb",
            "datasets_budget": env.get("LWDETR_APP_DATASETS_BUDGET") or "10gb",
            "results_budget": env.get("LWDETR_APP_RESULTS_BUDGET") or "200mb",
            "runs_budget": env.get("LWDETR_APP_RUNS_BUDGET") or "20gb",
            "max_zip_entries": _env_int("LWDETR_APP_MAX_ZIP_ENTRIES", 20_000),
            "max_video_seconds": float(env.get("LWDETR_APP_MAX_VIDEO_SECONDS") or 120.0),
            "max_video_frames": _env_int("LWDETR_APP_MAX_VIDEO_FRAMES", 300),
            "custom_models": env.get("LWDETR_APP_CUSTOM_MODELS", "").strip().lower() in ("1", "true", "yes"),
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)


def configure_environment(paths: AppPaths, redirect_tempfile: bool = False) -> None:
    """Point Gradio's cache (and matplotlib's) inside the data folder; call before any `gr.Blocks` is built.

    `redirect_tempfile` also sends Python's `tempfile` (and child processes via TMPDIR) into the data folder; the
    app process does this, in-process tests do not (it is process-wide).
    """
    paths.create()
    os.environ["GRADIO_TEMP_DIR"] = str(paths.gradio)
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(paths.gradio / "cached_examples")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["MPLCONFIGDIR"] = str(paths.cache / "matplotlib")
    if redirect_tempfile:
        tmp = paths.cache / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        os.environ["TMPDIR"] = str(tmp)
        tempfile.tempdir = str(tmp)


def resolve_server(host: str | None, port: int | None) -> tuple[str, int]:
    """CLI value, else Gradio's GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, else 0.0.0.0 on a Space or 127.0.0.1."""
    env = os.environ
    default_host = "0.0.0.0" if env.get("SPACE_ID") else "127.0.0.1"
    resolved_host = host or env.get("GRADIO_SERVER_NAME") or default_host
    resolved_port = port or _env_int("GRADIO_SERVER_PORT", DEFAULT_PORT)
    return resolved_host, resolved_port
