"""The Gradio UI: a Detect tab and a Fine-tune tab over `lwdetr.Detector` and `finetune`.

`build_demo` lays out the components and wires every event explicitly to a method of `AppContext`
(`lwdetr_app.handlers`). Only `/detect` is a public API endpoint; the UI's own events are private. Events whose
inputs a hostile client could forge take them raw (`preprocess=False`) and the handler checks them, so a bad value
gets the handler's one-line message rather than a component's processing error.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from . import detection, video
from .handlers import (
    AP_SERIES,
    LOG_TAIL,
    LOSS_SERIES,
    AppContext,
    analysis_frame,
    empty_table,
    metrics_frame,
    runs_frame,
)

__all__ = ["AppContext", "build_demo"]

# A webcam frame goes to the server every _WEBCAM_EVERY s; a stream holds a worker for at most _WEBCAM_TIME_LIMIT s
# of processing, so that two visitors streaming cannot keep the CPU from everyone else for long.
_WEBCAM_EVERY = 0.2
_WEBCAM_TIME_LIMIT = 60

_INTRO = (
    "# LW-DETR: light-weight detection transformer\n"
    "Detect objects in an image with a published checkpoint or your own fine-tuned model, "
    "or fine-tune one on your dataset in the second tab."
)


def build_demo(ctx: AppContext) -> gr.Blocks:
    """The two-tab Blocks app over `ctx`."""
    private = {"api_visibility": "private"}
    with gr.Blocks(title="LW-DETR", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        gr.Markdown(_INTRO)
        active_model = gr.State(ctx.default.ref)
        raw_state = gr.State(None)
        seen_state = gr.State(None)
        dataset_state = gr.State(None)
        # The visitor's owner token in the browser's localStorage: their runs survive a reload and an app restart.
        # Gradio encrypts it with `secret`, which it also sends to the page: a fixed one keeps it readable after a
        # restart; the token is what must stay unguessable (`lwdetr_app.runs`).
        owner = gr.BrowserState(None, storage_key="lwdetr-app-owner", secret="lwdetr-app-owner-token")
        with gr.Tabs() as tabs:
            with gr.Tab("Detect", id="detect"):
                detect_ui = _detect_tab(ctx)
            with gr.Tab("Fine-tune", id="finetune"):
                train_ui = _train_tab(ctx)
        timer = gr.Timer(1.0)

        d, t = detect_ui, train_ui
        filters = [d["threshold"], d["max_det"], d["classes"]]
        render_outputs = [d["output"], d["table"], d["count"], d["timing"], d["json"], d["status"]]
        detect_outputs = [raw_state, *render_outputs]
        d["image"].change(
            ctx.detect, [d["image"], active_model, *filters], detect_outputs, preprocess=False,
            api_name="detect_new_image", concurrency_id="inference", concurrency_limit=2, **private,
        )  # fmt: skip
        d["button"].click(
            ctx.detect, [d["image"], active_model, *filters], detect_outputs, preprocess=False,
            api_name="detect_again", concurrency_id="inference", concurrency_limit=2, **private,
        )  # fmt: skip
        for control in filters:
            control.change(
                ctx.refilter, [raw_state, *filters], render_outputs, trigger_mode="always_last", preprocess=False,
                show_progress="hidden", concurrency_limit=None, **private,
            )  # fmt: skip
        d["model"].change(
            ctx.select_model, [d["model"], active_model, d["image"], d["threshold"], d["max_det"], owner],
            [active_model, d["model_status"], d["classes"], *detect_outputs, d["model"]], preprocess=False,
            concurrency_id="inference", concurrency_limit=2, **private,
        )  # fmt: skip
        recent_frames = gr.State([])
        d["webcam"].stream(
            ctx.stream_frame, [d["webcam"], active_model, *filters, recent_frames],
            [d["webcam_output"], d["webcam_status"], recent_frames], preprocess=False, show_progress="hidden",
            stream_every=_WEBCAM_EVERY, time_limit=_WEBCAM_TIME_LIMIT, concurrency_id="webcam", concurrency_limit=2,
            **private,
        )  # fmt: skip
        video_outputs = [d["video_output"], d["video_download"], d["video_json"], d["video_status"]]
        for trigger in (d["video"].upload, d["video_button"].click):
            trigger(
                ctx.annotate_video, [d["video"], active_model, *filters], video_outputs, preprocess=False,
                concurrency_id="video", concurrency_limit=1, **private,
            )  # fmt: skip
        d["api_button"].click(
            ctx.detect_api, [d["image"], d["threshold"]], d["api_json"], preprocess=False, api_name="detect",
            concurrency_id="inference", concurrency_limit=2,
        )  # fmt: skip

        dataset_outputs = [dataset_state, t["report"], t["gallery"]]
        # The auto settings (empty fields) follow the dataset and the base model.
        numbers = [t["epochs"], t["batch_size"], t["image_size"], t["lr"]]
        auto_inputs, auto_outputs = [dataset_state, t["base_model"], *numbers, owner], [t["auto"], *numbers]
        # Then open the gallery on its first image: large, its file name under it (in the grid, over each image).
        t["zip"].upload(ctx.use_zip, t["zip"], dataset_outputs, **private).then(
            _open_first, None, t["gallery"], show_progress="hidden", **private
        ).then(ctx.auto_settings, auto_inputs, auto_outputs, preprocess=False, show_progress="hidden", **private)
        t["synthetic"].click(ctx.use_synthetic, None, dataset_outputs, **private).then(
            _open_first, None, t["gallery"], show_progress="hidden", **private
        ).then(ctx.auto_settings, auto_inputs, auto_outputs, preprocess=False, show_progress="hidden", **private)
        for trigger in (t["base_model"].change, *(number.blur for number in numbers)):
            trigger(ctx.auto_settings, auto_inputs, auto_outputs, preprocess=False, show_progress="hidden", **private)
        settings = [t["base_model"], t["epochs"], t["batch_size"], t["image_size"], t["lr"], t["freeze"]]
        t["start"].click(
            ctx.start_training, [dataset_state, *settings, owner], t["status"], preprocess=False, **private
        ).then(ctx.follow_training, owner, t["progress"], concurrency_limit=None, **private)
        t["resume"].click(ctx.resume_training, [t["resume_pick"], owner], t["status"], **private).then(
            ctx.follow_training, owner, t["progress"], concurrency_limit=None, **private
        )
        t["stop"].click(ctx.stop_training, owner, t["status"], **private)
        poll_outputs = [
            seen_state, t["status"], t["loss_plot"], t["ap_plot"], t["log"], t["metrics"],
            t["weights"], t["use"], t["start"], t["stop"], d["model"], t["base_model"],
            t["runs"], t["resume_pick"], t["resume"], t["class_ap"], t["pr_curves"], t["val_gallery"],
        ]  # fmt: skip
        timer.tick(
            ctx.poll, [seen_state, owner], poll_outputs, show_progress="hidden", concurrency_limit=None, **private
        )
        t["runs"].select(ctx.show_run, owner, [t["class_ap"], t["pr_curves"], t["val_gallery"]], **private)
        t["use"].click(ctx.use_in_detect, owner, [d["model"], tabs], **private)
        demo.load(ctx.identify, owner, [owner, d["model"], t["base_model"]], **private)
        demo.load(ctx.follow_training, owner, t["progress"], concurrency_limit=None, **private)
    return demo


def _open_first() -> dict:
    return gr.update(selected_index=0)


def _model_info(ctx: AppContext, offered: str) -> str:
    """A model picker's hint: what is offered, and whether a typed hub id or folder is accepted (`custom_models`)."""
    return f"{offered}, or a hub id or local model folder" if ctx.settings.custom_models else offered


def _offered(ctx: AppContext, offered: str) -> str:
    """`offered`, or when the hub did not answer at start-up, that published checkpoints need it (only cached ones
    are in the list)."""
    if ctx.default.hub_reachable:
        return offered
    return (
        "The bundled demo model or a run fine-tuned here (published checkpoints need the Hugging Face hub: unreachable)"
    )


def _detect_tab(ctx: AppContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    c["model_status"] = gr.Markdown(ctx.model_status(ctx.default.ref), elem_id="model-status")
    with gr.Row():
        with gr.Column(scale=1):
            c["image"] = gr.Image(
                type="filepath", sources=["upload", "webcam", "clipboard"], label="Image", elem_id="input-image"
            )
            examples = ctx.example_images()
            if examples:  # right under the image: below the table they were out of sight on a laptop screen
                gr.Examples(
                    [[path] for path in examples], inputs=[c["image"]], label="Examples: click one to try it",
                    cache_examples=False, examples_per_page=6,
                )  # fmt: skip
            c["model"] = gr.Dropdown(
                ctx.model_choices(), value=ctx.model_key(ctx.default.ref),
                allow_custom_value=ctx.settings.custom_models, label="Model",
                info=_model_info(ctx, _offered(ctx, "A published checkpoint or a run fine-tuned here")),
                elem_id="model-picker",
            )  # fmt: skip
            c["threshold"] = gr.Slider(
                detection.FLOOR_THRESHOLD, 1.0, value=0.4, step=0.01, label="Score threshold", elem_id="threshold"
            )
            c["max_det"] = gr.Slider(
                1, detection.FLOOR_MAX_DETECTIONS, value=100, step=1, label="Max detections", elem_id="max-detections"
            )
            c["classes"] = gr.Dropdown(
                ctx.class_names(ctx.default.ref), value=[], multiselect=True, label="Classes",
                info="Show only these classes (empty: all)", elem_id="class-filter",
            )  # fmt: skip
            c["button"] = gr.Button("Detect again", elem_id="detect-btn")
        with gr.Column(scale=1):
            c["output"] = gr.Image(
                type="pil", format="png", label="Detections", interactive=False, elem_id="output-image"
            )
            with gr.Row():
                c["count"] = gr.Number(label="Detections", precision=0, interactive=False, elem_id="det-count")
                c["timing"] = gr.Textbox(label="Inference time", interactive=False, elem_id="inference-time")
            c["json"] = gr.DownloadButton(
                "Download JSON (COCO results)", interactive=False, elem_id="download-json", size="md"
            )
            c["status"] = gr.Markdown(elem_id="detect-status")
    c["table"] = gr.Dataframe(
        empty_table(), headers=detection.COLUMNS, label="Boxes (original pixels)", interactive=False,
        elem_id="detections-table", max_height=420,
    )  # fmt: skip
    _stream_and_video_tabs(ctx, c)
    c["api_button"] = gr.Button(visible=False)
    c["api_json"] = gr.JSON(visible=False)
    return c


def _stream_and_video_tabs(ctx: AppContext, c: dict[str, Any]) -> None:
    """Webcam streaming and video upload under the image detector: same model and filters, frame rate shown."""
    limits = ctx.video_limits()
    gr.Markdown(
        "### Webcam and video\nThe model, score threshold, max detections and classes chosen above apply here too.",
        elem_id="stream-video-intro",
    )
    with gr.Tabs():
        with gr.Tab("Webcam", id="webcam"):
            with gr.Row():
                c["webcam"] = gr.Image(
                    sources=["webcam"], streaming=True, label="Webcam: press Record to stream", height=360,
                    elem_id="webcam",
                )  # fmt: skip
                # streaming=True: frames go back as base64 (no file per frame in Gradio's cache)
                c["webcam_output"] = gr.Image(
                    label="Detections", streaming=True, interactive=False, height=360, elem_id="webcam-output"
                )
            c["webcam_status"] = gr.Markdown(
                f"A stream ends after at most {_WEBCAM_TIME_LIMIT} s of detection; press Record again to go on.",
                elem_id="webcam-status",
            )
        with gr.Tab("Video", id="video"):
            with gr.Row():
                with gr.Column():
                    c["video"] = gr.Video(sources=["upload"], label="Video", height=360, elem_id="input-video")
                    c["video_button"] = gr.Button("Annotate the video again", elem_id="annotate-video")
                    gr.Markdown(
                        f"{video.CONTAINERS}, up to {limits.max_seconds:g} s; at most {limits.max_frames} frames are "
                        "annotated (a longer video is sampled). Filters apply when the video is annotated.",
                        elem_id="video-limits",
                    )
                with gr.Column():
                    c["video_output"] = gr.Video(
                        label="Annotated video",
                        interactive=False,
                        buttons=["download"],
                        height=360,
                        elem_id="output-video",
                    )
                    with gr.Row():
                        c["video_download"] = gr.DownloadButton(
                            "Download the annotated video", interactive=False, elem_id="download-video", size="md"
                        )
                        c["video_json"] = gr.DownloadButton(
                            "Download JSON (per frame)", interactive=False, elem_id="download-video-json",
                            size="md",
                        )  # fmt: skip
            c["video_status"] = gr.Markdown(elem_id="video-status")


def _auto_field(label: str, elem_id: str) -> gr.Textbox:
    """A training setting that may stay empty (auto); the handlers check what is typed."""
    return gr.Textbox("", label=label, placeholder="auto", max_lines=1, max_length=24, elem_id=elem_id)


def _train_tab(ctx: AppContext) -> dict[str, Any]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown("### 1 · Dataset\nA zip of a Roboflow COCO export or a plain COCO folder, or the sample.")
            c["zip"] = gr.File(label="Dataset zip", file_types=[".zip"], type="filepath", elem_id="dataset-zip")
            c["synthetic"] = gr.Button("Use the built-in synthetic sample", elem_id="use-synthetic")
            c["report"] = gr.Textbox(
                label="Validation report", lines=10, max_lines=24, interactive=False, elem_id="dataset-report"
            )
            # One large image with its file name under it (not over it, as in the grid) and the others as thumbnails.
            c["gallery"] = gr.Gallery(
                label="Training images with their ground-truth boxes", preview=True, columns=6, height=460,
                object_fit="contain", elem_id="dataset-gallery",
            )  # fmt: skip
        with gr.Column(scale=1):
            gr.Markdown("### 2 · Settings")
            c["base_model"] = gr.Dropdown(
                ctx.base_model_choices(), value=ctx.default_base_model(), allow_custom_value=ctx.settings.custom_models,
                label="Base model",
                info=_model_info(ctx, "A published checkpoint, a preset or an earlier run"), elem_id="base-model",
            )  # fmt: skip
            if ctx.scratch_note():
                gr.Markdown(ctx.scratch_note(), elem_id="scratch-note")
            # Empty means auto (finetune.defaults): the placeholders show the values once a dataset is chosen.
            # Textboxes, not gr.Number: Gradio's number field sends and shows 0 when empty, hiding the placeholder.
            with gr.Row():
                c["epochs"] = _auto_field("Epochs", "epochs")
                c["batch_size"] = _auto_field("Batch size", "batch-size")
            with gr.Row():
                c["image_size"] = _auto_field("Image size", "image-size")
                c["lr"] = _auto_field("Learning rate", "lr")
            base = ctx.default_base_model()
            c["auto"] = gr.Markdown(ctx.auto_settings(None, base, None, None, None, None)[0], elem_id="auto-settings")
            c["freeze"] = gr.Checkbox(False, label="Freeze backbone", elem_id="freeze")
            with gr.Row():
                c["start"] = gr.Button("Start", variant="primary", elem_id="start-training")
                c["stop"] = gr.Button("Stop", variant="secondary", interactive=False, elem_id="stop-training")
    gr.Markdown("### 3 · Training")
    c["status"] = gr.Markdown("**Job:** No training job yet.", elem_id="train-status")
    c["progress"] = gr.Textbox(label="Progress", interactive=False, elem_id="train-progress")
    with gr.Row():
        c["loss_plot"] = gr.LinePlot(
            None, x="epoch", y="value", color="series", title="Training loss", height=260, elem_id="loss-plot",
            color_map=dict(zip(LOSS_SERIES, ("#1f77b4", "#ff7f0e"))),
        )  # fmt: skip
        # Points, not lines: one evaluation per epoch, and a line through a single point (epoch 1) draws nothing.
        c["ap_plot"] = gr.ScatterPlot(
            None, x="epoch", y="value", color="series", title="Validation AP (each epoch)", y_lim=[0, 1], height=260,
            color_map=dict(zip(AP_SERIES, ("#2ca02c", "#1f77b4", "#d62728"))), elem_id="ap-plot",
        )  # fmt: skip
    # Only the newest lines, in a box tall enough for them: Gradio's autoscroll follows the end only once the box
    # has been scrolled there, so a box filled at once (a reload, a tab switch) would show its oldest lines.
    c["log"] = gr.Textbox(
        label="Log (newest lines)", lines=LOG_TAIL, max_lines=2 * LOG_TAIL, autoscroll=True, interactive=False,
        elem_id="train-log",
    )  # fmt: skip
    c["metrics"] = gr.Dataframe(
        metrics_frame({}), headers=["metric", "value"], label="Best metrics", interactive=False, elem_id="metrics"
    )
    # Before the download: what the model learned, on the validation split, with the best checkpoint.
    gr.Markdown("### What the model learned\nThe best checkpoint on the validation split, when a run finishes.")
    with gr.Row():
        c["class_ap"] = gr.Dataframe(
            analysis_frame(None), label="Per-class AP", interactive=False, elem_id="class-ap", max_height=320
        )
        c["pr_curves"] = gr.Image(
            None, type="filepath", label="Precision-recall at IoU 0.5", interactive=False, elem_id="pr-curves"
        )
    c["val_gallery"] = gr.Gallery(
        label="Validation images: predictions (left) beside ground truth (right)", columns=4, height=360,
        object_fit="contain", elem_id="val-gallery",
    )  # fmt: skip
    with gr.Row():
        c["weights"] = gr.DownloadButton(
            "Download weights (HF folder, ONNX, card)", interactive=False, elem_id="download-weights"
        )
        c["use"] = gr.Button("Use in Detect", interactive=False, elem_id="use-in-detect")
    gr.Markdown(
        "### Your runs\nOnly you see your runs, their logs and weights; other visitors see only that the trainer is "
        f"busy. {ctx.storage_note()}",
        elem_id="runs-note",
    )
    c["runs"] = gr.Dataframe(runs_frame([]), label="Your runs", interactive=False, elem_id="your-runs", max_height=240)
    with gr.Row():
        c["resume_pick"] = gr.Dropdown([], label="Run to resume", elem_id="resume-pick", scale=3)
        c["resume"] = gr.Button("Resume", interactive=False, elem_id="resume-training", scale=1)
    return c
