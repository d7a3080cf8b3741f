"""The app's handlers: `AppContext` holds what all sessions share (settings, default model, loaded models, the
training job) and has one method per UI event. Each is a plain function of its inputs (no browser needed to test
it); `lwdetr_app.ui` lays out the components and wires the events to these methods.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
from PIL import Image

from lwdetr.config import PRESETS
from lwdetr.images import ImageLoadError, load_image

from . import detection
from .datasets import inspect_dataset, prepare_synthetic, prepare_zip
from .models import PUBLISHED_MODELS, ModelChoice, ModelRegistry, display_path, model_choices
from .settings import AppSettings
from .training import JOB, JobBusyError, JobSnapshot, TrainingJob, TrainRequest

__all__ = ["AppContext", "empty_table", "metrics_frame"]

_DISPLAY_MAX_SIDE = 1600  # the drawn image is shown at most this large; the table keeps original pixels
_LOSS_COLUMNS = ["epoch", "series", "value"]
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


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

    # ------------------------------------------------------------------ shared helpers
    def model_choices(self) -> list[tuple[str, str]]:
        choices = model_choices(self.paths.runs, self.settings.demo_model_dir)
        if self.default.ref and self.default.ref not in [value for _, value in choices]:
            choices.insert(0, (self.default.ref, self.default.ref))
        return choices

    def base_model_choices(self) -> list[tuple[str, str]]:
        presets = [(f"Preset {name} (random init)", name) for name in PRESETS]
        return self.model_choices() + presets

    def default_base_model(self) -> str:
        if self.default.ref in PUBLISHED_MODELS:
            return "AnnaZhang/lwdetr_tiny_60e_coco"  # the smallest pretrained checkpoint: CPU friendly
        return self.default.ref or "nano"

    def example_images(self, limit: int = 6) -> list[str]:
        folder = self.settings.examples_dir
        if not folder.is_dir():
            return []
        return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in _IMAGE_SUFFIXES][:limit]

    def _allowed_roots(self) -> list[Path]:
        from gradio.utils import get_upload_folder

        roots = [Path(get_upload_folder()), self.paths.root, self.settings.examples_dir]
        return [Path(root).resolve() for root in roots]

    def load_payload(self, payload: Any) -> tuple[Image.Image, str, str]:
        """(RGB image, server path, original name) from an Image component's raw payload; `ImageLoadError` if bad."""
        if isinstance(payload, dict):
            url, path = payload.get("url") or "", payload.get("path")
            name = payload.get("orig_name") or (Path(path).name if path else "image")
            if not path and url.startswith("data:"):
                path = self._save_data_url(url)
        else:
            path = str(payload) if payload else None
            name = Path(path).name if path else "image"
        if not path:
            raise ImageLoadError("no image received")
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(root) for root in self._allowed_roots()):
            raise ImageLoadError(f"{name}: not an uploaded file")
        try:
            image = load_image(resolved, max_pixels=self.settings.max_image_pixels)
        except ImageLoadError as error:  # name the file as the user knows it, not by its cache path
            raise ImageLoadError(str(error).replace(str(resolved), name, 1)) from None
        return image, str(resolved), name

    def _save_data_url(self, url: str) -> str:
        try:
            data = base64.b64decode(url.split(",", 1)[1], validate=False)
        except (IndexError, binascii.Error):
            raise ImageLoadError("pasted image: malformed data URL") from None
        folder = self.paths.gradio / "pasted"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"pasted-{abs(hash(data)) % 10**12}.bin"
        path.write_bytes(data)
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
            image = image.resize((round(image.width * scale), round(image.height * scale)))
        with self._images_lock:
            self._images[path] = (image, scale)
            while len(self._images) > 16:
                self._images.popitem(last=False)
        return image, scale

    def model_label(self, ref: str | None) -> str:
        for label, value in self.model_choices():
            if value == ref:
                return label
        return display_path(Path(ref)) if ref and Path(ref).is_dir() else str(ref)

    def model_status(self, ref: str | None, reason: str | None = None) -> str:
        if ref is None:
            return f"**Active model:** none. {self.default.reason}"
        if reason is None:
            reason = (
                self.default.reason if ref == self.default.ref else f"{self.model_label(ref)}: chosen in the picker"
            )
        return f"**Active model:** {reason}"

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
            "model": model_ref,
            "width": image.width,
            "height": image.height,
            "seconds": seconds,
            "detections": found,
        }

    def render(
        self, raw: dict | None, threshold: float, max_detections: float, classes: list[str] | None, session: str
    ):
        """(drawn image, table, count, inference time, JSON file) for the detections passing the filters."""
        if not raw:
            return None, empty_table(), 0, "", gr.update(value=None, interactive=False)
        kept = detection.filter_detections(raw["detections"], float(threshold), int(max_detections), classes)
        image, scale = self._display_image(raw["image_path"])
        shown = [{**d, "box": [v * scale for v in d["box"]]} for d in kept] if scale < 1.0 else kept
        table = pd.DataFrame(detection.table_rows(kept), columns=detection.COLUMNS)
        results = detection.coco_results(kept, detection.image_id_from_name(raw["name"]))
        folder = self.paths.results / (session or "local")
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / f"{Path(raw['name']).stem or 'image'}_detections.json"
        json_path.write_text(json.dumps(results, indent=1), encoding="utf-8")
        timing = f"{raw['seconds'] * 1000:.0f} ms"
        return detection.draw(image, shown), table, len(kept), timing, gr.update(value=str(json_path), interactive=True)

    def detect(self, payload, model_ref, threshold, max_detections, classes, request: gr.Request | None = None):
        """New image: run the model, then filter. Outputs: raw state, then the `render` outputs, then a status."""
        session = getattr(request, "session_hash", None) or "local"
        if payload is None:
            return None, *self.render(None, threshold, max_detections, classes, session), ""
        try:
            raw = self.run(payload, model_ref)
        except ImageLoadError as error:
            gr.Warning(f"Cannot read this image: {error}")
            return None, *self.render(None, threshold, max_detections, classes, session), f"⚠️ {error}"
        except Exception as error:  # noqa: BLE001 - model folder or hub problems: say so, keep serving
            message = f"Cannot run model {model_ref}: {error}"
            gr.Warning(message)
            return None, *self.render(None, threshold, max_detections, classes, session), f"⚠️ {message}"
        outputs = self.render(raw, threshold, max_detections, classes, session)
        return raw, *outputs, f"{len(raw['detections'])} candidate boxes from {raw['name']}; filters apply instantly."

    def refilter(self, raw, threshold, max_detections, classes, request: gr.Request | None = None):
        session = getattr(request, "session_hash", None) or "local"
        return self.render(raw, threshold, max_detections, classes, session)

    def select_model(
        self, model_ref, active_ref, payload, threshold, max_detections, request: gr.Request | None = None
    ):
        """A model picked (or typed): load it, reset the class filter, re-run on the current image."""
        model_ref = (model_ref or "").strip()
        if not model_ref or model_ref == active_ref:
            return (gr.skip(),) * 10
        try:
            self.registry.get(model_ref)
        except Exception as error:  # noqa: BLE001 - any load failure keeps the previous model
            message = f"Cannot load model {model_ref}: {error}"
            gr.Warning(message)
            status = self.model_status(active_ref) + f"\n\n⚠️ {message} Still using the previous model."
            return (gr.skip(), status, *(gr.skip(),) * 8)
        classes = gr.update(choices=self.class_names(model_ref), value=[])
        outputs = self.detect(payload, model_ref, threshold, max_detections, [], request)
        return (model_ref, self.model_status(model_ref), classes, *outputs)

    def detect_api(self, image: Any, threshold: float = 0.4) -> list[dict[str, Any]]:
        """`/detect`: the default model's detections scoring at least `threshold` (at most 100), best first.

        Each detection is `{"label", "label_id", "score", "box": [x0, y0, x1, y1]}` in pixels of the image.
        """
        try:
            raw = self.run(image, self.default.ref)
        except ImageLoadError as error:
            raise gr.Error(f"Cannot read this image: {error}") from None
        except gr.Error:
            raise
        except Exception as error:  # noqa: BLE001 - e.g. the model folder went missing
            raise gr.Error(f"Cannot run model {self.default.ref}: {error}") from None
        return detection.filter_detections(raw["detections"], float(threshold), 100)

    # ------------------------------------------------------------------ Fine-tune tab: data
    def _dataset_outputs(self, root_getter) -> tuple[Any, str, list]:
        from finetune.errors import DataError

        try:
            root = root_getter()
        except DataError as error:
            gr.Warning(str(error))
            return None, f"This dataset cannot be used: {error}", []
        preview = inspect_dataset(root, work_dir=self.paths.datasets)
        if not preview.ok:
            gr.Warning(preview.report)
            return None, preview.report, []
        return str(preview.root), preview.report, preview.images

    def use_zip(self, file: Any):
        if not file:
            return None, "", []
        path = file if isinstance(file, str) else getattr(file, "name", None) or file.get("path")
        return self._dataset_outputs(lambda: prepare_zip(path, self.paths.datasets))

    def use_synthetic(self):
        s = self.settings
        return self._dataset_outputs(
            lambda: prepare_synthetic(self.paths.datasets, s.synthetic_train, s.synthetic_val, s.synthetic_image_size)
        )

    # ------------------------------------------------------------------ Fine-tune tab: the job
    def start_training(self, dataset, base_model, epochs, batch_size, image_size, lr, freeze):
        if not dataset:
            gr.Warning("Choose a dataset first: upload a zip or use the synthetic sample.")
            return self.job.snapshot().summary()
        request = TrainRequest(
            data=str(dataset),
            model=str(base_model or "nano").strip(),
            epochs=int(epochs),
            batch_size=int(batch_size),
            image_size=int(image_size),
            lr=float(lr),
            freeze_backbone=bool(freeze),
        )
        try:
            name = self.job.start(request, self.paths.runs)
        except JobBusyError as error:
            gr.Warning(str(error))
            return str(error)
        gr.Info(f"Training {name} started.")
        return self.job.snapshot().summary()

    def stop_training(self):
        if self.job.stop():
            gr.Info("Stopping: the last state will be saved.")
        return self.job.snapshot().summary()

    async def follow_training(self, progress=gr.Progress()):  # noqa: B008 - how Gradio injects its tracker
        """Shows Gradio's progress bar (with the ETA) while a job runs; any page may attach to the running job."""
        while True:
            snap = self.job.snapshot()
            if not snap.running:
                return snap.summary()
            if snap.total_steps:
                progress((snap.step, snap.total_steps), desc=snap.summary(), unit="steps")
            else:
                progress(0.0, desc=snap.summary())
            await asyncio.sleep(0.5)

    def poll(self, seen: dict | None):
        """Timer tick: everything about the job, or `gr.skip()` for all outputs when nothing changed."""
        snap = self.job.snapshot()
        seen = seen or {}
        if seen.get("version") == snap.version and seen.get("runs") == snap.runs_version:
            return (gr.skip(),) * 12
        new_seen = {"version": snap.version, "runs": snap.runs_version}
        finished = snap.state in ("done", "stopped") and snap.model_dir is not None
        pickers = (gr.skip(), gr.skip())
        if seen.get("runs") != snap.runs_version:
            pickers = (gr.update(choices=self.model_choices()), gr.update(choices=self.base_model_choices()))
        return (
            new_seen,
            _status_markdown(snap),
            _plot_frame(snap.loss_points),
            _plot_frame(snap.ap_points),
            "\n".join(snap.log),
            metrics_frame(snap.metrics),
            gr.update(value=snap.weights_zip, interactive=bool(snap.weights_zip)),
            gr.update(interactive=finished),
            gr.update(interactive=not snap.running),
            gr.update(interactive=snap.running),
            *pickers,
        )

    def use_in_detect(self):
        snap = self.job.snapshot()
        if not snap.model_dir:
            gr.Warning("No fine-tuned model yet.")
            return gr.skip(), gr.skip()
        return gr.update(choices=self.model_choices(), value=snap.model_dir), gr.Tabs(selected="detect")


def _status_markdown(snap: JobSnapshot) -> str:
    return f"**Job:** {snap.summary()}"


def _plot_frame(points) -> pd.DataFrame | None:
    # None, not an empty frame, when there is nothing yet: a LinePlot that starts from an empty frame keeps an
    # empty colour domain and never draws the series that arrive later.
    if not points:
        return None
    return pd.DataFrame(list(points), columns=_LOSS_COLUMNS).astype({"epoch": float, "value": float})


def metrics_frame(metrics: dict[str, float]) -> pd.DataFrame:
    order = ["AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large", "AR1", "AR10", "AR100"]
    keys = [k for k in order if k in metrics] + sorted(k for k in metrics if k.startswith("AP/"))
    return pd.DataFrame([[key, round(float(metrics[key]), 4)] for key in keys], columns=["metric", "value"])
