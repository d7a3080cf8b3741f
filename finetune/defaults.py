"""Training defaults that give a useful model: a recipe chosen from the base model and the training data.

Every `TrainConfig` field in `AUTO_FIELDS` left at None means "auto" and is filled here, in one place
(`resolve_config`), from three facts:

- the base model's kind (`base_kind`):
  `pretrained` - a real pretrained checkpoint: the published COCO / Objects365 ones (`AnnaZhang/lwdetr_*`), a
  converted original checkpoint, or a model fine-tuned from one;
  `demo` - a model trained by this project on a little data, such as the bundled synthetic-shapes model
  (`examples/demo_model`): its features know little of real photographs, so it learns like a model from scratch;
  `scratch` - a preset name (`nano` ... `xlarge`), random weights;
- the model's size (`model_size`: the preset its architecture matches), and
- the training split (`DataSize`: images, boxes, typical image side).

Values the user set always win, and values derived from others follow them (the encoder's rate is 1.5 x the
learning rate the user gave; the epochs follow the batch size). The resolved configuration is what the run records
(state/trainer.json, the model card), so a resumed run keeps the numbers it started with.

The recipes (measured on this project's 2-core CPU machine, benchmarks/defaults.md):

- pretrained: LW-DETR's fine-tuning recipe: lr 1e-4, encoder 1.5e-4 with layer decay 0.8 and component decay 0.7,
  640 px with multi-scale batches. Not measured here (the hub is unreachable from the machine).
- demo and scratch: rates 10x higher and no decays (nothing to protect), fixed-size batches and a longer warm-up:
  nano reaches the tuned from-scratch recipe's AP50 in the same steps, and fine-tunes the bundled demo model on the
  microcontrollers dataset to the best AP we measured in about 12 minutes (2 cores).
- epochs: enough optimizer steps for the kind (`_TARGET_STEPS`), at least `_MIN_EPOCHS`: a small dataset gets many
  epochs, a large one a few.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from finetune.config import TrainConfig

__all__ = [
    "AUTO_FIELDS",
    "BaseKind",
    "DataSize",
    "Recipe",
    "base_kind",
    "base_of",
    "choose_recipe",
    "loader_workers",
    "describe_base",
    "model_size",
    "recipe_for",
    "resolve_config",
]

BaseKind = Literal["pretrained", "demo", "scratch"]

# The TrainConfig fields whose None means "auto" (warmup: when neither warmup_steps nor warmup_epochs is set).
AUTO_FIELDS = (
    "epochs",
    "batch_size",
    "image_size",
    "lr",
    "lr_encoder",
    "layer_decay",
    "component_decay",
    "warmup_steps",
    "multi_scale",
)
PUBLISHED_PREFIX = "AnnaZhang/lwdetr_"
# Said of every run that does not start from a real pretrained checkpoint (the CLI's start line, the app).
SCRATCH_NOTE = (
    ". Without pretrained features this learns almost from scratch, which needs far more data and training time "
    f"than fine-tuning a pretrained checkpoint ({PUBLISHED_PREFIX}*, from the Hugging Face hub)"
)

# Optimizer steps a run aims at, by base kind (the epochs follow from the data; see `_epochs`).
_TARGET_STEPS: dict[str, int] = {"pretrained": 1000, "demo": 2700, "scratch": 2700}
_MIN_EPOCHS: dict[str, int] = {"pretrained": 10, "demo": 12, "scratch": 12}
_MAX_EPOCHS = 300
# Largest default square side by model size; the data's own image side caps it further.
_IMAGE_SIDE: dict[str, int] = {"nano": 320}
_IMAGE_SIDE_PRETRAINED = 640
_BATCH: dict[str, int] = {"nano": 8}
_BATCH_OTHER = 4
_WARMUP_MIN_STEPS = 50  # a random-init model at lr 1e-3 needs this many steps of warm-up on a tiny dataset
_WARMUP_MAX_SHARE = 0.2  # but never more than this share of the run


@dataclass(frozen=True)
class DataSize:
    """What the recipe needs to know about the training split."""

    images: int
    boxes: int
    image_side: int  # median longer side of the training images, in pixels

    @classmethod
    def of(cls, records: Iterable[Any]) -> DataSize:
        """From `finetune.data.DetectionRecord`s (anything with `width`, `height` and `boxes`)."""
        sides, boxes = [], 0
        for record in records:
            sides.append(max(record.width, record.height))
            boxes += len(record.boxes)
        return cls(len(sides), boxes, int(statistics.median(sides)) if sides else 0)


@dataclass(frozen=True)
class Recipe:
    """The auto values of one run, and the facts they were chosen from."""

    kind: BaseKind
    size: str | None  # the preset the model's architecture matches; None for another architecture
    data: DataSize
    epochs: int
    batch_size: int
    image_size: int
    lr: float
    lr_encoder: float
    layer_decay: float
    component_decay: float
    warmup_steps: int
    multi_scale: bool
    steps_per_epoch: int  # optimizer steps (with the processes and gradient accumulation of the run)

    def values(self) -> dict[str, Any]:
        """The `AUTO_FIELDS` values."""
        return {name: getattr(self, name) for name in AUTO_FIELDS}

    def describe(self) -> str:
        """One line: the values and why (`epochs 67 x 15 steps, batch 8, 384 px, lr 0.001 ...`)."""
        scale = "multi-scale" if self.multi_scale else "fixed size"
        decays = f", layer decay {self.layer_decay:g}, component decay {self.component_decay:g}"
        steps = f"{self.steps_per_epoch} step" + "s" * (self.steps_per_epoch != 1)
        return (
            f"{self.epochs} epochs x {steps}, batch {self.batch_size}, {self.image_size} px "
            f"({scale}), lr {self.lr:g} (encoder {self.lr_encoder:g}{decays}), warm-up {self.warmup_steps} steps; "
            f"for {describe_base(self.kind, self.size)} and {self.data.images} training images "
            f"({self.data.boxes} boxes){'' if self.kind == 'pretrained' else SCRATCH_NOTE}"
        )


def describe_base(kind: BaseKind, size: str | None = None) -> str:
    """A few words saying what a base of `kind` is (for logs and the app's model pickers)."""
    model = f"a {size} model" if size else "a model"
    return {
        "pretrained": f"{model} from a real pretrained checkpoint",
        "demo": f"{model} from a demo checkpoint (trained on a little data, not a real pretrained checkpoint)",
        "scratch": f"{model} from scratch (random weights)",
    }[kind]


# ------------------------------------------------------------------------------------------------ the base model


def model_size(config: Any) -> str | None:
    """The preset (`nano` ... `xlarge`) whose architecture an `LwDetrConfig` has, else None."""
    from lwdetr.config import PRESETS

    vit = config.backbone_config
    shape = (vit.hidden_size, vit.num_hidden_layers, config.d_model, list(config.projector_scale_factors))
    for name, preset in PRESETS.items():
        backbone = preset["backbone"]
        if shape == (backbone["hidden_size"], backbone["num_hidden_layers"], preset["d_model"],
                     list(preset["projector_scale_factors"])):  # fmt: skip
            return name
    return None


def base_kind(model: str, size: str | None) -> BaseKind:
    """What `model` (a `TrainConfig.model`: preset name, folder or hub id) of architecture `size` starts from.

    A preset name is random weights. A published hub id is a real pretrained checkpoint. Any other folder or hub id
    is judged by its architecture: no nano checkpoint was ever pretrained on a large dataset, so a nano folder was
    trained here on a little data (the bundled demo model, a run fine-tuned from it or from the nano preset) and is
    a demo; a folder of a published size is taken for a converted or fine-tuned pretrained checkpoint (give the
    learning rate and epochs yourself for such a model trained from scratch).
    """
    from lwdetr.config import PRESETS

    if model in PRESETS and not Path(model).exists():
        return "scratch"
    if model.startswith(PUBLISHED_PREFIX):
        return "pretrained"
    return "demo" if size == "nano" else "pretrained"


def _size_limits(config: Any) -> tuple[int, int]:
    """(size divisor, smallest square side) of the model's inputs (see `finetune.train._size_limits`)."""
    vit = config.backbone_config
    divisor = vit.patch_size * math.isqrt(vit.num_windows)
    side = math.ceil(math.sqrt(config.num_queries)) * vit.patch_size
    return divisor, math.ceil(side / divisor) * divisor


# ---------------------------------------------------------------------------------------------------- the recipe


def choose_recipe(
    kind: BaseKind,
    size: str | None,
    data: DataSize,
    *,
    divisor: int = 32,
    smallest: int = 64,
    given: dict[str, Any] | None = None,
    processes: int = 1,
    grad_accum: int = 1,
) -> Recipe:
    """The recipe for a base of `kind` and `size` on `data`. `given` holds the values the user set (they win, and
    the values derived from them follow: the encoder rate from the learning rate, the epochs and the warm-up from
    the batch size); `processes` and `grad_accum` make the optimizer step larger, so fewer steps per epoch."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    fresh = kind != "pretrained"  # nothing worth protecting: higher rates, no layer-wise decay
    batch = given.get("batch_size", _BATCH.get(size or "", _BATCH_OTHER))
    cap = _IMAGE_SIDE_PRETRAINED if not fresh else _IMAGE_SIDE.get(size or "", _IMAGE_SIDE_PRETRAINED)
    image_size = given.get("image_size", _image_size(cap, data.image_side, divisor, smallest))
    lr = given.get("lr", 1e-3 if fresh else 1e-4)
    steps_per_epoch = max(1, math.ceil(data.images / (batch * processes * grad_accum)))
    epochs = given.get("epochs", _epochs(kind, steps_per_epoch))
    total = epochs * steps_per_epoch
    warmup = given.get("warmup_steps", min(max(steps_per_epoch, _WARMUP_MIN_STEPS), int(total * _WARMUP_MAX_SHARE)))
    return Recipe(
        kind=kind,
        size=size,
        data=data,
        epochs=epochs,
        batch_size=batch,
        image_size=image_size,
        lr=lr,
        lr_encoder=given.get("lr_encoder", float(f"{1.5 * lr:.6g}")),  # 1.5e-4, not 1.5000000000000001e-4
        layer_decay=given.get("layer_decay", 1.0 if fresh else 0.8),
        component_decay=given.get("component_decay", 1.0 if fresh else 0.7),
        warmup_steps=warmup,
        multi_scale=given.get("multi_scale", not fresh),
        steps_per_epoch=steps_per_epoch,
    )


def _image_size(cap: int, data_side: int, divisor: int, smallest: int) -> int:
    """`cap`, or the data's own image side when smaller (no point in upscaling), as a multiple of `divisor`."""
    side = min(cap, math.ceil(data_side / divisor) * divisor) if data_side else cap
    return max(smallest, side // divisor * divisor)


def _epochs(kind: BaseKind, steps_per_epoch: int) -> int:
    wanted = math.ceil(_TARGET_STEPS[kind] / steps_per_epoch)
    return min(_MAX_EPOCHS, max(_MIN_EPOCHS[kind], wanted))


def recipe_for(model: str, data: DataSize, given: dict[str, Any] | None = None, **kwargs: Any) -> Recipe:
    """`choose_recipe` for a `TrainConfig.model` reference (a preset, folder or hub id; see `base_of`)."""
    kind, size, config = base_of(model)
    divisor, smallest = _size_limits(config)
    return choose_recipe(kind, size, data, divisor=divisor, smallest=smallest, given=given, **kwargs)


def base_of(model: str) -> tuple[BaseKind, str | None, Any]:
    """(kind, size, `LwDetrConfig`) of a `TrainConfig.model` reference. A preset or a published hub id is known by
    its name (nothing is downloaded); a folder's or another hub id's config.json is read.

    Raises `lwdetr.hub.ModelNotFoundError` / `lwdetr.checkpoint.ModelLoadError` for a model that cannot be read.
    """
    from lwdetr.checkpoint import load_config
    from lwdetr.config import PRESETS, preset_config

    named = model.removeprefix(PUBLISHED_PREFIX).split("_")[0] if model.startswith(PUBLISHED_PREFIX) else model
    if named in PRESETS and not Path(model).exists():
        config = preset_config(named)
    else:
        config, _ = load_config(model)
    size = model_size(config)
    return base_kind(model, size), size, config


def resolve_config(config: TrainConfig, data: DataSize, processes: int = 1) -> tuple[TrainConfig, Recipe | None]:
    """`config` with its auto (None) `AUTO_FIELDS` filled from the recipe, and the recipe (None when the user set
    every one of them, e.g. a resumed run, whose saved configuration is already resolved)."""
    missing = [name for name in AUTO_FIELDS if getattr(config, name) is None]
    if config.warmup_epochs is not None and "warmup_steps" in missing:  # the warm-up the user gave, in epochs
        missing.remove("warmup_steps")
    if not missing:
        return config, None
    given = {name: getattr(config, name) for name in AUTO_FIELDS}
    recipe = recipe_for(config.model, data, given, processes=processes, grad_accum=config.grad_accum)
    values = {name: getattr(recipe, name) for name in missing}
    return dataclasses.replace(config, **values), recipe


# ------------------------------------------------------------------------------------------------ data loading


def loader_workers(device_type: str, processes: int = 1, cpus: int | None = None) -> int:
    """DataLoader worker processes per training process when `num_workers` is auto (None).

    On a CPU the workers take their cores from the compute threads, so with a few cores per process the data is
    better loaded in the main process (measured on 2 cores, nano at 320 px on 120 images: 3.7 s an epoch with no
    workers, 5.0 s with 2). On a GPU the cores are free for decoding and augmentation.
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            cpus = os.cpu_count() or 1
    per_process = max(1, cpus // max(1, processes))
    if device_type == "cpu":
        return 0 if per_process <= 4 else min(4, per_process // 4)
    return min(8, per_process - 1)
