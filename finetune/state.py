"""Run state on disk: what `resume` continues from, how it is written, checked and recovered after a crash.

A run folder keeps its state twice:

    state/        the latest checkpoint: model/ (raw weights, HF format), ema.safetensors, optimizer.pt, rng.pt
                  (python, numpy and torch RNG states of every rank), trainer.json (config, epoch, step, position
                  in the epoch, loss sums, best AP, history)
    state.prev/   the checkpoint before it, the fallback when state/ is damaged (a truncated file after a crash of
                  the machine, a disk error)

Both are written whole and swapped in atomically (`finetune.export.atomic_folder`), at epoch ends, on a stop and
every `save_every_steps` optimizer steps. Resuming first finishes an interrupted swap and removes what killed
writes left (`repair_run_folder`), then reads the newest checkpoint whose files all load (`open_state`). The
training loop is deterministic given this state (batches and augmentations are functions of seed, epoch and
position), so a resumed run ends with the same weights as one never interrupted.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.errors import ConfigError
from finetune.export import atomic_folder, recover_folder, remove_leftovers
from finetune.faults import crash_point
from finetune.result import RESULT_FILE

__all__ = [
    "PREVIOUS",
    "RUN_FILES",
    "STATE",
    "Progress",
    "SavedState",
    "apply_state",
    "claim_run_folder",
    "open_state",
    "read_state",
    "repair_run_folder",
    "save_state",
    "saved_config",
]

STATE, PREVIOUS = "state", "state.prev"
# The files rewritten from the state's history at every epoch end (and by a resume, which repairs them).
RUN_FILES = ("metrics.jsonl", "loss.png", "ap.png", "README.md")


@dataclass
class Progress:
    """The counters that make a run resumable; saved in state/trainer.json."""

    epoch: int = 0  # epochs finished
    batch_in_epoch: int = 0  # micro-batches of the current epoch already trained on
    step: int = 0  # optimizer steps taken
    best_ap: float = -1.0
    best_epoch: int | None = None
    elapsed: float = 0.0  # training seconds over all sessions
    loss_sums: dict[str, float] = field(default_factory=dict)  # current epoch's per-step loss sums
    loss_steps: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class SavedState:
    """A checkpoint read back whole (so known to be intact): the model and what `apply_state` restores."""

    folder: Path
    trainer: dict[str, Any]  # trainer.json
    model: Any  # LwDetrForObjectDetection, in train mode, on the CPU
    optimizer: dict[str, Any]
    ema: tuple[dict[str, torch.Tensor], int] | None  # (tensors, updates)
    rng: list[dict[str, Any]]  # one per rank of the saving run

    def describe(self) -> str:
        return f"{self.folder.name}/ (saved at step {self.trainer['step']})"


# ------------------------------------------------------------------------------------------------ recovery


def repair_run_folder(output: str | Path) -> None:
    """Finish the folder swaps a kill interrupted (state/, best/, last/) and delete temporary files and folders
    left by killed writes. The run files themselves are rewritten from the state once it is loaded."""
    output = Path(output)
    if not output.is_dir():
        return
    recover_folder(output / STATE, keep=PREVIOUS)
    recover_folder(output / "best")
    recover_folder(output / "last")
    remove_leftovers(output, (*RUN_FILES, RESULT_FILE))


def _candidates(output: Path) -> list[Path]:
    """The checkpoints of the run, newest first (state.old/ exists only while a swap is interrupted)."""
    folders = (output / STATE, output / f"{STATE}.old", output / PREVIOUS)
    return [folder for folder in folders if (folder / "trainer.json").is_file()]


def _read_trainer(folder: Path) -> dict[str, Any]:
    path = folder / "trainer.json"
    try:
        trainer = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(trainer.get("config"), dict) or not isinstance(trainer.get("epoch"), int):
            raise ValueError("no config or epoch")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise ConfigError(f"{path}: unreadable ({_first_sentence(error)})") from None
    return trainer


def _first_sentence(error: BaseException) -> str:
    """The start of an error's message, on one line (torch's zip errors go on for a paragraph)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text.split(". ")[0][:200]


def saved_config(output: str | Path) -> dict[str, Any]:
    """The configuration fields saved in the run at `output`, from its newest readable checkpoint, interrupted swaps
    included (this only reads; `repair_run_folder` writes). Paths that were relative to the folder the run started
    in are made absolute when only that form exists."""
    output = Path(output)
    errors = []
    for folder in _candidates(output):
        try:
            trainer = _read_trainer(folder)
        except ConfigError as error:
            errors.append(str(error))
            continue
        config = dict(trainer["config"])
        for name, absolute in trainer.get("absolute_paths", {}).items():
            if config.get(name) and not Path(config[name]).exists() and absolute and Path(absolute).exists():
                config[name] = absolute
        return config
    if errors:
        raise ConfigError(f"{output}: nothing to resume: {errors[0]}")
    raise ConfigError(f"{output}: nothing to resume (no {STATE}/trainer.json)")


# ------------------------------------------------------------------------------------------------ save / read


def rng_state() -> dict[str, Any]:
    """This process's random states in a form `torch.load(weights_only=True)` accepts (no numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        # a run saved on another machine may have had more (or fewer) GPUs than this one
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


def _absolute_paths(config: dict[str, Any]) -> dict[str, str]:
    """Absolute forms of the config's local paths, so that a resume from another folder still finds them."""
    return {
        name: str(Path(config[name]).resolve())
        for name in ("data", "val_data")
        if config.get(name) and Path(config[name]).exists()
    }


def save_state(run) -> None:
    """Write state/ atomically (main process; the previous one becomes state.prev/), with every rank's RNG state
    gathered to it. `run` is `finetune.train.Run` (config, progress, model, optimizer, ema, output)."""
    from accelerate.utils import gather_object
    from safetensors.torch import save_file

    acc = run.accelerator
    rng_states = gather_object([rng_state()]) if acc.num_processes > 1 else [rng_state()]
    if acc.is_main_process:
        config = dataclasses.asdict(run.config)
        trainer = {"config": config, "absolute_paths": _absolute_paths(config), **dataclasses.asdict(run.progress)}
        with atomic_folder(run.output / STATE, keep=PREVIOUS) as staging:
            run.unwrapped.save_pretrained(staging / "model")
            crash_point("state-write")
            if run.ema is not None:
                ema_tensors = {k: v.detach().cpu().contiguous() for k, v in run.ema.state_dict().items()}
                save_file(ema_tensors, str(staging / "ema.safetensors"), metadata={"updates": str(run.ema.updates)})
            torch.save(run.optimizer.state_dict(), staging / "optimizer.pt")
            torch.save(rng_states, staging / "rng.pt")
            (staging / "trainer.json").write_text(json.dumps(trainer, indent=1))
    acc.wait_for_everyone()


def read_state(folder: Path, device: torch.device | str = "cpu") -> SavedState:
    """Every file of the checkpoint in `folder`, loaded (the optimizer's tensors onto `device`, where the run
    trains: a run saved on a GPU resumes on a CPU and the reverse). Raises `ConfigError` or `ModelLoadError`
    (one line naming the file) when one is missing or damaged."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from lwdetr.modeling import LwDetrForObjectDetection

    trainer = _read_trainer(folder)
    model = LwDetrForObjectDetection.from_pretrained(folder / "model").train()  # ModelLoadError when damaged
    ema = None
    current = "ema.safetensors"
    try:
        if (folder / "ema.safetensors").is_file():
            with safe_open(str(folder / "ema.safetensors"), framework="pt") as handle:
                updates = int(handle.metadata()["updates"])
            ema = (load_file(str(folder / "ema.safetensors")), updates)
        current = "optimizer.pt"
        optimizer = torch.load(folder / current, map_location=device, weights_only=True)
        current = "rng.pt"
        rng = torch.load(folder / current, map_location="cpu", weights_only=True)  # RNG states are host bytes
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, TypeError, EOFError) as error:
        raise ConfigError(f"{folder / current}: damaged ({_first_sentence(error)})") from None
    return SavedState(folder, trainer, model, optimizer, ema, rng)


def open_state(output: str | Path, device: torch.device | str = "cpu", primary: bool = True) -> SavedState:
    """The newest intact checkpoint of the run at `output` (repaired): state/, else state.prev/. On a fallback the
    `primary` process (the one that writes) says so on stderr in one line and puts the intact checkpoint in place of
    the damaged one, so that the next save keeps an intact fallback. Raises `ConfigError` (one line) when there is
    no intact checkpoint."""
    from lwdetr.checkpoint import ModelLoadError

    output = Path(output)
    failures = []
    for folder in _candidates(output):
        try:
            saved = read_state(folder, device)
        except (ConfigError, ModelLoadError) as error:
            failures.append(str(error))
            continue
        if failures and primary:
            print(f"finetune: {failures[0]}; resuming from the previous checkpoint {saved.describe()}", file=sys.stderr)
            if folder.name != STATE:
                shutil.rmtree(output / STATE, ignore_errors=True)
                os.rename(folder, output / STATE)
        return saved
    if failures:
        raise ConfigError(f"{failures[0]}; no intact earlier checkpoint to resume from")
    raise ConfigError(f"{output}: nothing to resume (no {STATE}/trainer.json)")


def apply_state(run, saved: SavedState) -> None:
    """Restore counters, optimizer, EMA and RNG from `saved` (the model was built from its weights)."""
    names = {f.name for f in dataclasses.fields(Progress)}
    run.progress = Progress(**{k: v for k, v in saved.trainer.items() if k in names})
    run.optimizer.load_state_dict(saved.optimizer)
    if run.ema is not None and saved.ema is not None:
        tensors, updates = saved.ema
        run.ema.load_state_dict(tensors, updates)
    set_rng_state(saved.rng[min(run.accelerator.process_index, len(saved.rng) - 1)])


def claim_run_folder(output: str | Path, force: bool, accelerator) -> None:
    """A new run must not overwrite an earlier one by accident: refuse an output folder holding a run, unless
    `force`, which deletes that run's files first (not its extracted data/)."""
    output = Path(output)
    held = [name for name in ("state", "state.prev", "state.old", "metrics.jsonl") if (output / name).exists()]
    if held and not force:
        raise ConfigError(
            f"{output} already holds a run ({held[0]}): continue it with --resume, choose another --output, "
            "or pass --force to start over there (its checkpoints and metrics are deleted)"
        )
    if not force:
        return
    if accelerator.is_main_process:  # every rank gets here (force is the same on all), whatever it saw on disk
        for name in ("state", "state.prev", "state.old", "best", "last", "analysis"):
            shutil.rmtree(output / name, ignore_errors=True)
        for name in ("metrics.jsonl", "loss.png", "ap.png", "README.md", "model.onnx", "ONNX_MISSING.txt", RESULT_FILE):
            (output / name).unlink(missing_ok=True)
    accelerator.wait_for_everyone()
