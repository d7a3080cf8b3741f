"""`TrainConfig`: everything a fine-tuning run needs, as plain data; and the configuration of a resumed run (the
saved one, with the few settings a resume may change)."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from finetune.errors import ConfigError
from finetune.state import saved_config

if TYPE_CHECKING:
    from finetune.optim import OptimizerSettings

__all__ = [
    "RESUME_OVERRIDES",
    "TrainConfig",
    "check_config",
    "config_from_json",
    "load_run_config",
    "resume_config",
    "resumed_config",
]

# Fields a resumed run takes from the config passed to `train` rather than from the saved run: to extend or re-pace
# it. Everything else comes from the saved configuration; build the config with `resume_config(output)`.
RESUME_OVERRIDES = ("epochs", "max_steps", "eval_every", "num_workers", "threads", "dry_run", "save_every_steps")
# The fields a model card's command names even at their defaults.
_ALWAYS_SHOWN = ("data", "model", "output", "epochs", "batch_size", "image_size", "lr")


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
    num_workers: int | None = None  # DataLoader workers per process; None: auto (`defaults.loader_workers`)
    threads: int | None = None  # torch CPU threads per process; None: the machine's cores shared among processes
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    max_steps: int | None = None  # stop after this many optimizer steps in total (quick runs)
    val_fraction: float = 0.15  # held-out share of train when the data has no validation split
    dry_run: bool = False  # load and check the data, return its report, train nothing
    command: str | None = None  # the command line, recorded in the model card

    def to_args(self) -> list[str]:
        """This configuration as `python -m finetune` arguments, how it crosses into another process (the app's
        training child): each field that differs from its default as `--field-name VALUE` (the flag of field `a_b`
        is `--a-b`; booleans `--a-b` / `--no-a-b`), in field order. `command` is left out: it records the command
        line these arguments make. `finetune.__main__.config_from_args` reads them back to this configuration."""
        return self._args(shown=())

    def to_command(self) -> str:
        """The `python -m finetune ...` command line that starts this run, for the model card: without --resume,
        --force and --dry-run, and naming the data, model, output and main hyperparameters even at their defaults."""
        started = dataclasses.replace(self, resume=False, force=False, dry_run=False)
        return shlex.join(["python", "-m", "finetune", *started._args(shown=_ALWAYS_SHOWN)])

    def _args(self, shown: tuple[str, ...]) -> list[str]:
        """`--flag value` pairs for the fields that differ from their defaults, and for the `shown` ones."""
        defaults, args = TrainConfig(), []
        for spec in dataclasses.fields(self):
            value, default = getattr(self, spec.name), getattr(defaults, spec.name)
            if spec.name == "command" or (value is None and default is None):
                continue
            if spec.name not in shown and value == default:
                continue
            flag = "--" + spec.name.replace("_", "-")
            if value is None:
                raise ConfigError(f"{flag} has no command-line form for None (its default is {default!r})")
            if isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            elif str(value).startswith("-"):
                args.append(f"{flag}={value}")  # argparse would take a separate "-x" for an option
            else:
                args += [flag, str(value)]  # str(float) is its shortest exact form: it reads back equal
        return args

    def optimizer_settings(self) -> OptimizerSettings:
        """LW-DETR's groups, with this configuration's rates and decays (resolved: see `finetune.defaults`)."""
        from finetune.optim import OptimizerSettings

        values = (self.lr, self.lr_encoder, self.weight_decay, self.layer_decay, self.component_decay)
        if any(value is None for value in values):
            raise ConfigError("the learning rates and decays are not resolved yet (finetune.defaults.resolve_config)")
        return OptimizerSettings(*values)


def load_run_config(output: str | Path) -> TrainConfig:
    """The configuration saved in the run at `output` (for `--resume`), with `output` as its run folder wherever the
    run now is (moved or copied). An interrupted save is finished first."""
    return dataclasses.replace(config_from_json(saved_config(output)), output=str(output))


def config_from_json(values: dict[str, Any]) -> TrainConfig:
    """A configuration saved as JSON (its `dataclasses.asdict`) by this or an earlier version, in a run's state or
    the app's run record: fields this version no longer has are left out and new ones take their defaults, so that
    an older run still resumes."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


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


def resumed_config(config: TrainConfig) -> TrainConfig:
    """What a resumed run uses: the saved configuration, except the `RESUME_OVERRIDES` fields of `config`."""
    saved = load_run_config(config.output)
    changes = {name: getattr(config, name) for name in RESUME_OVERRIDES}
    if changes["epochs"] is None:  # auto: the saved run's (resolved) epochs
        del changes["epochs"]
    return dataclasses.replace(saved, **changes, resume=True)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot work (`ConfigError`, one line)."""
    if config.data is None:
        raise ConfigError("no training data given (config.data)")
    for name in ("epochs", "batch_size", "image_size", "grad_accum", "eval_every"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(config, name)}")
    if config.schedule not in ("cosine", "step", "constant"):
        raise ConfigError(f"schedule must be cosine, step or constant, got {config.schedule!r}")
    if config.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"mixed_precision must be no, fp16 or bf16, got {config.mixed_precision!r}")
    if config.num_workers is not None and config.num_workers < 0:
        raise ConfigError(f"num_workers must be 0 or more, got {config.num_workers}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps must be at least 1, got {config.max_steps}")
