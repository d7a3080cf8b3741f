"""After a run: per-class AP, precision-recall curves and a validation gallery (`finetune.analysis`), the download
bundle (HF folder, model.onnx, model card) and the app showing them to the run's owner only."""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image

from finetune.analysis import analyse_run, class_analysis, read_analysis, write_analysis
from finetune.config import TrainConfig
from finetune.data import load_detection_data
from finetune.synthetic import make_synthetic_dataset
from finetune.train import train
from lwdetr_app.handlers import AppContext
from lwdetr_app.models import ModelChoice, ModelRegistry
from lwdetr_app.runs import owner_key
from lwdetr_app.settings import AppSettings
from lwdetr_app.training import TrainingJob, zip_model_folder

CLASSES = ("circle", "square", "triangle")
ALICE = SimpleNamespace(username=None, session_hash="alice-session")
BOB = SimpleNamespace(username=None, session_hash="bob-session")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A one-epoch nano run on 8 synthetic training images (4 validation), 128 px."""
    root = tmp_path_factory.mktemp("analysis")
    data = make_synthetic_dataset(root / "shapes", num_train=8, num_val=4, image_size=128, classes=CLASSES, seed=1)
    config = TrainConfig(data=str(data), model="nano", epochs=1, batch_size=4, image_size=128, output=str(root / "run"))
    result = train(config)
    assert result.best_dir is not None
    return root / "run"


def test_a_finished_run_writes_per_class_ap_curves_gallery_and_onnx(finished_run):
    summary = read_analysis(finished_run)
    assert summary is not None and summary["images"] == 4
    assert [row["class"] for row in summary["classes"]] == list(CLASSES)
    for row in summary["classes"]:
        assert 0.0 <= row["AP"] <= 1.0 and 0.0 <= row["AP50"] <= 1.0 and row["boxes"] > 0
        assert len(summary["precision"][row["class"]]) == len(summary["recall"]) == 101
    assert Image.open(summary["pr_plot"]).size[0] > 100
    assert len(summary["gallery"]) == 4  # every validation image has boxes; at most 8 are shown
    picture = Image.open(summary["gallery"][0])
    assert picture.width > 2 * picture.height  # prediction and ground truth side by side
    assert (finished_run / "model.onnx").stat().st_size > 10_000
    assert not list((finished_run).glob(".analysis.*")) and not list(finished_run.glob(".model.onnx*"))


def test_analysis_on_demand_for_a_finished_run_replaces_the_folder(finished_run):
    (finished_run / "analysis" / "stale.txt").write_text("from an earlier analysis")
    folder = analyse_run(finished_run, onnx=False)
    assert folder == finished_run / "analysis" and not (folder / "stale.txt").exists()
    assert [row["class"] for row in read_analysis(finished_run)["classes"]] == list(CLASSES)


def test_without_onnx_the_run_folder_says_why(finished_run, tmp_path, monkeypatch):
    import lwdetr.onnx_export as onnx_export
    from finetune.analysis import main, write_onnx

    def missing(*args, **kwargs):
        raise onnx_export.OnnxMissingError(onnx_export.ONNX_MISSING)

    monkeypatch.setattr(onnx_export, "export_onnx", missing)
    written = write_onnx(object(), 128, tmp_path)
    assert written.name == "ONNX_MISSING.txt" and "pip install onnx" in written.read_text()
    assert not (tmp_path / "model.onnx").exists() and not list(tmp_path.glob(".model.onnx*"))
    with pytest.raises(SystemExit, match="^error: run empty has no saved model"):
        main([str(tmp_path / "empty")])


def test_perfect_predictions_score_one_for_every_class(tmp_path):
    data = make_synthetic_dataset(tmp_path / "shapes", num_train=2, num_val=6, image_size=64, classes=CLASSES, seed=3)
    split = load_detection_data(str(data)).val
    truth = split.to_coco_gt()
    perfect = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
        for a in truth["annotations"]
    ]
    summary = class_analysis(truth, perfect, {**split.id2label, 7: "unseen"})
    rows = {row["class"]: row for row in summary["classes"]}
    for name in CLASSES:
        assert rows[name]["AP"] == pytest.approx(1.0) and rows[name]["AP50"] == pytest.approx(1.0)
        assert min(summary["precision"][name]) == pytest.approx(1.0)
    assert rows["unseen"]["AP"] is None and "unseen" not in summary["precision"]
    nothing = class_analysis(truth, [], split.id2label)
    assert all(row["AP"] == 0.0 for row in nothing["classes"])

    write_analysis(tmp_path / "run", split, perfect, gallery_size=2)
    assert len(read_analysis(tmp_path / "run")["gallery"]) == 2


def test_the_download_zip_holds_the_hf_folder_onnx_and_card(finished_run, tmp_path):
    bundle = zip_model_folder(finished_run / "best", tmp_path / "w.zip", "my-run", finished_run)
    names = set(zipfile.ZipFile(bundle).namelist())
    assert {f"my-run/{n}" for n in ("config.json", "model.safetensors", "model.onnx", "README.md")} <= names
    # A run without an export (stopped early, or no onnx package): the bundle says why instead.
    bare = tmp_path / "bare"
    shutil.copytree(finished_run / "best", bare / "best")
    names = set(zipfile.ZipFile(zip_model_folder(bare / "best", tmp_path / "b.zip", "b", bare)).namelist())
    assert "b/ONNX_MISSING.txt" in names and "b/model.onnx" not in names


_COPY_RUN = """
import json, shutil, sys, time
from pathlib import Path
run, done = Path(sys.argv[1]), Path(sys.argv[2])
for name in ("best", "analysis"):
    shutil.copytree(done / name, run / name)
shutil.copy(done / "model.onnx", run / "model.onnx")
with open(run / "events.jsonl", "a") as log:
    for kind in ("start", "epoch", "done"):
        record = {"kind": kind, "step": 2, "total_steps": 2, "epoch": 1, "epochs": 1, "metrics": {"AP": 0.1},
                  "message": kind, "eta_seconds": None, "time": time.time()}
        log.write(json.dumps(record) + "\\n")
"""


def test_the_app_shows_the_analysis_to_the_runs_owner_only(finished_run, tmp_path, assets, monkeypatch):
    model, examples, _ = assets
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "data" / "gradio"))
    settings = AppSettings(data_dir=tmp_path / "data", demo_model_dir=model, examples_dir=examples[0].parent)
    job = TrainingJob(gpus=0, command=lambda config, gpus: [sys.executable, "-c", _COPY_RUN, config.output,
                                                             str(finished_run)])  # fmt: skip
    ctx = AppContext(settings, ModelChoice(str(model), "demo"), ModelRegistry(device="cpu"), job)
    ctx.job.start(TrainConfig(data=str(tmp_path), model="nano"), ctx.paths.runs, owner_key(None, ALICE))
    assert ctx.job.wait(60)
    snap = ctx.job.snapshot()
    assert snap.state == "done"
    assert f"{snap.run_name}/model.onnx" in zipfile.ZipFile(snap.weights_zip).namelist()

    outputs = ctx.poll(None, None, ALICE)
    table, plot, gallery = outputs[15:18]
    assert list(table["class"]) == list(CLASSES) and table["AP"].notna().all()
    assert Path(plot).is_relative_to(ctx.paths.gradio)  # copies in Gradio's cache: runs/ is not served
    assert len(gallery) == 4 and all(Path(path).is_relative_to(ctx.paths.gradio) for path, _ in gallery)
    picked = ctx.show_run(None, ALICE, SimpleNamespace(row_value=[snap.run_name, "done", 0.1, ""]))
    assert list(picked[0]["class"]) == list(CLASSES)

    table, plot, gallery = ctx.poll(None, None, BOB)[15:18]
    assert table.empty and plot is None and gallery == []
    assert ctx.show_run(None, BOB, SimpleNamespace(row_value=[snap.run_name])) == (gr.skip(),) * 3
