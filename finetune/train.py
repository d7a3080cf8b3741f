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
    analysis/  model.onnx at the end of a run, of best/ (else last/): per-class AP, precision-recall curves, a
                          validation gallery (`finetune.analysis`) and the ONNX export
    result.json           the `TrainResult` of a session that ended (done or stopped; `finetune.result`)

All writes are atomic (see `finetune.export`): a kill at any moment leaves the previous good version, and a resume
repairs the folder first. A new run refuses a folder that holds one (unless `force`).

The loop's parts live beside it: `finetune.config` (`TrainConfig`, resume settings), `finetune.build` (accelerator,
model, datasets), `finetune.checkpoints` (what is saved, and when), `finetune.loss_log` (the logged losses),
`finetune.state` (the run state on disk) and `finetune.result` (`TrainResult`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.build import build_model, load_data, make_accelerator, make_datasets, size_limits
from finetune.callbacks import Callback, EtaClock, TrainEvent
from finetune.checkpoints import (
    FILES_BYTES,
    save_checkpoints,
    step_save_due,
    write_final_analysis,
    write_run_files,
)
from finetune.config import TrainConfig, check_config, resumed_config
from finetune.ema import ModelEma
from finetune.errors import ConfigError
from finetune.export import disk_full_guard
from finetune.faults import crash_point
from finetune.loss_log import LOGGED_LOSSES, LossLog, epoch_losses
from finetune.optim import build_optimizer, lr_factor, set_lr
from finetune.result import RESULT_FILE, TrainResult, eval_metrics, offered_model_dir, write_result
from finetune.state import Progress as _Progress
from finetune.state import apply_state as _load_state
from finetune.state import claim_run_folder, open_state, repair_run_folder
from lwdetr import host_sync

__all__ = ["Run", "TrainConfig", "TrainResult", "epoch_batches", "train"]


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
class Run:
    """The live objects of one run, passed to the loop's helpers (here, `finetune.checkpoints`, `finetune.loss_log`,
    `finetune.state`) instead of a dozen arguments."""

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
    plotted_at: float = -math.inf  # time.monotonic() when loss.png and ap.png were last drawn

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
        config = resumed_config(config)
    check_config(config)
    accelerator = make_accelerator(config)
    if not config.resume and not config.dry_run:
        claim_run_folder(config.output, config.force, accelerator)
    data = load_data(config, accelerator)
    if config.dry_run:
        return TrainResult(output_dir=Path(config.output), report=data.report.to_text())
    config, recipe_note = _resolve_defaults(config, data, accelerator)
    run = _setup(config, accelerator, data, callback)
    if config.resume and accelerator.is_main_process and run.progress.history:
        with disk_full_guard(run.output, FILES_BYTES):
            write_run_files(run)  # a kill after state/ was saved may have left them one epoch behind
    run.emit("start", message=_start_message(run) + recipe_note)
    while run.progress.epoch < config.epochs and run.progress.step < run.plan.total_steps:
        finished_epoch = _train_epoch(run, stop_event)
        if not finished_epoch:
            run.touch_elapsed()
            save_checkpoints(run, last=True)
            if accelerator.is_main_process and run.progress.history:
                with disk_full_guard(run.output, FILES_BYTES):
                    write_run_files(run)  # the plots may be up to PLOT_EVERY_SECONDS behind
            return _end_session(run, "stopped", f"stopped at step {run.progress.step}; resume with --resume")
        _end_epoch(run)
    write_final_analysis(run)
    return _end_session(run, "done", _done_message(run))


def _resolve_defaults(config: TrainConfig, data, accelerator) -> tuple[TrainConfig, str]:
    """`config` with its auto fields filled (`finetune.defaults`), and a note on them for the start message (which
    the CLI prints and events.jsonl keeps)."""
    from finetune.defaults import DataSize, loader_workers, resolve_config

    config, recipe = resolve_config(config, DataSize.of(data.train), accelerator.num_processes)
    if config.num_workers is None:
        workers = loader_workers(accelerator.device.type, accelerator.num_processes)
        config = dataclasses.replace(config, num_workers=workers)
    return config, "" if recipe is None else f"; settings (auto where not given): {recipe.describe()}"


def _setup(config: TrainConfig, accelerator, data, callback: Callback | None) -> Run:
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
                (output / RESULT_FILE).unlink(missing_ok=True)  # the last session's: this one writes its own
            saved = open_state(output, accelerator.device, primary=accelerator.is_main_process)
        model = saved.model
        if config.freeze_backbone:
            model.model.backbone.backbone.requires_grad_(False)
    else:
        model = build_model(config, data.id2label)
    divisor, smallest = size_limits(model)
    if config.image_size % divisor or config.image_size < smallest:
        fit = max(smallest, round(config.image_size / divisor) * divisor)
        raise ConfigError(
            f"image size {config.image_size} does not fit this model: use a multiple of {divisor}, "
            f"at least {smallest} (e.g. {fit})"
        )
    train_set, collate, val_set = make_datasets(config, data, divisor, smallest)
    plan = _plan(config, len(train_set), accelerator.num_processes)
    optimizer = build_optimizer(model, config.optimizer_settings())
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = ModelEma(accelerator.unwrap_model(model), config.ema_decay, config.ema_tau) if config.ema else None
    run = Run(
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


def _train_epoch(run: Run, stop_event: threading.Event | None) -> bool:
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
    log = LossLog(run)
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
        if progress.batch_in_epoch < run.plan.batches_per_epoch and step_save_due(run):
            log.read()  # the epoch's loss sums so far belong in the state
            run.touch_elapsed()
            save_checkpoints(run, last=False)
    log.read()
    return True


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


def _optimizer_step(run: Run, micro_batches: list) -> tuple[torch.Tensor, float]:
    """One optimizer step over `micro_batches` (gradient accumulation); returns the logged losses (float64
    [len(LOGGED_LOSSES)], means over the micro-batches, on the training device) and the learning rate.

    The host reads no device value here: the batch is copied without waiting, the pixel mask and the labels are
    checked on the host (the labels by the loss), and the losses stay on the device until `LossLog` reads them.
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
    # Stop before a non-finite loss reaches the weights. On a GPU that check would wait for the device: `LossLog`
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


# ------------------------------------------------------------------------------------------------------ epoch end


def _end_epoch(run: Run) -> None:
    """Evaluate (every `eval_every` epochs and after the last), log, save best/ last/ state/, report."""
    from finetune.evaluate import evaluate_split

    config, progress, acc = run.config, run.progress, run.accelerator
    progress.epoch += 1
    final = progress.epoch >= config.epochs or progress.step >= run.plan.total_steps
    metrics = {}
    if progress.epoch % config.eval_every == 0 or final:
        metrics = evaluate_split(
            run.eval_model, run.val_set, acc, config.batch_size, config.num_workers, image_size=config.image_size
        )
    run.touch_elapsed()
    row = {
        "epoch": progress.epoch,
        "step": progress.step,
        **epoch_losses(run),
        "lr": _current_lr(run),
        **metrics,
        "time": round(progress.elapsed, 2),
    }
    progress.history.append(row)
    progress.loss_sums, progress.loss_steps, progress.batch_in_epoch = {}, 0, 0
    improved = "AP" in metrics and metrics["AP"] > progress.best_ap
    if improved:
        progress.best_ap, progress.best_epoch = metrics["AP"], progress.epoch
    save_checkpoints(run, last=True, best_row=row if improved else None)
    crash_point("epoch-saved")
    if acc.is_main_process:
        with disk_full_guard(run.output, FILES_BYTES):
            write_run_files(run, plots=final)
    ap_text = f"AP {metrics['AP']:.3f} AP50 {metrics['AP50']:.3f}" if metrics else "not evaluated"
    run.emit("epoch", row, f"epoch {progress.epoch}/{config.epochs}: loss {row.get('loss', math.nan):.3f}, {ap_text}")


def _current_lr(run: Run) -> float:
    """The learning rate of the base groups (`config.lr` times the schedule's factor)."""
    group = run.optimizer.param_groups[0]
    return run.config.lr * group["lr"] / group["base_lr"]


def _last_metrics(run: Run) -> dict[str, float]:
    return dict(run.progress.history[-1]) if run.progress.history else {}


def _start_message(run: Run) -> str:
    config, plan = run.config, run.plan
    where = "starting"
    if config.resume:
        where = f"resuming from {run.resumed_from} at epoch {run.progress.epoch + 1}, step {run.progress.step}"
    return (
        f"{where}: {len(run.train_set)} train / {len(run.val_set)} val images, {config.epochs} epochs x "
        f"{plan.steps_per_epoch} steps = {plan.total_steps} steps on {run.accelerator.num_processes} process(es), "
        f"device {run.accelerator.device}"
    )


def _done_message(run: Run) -> str:
    best = run.progress.best_ap
    best_text = f"best AP {best:.3f} at epoch {run.progress.best_epoch}" if best >= 0 else "no evaluation"
    return f"done: {run.progress.epoch} epochs, {run.progress.step} steps, {best_text}; saved in {run.output}"


def _end_session(run: Run, kind: str, message: str) -> TrainResult:
    """The session's result, written to result.json (main process) before its last event (`kind`) is sent: a
    program that follows the events finds the result there once it sees "done" or "stopped"."""
    result = _result(run, stopped=kind == "stopped")
    if run.accelerator.is_main_process:
        with disk_full_guard(run.output, FILES_BYTES):
            write_result(result)
    run.emit(kind, _last_metrics(run), message)
    return result


def _result(run: Run, stopped: bool) -> TrainResult:
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
        metrics=eval_metrics(progress.history[-1]) if progress.history else {},
        history=list(progress.history),
        report=run.report_text,
        model_dir=offered_model_dir(output),
    )
