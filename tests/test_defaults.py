"""The auto training settings (finetune.defaults): a recipe per base-model kind, model size and dataset size, user
values winning, and the resolved values recorded in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.config import TrainConfig
from finetune.defaults import (
    DataSize,
    base_kind,
    choose_recipe,
    loader_workers,
    model_size,
    recipe_for,
    resolve_config,
)
from finetune.synthetic import make_synthetic_dataset

MICROCONTROLLERS_LIKE = DataSize(images=120, boxes=144, image_side=800)  # the shared dataset's train split


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("defaults") / "shapes"
    make_synthetic_dataset(root, num_train=24, num_val=8, image_size=128, seed=5)
    return root


def _config_folder(folder: Path, preset: str) -> Path:
    """A model folder holding only the config of `preset` (all `recipe_for` reads)."""
    from lwdetr.config import preset_config

    preset_config(preset).save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------ the recipes


def test_pretrained_checkpoint_gets_lw_detrs_fine_tuning_recipe():
    recipe = choose_recipe("pretrained", "tiny", MICROCONTROLLERS_LIKE, divisor=64, smallest=640)
    assert (recipe.lr, recipe.lr_encoder, recipe.layer_decay, recipe.component_decay) == (1e-4, 1.5e-4, 0.8, 0.7)
    assert (recipe.image_size, recipe.batch_size, recipe.multi_scale) == (640, 4, True)
    assert recipe.steps_per_epoch == 30


@pytest.mark.parametrize("kind", ["demo", "scratch"])
def test_demo_and_scratch_bases_learn_fast_without_layer_decay(kind):
    recipe = choose_recipe(kind, "nano", MICROCONTROLLERS_LIKE, divisor=32, smallest=128)
    assert (recipe.lr, recipe.lr_encoder, recipe.layer_decay, recipe.component_decay) == (1e-3, 1.5e-3, 1.0, 1.0)
    assert (recipe.image_size, recipe.batch_size, recipe.multi_scale) == (320, 8, False)
    # A small dataset gets many epochs (about 2700 steps), with a warm-up of at least 50 steps.
    assert recipe.steps_per_epoch == 15 and recipe.epochs == 180 and recipe.warmup_steps == 50


def test_epochs_and_warmup_follow_the_dataset_size():
    large = choose_recipe("scratch", "nano", DataSize(20_000, 90_000, 1024), divisor=32, smallest=128)
    assert large.epochs == 12  # the floor: a large dataset gets a few epochs
    assert large.warmup_steps == large.steps_per_epoch == 2500  # one epoch
    tiny = choose_recipe("pretrained", "small", DataSize(8, 8, 640), divisor=64, smallest=640)
    assert tiny.epochs == 300 and tiny.steps_per_epoch == 2  # capped
    short = choose_recipe("scratch", "nano", DataSize(40, 40, 256), divisor=32, smallest=128, given={"epochs": 10})
    assert short.warmup_steps == 10  # at most a fifth of the run (50 steps)


def test_image_size_never_exceeds_the_datas_own_images():
    assert choose_recipe("scratch", "nano", DataSize(400, 900, 256), divisor=32, smallest=128).image_size == 256
    assert choose_recipe("scratch", "nano", DataSize(400, 900, 250), divisor=32, smallest=128).image_size == 256
    assert choose_recipe("scratch", "nano", DataSize(400, 900, 100), divisor=32, smallest=128).image_size == 128
    assert choose_recipe("pretrained", "small", DataSize(40, 90, 500), divisor=64, smallest=640).image_size == 640


def test_user_values_win_and_derived_values_follow_them():
    given = {"lr": 5e-4, "batch_size": 4, "multi_scale": True, "epochs": None}
    recipe = choose_recipe("scratch", "nano", MICROCONTROLLERS_LIKE, divisor=32, smallest=128, given=given)
    assert (recipe.lr, recipe.lr_encoder, recipe.batch_size, recipe.multi_scale) == (5e-4, 7.5e-4, 4, True)
    assert recipe.steps_per_epoch == 30 and recipe.epochs == 90  # the epochs follow the batch the user chose
    two = choose_recipe("scratch", "nano", MICROCONTROLLERS_LIKE, divisor=32, smallest=128, given=given, processes=2)
    assert two.steps_per_epoch == 15 and two.epochs == 180  # 2 processes share out an epoch


# ------------------------------------------------------------------------------------------------ the base kind


def test_base_kind_tells_pretrained_demo_and_scratch_apart(tmp_path):
    assert base_kind("nano", "nano") == "scratch"
    assert base_kind("AnnaZhang/lwdetr_tiny_60e_coco", "tiny") == "pretrained"
    nano = recipe_for(str(_config_folder(tmp_path / "nano-run", "nano")), MICROCONTROLLERS_LIKE)
    assert (nano.kind, nano.size, nano.lr) == ("demo", "nano", 1e-3)
    tiny = recipe_for(str(_config_folder(tmp_path / "converted-tiny", "tiny")), MICROCONTROLLERS_LIKE)
    assert (tiny.kind, tiny.size, tiny.lr, tiny.image_size) == ("pretrained", "tiny", 1e-4, 640)
    assert recipe_for("small", MICROCONTROLLERS_LIKE).kind == "scratch"
    assert "far more data" in recipe_for("small", MICROCONTROLLERS_LIKE).describe()
    assert "far more data" not in tiny.describe()


def test_bundled_demo_model_is_a_demo():
    demo = Path(__file__).resolve().parents[1] / "examples" / "demo_model"
    if not demo.is_dir():
        pytest.skip("examples/demo_model is not in this checkout")
    recipe = recipe_for(str(demo), MICROCONTROLLERS_LIKE)
    assert (recipe.kind, recipe.size) == ("demo", "nano")
    assert "not a real pretrained checkpoint" in recipe.describe()
    assert "needs far more data and training time" in recipe.describe()  # and says what that means


def test_model_size_of_every_preset():
    from lwdetr.config import PRESETS, preset_config

    assert [model_size(preset_config(name)) for name in PRESETS] == list(PRESETS)
    assert model_size(preset_config("nano", d_model=64)) is None


# -------------------------------------------------------------------------------------------- resolution and runs


def test_resolve_fills_only_what_the_user_left_on_auto():
    config = TrainConfig(data="d", model="nano", lr=2e-3, warmup_epochs=2.0)
    resolved, recipe = resolve_config(config, MICROCONTROLLERS_LIKE)
    assert resolved.lr == 2e-3 and resolved.lr_encoder == 3e-3 and resolved.warmup_epochs == 2.0
    assert resolved.warmup_steps is None  # the user's warm-up (in epochs) stays theirs
    assert (resolved.epochs, resolved.batch_size, resolved.image_size) == (180, 8, 320)
    assert recipe is not None and recipe.kind == "scratch"
    given = dict(epochs=3, batch_size=2, image_size=128, lr=1e-4, lr_encoder=1e-4, layer_decay=1.0)
    full = TrainConfig(data="d", **given, component_decay=1.0, warmup_steps=0, multi_scale=False)
    assert resolve_config(full, MICROCONTROLLERS_LIKE) == (full, None)  # nothing left to choose


def test_cli_without_settings_trains_with_recorded_auto_values(shapes, tmp_path, capsys):
    from finetune.__main__ import main

    run = tmp_path / "run"
    args = ["--data", str(shapes), "--output", str(run), "--max-steps", "2", "--lr", "5e-4"]
    assert main(args) == 0
    assert "settings (auto where not given): 300 epochs" in capsys.readouterr().out  # the start line
    saved = json.loads((run / "state" / "trainer.json").read_text())["config"]
    # nano from scratch on 24 images of 128 px: the recipe's values, and the user's lr with its derived encoder rate
    expected = {"batch_size": 8, "image_size": 128, "lr": 5e-4, "lr_encoder": 7.5e-4, "layer_decay": 1.0}
    assert {name: saved[name] for name in expected} == expected
    assert saved["epochs"] == 300 and saved["multi_scale"] is False and saved["warmup_steps"] > 0
    assert saved["num_workers"] == loader_workers("cpu")  # the data loader workers are auto too
    card = (run / "README.md").read_text()
    assert "| lr_encoder | `0.00075` |" in card and "| epochs | `300` |" in card
    start = json.loads((run / "events.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and "300 epochs x 3 steps, batch 8, 128 px" in start["message"]


def test_loader_workers_leave_a_small_cpus_cores_to_the_model():
    assert loader_workers("cpu", cpus=2) == 0 and loader_workers("cpu", cpus=4) == 0  # loading in the main process
    assert loader_workers("cpu", cpus=16) == 4 and loader_workers("cpu", processes=4, cpus=16) == 0
    assert loader_workers("cuda", cpus=16) == 8 and loader_workers("cuda", processes=4, cpus=16) == 3
    assert loader_workers("cuda", cpus=1) == 0
