"""The app's handlers: `AppContext` holds what all sessions share (settings, default model, loaded models, the
training job) and has one method per UI event. Each is a plain function of its inputs (no browser needed to test
it); `lwdetr_app.ui` lays out the components and wires the events to these methods.

The app is meant to face the public internet, so nothing a client sends is trusted: no path is built from a
client value (a session hash, a file name, a typed model reference), files are read only from Gradio's upload
folder and the example images, typed model references must be offered by the app (unless `custom_models`),
numbers are range-checked into one-line messages, and every text a visitor sees goes through
`lwdetr_app.public_text` so it names no server path.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from finetune.config import TrainConfig
from lwdetr.atomic import atomic_write_bytes, atomic_write_text
from lwdetr.config import PRESETS
from lwdetr.cpu import kernel_summary
from lwdetr.images import ImageLoadError, load_image

from . import detection, video
from .datasets import ZipLimits, dataset_entry, inspect_dataset, prepare_synthetic, prepare_zip
from .models import PUBLISHED_MODELS, ModelChoice, ModelOption, ModelRegistry, display_path, model_choices
from .public_text import one_line, public_text
from .recipes import AUTO_NUMBERS, HUB_UNREACHABLE_NOTE, auto_settings, kind_labelled
from .runs import OwnedRun, new_token, owned_runs, owner_key, valid_token
from .settings import PERSISTENT_STORAGE, REPO_ROOT, AppSettings, parse_size
from .storage import enforce_budget, touch
from .training import (
    JOB,
    JobBusyError,
    JobSnapshot,
    TrainingJob,
    mark_interrupted_runs,
    snapshot_from_disk,
)

__all__ = [
    "AP_SERIES",
    "LOG_TAIL",
    "LOSS_SERIES",
    "AppContext",
    "analysis_frame",
    "empty_table",
    "metrics_frame",
    "runs_frame",
]

_DISPLAY_MAX_SIDE = 1600  # the drawn image is shown at most this large; the table keeps original pixels
_LOSS_COLUMNS = ["epoch", "series", "value"]
LOSS_SERIES = ("loss (step)", "loss (epoch mean)")
AP_SERIES = ("AP", "AP50", "AP75")
LOG_TAIL = 10  # the Log box shows the newest lines only: it opens scrolled to the top
_RUN_COLUMNS = ["run", "state", "best AP", "ended"]
_ANALYSIS_COLUMNS = ["class", "val boxes", "AP", "AP50"]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_RESULT_ID = re.compile(r"[0-9a-f]{32}")
_RESULTS_CHECK_SECONDS = 10.0  # the results/ budget is checked at most this often (a slider drag writes a lot)
_MAX_FRAME_BYTES = 16 << 20  # one streamed webcam frame (a JPEG, usually well under 1 MiB)
_FPS_WINDOW = 10  # the webcam's frame rate is measured over this many recent frames


def _visitor_name(name: Any, default: str = "image") -> str:
    """A client-sent file name made safe to show and to use as a file name: its last part, one line, short."""
    text = str(name or "").replace("\\", "/").rsplit("/", 1)[-1]
    text = re.sub(r"[\x00-\x1f\x7f]", "", text).strip()[:100]
    return text if text not in ("", ".", "..") else default


def _number(value: Any, what: str, low: float, high: float) -> float:
    """`value` as a float in [low, high], else `gr.Error` with one line saying so (NaN and "abc" included)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not low <= number <= high:  # NaN fails every comparison
        shown = str(value)[:40]
        raise gr.Error(f"{what} must be a number from {low:g} to {high:g}; got {shown!r}", print_exception=False)
    return number


def _filters(threshold: Any, max_detections: Any, classes: Any) -> tuple[float, int, list[str]]:
    """The Detect tab's filters checked: threshold in [0, 1], max detections up to the floor's, class names."""
    threshold = _number(threshold, "The score threshold", 0.0, 1.0)
    max_detections = int(_number(max_detections, "Max detections", 0, detection.FLOOR_MAX_DETECTIONS))
    return threshold, max_detections, [str(name) for name in classes] if isinstance(classes, (list, tuple)) else []


def _file_stem(name: Any, default: str) -> str:
    """A file-name stem made from a client-sent name: word characters, dots and dashes, at most 64 of them."""
    return re.sub(r"[^\w.-]", "_", Path(_visitor_name(name)).stem).lstrip(".")[:64] or default


def _stream_status(boxes: int, seconds: float, times: list[float]) -> str:
    """The webcam's status line: boxes in the frame, frames annotated per second (over the recent `times`), and the
    model's own time per frame."""
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = f"{(len(times) - 1) / span:.1f} fps" if span > 0 else "measuring the frame rate…"
    return f"**{boxes} boxes** · {rate} · the model: {seconds * 1000:.0f} ms per frame"


def _optional_number(value: Any, what: str, low: float, high: float) -> float | None:
    """None for an empty field (auto: `finetune.defaults` chooses), else `_number`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _number(value, what, low, high)


def _optional_int(value: Any, what: str, low: float, high: float) -> int | None:
    """None for an empty field, else a whole number in [low, high] (`gr.Error` for 2.5)."""
    number = _optional_number(value, what, low, high)
    if number is not None and not number.is_integer():
        raise gr.Error(f"{what} must be a whole number; got {str(value)[:40]!r}", print_exception=False)
    return None if number is None else int(number)


def _typed(value: Any) -> float | None:
    """A settings field's value when it holds a usable positive number (int when whole), else None (auto)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if not 0 < number < 1e6:
        return None
    return int(number) if number.is_integer() else number


def _resolved(ref: str) -> str:
    """A model reference compared as the folder it names (resolved), or as itself (a hub id, a preset)."""
    path = Path(ref)
    return str(path.resolve()) if path.is_dir() else ref


def empty_table() -> pd.DataFrame:
    return pd.DataFrame([], columns=detection.COLUMNS)


class AppContext:
    """The app's state shared by all sessions (settings, default model, loaded models, training job) and handlers."""

    def __init__(
        self,
        settings: AppSettings,
        default: ModelChoice,
        registry: ModelRegistry | None = None,
        job: TrainingJob | None = None,
    ):
        self.settings = settings
        self.paths = settings.paths.create()
        self.default = default
        self.registry = registry or ModelRegistry()
        self.job = job or JOB
        self._images: OrderedDict[str, tuple[Image.Image, float]] = OrderedDict()
        self._images_lock = threading.Lock()
        self._results_checked = 0.0
        self._owned_cache: dict[str | None, tuple[Any, list]] = {}
        self._data_sizes: OrderedDict[str, Any] = OrderedDict()  # dataset root -> finetune.defaults.DataSize
        mark_interrupted_runs(self.paths.runs, self.job)  # runs whose child is gone (an app restart) can resume

    # ------------------------------------------------------------------ what visitors see
    def public(self, text: Any, names: dict | None = None) -> str:
        """`text` naming no server path: `names` first (path -> the name the visitor knows), then the app's folders."""
        known = {**(names or {}), self.paths.root: "app_data", REPO_ROOT: "app"}
        return public_text(text, known)

    def public_line(self, text: Any, names: dict | None = None) -> str:
        return one_line(text, {**(names or {}), self.paths.root: "app_data", REPO_ROOT: "app"})

    def enforce_budgets(self, which: tuple[str, ...] = ("datasets", "results", "runs"), keep: tuple = ()) -> None:
        """Keep datasets/, results/ and runs/ under their budgets; the running job's data and run are in use."""
        snap = self.job.snapshot()
        in_use = (*keep, snap.run_dir, snap.data if snap.running else None)
        for name in which:
            budget = parse_size(getattr(self.settings, f"{name}_budget"))
            enforce_budget(getattr(self.paths, name), budget, in_use)

    def storage_note(self) -> str:
        """Where runs are kept and for how long, in words a visitor can use (no server path)."""
        root = self.paths.root
        persistent = root.is_relative_to(PERSISTENT_STORAGE) and bool(os.environ.get("SPACE_ID"))
        where = (
            "on the Space's persistent storage: they survive restarts"
            if persistent
            else "on the app's own disk: on a Space without persistent storage they are lost when it restarts"
        )
        return (
            f"Runs are kept {where}. When runs take more than {self.settings.runs_budget}, the oldest are deleted "
            "(download the weights you want to keep)."
        )

    # ------------------------------------------------------------------ shared helpers
    def model_options(self, owner: str | None = None, base: bool = False) -> list[ModelOption]:
        """The models `owner` may pick: the demo model, their own runs, the published checkpoints (and, for a base
        model, the presets), each base labelled with whether it is a real pretrained checkpoint."""
        options = model_choices(self.paths.runs, self.settings.demo_model_dir, owner, self.default.hub_reachable)
        if self.default.ref and self.default.ref not in [option.ref for option in options]:
            # the operator's --model: shown by its folder name, never its path
            options.insert(0, ModelOption(self._unlisted_label(self.default.ref), "default", self.default.ref))
        if not base:
            return options
        return kind_labelled(options + [ModelOption(f"Preset {name} (random init)", name, name) for name in PRESETS])

    def model_choices(self, owner: str | None = None) -> list[tuple[str, str]]:
        """The Detect picker's (label, key) pairs: what the browser sees (no server paths)."""
        return [(option.label, option.key) for option in self.model_options(owner)]

    def base_model_choices(self, owner: str | None = None) -> list[tuple[str, str]]:
        """The Fine-tune picker's (label, key) pairs."""
        return [(option.label, option.key) for option in self.model_options(owner, base=True)]

    def scratch_note(self) -> str:
        """What the Fine-tune tab says when no pretrained checkpoint can be offered (the hub is unreachable)."""
        return "" if self.default.hub_reachable else HUB_UNREACHABLE_NOTE

    def model_ref(self, key: Any, owner: str | None = None, base: bool = False) -> str | None:
        """The model (folder or hub id) behind a picker's `key` when `owner` is offered it, else None; with
        `custom_models` on, a typed hub id or folder is itself. Nothing a visitor types is loaded otherwise: not a
        server folder, not an arbitrary hub repository, not another visitor's run."""
        key = str(key or "").strip()
        if not key:
            return None
        ref = next((option.ref for option in self.model_options(owner, base) if option.key == key), None)
        return ref if ref is not None or not self.settings.custom_models else key

    def model_key(self, ref: str | None, owner: str | None = None) -> str | None:
        """The picker key of model `ref` (a folder is matched by its resolved path), or None when not offered."""
        if not ref:
            return None
        wanted = _resolved(ref)
        return next((o.key for o in self.model_options(owner, base=True) if _resolved(o.ref) == wanted), None)

    def default_base_model(self) -> str:
        """The Fine-tune picker's first key."""
        if self.default.ref in PUBLISHED_MODELS:
            return "AnnaZhang/lwdetr_tiny_60e_coco"  # the smallest pretrained checkpoint: CPU friendly
        return self.model_key(self.default.ref) or "nano"

    def example_images(self, limit: int = 6) -> list[str]:
        folder = self.settings.examples_dir
        if not folder.is_dir():
            return []
        return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES][:limit]

    def _allowed_roots(self) -> list[Path]:
        """Where an image a client names may be read from: Gradio's upload folder and the example images."""
        from gradio.utils import get_upload_folder

        roots = [Path(get_upload_folder()), self.paths.gradio, self.settings.examples_dir]
        return [Path(root).resolve() for root in roots]

    def load_payload(self, payload: Any) -> tuple[Image.Image, str, str]:
        """(RGB image, server path, original name) from an Image component's raw payload; `ImageLoadError` if bad.

        The error message names the file by its own name (never by a server path).
        """
        path = None
        if isinstance(payload, dict):
            url, path = str(payload.get("url") or ""), payload.get("path")
            name = _visitor_name(payload.get("orig_name") or (Path(str(path)).name if path else None))
            if not path and url.startswith("data:"):
                path = self._save_data_url(url)
        elif isinstance(payload, (str, os.PathLike)):
            path = str(payload) or None
            name = _visitor_name(Path(path).name if path else None)
        else:
            name = "image"
        if not path or not isinstance(path, (str, os.PathLike)):
            raise ImageLoadError("no image received")
        resolved = self._upload_path(path, name, ImageLoadError)
        try:
            image = load_image(resolved, max_pixels=self.settings.max_image_pixels)
        except ImageLoadError as error:  # name the file as the user knows it, not by its cache path
            raise ImageLoadError(self.public_line(error, {resolved: name, path: name})) from None
        return image, str(resolved), name

    def _upload_path(self, path: str | os.PathLike[str], name: str, error: type[ValueError]) -> Path:
        """`path` resolved, when it is a regular file in Gradio's upload folder or the examples and within the upload
        limit; else `error` with one line naming the file by `name`."""
        try:
            resolved = Path(path).resolve()
            allowed = any(resolved.is_relative_to(root) for root in self._allowed_roots()) and resolved.is_file()
            size = resolved.stat().st_size if allowed else 0
        except (OSError, RuntimeError, ValueError):  # too long a name, a NUL byte, a symlink loop
            allowed, size = False, 0
        if not allowed:
            raise error(f"{name}: not an uploaded file")
        if size > self.settings.max_upload_bytes:
            raise error(f"{name}: {size} bytes, more than the upload limit of {self.settings.max_upload}")
        return resolved

    def _save_data_url(self, url: str) -> str:
        if len(url) > self.settings.max_upload_bytes * 4 // 3 + 1024:  # base64 makes 3 bytes 4 characters
            raise ImageLoadError(f"pasted image: more than the upload limit of {self.settings.max_upload}")
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (IndexError, binascii.Error, ValueError):
            raise ImageLoadError("pasted image: malformed data URL") from None
        folder = self.paths.gradio / "pasted"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"pasted-{hashlib.sha256(data).hexdigest()[:24]}.bin"
        if not path.is_file():
            atomic_write_bytes(path, data)
        return str(path)

    def _display_image(self, path: str, image: Image.Image | None = None) -> tuple[Image.Image, float]:
        """The image at `path` (validated) at most `_DISPLAY_MAX_SIDE` large, and its scale; cached per path, so
        re-filtering redraws without decoding the file again and big photos are not kept at full size."""
        with self._images_lock:
            if path in self._images:
                self._images.move_to_end(path)
                return self._images[path]
        image = image if image is not None else load_image(path, max_pixels=self.settings.max_image_pixels)
        scale = min(1.0, _DISPLAY_MAX_SIDE / max(image.size))
        if scale < 1.0:
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        with self._images_lock:
            self._images[path] = (image, scale)
            while len(self._images) > 16:
                self._images.popitem(last=False)
        return image, scale

    def model_label(self, ref: str | None, owner: str | None = None) -> str:
        offered = model_choices(self.paths.runs, self.settings.demo_model_dir, owner, self.default.hub_reachable)
        for option in offered:
            if option.ref == ref:
                return option.label
        return self._unlisted_label(ref)

    def _unlisted_label(self, ref: str | None) -> str:
        """How a model no picker lists is named to visitors: a folder as `display_path` shows it, else its id."""
        return self.public(display_path(Path(ref)) if ref and Path(ref).is_dir() else str(ref))

    def model_status(self, ref: str | None, reason: str | None = None, owner: str | None = None) -> str:
        if ref is None:
            return f"**Active model:** none. {self.public(self.default.reason)}"
        if reason is None:
            reason = (
                self.default.reason
                if ref == self.default.ref
                else f"{self.model_label(ref, owner)}: chosen in the picker"
            )
        return f"**Active model:** {self.public(reason)}"

    def class_names(self, ref: str | None) -> list[str]:
        if not ref:
            return []
        try:
            labels = self.registry.get(ref).id2label
        except Exception:  # noqa: BLE001 - only a picker's choices
            return []
        return [labels[key] for key in sorted(labels)]

    # ------------------------------------------------------------------ Detect tab
    def run(self, payload: Any, model_ref: str | None) -> dict[str, Any]:
        """Run the model once at the floor threshold; the raw prediction kept in the session's state."""
        if not model_ref:
            raise gr.Error(f"No model to run. {self.default.reason}")
        image, path, name = self.load_payload(payload)
        detector = self.registry.get(model_ref)
        found, seconds = detection.run_detection(detector, image)
        self._display_image(path, image)
        return {
            "image_path": path,
            "name": name,
            "result_id": uuid.uuid4().hex,  # names this detection's JSON folder: a server-side id, never a client value
            "model": model_ref,
            "width": image.width,
            "height": image.height,
            "seconds": seconds,
            "kernels": kernel_summary() if detector.device.type == "cpu" else detector.device.type.upper(),
            "detections": found,
        }

    def render(self, raw: dict | None, threshold: Any, max_detections: Any, classes: Any, *_ignored: Any):
        """(drawn image, table, count, inference time, JSON file, status line) for the detections passing the filters.

        The JSON file goes to results/<the detection's server-side id>/; `gr.Error` for a bad threshold or maximum.
        """
        threshold, max_detections, classes = _filters(threshold, max_detections, classes)
        if not raw:
            return None, empty_table(), 0, "", gr.update(value=None, interactive=False), ""
        kept = detection.filter_detections(raw["detections"], threshold, max_detections, classes)
        image, scale = self._display_image(raw["image_path"])
        shown = [d.scaled(scale) for d in kept] if scale < 1.0 else kept
        table = pd.DataFrame(detection.table_rows(kept), columns=detection.COLUMNS)
        size = (raw["height"], raw["width"])
        results = detection.coco_results(kept, size, detection.image_id_from_name(raw["name"]))
        json_path = self._write_results(raw, results)
        timing = f"{raw['seconds'] * 1000:.0f} ms" + (f" ({raw['kernels']})" if raw.get("kernels") else "")
        status = detection.status_line(raw["detections"], kept, threshold, classes, raw["name"])
        drawn = detection.draw(image, shown)
        return drawn, table, len(kept), timing, gr.update(value=str(json_path), interactive=True), status

    def _write_results(self, raw: dict, results: list[dict]) -> Path:
        """results/<id>/<image stem>_detections.json, written atomically; the results/ budget checked now and then."""
        result_id = str(raw.get("result_id") or "")
        if not _RESULT_ID.fullmatch(result_id):
            result_id = raw["result_id"] = uuid.uuid4().hex
        folder = self.paths.results / result_id
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / f"{_file_stem(raw.get('name'), 'image')}_detections.json"
        atomic_write_text(json_path, json.dumps(results, indent=1))
        if time.monotonic() - self._results_checked > _RESULTS_CHECK_SECONDS:
            self._results_checked = time.monotonic()
            self.enforce_budgets(("results",), keep=(folder,))
        return json_path

    def detect(self, payload, model_ref, threshold, max_detections, classes, *_ignored):
        """New image: run the model, then filter. Outputs: raw state, then the `render` outputs, then a status."""
        if payload is None:
            return None, *self.render(None, threshold, max_detections, classes)
        try:
            raw = self.run(payload, model_ref)
        except ImageLoadError as error:
            message = self.public_line(error)
            gr.Warning(f"Cannot read this image: {message}")
            return None, *self.render(None, threshold, max_detections, classes)[:5], f"⚠️ {message}"
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - model folder or hub problems: say so, keep serving
            message = f"Cannot run model {self.model_label(model_ref)}: {self.public_line(error)}"
            gr.Warning(message)
            return None, *self.render(None, threshold, max_detections, classes)[:5], f"⚠️ {message}"
        return raw, *self.render(raw, threshold, max_detections, classes)

    def refilter(self, raw, threshold, max_detections, classes):
        return self.render(raw, threshold, max_detections, classes)

    def select_model(self, model_key, active_ref, payload, threshold, max_detections, token=None,
                     request: gr.Request = None):  # fmt: skip
        """A model picked (or typed): load it, reset the class filter, re-run on the current image. Outputs: the
        active model, its status line, the class filter, the `detect` outputs, then the picker (set back to the
        active model when the pick fails to load)."""
        owner = owner_key(token, request)
        key = str(model_key or "").strip()
        model_ref = self.model_ref(key, owner)
        if not key or (model_ref is not None and model_ref == active_ref):
            return (gr.skip(),) * 11
        try:
            if model_ref is None:
                raise ValueError("not offered here: pick a published checkpoint, the demo model or a run made here")
            self.registry.get(model_ref)
        except Exception as error:  # noqa: BLE001 - any load failure keeps the previous model
            message = f"Cannot load model {one_line(key, limit=100)}: {self.public_line(error)}"
            gr.Warning(message)
            status = self.model_status(active_ref) + f"\n\n⚠️ {message} Still using the previous model."
            return (gr.skip(), status, *(gr.skip(),) * 8, gr.update(value=self.model_key(active_ref, owner)))
        classes = gr.update(choices=self.class_names(model_ref), value=[])
        outputs = self.detect(payload, model_ref, threshold, max_detections, [])
        return (model_ref, self.model_status(model_ref, owner=owner), classes, *outputs, gr.skip())

    def detect_api(self, image: Any, threshold: float = 0.4) -> list[dict[str, Any]]:
        """`/detect`: the default model's detections scoring at least `threshold` (at most 100), best first.

        Each detection is `{"label", "label_id", "score", "box": [x0, y0, x1, y1]}` in pixels of the image.
        """
        threshold = _number(threshold, "threshold", 0.0, 1.0)
        try:
            raw = self.run(image, self.default.ref)
        except ImageLoadError as error:
            raise gr.Error(f"Cannot read this image: {self.public_line(error)}", print_exception=False) from None
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - e.g. the model folder went missing
            message = f"Cannot run model {self.model_label(self.default.ref)}: {self.public_line(error)}"
            raise gr.Error(message, print_exception=False) from None
        return [d.as_dict() for d in detection.filter_detections(raw["detections"], threshold, 100)]

    # ------------------------------------------------------------------ Detect tab: webcam and video
    def video_limits(self) -> video.VideoLimits:
        s = self.settings
        return video.VideoLimits(s.max_video_pixels, s.max_video_seconds, s.max_video_fps, s.max_video_frames)

    def _webcam_image(self, payload: Any) -> Image.Image:
        """One streamed webcam frame as an RGB image: its data URL decoded in memory (a stream must not write a file
        per frame), or an uploaded file; `ImageLoadError` when it is neither or is past the frame limits."""
        url = str(payload.get("url") or "") if isinstance(payload, dict) else ""
        if not url.startswith("data:"):
            return self.load_payload(payload)[0]
        if len(url) > _MAX_FRAME_BYTES * 4 // 3 + 1024:  # base64 makes 3 bytes 4 characters
            raise ImageLoadError(f"webcam frame: more than {_MAX_FRAME_BYTES >> 20} MiB")
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (IndexError, binascii.Error, ValueError):
            raise ImageLoadError("webcam frame: malformed data URL") from None
        return load_image(data, max_pixels=self.settings.max_video_pixels, max_bytes=_MAX_FRAME_BYTES)

    def stream_frame(self, payload, model_ref, threshold, max_detections, classes, recent):
        """One webcam frame: (the frame with the boxes passing the filters drawn, a status line with the frame rate,
        this session's recent frame times). A frame that cannot be read keeps the last picture and says why."""
        threshold, max_detections, classes = _filters(threshold, max_detections, classes)
        recent = [t for t in recent if isinstance(t, float)][1 - _FPS_WINDOW :] if isinstance(recent, list) else []
        if payload is None:
            return gr.skip(), gr.skip(), recent
        if not model_ref:
            raise gr.Error(f"No model to run. {self.default.reason}", print_exception=False)
        try:
            image = self._webcam_image(payload)
            found, seconds = detection.run_detection(self.registry.get(model_ref), image)
        except ImageLoadError as error:
            return gr.skip(), f"⚠️ Cannot read this frame: {self.public_line(error)}", recent
        except Exception as error:  # noqa: BLE001 - model folder or hub problems: say so, keep serving
            return gr.skip(), f"⚠️ Cannot run model {self.model_label(model_ref)}: {self.public_line(error)}", recent
        kept = detection.filter_detections(found, threshold, max_detections, classes)
        recent = [*recent, time.monotonic()]
        return detection.draw(image, kept), _stream_status(len(kept), seconds, recent), recent

    def _video_upload(self, payload: Any) -> tuple[Path, str]:
        """(server path, the visitor's name for it) of a Video component's raw payload; `VideoError` if unusable."""
        if isinstance(payload, dict) and isinstance(payload.get("video"), dict):  # {"video": ..., "subtitles": ...}
            payload = payload["video"]
        path = payload.get("path") if isinstance(payload, dict) else payload
        if not path or not isinstance(path, (str, os.PathLike)):
            raise video.VideoError("no video received")
        given = payload.get("orig_name") if isinstance(payload, dict) else None
        name = _visitor_name(given or Path(path).name, "video")
        return self._upload_path(path, name, video.VideoError), name

    def annotate_video(self, payload, model_ref, threshold, max_detections, classes, progress=gr.Progress()):  # noqa: B008
        """An uploaded video annotated frame by frame with the filters. Outputs: the annotated video (WebM), its
        download, the per-frame COCO results download (image_id = frame index), a status line with the frame rate.

        Both files go to results/<a server-side id>/, staged in a hidden folder until they are complete.
        """
        threshold, max_detections, classes = _filters(threshold, max_detections, classes)
        nothing = (None, gr.update(value=None, interactive=False), gr.update(value=None, interactive=False))
        if payload is None:
            return (*nothing, "")
        if not model_ref:
            raise gr.Error(f"No model to run. {self.default.reason}", print_exception=False)
        name = "video"
        staging = self.paths.results / f".{uuid.uuid4().hex}.partial"
        try:
            path, name = self._video_upload(payload)
            detector = self.registry.get(model_ref)
            stem, limits = _file_stem(name, "video"), self.video_limits()
            staging.mkdir(parents=True)
            target = staging / f"{stem}_detections{video.OUTPUT_SUFFIX}"

            def report(done: int, expected: int) -> None:
                progress((done, expected), desc=f"Annotating {name}", unit="frames")

            result = video.annotate_video(
                detector, path, target, name, limits, threshold, max_detections, classes, progress=report
            )
            frame_size = (result.info.height, result.info.width)
            coco = [r for index, kept in result.detections for r in detection.coco_results(kept, frame_size, index)]
            atomic_write_text(staging / f"{stem}_detections.json", json.dumps(coco, indent=1))
            folder = self.paths.results / staging.name[1:].removesuffix(".partial")
            os.replace(staging, folder)
        except video.VideoError as error:
            message = f"Cannot annotate this video: {self.public_line(error)}"
            gr.Warning(message)
            return (*nothing, f"⚠️ {message}")
        except Exception as error:  # noqa: BLE001 - a model, decoder or disk problem: say so, keep serving
            message = f"Cannot annotate {name} with model {self.model_label(model_ref)}: {self.public_line(error)}"
            gr.Warning(message)
            return (*nothing, f"⚠️ {message}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # still there only when something failed
        self.enforce_budgets(("results",), keep=(folder,))
        annotated, coco_file = str(folder / target.name), str(folder / f"{stem}_detections.json")
        return (
            annotated,
            gr.update(value=annotated, interactive=True),
            gr.update(value=coco_file, interactive=True),
            video.status_line(result, name, limits),
        )

    # ------------------------------------------------------------------ Fine-tune tab: data
    def _dataset_outputs(self, root_getter, name: str, names: dict) -> tuple[Any, str, list]:
        """(dataset root for the state, report, gallery) of a new dataset; an unusable upload is deleted again.

        `name` is what the visitor calls the dataset; `names` maps server paths to it for the messages.
        """
        from finetune.errors import DataError

        datasets = self.paths.datasets
        try:
            root = root_getter()
        except (DataError, OSError) as error:  # OSError: e.g. the disk is full
            message = f"This dataset cannot be used: {self.public_line(error, names)}"
            gr.Warning(message)
            return None, message, []
        entry = dataset_entry(root, datasets)
        names = {**names, **({entry: name} if entry else {}), datasets: "datasets"}
        preview = inspect_dataset(root, work_dir=datasets)
        report = self.public(preview.report, names)
        gallery = [(image, self.public_line(caption, names)) for image, caption in preview.images]
        if not preview.ok:
            if entry and entry.name.startswith("upload-") and not self._training_on(entry):
                shutil.rmtree(entry, ignore_errors=True)  # refused: keep nothing of it
            gr.Warning(self.public_line(preview.report, names))
            return None, report, []
        self.enforce_budgets(("datasets",), keep=(entry,))
        self._data_sizes[str(preview.root)] = preview.data_size
        while len(self._data_sizes) > 256:
            self._data_sizes.popitem(last=False)
        return str(preview.root), report, gallery

    def _training_on(self, entry: Path) -> bool:
        """Whether the running job trains on the dataset in `entry` (a folder of datasets/)."""
        snap = self.job.snapshot()
        return bool(snap.running and snap.data and Path(snap.data).resolve().is_relative_to(entry.resolve()))

    def zip_limits(self) -> ZipLimits:
        s = self.settings
        return ZipLimits(s.max_upload_bytes, s.max_extracted_bytes, s.max_zip_entries, s.max_zip_ratio)

    def use_zip(self, file: Any):
        if not file:
            return None, "", []
        path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
        name = _visitor_name(Path(str(path)).name, "dataset.zip")
        try:
            inside = any(Path(path).resolve().is_relative_to(root) for root in self._allowed_roots())
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            gr.Warning(f"{name}: not an uploaded file")
            return None, f"This dataset cannot be used: {name}: not an uploaded file", []
        return self._dataset_outputs(
            lambda: prepare_zip(path, self.paths.datasets, self.zip_limits()), name, {path: name}
        )

    def use_synthetic(self):
        s = self.settings
        return self._dataset_outputs(
            lambda: prepare_synthetic(self.paths.datasets, s.synthetic_train, s.synthetic_val, s.synthetic_image_size),
            "synthetic sample",
            {},
        )

    # ------------------------------------------------------------------ Fine-tune tab: the job
    def identify(self, token: Any, request: gr.Request = None):
        """Page load: the browser's owner token (a new one when it has none or a malformed one) and the pickers
        with this visitor's own runs."""
        token = token if valid_token(token) else new_token()
        owner = owner_key(token, request)
        return token, gr.update(choices=self.model_choices(owner)), gr.update(choices=self.base_model_choices(owner))

    def start_training(self, dataset, base_model, epochs, batch_size, image_size, lr, freeze, token=None,
                       request: gr.Request = None):  # fmt: skip
        """Start the visitor's job on their dataset (kept server-side) with the settings, each range-checked."""
        owner = owner_key(token, request)
        entry = dataset_entry(Path(str(dataset)), self.paths.datasets) if dataset else None
        if not dataset or entry is None or not Path(str(dataset)).is_dir():
            gr.Warning(
                "Choose a dataset first: upload a zip or use the synthetic sample (again, if it was cleaned up)."
            )
            return self._status_line(owner)
        model = self.model_ref(base_model or "nano", owner, base=True)
        if model is None:
            gr.Warning(
                f"Base model {one_line(str(base_model), limit=100)} is not offered here: pick one from the list."
            )
            return self._status_line(owner)
        config = TrainConfig(
            data=str(dataset),
            model=model,
            epochs=_optional_int(epochs, "Epochs", 1, 500),
            batch_size=_optional_int(batch_size, "Batch size", 1, 64),
            image_size=_optional_int(image_size, "Image size", 64, 1280),
            lr=_optional_number(lr, "Learning rate", 1e-8, 1.0),
            freeze_backbone=bool(freeze),
        )
        touch(entry)
        self.enforce_budgets(("runs",), keep=(entry,))
        try:
            name = self.job.start(config, self.paths.runs, owner)
        except (JobBusyError, OSError) as error:
            gr.Warning(self.public_line(error))
            return self.public_line(error)
        gr.Info(f"Training {name} started.")
        return self._status_line(owner)

    def auto_settings(self, dataset, base_model, epochs, batch_size, image_size, lr, token=None,
                      request: gr.Request = None):  # fmt: skip
        """The auto settings for the visitor's dataset and base model: (a line saying them, an update per
        `AUTO_NUMBERS` field showing its auto value as the placeholder), following the values already typed."""
        owner = owner_key(token, request)
        model = self.model_ref(base_model, owner, base=True)
        keep = tuple(gr.update() for _ in AUTO_NUMBERS)
        if model is None:
            return "**Auto settings:** pick a base model from the list.", *keep
        given = {name: _typed(value) for name, value in zip(AUTO_NUMBERS, (epochs, batch_size, image_size, lr))}
        text, placeholders = auto_settings(model, self._data_sizes.get(str(dataset or "")), given)
        if not placeholders:
            return text, *keep
        return text, *(gr.update(placeholder=placeholders[name]) for name in AUTO_NUMBERS)

    def resume_training(self, run_name: Any, token=None, request: gr.Request = None):
        """Continue one of the visitor's stopped, failed or interrupted runs (picked by name from their list)."""
        owner = owner_key(token, request)
        runs = {run.folder.name: run.folder for run in self._owned(owner) if run.record.resumable}
        run_dir = runs.get(str(run_name or ""))
        if run_dir is None:
            gr.Warning("Pick one of your runs that can be resumed.")
            return self._status_line(owner)
        try:
            self.job.resume(run_dir, owner)
        except (JobBusyError, PermissionError, ValueError, OSError) as error:
            gr.Warning(self.public_line(error))
            return self.public_line(error)
        gr.Info(f"Resuming {run_dir.name}.")
        return self._status_line(owner)

    def stop_training(self, token=None, request: gr.Request = None):
        owner = owner_key(token, request)
        if self.job.stop(owner):
            gr.Info("Stopping: the last state will be saved.")
        return self._status_line(owner)

    async def follow_training(self, token=None, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
        """Gradio's progress bar (with the ETA) while the visitor's own job runs; a reloaded page attaches again."""
        owner = owner_key(token, request)
        while True:
            snap, mine = self._view(owner)
            summary = self._status_line(owner, snap, mine)
            if not (mine and snap.running):
                return summary
            if snap.total_steps:
                progress((snap.step, snap.total_steps), desc=summary, unit="steps")
            else:
                progress(0.0, desc=summary)
            await asyncio.sleep(0.5)

    def _owned(self, owner: str | None) -> list[OwnedRun]:
        """`owned_runs` of `owner`, cached until a run starts or ends (the job's runs_version) or runs/ changes."""
        try:
            stamp = (self.job.runs_version, self.paths.runs.stat().st_mtime)
        except OSError:
            stamp = (self.job.runs_version, 0.0)
        cached = self._owned_cache.get(owner)
        if cached is None or cached[0] != stamp:
            cached = (stamp, owned_runs(self.paths.runs, owner))
            self._owned_cache[owner] = cached
            while len(self._owned_cache) > 256:
                self._owned_cache.pop(next(iter(self._owned_cache)))
        return cached[1]

    def _view(self, owner: str | None) -> tuple[JobSnapshot, bool]:
        """(the snapshot this visitor may see, whether it is theirs): their job; else, while another visitor's job
        runs, only that it runs; else their latest run as it was left (also after an app restart)."""
        snap = self.job.snapshot()
        if owner is not None and snap.owner == owner:
            return snap, True
        if snap.running:
            return snap, False
        runs = self._owned(owner)
        latest = snapshot_from_disk(runs[0].folder) if runs else None
        return (latest, True) if latest else (JobSnapshot(version=0, runs_version=0, state="idle"), True)

    def _status_line(self, owner: str | None, snap: JobSnapshot | None = None, mine: bool = True) -> str:
        if snap is None:
            snap, mine = self._view(owner)
        return snap.busy_line() if not mine else self.public(snap.summary())

    def poll(self, seen: dict | None, token=None, request: gr.Request = None):
        """Timer tick: what this visitor may see of the job and their runs, or `gr.skip()` everywhere when nothing
        changed. Another visitor's running job shows only as busy: no log, plots, weights or stop."""
        owner = owner_key(token, request)
        snap, mine = self._view(owner)
        runs = self._owned(owner)
        seen = seen or {}
        signature = repr((owner, mine, snap.version, snap.eta_seconds if not mine else None))
        runs_signature = repr((owner, [(run.folder.name, run.record.state, run.best_ap) for run in runs]))
        if seen.get("view") == signature and seen.get("runs") == runs_signature:
            return (gr.skip(),) * 18
        pickers = (gr.skip(), gr.skip())
        if seen.get("runs") != runs_signature:
            pickers = (gr.update(choices=self.model_choices(owner)), gr.update(choices=self.base_model_choices(owner)))
        resumable = [
            run.folder.name
            for run in runs
            if run.record.resumable and not (mine and snap.running and snap.run_name == run.folder.name)
        ]
        run_controls = (
            runs_frame(runs),
            gr.update(choices=resumable, value=resumable[0] if resumable else None),
            gr.update(interactive=bool(resumable) and not snap.running),
        )
        if not mine:  # someone else's job: that the trainer is busy, and for about how long
            return (
                {"view": signature, "runs": runs_signature}, f"**Job:** {snap.busy_line()}", None, None, "",
                metrics_frame({}), gr.update(value=None, interactive=False), gr.update(interactive=False),
                gr.update(interactive=False), _stop_button(False), *pickers, *run_controls, *_NO_ANALYSIS,
            )  # fmt: skip
        finished = snap.state in ("done", "stopped") and snap.model_dir is not None
        return (
            {"view": signature, "runs": runs_signature},
            self.public(_status_markdown(snap)),
            _plot_update(snap.loss_points, LOSS_SERIES, snap.epochs),
            _plot_update(snap.ap_points, AP_SERIES, snap.epochs),
            self.public("\n".join(snap.log[-LOG_TAIL:])),
            metrics_frame(snap.metrics),
            gr.update(value=self._handout(snap.weights_zip), interactive=bool(snap.weights_zip)),
            gr.update(interactive=finished),
            gr.update(interactive=not snap.running),
            _stop_button(snap.running and snap.state != "stopping"),
            *pickers,
            *run_controls,
            *(self._analysis(Path(snap.run_dir)) if finished and snap.run_dir else _NO_ANALYSIS),
        )

    def _analysis(self, run_dir: Path) -> tuple[pd.DataFrame, str | None, list]:
        """A finished run's per-class AP table, precision-recall plot and validation gallery (`finetune.analysis`),
        its images handed out as copies in Gradio's cache; empty when the run has no analysis."""
        from finetune.analysis import read_analysis

        summary = read_analysis(run_dir)
        if summary is None:
            return _NO_ANALYSIS
        plot = self._handout(str(summary["pr_plot"])) if summary["pr_plot"] else None
        gallery = [(self._handout(str(path)), "left: prediction · right: ground truth") for path in summary["gallery"]]
        return analysis_frame(summary), plot, gallery

    def show_run(self, token=None, request: gr.Request = None, evt: gr.SelectData = None):
        """A row of "Your runs" picked: that run's analysis, when the run is this visitor's; else nothing changes."""
        owner = owner_key(token, request)
        row = getattr(evt, "row_value", None) or []
        picked = next((run.folder for run in self._owned(owner) if row and run.folder.name == row[0]), None)
        if picked is None:
            return gr.skip(), gr.skip(), gr.skip()
        return self._analysis(picked)

    def _handout(self, path: str | None) -> str | None:
        """A copy of the owner's file in Gradio's cache, named by a keyed hash of its content: the only address it
        is served at. runs/ itself is not served, so another visitor cannot fetch a run by guessing its name."""
        if not path:
            return None
        from gradio.processing_utils import save_file_to_cache

        return save_file_to_cache(path, str(self.paths.gradio))

    def use_in_detect(self, token=None, request: gr.Request = None):
        owner = owner_key(token, request)
        snap, mine = self._view(owner)
        if not mine or not snap.model_dir:
            gr.Warning("No fine-tuned model yet.")
            return gr.skip(), gr.skip()
        picked = self.model_key(snap.model_dir, owner)
        return gr.update(choices=self.model_choices(owner), value=picked), gr.Tabs(selected="detect")


def analysis_frame(summary: dict | None) -> pd.DataFrame:
    """The per-class table of a run's analysis: class, validation boxes, AP and AP50 (empty for no boxes)."""
    rows = []
    for row in (summary or {}).get("classes", []):
        aps = [round(float(row[k]), 4) if isinstance(row.get(k), (int, float)) else None for k in ("AP", "AP50")]
        rows.append([str(row.get("class", "")), int(row.get("boxes", 0)), *aps])
    return pd.DataFrame(rows, columns=_ANALYSIS_COLUMNS)


_NO_ANALYSIS = (analysis_frame(None), None, [])


def runs_frame(runs: list[OwnedRun]) -> pd.DataFrame:
    """The visitor's runs, newest first: name, state, best AP, when it ended."""
    rows = []
    for run in runs:
        record = run.record
        ended = time.strftime("%Y-%m-%d %H:%M", time.localtime(record.finished)) if record.finished else ""
        ap = round(run.best_ap, 4) if run.best_ap is not None else None
        state = record.state + (" (resumable)" if record.resumable else "")
        rows.append([run.folder.name, state, ap, ended])
    return pd.DataFrame(rows, columns=_RUN_COLUMNS)


def _status_markdown(snap: JobSnapshot) -> str:
    return f"**Job:** {snap.summary()}"


def _stop_button(active: bool) -> dict:
    # A disabled button keeps its red "stop" look (only slightly faded): grey it, so it does not look clickable.
    return gr.update(interactive=active, variant="stop" if active else "secondary")


def _plot_update(points, series: tuple[str, ...], epochs: int) -> dict | None:
    """A plot's data and x range 0..epochs (a fixed range gets round tick labels that do not overlap).

    None, not an empty frame, when there is nothing yet. The frame holds a row without a value for each of `series`
    not measured yet: Gradio's plots fix their colour domain when they first draw and only swap the data after that,
    so a series first seen later (the epoch-mean loss) would not be drawn until the page is reloaded.
    """
    if not points:
        return None
    rows = list(points) + [(0.0, name, None) for name in series if name not in {p[1] for p in points}]
    frame = pd.DataFrame(rows, columns=_LOSS_COLUMNS).astype({"epoch": float, "value": float})
    return gr.update(value=frame, x_lim=[0, max(1, int(epochs))])


def metrics_frame(metrics: dict[str, float]) -> pd.DataFrame:
    order = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100"]
    keys = [k for k in order if k in metrics] + sorted(k for k in metrics if k.startswith("AP/"))
    return pd.DataFrame([[key, round(float(metrics[key]), 4)] for key in keys], columns=["metric", "value"])
