"""The fine-tuning loop: `train(TrainConfig(...))`, from a dataset folder to an exported detector.

Read top to bottom: `train` sets up (data, model, optimizer, EMA, maybe a saved state), then runs epochs; an epoch
is a sequence of optimizer steps (`_optimizer_step`, gradient accumulation inside), then a COCO evaluation and the
saves (`_end_epoch`). Everything runs under an `accelerate.Accelerator`, so the same code serves one CPU process,
a GPU with mixed precision, or K processes started by `accelerate launch` / `torchrun`:

- Each process gets its own disjoint share of every epoch's shuffled images (`epoch_batches`, a pure function of
  seed, epoch and rank); DDP averages the gradients, so the weights stay identical on every rank.
- Evaluation is shared out too and scored on the main process (`finetune.evaluate.evaluate_split`).
- Only the main process writes files and calls the callback.

Run folder (`config.output`):

    best/  last/          HF-format model folders (config.json, model.safetensors, preprocessor_config.json,
                          README.md) with the evaluated weights (the EMA when on); best = highest validation AP
    state/  state.prev/   what `resume=True` continues from, and the checkpoint before it (see `finetune.state`);
                          saved at epoch ends, on a stop and every `save_every_steps` steps
    metrics.jsonl         one line per finished epoch: epoch, step, mean train losses, lr, AP metrics, times
    loss.png  ap.png      curves
    README.md             the model card (data summary, command, hyperparameters, metrics)
    analysis/  model.onnx at the end of a run, of best/: per-class AP, precision-recall curves, a validation gallery
                          (`finetune.analysis`) and the ONNX export

All writes are atomic (see `finetune.export`): a kill at any moment leaves the previous good version, and a resume
repairs the folder first. A new run refuses a folder that holds one (unless `force`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import shlex
import shutil
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from finetune.callbacks import Callback, EtaClock, TrainEvent
from finetune.ema import ModelEma
from finetune.errors import ConfigError
from finetune.export import (
    atomic_write_text,
    disk_full_guard,
    model_card,
    plot_history,
    save_model_folder,
    write_metrics_jsonl,
)
from finetune.faults import crash_point
from finetune.optim import OptimizerSettings, build_optimizer, lr_factor, set_lr
from finetune.state import Progress as _Progress
from finetune.state import apply_state as _load_state
from finetune.state import open_state, repair_run_folder, saved_config
from finetune.state import save_state as _save_state
from lwdetr import host_sync

__all__ = [
    "ConfigError",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "epoch_batches",
    "load_run_config",
    "resume_config",
    "train",
]

LOGGED_LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou")
# On a GPU the logged losses are read (one wait for the device) every this many steps; on the CPU every step.
_DEVICE_READ_EVERY = 20
# Fields a resumed run takes from the config passed to `train` rather than from the saved run: to extend or re-pace
# it. Everything else comes from the saved configuration; build the config with `resume_config(output)`.
RESUME_OVERRIDES = ("epochs", "max_steps", "eval_every", "num_workers", "threads", "dry_run", "save_every_steps")
# Without --save-every-steps a run saves its state about this often (from the measured step time), so that a kill
# loses at most this much work.
AUTO_SAVE_SECONDS = 600.0
# Steps timed (after the first of a session) before the automatic interval is fixed.
_AUTO_SAVE_TIMED_STEPS = 5
# Room for metrics.jsonl, the plots, the model cards and the configs of a save.
_FILES_BYTES = 1 << 20


@dataclass
class TrainConfig:
    """Everything a fine-tuning run needs, as plain data (the CLI fills it from its arguments, the app directly).

    None in a field of `finetune.defaults.AUTO_FIELDS` (epochs, batch size, image size, learning rates, decays,
    warm-up, multi-scale) means "auto": `train` fills it from a recipe for the base model and the data
    (`finetune.defaults`). Weight decay 1e-4 and gradient clipping at 0.1 are LW-DETR's, the EMA rf-detr's.
    """

    data: str | None = None  # dataset folder, COCO json, zip or Hugging Face dataset (see finetune.data)
    val_data: str | None = None  # optional separate validation set (same forms)
    model: str = "nano"  # preset name (random init), local HF folder or hub id
    output: str = "runs/finetune"  # the run folder
    epochs: int | None = None  # None: auto (finetune.defaults), as for every None below
    batch_size: int | None = None  # per process, per micro-batch
    image_size: int | None = None  # square side; a multiple of the model's size_divisor
    lr: float | None = None
    lr_encoder: float | None = None  # ViT learning rate before layer decay; auto: 1.5 x lr
    weight_decay: float = 1e-4
    layer_decay: float | None = None  # ViT lr decay per block from the top
    component_decay: float | None = None  # decoder lr factor (ViT: its square)
    warmup_epochs: float | None = None  # auto when warmup_steps is None too
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    min_lr_ratio: float = 0.05  # cosine floor, as a fraction of the base rates
    grad_accum: int = 1
    clip_grad: float = 0.1  # max gradient norm; 0 disables
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema: bool = True
    ema_decay: float = 0.993
    ema_tau: float = 100.0
    freeze_backbone: bool = False
    multi_scale: bool | None = None  # a random square size per batch in [0.7, 1.4] x image_size
    augment: bool = True  # flip, box-safe crop, colour jitter; False: plain resize
    resume: bool = False
    force: bool = False  # start a new run in an output folder that holds one (its files are deleted first)
    save_every_steps: int | None = None  # state/ every N steps too; None: about every 10 minutes; 0: epoch ends only
    num_workers: int = 2
    threads: int | None = None  # torch CPU threads per process; None: the machine's cores shared among processes
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    max_steps: int | None = None  # stop after this many optimizer steps in total (quick runs)
    val_fraction: float = 0.15  # held-out share of train when the data has no validation split
    dry_run: bool = False  # load and check the data, return its report, train nothing
    command: str | None = None  # the command line, recorded in the model card

    def to_command(self) -> str:
        """A `python -m finetune ...` command line for this configuration (the CLI flag of field `a_b` is `--a-b`)."""
        always = {"data", "model", "output", "epochs", "batch_size", "image_size", "lr"}
        defaults, parts = TrainConfig(), ["python", "-m", "finetune"]
        for spec in dataclasses.fields(self):
            value, flag = getattr(self, spec.name), "--" + spec.name.replace("_", "-")
            if spec.name in ("command", "dry_run", "resume", "force") or value is None:
                continue
            if spec.name not in always and value == getattr(defaults, spec.name):
                continue
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + flag[2:])
            else:
                parts += [flag, str(value)]
        return shlex.join(parts)

    def optimizer_settings(self) -> OptimizerSettings:
        """LW-DETR's groups, with this configuration's rates and decays (resolved: see `finetune.defaults`)."""
        values = (self.lr, self.lr_encoder, self.weight_decay, self.layer_decay, self.component_decay)
        if any(value is None for value in values):
            raise ConfigError("the learning rates and decays are not resolved yet (finetune.defaults.resolve_config)")
        return OptimizerSettings(*values)


@dataclass
class TrainResult:
    """What a run produced. `stopped` is True when a `stop_event` ended it before its planned steps."""

    output_dir: Path
    best_dir: Path | None = None
    last_dir: Path | None = None
    best_ap: float | None = None
    best_epoch: int | None = None
    epochs_completed: int = 0
    step: int = 0
    total_steps: int = 0
    stopped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation
    history: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl rows
    report: str = ""  # the data validation report


# ---------------------------------------------------------------------------------------------------- set-up


def load_run_config(output: str | Path) -> TrainConfig:
    """The configuration saved in the run at `output` (for `--resume`), with `output` as its run folder wherever the
    run now is (moved or copied). An interrupted save is finished first."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    fields = {k: v for k, v in saved_config(output).items() if k in known}
    return TrainConfig(**{**fields, "output": str(output)})


def resume_config(output: str | Path, **changes: Any) -> TrainConfig:
    """The configuration to pass to `train` to continue the run in `output`: the saved one, with `changes` to the
    `RESUME_OVERRIDES` fields (e.g. `epochs=20` to extend it) and `resume=True`. Other changes must equal the saved
    values: a resumed run keeps its data and hyperparameters (`ConfigError` naming the first that differs)."""
    saved = load_run_config(output)
    for name, value in changes.items():
        if name in (*RESUME_OVERRIDES, "output", "resume", "force", "command"):
            continue
        if not _same_setting(getattr(saved, name), value):
            flag = "--" + name.replace("_", "-")
            old = getattr(saved, name)
            raise ConfigError(
                f"{output}: a resumed run keeps its saved settings, but {flag} differs (saved {old!r}, given "
                f"{value!r}): leave {flag} out to resume, or start a new run with another --output (or --force to "
                "overwrite this one)"
            )
    allowed = {k: v for k, v in changes.items() if k in RESUME_OVERRIDES}
    return dataclasses.replace(saved, **allowed, resume=True)


def _same_setting(saved: Any, given: Any) -> bool:
    if saved == given:
        return True
    if isinstance(saved, str) and isinstance(given, str) and Path(saved).exists() and Path(given).exists():
        return Path(saved).resolve() == Path(given).resolve()
    return False


def _resume_config(config: TrainConfig) -> TrainConfig:
    """What a resumed run uses: the saved configuration, except the `RESUME_OVERRIDES` fields of `config`."""
    saved = load_run_config(config.output)
    changes = {name: getattr(config, name) for name in RESUME_OVERRIDES}
    if changes["epochs"] is None:  # auto: the saved run's (resolved) epochs
        del changes["epochs"]
    return dataclasses.replace(saved, **changes, resume=True)


def _claim_output(config: TrainConfig, accelerator) -> None:
    """A new run must not overwrite an earlier one by accident: refuse an output folder holding a run, unless
    `force`, which deletes that run's files first (not its extracted data/)."""
    output = Path(config.output)
    held = [name for name in ("state", "state.prev", "state.old", "metrics.jsonl") if (output / name).exists()]
    if held and not config.force:
        raise ConfigError(
            f"{output} already holds a run ({held[0]}): continue it with --resume, choose another --output, "
            "or pass --force to start over there (its checkpoints and metrics are deleted)"
        )
    if not config.force:
        return
    if accelerator.is_main_process:  # every rank gets here (force is the same on all), whatever it saw on disk
        for name in ("state", "state.prev", "state.old", "best", "last", "analysis"):
            shutil.rmtree(output / name, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png", "ap.png", "README.md", "model.onnx", "ONNX_MISSING.txt"):
            (output / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def _make_accelerator(config: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one global state per process; a second run in the same process (tests, the app) may want
    # another mixed precision, which the old state would refuse.
    AcceleratorState._reset_state()
    # On a machine without CUDA, cpu=True makes several processes use gloo; otherwise each would train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision)
    if accelerator.device.type == "cpu" and config.mixed_precision == "fp16" and accelerator.is_main_process:
        # accelerate ignores fp16 on the CPU without a word
        print("finetune: --mixed-precision fp16 needs a CUDA GPU; on the CPU this run trains in float32 (bf16 is "
              "the CPU's mixed precision)", file=sys.stderr)  # fmt: skip
    if accelerator.device.type == "cpu":
        # torch gives every process a thread per core; K processes on the same cores then fight over them, and
        # oversubscribed OpenMP threads spin-wait each other (we measured steps 10x slower).
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(config.threads or max(1, (os.cpu_count() or 1) // local))
    return accelerator


def build_model(config: TrainConfig, id2label: dict[int, str]):
    """The model to fine-tune: a preset (random init) or a pretrained folder / hub id with heads for `id2label`.

    With a pretrained model, class heads whose shape changes (another number of labels) keep a fresh
    initialisation; with the same number of labels but other names they are re-initialised too, since the old
    classes mean nothing for the new ones. Everything else keeps its pretrained weights.
    """
    from lwdetr.checkpoint import load_config
    from lwdetr.config import PRESETS, preset_config
    from lwdetr.modeling import LwDetrForObjectDetection

    label2id = {name: label for label, name in id2label.items()}
    if config.model in PRESETS and not Path(config.model).exists():
        model_config = preset_config(config.model, num_labels=len(id2label), id2label=id2label, label2id=label2id)
        model = LwDetrForObjectDetection(model_config)
    else:
        base, _ = load_config(config.model)
        old = {int(k): v for k, v in base.id2label.items()}
        model = LwDetrForObjectDetection.from_pretrained(
            config.model, ignore_mismatched_sizes=True, id2label=id2label, label2id=label2id
        )
        if len(old) == len(id2label) and old != id2label:
            model.reset_class_heads()
    if config.freeze_backbone:
        model.model.backbone.backbone.requires_grad_(False)
    return model.train()


def _size_limits(model) -> tuple[int, int]:
    """(size divisor, smallest square side) of the model's inputs. The smallest side leaves at least
    `num_queries` tokens on the stride-`patch` feature map, which query selection needs."""
    vit = model.model.backbone.backbone
    divisor, patch = vit.size_divisor, vit.embeddings.patch_size
    side = math.ceil(math.sqrt(model.config.num_queries)) * patch
    return divisor, math.ceil(side / divisor) * divisor


def _datasets(config: TrainConfig, data, size_divisor: int, smallest: int):
    """(train dataset, its collate function, eval dataset); multi-scale sizes below `smallest` are left out."""
    from finetune.transforms import (
        DetectionDataset,
        MultiScaleCollate,
        build_eval_transform,
        build_train_transform,
        multiscale_sizes,
    )

    sizes = [config.image_size]
    if config.multi_scale:
        sizes = [size for size in multiscale_sizes(config.image_size, size_divisor) if size >= smallest]
    if config.augment:
        transform = build_train_transform(max(sizes), size_divisor)
    else:
        transform = build_eval_transform(max(sizes), size_divisor)
    train_set = DetectionDataset(data.train, transform, train=True, seed=config.seed)
    collate = MultiScaleCollate(sizes, seed=config.seed, size_divisor=size_divisor)
    val_set = DetectionDataset(data.val, build_eval_transform(config.image_size, size_divisor), train=False)
    return train_set, collate, val_set


def epoch_batches(num_items: int, epoch: int, seed: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches (lists of dataset indices) for `epoch`.

    One permutation per (seed, epoch), the same on every rank; rank r takes every world-th index from r, cut to
    an equal count per rank (the few left-over images wait for another epoch), so ranks see disjoint images and
    take the same number of steps, which DDP requires.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    per_rank = num_items // world
    mine = order[rank::world][:per_rank]
    return [mine[i : i + batch_size] for i in range(0, per_rank, batch_size)]


@dataclass
class _Plan:
    """Step counts, fixed at set-up."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    drop_step: int


def _plan(config: TrainConfig, num_train: int, world: int) -> _Plan:
    per_rank = num_train // world
    if per_rank == 0:
        raise ConfigError(f"{num_train} training images cannot be shared among {world} processes")
    batches = math.ceil(per_rank / config.batch_size)
    steps_per_epoch = math.ceil(batches / config.grad_accum)
    total = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_epochs * steps_per_epoch)
    # LW-DETR's StepLR drops the rate once; we drop it for the last third of the run.
    return _Plan(batches, steps_per_epoch, total, min(warmup, total), drop_step=round(total * 2 / 3))


# ------------------------------------------------------------------------------------------------ the run state


@dataclass
class _Run:
    """The live objects of one run, passed to the loop's helpers instead of a dozen arguments."""

    config: TrainConfig
    accelerator: Any
    model: Any  # prepared (DDP-wrapped when distributed)
    optimizer: Any
    ema: ModelEma | None
    train_set: Any
    collate: Any
    val_set: Any
    plan: _Plan
    progress: _Progress
    report_text: str
    callback: Callback | None
    output: Path
    clock: EtaClock = field(default_factory=lambda: EtaClock(0))
    resumed_from: str = ""  # the checkpoint this session resumed from, e.g. "state/ (epoch 2, step 12)"
    save_every: int | None = None  # steps between state saves within an epoch (None: not yet measured; 0: never)
    timing_start: tuple[float, int] | None = None  # (time.monotonic(), step) where the step timing began
    session_start: float = 0.0  # time.monotonic() when this session started training
    elapsed_before: float = 0.0  # training seconds of earlier sessions

    def touch_elapsed(self) -> None:
        self.progress.elapsed = self.elapsed_before + time.monotonic() - self.session_start

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def eval_model(self):
        """The weights that are evaluated and exported: the EMA when on."""
        return self.ema.module if self.ema is not None else self.unwrapped

    def emit(self, kind: str, metrics: dict[str, float] | None = None, message: str = "") -> None:
        if self.callback is None or not self.accelerator.is_main_process:
            return
        eta = None if kind in ("done", "stopped") else self.clock.eta(self.progress.step, self.plan.total_steps)
        epoch = min(self.progress.epoch + 1, self.config.epochs) if kind in ("start", "step") else self.progress.epoch
        self.callback(
            TrainEvent(
                kind=kind,
                step=self.progress.step,
                total_steps=self.plan.total_steps,
                epoch=epoch,
                epochs=self.config.epochs,
                metrics=dict(metrics or {}),
                message=message,
                eta_seconds=eta,
            )
        )


# ------------------------------------------------------------------------------------------------------ the loop


def train(
    config: TrainConfig, callback: Callback | None = None, stop_event: threading.Event | None = None
) -> TrainResult:
    """Fine-tune a detector as `config` says; see the module docstring for what lands in `config.output`.

    `callback(event)` receives `TrainEvent`s on the main process. Setting `stop_event` stops the run cleanly
    between two optimizer steps: last/ and state/ are saved, a `"stopped"` event is sent, and the result has
    `stopped=True`; `resume=True` continues from there. Raises `DataError` for unusable data and `ConfigError`
    for settings that cannot work (e.g. an image size the model cannot take).
    """
    if config.resume:
        config = _resume_config(config)
    _check_config(config)
    accelerator = _make_accelerator(config)
    if not config.resume and not config.dry_run:
        _claim_output(config, accelerator)
    data = _load_data(config, accelerator)
    if config.dry_run:
        return TrainResult(output_dir=Path(config.output), report=data.report.to_text())
    config, recipe_note = _resolve_defaults(config, data, accelerator)
    run = _setup(config, accelerator, data, callback)
    if config.resume and accelerator.is_main_process and run.progress.history:
        with disk_full_guard(run.output, _FILES_BYTES):
            _write_run_files(run)  # a kill after state/ was saved may have left them one epoch behind
    run.emit("start", message=_start_message(run) + recipe_note)
    while run.progress.epoch < config.epochs and run.progress.step < run.plan.total_steps:
        finished_epoch = _train_epoch(run, stop_event)
        if not finished_epoch:
            run.touch_elapsed()
            _save_guarded(run, last=True)
            run.emit("stopped", _last_metrics(run), f"stopped at step {run.progress.step}; resume with --resume")
            return _result(run, stopped=True)
        _end_epoch(run)
    _write_analysis(run)
    run.emit("done", _last_metrics(run), _done_message(run))
    return _result(run, stopped=False)


def _check_config(config: TrainConfig) -> None:
    if config.data is None:
        raise ConfigError("no training data given (config.data)")
    for name in ("epochs", "batch_size", "image_size", "grad_accum", "eval_every"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"schedule must be cosine, step or constant, got {config.schedule!r}")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {config.mixed_precision!r}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps must be at least 1, got {config.max_steps}")


def _resolve_defaults(config: TrainConfig, data, accelerator) -> tuple[TrainConfig, str]:
    """`config` with its auto fields filled (`finetune.defaults`), and a note on them for the start message."""
    from finetune.defaults import DataSize, resolve_config

    config, recipe = resolve_config(config, DataSize.of(data.train), accelerator.num_processes)
    if recipe is None:
        return config, ""
    note = f"settings (auto where not given): {recipe.describe()}"
    if accelerator.is_main_process:
        print(f"finetune: {note}", file=sys.stderr, flush=True)
    return config, f"; {note}"


def _load_data(config: TrainConfig, accelerator):
    from finetune.data import load_detection_data

    with accelerator.main_process_first():  # a zip is extracted once, by the main process, then reused
        return load_detection_data(
            config.data,
            config.val_data,
            val_fraction=config.val_fraction,
            seed=config.seed,
            work_dir=None if config.dry_run else Path(config.output) / "data",
        )


def _setup(config: TrainConfig, accelerator, data, callback: Callback | None) -> _Run:
    """Model, datasets, optimizer, EMA and, when resuming, the saved state."""

    torch.manual_seed(config.seed)  # the same initial weights on every rank
    random.seed(config.seed)
    np.random.seed(config.seed)
    output = Path(config.output)
    saved = None
    if config.resume:
        with accelerator.main_process_first():  # one process finishes interrupted saves, then all read
            if accelerator.is_main_process:
                repair_run_folder(output)
            saved = open_state(output, accelerator.device, primary=accelerator.is_main_process)
        model = saved.model
        if config.freeze_backbone:
            model.model.backbone.backbone.requires_grad_(False)
    else:
        model = build_model(config, data.id2label)
    divisor, smallest = _size_limits(model)
    if config.image_size % divisor or config.image_size < smallest:
        fit = max(smallest, round(config.image_size / divisor) * divisor)
        raise ConfigError(
            f"image size {config.image_size} does not fit this model: use a multiple of {divisor}, "
            f"at least {smallest} (e.g. {fit})"
        )
    train_set, collate, val_set = _datasets(config, data, divisor, smallest)
    plan = _plan(config, len(train_set), accelerator.num_processes)
    optimizer = build_optimizer(model, config.optimizer_settings())
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEma(accelerator.unwrap_model(model), config.ema_decay, config.ema_tau) if config.ema else None
    run = _Run(
        config,
        accelerator,
        model,
        optimizer,
        ema,
        train_set,
        collate,
        val_set,
        plan,
        _Progress(),
        data.report.to_text(),
        callback,
        output,
    )
    if saved is not None:
        _load_state(run, saved)
        run.resumed_from = saved.describe()
    run.clock = EtaClock(run.progress.step)
    run.session_start, run.elapsed_before = time.monotonic(), run.progress.elapsed
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
    return run


def _train_epoch(run: _Run, stop_event: threading.Event | None) -> bool:
    """Train on the rest of the current epoch; False if a stop request ended it early."""
    config, progress, acc = run.config, run.progress, run.accelerator
    epoch = progress.epoch
    run.train_set.set_epoch(epoch)
    run.collate.set_epoch(epoch)
    batches = epoch_batches(
        len(run.train_set), epoch, config.seed, config.batch_size, acc.process_index, acc.num_processes
    )[progress.batch_in_epoch :]
    loader = torch.utils.data.DataLoader(
        run.train_set,
        batch_sampler=batches,
        collate_fn=run.collate,
        num_workers=config.num_workers,
        pin_memory=acc.device.type == "cuda",
        persistent_workers=False,
        # its own generator: a loader otherwise draws its workers' seed from the global RNG, one draw per loader,
        # and a run resumed mid-epoch makes one more loader than an uninterrupted one
        generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch),
    )
    log = _LossLog(run)
    for micro_batches in _chunks(loader, config.grad_accum):
        losses, lr = _optimizer_step(run, micro_batches)
        progress.batch_in_epoch += len(micro_batches)
        log.add(losses)
        run.emit("step", {**log.read_if_due(), "lr": lr})
        crash_point("step")
        if progress.step >= run.plan.total_steps:
            break
        if _stop_requested(stop_event, acc):
            log.read()
            return False
        if progress.batch_in_epoch < run.plan.batches_per_epoch and _step_save_due(run):
            log.read()  # the epoch's loss sums so far belong in the state
            run.touch_elapsed()
            _save_guarded(run, last=False)
    log.read()
    return True


def _step_save_due(run: _Run) -> bool:
    """Whether to save state/ after this step: every `save_every_steps` steps, or, by default, about every
    `AUTO_SAVE_SECONDS` of training, as an interval in steps fixed from the first steps this session timed (the
    same on every rank: all must save at the same step)."""
    if run.save_every is None:
        if run.config.save_every_steps is not None:
            run.save_every = run.config.save_every_steps
        else:
            run.save_every = _auto_save_interval(run)
            if run.save_every is None:
                return False
    return run.save_every > 0 and run.progress.step % run.save_every == 0


def _auto_save_interval(run: _Run) -> int | None:
    if run.timing_start is None:  # the first step of the session pays for warm-up: time from its end
        run.timing_start = (time.monotonic(), run.progress.step)
        return None
    started, first_step = run.timing_start
    timed = run.progress.step - first_step
    if timed < _AUTO_SAVE_TIMED_STEPS:
        return None
    seconds = torch.tensor([(time.monotonic() - started) / timed], device=run.accelerator.device)
    if run.accelerator.num_processes > 1:
        seconds = run.accelerator.reduce(seconds, reduction="mean")
    return max(1, int(AUTO_SAVE_SECONDS / max(seconds.item(), 1e-6)))


class _LossLog:
    """The logged losses of the steps not yet read, summed where they were computed.

    Reading them (`tolist`) is free on the CPU, so there every step is read and reported. On a GPU it would wait
    for the device after every step, so they are read every `_DEVICE_READ_EVERY` steps and at the end of the epoch
    (and before a stop), and a step event in between reports the learning rate only. `read` adds the steps to the
    epoch's sums in `progress` and raises `FloatingPointError` on a non-finite loss.
    """

    def __init__(self, run: _Run):
        self.run = run
        self.sums: torch.Tensor | None = None  # float64 [len(LOGGED_LOSSES)]
        self.steps = 0

    def add(self, losses: torch.Tensor) -> None:
        self.sums = losses if self.sums is None else self.sums + losses
        self.steps += 1

    def read_if_due(self) -> dict[str, float]:
        """The mean losses of the steps since the last read when it is time to read them, else {}."""
        if self.sums is None:
            return {}
        progress, plan = self.run.progress, self.run.plan
        due = (
            host_sync.reads_are_free(self.sums)
            or progress.step % _DEVICE_READ_EVERY == 0
            or progress.step >= plan.total_steps
            or progress.batch_in_epoch >= plan.batches_per_epoch
        )
        return self.read() if due else {}

    def read(self) -> dict[str, float]:
        if self.sums is None:
            return {}
        sums, steps = self.sums.tolist(), self.steps
        self.sums, self.steps = None, 0
        progress = self.run.progress
        if not math.isfinite(sums[0]):
            raise FloatingPointError(f"the loss became {sums[0]} by step {progress.step}; try a lower --lr")
        progress.loss_steps += steps
        for name, value in zip(LOGGED_LOSSES, sums):
            progress.loss_sums[name] = progress.loss_sums.get(name, 0.0) + value
        return {name: value / steps for name, value in zip(LOGGED_LOSSES, sums)}


def _chunks(loader: Iterable, size: int) -> Iterable[list]:
    """Group consecutive micro-batches by `size` (the last group may be shorter)."""
    chunk = []
    for batch in loader:
        chunk.append(batch)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _stop_requested(stop_event: threading.Event | None, accelerator) -> bool:
    """Whether any rank was asked to stop (all ranks must stop at the same step, or DDP would hang)."""
    flag = stop_event is not None and stop_event.is_set()
    if accelerator.num_processes == 1:
        return flag
    votes = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), reduction="sum")
    return bool(votes.item() > 0)


def _optimizer_step(run: _Run, micro_batches: list) -> tuple[torch.Tensor, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the logged losses (float64
    [len(LOGGED_LOSSES)], means over the micro-batches, on the training device) and the learning rate.

    The host reads no device value here: the batch is copied without waiting, the pixel mask and the labels are
    checked on the host (the labels by the loss), and the losses stay on the device until `_LossLog` reads them.
    """
    acc, model, config = run.accelerator, run.model, run.config
    plan = run.plan
    factor = lr_factor(
        run.progress.step, plan.total_steps, plan.warmup_steps, config.schedule, config.min_lr_ratio, plan.drop_step
    )
    set_lr(run.optimizer, factor)
    losses = torch.zeros(len(LOGGED_LOSSES), dtype=torch.float64, device=acc.device)
    for index, (pixel_values, pixel_mask, targets) in enumerate(micro_batches):
        labels = [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in targets]
        # Nothing padded: no mask, which the model then needs not test on the device.
        mask = None if bool(pixel_mask.all()) else pixel_mask.to(acc.device, non_blocking=True)
        last = index == len(micro_batches) - 1
        # Gradients are all-reduced only on the last micro-batch of the step; earlier ones just accumulate.
        with contextlib.nullcontext() if last else acc.no_sync(model):
            out = model(pixel_values.to(acc.device, non_blocking=True), mask, labels=labels)
            acc.backward(out.loss / len(micro_batches))
        parts = [out.loss, *(out.loss_dict[k] for k in LOGGED_LOSSES[1:])]
        losses += torch.stack(parts).detach().double() / len(micro_batches)
    # Stop before a non-finite loss reaches the weights. On a GPU that check would wait for the device: `_LossLog`
    # makes it when it reads the losses.
    if host_sync.reads_are_free(losses) and not math.isfinite(loss := losses[0].item()):
        raise FloatingPointError(f"the loss became {loss} at step {run.progress.step}; try a lower --lr")
    if config.clip_grad > 0:
        acc.clip_grad_norm_(model.parameters(), config.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update(run.unwrapped)
    run.progress.step += 1
    return losses, config.lr * factor


# -------------------------------------------------------------------------------------------- epoch end, saving


def _end_epoch(run: _Run) -> None:
    """Evaluate (every `eval_every` epochs and after the last), log, save best/ last/ state/, report."""
    from finetune.evaluate import evaluate_split

    config, progress, acc = run.config, run.progress, run.accelerator
    progress.epoch += 1
    final = progress.epoch >= config.epochs or progress.step >= run.plan.total_steps
    metrics = {}
    if progress.epoch % config.eval_every == 0 or final:
        metrics = evaluate_split(run.eval_model, run.val_set, acc, config.batch_size, config.num_workers)
    run.touch_elapsed()
    row = {
        "epoch": progress.epoch,
        "step": progress.step,
        **_epoch_losses(run),
        "lr": _current_lr(run),
        **metrics,
        "time": round(progress.elapsed, 2),
    }
    progress.history.append(row)
    progress.loss_sums, progress.loss_steps, progress.batch_in_epoch = {}, 0, 0
    improved = "AP" in metrics and metrics["AP"] > progress.best_ap
    if improved:
        progress.best_ap, progress.best_epoch = metrics["AP"], progress.epoch
    _save_guarded(run, last=True, best_row=row if improved else None)
    crash_point("epoch-saved")
    if acc.is_main_process:
        with disk_full_guard(run.output, _FILES_BYTES):
            _write_run_files(run)
    ap_text = f"AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f}" if metrics else "not evaluated"
    run.emit("epoch", row, f"epoch {progress.epoch}/{config.epochs}: loss {row.get('loss', math.nan):.3f}, {ap_text}")


def _epoch_losses(run: _Run) -> dict[str, float]:
    """Mean per-step training losses of the epoch, averaged over the processes."""
    progress = run.progress
    values = torch.tensor(
        [progress.loss_sums.get(k, 0.0) for k in LOGGED_LOSSES] + [float(progress.loss_steps)],
        device=run.accelerator.device,
    )
    if run.accelerator.num_processes > 1:
        values = run.accelerator.reduce(values, reduction="sum")
    steps = max(values[-1].item(), 1.0)
    return {name: round(values[i].item() / steps, 5) for i, name in enumerate(LOGGED_LOSSES)}


def _current_lr(run: _Run) -> float:
    """The learning rate of the base groups (`config.lr` times the schedule's factor)."""
    group = run.optimizer.param_groups[0]
    return run.config.lr * group["lr"] / group["base_lr"]


def _eval_part(row: dict[str, Any]) -> dict[str, float]:
    """The evaluation metrics of a history row (AP..., AR..., AP/<class>)."""
    return {k: v for k, v in row.items() if k.startswith(("AP", "AR"))}


def _save_guarded(run: _Run, last: bool, best_row: dict[str, Any] | None = None) -> None:
    """Save best/ (when `best_row`, the improved epoch's metrics, is given), last/ (when `last`) and state/; a full
    disk becomes a one-line `DiskFullError` saying how many bytes these folders need."""
    folders = (best_row is not None) + last
    model_bytes = _tensor_bytes(run.unwrapped.state_dict())
    needed = model_bytes * (folders + 1 + (run.ema is not None)) + _tensor_bytes(run.optimizer.state_dict()["state"])
    with disk_full_guard(run.output, needed + _FILES_BYTES):
        if run.accelerator.is_main_process and best_row is not None:
            save_model_folder(run.eval_model, run.config.image_size, run.output / "best", _card(run, best_row))
        if last:
            _save_last_and_state(run)
        else:
            _save_state(run)


def _tensor_bytes(tree: Any) -> int:
    """The bytes of the tensors in a (nested) dict or list."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


def _write_run_files(run: _Run) -> None:
    """metrics.jsonl, loss.png, ap.png and README.md from the run's history (main process)."""
    progress = run.progress
    write_metrics_jsonl(run.output / "metrics.jsonl", progress.history)
    plot_history(progress.history, run.output)
    best_row = next((r for r in progress.history if r["epoch"] == progress.best_epoch), None)
    atomic_write_text(run.output / "README.md", _card(run, best_row))


def _save_last_and_state(run: _Run) -> None:
    if run.accelerator.is_main_process:
        evaluated = next((r for r in reversed(run.progress.history) if "AP" in r), None)
        save_model_folder(run.eval_model, run.config.image_size, run.output / "last", _card(run, evaluated))
    _save_state(run)


def _card(run: _Run, row: dict[str, Any] | None) -> str:
    """The model card, with the metrics of history `row` (an evaluated epoch) when given."""
    config = run.config
    hidden = {"command", "dry_run", "resume", "force"}
    hyperparameters = {k: v for k, v in dataclasses.asdict(config).items() if k not in hidden}
    hyperparameters["processes"] = run.accelerator.num_processes
    return model_card(
        title=f"LW-DETR fine-tuned from `{config.model}`",
        command=config.command or config.to_command(),
        hyperparameters=hyperparameters,
        data_summary=run.report_text,
        metrics=_eval_part(row) if row else {},
        epoch=row["epoch"] if row else None,
        id2label=run.unwrapped.config.id2label,
        ema=config.ema,
    )


def _write_analysis(run: _Run) -> None:
    """The finished run's per-class AP, precision-recall curves, validation gallery and model.onnx, of best/ (see
    `finetune.analysis`); every process predicts its share, the main process writes."""
    from finetune.analysis import write_analysis, write_onnx
    from finetune.evaluate import gather_detections
    from lwdetr.modeling import LwDetrForObjectDetection

    best = run.output / "best"
    if not (best / "config.json").is_file():
        return
    model = LwDetrForObjectDetection.from_pretrained(best).to(run.accelerator.device)
    detections = gather_detections(model, run.val_set, run.accelerator, run.config.batch_size, run.config.num_workers)
    if run.accelerator.is_main_process:
        with disk_full_guard(run.output, _FILES_BYTES + 2 * _tensor_bytes(model.state_dict())):
            write_analysis(run.output, run.val_set.split, detections)
            write_onnx(model, run.config.image_size, run.output)


def _last_metrics(run: _Run) -> dict[str, float]:
    return dict(run.progress.history[-1]) if run.progress.history else {}


def _start_message(run: _Run) -> str:
    config, plan = run.config, run.plan
    where = "starting"
    if config.resume:
        where = f"resuming from {run.resumed_from} at epoch {run.progress.epoch + 1}, step {run.progress.step}"
    return (
        f"{where}: {len(run.train_set)} train / {len(run.val_set)} val images, {config.epochs} epochs x "
        f"{plan.steps_per_epoch} steps = {plan.total_steps} steps on {run.accelerator.num_processes} process(es), "
        f"device {run.accelerator.device}"
    )


def _done_message(run: _Run) -> str:
    best = run.progress.best_ap
    best_text = f"best AP {best:.3f} at epoch {run.progress.best_epoch}" if best >= 0 else "no evaluation"
    return f"done: {run.progress.epoch} epochs, {run.progress.step} steps, {best_text}; saved in {run.output}"


def _result(run: _Run, stopped: bool) -> TrainResult:
    progress, output = run.progress, run.output
    best = output / "best"
    return TrainResult(
        output_dir=output,
        best_dir=best if best.is_dir() else None,
        last_dir=output / "last",
        best_ap=progress.best_ap if progress.best_ap >= 0 else None,
        best_epoch=progress.best_epoch,
        epochs_completed=progress.epoch,
        step=progress.step,
        total_steps=run.plan.total_steps,
        stopped=stopped,
        metrics=_eval_part(progress.history[-1]) if progress.history else {},
        history=list(progress.history),
        report=run.report_text,
    )
