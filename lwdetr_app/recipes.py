"""What the Fine-tune tab says about base models and about the auto training settings, both from
`finetune.defaults`: which bases are real pretrained checkpoints, which are demos or random weights, and the values
the empty settings fields will take for the chosen dataset and base model."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from finetune.defaults import BaseKind, DataSize, Recipe, base_of, recipe_for

from .models import ModelOption

__all__ = ["AUTO_NUMBERS", "HUB_UNREACHABLE_NOTE", "auto_settings", "kind_labelled"]

KIND_WORDS: dict[str, str] = {
    "pretrained": "real pretrained checkpoint",
    "demo": "demo, not a pretrained checkpoint",
    "scratch": "training from scratch",
}
HUB_UNREACHABLE_NOTE = (
    "The Hugging Face hub is unreachable, so no pretrained checkpoint is offered: the demo model and the presets "
    "learn almost from scratch, which needs far more data and training time than fine-tuning a pretrained checkpoint."
)
# The tab's number fields that may be left empty ("auto"), as TrainConfig field names, in the tab's order.
AUTO_NUMBERS = ("epochs", "batch_size", "image_size", "lr")


@functools.lru_cache(maxsize=512)
def _kind(value: str, stamp: float) -> BaseKind | None:
    """The kind of a picker's model (`stamp`: its config's modification time, so a rewritten folder is read again)."""
    try:
        return base_of(value)[0]
    except Exception:  # noqa: BLE001 - an unreadable folder just gets no kind words
        return None


def _config_stamp(value: str) -> float:
    try:
        return (Path(value) / "config.json").stat().st_mtime
    except OSError:  # a preset or hub id
        return 0.0


def kind_labelled(options: list[ModelOption]) -> list[ModelOption]:
    """A base-model picker's options with what each base is in the label: `... · real pretrained checkpoint`."""
    labelled = []
    for option in options:
        kind = _kind(option.ref, _config_stamp(option.ref))
        label = f"{option.label} · {KIND_WORDS[kind]}" if kind else option.label
        labelled.append(dataclasses.replace(option, label=label))
    return labelled


def auto_settings(model: str, data: DataSize | None, given: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """(a Markdown line on the auto settings, each `AUTO_NUMBERS` field's placeholder) for base `model` on `data`
    (None: no dataset chosen yet), with the values the visitor typed in `given` (None: empty)."""
    try:  # the base model's config is read once: by `base_of`, or by `recipe_for` when there is data
        recipe = None if data is None else recipe_for(model, data, given)
        kind = base_of(model)[0] if recipe is None else recipe.kind
    except Exception:  # noqa: BLE001 - e.g. a hub id that cannot be read: the run will say why
        return "**Auto settings:** chosen for the base model and the dataset when the run starts.", {}
    if recipe is None:
        text = f"**Auto settings** (empty fields) for {_base_words(kind)}: choose a dataset to see them."
    else:
        text = f"**Auto settings** (empty fields): {recipe.describe()}."
    return text, {name: _placeholder(recipe, name) for name in AUTO_NUMBERS}


def _base_words(kind: BaseKind) -> str:
    return {"pretrained": "a pretrained checkpoint", "demo": "a demo model", "scratch": "training from scratch"}[kind]


def _placeholder(recipe: Recipe | None, name: str) -> str:
    return "auto" if recipe is None else f"auto: {getattr(recipe, name):g}"
