"""Import the original LW-DETR checkpoints (Atten4Vis/LW-DETR `.pth` files) into HF-format folders.

The original code names things after its own modules: the ViT is `backbone.0.encoder` with a fused `qkv` weight and
separate `q_bias`/`v_bias` (the key has no bias), the C2f projector is `backbone.0.projector.stages`/`stages_sampling`,
the decoder and the two-stage heads live under `transformer.`, its self-attention is `nn.MultiheadAttention`
(`in_proj_weight`/`in_proj_bias`, `out_proj`), and the query embeddings are `refpoint_embed`/`query_feat`.
`convert_original_state_dict` maps all of that to the layout `transformers.LwDetrForObjectDetection.save_pretrained`
writes (and the hub checkpoints use), so the result loads in both transformers and our model.

Loading is safe: `torch.load(weights_only=True)`, with `argparse.Namespace` allowed because the original training
script stores its arguments next to the weights; anything else that is not a tensor or a plain container is refused.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .config import LwDetrConfig, preset_config

__all__ = [
    "COCO_ID2LABEL",
    "ConversionError",
    "config_for_checkpoint",
    "convert_checkpoint",
    "convert_original_state_dict",
    "load_original_checkpoint",
]


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message is one line naming the file or the offending keys."""


# The original COCO models predict 91 classes indexed by COCO category id (ids without a category stay "N/A").
_COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant - stop_sign parking_meter "
    "bench bird cat dog horse sheep cow elephant bear zebra giraffe - backpack umbrella - - handbag tie suitcase "
    "frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle - "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair "
    "couch potted_plant bed - dining_table - - toilet - tv laptop mouse remote keyboard cell_phone microwave oven "
    "toaster sink refrigerator - book clock vase scissors teddy_bear hair_drier toothbrush"
).split()
COCO_ID2LABEL = {0: "N/A", **{i + 1: ("N/A" if n == "-" else n.replace("_", " ")) for i, n in enumerate(_COCO_NAMES)}}

# (pattern on the original key, replacement in the reference layout without the "model." prefix)
_VIT = r"^backbone\.0\.encoder\."
_LAYER = r"backbone.backbone.encoder.layer.\1."
_C2F = r"^backbone\.0\.projector\.stages\.(\d+)\."
_SCALE = r"backbone.projector.scale_layers.\1."
_SAMPLING = r"^backbone\.0\.projector\.stages_sampling\.(\d+)\.(\d+)\.(\d+)\."
_DECODER = r"^transformer\.decoder\.layers\.(\d+)\."
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(pattern), replacement)
    for pattern, replacement in [
        # ViT encoder (the fused qkv and its biases are split in `_split_attention`)
        (_VIT + r"pos_embed$", "backbone.backbone.embeddings.position_embeddings"),
        (_VIT + r"patch_embed\.proj\.", "backbone.backbone.embeddings.projection."),
        (_VIT + r"blocks\.(\d+)\.norm1\.", _LAYER + "layernorm_before."),
        (_VIT + r"blocks\.(\d+)\.norm2\.", _LAYER + "layernorm_after."),
        (_VIT + r"blocks\.(\d+)\.attn\.proj\.", _LAYER + "attention.output."),
        (_VIT + r"blocks\.(\d+)\.mlp\.", _LAYER + "intermediate."),
        (_VIT + r"blocks\.(\d+)\.(gamma_[12])$", _LAYER + r"\2"),
        # C2f projector: stages.I.0 is the C2f block (cv1, cv2, bottlenecks m.J), stages.I.1 its LayerNorm
        (_C2F + r"0\.m\.(\d+)\.cv([12])\.bn\.", _SCALE + r"projector_layer.bottlenecks.\2.conv\3.norm."),
        (_C2F + r"0\.m\.(\d+)\.cv([12])\.conv\.", _SCALE + r"projector_layer.bottlenecks.\2.conv\3.conv."),
        (_C2F + r"0\.cv([12])\.bn\.", _SCALE + r"projector_layer.conv\2.norm."),
        (_C2F + r"0\.cv([12])\.conv\.", _SCALE + r"projector_layer.conv\2.conv."),
        (_C2F + r"1\.", _SCALE + "layer_norm."),
        # resampling before the C2f: stages_sampling.I (scale) .J (input level) .K (layer), conv/bn or plain
        (_SAMPLING + r"bn\.", _SCALE + r"sampling_layers.\2.layers.\3.norm."),
        (_SAMPLING, _SCALE + r"sampling_layers.\2.layers.\3."),
        # decoder (the self-attention in_proj is split in `_split_attention`)
        (_DECODER + r"self_attn\.out_proj\.", r"decoder.layers.\1.self_attn.o_proj."),
        (_DECODER + r"norm1\.", r"decoder.layers.\1.self_attn_layer_norm."),
        (_DECODER + r"norm2\.", r"decoder.layers.\1.cross_attn_layer_norm."),
        (_DECODER + r"norm3\.", r"decoder.layers.\1.layer_norm."),
        (_DECODER + r"linear([12])\.", r"decoder.layers.\1.mlp.fc\2."),
        (_DECODER + r"cross_attn\.", r"decoder.layers.\1.cross_attn."),
        (r"^transformer\.decoder\.norm\.", "decoder.layernorm."),
        (r"^transformer\.decoder\.ref_point_head\.", "decoder.ref_point_head."),
        # two-stage encoder heads and the query embeddings
        (r"^transformer\.(enc_output|enc_output_norm|enc_out_class_embed|enc_out_bbox_embed)\.", r"\1."),
        (r"^refpoint_embed\.", "reference_point_embed."),
        (r"^query_feat\.", "query_feat."),
    ]
]
# The non-"lite" original variant also registers the box head under the decoder; it is the same tensor.
_ALIASES = re.compile(r"^transformer\.decoder\.bbox_embed\.")
_HEADS = re.compile(r"^(class_embed|bbox_embed)\.")


def convert_original_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: LwDetrConfig
) -> dict[str, torch.Tensor]:
    """Map an original LW-DETR state dict to the reference (transformers) key layout.

    Args:
        state_dict: the original model's weights (`checkpoint["model"]`); a `module.` prefix is tolerated.
        config: the architecture, used to split the fused attention projections.

    Returns:
        A new dict with the keys `transformers.LwDetrForObjectDetection.save_pretrained` writes; tensors are shared,
        not copied, except the attention projections that are sliced.

    Raises:
        ConversionError: keys that belong to no known part of LW-DETR, or fused weights of the wrong size.
    """
    converted: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        key = key.removeprefix("module.")
        if _ALIASES.match(key):
            continue
        if _HEADS.match(key):
            converted[key] = tensor
        elif (split := _split_attention(key, tensor, config)) is not None:
            converted.update({f"model.{name}": value for name, value in split.items()})
        elif (renamed := _rename(key)) is not None:
            converted[f"model.{renamed}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        listed = ", ".join(unknown[:5])
        raise ConversionError(f"{len(unknown)} keys of the checkpoint are not part of LW-DETR: {listed}")
    return converted


def _rename(key: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            return pattern.sub(replacement, key, count=1)
    return None


def _split_attention(key: str, tensor: torch.Tensor, config: LwDetrConfig) -> dict[str, torch.Tensor] | None:
    """The fused projections of the original: ViT `qkv` and biases, decoder `in_proj`. Other keys -> None."""
    vit = re.match(r"^backbone\.0\.encoder\.blocks\.(\d+)\.attn\.(qkv\.weight|q_bias|v_bias|qkv\.bias)$", key)
    if vit:
        prefix = f"backbone.backbone.encoder.layer.{vit[1]}.attention.attention."
        if vit[2] == "q_bias":
            return {prefix + "query.bias": tensor}
        if vit[2] == "v_bias":
            return {prefix + "value.bias": tensor}
        query, key_part, value = _thirds(key, tensor, config.backbone_config.hidden_size)
        if vit[2] == "qkv.bias":  # a plain ViT (no CAE) has one fused bias; LW-DETR's key bias must be zero
            if key_part.abs().max() > 0:
                raise ConversionError(f"{key}: a non-zero key bias has no place in LW-DETR's attention")
            return {prefix + "query.bias": query, prefix + "value.bias": value}
        return {prefix + "query.weight": query, prefix + "key.weight": key_part, prefix + "value.weight": value}
    decoder = re.match(r"^transformer\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)$", key)
    if decoder:
        prefix, kind = f"decoder.layers.{decoder[1]}.self_attn.", decoder[2]
        parts = _thirds(key, tensor, config.d_model)
        return {f"{prefix}{name}_proj.{kind}": part for name, part in zip("qkv", parts)}
    return None


def _thirds(key: str, tensor: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused `[3 * width, ...]` projection into query, key and value.

    The parts are copies: safetensors refuses tensors that share one storage.
    """
    if tensor.shape[0] != 3 * width:
        rows = f"expected {3 * width} rows (3 x {width}), got {tensor.shape[0]}"
        raise ConversionError(f"checkpoint does not match the preset: {key} {rows}; is the size right?")
    return tuple(part.clone() for part in tensor.split(width, dim=0))


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an original `.pth` safely and return its model state dict (under "model", "state_dict" or top level).

    Raises:
        ConversionError: missing or unreadable file, Python objects other than tensors/containers, no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        blocked = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if blocked:
            raise ConversionError(
                f"{path}: refusing to unpickle {blocked[1]}; the file holds Python objects, not just tensors "
                "(re-save only the state dict: torch.save({'model': state_dict}, path))"
            ) from None
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({_last_detail(error)})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({_last_detail(error)})") from None
    state_dict = _find_state_dict(checkpoint)
    if state_dict is None:
        raise ConversionError(f"{path}: no state dict of tensors found (looked under 'model', 'state_dict', top level)")
    return state_dict


def _last_detail(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip() and "torch.load" not in line]
    return (lines[-1] if lines else type(error).__name__)[:160]


def _find_state_dict(checkpoint: object) -> dict[str, torch.Tensor] | None:
    if not isinstance(checkpoint, Mapping):
        return None
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    return tensors or None


def config_for_checkpoint(
    state_dict: Mapping[str, torch.Tensor], size: str, num_labels: int | None = None
) -> LwDetrConfig:
    """The preset `size`, adjusted to what the checkpoint's tensors say.

    The class count comes from `class_embed` (checked against `num_labels` when given), the number of query groups
    from `refpoint_embed` and the ViT's pre-training size from `pos_embed`; the 91-class COCO models get COCO names.
    """
    preset = preset_config(size)
    found = state_dict.get("class_embed.weight", state_dict.get("module.class_embed.weight"))
    checkpoint_labels = None if found is None else int(found.shape[0])
    if num_labels is not None and checkpoint_labels is not None and num_labels != checkpoint_labels:
        raise ConversionError(f"--num-labels {num_labels} but the checkpoint's class head has {checkpoint_labels}")
    labels = num_labels or checkpoint_labels or preset.num_labels
    overrides: dict = {"num_labels": labels}
    if labels == len(COCO_ID2LABEL):
        overrides["id2label"] = dict(COCO_ID2LABEL)
        overrides["label2id"] = {name: i for i, name in COCO_ID2LABEL.items() if name != "N/A"}
    queries = state_dict.get("refpoint_embed.weight", state_dict.get("module.refpoint_embed.weight"))
    if queries is not None and queries.shape[0] % preset.num_queries == 0:
        overrides["group_detr"] = queries.shape[0] // preset.num_queries
    position = state_dict.get("backbone.0.encoder.pos_embed", state_dict.get("module.backbone.0.encoder.pos_embed"))
    if position is not None:
        side = round((position.shape[1] - 1) ** 0.5)  # one extra position for the pre-training class token
        overrides["backbone"] = {"pretrain_image_size": side * preset.backbone_config.patch_size}
    return preset_config(size, **overrides)


def _check_against_architecture(converted: dict[str, torch.Tensor], config: LwDetrConfig) -> None:
    """Compare names and shapes with the reference layout of a weightless (meta-device) model of `config`."""
    from .checkpoint import to_reference_state_dict
    from .modeling import LwDetrForObjectDetection

    with torch.device("meta"):
        expected = to_reference_state_dict(LwDetrForObjectDetection(config).state_dict())
    for key, value in expected.items():
        # Older checkpoints may lack BatchNorm's step counters; they only matter for momentum=None.
        if key.endswith("num_batches_tracked") and key not in converted:
            converted[key] = torch.zeros((), dtype=value.dtype)
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [k for k in expected if k in converted and tuple(converted[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else ""]
        details.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else "")
        shapes = [f"{k} {tuple(converted[k].shape)} != {tuple(expected[k].shape)}" for k in wrong[:3]]
        details.append(f"{len(wrong)} of the wrong shape ({'; '.join(shapes)})" if wrong else "")
        raise ConversionError("checkpoint does not match the preset: " + ", ".join(d for d in details if d))


def convert_checkpoint(
    path: str | os.PathLike,
    size: str,
    output: str | os.PathLike,
    num_labels: int | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Convert an original `.pth` into an HF-format folder (config.json, model.safetensors, preprocessor_config.json).

    The folder is written atomically (`lwdetr.checkpoint.save_model_folder`): a failure leaves no partial folder,
    and a folder already at `output` stays intact until the new one is complete.

    Raises:
        ConversionError: the file cannot be read safely, or its weights do not fit the `size` preset.
    """
    from .checkpoint import save_model_folder

    state_dict = load_original_checkpoint(path)
    config = config_for_checkpoint(state_dict, size, num_labels)
    converted = convert_original_state_dict(state_dict, config)
    _check_against_architecture(converted, config)
    output = Path(output)
    # Own, contiguous storage per tensor: safetensors refuses views of one storage (the original may hold some).
    tensors = {key: value.detach().contiguous().clone() for key, value in sorted(converted.items())}
    save_model_folder(output, tensors, config, image_size=640)
    if log is not None:
        summary = f"{config.num_labels} classes, {config.group_detr} query groups"
        log(f"converted {len(tensors)} tensors ({summary}) to {output}")
    return output
