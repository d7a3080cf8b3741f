"""The Gradio app: its plain functions (filtering, bad uploads, default model, data folder, one job at a time) and
`python app.py` served for real, called through `gradio_client`.

The bundled demo model (examples/demo_model) and example images (examples/images) are used when they exist; until
then a small biased nano model and synthetic images are made in a temporary folder and passed through env.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from finetune.config import TrainConfig
from finetune.result import TrainResult, write_result
from lwdetr.detector import Detector
from lwdetr.postprocess import Detection
from lwdetr_app import detection
from lwdetr_app.models import choose_default_model, list_runs, model_choices
from lwdetr_app.settings import AppSettings, configure_environment, resolve_server

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = REPO / "examples" / "demo_model"
BUNDLED_EXAMPLES = REPO / "examples" / "images"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


# ------------------------------------------------------------------------------------------------ shared fixtures


def make_test_model(folder: Path) -> Path:
    """A random nano model over circle/square/triangle whose class bias makes many boxes score 0.8-0.93."""
    from lwdetr.config import preset_config
    from lwdetr.modeling import LwDetrForObjectDetection
    from lwdetr.processing import LwDetrImageProcessor

    id2label = {0: "circle", 1: "square", 2: "triangle"}
    torch.manual_seed(0)
    config = preset_config("nano", num_labels=3, id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = LwDetrForObjectDetection(config)
    with torch.no_grad():
        model.class_embed.bias.fill_(2.0)
    model.save_pretrained(folder)
    LwDetrImageProcessor(size={"height": 256, "width": 256}).save_pretrained(folder)
    return folder


def bundled_or_test_assets(root: Path) -> tuple[Path, list[Path], dict[str, str]]:
    """(model folder, example images, env overrides): the repo's own when present, else made under `root`."""
    env: dict[str, str] = {}
    model = BUNDLED_MODEL
    if not (BUNDLED_MODEL / "config.json").is_file():
        model = make_test_model(root / "demo_model")
        env["LWDETR_APP_DEMO_MODEL"] = str(model)
    examples = sorted(p for p in BUNDLED_EXAMPLES.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not examples:
        from finetune.synthetic import make_synthetic_dataset

        synthetic = make_synthetic_dataset(root / "synthetic", num_train=3, num_val=1, image_size=256, seed=1)
        folder = root / "examples"
        folder.mkdir()
        for path in sorted((synthetic / "train").glob("*.jpg")):
            shutil.copy(path, folder / path.name)
        examples = sorted(folder.glob("*.jpg"))
        env["LWDETR_APP_EXAMPLES"] = str(folder)
    return model, examples, env


@pytest.fixture(scope="session")
def expected_detector(assets) -> Detector:
    return Detector.from_pretrained(assets[0], device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app_server(workdir: Path, extra_env: dict[str, str], timeout: float = 120.0):
    """`python app.py` on a free port, run from `workdir` with its data folder `workdir/data`; (process, url)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_TEMP_DIR", "LWDETR_APP_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        GRADIO_ANALYTICS_ENABLED="False",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        PYTHONUNBUFFERED="1",
        **extra_env,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir.parent / f"app-{port}.log", "w")  # noqa: SIM115 - closed by the caller via process
    args = [sys.executable, str(REPO / "app.py"), "--port", str(port), "--data-dir", str(workdir / "data")]
    process = subprocess.Popen(args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{Path(log.name).read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/gradio_api/info", timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"app.py did not answer within {timeout} s:\n{Path(log.name).read_text()[-3000:]}")


def stop_app_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --------------------------------------------------------------------------------------------- pure functions

DETECTIONS = [
    Detection(0, "circle", 0.95, (0.0, 0.0, 10.0, 10.0)),
    Detection(1, "square", 0.60, (5.0, 5.0, 25.0, 15.0)),
    Detection(0, "circle", 0.30, (1.0, 2.0, 3.0, 4.0)),
    Detection(2, "triangle", 0.05, (0.0, 0.0, 1.0, 1.0)),
]


def test_filter_detections_by_threshold_max_and_class():
    assert [d.score for d in detection.filter_detections(DETECTIONS, 0.5, 100)] == [0.95, 0.60]
    assert [d.score for d in detection.filter_detections(DETECTIONS, 0.01, 2)] == [0.95, 0.60]
    assert [d.score for d in detection.filter_detections(DETECTIONS, 0.0, 100, ["circle"])] == [0.95, 0.30]
    assert detection.filter_detections(DETECTIONS, 0.99, 100) == []
    assert len(detection.filter_detections(DETECTIONS, 0.01, 100, [])) == 4  # empty filter: every class


def test_table_and_coco_results():
    rows = detection.table_rows(DETECTIONS[1:2])
    assert rows == [["square", 0.6, 5.0, 5.0, 25.0, 15.0]]
    results = detection.coco_results(DETECTIONS[1:2], (100, 100), image_id=42)
    assert results == [{"image_id": 42, "category_id": 1, "bbox": [5.0, 5.0, 20.0, 10.0], "score": 0.6}]
    clipped = detection.coco_results(DETECTIONS[1:2], (12, 20), image_id=42)  # COCO's boxes stay in the image
    assert clipped == [{"image_id": 42, "category_id": 1, "bbox": [5.0, 5.0, 15.0, 7.0], "score": 0.6}]
    assert detection.image_id_from_name("000000039769.jpg") == 39769
    assert detection.image_id_from_name("train_00003.jpg") == 3
    assert detection.image_id_from_name("street.png") == 0


def test_resolve_server(monkeypatch):
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT", "SPACE_ID"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_server(None, None) == ("127.0.0.1", 7860)
    monkeypatch.setenv("SPACE_ID", "someone/lwdetr")
    assert resolve_server(None, None) == ("0.0.0.0", 7860)
    monkeypatch.setenv("GRADIO_SERVER_NAME", "10.0.0.5")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "8000")
    assert resolve_server(None, None) == ("10.0.0.5", 8000)
    assert resolve_server("127.0.0.2", 9000) == ("127.0.0.2", 9000)


def test_settings_from_env_and_gradio_cache_inside_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LWDETR_APP_DATA", str(tmp_path / "appdata"))
    monkeypatch.setenv("LWDETR_APP_SYNTH_TRAIN", "5")
    settings = AppSettings.from_env()
    assert settings.data_dir == (tmp_path / "appdata").resolve() and settings.synthetic_train == 5
    assert AppSettings.from_env(data_dir=tmp_path / "cli").data_dir == (tmp_path / "cli").resolve()  # CLI wins
    for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "MPLCONFIGDIR"):
        monkeypatch.setenv(name, "/elsewhere")
    configure_environment(settings.paths)
    for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE", "MPLCONFIGDIR"):
        assert Path(os.environ[name]).is_relative_to(settings.data_dir)
    assert all((settings.data_dir / sub).is_dir() for sub in ("gradio", "datasets", "runs", "results"))


# ------------------------------------------------------------------------------------------------ default model


def test_default_model_offline_falls_back_to_bundled_demo(tmp_path, assets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    choice = choose_default_model(assets[0], hub_timeout=10)
    assert time.monotonic() - start < 5  # offline is decided fast
    assert choice.ref == str(assets[0].resolve())
    assert choice.reason.startswith("Bundled demo model (") and "the hub is unreachable" in choice.reason
    missing = choose_default_model(tmp_path / "nothing", hub_timeout=10)
    assert missing.ref is None and "missing" in missing.reason
    forced = choose_default_model(tmp_path / "nothing", override="some/model")
    assert forced.ref == "some/model" and "--model" in forced.reason


def test_model_picker_lists_published_checkpoints_runs_and_demo(tmp_path, assets):
    runs = tmp_path / "runs"
    run = runs / "20250101-000000-nano"
    shutil.copytree(assets[0], run / "best")
    write_result(TrainResult(output_dir=run, best_ap=0.5))  # what finetune says the run produced
    # A record of an earlier app, whose settings were the Fine-tune tab's fields ("request"), still reads.
    record = {"name": run.name, "owner": "user:a", "request": {"model": "nano", "epochs": 3}, "state": "done"}
    (run / "app_run.json").write_text(json.dumps(record))
    (runs / "20250102-000000-broken").mkdir()  # no model folder: not offered
    options = model_choices(runs, assets[0], "user:a")
    keys = [option.key for option in options]
    sizes = ("tiny", "small", "medium", "large", "xlarge")
    assert all(f"AnnaZhang/lwdetr_{s}_60e_coco" in keys for s in sizes)
    assert all(f"AnnaZhang/lwdetr_{s}_30e_objects365" in keys for s in sizes)
    assert options[0].ref == str(assets[0].resolve()) and options[0].label.startswith("Bundled demo model")
    assert [r.name for r in list_runs(runs, "user:a")] == ["20250101-000000-nano"]
    assert list_runs(runs, "user:b") == list_runs(runs, None) == []  # a run is listed to its owner only
    run_option = next(option for option in options if option.key == "run:20250101-000000-nano")
    assert run_option.label == "Fine-tuned: 20250101-000000-nano (AP 0.500)"
    assert run_option.ref == str((runs / "20250101-000000-nano/best").resolve())
    # What the browser gets (labels and keys) names no server folder: the paths stay in `ref`.
    shown = " ".join(f"{option.label} {option.key}" for option in options)
    assert str(tmp_path) not in shown and str(assets[0].resolve()) not in shown


def test_pickers_send_no_server_paths_and_load_only_offered_keys(ctx, tmp_path):
    """The pickers' choices and values, as Gradio sends them to every browser, hold no path of the server; a key
    maps back to its model only for the visitor it is offered to."""
    from lwdetr_app.ui import build_demo

    config = build_demo(ctx).get_config_file()
    pickers = [c["props"] for c in config["components"] if c["props"].get("elem_id") in ("model-picker", "base-model")]
    assert len(pickers) == 2 and pickers[0]["value"] == "demo"
    sent = json.dumps(pickers)
    for path in {str(ctx.settings.demo_model_dir.resolve()), str(ctx.paths.root.resolve())}:
        assert path not in sent, path
    assert ctx.model_ref("demo") == str(ctx.settings.demo_model_dir.resolve())
    assert ctx.model_ref("nano") is None and ctx.model_ref("nano", base=True) == "nano"
    for typed in (str(ctx.settings.demo_model_dir.resolve()), "/etc", "run:../..", "someone/else-model"):
        assert ctx.model_ref(typed, base=True) is None, typed


# ------------------------------------------------------------------------------------------------- Detect tab


def test_detect_then_refilter_without_running_the_model(ctx, assets, expected_detector, monkeypatch):
    example = str(assets[1][0])
    expected = expected_detector.predict(example, threshold=detection.FLOOR_THRESHOLD, max_detections=300)
    calls = []
    original = Detector.predict
    monkeypatch.setattr(Detector, "predict", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))

    raw, image, table, count, timing, json_update, status = ctx.detect(example, ctx.default.ref, 0.3, 100, [])
    assert len(calls) == 1 and raw["detections"] and "ms (" in timing and "candidate boxes" in status
    assert len(raw["detections"]) == len(expected)
    assert count == sum(d.score >= 0.3 for d in expected[:100]) == len(table)
    assert isinstance(image, Image.Image) and image.size == Image.open(example).size
    results = json.loads(Path(json_update["value"]).read_text())
    assert len(results) == count and all(set(r) == {"image_id", "category_id", "bbox", "score"} for r in results)

    scores = sorted((d.score for d in raw["detections"]), reverse=True)
    high = scores[min(len(scores) - 1, 5)]  # keeps about six boxes
    _, table_high, count_high, *_ = ctx.refilter(raw, high, 100, [])
    assert count_high == sum(s >= high for s in scores) == len(table_high)
    first_label = raw["detections"][0].label
    _, table_class, count_class, *_ = ctx.refilter(raw, 0.01, 300, [first_label])
    assert count_class == sum(d.label == first_label for d in raw["detections"])
    assert set(table_class["label"]) == {first_label}
    assert len(calls) == 1  # sliders and class filter never ran the model again


def test_large_photo_is_shown_scaled_but_boxes_stay_in_original_pixels(ctx, assets, tmp_path):
    path = tmp_path / "data" / "gradio" / "large.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.open(assets[1][0]).resize((3200, 2400)).save(path)
    raw, image, table, count, *_ = ctx.detect(str(path), ctx.default.ref, 0.01, 300, [])
    assert (raw["width"], raw["height"]) == (3200, 2400) and image.size == (1600, 1200)
    assert count == len(table) > 0
    assert list(table.iloc[0, 2:]) == [round(v, 1) for v in raw["detections"][0].box]  # not scaled


@pytest.mark.parametrize(
    "content, message",
    [
        (b"this is not an image", "not a recognised image"),
        (b"", "empty"),
        ("truncated", "truncated"),
        ("huge", "pixels"),
    ],
)
def test_bad_upload_gives_a_visible_message(ctx, assets, tmp_path, content, message):
    path = tmp_path / "data" / "gradio" / "upload.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    if content == "truncated":
        path.write_bytes(assets[1][0].read_bytes()[:2000])
    elif content == "huge":
        ctx.settings.max_image_pixels = 1_000_000
        Image.new("RGB", (1200, 1000)).save(path)
    else:
        path.write_bytes(content)
    payload = {"path": str(path), "orig_name": "holiday.png", "meta": {"_type": "gradio.FileData"}}
    with warnings.catch_warnings(record=True) as caught:  # gr.Warning outside a request is a Python warning
        warnings.simplefilter("always")
        raw, image, table, count, _, _, status = ctx.detect(payload, ctx.default.ref, 0.5, 100, [])
    assert raw is None and image is None and count == 0 and table.empty
    assert status.startswith("⚠️") and message in status and "holiday.png" in status
    assert str(path) not in status  # the user's file name, not our cache path
    assert any(message in str(w.message) for w in caught)
    with pytest.raises(gr.Error, match=message):
        ctx.detect_api(payload, 0.5)


def test_files_outside_uploads_are_refused(ctx, tmp_path):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (32, 32)).save(outside)
    with pytest.raises(gr.Error, match="not an uploaded file"):
        ctx.detect_api({"path": str(outside), "orig_name": "secret.png"}, 0.5)


def test_switching_to_a_bad_model_keeps_the_previous_one(ctx, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs = ctx.select_model(str(tmp_path / "no-such-model"), ctx.default.ref, None, 0.5, 100)
    assert outputs[0] is not None and outputs[0].get("__type__") == "update"  # gr.skip(): active model unchanged
    assert "Cannot load model" in outputs[1] and "Still using the previous model" in outputs[1]


# ----------------------------------------------------------------------------------------------- Fine-tune tab


def test_synthetic_sample_and_bad_zips(ctx, tmp_path):
    ctx.settings.synthetic_train, ctx.settings.synthetic_val, ctx.settings.synthetic_image_size = 6, 2, 96
    root, report, gallery = ctx.use_synthetic()
    assert Path(root).is_relative_to(ctx.paths.datasets) and "Classes (3)" in report
    assert 1 <= len(gallery) <= 6 and isinstance(gallery[0][0], Image.Image)

    good = tmp_path / "data" / "gradio" / "good.zip"
    good.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(good, "w") as archive:
        for path in Path(root).rglob("*"):
            archive.write(path, f"my-dataset/{path.relative_to(root)}")
    uploaded_root, report, gallery = ctx.use_zip(str(good))
    assert Path(uploaded_root).is_relative_to(ctx.paths.datasets) and "Classes (3)" in report and gallery

    bad_cases = {
        "not-a-zip.zip": b"definitely not a zip",
        "escape.zip": {"../evil.txt": "x"},
        "no-annotations.zip": {"train/readme.txt": "nothing here"},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, content in bad_cases.items():
            path = good.parent / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                with zipfile.ZipFile(path, "w") as archive:
                    for entry, text in content.items():
                        archive.writestr(entry, text)
            dataset, report, gallery = ctx.use_zip(str(path))
            assert dataset is None and gallery == [] and report.startswith("This dataset cannot be used"), name
    assert not (tmp_path / "evil.txt").exists() and not (ctx.paths.root / "evil.txt").exists()


FAKE_TRAINER = Path(__file__).resolve().parent / "fake_trainer.py"
ALICE = SimpleNamespace(username=None, session_hash="alice-session")
BOB = SimpleNamespace(username=None, session_hash="bob-session")


def fake_command(model_dir: Path, mode: str = "ok", launched: list | None = None):
    """A `train_command` running tests/fake_trainer.py instead of finetune (the commands it builds go to `launched`)."""

    def command(config, gpus):
        argv = [sys.executable, str(FAKE_TRAINER), config.output, str(model_dir), mode]
        argv += ["--resume"] if config.resume else []
        if launched is not None:
            launched.append(argv)
        return argv

    return command


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_one_job_at_a_time_owned_by_the_visitor_who_started_it(ctx, assets, tmp_path):
    ctx.job.command = fake_command(assets[0])
    dataset = ctx.paths.datasets / "upload-0123"  # start_training takes only datasets made by the app
    dataset.mkdir()
    message = ctx.start_training(str(dataset), "nano", 1, 2, 256, 1e-4, False, None, ALICE)
    run_dir = Path(ctx.job.snapshot().run_dir)
    wait_for(lambda: ctx.job.snapshot().state == "running")
    assert isinstance(ctx.detect_api(str(assets[1][0]), 0.5), list)  # detection keeps working meanwhile
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        message = ctx.start_training(str(dataset), "nano", 1, 2, 256, 1e-4, False, None, BOB)
    assert "busy" in message and any("busy" in str(w.message) for w in caught)
    assert not ctx.job.stop(None) and not ctx.stop_training(None, BOB).startswith("Stopping")
    assert ctx.job.snapshot().state == "running"  # Bob cannot stop Alice's job

    # Alice (any page of hers) sees everything; an unchanged page gets gr.skip() everywhere.
    first = ctx.poll(None, None, ALICE)
    assert "Training" in first[1] and run_dir.name in first[1] and run_dir.name in first[4]
    assert all(item == gr.skip() for item in ctx.poll(first[0], None, ALICE))
    # Bob sees that the trainer is busy and for how long, nothing of the run itself.
    seen_by_bob = ctx.poll(None, None, BOB)
    assert "busy" in seen_by_bob[1] and run_dir.name not in repr(seen_by_bob)
    assert seen_by_bob[4] == "" and seen_by_bob[6]["interactive"] is False and seen_by_bob[9]["interactive"] is False

    (run_dir / "release").touch()
    assert ctx.job.wait(30)
    snap = ctx.job.snapshot()
    assert snap.state == "done" and snap.metrics["AP"] == 0.5 and Path(snap.weights_zip).is_file()
    assert [p[2] for p in snap.loss_points if p[1] == "loss (step)"] == [9.0, 8.0, 7.0, 6.0]
    assert ("AP", 0.5) in [(p[1], p[2]) for p in snap.ap_points]
    outputs = ctx.poll(first[0], None, ALICE)
    assert "Finished" in outputs[1] and list(outputs[5]["metric"])[:3] == ["AP", "AP50", "AP75"]
    handed_out = Path(outputs[6]["value"])
    assert handed_out.is_relative_to(ctx.paths.gradio)  # a copy in Gradio's cache: runs/ is not served
    assert handed_out.read_bytes() == Path(snap.weights_zip).read_bytes()
    assert outputs[7]["interactive"] is True and list(outputs[12]["run"]) == [run_dir.name]

    # Finished runs are listed to their owner only: Bob's pickers and run list stay without it.
    bob_after = ctx.poll(None, None, BOB)
    assert "No training job yet" in bob_after[1] and bob_after[12].empty and bob_after[6]["value"] is None
    assert not any(run_dir.name in label for label, _ in bob_after[10]["choices"])
    assert any(run_dir.name in label for label, _ in outputs[10]["choices"])
    assert ctx.use_in_detect(None, BOB) == (gr.skip(), gr.skip())
    run_key = f"run:{run_dir.name}"
    assert ctx.model_ref(run_key, owner="session:x") is None  # another visitor cannot load it by its key
    assert Path(ctx.model_ref(run_key, owner=snap.owner)) == Path(snap.model_dir).resolve()

    extracted = tmp_path / "weights"
    zipfile.ZipFile(snap.weights_zip).extractall(extracted)
    folder = next(p.parent for p in extracted.rglob("config.json"))
    assert folder.name == run_dir.name and Detector.from_pretrained(folder, device="cpu").id2label
    model_update, tabs = ctx.use_in_detect(None, ALICE)
    assert model_update["value"] == run_key and any(v == run_key for _, v in model_update["choices"])


def test_stop_saves_the_last_state(ctx, assets, tmp_path):
    ctx.job.command = fake_command(assets[0])
    ctx.job.start(TrainConfig(data=str(tmp_path), model="nano"), ctx.paths.runs, "user:alice")
    wait_for(lambda: ctx.job.snapshot().state == "running")
    assert not ctx.job.stop("user:bob")
    assert ctx.job.stop("user:alice") and ctx.job.wait(30)
    snap = ctx.job.snapshot()
    assert snap.state == "stopped" and snap.model_dir.endswith("last") and Path(snap.weights_zip).is_file()
    assert snap.resumable and not ctx.job.stop("user:alice")  # nothing to stop any more
    assert any(run.model_dir.name == "last" for run in list_runs(ctx.paths.runs, "user:alice"))
    assert list_runs(ctx.paths.runs, "user:bob") == []


def test_a_finished_run_shows_finetunes_result_the_best_epoch_not_the_last(ctx, assets, tmp_path):
    """Epoch 1 scores AP 0.5 (best/), epoch 2 only 0.3: the run offers best/, so it shows epoch 1's metrics, as
    finetune's result.json says (the last evaluation event says 0.3)."""
    ctx.job.command = fake_command(assets[0], "worse")
    name = ctx.job.start(TrainConfig(data=str(tmp_path), model="nano"), ctx.paths.runs, "user:alice")
    (ctx.paths.runs / name / "release").touch()
    assert ctx.job.wait(30)
    snap = ctx.job.snapshot()
    assert snap.state == "done" and snap.model_dir.endswith("best")
    assert snap.metrics["AP"] == 0.5 and snap.metrics["AP/circle"] == 0.6 and "best AP 0.500" in snap.summary()
    assert [run.ap for run in list_runs(ctx.paths.runs, "user:alice")] == [0.5]
    outputs = ctx.poll(None, None, SimpleNamespace(username="alice", session_hash="s"))
    assert list(outputs[12]["best AP"]) == [0.5]


def test_a_resumed_run_that_fails_at_once_is_a_failure_not_its_earlier_stop(ctx, assets, tmp_path):
    ctx.job.command = fake_command(assets[0])
    name = ctx.job.start(TrainConfig(data=str(tmp_path), model="nano"), ctx.paths.runs, "user:alice")
    wait_for(lambda: ctx.job.snapshot().state == "running")
    assert ctx.job.stop("user:alice") and ctx.job.wait(30) and ctx.job.snapshot().state == "stopped"
    ctx.job.command = fake_command(assets[0], "fail")  # e.g. its dataset is gone: an error before the first event
    ctx.job.resume(ctx.paths.runs / name, "user:alice")
    assert ctx.job.wait(30)
    snap = ctx.job.snapshot()
    assert snap.state == "failed" and "does not fit" in snap.summary()


def test_a_failing_run_is_reported_and_the_next_one_can_start(ctx, assets, tmp_path):
    ctx.job.command = fake_command(assets[0], "fail")
    ctx.job.start(TrainConfig(data=str(tmp_path), model="nano"), ctx.paths.runs, "user:alice")
    assert ctx.job.wait(30)
    snap = ctx.job.snapshot()
    assert snap.state == "failed" and "does not fit" in snap.summary()
    outputs = ctx.poll(None, None, SimpleNamespace(username="alice", session_hash="s"))
    assert "does not fit" in outputs[1] and str(tmp_path) not in outputs[1] + outputs[4]  # no server path shown
    ctx.job.command = fake_command(assets[0])
    ctx.job.start(TrainConfig(data=str(tmp_path), model="nano"), ctx.paths.runs, "user:alice")  # not busy any more
    assert ctx.job.stop("user:alice") and ctx.job.wait(30)


# ------------------------------------------------------------------------------------- the app, served for real


@pytest.fixture(scope="module")
def served_app(tmp_path_factory, assets):
    workdir = tmp_path_factory.mktemp("served") / "cwd"
    process, url = start_app_server(workdir, assets[2])
    yield SimpleNamespace(url=url, workdir=workdir, data=workdir / "data")
    stop_app_server(process)


def test_gradio_client_detect_returns_the_bundled_models_detections(served_app, assets, expected_detector):
    from gradio_client import Client, handle_file

    threshold = 0.3

    def expected_for(image: Path) -> list:
        found = expected_detector.predict(str(image), threshold=detection.FLOOR_THRESHOLD, max_detections=300)
        return [d for d in found if d.score >= threshold][:100]

    example = next((image for image in assets[1] if expected_for(image)), None)
    assert example is not None, "the bundled model should find something in a shipped example"
    expected = expected_for(example)
    client = Client(served_app.url, verbose=False, analytics_enabled=False)
    detections = client.predict(handle_file(str(example)), threshold, api_name="/detect")
    assert [d["label"] for d in detections] == [d.label for d in expected]
    for got, want in zip(detections, expected):
        assert set(got) == {"label", "label_id", "score", "box"} and got["label_id"] == want.label_id
        assert got["score"] == pytest.approx(want.score, abs=1e-4)
        assert np.allclose(got["box"], want.box, atol=0.05)

    bad = served_app.workdir.parent / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(Exception, match="Cannot read this image"):
        client.predict(handle_file(str(bad)), 0.5, api_name="/detect")
    strict = max(d["score"] for d in detections) - 1e-3
    # The app keeps serving after the bad upload.
    assert client.predict(handle_file(str(example)), strict, api_name="/detect") == [
        d for d in detections if d["score"] >= strict
    ]


def test_served_app_writes_only_inside_its_data_folder(served_app, assets):
    from gradio_client import Client, handle_file

    client = Client(served_app.url, verbose=False, analytics_enabled=False)
    upload = served_app.workdir.parent / "confinement-check.png"
    Image.open(assets[1][0]).save(upload)
    client.predict(handle_file(str(upload)), 0.5, api_name="/detect")
    info = client.view_api(print_info=False, return_format="dict")
    assert list(info["named_endpoints"]) == ["/detect"]  # the UI's own events are private
    assert sorted(p.name for p in served_app.workdir.iterdir()) == ["data"]  # nothing else in the working folder
    uploads = [p.name for p in (served_app.data / "gradio").rglob("*") if p.is_file()]
    assert "confinement-check.png" in uploads  # Gradio's uploads land inside the data folder
