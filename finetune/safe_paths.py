"""Image paths named by a dataset, confined to the dataset's folder.

A dataset file names its images (`images[].file_name` in a COCO json, a path column in a Hugging Face dataset).
A hostile dataset may name `/etc/passwd`, `../../secret.png`, or plant a symlink pointing outside; reading such a
file would hand a server file to whoever uploaded the dataset, and even a size or an "exists" in a report leaks
something. So a name is resolved here component by component, following symlinks only while every step stays
inside the root: nothing outside the root is ever opened, stat-ed or listed. Absolute names and names climbing
above the root are refused without touching the file system at all.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath

__all__ = ["OutsideRootError", "climbs_out", "resolve_inside", "shorten"]

# Symlink hops followed within one name before giving up (a loop, or a hostile chain).
_MAX_SYMLINK_HOPS = 40
# A file name longer than this is shortened in reports (a hostile json may hold megabyte-long names).
_MAX_SHOWN = 120


class OutsideRootError(Exception):
    """A name, or a symlink on its way, leads outside the root."""


def _parts(name: str) -> tuple[str, ...]:
    """The components of `name`; backslashes are folder separators (Windows-made exports)."""
    return PurePosixPath(name.replace("\\", "/")).parts


def climbs_out(name: str) -> bool:
    """True when `name` is absolute or its `..` components climb above the folder it is relative to.

    Decided on the text alone, so an outside path is refused before anything touches the file system.
    """
    parts = _parts(name)
    if parts and (parts[0] == "/" or PurePosixPath(parts[0]).drive or ":" in parts[0][1:2]):
        return True  # "/x", and "C:/x" (a drive letter), absolute on the machine that wrote it
    depth = 0
    for part in parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def resolve_inside(root: Path, name: str) -> Path | None:
    """The regular file `name` (relative to `root`) resolves to, or None when there is none inside `root`.

    `root` must be a real path (`Path.resolve()` done by the caller). Symlinks are followed one component at a
    time and only while their targets stay inside `root`. A missing file, a folder or any other non-regular file
    (FIFO, device) gives None; a name that climbs out, or a symlink leading outside, raises `OutsideRootError`.
    Every file system call is made on a path inside `root`.
    """
    if climbs_out(name):
        raise OutsideRootError(name)
    pending = list(_parts(name))
    current, hops = root, 0
    try:
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if current == root:
                    raise OutsideRootError(name)
                current = current.parent  # `current` holds no symlink, so its parent is its real parent
                continue
            candidate = current / part
            mode = os.lstat(candidate).st_mode
            if not stat.S_ISLNK(mode):
                current = candidate
                continue
            hops += 1
            target = os.readlink(candidate)
            if hops > _MAX_SYMLINK_HOPS:
                return None  # a loop
            if os.path.isabs(target):
                relative = os.path.relpath(os.path.normpath(target), root)
                if climbs_out(relative):
                    raise OutsideRootError(name)
                current, pending = root, [*_parts(relative), *pending]
            else:
                pending = [*_parts(target), *pending]
        return current if stat.S_ISREG(os.lstat(current).st_mode) else None
    except (OSError, ValueError):  # missing, name too long, embedded NUL byte, ...: not a usable file
        return None


def shorten(name: str, limit: int = _MAX_SHOWN) -> str:
    """`name` for a report: cut in the middle when longer than `limit` characters, control characters escaped."""
    shown = name.encode("unicode_escape").decode("ascii") if not name.isprintable() else name
    if len(shown) <= limit:
        return shown
    keep = (limit - 3) // 2
    return f"{shown[:keep]}...{shown[-keep:]}"
