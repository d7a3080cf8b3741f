"""Checkpoint format: our parameter names <-> the reference (transformers) layout, and HF-folder load/save.

The published checkpoints and `transformers.LwDetrForObjectDetection.save_pretrained` name the ViT attention
`attention.attention.{query,key,value}` and `attention.output`; newer transformers code calls them
`attention.{q,k,v,o}_proj`. We fuse q, k and v into one projection and group the encoder heads in one module, so
this module is the one place that translates, in both directions.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LwDetrConfig
from .hub import ModelNotFoundError, resolve_model_dir

__all__ = ["to_reference_state_dict", "from_reference_state_dict", "load_pretrained", "save_pretrained"]

_VIT_LAYER = re.compile(r"^(model\.backbone\.backbone\.encoder\.layer\.\d+\.)(.+)$")
# our name inside a ViT block -> the reference (hub) name
_VIT_RENAMES = {
    "norm1.": "layernorm_before.",
    "norm2.": "layernorm_after.",
    "mlp.fc1.": "intermediate.fc1.",
    "mlp.fc2.": "intermediate.fc2.",
    "attn.proj.": "attention.output.",
}
_REFERENCE_ALIASES = {
    "attention.o_proj.": "attention.output.",
    "attention.q_proj.": "attention.attention.query.",
    "attention.k_proj.": "attention.attention.key.",
    "attention.v_proj.": "attention.attention.value.",
}
_ENCODER_HEADS = ("enc_output.", "enc_output_norm.", "enc_out_class_embed.", "enc_out_bbox_embed.")


def to_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the reference layout (what the hub checkpoints hold)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = _VIT_LAYER.match(name)
        if match:
            prefix, rest = match.groups()
            if rest == "attn.qkv.weight":
                q, k, v = tensor.chunk(3, dim=0)
                for part, value in zip(("query", "key", "value"), (q, k, v)):
                    out[f"{prefix}attention.attention.{part}.weight"] = value.contiguous()
                continue
            if rest in ("attn.q_bias", "attn.v_bias"):
                part = "query" if rest == "attn.q_bias" else "value"
                out[f"{prefix}attention.attention.{part}.bias"] = tensor
                continue
            for ours, theirs in _VIT_RENAMES.items():
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours) :]
                    break
            out[prefix + rest] = tensor
        elif name.startswith("model.encoder_heads."):
            out["model." + name[len("model.encoder_heads.") :]] = tensor
        else:
            out[name] = tensor
    return out


def from_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference layout (either naming of the ViT attention) -> our state dict."""
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = _VIT_LAYER.match(name)
        if match:
            prefix, rest = match.groups()
            for alias, canonical in _REFERENCE_ALIASES.items():
                if rest.startswith(alias):
                    rest = canonical + rest[len(alias) :]
            attention = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if attention:
                qkv.setdefault(prefix, {})[f"{attention[1]}.{attention[2]}"] = tensor
                continue
            for ours, theirs in _VIT_RENAMES.items():
                if rest.startswith(theirs):
                    rest = ours + rest[len(theirs) :]
                    break
            out[prefix + rest] = tensor
        elif name.startswith("model.") and name[len("model.") :].startswith(_ENCODER_HEADS):
            out["model.encoder_heads." + name[len("model.") :]] = tensor
        else:
            out[name] = tensor
    for prefix, parts in qkv.items():
        try:
            out[prefix + "attn.qkv.weight"] = torch.cat([parts[f"{p}.weight"] for p in ("query", "key", "value")])
        except KeyError as missing:
            raise ValueError(f"checkpoint lacks {prefix}attention.attention.{missing.args[0]}") from None
        if "query.bias" in parts:
            out[prefix + "attn.q_bias"] = parts["query.bias"]
        if "value.bias" in parts:
            out[prefix + "attn.v_bias"] = parts["value.bias"]
        if "key.bias" in parts and parts["key.bias"].abs().max() > 0:
            raise ValueError(f"{prefix}: a non-zero key bias is not supported (LW-DETR's key projection has none)")
    return out


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, then rename: a crash leaves the old file intact."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: torch.nn.Module, config: LwDetrConfig, directory: str | os.PathLike) -> Path:
    """Write `config.json` and `model.safetensors` (reference key names, fp32 unless the model is otherwise)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in to_reference_state_dict(model.state_dict()).items()}
    config_dict = config.to_dict()
    config_dict["architectures"] = ["LwDetrForObjectDetection"]
    _atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(directory / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(config_dict, indent=2)))
    return directory


def load_config(name_or_path: str | os.PathLike) -> tuple[LwDetrConfig, Path]:
    """Resolve `name_or_path` and read its config.json."""
    directory = resolve_model_dir(name_or_path)
    if not (directory / "config.json").is_file():
        raise ModelNotFoundError(f"model {str(name_or_path)!r}: {directory} has no config.json")
    return LwDetrConfig.from_pretrained(str(directory)), directory


def load_pretrained(
    model_class, name_or_path: str | os.PathLike, *, ignore_mismatched_sizes: bool = False, **overrides
):
    """Build `model_class` from an HF-format folder or hub id and load its safetensors weights.

    `overrides` replace config fields (e.g. a new `id2label`); with `ignore_mismatched_sizes`, parameters whose
    shape changed (such as class heads for a new label set) keep their fresh initialisation.
    """
    config, directory = load_config(name_or_path)
    for key, value in overrides.items():
        setattr(config, key, value)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ModelNotFoundError(f"model {str(name_or_path)!r}: {directory} has no model.safetensors")
    model = model_class(config)
    state = from_reference_state_dict(load_file(str(weights)))
    own = model.state_dict()
    if ignore_mismatched_sizes:
        state = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    mismatched_ok = ignore_mismatched_sizes and all(k in own for k in missing)
    if unexpected or (missing and not mismatched_ok):
        raise ValueError(
            f"model {str(name_or_path)!r} does not fit the LW-DETR architecture of its config: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
