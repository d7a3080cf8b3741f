"""The fine-tuning loop (finetune.train) and its parts: optimizer groups, schedule, EMA, resume, several processes,
the real dataset, the exported folders, the CLI, and a learning check on synthetic shapes."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import typing
from pathlib import Path

import pytest
import torch
from shared_data import microcontrollers_dataset

from finetune.config import TrainConfig, resume_config
from finetune.ema import ModelEma
from finetune.errors import ConfigError
from finetune.optim import OptimizerSettings, lr_factor, param_groups
from finetune.result import offered_model_dir, read_result
from finetune.synthetic import make_synthetic_dataset
from finetune.train import epoch_batches, train


def _nano(num_labels: int = 3):
    from lwdetr.config import preset_config
    from lwdetr.modeling import LwDetrForObjectDetection

    return LwDetrForObjectDetection(preset_config("nano", num_labels=num_labels))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """24 train / 8 val synthetic images of 128 px: enough to exercise the loop, not to learn."""
    root = tmp_path_factory.mktemp("tiny") / "shapes"
    make_synthetic_dataset(root, num_train=24, num_val=8, image_size=128, seed=3)
    return root


def _tiny_config(data: Path, output: Path, **overrides) -> TrainConfig:
    fields = dict(
        data=str(data),
        output=str(output),
        model="nano",
        epochs=3,
        batch_size=4,
        image_size=128,
        lr=2e-4,
        num_workers=0,
        multi_scale=False,
        warmup_steps=2,
    )
    return TrainConfig(**{**fields, **overrides})


def test_plots_are_redrawn_at_most_every_30_seconds_and_at_the_end(tiny_data, tmp_path, monkeypatch):
    """Short epochs (a small dataset) do not pay 0.3 s of plotting each: epoch 1 draws, then the last one."""
    import finetune.checkpoints as checkpoints

    drawn = []
    real_plot = checkpoints.plot_history
    monkeypatch.setattr(
        checkpoints, "plot_history", lambda history, out: drawn.append(len(history)) or real_plot(history, out)
    )
    train(_tiny_config(tiny_data, tmp_path / "run"))
    assert drawn == [1, 3]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ optimizer and EMA


def test_param_groups_follow_lw_detr():
    model = _nano()
    settings = OptimizerSettings(lr=1e-4, lr_encoder=1.5e-4, weight_decay=1e-4, layer_decay=0.8, component_decay=0.7)
    groups = param_groups(model, settings)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)  # every trainable parameter exactly once
    vit = "model.backbone.backbone."
    num_layers = len(model.model.backbone.backbone.encoder.layer)  # 4 for nano
    top = by_param[id(named[f"{vit}encoder.layer.{num_layers - 1}.attn.qkv.weight"])]
    bottom = by_param[id(named[f"{vit}encoder.layer.0.attn.qkv.weight"])]
    embed = by_param[id(named[f"{vit}embeddings.projection.weight"])]
    assert top["lr"] == pytest.approx(1.5e-4 * 0.8 * 0.7**2)
    assert bottom["lr"] == pytest.approx(1.5e-4 * 0.8**num_layers * 0.7**2)
    assert embed["lr"] == pytest.approx(1.5e-4 * 0.8 ** (num_layers + 1) * 0.7**2)
    assert by_param[id(named["model.decoder.layers.0.mlp.fc1.weight"])]["lr"] == pytest.approx(1e-4 * 0.7)
    assert by_param[id(named["class_embed.weight"])]["lr"] == pytest.approx(1e-4)
    no_decay = [
        "class_embed.bias",
        f"{vit}encoder.layer.0.gamma_1",
        f"{vit}encoder.layer.0.norm1.weight",
        f"{vit}embeddings.position_embeddings",
        "model.query_feat.weight",
        "model.reference_point_embed.weight",
    ]
    for name in no_decay:
        assert by_param[id(named[name])]["weight_decay"] == 0.0, name
    assert by_param[id(named["class_embed.weight"])]["weight_decay"] == 1e-4
    assert top["weight_decay"] == 1e-4

    model.model.backbone.backbone.requires_grad_(False)  # --freeze-backbone
    frozen = {id(p) for g in param_groups(model, settings) for p in g["params"]}
    assert id(named[f"{vit}encoder.layer.0.attn.qkv.weight"]) not in frozen


def test_lr_schedule_is_a_pure_function_of_the_step():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(100, 100, warmup_steps=10, min_ratio=0.05) == pytest.approx(0.05)
    middle = lr_factor(55, 100, warmup_steps=10, min_ratio=0.0)
    assert middle == pytest.approx(0.5)
    values = [lr_factor(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_factor(70, 100, schedule="step", drop_step=67) == pytest.approx(0.1)
    assert lr_factor(50, 100, schedule="constant") == 1.0


def test_ema_warms_up_then_tracks():
    model = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = ModelEma(model, decay=0.9, tau=10)
    first = ema.current_decay()
    assert first == pytest.approx(0.9 * (1 - math.exp(-1 / 10)))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.module.weight[0, 0].item() == pytest.approx(1 - first)
    for _ in range(200):
        ema.update(model)
    assert ema.module.weight[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_epoch_batches_are_disjoint_and_even_across_ranks():
    shares = [epoch_batches(103, epoch=2, seed=0, batch_size=8, rank=r, world=3) for r in range(3)]
    flat = [[i for batch in share for i in batch] for share in shares]
    assert all(len(f) == 103 // 3 for f in flat)
    assert len({len(s) for s in shares}) == 1  # the same number of steps on every rank
    assert not set(flat[0]) & set(flat[1]) and not set(flat[1]) & set(flat[2])
    assert epoch_batches(103, 2, 0, 8, 0, 3) == shares[0]  # reproducible
    assert epoch_batches(103, 3, 0, 8, 0, 3) != shares[0]  # reshuffled every epoch


# ------------------------------------------------------------------------------------------ errors and CLI


def test_image_size_must_fit_the_model(tiny_data, tmp_path):
    with pytest.raises(ConfigError, match="multiple of 32"):
        train(_tiny_config(tiny_data, tmp_path / "run", image_size=100))


def test_cli_dry_run_and_data_errors(tiny_data, tmp_path, capsys):
    from finetune.__main__ import main

    assert main(["--data", str(tiny_data), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "circle" in out and "train" in out
    assert main(["--data", str(tmp_path / "missing"), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1


def test_cli_help_explains_every_option(capsys):
    from finetune.__main__ import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--data",
        "--model",
        "--epochs",
        "--batch-size",
        "--image-size",
        "--lr",
        "--output",
        "--resume",
        "--dry-run",
        "--lr-encoder",
        "--grad-accum",
        "--clip-grad",
        "--mixed-precision",
        "--no-ema",
        "--freeze-backbone",
        "--max-steps",
        "--warmup-epochs",
    ):
        assert flag in text, flag


def _every_field_changed() -> TrainConfig:
    """A config whose every field (but `resume` and `command`) differs from its default: strings that start like an
    option and hold a space, a float whose shortest form has 17 digits."""
    hints, values = typing.get_type_hints(TrainConfig), {}
    for spec in dataclasses.fields(TrainConfig):
        kind = hints[spec.name]
        if spec.name in ("resume", "command"):
            continue
        if typing.get_origin(kind) is typing.Literal:
            values[spec.name] = next(choice for choice in typing.get_args(kind) if choice != spec.default)
        elif kind is bool:
            values[spec.name] = not spec.default
        else:
            scalar = next(t for t in (*typing.get_args(kind), kind) if t is not type(None))
            values[spec.name] = {int: 7, float: 0.1 + 0.2, str: f"-{spec.name} x", bool: False}[scalar]
        assert values[spec.name] != spec.default, spec.name
    return TrainConfig(**values)


def test_a_config_crosses_to_another_process_as_arguments_and_reads_back_equal():
    """How the app hands finetune's TrainConfig to its training child: `to_args`, read back by the CLI, is the same
    config (the command line it was read from recorded in `command`)."""
    from finetune.__main__ import config_from_args

    for config in (TrainConfig(), TrainConfig(data="shapes/", epochs=3, lr=2e-4), _every_field_changed()):
        args = config.to_args()
        command = shlex.join(["python", "-m", "finetune", *args])
        assert config_from_args(args) == dataclasses.replace(config, command=command)
    assert TrainConfig().to_args() == [] and TrainConfig(data="d", freeze_backbone=True).to_args() == [
        "--data", "d", "--freeze-backbone"
    ]  # fmt: skip
    # A resumed run reads its settings from the run folder: only what was given crosses.
    assert TrainConfig(output="runs/x", resume=True, epochs=20).to_args() == [
        "--output", "runs/x", "--epochs", "20", "--resume"
    ]  # fmt: skip
    # The model card's command names the main settings (auto ones are left to the run), and no --resume/--force.
    assert TrainConfig(data="d", resume=True, force=True, ema=False, epochs=10).to_command() == (
        "python -m finetune --data d --model nano --output runs/finetune --epochs 10 --no-ema"
    )


def test_a_run_offers_best_else_last(tmp_path):
    """The one rule for which weights a run offers (result, app, bundle, analysis): best/, else last/, each only
    when it holds a model (config.json and weights)."""
    run = tmp_path / "run"
    assert offered_model_dir(run) is None

    def model_folder(name: str, weights: bool = True) -> None:
        (run / name).mkdir(parents=True)
        (run / name / "config.json").write_text("{}")
        if weights:
            (run / name / "model.safetensors").write_bytes(b"")

    model_folder("best", weights=False)  # e.g. copied in part
    assert offered_model_dir(run) is None
    model_folder("last")
    assert offered_model_dir(run) == run / "last"
    (run / "best" / "model.safetensors").write_bytes(b"")
    assert offered_model_dir(run) == run / "best"


# ------------------------------------------------------------------------------------------ interrupted + resumed


@pytest.fixture(scope="module")
def resumed_run(tiny_data, tmp_path_factory):
    """A 3-epoch run (6 steps per epoch) stopped after 8 steps, then resumed to the end; and the same run
    uninterrupted, for comparison."""
    root = tmp_path_factory.mktemp("resume")
    stop = threading.Event()
    events = []

    def on_event(event):
        events.append(event)
        if event.kind == "step" and event.step == 8:
            stop.set()

    first = train(_tiny_config(tiny_data, root / "run"), callback=on_event, stop_event=stop)
    lines_after_stop = (root / "run" / "metrics.jsonl").read_text().splitlines()
    second_events = []
    second = train(resume_config(root / "run"), callback=second_events.append)
    straight = train(_tiny_config(tiny_data, root / "straight"))
    return {
        "root": root,
        "data": tiny_data,
        "first": first,
        "second": second,
        "straight": straight,
        "events": events,
        "second_events": second_events,
        "lines_after_stop": lines_after_stop,
    }


def test_stop_then_resume_continues_the_epochs(resumed_run):
    first, second, run_dir = resumed_run["first"], resumed_run["second"], resumed_run["root"] / "run"
    assert first.stopped and first.step == 8 and first.epochs_completed == 1
    assert [e.kind for e in resumed_run["events"]][-1] == "stopped"
    assert len(resumed_run["lines_after_stop"]) == 1
    assert not second.stopped and second.epochs_completed == 3 and second.step == 18
    kinds = [e.kind for e in resumed_run["second_events"]]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("epoch") == 2
    assert resumed_run["second_events"][1].step == 9  # the first step after the resume
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["step"] for r in rows] == [6, 12, 18]
    for key in ("loss", "loss_ce", "loss_bbox", "loss_giou", "lr", "AP", "AP50", "AP75", "AP_small", "time"):
        assert key in rows[-1], key
    state = json.loads((run_dir / "state" / "trainer.json").read_text())
    assert state["epoch"] == 3 and state["step"] == 18
    for name in ("best", "last"):
        assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= {
            p.name for p in (run_dir / name).iterdir()
        }
    assert (run_dir / "loss.png").stat().st_size > 1000 and (run_dir / "ap.png").stat().st_size > 1000
    card = (run_dir / "README.md").read_text()
    assert "python -m finetune" in card and "AP50" in card and "circle" in card
    assert not list(run_dir.glob(".*partial")) and not list(run_dir.glob("*.old"))


def test_each_session_leaves_its_result_in_the_run_folder(resumed_run):
    """result.json holds what `train` returned (the app reads it there); the offered weights are best/, their
    metrics those of the best epoch."""
    run_dir, second = resumed_run["root"] / "run", resumed_run["second"]
    assert read_result(run_dir) == second and read_result(resumed_run["root"] / "straight") == resumed_run["straight"]
    assert resumed_run["first"].stopped and resumed_run["first"].model_dir == run_dir / "best"
    assert second.model_dir == run_dir / "best" and second.best_ap == max(r["AP"] for r in second.history)
    assert second.model_metrics["AP"] == second.best_ap and "loss" not in second.model_metrics


def test_resumed_run_matches_an_uninterrupted_one(resumed_run):
    """Same batches, same augmentations, restored optimizer/EMA/RNG: the weights come out the same."""
    from safetensors.torch import load_file

    resumed = load_file(str(resumed_run["root"] / "run" / "last" / "model.safetensors"))
    straight = load_file(str(resumed_run["root"] / "straight" / "last" / "model.safetensors"))
    worst = max((resumed[k] - straight[k]).abs().max().item() for k in straight)
    assert worst < 1e-4, worst


def test_best_folder_loads_in_transformers_and_detector(resumed_run):
    from PIL import Image
    from transformers import pipeline

    from lwdetr.detector import Detector

    best = resumed_run["root"] / "run" / "best"
    config = json.loads((best / "config.json").read_text())
    assert config["id2label"] == {"0": "circle", "1": "square", "2": "triangle"}
    image = Image.open(sorted((resumed_run["data"] / "valid").glob("*.jpg"))[0]).convert("RGB")
    detector = pipeline("object-detection", model=str(best), device="cpu")
    theirs = sorted(detector(image, threshold=0.0), key=lambda d: -d["score"])[:10]
    ours = Detector.from_pretrained(best).predict(image, threshold=0.0)
    ours = sorted(ours, key=lambda d: -d.score)[:10]
    assert theirs and len(theirs) == len(ours)
    for a, b in zip(theirs, ours):
        assert a["label"] == b.label
        assert a["score"] == pytest.approx(b.score, abs=1e-3)
        box = (a["box"]["xmin"], a["box"]["ymin"], a["box"]["xmax"], a["box"]["ymax"])
        assert box == pytest.approx(b.box, abs=1.5)  # the pipeline rounds to whole pixels


def test_pretrained_start_keeps_weights_and_renews_class_heads(resumed_run):
    from finetune.build import build_model
    from lwdetr.modeling import LwDetrForObjectDetection

    best = resumed_run["root"] / "run" / "best"
    base = LwDetrForObjectDetection.from_pretrained(best)
    same = build_model(TrainConfig(model=str(best)), {0: "circle", 1: "square", 2: "triangle"})
    renamed = build_model(TrainConfig(model=str(best)), {0: "cat", 1: "dog", 2: "bird"})
    fewer = build_model(TrainConfig(model=str(best), freeze_backbone=True), {0: "cat", 1: "dog"})
    assert torch.equal(same.class_embed.weight, base.class_embed.weight)
    assert not torch.equal(renamed.class_embed.weight, base.class_embed.weight)
    assert fewer.class_embed.weight.shape[0] == 2 and fewer.config.id2label == {0: "cat", 1: "dog"}
    for model in (renamed, fewer):
        assert torch.equal(model.bbox_embed.layers[0].weight, base.bbox_embed.layers[0].weight)
        assert torch.equal(model.model.query_feat.weight, base.model.query_feat.weight)
    assert not any(p.requires_grad for p in fewer.model.backbone.backbone.parameters())
    assert same.training  # Group DETR is on in training mode


def test_bf16_grad_accum_frozen_backbone_without_ema(tiny_data, tmp_path):
    config = _tiny_config(
        tiny_data,
        tmp_path / "run",
        epochs=1,
        max_steps=2,
        mixed_precision="bf16",
        grad_accum=2,
        freeze_backbone=True,
        ema=False,
        schedule="step",
    )
    result = train(config)
    assert result.step == 2 and result.epochs_completed == 1 and result.best_dir is not None
    row = result.history[-1]
    assert math.isfinite(row["loss"]) and "AP50" in row
    assert not (tmp_path / "run" / "state" / "ema.safetensors").exists()


# ------------------------------------------------------------------------------------------ two processes


def _two_process_worker(data: str, output: str, record_dir: str) -> None:
    import finetune.checkpoints as checkpoints
    import finetune.train as loop

    seen = []
    original_batches, original_save = loop.epoch_batches, checkpoints.save_state

    def recording_batches(*args, **kwargs):
        batches = original_batches(*args, **kwargs)
        seen.extend(i for batch in batches for i in batch)
        return batches

    def recording_save(run):
        original_save(run)
        flat = torch.cat([p.detach().flatten() for p in run.unwrapped.parameters()])
        rank = run.accelerator.process_index
        torch.save(
            {"params": flat, "seen": seen, "world": run.accelerator.num_processes}, Path(record_dir) / f"rank{rank}.pt"
        )

    loop.epoch_batches, checkpoints.save_state = recording_batches, recording_save
    config = _tiny_config(Path(data), Path(output), epochs=2, batch_size=2)
    result = loop.train(config)
    assert result.epochs_completed == 2


@pytest.mark.slow
def test_two_processes_train_in_lockstep_on_disjoint_data(tiny_data, tmp_path):
    """torchrun starts 2 gloo processes (this file is their script, see the end); each records what it saw."""
    records = tmp_path / "records"
    records.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*torchrun, __file__, str(tiny_data), str(tmp_path / "run"), str(records)]
    # A fresh interpreter, not a fork of this one: forking a process whose torch thread pool has run can deadlock.
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=root, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(records / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert torch.equal(rank0["params"], rank1["params"])
    assert len(rank0["seen"]) == len(rank1["seen"]) == 2 * 12  # 2 epochs of 24 images / 2 ranks
    for epoch in (0, 1):
        mine, theirs = set(_per_epoch(rank0["seen"], epoch)), set(_per_epoch(rank1["seen"], epoch))
        assert len(mine) == 12 and not mine & theirs
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and json.loads(rows[-1])["step"] == 2 * 6  # 24 images / 2 ranks / batch 2 = 6 steps


def _per_epoch(seen: list[int], epoch: int, per_epoch: int = 12) -> list[int]:
    return seen[epoch * per_epoch : (epoch + 1) * per_epoch]


# ------------------------------------------------------------------------------------------ the real dataset


def test_short_run_on_microcontrollers(tmp_path):
    config = TrainConfig(
        data=str(microcontrollers_dataset()),
        output=str(tmp_path / "run"),
        model="nano",
        epochs=1,
        batch_size=4,
        image_size=256,
        max_steps=10,
        num_workers=0,
        lr=2e-4,
    )
    result = train(config)
    assert result.step == 10 and result.epochs_completed == 1
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"AP", "AP50", "loss"} <= row.keys() and 0.0 <= row["AP"] <= 1.0
    labels = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["id2label"]
    assert sorted(labels.values()) == ["Arduino", "Arduino_Nano", "ESP8266", "Heltec", "Raspberry"]


# ------------------------------------------------------------------------------------------ it learns


@pytest.mark.slow
def test_nano_learns_synthetic_shapes_with_the_default_settings(tmp_path):
    """From scratch with the auto settings (only the number of epochs given), nano goes from AP50 ~0 to >= 0.7 on
    easy shapes in 400 steps, as the tuned recipe does (benchmarks/defaults.md; about 2 minutes on an idle 2-core
    machine, where the old defaults (lr 1e-4, multi-scale) reached AP50 0.36)."""
    from finetune.build import build_model
    from finetune.data import load_detection_data
    from finetune.evaluate import coco_metrics, predict_detections
    from finetune.transforms import DetectionDataset, PreprocessCollate

    data_dir = tmp_path / "shapes"
    make_synthetic_dataset(data_dir, num_train=400, num_val=40, image_size=256, seed=0)
    config = TrainConfig(data=str(data_dir), output=str(tmp_path / "run"), model="nano", epochs=8, num_workers=0)

    data = load_detection_data(config.data)
    torch.manual_seed(config.seed)
    untrained = build_model(config, data.id2label)
    val = DetectionDataset(data.val, train=False)
    loader = torch.utils.data.DataLoader(val, batch_size=8, collate_fn=PreprocessCollate([256]))
    before = coco_metrics(
        data.val.to_coco_gt(), predict_detections(untrained, loader, torch.device("cpu")), data.id2label
    )["AP50"]

    result = train(config)
    used = json.loads((tmp_path / "run" / "state" / "trainer.json").read_text())["config"]
    assert (used["batch_size"], used["image_size"], used["lr"], result.step) == (8, 256, 1e-3, 400)
    curve = [round(row.get("AP50", float("nan")), 3) for row in result.history]
    print(f"\nAP50 before {before:.3f}; per epoch {curve}; best AP {result.best_ap:.3f}")
    assert before < 0.05
    assert max(row["AP50"] for row in result.history if "AP50" in row) >= 0.7


if __name__ == "__main__":  # the script torchrun runs in test_two_processes_train_in_lockstep_on_disjoint_data
    _two_process_worker(*sys.argv[1:4])
