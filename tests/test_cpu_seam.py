"""The CPU speed code sits behind one seam (`lwdetr.cpu.dispatch`): the model files hold none of it, an inference
forward on this CPU takes the fused paths through it, and it stands aside where they do not apply."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from lwdetr import cpu
from lwdetr.config import preset_config
from lwdetr.cpu import fused
from lwdetr.layers import ConvBnAct
from lwdetr.modeling import LwDetrForObjectDetection

LWDETR = Path(__file__).resolve().parents[1] / "lwdetr"
MODEL_FILES = (
    "vit.py",
    "decoder.py",
    "deformable.py",
    "layers.py",
    "projector.py",
    "modeling.py",
    "query_selection.py",
)
# what only the speed code names: oneDNN's ops, our kernels, weight packing and the checks that guard them
SPEED_CODE = (
    "torch.ops.mkldnn",
    "attention_kernel",
    "deformable_kernel",
    "onednn_usable",
    "outside_tracing_on_cpu",
    "derived_weights",
    "pack_linear_weight",
    "pack_conv_weight",
    "buffer_reusing_mlp",
    "fused_forward",
)


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_hold_no_cpu_speed_code(name: str) -> None:
    source = (LWDETR / name).read_text()
    assert [marker for marker in SPEED_CODE if marker in source] == []


def _nano() -> LwDetrForObjectDetection:
    torch.manual_seed(0)
    return LwDetrForObjectDetection(preset_config("nano", num_labels=3)).eval()


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
def test_a_float32_inference_forward_takes_every_fused_path(monkeypatch) -> None:
    """Inference runs each ViT block, projector ConvBnAct and decoder FFN, and the decoder's value projections, in
    oneDNN's fused ops; a forward with autograd runs none of them. (The fused results are compared with the plain
    ones in test_perf_paths.py, which would pass unnoticed if the seam stopped dispatching.)"""
    calls: Counter[str] = Counter()
    for name in ("vit_block", "conv_bn_act", "decoder_ffn", "decoder_values"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *args, _real=real, _name=name: calls.update([_name]) or _real(*args))
    model = _nano()
    pixels = torch.randn(1, 3, 128, 128)
    model(pixels)  # with autograd: the plain ops
    assert calls == Counter()
    with torch.no_grad():
        model(pixels)
    conv_layers = [m for m in model.modules() if isinstance(m, ConvBnAct)]
    assert conv_layers and all(type(m.activation) in fused.ONEDNN_ACTIVATIONS for m in conv_layers)
    config = model.config
    expected = {
        "vit_block": config.backbone_config.num_hidden_layers,
        "conv_bn_act": len(conv_layers),
        "decoder_ffn": config.decoder_layers,
        "decoder_values": 1,
    }
    assert calls == Counter(expected)


def test_the_seam_stands_aside_off_the_cpu() -> None:
    """On another device (here the meta device, standing in for a GPU) every fast path says None, with and without
    autograd, so the modules run their plain ops."""
    model = _nano().to("meta")
    block = model.model.backbone.backbone.encoder.layer[0]
    embeddings = model.model.backbone.backbone.embeddings
    decoder = model.model.decoder
    layer = decoder.layers[0]
    conv = next(m for m in model.modules() if isinstance(m, ConvBnAct))
    dim, d_model = block.norm1.normalized_shape[0], decoder.d_model

    def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, device="meta", dtype=dtype)

    heads = layer.cross_attn.heads
    locations, weights = meta(1, 5, heads, 1, 2, 2), meta(1, 5, heads, 1, 2)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert cpu.fast_vit_block(block, meta(4, 16, dim)) is None
            assert cpu.fast_vit_attention(block.attn, meta(4, 16, 3 * dim)) is None
            assert cpu.fast_vit_mlp(block.mlp, meta(4, 16, dim).requires_grad_(grad)) is None
            assert cpu.fast_patch_embedding(embeddings, meta(1, 3, 64, 64, dtype=torch.bfloat16)) is None
            assert cpu.fast_group_attention(layer.self_attn, meta(2, 5, d_model), meta(2, 5, d_model)) is None
            assert cpu.fast_decoder_ffn(layer.mlp, meta(2, 5, d_model).requires_grad_(grad)) is None
            assert cpu.fast_decoder_values(decoder, meta(1, 16, d_model)) is None
            sampling = (meta(1, 16, d_model), None, [(4, 4)], locations, weights, None)
            assert cpu.fast_deformable_sampling(layer.cross_attn, *sampling) is None
            assert cpu.fast_conv_bn_act(conv, meta(1, conv.conv.in_channels, 8, 8)) is None
