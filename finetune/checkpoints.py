"""What a run saves and when: best/, last/ and state/ under a disk-full guard (every `save_every_steps` steps, or
about every `AUTO_SAVE_SECONDS`, and at epoch ends), the run files (metrics.jsonl, plots, model card) and, at the
end, the analysis and ONNX export of the weights the run offers (best/, else last/). The files themselves are
written by `finetune.export` and `finetune.state`, atomically."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

import torch

from finetune.export import (
    atomic_write_text,
    disk_full_guard,
    model_card,
    plot_history,
    save_model_folder,
    write_metrics_jsonl,
)
from finetune.result import eval_metrics, offered_model_dir
from finetune.state import save_state

if TYPE_CHECKING:
    from finetune.train import Run

__all__ = [
    "AUTO_SAVE_SECONDS",
    "FILES_BYTES",
    "save_checkpoints",
    "step_save_due",
    "write_final_analysis",
    "write_run_files",
]

# Without --save-every-steps a run saves its state about this often (from the measured step time), so that a kill
# loses at most this much work.
AUTO_SAVE_SECONDS = 600.0
# Steps timed (after the first of a session) before the automatic interval is fixed.
_AUTO_SAVE_TIMED_STEPS = 5
# Room for metrics.jsonl, the plots, the model cards and the configs of a save.
FILES_BYTES = 1 << 20


def step_save_due(run: Run) -> bool:
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


def _auto_save_interval(run: Run) -> int | None:
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


def save_checkpoints(run: Run, last: bool, best_row: dict[str, Any] | None = None) -> None:
    """Save best/ (when `best_row`, the improved epoch's metrics, is given), last/ (when `last`) and state/; a full
    disk becomes a one-line `DiskFullError` saying how many bytes these folders need."""
    folders = (best_row is not None) + last
    model_bytes = _tensor_bytes(run.unwrapped.state_dict())
    needed = model_bytes * (folders + 1 + (run.ema is not None)) + _tensor_bytes(run.optimizer.state_dict()["state"])
    with disk_full_guard(run.output, needed + FILES_BYTES):
        if run.accelerator.is_main_process and best_row is not None:
            save_model_folder(run.eval_model, run.config.image_size, run.output / "best", _card(run, best_row))
        if last:
            _save_last_and_state(run)
        else:
            save_state(run)


def _tensor_bytes(tree: Any) -> int:
    """The bytes of the tensors in a (nested) dict or list."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_tensor_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_tensor_bytes(v) for v in tree)
    return 0


# Plotting takes about 0.3 s, as long as a few training steps: with short epochs (a small dataset) the plots are
# redrawn at most this often, and always at a session's end.
PLOT_EVERY_SECONDS = 30.0


def write_run_files(run: Run, plots: bool = True) -> None:
    """metrics.jsonl and README.md from the run's history, and loss.png and ap.png when `plots` or
    `PLOT_EVERY_SECONDS` have passed since they were drawn (main process)."""
    progress = run.progress
    write_metrics_jsonl(run.output / "metrics.jsonl", progress.history)
    if plots or time.monotonic() - run.plotted_at >= PLOT_EVERY_SECONDS:
        plot_history(progress.history, run.output)
        run.plotted_at = time.monotonic()
    best_row = next((r for r in progress.history if r["epoch"] == progress.best_epoch), None)
    atomic_write_text(run.output / "README.md", _card(run, best_row))


def _save_last_and_state(run: Run) -> None:
    if run.accelerator.is_main_process:
        evaluated = next((r for r in reversed(run.progress.history) if "AP" in r), None)
        save_model_folder(run.eval_model, run.config.image_size, run.output / "last", _card(run, evaluated))
    save_state(run)


def _card(run: Run, row: dict[str, Any] | None) -> str:
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
        metrics=eval_metrics(row) if row else {},
        epoch=row["epoch"] if row else None,
        id2label=run.unwrapped.config.id2label,
        ema=config.ema,
    )


def write_final_analysis(run: Run) -> None:
    """The finished run's per-class AP, precision-recall curves, validation gallery and model.onnx, of the weights it
    offers (best/, else last/: `offered_model_dir`; see `finetune.analysis`); every process predicts its share, the
    main process writes."""
    from finetune.analysis import write_analysis, write_onnx
    from finetune.evaluate import gather_detections
    from lwdetr.modeling import LwDetrForObjectDetection

    model_dir = offered_model_dir(run.output)
    if model_dir is None:
        return
    model = LwDetrForObjectDetection.from_pretrained(model_dir).to(run.accelerator.device)
    config = run.config
    detections = gather_detections(
        model, run.val_set, run.accelerator, config.batch_size, config.num_workers, image_size=config.image_size
    )
    if run.accelerator.is_main_process:
        with disk_full_guard(run.output, FILES_BYTES + 2 * _tensor_bytes(model.state_dict())):
            write_analysis(run.output, run.val_set.split, detections)
            write_onnx(model, run.config.image_size, run.output)
