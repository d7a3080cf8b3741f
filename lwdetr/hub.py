"""Resolve a model reference (local folder or hub id) to a local folder, failing fast when offline."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["resolve_model_dir", "ModelNotFoundError"]

# Seconds to wait for the hub before giving up; small so that an offline machine answers within seconds.
_HUB_TIMEOUT = float(os.environ.get("LWDETR_HUB_TIMEOUT", "10"))


class ModelNotFoundError(OSError):
    """The model reference is neither a usable local folder nor a reachable hub id."""


def _looks_like_hub_id(ref: str) -> bool:
    parts = ref.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not ref.startswith((".", "~")) and "\\" not in ref


def resolve_model_dir(name_or_path: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """Return a local folder holding the model files of `name_or_path`.

    A path to an existing folder is returned as it is. Otherwise `name_or_path` is taken as a hub id: the local
    cache is tried first, then the hub with a short timeout. When neither works, a `ModelNotFoundError` says which
    id failed and how to pass a local folder instead; it never hangs.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    ref = str(name_or_path)
    if path.exists() or not _looks_like_hub_id(ref):
        raise ModelNotFoundError(f"model {ref!r}: not a folder with config.json and model.safetensors, nor a hub id")
    from huggingface_hub import snapshot_download

    patterns = allow_patterns or ["*.json", "*.safetensors", "*.md"]
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached: fall through to the network
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelNotFoundError(
            f"model {ref!r} is not in the local cache and HF_HUB_OFFLINE is set; "
            "pass a local folder (config.json + model.safetensors) instead"
        )
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", str(int(_HUB_TIMEOUT)))
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(int(_HUB_TIMEOUT)))
    try:
        return Path(snapshot_download(ref, allow_patterns=patterns, etag_timeout=_HUB_TIMEOUT))
    except Exception as error:  # noqa: BLE001 - every failure gets the same actionable message
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelNotFoundError(
            f"could not download model {ref!r} from the Hugging Face hub ({reason[:200]}); "
            "check the id and your connection, or pass a local folder (config.json + model.safetensors)"
        ) from None
