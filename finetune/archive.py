"""Safe extraction of a dataset zip.

A zip from the internet can try to write outside the destination (`../x`, `/etc/x`, `C:\\x`), plant symlinks, or
expand to far more bytes than it holds (a "zip bomb": 1 MiB of deflated zeros is 1 GiB on disk). `safe_extract_zip`
checks every entry before writing anything (names, file types, entry count, total declared size, compression
ratio per entry and overall), counts the bytes really written (a lying header cannot pass the caps), extracts into
a fresh temporary folder beside the destination and renames it into place, so the destination either appears
complete or not at all: a refused or failed extraction leaves nothing behind.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path

from finetune.errors import DataError

__all__ = ["dataset_root", "safe_extract_zip"]

_CHUNK_BYTES = 1 << 20
# Compression ratios are judged only above these sizes: a small text file of repeated bytes may legitimately
# deflate 1000:1, and cannot fill a disk; a bomb needs large entries (or many of them, which the total catches).
_RATIO_FLOOR_ENTRY = 1 << 20
_RATIO_FLOOR_TOTAL = 16 << 20
_DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
# macOS Finder adds these resource-fork entries to zips; they are never data.
_SKIPPED_TOP_FOLDER = "__MACOSX"


def safe_extract_zip(
    zip_path: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    max_total_bytes: int = 2 * 1024**3,
    max_files: int = 100_000,
    max_ratio: float = 100.0,
) -> Path:
    """Extract `zip_path` into `dest_dir` (which must not exist or be empty) and return the dataset root.

    The root is `dest_dir` itself, or its only top-level folder when the zip holds a single folder (hidden entries
    aside), as most "zip the dataset folder" archives do. Entries under `__MACOSX/` are skipped.

    Raises `DataError` naming the zip and the offending entry for: absolute paths, drive letters, backslashes,
    `..` components, symlinks or other non-regular files, more than `max_files` entries, more than
    `max_total_bytes` uncompressed (declared or actually read), an entry or the whole zip expanding more than
    `max_ratio` times its compressed size (declared or actually read; entries under 1 MiB and zips under 16 MiB
    uncompressed are exempt), and corrupt or encrypted entries. On any error nothing is left behind.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    if dest_dir.exists() and (not dest_dir.is_dir() or any(dest_dir.iterdir())):
        raise DataError(f"{zip_path}: cannot extract into {dest_dir}: it exists and is not an empty folder")
    try:
        with zipfile.ZipFile(zip_path) as archive:
            entries = _checked_entries(archive, zip_path, max_total_bytes, max_files, max_ratio)
            dest_dir.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest_dir.name}.", suffix=".partial", dir=dest_dir.parent))
            try:
                _extract_entries(archive, entries, staging, zip_path, max_total_bytes, max_ratio)
                staging.chmod(0o755)  # mkdtemp makes it private; the dataset should read like any folder
                if dest_dir.exists():
                    dest_dir.rmdir()  # empty, checked above; rename cannot replace a folder otherwise
                os.rename(staging, dest_dir)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as error:
        raise DataError(f"{zip_path}: not a readable zip file ({error})") from error
    return dataset_root(dest_dir)


def _checked_entries(
    archive: zipfile.ZipFile, zip_path: Path, max_total_bytes: int, max_files: int, max_ratio: float
) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Validate every entry up front; return (entry, safe path parts) for the entries to extract."""
    infos = archive.infolist()
    if len(infos) > max_files:
        raise DataError(f"{zip_path}: {len(infos)} entries, more than the limit of {max_files}")
    declared = compressed = 0
    entries = []
    for info in infos:
        parts = _safe_parts(info, zip_path)
        if parts[0] == _SKIPPED_TOP_FOLDER:
            continue
        if _too_compressed(info.file_size, info.compress_size, max_ratio, _RATIO_FLOOR_ENTRY):
            raise DataError(
                f"{zip_path}: entry {info.filename!r} declares {info.file_size} bytes packed into "
                f"{info.compress_size}, a compression ratio above the limit of {max_ratio:g} (a zip bomb?)"
            )
        declared += info.file_size
        compressed += info.compress_size
        if declared > max_total_bytes:
            raise DataError(
                f"{zip_path}: entry {info.filename!r} takes the declared uncompressed size past "
                f"the limit of {max_total_bytes} bytes"
            )
        entries.append((info, parts))
    if _too_compressed(declared, compressed, max_ratio, _RATIO_FLOOR_TOTAL):
        raise DataError(
            f"{zip_path}: declares {declared} bytes packed into {compressed}, an overall compression ratio "
            f"above the limit of {max_ratio:g} (a zip bomb?)"
        )
    return entries


def _too_compressed(size: int, compressed: int, max_ratio: float, floor: int) -> bool:
    """Whether `size` bytes made from `compressed` bytes exceed `max_ratio` (sizes up to `floor` always pass)."""
    return size > floor and size > max_ratio * max(compressed, 1)


def _safe_parts(info: zipfile.ZipInfo, zip_path: Path) -> tuple[str, ...]:
    """The entry's path components, or `DataError` if the name or file type is unsafe."""
    name = info.filename

    def refuse(reason: str) -> DataError:
        return DataError(f"{zip_path}: refused entry {name!r}: {reason}")

    if "\\" in name:
        raise refuse("backslash in the path")
    if "\x00" in name:
        raise refuse("NUL byte in the path")
    if name.startswith("/"):
        raise refuse("absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if not parts:
        raise refuse("empty path")
    if ".." in parts:
        raise refuse("'..' component")
    if any(_DRIVE_LETTER.match(part) for part in parts):
        raise refuse("drive letter")
    # The upper 16 bits of external_attr hold the Unix st_mode when the zip was made on Unix.
    file_type = stat.S_IFMT(info.external_attr >> 16)
    if file_type == stat.S_IFLNK:
        raise refuse("symbolic link")
    if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise refuse(f"special file (mode {oct(file_type)})")
    if info.flag_bits & 0x1:
        raise refuse("encrypted")
    return parts


def _extract_entries(
    archive: zipfile.ZipFile,
    entries: list[tuple[zipfile.ZipInfo, tuple[str, ...]]],
    staging: Path,
    zip_path: Path,
    max_total_bytes: int,
    max_ratio: float,
) -> None:
    """Write the checked entries under `staging`, counting the bytes actually decompressed.

    Headers can lie about sizes, so the caps are checked again against what really comes out of each entry.
    """
    written = 0
    for info, parts in entries:
        target = staging.joinpath(*parts)
        entry_bytes = 0
        try:
            # Folders are made inside the try too: a file and a folder of the same name, or a name too long for
            # the file system, are this entry's fault, not a crash.
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(target, "xb") as sink:
                while chunk := source.read(_CHUNK_BYTES):
                    written += len(chunk)
                    entry_bytes += len(chunk)
                    if written > max_total_bytes:
                        raise DataError(
                            f"{zip_path}: entry {info.filename!r} expands past the limit of {max_total_bytes} bytes"
                        )
                    if _too_compressed(entry_bytes, info.compress_size, max_ratio, _RATIO_FLOOR_ENTRY):
                        raise DataError(
                            f"{zip_path}: entry {info.filename!r} expands more than {max_ratio:g} times its "
                            "compressed size (a zip bomb?)"
                        )
                    sink.write(chunk)
        except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as error:
            # Duplicate names, a file where a folder should be, bad CRC, unsupported compression. An OSError's
            # own text would name the staging folder; its reason is enough beside the entry's name.
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            raise DataError(f"{zip_path}: cannot extract entry {info.filename!r} ({reason})") from error


def dataset_root(dest_dir: Path) -> Path:
    """`dest_dir`, or its single visible top-level folder."""
    visible = [child for child in dest_dir.iterdir() if not child.name.startswith(".")]
    if len(visible) == 1 and visible[0].is_dir():
        return visible[0]
    return dest_dir
