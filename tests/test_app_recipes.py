"""The Fine-tune tab's auto settings (issue 18, item 5): its empty fields show the values `finetune.defaults`
chooses for the dataset and base model, the base picker says which bases are real pretrained checkpoints and which
are demos, and an unreachable hub is explained in one plain line."""

from __future__ import annotations

import sys

import gradio as gr
import pytest
from test_app import ALICE

from finetune.config import TrainConfig
from lwdetr_app import models
from lwdetr_app.models import ModelChoice
from lwdetr_app.recipes import HUB_UNREACHABLE_NOTE
from lwdetr_app.training import train_command
from lwdetr_app.ui import build_demo


def _block(demo, elem_id: str):
    return next(c for c in demo.blocks.values() if getattr(c, "elem_id", None) == elem_id)


def test_base_picker_says_which_bases_are_pretrained_checkpoints_and_which_are_demos(ctx, monkeypatch):
    monkeypatch.setattr(models, "_cached", lambda model_id: True)  # the published checkpoints are offered
    ctx.default = ModelChoice(ctx.default.ref, "test", hub_reachable=True)
    labels = dict((value, label) for label, value in ctx.base_model_choices())
    assert labels["demo"].endswith("· demo, not a pretrained checkpoint")
    assert labels["AnnaZhang/lwdetr_tiny_60e_coco"].endswith("· real pretrained checkpoint")
    assert labels["nano"] == "Preset nano (random init) · training from scratch"


def test_auto_settings_follow_the_dataset_and_the_base_model(ctx):
    text, *fields = ctx.auto_settings(None, "nano", None, None, None, None, None, ALICE)
    assert "choose a dataset" in text and [f["placeholder"] for f in fields] == ["auto"] * 4
    dataset, _, _ = ctx.use_synthetic()  # 48 train images of 256 px
    text, *fields = ctx.auto_settings(dataset, "demo", None, None, None, None, None, ALICE)
    # the demo model (nano) on 48 images: batch 8 -> 6 steps per epoch, 300 epochs at most; the data's own 256 px
    assert "300 epochs x 6 steps, batch 8, 256 px" in text and "lr 0.001" in text
    assert "not a real pretrained checkpoint" in text
    assert [f["placeholder"] for f in fields] == ["auto: 300", "auto: 8", "auto: 256", "auto: 0.001"]
    # A value the visitor typed wins, and what follows from it changes: batch 4 -> twice the steps per epoch.
    text, *fields = ctx.auto_settings(dataset, "nano", "", "4", None, "", None, ALICE)
    assert "225 epochs x 12 steps, batch 4" in text and "from scratch" in text
    refused = ctx.auto_settings(dataset, "/etc", None, None, None, None, None, ALICE)[0]
    assert "pick a base model" in refused  # a typed server folder is not read


def test_empty_fields_start_a_run_with_auto_settings(ctx, monkeypatch):
    started = []

    def command(config, gpus):
        started.append(config)
        return [sys.executable, "-c", "pass"]

    monkeypatch.setattr(ctx.job, "command", command)
    dataset, _, _ = ctx.use_synthetic()
    # What the tab's text fields send: strings, "" (or spaces) for an empty field. A fraction of an epoch or of an
    # image, and a zero, are refused in one line before anything starts.
    for epochs, what in (("2.5", "Epochs must be a whole number"), ("0", "Epochs must be a number from 1")):
        with pytest.raises(gr.Error, match=what):
            ctx.start_training(dataset, "nano", epochs, "", "", "", False, None, ALICE)
    assert started == []
    ctx.start_training(dataset, "nano", " ", "", "256", "", False, None, ALICE)
    ctx.job.wait(30)
    config = started[0]
    assert (config.epochs, config.batch_size, config.image_size, config.lr) == (None, None, 256, None)
    args = train_command(config, gpus=0)
    assert "--epochs" not in args and "--lr" not in args and args[args.index("--image-size") + 1] == "256"
    full = train_command(TrainConfig(data="d", model="nano", epochs=3, batch_size=2, image_size=128, lr=2e-4), 0)
    assert full[full.index("--lr") + 1] == "0.0002" and full[full.index("--batch-size") + 1] == "2"


@pytest.mark.parametrize("reachable", [True, False])
def test_unreachable_hub_says_that_training_from_scratch_needs_more(ctx, reachable):
    ctx.default = ModelChoice(ctx.default.ref, "test", hub_reachable=reachable)
    demo = build_demo(ctx)
    notes = [getattr(c, "value", None) for c in demo.blocks.values() if getattr(c, "elem_id", None) == "scratch-note"]
    assert notes == ([] if reachable else [HUB_UNREACHABLE_NOTE])
    assert "\n" not in HUB_UNREACHABLE_NOTE and "far more data and training time" in HUB_UNREACHABLE_NOTE
    assert _block(demo, "epochs").value == "" and _block(demo, "epochs").placeholder == "auto"
    assert "Auto settings" in _block(demo, "auto-settings").value
