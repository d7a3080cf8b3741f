"""The app against hostile visitors: forged session hashes, bad numbers, typed server paths, hostile zips and
datasets. Nothing is written or read outside the data folder, the disk stays within budget, and nothing a visitor
sees names a server path.

In-process tests drive `AppContext` directly; the last ones send raw HTTP requests to `python app.py` on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
import uuid
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from PIL import Image, ImageStat
from test_app import REPO, start_app_server, stop_app_server

from lwdetr_app.datasets import inspect_dataset
from lwdetr_app.handlers import AppContext
from lwdetr_app.public_text import public_text
from lwdetr_app.storage import enforce_budget, folder_bytes

MIB = 1 << 20
RESULT_FOLDER = re.compile(r"[0-9a-f]{32}")


def visible(outputs) -> list[str]:
    """Every string in a handler's outputs (recursively), i.e. what a visitor could read."""
    if isinstance(outputs, str):
        return [outputs]
    if isinstance(outputs, dict):
        return [text for key, value in outputs.items() if key != "value" for text in visible(value)]
    if isinstance(outputs, (list, tuple)):
        return [text for item in outputs for text in visible(item)]
    return []


def assert_no_server_path(texts: list[str], *folders: Path) -> None:
    for text in texts:
        assert "/tmp" not in text and str(REPO) not in text, text
        for folder in folders:
            assert str(folder) not in text and str(folder.resolve()) not in text, text


def upload(ctx: AppContext, name: str, content: bytes) -> Path:
    """A file as Gradio's upload cache would hold it: <gradio folder>/<hash>/<the visitor's file name>."""
    path = ctx.paths.gradio / uuid.uuid4().hex / name
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


def zip_bytes(entries: dict[str, bytes | str], path: Path) -> bytes:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return path.read_bytes()


def png(color: tuple[int, int, int], size=(64, 48)) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def coco(file_names: list[str]) -> str:
    images = [{"id": i, "file_name": name, "width": 64, "height": 48} for i, name in enumerate(file_names)]
    annotations = [{"id": i, "image_id": i, "category_id": 1, "bbox": [4, 4, 20, 20]} for i in range(len(file_names))]
    return json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]})


def call(handler, *args):
    """(outputs, warning texts) of a handler called outside a request (gr.Warning is then a Python warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = handler(*args)
    return outputs, [str(w.message) for w in caught]


# --------------------------------------------------------------------------------------------------- Detect tab


def test_detection_json_is_named_by_a_server_side_id(ctx, assets):
    raw, *outputs, status = ctx.detect(str(assets[1][0]), ctx.default.ref, 0.3, 100, [], "../../escaped")
    first = Path(outputs[4]["value"])
    assert first.parent.parent == ctx.paths.results and RESULT_FOLDER.fullmatch(first.parent.name)
    again = Path(ctx.refilter(raw, 0.5, 10, [])[4]["value"])
    assert again == first  # a refilter rewrites the same detection's file
    other = Path(ctx.detect(str(assets[1][0]), ctx.default.ref, 0.3, 100, [])[5]["value"])
    assert other.parent != first.parent  # every detection gets its own id
    raw["result_id"] = "../../forged"  # even a forged id in the (server-side) state is never a path
    forged = Path(ctx.refilter(raw, 0.5, 10, [])[4]["value"])
    assert forged.parent.parent == ctx.paths.results and RESULT_FOLDER.fullmatch(forged.parent.name)
    assert not any(p.name == "escaped" or p.name == "forged" for p in ctx.paths.root.parent.rglob("*"))


def test_results_are_kept_under_their_budget(ctx, assets):
    ctx.settings.results_budget = "1kb"  # about one detection's JSON
    written = []
    for _ in range(4):
        ctx._results_checked = 0.0  # the budget is checked at most every few seconds: now, each time
        written.append(Path(ctx.detect(str(assets[1][0]), ctx.default.ref, 0.01, 300, [])[5]["value"]))
    assert written[-1].is_file()  # the newest is in use
    assert len(list(ctx.paths.results.iterdir())) < 4 and not written[0].exists()


@pytest.mark.parametrize("threshold", ["abc", "nan", float("nan"), -0.1, 1.5, None, [0.3], "1e999"])
def test_detect_api_rejects_bad_thresholds_in_one_line(ctx, assets, threshold):
    with pytest.raises(gr.Error) as caught:
        ctx.detect_api(str(assets[1][0]), threshold)
    message = caught.value.message
    assert message.startswith("threshold must be a number from 0 to 1") and "\n" not in message


@pytest.mark.parametrize(("threshold", "max_detections"), [("abc", 10), (0.5, 1e308), (0.5, "x"), (0.5, -3)])
def test_filters_reject_bad_numbers_in_one_line(ctx, assets, threshold, max_detections):
    raw = ctx.run(str(assets[1][0]), ctx.default.ref)
    with pytest.raises(gr.Error, match=r"must be a number from 0 to (1|300)"):
        ctx.refilter(raw, threshold, max_detections, [])


def test_images_are_read_only_from_uploads_and_within_the_size_limit(ctx, assets, tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png((255, 0, 0)))
    inside_data = ctx.paths.runs / "not-an-upload.png"  # in the data folder, but not an upload
    inside_data.parent.mkdir(parents=True, exist_ok=True)
    inside_data.write_bytes(png((255, 0, 0)))
    for path in (outside, inside_data, ctx.paths.gradio / ".." / ".." / "secret.png", "x" * 5000, "a\x00b"):
        with pytest.raises(gr.Error, match="not an uploaded file") as caught:
            ctx.detect_api({"path": str(path), "orig_name": "holiday.png"}, 0.5)
        assert_no_server_path([caught.value.message], tmp_path)
    ctx.settings.max_upload = "1kb"
    big = upload(ctx, "big.png", png((0, 0, 255), (400, 400)) + bytes(2048))
    with pytest.raises(gr.Error, match="big.png: .* more than the upload limit of 1kb"):
        ctx.detect_api({"path": str(big), "orig_name": "big.png"}, 0.5)


def test_typed_model_paths_and_hub_ids_are_refused_unless_allowed(ctx, assets, tmp_path):
    copy = shutil.copytree(assets[0], tmp_path / "elsewhere" / "model")
    for typed in (str(copy), "someone/huge-model", "/etc"):
        outputs, warned = call(ctx.select_model, typed, ctx.default.ref, None, 0.5, 100)
        assert outputs[0] == gr.skip() and "not offered here" in outputs[1] and "Still using the previous" in outputs[1]
        assert_no_server_path(warned, tmp_path)
    dataset = ctx.paths.datasets / "upload-0123"
    dataset.mkdir()
    _, warned = call(ctx.start_training, str(dataset), str(copy), 1, 2, 64, 1e-4, False)
    assert ctx.job.snapshot().state == "idle" and any("is not offered here" in text for text in warned)
    ctx.settings.custom_models = True  # a local, trusted install may type any folder
    outputs, _ = call(ctx.select_model, str(copy), ctx.default.ref, None, 0.5, 100)
    assert outputs[0] == str(copy)


# ------------------------------------------------------------------------------------------------ Fine-tune tab


def test_preview_never_serves_a_file_from_outside_the_dataset(ctx, tmp_path):
    secret = ctx.paths.root / "secret.png"  # a server file the zip's annotations point at
    secret.write_bytes(png((255, 0, 0)))
    outside = tmp_path / "outside.png"
    outside.write_bytes(png((255, 0, 0)))
    # The zip extracts to datasets/upload-<hash>/train/: three levels up is the data folder.
    names = ["good.png", "../../../secret.png", str(outside), "good2.png"]
    entries = {"train/_annotations.coco.json": coco(names), "train/good.png": png((0, 0, 255))}
    entries["train/good2.png"] = png((0, 0, 255))
    path = upload(ctx, "sneaky.zip", b"")
    path.write_bytes(zip_bytes(entries, path))
    (root, report, gallery), warned = call(ctx.use_zip, str(path))
    assert root is not None and gallery, report
    for image, caption in gallery:
        assert "secret" not in caption and "outside" not in caption
        red, _, blue = ImageStat.Stat(image.convert("RGB")).mean
        assert blue > red, caption  # the dataset's own blue images only, never the red server files
    assert_no_server_path([report, *warned, *visible(gallery)], tmp_path, ctx.paths.root)


def test_preview_checks_containment_itself(ctx, tmp_path):
    """Even if the data layer handed back a record outside the root, inspect_dataset would not open it."""
    dataset = ctx.paths.datasets / "upload-x"
    (dataset / "train").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (dataset / "train" / name).write_bytes(png((0, 0, 255)))
    (dataset / "train" / "_annotations.coco.json").write_text(coco(["a.png", "b.png", "c.png"]))
    preview = inspect_dataset(dataset, work_dir=ctx.paths.datasets)
    assert preview.ok and len(preview.images) == 2  # one of the three is held out for validation
    outside = tmp_path / "outside.png"
    outside.write_bytes(png((255, 0, 0)))
    from finetune import data as finetune_data

    original = finetune_data.load_detection_data

    def escaping(*args, **kwargs):
        loaded = original(*args, **kwargs)
        for record in loaded.train.records:
            record.path = outside  # what a lax data layer could return
        return loaded

    finetune_data.load_detection_data = escaping
    try:
        preview = inspect_dataset(dataset, work_dir=ctx.paths.datasets)
    finally:
        finetune_data.load_detection_data = original
    assert preview.ok and preview.images == []


def test_refused_and_unusable_zips_leave_nothing_and_messages_name_the_upload(ctx, tmp_path):
    cases = {
        "bomb.zip": {"data/zeros.bin": bytes(8 * MIB)},
        "not-a-dataset.zip": {"top/readme.txt": "nothing here", "top/pic.png": png((1, 2, 3))},
        "bad-coco.zip": {"train/_annotations.coco.json": json.dumps({"images": [], "annotations": "oops"})},
        "escape.zip": {"../evil.txt": "x"},
        "deep.zip": {"train/_annotations.coco.json": "[" * 20000 + "]" * 20000},
    }
    for name, entries in cases.items():
        path = upload(ctx, name, b"")
        path.write_bytes(zip_bytes(entries, path))
        (root, report, gallery), warned = call(ctx.use_zip, str(path))
        assert root is None and gallery == [] and report.startswith("This dataset cannot be used"), name
        assert "\n" not in report and "Traceback" not in report, report
        assert_no_server_path([report, *warned], tmp_path, ctx.paths.root)
        assert [p.name for p in ctx.paths.datasets.iterdir() if p.name.startswith(("upload-", ".upload-"))] == [], name
    not_zip = upload(ctx, "holiday.zip", b"definitely not a zip")
    (root, report, _), warned = call(ctx.use_zip, str(not_zip))
    assert root is None and "holiday.zip" in report
    assert_no_server_path([report, *warned], tmp_path)


def test_uploaded_zips_are_capped_in_size(ctx):
    ctx.settings.max_upload = "1kb"
    path = upload(ctx, "large.zip", b"")
    path.write_bytes(zip_bytes({"train/a.bin": os.urandom(4096)}, path))  # incompressible: over 1 KiB zipped
    (root, report, _), _ = call(ctx.use_zip, str(path))
    assert root is None and "large.zip" in report and "more than the upload limit" in report


def synthetic_zip(ctx: AppContext, name: str, seed: int) -> Path:
    from finetune.synthetic import make_synthetic_dataset

    folder = make_synthetic_dataset(
        ctx.paths.root.parent / f"src-{seed}", num_train=3, num_val=1, image_size=64, seed=seed
    )
    path = upload(ctx, name, b"")
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(folder.rglob("*")):
            archive.write(file, f"shapes/{file.relative_to(folder).as_posix()}")
    return path


def test_datasets_are_kept_under_their_budget_oldest_first(ctx):
    first_root, report, _ = ctx.use_zip(str(synthetic_zip(ctx, "first.zip", 1)))
    assert first_root, report
    from lwdetr_app.datasets import dataset_entry

    size = folder_bytes(dataset_entry(Path(first_root), ctx.paths.datasets))
    ctx.settings.datasets_budget = str(size * 3 // 2)  # room for one dataset, not two
    second_root, _, _ = ctx.use_zip(str(synthetic_zip(ctx, "second.zip", 2)))
    assert second_root and Path(second_root).is_dir()  # the newest is in use by the session that uploaded it
    assert not Path(first_root).exists()
    message, warned = call(ctx.start_training, first_root, "nano", 1, 2, 64, 1e-4, False)
    assert any("Choose a dataset first" in text for text in warned)  # evicted: asked to upload again


def test_enforce_budget_evicts_oldest_and_keeps_what_is_in_use(tmp_path):
    for index, name in enumerate(["a", "b", "c", "d"]):
        (tmp_path / name).mkdir()
        (tmp_path / name / "payload").write_bytes(bytes(1000))
        os.utime(tmp_path / name, (1000 + index, 1000 + index))
    (tmp_path / ".e.partial").mkdir()  # being staged right now: never evicted
    (tmp_path / ".e.partial" / "payload").write_bytes(bytes(1000))
    removed = enforce_budget(tmp_path, 3000, keep=[tmp_path / "a" / "payload"])
    assert [p.name for p in removed] == ["b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".e.partial", "a", "d"]


def test_public_text_strips_server_paths(tmp_path):
    upload = tmp_path / "datasets" / "upload-1f"
    text = f"cannot open '{upload}/top/train/x.png' (File \"{tmp_path / 'lib' / 'x.py'}\", AP/circle 1/2)"
    shown = public_text(text, {str(upload): "birds.zip"})
    assert shown == "cannot open 'birds.zip/top/train/x.png' (File \"x.py\", AP/circle 1/2)"


# ------------------------------------------------------------------------------ the served app, raw HTTP requests


@pytest.fixture(scope="module")
def served(tmp_path_factory, assets):
    root = tmp_path_factory.mktemp("hostile")
    workdir = root / "cwd"
    process, url = start_app_server(workdir, assets[2])
    yield SimpleNamespace(url=url, root=root, data=workdir / "data")
    stop_app_server(process)


def http_json(url: str, payload: dict | None = None):
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def upload_over_http(url: str, path: Path) -> str:
    boundary = uuid.uuid4().hex
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{path.name}"\r\n\r\n'
    body = head.encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    request = urllib.request.Request(f"{url}/gradio_api/upload", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())[0]


def queue_call(url: str, dependency: dict, data: list, session: str) -> dict:
    """Join the queue as a raw client with `session` as its session hash; the final message of the event."""
    payload = {
        "data": data,
        "fn_index": dependency["id"],
        "trigger_id": dependency["targets"][0][0],
        "session_hash": session,
        "event_data": None,
    }
    try:
        http_json(f"{url}/gradio_api/queue/join", payload)
    except urllib.error.HTTPError as error:  # refused at the door is fine too, as long as it says nothing
        return {"msg": "refused", "status": error.code, "text": error.read().decode(errors="replace")}
    query = urllib.parse.urlencode({"session_hash": session})
    with urllib.request.urlopen(f"{url}/gradio_api/queue/data?{query}", timeout=120) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    return message
    raise AssertionError("the event never completed")


def test_forged_session_hashes_write_nothing_outside_and_reveal_no_path(served, assets):
    config = http_json(f"{served.url}/config")
    by_name = {dep.get("api_name"): dep for dep in config["dependencies"]}
    image = upload_over_http(served.url, assets[1][0])
    file_data = {"path": image, "orig_name": assets[1][0].name, "meta": {"_type": "gradio.FileData"}}
    sessions = ["../../escaped", "../escaped-too", str(served.root / "abs-escaped"), "e" * 5000, "/escaped\x00x"]
    messages = []
    for session in sessions:
        done = queue_call(served.url, by_name["detect_new_image"], [file_data, None, 0.3, 100, []], session)
        messages.append(done)
        if done["msg"] == "process_completed":
            assert done["success"], done
            for item in done["output"]["data"]:  # every file handed back lies inside the data folder
                if isinstance(item, dict) and item.get("path"):
                    assert Path(item["path"]).resolve().is_relative_to(served.data.resolve())
    escaped = [p for p in served.root.rglob("*escaped*")]
    assert escaped == [], escaped
    results = served.data / "results"
    assert all(RESULT_FOLDER.fullmatch(p.name) for p in results.iterdir())
    for session in sessions:
        for threshold in ("abc", "NaN", -1, 7):
            bad = queue_call(served.url, by_name["detect"], [file_data, threshold], session)
            messages.append(bad)
            if bad["msg"] == "process_completed":
                assert not bad["success"] and "threshold must be a number from 0 to 1" in bad["output"]["error"]
        messages.append(queue_call(served.url, by_name["refilter"], [None, "abc", 1e308, "x"], session))
    assert [p for p in served.root.rglob("*escaped*")] == []
    assert_no_server_path([json.dumps(m.get("output", {}).get("error")) for m in messages], served.root)
    assert_no_server_path([m.get("text", "") for m in messages], served.root)


def test_served_app_refuses_files_outside_uploads(served, tmp_path):
    config = http_json(f"{served.url}/config")
    detect = next(dep for dep in config["dependencies"] if dep.get("api_name") == "detect")
    secret = tmp_path / "secret.png"
    secret.write_bytes(png((255, 0, 0)))
    done = queue_call(served.url, detect, [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}, 0.5], "s1")
    assert done["msg"] in ("refused", "process_completed") and not done.get("success")
    assert_no_server_path([json.dumps(done.get("output", {})), done.get("text", "")], tmp_path, served.root)
