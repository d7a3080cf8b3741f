"""UI details a user sees (issue 18, item 6), checked at the level of `AppContext` and the built Blocks: the log shows
its newest lines, both loss series and single AP points are drawn, the model picker offers only what can load, the
hub's absence is said in plain words, the dataset preview is readable, a 0-detection result says why, the examples
are near the top, and the disabled Stop button does not look active. `tests/test_browser.py` looks at them too.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image
from test_app import ALICE

from lwdetr_app import models
from lwdetr_app.datasets import inspect_dataset
from lwdetr_app.models import ModelChoice, choose_default_model, model_choices
from lwdetr_app.runs import owner_key
from lwdetr_app.training import JobSnapshot
from lwdetr_app.ui import build_demo

# ------------------------------------------------------------------------------------------------ model picker


def test_offline_picker_offers_only_cached_hub_checkpoints(tmp_path, assets, monkeypatch):
    cached = "AnnaZhang/lwdetr_tiny_60e_coco"
    monkeypatch.setattr(models, "_cached", lambda model_id: model_id == cached)
    offline = [option.key for option in model_choices(tmp_path / "runs", assets[0], None, hub_reachable=False)]
    assert offline == ["demo", cached]
    online = [option.key for option in model_choices(tmp_path / "runs", assets[0], None)]
    assert len(online) == 1 + len(models.PUBLISHED_MODELS)


def test_default_model_offline_says_the_hub_is_unreachable_in_plain_words(tmp_path, assets, monkeypatch):
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


def test_offline_app_offers_no_hub_checkpoint_and_a_failed_pick_resets_the_picker(ctx, monkeypatch):
    monkeypatch.setattr(models, "_cached", lambda model_id: False)
    ctx.default = ModelChoice(ctx.default.ref, ctx.default.reason, hub_reachable=False)
    assert not any(value in models.PUBLISHED_MODELS for _, value in ctx.model_choices())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failed = ctx.select_model(str(ctx.paths.root / "no-such-model"), ctx.default.ref, None, 0.5, 100)
    assert failed[-1] == gr.update(value="demo")  # the picker shows the model still in use (by its key)
    assert "Still using the previous model" in failed[1]
    assert ctx.select_model("demo", ctx.default.ref, None, 0.5, 100)[-1] == gr.skip()


# ------------------------------------------------------------------------------------------------ training panel


def _poll_with(ctx, monkeypatch, **fields):
    """`ctx.poll` as ALICE sees her own job in the state `fields` describe."""
    snap = JobSnapshot(version=1, runs_version=0, owner=owner_key(None, ALICE), run_name="run", **fields)
    monkeypatch.setattr(ctx.job, "snapshot", lambda: snap)
    return ctx.poll(None, None, ALICE)


def test_log_box_shows_the_newest_lines(ctx, monkeypatch):
    lines = tuple(f"line {i}" for i in range(200))
    log = _poll_with(ctx, monkeypatch, state="running", epochs=10, log=lines)[4]
    shown = log.splitlines()
    assert shown[-1] == "line 199" and len(shown) <= 10 and "line 0" not in shown


def test_loss_plot_knows_the_epoch_mean_series_before_it_arrives(ctx, monkeypatch):
    steps = tuple((i / 4, "loss (step)", 10.0 - i) for i in range(1, 4))
    loss = _poll_with(ctx, monkeypatch, state="running", epochs=10, loss_points=steps)[2]
    frame = loss["value"]
    assert set(frame["series"]) == {"loss (step)", "loss (epoch mean)"}  # the colour domain is fixed at first draw
    assert frame[frame["series"] == "loss (epoch mean)"]["value"].isna().all()  # ... but nothing is drawn for it
    assert loss["x_lim"] == [0, 10]  # a fixed range: round ticks, no overlapping labels


def test_ap_after_one_epoch_is_drawn_as_points(ctx, monkeypatch):
    ap = tuple((1.0, key, value) for key, value in (("AP", 0.2), ("AP50", 0.4), ("AP75", 0.1)))
    update = _poll_with(ctx, monkeypatch, state="running", epoch=1, epochs=10, ap_points=ap)[3]
    assert list(update["value"]["value"]) == [0.2, 0.4, 0.1] and update["x_lim"] == [0, 10]
    plot = next(c for c in build_demo(ctx).blocks.values() if getattr(c, "elem_id", None) == "ap-plot")
    assert isinstance(plot, gr.ScatterPlot)  # a line through a single point draws nothing


def test_disabled_stop_button_is_grey(ctx, monkeypatch):
    assert _poll_with(ctx, monkeypatch, state="running")[9] == gr.update(interactive=True, variant="stop")
    assert _poll_with(ctx, monkeypatch, state="done")[9] == gr.update(interactive=False, variant="secondary")
    stop = next(c for c in build_demo(ctx).blocks.values() if getattr(c, "elem_id", None) == "stop-training")
    assert stop.variant == "secondary" and not stop.interactive


# ------------------------------------------------------------------------------------------------ Detect tab


def test_no_detection_left_says_the_top_score_and_what_to_lower(ctx, assets):
    raw, *outputs, status = ctx.detect(str(assets[1][0]), ctx.default.ref, 0.3, 100, [])
    best = max(raw["detections"], key=lambda d: d.score)
    image, table, count, timing, json_file, hint = ctx.refilter(raw, 1.0, 100, [])
    assert count == 0 and table.empty
    assert f"the best is {best.label} at {best.score:.2f}" in hint and "Lower the score threshold" in hint
    suggested = float(hint.rsplit("about ", 1)[1].split(" ")[0])
    assert suggested <= best.score and ctx.refilter(raw, suggested, 100, [])[2] >= 1  # the advice works
    assert "candidate boxes" in ctx.refilter(raw, 0.01, 100, [])[5]
    assert "class filter" in ctx.refilter(raw, 0.01, 100, ["no-such-class"])[5]


def test_examples_sit_right_under_the_image(ctx):
    demo = build_demo(ctx)
    ids = {getattr(block, "elem_id", None): block_id for block_id, block in demo.blocks.items()}
    order = _layout_order(demo.config["layout"])
    examples = next(b for b, block in demo.blocks.items() if isinstance(block, gr.Dataset))
    assert order.index(ids["input-image"]) < order.index(examples) < order.index(ids["model-picker"])


def _layout_order(node) -> list[int]:
    """Component ids in page order (depth first through Gradio's layout tree)."""
    return [node["id"], *(i for child in node.get("children", []) for i in _layout_order(child))]


# ------------------------------------------------------------------------------------------------ dataset preview


def _one_box_dataset(root: Path) -> Path:
    """A Roboflow-style COCO folder: black 640x640 images, one 'gear' box each."""
    for split in ("train", "valid"):
        folder = root / split
        folder.mkdir(parents=True)
        Image.new("RGB", (640, 640)).save(folder / "black.png")
        coco = {
            "images": [{"id": 1, "file_name": "black.png", "width": 640, "height": 640}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 300, 300, 200], "area": 6e4, "iscrowd": 0}
            ],  # fmt: skip
            "categories": [{"id": 1, "name": "gear"}],
        }
        (folder / "_annotations.coco.json").write_text(json.dumps(coco))
    return root


def test_dataset_preview_labels_are_readable_in_the_gallery(tmp_path):
    preview = inspect_dataset(_one_box_dataset(tmp_path / "data"), work_dir=tmp_path / "work")
    assert preview.ok, preview.report
    image, caption = preview.images[0]
    pixels = np.asarray(image)
    tag_rows = int(((pixels[:240].max(axis=2) > 30).sum(axis=1) >= 40).sum())  # the tag sits above the box
    # The gallery shows the 512-px preview at 250-350 px: a tag must be 20+ px high to read ~10 px there.
    assert tag_rows >= 20, tag_rows
    assert caption == "black.png (1 boxes)"


def test_dataset_gallery_shows_captions_under_one_large_image(ctx):
    gallery = next(c for c in build_demo(ctx).blocks.values() if getattr(c, "elem_id", None) == "dataset-gallery")
    assert gallery.preview  # in the grid, Gradio lays each caption over the bottom of its image
