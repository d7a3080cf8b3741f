"""What a run leaves on disk for people: HF-format model folders, metrics.jsonl, plots and a model card.

Every write is atomic. Files go through a temporary file and `os.replace`; folders are written whole under a
temporary name beside the target and swapped in (`atomic_folder`): the old folder is renamed aside, the new one
renamed into place, the old one deleted (or, with `keep`, kept as the fallback `NAME.prev`). A kill between the two
renames leaves `NAME.old` and no `NAME`, which `recover_folder` puts back, so at every moment one complete version
exists; `remove_leftovers` deletes what a killed write leaves behind (temporary files and folders). A full disk
becomes a `DiskFullError` naming the folder and the bytes needed (`disk_full_guard`); the earlier version stays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import DiskFullError
from finetune.faults import crash_point

__all__ = [
    "atomic_folder",
    "atomic_write_text",
    "disk_full_guard",
    "model_card",
    "plot_history",
    "recover_folder",
    "remove_leftovers",
    "save_model_folder",
    "write_metrics_jsonl",
]


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recover_folder(path: str | os.PathLike, keep: str | None = None) -> None:
    """Finish an interrupted swap of folder `path` (see `atomic_folder`): bring `NAME.old` back when `NAME` is
    missing, else make it the fallback `keep` (or delete it); drop stale temporary folders."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if old.is_dir() and not path.exists():
        os.rename(old, path)
    elif old.is_dir() and keep is not None:
        kept = path.with_name(keep)
        shutil.rmtree(kept, ignore_errors=True)
        os.rename(old, kept)
    elif old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    for stale in path.parent.glob(f".{path.name}.*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_leftovers(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Delete the temporary files that killed atomic writes of `names` (files in `folder`) left; returns them."""
    folder = Path(folder)
    stale = [p for name in names for p in folder.glob(f".{name}.*") if p.is_file() and p.suffix in (".tmp", ".png")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, keep: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` (see the module docstring). With `keep`
    (a sibling name), the replaced version is kept there as a fallback, replacing the one kept before."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path, keep)
    if keep is not None:  # the fallback goes first, so that the disk holds at most two versions at any moment
        shutil.rmtree(path.with_name(keep), ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp and mkstemp make private entries; a model folder is for everyone to read
        for entry in staging.rglob("*"):
            entry.chmod(0o755 if entry.is_dir() else 0o644)
        old = path.with_name(path.name + ".old")
        if path.exists():
            os.rename(path, old)
        crash_point(f"{path.name}-swap")
        os.rename(staging, path)
        if keep is not None and old.is_dir():
            os.rename(old, path.with_name(keep))
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def disk_full_guard(folder: str | os.PathLike, needed_bytes: int) -> Iterator[None]:
    """Turn "no space left on device" while writing into `folder` into a one-line `DiskFullError` saying how many
    bytes the write needs and how many are free."""
    try:
        yield
    except OSError as error:
        if error.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        raise DiskFullError(
            f"no space left on the device of {folder}: saving needs about {needed_bytes:,} bytes "
            f"({needed_bytes / 2**20:.1f} MiB), {free}; the files saved before are intact: free some space, "
            "then resume the run"
        ) from None


def save_model_folder(model, image_size: int, path: str | os.PathLike, card: str | None = None) -> Path:
    """Write an HF-format model folder atomically: config.json (with id2label), model.safetensors,
    preprocessor_config.json (a square resize to `image_size`) and, when given, README.md."""
    from lwdetr.processing import LwDetrImageProcessor

    with atomic_folder(path) as staging:
        model.save_pretrained(staging)
        LwDetrImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
    return Path(path)


def _json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def write_metrics_jsonl(path: str | os.PathLike, history: Sequence[Mapping[str, Any]]) -> None:
    """Rewrite metrics.jsonl from the run's history (one line per epoch), so it always matches the saved state."""
    atomic_write_text(path, "".join(json.dumps(_json_safe(dict(row))) + "\n" for row in history))


def plot_history(history: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """loss.png (train losses per epoch) and ap.png (validation AP, AP50, AP75 per epoch); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    epochs = [row["epoch"] for row in history]
    written = []
    for name, keys, title in (
        ("loss.png", ("loss", "loss_ce", "loss_bbox", "loss_giou"), "training loss (epoch mean)"),
        ("ap.png", ("AP", "AP50", "AP75"), "validation (COCO)"),
    ):
        figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
        for key in keys:
            values = [row.get(key) for row in history]
            if any(v is not None for v in values):
                axes.plot(epochs, [math.nan if v is None else v for v in values], marker="o", label=key)
        axes.set_xlabel("epoch")
        axes.set_title(title)
        axes.grid(alpha=0.3)
        axes.legend()
        figure.tight_layout()
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".png")
        os.close(fd)
        figure.savefig(tmp)
        plt.close(figure)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_dir / name)
        written.append(out_dir / name)
    return written


def _metrics_table(metrics: Mapping[str, float]) -> str:
    rows = ["| metric | value |", "|---|---|"]
    rows += [f"| {key} | {value:.4f} |" for key, value in metrics.items() if isinstance(value, int | float)]
    return "\n".join(rows)


def model_card(
    *,
    title: str,
    command: str,
    hyperparameters: Mapping[str, Any],
    data_summary: str,
    metrics: Mapping[str, float],
    epoch: int | None,
    id2label: Mapping[int, str],
    ema: bool = True,
) -> str:
    """A model card (README.md text): what the model detects, how it was trained, how well it does."""
    labels = ", ".join(f"`{name}`" for _, name in sorted(id2label.items()))
    params = "\n".join(f"| {key} | `{value}` |" for key, value in hyperparameters.items())
    weights = "exponential moving average of the weights" if ema else "raw weights"
    where = f" (epoch {epoch}, {weights})" if epoch else ""
    card = f"""---
library_name: transformers
pipeline_tag: object-detection
tags:
- lw-detr
- object-detection
---

# {title}

An LW-DETR detector fine-tuned with `python -m finetune`. Classes ({len(id2label)}): {labels}.

Load it with `transformers.pipeline("object-detection", model=FOLDER)` or
`lwdetr.detector.Detector.from_pretrained(FOLDER)`.

## Training command

```
{command}
```

## Hyperparameters

| name | value |
|---|---|
{params}

## Data (validation report)

```
{data_summary.strip()}
```

## Validation metrics{where}

COCO evaluation (pycocotools) on the validation split, boxes in original image pixels.

{_metrics_table(metrics)}
"""
    return card
