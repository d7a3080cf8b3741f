"""What a run leaves on disk for people: HF-format model folders, metrics.jsonl, plots and a model card.

Every write is atomic, through `lwdetr.atomic` (files: a temporary file and `os.replace`; folders: written whole
beside the target and swapped in, a killed swap repaired by `recover_folder`), so at every moment one complete
version exists. `atomic_folder` here adds the crash point `NAME-swap` between the two renames; model folders are
written by `lwdetr.checkpoint.save_model_folder`, as `python -m lwdetr convert` writes them. `remove_leftovers`
deletes the temporary files a killed write leaves behind. A full disk becomes a `DiskFullError` naming the folder
and the bytes needed (`disk_full_guard`); the earlier version stays.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from finetune.errors import DiskFullError
from finetune.faults import crash_point
from lwdetr.atomic import atomic_folder as _atomic_folder
from lwdetr.atomic import atomic_write, atomic_write_text, recover_folder

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


def remove_leftovers(folder: str | os.PathLike, names: Sequence[str]) -> list[Path]:
    """Delete the temporary files that killed atomic writes of `names` (files in `folder`) left; returns them."""
    folder = Path(folder)
    stale = [p for name in names for p in folder.glob(f".{name}.*") if p.is_file() and p.suffix in (".tmp", ".png")]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, keep: str | None = None) -> Iterator[Path]:
    """`lwdetr.atomic.atomic_folder` with the crash point `NAME-swap` between its two renames."""
    with _atomic_folder(path, keep, before_swap=_swap_crash_point(path)) as staging:
        yield staging


def _swap_crash_point(path: str | os.PathLike) -> Callable[[], None]:
    return lambda: crash_point(f"{Path(path).name}-swap")


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
    """Write an HF-format model folder atomically (`lwdetr.checkpoint.save_model_folder`): config.json (with
    id2label), model.safetensors, preprocessor_config.json (a square resize to `image_size`) and, when given,
    README.md; the crash point `NAME-swap` sits between its two renames."""
    from lwdetr.checkpoint import save_model_folder as write_folder

    return write_folder(
        path, model, model.config, image_size=image_size, card=card, before_swap=_swap_crash_point(path)
    )


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
        atomic_write(out_dir / name, lambda tmp, figure=figure: figure.savefig(tmp, format="png"))
        plt.close(figure)
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

COCO evaluation (pycocotools) on the validation split, boxes in original image pixels. The images went through
the pipeline this folder's `Detector` uses (its `preprocessor_config.json`, the same decoding and box decoding).

{_metrics_table(metrics)}
"""
    return card
