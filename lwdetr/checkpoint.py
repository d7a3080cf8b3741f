"""Checkpoint format: our parameter names <-> the reference (transformers) layout, and HF-folder load/save.

The published checkpoints and `transformers.LwDetrForObjectDetection.save_pretrained` name the ViT attention
`attention.attention.{query,key,value}` and `attention.output`; newer transformers code calls them
`attention.{q,k,v,o}_proj`. We fuse q, k and v into one projection and group the encoder heads in one module, so
this module is the one place that translates, in both directions.

Loading treats a model folder as untrusted input (it may come from anywhere on the hub): only safetensors are
read, config.json is parsed as plain JSON with bounded size, the model is first built on the meta device (no
memory) and compared with the weights file before anything is allocated, and every problem is a `ModelLoadError`
whose one-line message names the file and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_folder, atomic_write, atomic_write_text
from .config import LwDetrConfig, LwDetrViTConfig
from .hub import ModelNotFoundError, resolve_model_dir

__all__ = [
    "ModelLoadError",
    "PretrainedMixin",
    "checkpoint_prefix",
    "from_reference_state_dict",
    "load_config",
    "load_pretrained",
    "reference_tensors",
    "save_model_folder",
    "save_pretrained",
    "to_reference_state_dict",
]

# A config.json is a few KB (tens with a thousand labels); anything far larger is not one.
_MAX_CONFIG_BYTES = 16 * 2**20
# Counts that build one module each: far above any LW-DETR (ViT 6-12 layers, 3 decoder layers), far below the
# minutes and gigabytes a config.json asking for millions would cost before any weight is compared.
_MAX_COUNTS = {"decoder_layers": 256, "c2f_num_blocks": 256, "num_feature_levels": 16}
_MAX_BACKBONE_COUNTS = {"num_hidden_layers": 256}


class ModelLoadError(ModelNotFoundError, ValueError):
    """A model folder was found but its files are unusable; the message is one line naming the file.

    A `ModelNotFoundError` (no usable model at that reference) and a `ValueError` (bad content), so that callers
    catching either report it.
    """


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
# Where each public model's parameters sit inside LwDetrForObjectDetection: the translation works on those full
# names, and a folder holds its model's names without the prefix (as transformers saves a base model).
_PREFIXES = {
    "LwDetrForObjectDetection": "",
    "LwDetrModel": "model.",
    "LwDetrViTBackbone": "model.backbone.backbone.",
}


def checkpoint_prefix(model_class: type) -> str:
    """The prefix of `model_class`'s parameter names within the full detector (a public class of ours)."""
    for cls in model_class.__mro__:
        if cls.__name__ in _PREFIXES:
            return _PREFIXES[cls.__name__]
    raise TypeError(f"{model_class.__name__} is not an LW-DETR model class")


def _folder_prefix(names: list[str]) -> str:
    """Which model a checkpoint's (reference) names belong to, as the prefix its names lack: a detector's start with
    `model.`, a base model's with `backbone.backbone.`, a ViT backbone's with `embeddings.` or `encoder.`."""
    if any(name.startswith("model.") for name in names):
        return ""
    if any(name.startswith("backbone.backbone.") for name in names):
        return "model."
    return "model.backbone.backbone."


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


def reference_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s weights under the names transformers writes for its class (CPU, contiguous, detached).

    A base model or ViT backbone gets its own names without the detector's prefix, as transformers writes them."""
    prefix = checkpoint_prefix(type(model))
    full = to_reference_state_dict({prefix + k: v for k, v in model.state_dict().items()})
    tensors = {k[len(prefix) :]: v.detach().contiguous().cpu() for k, v in full.items()}
    if prefix == _PREFIXES["LwDetrViTBackbone"]:
        # transformers converts the legacy attention names for the detector's checkpoints only: its backbone
        # folders hold (and need) the current `attention.{q,k,v,o}_proj` names
        tensors = {_current_attention_name(k): v for k, v in tensors.items()}
    return tensors


def _write_weights_and_config(
    directory: Path, tensors: dict[str, torch.Tensor], config: LwDetrConfig | LwDetrViTConfig, architecture: str
) -> None:
    """model.safetensors and config.json (with `architectures`) into `directory`, each file atomically."""
    config_dict = config.to_dict()
    config_dict["architectures"] = [architecture]
    atomic_write(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_text(directory / "config.json", json.dumps(config_dict, indent=2))


def save_pretrained(
    model: torch.nn.Module, config: LwDetrConfig | LwDetrViTConfig, directory: str | os.PathLike
) -> Path:
    """Write `config.json` and `model.safetensors` (reference key names, fp32 unless the model is otherwise).

    Any public model class: a base model or ViT backbone is written as transformers writes it (its own names
    without the detector's prefix, its class in `architectures`). Each file is replaced atomically; other files
    of `directory` are left alone, as transformers does (`save_model_folder` writes a whole folder)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _write_weights_and_config(directory, reference_tensors(model), config, checkpoint_class_name(type(model)))
    return directory


def save_model_folder(
    path: str | os.PathLike,
    weights: torch.nn.Module | Mapping[str, torch.Tensor],
    config: LwDetrConfig,
    *,
    image_size: int,
    card: str | None = None,
    before_swap: Callable[[], None] | None = None,
) -> Path:
    """Write a complete HF-format model folder at `path` atomically: it appears whole or not at all, and a folder
    already there stays intact until the new one replaces it (`lwdetr.atomic.atomic_folder`).

    The folder holds config.json (with id2label and `architectures`), model.safetensors (reference names),
    preprocessor_config.json (a square resize to `image_size`) and, when given, the model card `card` as README.md.

    Args:
        weights: a model (any public class), or a state dict already in the reference layout of
            `LwDetrForObjectDetection` (as `lwdetr.convert` produces).
        before_swap: run between the old folder moved aside and the new one put in place (crash tests kill there).
    """
    from .processing import square_processor

    if isinstance(weights, torch.nn.Module):
        tensors, architecture = reference_tensors(weights), checkpoint_class_name(type(weights))
    else:
        tensors = {k: v.detach().contiguous().cpu() for k, v in weights.items()}
        architecture = "LwDetrForObjectDetection"
    with atomic_folder(path, before_swap=before_swap) as staging:
        _write_weights_and_config(staging, tensors, config, architecture)
        square_processor(image_size).save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card, encoding="utf-8")
    return Path(path)


def load_config(name_or_path: str | os.PathLike) -> tuple[LwDetrConfig, Path]:
    """Resolve `name_or_path` and read its config.json (a JSON object describing an LW-DETR model).

    Raises:
        ModelNotFoundError: no such folder or hub id.
        ModelLoadError: config.json is missing, not JSON, not an object, not an LW-DETR config, or asks for an
            absurd number of layers.
    """
    directory = resolve_model_dir(name_or_path)
    path = directory / "config.json"
    fields = _read_json_object(path)
    if fields.get("model_type") == "lw_detr_vit":
        raise ModelLoadError(
            f"{path}: holds an LW-DETR ViT backbone (model_type 'lw_detr_vit'); load it with LwDetrViTBackbone"
        )
    if fields.get("model_type", "lw_detr") != "lw_detr":
        raise ModelLoadError(f"{path}: a config for model_type {str(fields['model_type'])[:40]!r}, not 'lw_detr'")
    try:
        config = LwDetrConfig.from_dict(fields)
    except Exception as error:  # noqa: BLE001 - transformers validates fields with many exception types
        raise ModelLoadError(f"{path}: not a usable LW-DETR config ({_one_line(error)})") from None
    _check_counts(config, path)
    return config, directory


def _current_attention_name(name: str) -> str:
    for current, legacy in _REFERENCE_ALIASES.items():
        if legacy in name:
            return name.replace(legacy, current)
    return name


def checkpoint_class_name(model_class: type) -> str:
    """The public class name a folder's `architectures` records for `model_class` (or its subclass)."""
    return next(cls.__name__ for cls in model_class.__mro__ if cls.__name__ in _PREFIXES)


def load_config_for(model_class: type, name_or_path: str | os.PathLike) -> tuple[LwDetrConfig | LwDetrViTConfig, Path]:
    """`load_config` for any public model class: a ViT backbone reads a backbone folder's config or the
    `backbone_config` of a detector's; the others need a detector's (`lw_detr`) config.

    Raises:
        ModelNotFoundError, ModelLoadError: as `load_config`.
    """
    if checkpoint_class_name(model_class) != "LwDetrViTBackbone":
        return load_config(name_or_path)
    directory = resolve_model_dir(name_or_path)
    path = directory / "config.json"
    fields = _read_json_object(path)
    if fields.get("model_type") != "lw_detr_vit":
        config, _ = load_config(directory)
        return config.backbone_config, directory
    try:
        config = LwDetrViTConfig.from_dict(fields)
    except Exception as error:  # noqa: BLE001 - transformers validates fields with many exception types
        raise ModelLoadError(f"{path}: not a usable LW-DETR ViT config ({_one_line(error)})") from None
    _check_limits(config, _MAX_BACKBONE_COUNTS, path)
    return config, directory


def _one_line(error: BaseException) -> str:
    """`Type: message` on one line (a multi-line message is joined), at most about 300 characters."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def _check_file(path: Path, what: str) -> int:
    """The size of `path`, a regular file; a `ModelLoadError` naming it otherwise."""
    if not path.exists():
        raise ModelLoadError(f"{path}: missing; a model folder needs config.json and model.safetensors ({what})")
    if not path.is_file():
        raise ModelLoadError(f"{path}: not a regular file ({what})")
    return path.stat().st_size


def _read_json_object(path: Path) -> dict:
    size = _check_file(path, "the model's configuration")
    if size > _MAX_CONFIG_BYTES:
        raise ModelLoadError(f"{path}: {size:,} bytes, too large for a model configuration")
    try:
        fields = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelLoadError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path}: invalid JSON ({error})") from None
    except RecursionError:
        raise ModelLoadError(f"{path}: invalid JSON (nested too deeply)") from None
    except OSError as error:
        raise ModelLoadError(f"{path}: cannot read ({_one_line(error)})") from None
    if not isinstance(fields, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(fields).__name__}")
    return fields


def _check_counts(config: LwDetrConfig, path: Path) -> None:
    _check_limits(config, _MAX_COUNTS, path)
    _check_limits(config.backbone_config, _MAX_BACKBONE_COUNTS, path)


def _check_limits(owner: object, limits: dict[str, int], path: Path) -> None:
    for name, limit in limits.items():
        value = getattr(owner, name, None)
        if isinstance(value, int) and not 0 <= value <= limit:
            raise ModelLoadError(f"{path}: {name} = {value} is outside 0..{limit}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; its header (offsets, shapes, sizes) is validated by safetensors."""
    _check_file(path, "the weights")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: not a valid safetensors file ({_one_line(error)})") from None


def _skeleton(model_class, config: LwDetrConfig, directory: Path, weights_bytes: int) -> torch.nn.Module:
    """`model_class(config)` on the meta device (no memory), refused when much larger than the weights file.

    A config.json can ask for any width: comparing with the weights first means nothing is allocated for a model
    that cannot be what the file holds. (Four times the file allows half-precision weights and a new class head.)
    """
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. zero-size heads: the shape check that follows says what is wrong
            skeleton = model_class(config)
    except Exception as error:  # noqa: BLE001 - a config that passed validation may still not build
        raise ModelLoadError(f"{directory / 'config.json'}: cannot build the model ({_one_line(error)})") from None
    model_bytes = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    if model_bytes > 4 * weights_bytes + 256 * 2**20:
        raise ModelLoadError(
            f"{directory / 'config.json'}: describes a model of {model_bytes:,} bytes but "
            f"model.safetensors holds {weights_bytes:,}; refusing to build it"
        )
    return skeleton


def load_pretrained(
    model_class, name_or_path: str | os.PathLike, *, ignore_mismatched_sizes: bool = False, **overrides
):
    """Build `model_class` from an HF-format folder or hub id and load its safetensors weights.

    `overrides` replace config fields (e.g. a new `id2label`); with `ignore_mismatched_sizes`, parameters whose
    shape changed (such as class heads for a new label set) keep their fresh initialisation.

    Raises:
        ModelNotFoundError: no such folder or hub id.
        ModelLoadError: a file of the folder is missing or unusable, or the weights do not fit the config.
    """
    config, directory = load_config_for(model_class, name_or_path)
    for key, value in overrides.items():
        setattr(config, key, value)
    weights = directory / "model.safetensors"
    own = _skeleton(model_class, config, directory, _check_file(weights, "the weights")).state_dict()
    state, absent = _state_for(model_class, _read_weights(weights), weights)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if ignore_mismatched_sizes:
        state = {k: v for k, v in state.items() if k not in mismatched}
    elif mismatched:
        name = mismatched[0]
        raise ModelLoadError(
            f"{weights}: does not fit the architecture of its config.json: {name} is {list(state[name].shape)} in "
            f"the file, {list(own[name].shape)} in the model ({len(mismatched)} tensors differ)"
        )
    model = model_class(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    fresh = [k for k in missing if k in mismatched or k.startswith(absent)]
    missing = [k for k in missing if k not in fresh]
    if unexpected or missing:
        raise ModelLoadError(
            f"{weights}: does not fit the LW-DETR architecture of its config.json: "
            f"missing {missing[:3]} ({len(missing)} in all), unexpected {unexpected[:3]} ({len(unexpected)} in all)"
        )
    if absent:
        heads = ", ".join(part.rstrip(".") for part in absent)
        warnings.warn(
            f"{directory.name}: holds a base LwDetrModel; the {heads} heads are newly initialised (train them first)",
            stacklevel=3,
        )
    return model


def _state_for(model_class: type, reference: dict[str, torch.Tensor], weights: Path):
    """A folder's (reference-layout) tensors -> `model_class`'s state dict, and the name prefixes of the parts the
    folder cannot hold (a detector's heads when it holds a base model; the reference also initialises them afresh).

    Tensors of a larger model are dropped (a base model or backbone from a detector's folder)."""
    source = _folder_prefix(list(reference))
    target = checkpoint_prefix(model_class)
    absent = _ABSENT_PARTS.get((source, target), ())
    if not target.startswith(source) and not absent:
        held = {"model.": "a base LwDetrModel", "model.backbone.backbone.": "a ViT backbone"}[source]
        raise ModelLoadError(f"{weights}: holds only {held}, not a whole {model_class.__name__}")
    try:
        full = from_reference_state_dict({source + k: v for k, v in reference.items()})
    except ValueError as error:
        raise ModelLoadError(f"{weights}: {_one_line(error)}") from None
    state = {k[len(target) :]: v for k, v in full.items() if k.startswith(target)}
    return state, absent


# What a detector loaded from a base model's folder lacks.
_ABSENT_PARTS = {("model.", ""): ("class_embed.", "bbox_embed.")}


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` and the `device` / `dtype` properties of every public model class.

    A class using it has a `config` attribute and is one of (or derives from) the classes in `_PREFIXES`.
    """

    config: LwDetrConfig | LwDetrViTConfig

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device_map: int | str | torch.device | dict | None = None,
        torch_dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Load an HF-format folder (config.json + model.safetensors) or a hub id, in eval mode.

        Any LW-DETR folder fits a class it contains (a base model or backbone from a detector's folder); a detector
        from a base model's folder gets fresh heads, with a warning. `dtype` (or its older name `torch_dtype`;
        "auto" keeps the config's `dtype`, else float32) and `device_map` (one device: an index, "cpu", "cuda:1",
        "auto", or a dict mapping every module to the same device) are honoured as in transformers; a map over
        several devices is refused. Other kwargs go to `load_pretrained` (config overrides,
        `ignore_mismatched_sizes`).
        """
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass dtype or torch_dtype (its older name), not both")
        device = placement_device(device_map)
        model = load_pretrained(cls, name_or_path, **kwargs)
        wanted = model_dtype(dtype if dtype is not None else torch_dtype, model.config)
        return model.to(device=device, dtype=wanted).eval()

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json and model.safetensors with the reference's parameter names."""
        save_pretrained(self, self.config, directory)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def model_dtype(dtype: torch.dtype | str | None, config: Any) -> torch.dtype | None:
    """`from_pretrained`'s dtype argument as a torch dtype: None keeps float32, "auto" the config's `dtype`."""
    if dtype == "auto":
        dtype = getattr(config, "dtype", None) or torch.float32
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype {dtype!r} is not a floating-point torch dtype; use e.g. 'float32' or 'bfloat16'")
    return resolved


def placement_device(device_map: int | str | torch.device | dict | None) -> torch.device | None:
    """The one device `device_map` names (None: leave the model on the CPU).

    "auto" is the first GPU when there is one, else the CPU: LW-DETR models fit one device, so nothing is split.

    Raises:
        ValueError: a map over several devices (or onto disk), an unknown device, or a device this machine lacks.
    """
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = {str(v) for v in device_map.values()}
        if len(devices) != 1:
            raise ValueError(
                f"device_map spreads the model over {sorted(devices)}; lwdetr loads a model onto one device "
                "(pass e.g. device_map='cuda:0')"
            )
        device_map = next(iter(device_map.values()))
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"  # an index names an accelerator, as in transformers
    if device_map in ("balanced", "balanced_low_0", "sequential", "disk", "meta"):
        raise ValueError(f"device_map={device_map!r} is not supported: lwdetr loads a model onto one device")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device_map={device_map!r} is not a device ({_one_line(error)})") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device_map={device_map!r}: no such CUDA device on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device_map={device_map!r}: MPS is not available on this machine")
    return device
