"""Command line: `python -m finetune --data PATH --model nano --epochs 10 --image-size 256 --output runs/x`.

Every `TrainConfig` field is an option (`field_name` -> `--field-name`; booleans also have `--no-...`). The same
command runs unchanged under `accelerate launch` or `torchrun --nproc_per_node K` (K processes, data shared out).
Data problems print one line and exit with status 2; `--dry-run` prints the data validation report and exits 0.

Resuming: `--resume --output RUN`, or `--resume` alone inside the run folder (else the default --output). The run
continues in the folder given, wherever it now is (moved or copied), with its saved settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import signal
import sys
import threading
import typing
from collections.abc import Iterator
from pathlib import Path

from finetune.config import TrainConfig

HELP = {
    "data": "training data: a Roboflow/COCO export folder (train/ valid/ test/), a COCO .json, a .zip of either, "
    "or a Hugging Face dataset (save_to_disk folder or hub id)",
    "val_data": "a separate validation set (same forms); default: the data's own valid/ split, else a held-out "
    "share of train (--val-fraction)",
    "model": "starting point: a preset name (nano, tiny, small, medium, large, xlarge; random init), a local "
    "HF-format folder or a hub id (heads re-initialised for your classes)",
    "output": "run folder: best/, last/, state/, metrics.jsonl, events.jsonl, plots, README.md (a new run refuses a "
    "folder that holds one: see --resume and --force)",
    "epochs": "number of epochs (with --resume: the total to reach); auto: about 1000 optimizer steps from a "
    "pretrained checkpoint (at least 10 epochs), 2700 from a demo model or from scratch (at least 12), at most 300 "
    "epochs",
    "batch_size": "images per process and micro-batch (auto: 8 for nano, else 4)",
    "image_size": "square training/eval size in pixels; a multiple of the model's size divisor (32 for nano, 64 for "
    "the published presets); auto: 640 from a pretrained checkpoint, 320 for nano otherwise, never above the "
    "data's typical image side",
    "lr": "base learning rate (projector, query selection, heads; the decoder gets lr x component decay); auto: 1e-4 "
    "from a pretrained checkpoint (LW-DETR's), 1e-3 from a demo model or from scratch",
    "lr_encoder": "ViT learning rate before layer-wise decay (auto: 1.5 x lr, LW-DETR's 1.5e-4 for 1e-4)",
    "weight_decay": "AdamW weight decay (none on biases, norms, layer scales, embeddings)",
    "layer_decay": "layer-wise learning-rate decay of the ViT per block from the top (auto: 0.8 from a pretrained "
    "checkpoint, 1.0 from a demo model or from scratch)",
    "component_decay": "decoder lr factor, the ViT gets its square (LW-DETR's lr_component_decay; auto: 0.7 from a "
    "pretrained checkpoint, 1.0 otherwise)",
    "warmup_epochs": "linear warmup length in epochs (auto: see --warmup-steps)",
    "warmup_steps": "linear warmup length in optimizer steps (overrides --warmup-epochs); auto: one epoch, at least "
    "50 steps, at most a fifth of the run",
    "schedule": "learning-rate decay after warmup: cosine, step (x0.1 for the last third) or constant",
    "min_lr_ratio": "final cosine learning rate as a fraction of the base rate",
    "grad_accum": "micro-batches per optimizer step (effective batch = batch size x grad accum x processes)",
    "clip_grad": "gradient clipping max norm (0 disables)",
    "mixed_precision": "no, fp16 (CUDA) or bf16",
    "ema": "evaluate and export an exponential moving average of the weights",
    "ema_decay": "EMA decay (warmed up over --ema-tau updates)",
    "ema_tau": "EMA warmup: decay x (1 - exp(-updates / tau))",
    "freeze_backbone": "do not train the ViT encoder",
    "multi_scale": "random square size per batch in 0.7..1.4 x image size (auto: on from a pretrained checkpoint, "
    "off otherwise)",
    "augment": "flip, box-safe random crop and colour jitter",
    "resume": "continue the run in --output (default: the current folder when it holds a run) from its last "
    "checkpoint, wherever the folder now is; its saved settings are used (--epochs, --max-steps, --eval-every, "
    "--num-workers, --threads and --save-every-steps may be changed; other settings that differ are refused)",
    "force": "start a new run in an --output folder that already holds one, deleting its checkpoints and metrics",
    "save_every_steps": "also save the state every N optimizer steps within an epoch, so that a kill loses at most "
    "N steps (resume is exact); default: about every 10 minutes, from the measured step time; 0: epoch ends only",
    "num_workers": "DataLoader worker processes per training process (auto: none when training on a CPU with 4 or "
    "fewer cores per process, whose cores the model needs; on a GPU, the process's cores less one, at most 8)",
    "threads": "torch CPU threads per process (default: the cores shared among the local processes)",
    "seed": "random seed (weights, shuffling, augmentation, validation hold-out)",
    "eval_every": "evaluate every N epochs (and always after the last)",
    "max_steps": "stop after this many optimizer steps in total (quick runs)",
    "val_fraction": "share of train held out for validation when the data has no validation split",
    "dry_run": "load and check the data, print the validation report, exit",
    "command": argparse.SUPPRESS,
}


def build_parser() -> argparse.ArgumentParser:
    """One option per `TrainConfig` field, typed from the dataclass."""
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune LW-DETR on a detection dataset (COCO / Roboflow export). Options marked auto are "
        "chosen for the base model and the data when not given (finetune.defaults); the run prints and records "
        "the values used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for spec in dataclasses.fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        kind = hints[spec.name]
        scalar = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # `int | None` -> int
        # SUPPRESS keeps options that were not given out of the namespace, so --resume can tell them apart (and
        # the auto defaults of finetune.defaults apply to them).
        common = {"help": HELP[spec.name], "default": argparse.SUPPRESS}
        if scalar is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), **common)
        else:
            parser.add_argument(flag, type=scalar, metavar=spec.name.upper(), **common)
    return parser


def config_from_args(argv: list[str]) -> TrainConfig:
    """The configuration `argv` gives (`TrainConfig.to_args` writes such arguments), its command line recorded in
    `command`; with --resume, the run's saved one with the changes a resume allows (`resume_config`)."""
    given = vars(build_parser().parse_args(argv))
    given["command"] = shlex.join(["python", "-m", "finetune", *argv])
    if given.get("resume"):
        from finetune.config import resume_config

        given.pop("command")  # the model card keeps the command that started the run
        given.pop("resume")
        return resume_config(given.pop("output", None) or _default_run_folder(), **given)
    return TrainConfig(**given)


def _default_run_folder() -> str:
    """`--resume` without --output: the current folder when it is a run, else the default output."""
    here = Path.cwd()
    if any((here / name / "trainer.json").is_file() for name in ("state", "state.old", "state.prev")):
        return str(here)
    return TrainConfig.output


def _prepare_cpu_kernels(config: TrainConfig) -> None:
    """Build our CPU kernels before the first step (once per machine, one rank at a time), so that every step of a
    run, and of its resumption, runs the same ops; says which are active."""
    import torch

    if config.dry_run or torch.cuda.is_available():
        return
    from lwdetr.cpu import prepare_kernels

    print(f"finetune: {prepare_kernels()}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from finetune.callbacks import EventLog, TqdmProgress, fan_out
    from finetune.errors import ConfigError, DataError, DiskFullError
    from finetune.train import train
    from lwdetr.hub import ModelNotFoundError

    progress = TqdmProgress()
    try:
        config = config_from_args(argv)
        if config.data is None and not config.resume:
            raise ConfigError("--data is required (or --resume with --output of an earlier run)")
        _prepare_cpu_kernels(config)
        callback = fan_out(progress, EventLog(Path(config.output) / "events.jsonl"))
        with _stop_on_signals() as stop:
            result = train(config, callback=callback, stop_event=stop)
    except (DataError, ConfigError, ModelNotFoundError, DiskFullError) as error:
        progress.close()
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    if config.dry_run:
        print(result.report)
    return 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGTERM (how the app, a scheduler or `accelerate launch` stops a job) and a first Ctrl-C stop the run at the
    next optimizer step with last/ and state/ saved, so `--resume` continues it; a second Ctrl-C interrupts at once."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signal handlers live on the main thread
        yield stop
        return

    def handle(signum, frame) -> None:
        stop.set()
        signal.signal(signal.SIGINT, previous[signal.SIGINT])

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _one_line(error: BaseException) -> str:
    """The error's message on one line. A DataLoader worker's error arrives wrapped in its traceback text
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): its last line is the message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        prefix = f"{type(error).__module__}.{type(error).__name__}: "
        return last.removeprefix(prefix).removeprefix(f"{type(error).__name__}: ")
    return " ".join(lines)


if __name__ == "__main__":
    sys.exit(main())
