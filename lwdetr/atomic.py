"""Atomic writes: a file or a folder appears complete or not at all, and the version it replaces stays intact until
then. Every writer of the project (model folders, training state, metrics, the app's records) goes through here.

A file is written to a hidden temporary file beside it (`.NAME.XXXX.tmp`, same file system) and renamed over the
target with `os.replace`, which is atomic on POSIX and Windows. A folder is written whole under a hidden temporary
name beside it (`.NAME.XXXX.partial`) and swapped in by `atomic_folder`: the old folder is renamed aside to
`NAME.old`, the new one renamed into place, the old one deleted (or, with `keep`, kept as the fallback `keep`).
A kill between the two renames leaves `NAME.old` and no `NAME`, which `recover_folder` puts back, so at every moment
one complete version exists. Temporary entries are hidden (a leading dot) so that folder listings and the app's
storage budget treat them as work in progress.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["atomic_folder", "atomic_write", "atomic_write_bytes", "atomic_write_text", "recover_folder"]

# mkstemp and mkdtemp make private entries; what is written here (models, metrics, records) is for everyone to read
_FILE_MODE = 0o644
_FOLDER_MODE = 0o755


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> Path:
    """Call `write(temporary_path)` to fill a temporary file beside `path`, then rename it to `path`.

    `write` receives the temporary file's path as a string (it exists, empty); whatever it raises propagates after
    the temporary file is removed, and `path` is untouched. The parent folder is created when missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_write`)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


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


@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike, keep: str | None = None, before_swap: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces `path` (see the module docstring).

    With `keep` (a sibling name), the replaced version is kept there as a fallback, replacing the one kept before.
    `before_swap` runs between the two renames (the old folder aside, the new one not yet in place): the moment a
    crash test kills the process at. On an exception inside the block the temporary folder is removed and `path`
    is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path, keep)
    if keep is not None:  # the fallback goes first, so that the disk holds at most two versions at any moment
        shutil.rmtree(path.with_name(keep), ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    old = path.with_name(path.name + ".old")
    try:
        yield staging
        staging.chmod(_FOLDER_MODE)
        for entry in staging.rglob("*"):
            entry.chmod(_FOLDER_MODE if entry.is_dir() else _FILE_MODE)
        if path.exists():
            os.rename(path, old)
        if before_swap is not None:
            before_swap()
        os.rename(staging, path)
        if keep is not None and old.is_dir():
            os.rename(old, path.with_name(keep))
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        recover_folder(path, keep)  # a failure between the renames: the old version goes back in place
        raise
