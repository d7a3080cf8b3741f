"""Text fit for a web visitor: no server paths (upload cache, extraction folder, data folder, code), short lines.

Messages from `lwdetr` and `finetune` name files by their path, which is right on a command line and wrong in a
public app: it tells a stranger where the app lives and how its disk is laid out. `public_text` replaces each path
the caller knows a visitor-facing name for (the uploaded file's own name, the zip a dataset came from), then any
other absolute path by its last component.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["one_line", "public_text"]

# An absolute POSIX path: a "/" at the start or after a space, quote or bracket (not "a/b", "1/2" or "https://").
_ABSOLUTE_PATH = re.compile(r"(?<![\w:/.~-])/[^\s'\"`<>|,;()\[\]{}]+")
_MAX_LINE = 300


def _forms(path: str | os.PathLike[str]) -> list[str]:
    """The ways a path may be spelled in a message: as given and resolved (symlinks such as /tmp -> /private/tmp)."""
    text = str(path)
    forms = {text.rstrip("/") or text}
    try:
        forms.add(str(Path(text).resolve()))
    except (OSError, RuntimeError):
        pass
    return sorted((form for form in forms if len(form) > 1), key=len, reverse=True)


def public_text(text: object, names: Mapping[str | os.PathLike[str], str] | None = None) -> str:
    """`text` with every path in `names` replaced by its name, then any other absolute path by its last part.

    A path in `names` that is a folder also covers what lies inside it: with `{"/srv/x/upload-1f": "birds.zip"}`,
    `/srv/x/upload-1f/train/a.json` becomes `birds.zip/train/a.json`.
    """
    result = str(text)
    replacements = [(form, name) for path, name in (names or {}).items() for form in _forms(path)]
    for form, name in sorted(replacements, key=lambda item: len(item[0]), reverse=True):
        result = result.replace(form, name)
    return _ABSOLUTE_PATH.sub(lambda match: Path(match.group(0).rstrip("/.:")).name or "…", result)


def one_line(text: object, names: Mapping[str | os.PathLike[str], str] | None = None, limit: int = _MAX_LINE) -> str:
    """`public_text` cut to its first non-empty line and at most `limit` characters."""
    lines = [line.strip() for line in public_text(text, names).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"
