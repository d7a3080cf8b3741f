"""Keep a folder of the app's data (datasets/, results/, runs/) under a size budget, oldest entries first.

Each direct child of the folder is one entry (an extracted dataset, one detection's JSON folder, a training run),
evicted whole. "Oldest" is by modification time of the entry itself; the app touches an entry when it uses it
again, so this is least-recently-used. Entries in use are never evicted, whatever the budget says; neither are
hidden entries (an extraction or export being staged, `.name.partial`) younger than an hour.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["enforce_budget", "folder_bytes", "touch"]

_STAGING_GRACE_SECONDS = 3600.0
_LOCK = threading.Lock()  # two sessions evicting at once would count the same entry twice


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (symlinks not followed; a file vanishing meanwhile counts 0)."""
    if path.is_symlink() or path.is_file():
        return _size(path)
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(_size(Path(folder) / name) for name in files)
    return total


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


def touch(path: Path) -> None:
    """Mark `path` as just used (its modification time), so eviction picks it last."""
    try:
        os.utime(path)
    except OSError:
        pass


def enforce_budget(folder: Path, budget_bytes: int, keep: Iterable[str | os.PathLike[str] | None] = ()) -> list[Path]:
    """Delete the oldest entries of `folder` until it holds at most `budget_bytes`; return what was deleted.

    `keep` lists paths in use: an entry holding (or being) one of them stays even past the budget.
    """
    if not folder.is_dir():
        return []
    kept = [Path(path).resolve() for path in keep if path]
    now = time.time()
    with _LOCK:
        entries = []
        for entry in folder.iterdir():
            try:
                mtime = entry.lstat().st_mtime
            except OSError:
                continue  # removed meanwhile
            entries.append((mtime, entry, folder_bytes(entry)))
        total = sum(size for _, _, size in entries)
        removed = []
        for mtime, entry, size in sorted(entries, key=lambda item: item[0]):
            if total <= budget_bytes:
                break
            in_use = any(path.is_relative_to(entry.resolve()) for path in kept)
            staging = entry.name.startswith(".") and now - mtime < _STAGING_GRACE_SECONDS
            if in_use or staging:
                continue
            _remove(entry)
            total -= size
            removed.append(entry)
        return removed


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        entry.unlink(missing_ok=True)
