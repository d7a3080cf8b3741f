"""Which models the app offers, which one it starts with (and why), and a small cache of loaded `Detector`s."""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from finetune.result import offered_model_dir
from lwdetr.detector import Detector

from .runs import owned_runs

__all__ = [
    "DEFAULT_HUB_MODEL",
    "PUBLISHED_MODELS",
    "ModelChoice",
    "ModelOption",
    "ModelRegistry",
    "RunInfo",
    "choose_default_model",
    "list_runs",
    "model_choices",
]

_SIZES = ("tiny", "small", "medium", "large", "xlarge")
PUBLISHED_MODELS: tuple[str, ...] = tuple(f"AnnaZhang/lwdetr_{size}_60e_coco" for size in _SIZES) + tuple(
    f"AnnaZhang/lwdetr_{size}_30e_objects365" for size in _SIZES
)
DEFAULT_HUB_MODEL = "AnnaZhang/lwdetr_small_60e_coco"


@dataclass(frozen=True)
class ModelChoice:
    """A model reference (hub id or folder; None when nothing is usable), a sentence saying why it is active, and
    whether the hub answered (when it did not, only published checkpoints in the local cache can be offered)."""

    ref: str | None
    reason: str
    hub_reachable: bool = True


@dataclass(frozen=True)
class ModelOption:
    """One entry of a model picker. The browser sees only `label` and `key` (a name, never a server path: "demo",
    "run:<run name>", a hub id, a preset); `ref` is what loads it (a folder or a hub id) and stays on the server."""

    label: str
    key: str
    ref: str


DEMO_KEY = "demo"
RUN_KEY_PREFIX = "run:"


@dataclass(frozen=True)
class RunInfo:
    """A fine-tuning run made in this app that left a loadable model folder."""

    name: str
    model_dir: Path
    ap: float | None

    @property
    def label(self) -> str:
        return f"Fine-tuned: {self.name}" + (f" (AP {self.ap:.3f})" if self.ap is not None else "")


def _is_model_dir(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def list_runs(runs_dir: Path, owner: str | None) -> list[RunInfo]:
    """The runs of `owner` (see `lwdetr_app.runs`) with a model folder to offer (`offered_model_dir`: best/, else
    last/); newest first. Other visitors' runs are not listed: a run belongs to whoever started it."""
    runs = []
    for run in owned_runs(runs_dir, owner):
        folder = offered_model_dir(run.folder)
        if folder is not None:
            runs.append(RunInfo(run.folder.name, folder.resolve(), run.best_ap))
    return runs


def display_path(path: Path) -> str:
    """`path` as visitors may see it: relative to the repository when it lies inside it (`examples/demo_model`),
    else only its folder name (a server's absolute paths are not shown)."""
    from .settings import REPO_ROOT

    try:
        return path.resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        return path.name


def _cached(model_id: str) -> bool:
    """Whether the hub cache holds `model_id`'s config (so it can load without the network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model_id, "config.json"), str)


def model_choices(
    runs_dir: Path, demo_model_dir: Path, owner: str | None = None, hub_reachable: bool = True
) -> list[ModelOption]:
    """A model picker's options: the bundled demo model, `owner`'s runs, the published checkpoints (when the hub is
    unreachable, only those in the local cache: the others would fail to load)."""
    options = []
    if _is_model_dir(demo_model_dir):
        label = f"Bundled demo model ({display_path(demo_model_dir)})"
        options.append(ModelOption(label, DEMO_KEY, str(demo_model_dir.resolve())))
    options += [
        ModelOption(run.label, RUN_KEY_PREFIX + run.name, str(run.model_dir)) for run in list_runs(runs_dir, owner)
    ]
    options += [
        ModelOption(model_id, model_id, model_id) for model_id in PUBLISHED_MODELS if hub_reachable or _cached(model_id)
    ]
    return options


# What a failed connection looks like through huggingface_hub, httpx, requests and the socket layer.
_NETWORK_ERROR = re.compile(
    r"ConnectError|ConnectionError|ConnectTimeout|Name or service not known|name resolution|nodename nor servname"
    r"|Network is unreachable|Connection refused|Max retries exceeded|LocalEntryNotFoundError|timed out",
    re.IGNORECASE,
)


def _short(error: BaseException, limit: int = 120) -> str:
    """A short reason for the status line (`lwdetr.hub`'s messages also say how to pass a folder: not needed here)."""
    if "HF_HUB_OFFLINE" in str(error):
        return "offline mode: HF_HUB_OFFLINE is set"
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if inner := re.search(r"from the Hugging Face hub \((.*)\); check", text):
        text = inner.group(1).removeprefix("Got: ")
    if _NETWORK_ERROR.search(f"{type(error).__name__}: {text}"):
        return "no network connection to huggingface.co"  # not "ConnectError: [Errno -2] Name or service not known"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _resolve_with_timeout(model_id: str, timeout: float) -> str | None:
    """None when `model_id` is in the cache or downloadable within `timeout` seconds, else the reason it is not."""
    from lwdetr.hub import resolve_model_dir

    outcome: dict[str, str | None] = {}

    def attempt() -> None:
        try:
            resolve_model_dir(model_id)
            outcome["error"] = None
        except Exception as error:  # noqa: BLE001 - any failure means "not available"
            outcome["error"] = _short(error)

    worker = threading.Thread(target=attempt, name="hub-check", daemon=True)
    worker.start()
    worker.join(timeout)
    if "error" not in outcome:
        return f"no answer within {timeout:.0f} s"
    return outcome["error"]


def choose_default_model(
    demo_model_dir: Path, override: str | None = None, hub_timeout: float = 30.0, hub_model: str = DEFAULT_HUB_MODEL
) -> ModelChoice:
    """The COCO `small` checkpoint when the hub has it (or the cache does), else the bundled demo model."""
    if override:
        return ModelChoice(override, f"{override}: chosen with --model / LWDETR_APP_MODEL")
    problem = _resolve_with_timeout(hub_model, hub_timeout)
    if problem is None:
        return ModelChoice(hub_model, f"{hub_model} (COCO, small): from the Hugging Face hub or its local cache")
    shown = display_path(demo_model_dir)
    if _is_model_dir(demo_model_dir):
        return ModelChoice(
            str(demo_model_dir.resolve()), f"Bundled demo model ({shown}): the hub is unreachable ({problem})", False
        )
    return ModelChoice(None, f"No model available: the hub is unreachable ({problem}) and {shown} is missing", False)


class ModelRegistry:
    """Loaded `Detector`s by reference, the `capacity` most recently used kept in memory; thread-safe.

    A local folder is keyed with its weights' modification time, so a run's `best/` that is rewritten later (while
    training goes on) is loaded again rather than served stale.
    """

    def __init__(self, capacity: int = 3, device: str = "auto"):
        self.capacity = capacity
        self.device = device
        self._detectors: OrderedDict[tuple[str, float], Detector] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[str, float], threading.Lock] = {}

    @staticmethod
    def _key(ref: str) -> tuple[str, float]:
        ref = str(ref).strip()
        folder = Path(ref).expanduser()
        stamps = [path.stat().st_mtime for path in folder.glob("*.safetensors")] if folder.is_dir() else []
        return ref, max(stamps, default=0.0)

    def _cached(self, key: tuple[str, float]) -> Detector | None:
        with self._lock:
            if key in self._detectors:
                self._detectors.move_to_end(key)
                return self._detectors[key]
            return None

    def get(self, ref: str) -> Detector:
        """The detector for `ref` (hub id or folder), loading it on first use. Raises on failure (OSError etc.)."""
        key = self._key(ref)
        if (detector := self._cached(key)) is not None:
            return detector
        with self._lock:
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one load per model; other models stay available meanwhile
            if (detector := self._cached(key)) is not None:
                return detector
            detector = Detector.from_pretrained(key[0], device=self.device)
            with self._lock:
                self._detectors[key] = detector
                self._loading.pop(key, None)
                while len(self._detectors) > self.capacity:
                    self._detectors.popitem(last=False)
            return detector
