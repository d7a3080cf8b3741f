"""The training MLP whose backward writes the hidden gradient over its saved activation gives autograd's gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lwdetr.cpu.buffer_reusing_mlp import buffer_reusing_mlp, buffer_reusing_mlp_applies


def _layers(activation: nn.Module, dim: int = 24, hidden: int = 40, seed: int = 0):
    torch.manual_seed(seed)
    return nn.Linear(dim, hidden), activation, nn.Linear(hidden, dim)


def _gradients(fn, rows: torch.Tensor, layers, grad_out: torch.Tensor):
    fc1, act, fc2 = layers
    leaves = [t for t in (rows, fc1.weight, fc1.bias, fc2.weight, fc2.bias) if t.requires_grad]
    for leaf in leaves:
        leaf.grad = None
    out = fn(rows, fc1, act, fc2)
    out.backward(grad_out)
    return out.detach(), [leaf.grad.clone() for leaf in leaves]


def _plain(rows, fc1, act, fc2):
    return fc2(act(fc1(rows)))


@pytest.mark.parametrize(
    "activation", [nn.ReLU(), nn.ReLU(inplace=True), nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh")]
)
def test_gradients_match_autograd(activation: nn.Module) -> None:
    layers = _layers(activation)
    rows = torch.randn(1100, 24, requires_grad=True)  # more than two chunks of 512 rows, the last one partial
    grad_out = torch.randn(1100, 24)
    assert buffer_reusing_mlp_applies(rows, layers[0], activation)
    out, grads = _gradients(buffer_reusing_mlp, rows, layers, grad_out)
    expected_out, expected_grads = _gradients(_plain, rows, layers, grad_out)
    torch.testing.assert_close(out, expected_out, rtol=1e-6, atol=1e-6)
    assert len(grads) == len(expected_grads) == 5
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


def test_frozen_parts_get_no_gradient() -> None:
    fc1, act, fc2 = layers = _layers(nn.GELU())
    fc1.requires_grad_(False)
    rows = torch.randn(70, 24)  # an input without gradient: only fc2's parameters learn
    grad_out = torch.randn(70, 24)
    _, grads = _gradients(buffer_reusing_mlp, rows, layers, grad_out)
    assert fc1.weight.grad is None and fc1.bias.grad is None and rows.grad is None
    _, expected = _gradients(_plain, rows, layers, grad_out)
    assert len(grads) == len(expected) == 2
    for grad, want in zip(grads, expected):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_a_second_backward_raises_instead_of_using_the_overwritten_activation() -> None:
    layers = _layers(nn.ReLU())
    rows = torch.randn(30, 24, requires_grad=True)
    out = buffer_reusing_mlp(rows, *layers)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


def test_applies_only_to_cpu_training_steps() -> None:
    fc1, act, _ = _layers(nn.GELU())
    rows = torch.randn(8, 24, requires_grad=True)
    assert buffer_reusing_mlp_applies(rows, fc1, act)
    with torch.no_grad():
        assert not buffer_reusing_mlp_applies(rows, fc1, act)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not buffer_reusing_mlp_applies(rows, fc1, act)
    assert not buffer_reusing_mlp_applies(rows, fc1, nn.Tanh())
    with pytest.raises(ValueError, match="Tanh"):
        buffer_reusing_mlp(rows, fc1, nn.Tanh(), nn.Linear(40, 24))


def test_model_training_step_uses_it_and_matches_the_plain_layers(monkeypatch) -> None:
    from lwdetr.config import preset_config
    from lwdetr.cpu import dispatch
    from lwdetr.modeling import LwDetrForObjectDetection

    torch.manual_seed(0)
    model = LwDetrForObjectDetection(preset_config("nano", num_labels=3)).train()
    pixels = torch.randn(2, 3, 128, 128)
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]])}] * 2

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        model(pixel_values=pixels, labels=labels).loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    calls = []
    original = dispatch.buffer_reusing_mlp

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(dispatch, "buffer_reusing_mlp", counting)
    fast = grads()
    config = model.config
    assert len(calls) == config.backbone_config.num_hidden_layers + config.decoder_layers
    monkeypatch.setattr(dispatch, "buffer_reusing_mlp_applies", lambda *args: False)
    plain = grads()
    assert len(fast) == len(plain)
    for got, expected in zip(fast, plain):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
