"""LW-DETR demo: detect objects in images, webcam streams and videos, and fine-tune on your own data (Gradio).

    python app.py [--host 127.0.0.1] [--port 7860] [--data-dir ./app_data] [--model HUB_ID_OR_FOLDER]

Serves on http://127.0.0.1:7860 by default (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are honoured; on a Hugging
Face Space, where SPACE_ID is set, it binds 0.0.0.0). Everything it writes (uploads, Gradio's cache, datasets,
runs) goes under the data folder: `--data-dir`, env LWDETR_APP_DATA, default ./app_data, or /data/lwdetr_app on a
Space with persistent storage. `gradio app.py` serves it in reload mode (the model is loaded once).

The default model is the COCO `small` checkpoint when the hub has it (or the local cache does); otherwise the
bundled demo model in examples/demo_model. The UI says which one is active and why.

Other settings (env): LWDETR_APP_MODEL (as --model), LWDETR_APP_DEMO_MODEL (the fallback folder),
LWDETR_APP_EXAMPLES (example images folder), LWDETR_APP_HUB_TIMEOUT (seconds, 30), LWDETR_APP_MAX_UPLOAD ("200mb";
a dataset zip may expand to 20 times that), LWDETR_APP_MAX_ZIP_ENTRIES (20000), LWDETR_APP_DATASETS_BUDGET ("10gb"),
LWDETR_APP_RESULTS_BUDGET ("200mb"), LWDETR_APP_RUNS_BUDGET ("20gb") (oldest evicted past these),
LWDETR_APP_MAX_VIDEO_SECONDS (120: longer uploaded videos are refused), LWDETR_APP_MAX_VIDEO_FRAMES (300 frames
annotated per video; a longer one is sampled),
LWDETR_APP_CUSTOM_MODELS (1: visitors may type any hub id or server folder as a model; off by default, for a public
app), LWDETR_APP_SYNTH_TRAIN / _VAL / _SIZE (the synthetic sample: 48 / 16 images of 256 px).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when Blocks() is built; no telemetry threads

from lwdetr_app.settings import AppSettings, configure_environment, resolve_server  # noqa: E402 - after the env

demo = None  # the app's Blocks once `main` has built it: `gradio app.py` (reload mode) serves this name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host", help="address to bind (default: GRADIO_SERVER_NAME, 0.0.0.0 on a Space, else 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT or 7860)")
    parser.add_argument(
        "--data-dir",
        help="folder for uploads, caches and runs (default: LWDETR_APP_DATA, else /data/lwdetr_app on a Space with "
        "persistent storage, else ./app_data)",
    )
    parser.add_argument("--model", help="default model: hub id or folder (default: COCO small, else the demo model)")
    return parser.parse_args(argv)


def port_is_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound now (as uvicorn binds it: with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def _load_default_model(settings):
    """The default model, loaded once before the first request: (ModelChoice, ModelRegistry)."""
    from lwdetr.cpu import start_background_build
    from lwdetr_app.models import ModelChoice, ModelRegistry, choose_default_model

    start_background_build()  # detections run PyTorch's ops until our CPU kernels are ready; the UI says which run
    default = choose_default_model(settings.demo_model_dir, settings.model, settings.hub_timeout)
    registry = ModelRegistry()
    if default.ref:
        try:
            registry.get(default.ref)
        except Exception as error:  # noqa: BLE001 - the UI says so; the app still serves
            default = ModelChoice(None, f"{default.reason}; but it could not be loaded: {error}")
    print(f"Active model: {default.reason}", flush=True)
    return default, registry


def main(argv: list[str] | None = None) -> None:
    """Build the app into the module-level `demo` and serve it.

    `gradio app.py` (reload mode) runs this file again in the same namespace after each edit, then serves the new
    `demo`; the model loaded by the first run (`_LOADED`, which only the first run defines) is reused, and the
    re-run's `launch` returns at once (the server is already up).
    """
    global demo, _LOADED
    args = parse_args(argv)
    settings = AppSettings.from_env(data_dir=args.data_dir, model=args.model)
    configure_environment(settings.paths, redirect_tempfile=True)  # before gradio builds anything
    host, port = resolve_server(args.host, args.port)
    if "_LOADED" not in globals():  # the first run in this process
        if not port_is_free(host, port):
            sys.exit(f"error: port {port} on {host} is in use; pass a free one with --port (e.g. --port {port + 1})")
        _LOADED = _load_default_model(settings)

    from lwdetr_app.handlers import AppContext
    from lwdetr_app.ui import build_demo

    default, registry = _LOADED
    demo = build_demo(AppContext(settings, default, registry))
    try:
        demo.queue(default_concurrency_limit=1).launch(
            server_name=host,
            server_port=port,
            share=False,
            ssr_mode=False,
            run_history=False,
            show_error=False,  # only gr.Error messages (ours: one line, no server path) reach visitors
            max_file_size=settings.max_upload_bytes,
            # Files served by path: detection JSON (under random ids) and the example images. runs/ is not: a
            # weights zip reaches its owner only as a copy in Gradio's cache (AppContext._handout).
            allowed_paths=[str(settings.paths.results), str(settings.examples_dir)],
        )
    except OSError as error:  # the port was taken between the check and the launch
        if "port" not in str(error).lower():
            raise
        sys.exit(f"error: port {port} on {host} is in use; pass a free one with --port")


if __name__ == "__main__":
    main()
