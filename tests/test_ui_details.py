"""UI details a user sees (issue 18, item 6), checked at the level of `AppContext` and the built Blocks: the log shows
its newest lines, both loss series and single AP points are drawn, the model picker offers only what can load, the
hub's absence is said in plain words, the dataset preview is readable, a 0-detection result says why, the examples
are near the top, and the disabled Stop button does not look active. `tests/test_browser.py` looks at them too.
"""

from __future__ import annotations

import warnings

import gradio as gr
from test_app import ALICE, assets, ctx  # noqa: F401 - pytest fixtures

from lwdetr_app import models
from lwdetr_app.models import ModelChoice, choose_default_model, model_choices

# ------------------------------------------------------------------------------------------------ model picker


def test_offline_picker_offers_only_cached_hub_checkpoints(tmp_path, assets, monkeypatch):  # noqa: F811
    cached = "AnnaZhang/lwdetr_tiny_60e_coco"
    monkeypatch.setattr(models, "_cached", lambda model_id: model_id == cached)
    offline = [value for _, value in model_choices(tmp_path / "runs", assets[0], None, hub_reachable=False)]
    assert offline == [str(assets[0].resolve()), cached]
    online = [value for _, value in model_choices(tmp_path / "runs", assets[0], None)]
    assert len(online) == 1 + len(models.PUBLISHED_MODELS)


def test_default_model_offline_says_the_hub_is_unreachable_in_plain_words(tmp_path, assets, monkeypatch):  # noqa: F811
    def no_network(model_id):
        raise OSError(
            f"could not download model {model_id!r} from the Hugging Face hub (Got: ConnectError: [Errno -2] Name "
            "or service not known); check the id and your connection, or pass a local folder"
        )

    monkeypatch.setattr("lwdetr.hub.resolve_model_dir", no_network)
    choice = choose_default_model(assets[0], hub_timeout=10)
    assert choice.ref == str(assets[0].resolve()) and not choice.hub_reachable
    assert "the hub is unreachable (no network connection to huggingface.co)" in choice.reason
    assert "Errno" not in choice.reason and "ConnectError" not in choice.reason


def test_offline_app_offers_no_hub_checkpoint_and_a_failed_pick_resets_the_picker(ctx, monkeypatch):  # noqa: F811
    monkeypatch.setattr(models, "_cached", lambda model_id: False)
    ctx.default = ModelChoice(ctx.default.ref, ctx.default.reason, hub_reachable=False)
    assert not any(value in models.PUBLISHED_MODELS for _, value in ctx.model_choices())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failed = ctx.select_model(str(ctx.paths.root / "no-such-model"), ctx.default.ref, None, 0.5, 100)
    assert failed[-1] == gr.update(value=ctx.default.ref)  # the picker shows the model still in use
    assert "Still using the previous model" in failed[1]
    assert ctx.select_model(ctx.default.ref, ctx.default.ref, None, 0.5, 100)[-1] == gr.skip()
