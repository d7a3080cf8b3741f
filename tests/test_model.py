"""Our LW-DETR against the reference (transformers) on identical weights: outputs, losses, gradients, checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers
from model_utils import outputs_with_the_same_proposals, ragged_batch, random_labels, relative_error, twin_models

from lwdetr import cpu
from lwdetr.checkpoint import from_reference_state_dict, to_reference_state_dict
from lwdetr.config import PRESETS, preset_config
from lwdetr.modeling import LwDetrForObjectDetection

TOLERANCE = 1e-4
EVAL_KEYS = [
    "logits",
    "pred_boxes",
    "init_reference_points",
    "last_hidden_state",
    "intermediate_hidden_states",
    "intermediate_reference_points",
    "enc_outputs_class",
    "enc_outputs_coord_logits",
]


def _step(model: LwDetrForObjectDetection) -> int:
    return model.model.backbone.backbone.size_divisor


def _presets(names, slow=("large", "xlarge")) -> list:
    """Preset names for parametrize; the big ones marked slow (run with `bash .ci/run --all`)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.mark.parametrize("preset", _presets(PRESETS))
@pytest.mark.parametrize("shape", ["square", "wide"])
def test_eval_parity(preset: str, shape: str):
    reference, ours = twin_models(preset)
    reference.eval()
    ours.eval()
    step = _step(ours)
    height, width = (6 * step, 6 * step) if shape == "square" else (5 * step, 7 * step)
    batch = 3 if shape == "wide" else 2
    expected, got = outputs_with_the_same_proposals(
        reference, ours, lambda seed: ragged_batch(height, width, step, batch, seed)
    )
    for key in EVAL_KEYS:
        assert got[key].shape == expected[key].shape, key
        assert relative_error(got[key], expected[key]) < TOLERANCE, key


@pytest.mark.parametrize("preset", _presets(["nano", "tiny", "large"]))
def test_training_parity_losses_and_gradients(preset: str, monkeypatch):
    # PyTorch's attention here, so that both models round alike: with random weights, rounding differences of 1e-6
    # reorder near-tied proposals in Group DETR's top-k (13 groups) and every output downstream of the swapped
    # queries. The projector's channels-last convolutions still round differently, hence 50 queries per group (fewer
    # near ties than the presets' 300) and an input on which both models pick the same proposals (see the helper).
    # The compiled kernel's gradients are checked against PyTorch's in test_cpu_kernels.py.
    monkeypatch.setattr(cpu, "fast_vit_attention", lambda attn, qkv: None)
    reference, ours = twin_models(preset, num_labels=5, num_queries=50)
    reference.train()
    ours.train()
    step = _step(ours)
    labels = random_labels(2, 5, counts=[3, 1])
    expected, got = outputs_with_the_same_proposals(
        reference, ours, lambda seed: ragged_batch(5 * step, 6 * step, step, 2, seed), tries=10, labels=labels
    )
    groups = ours.config.group_detr
    assert got.logits.shape[1] == ours.config.num_queries * groups
    assert relative_error(got.loss, expected.loss) < TOLERANCE
    assert set(got.loss_dict) == set(expected.loss_dict)
    for key, value in expected.loss_dict.items():
        assert relative_error(got.loss_dict[key], value) < TOLERANCE, key
    assert len(got.auxiliary_outputs) == len(expected.auxiliary_outputs) == ours.config.decoder_layers - 1
    for own, theirs in zip(got.auxiliary_outputs, expected.auxiliary_outputs):
        for key in ("logits", "pred_boxes"):
            assert relative_error(own[key], theirs[key]) < TOLERANCE, key

    # Gradients in float64. In float32 a rounding difference can also flip a near-tied Hungarian match, which moves
    # whole gradient tensors (seen: 2e-2 of their scale in large's projector, with equal losses); in float64 both
    # models compute the same function to ~1e-12, and any error in our backward shows.
    reference.double()
    ours.double()
    pixels, mask = ragged_batch(5 * step, 6 * step, step)
    labels = [{k: v.double() if v.is_floating_point() else v for k, v in target.items()} for target in labels]
    reference(pixel_values=pixels.double(), pixel_mask=mask, labels=labels).loss.backward()
    ours(pixels.double(), mask, labels=labels).loss.backward()
    reference_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    reference_grads = from_reference_state_dict(reference_grads)
    own_grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(own_grads) == set(reference_grads)
    largest = max(g.abs().max().item() for g in reference_grads.values())
    for name, grad in reference_grads.items():
        # Compared on the scale of each gradient tensor. Some are exactly zero in theory (a bias whose per-channel
        # constant a training-mode BatchNorm removes) and hold rounding noise: those are compared against a floor
        # set by the largest gradient of the model.
        scale = max(grad.abs().max().item(), 1e-5 * largest)
        assert (own_grads[name] - grad).abs().max().item() <= 1e-8 * scale, name


def test_every_parameter_gets_a_gradient():
    config = preset_config("nano", num_labels=3)
    model = LwDetrForObjectDetection(config).train()
    pixels, mask = ragged_batch(128, 160, 32)
    out = model(pixels, mask, labels=random_labels(2, 3, counts=[2, 3]))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    frozen = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert frozen == []


def test_inference_uses_only_the_first_group():
    config = preset_config("nano", num_labels=3)
    model = LwDetrForObjectDetection(config).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 128, 160))
    assert out.logits.shape == (1, config.num_queries, 3)
    assert out.pred_boxes.shape == (1, config.num_queries, 4)
    assert out.intermediate_hidden_states.shape == (config.decoder_layers, 1, config.num_queries, config.d_model)
    assert out.loss is None


def test_state_dict_mapping_round_trip():
    model = LwDetrForObjectDetection(preset_config("tiny", num_labels=4))
    ours = model.state_dict()
    reference_layout = to_reference_state_dict(ours)
    assert any(".attention.attention.query.weight" in k for k in reference_layout)
    assert not any("encoder_heads" in k or ".attn.qkv" in k for k in reference_layout)
    back = from_reference_state_dict(reference_layout)
    assert set(back) == set(ours)
    for key, value in ours.items():
        assert torch.equal(back[key], value), key


def test_saved_folder_loads_in_transformers_and_back(tmp_path):
    reference, ours = twin_models("nano", num_labels=4)
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    theirs, info = transformers.AutoModelForObjectDetection.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    theirs.eval()
    expected, got = outputs_with_the_same_proposals(theirs, ours, lambda seed: ragged_batch(128, 160, 32, seed=seed))
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    assert relative_error(got.pred_boxes, expected.pred_boxes) < TOLERANCE

    reference.eval().save_pretrained(tmp_path / "theirs")
    loaded = LwDetrForObjectDetection.from_pretrained(tmp_path / "theirs")
    assert not loaded.training
    expected, got = outputs_with_the_same_proposals(
        reference, loaded, lambda seed: ragged_batch(128, 160, 32, seed=seed)
    )
    assert relative_error(got.logits, expected.logits) < TOLERANCE
    assert relative_error(got.pred_boxes, expected.pred_boxes) < TOLERANCE
    assert loaded.config.id2label == reference.config.id2label


def test_new_label_set_keeps_everything_but_the_class_heads(tmp_path):
    _, ours = twin_models("nano", num_labels=4)
    ours.save_pretrained(tmp_path)
    labels = {0: "cat", 1: "dog"}
    loaded = LwDetrForObjectDetection.from_pretrained(
        tmp_path, ignore_mismatched_sizes=True, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    assert loaded.config.num_labels == 2 and loaded.class_embed.out_features == 2
    before, after = ours.state_dict(), loaded.state_dict()
    changed = {k for k in after if after[k].shape != before[k].shape}
    assert changed and all("class_embed" in k for k in changed)
    assert torch.equal(after["bbox_embed.layers.0.weight"], before["bbox_embed.layers.0.weight"])


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (torch.randn(1, 1, 64, 64), "channels"),
        (torch.randn(1, 3, 16, 64), "window grid"),
        (torch.randn(1, 3, 80, 64), "multiples of 32"),
        (torch.randn(0, 3, 64, 64), "empty batch"),
        (torch.randn(1, 3, 32, 32), "fewer than"),
        (torch.randn(3, 64, 64), "pixel_values must be"),
    ],
)
def test_bad_pixel_values(pixels, message):
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=2)).eval()
    with pytest.raises(ValueError, match=message):
        model(pixels)


def test_bad_labels():
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=2)).train()
    pixels = torch.randn(1, 3, 128, 128)
    outside = [{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 1.5, 0.2]])}]
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model(pixels, labels=outside)
    with pytest.raises(ValueError, match="label dicts"):
        model(pixels, labels=outside * 2)


def test_offline_hub_id_fails_fast_with_a_clear_message(monkeypatch):
    import time

    from lwdetr.hub import ModelNotFoundError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError, match="AnnaZhang/lwdetr_nonexistent_test.*local folder"):
        LwDetrForObjectDetection.from_pretrained("AnnaZhang/lwdetr_nonexistent_test")
    assert time.monotonic() - start < 10
