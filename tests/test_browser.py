"""The app in a real browser: Playwright drives headless Debian Chromium against `python app.py`.

Detect tab: drop an image, move the threshold slider and watch the table shrink, download the COCO JSON; stream
Chromium's fake camera (playing the example images) and see the frames come back annotated with the frame rate;
upload a short video and get it annotated, playing in the page, downloadable.
Fine-tune tab: the synthetic sample, a one-epoch nano run to its end (surviving a page reload), the weights zip
downloaded and loaded by `lwdetr.Detector`, and "Use in Detect". Screenshots go to test-artifacts/.

Never skipped in CI: without Chromium (or Playwright) the tests fail when the CI variable is set.
"""

from __future__ import annotations

import base64
import json
import os
import re
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from test_app import REPO, bundled_or_test_assets, start_app_server, stop_app_server

from lwdetr.detector import Detector

pytestmark = pytest.mark.browser  # in the default selection: the app as a person uses it

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
ARTIFACTS = REPO / "test-artifacts"
TRAINING_TIMEOUT_MS = 240_000


def _require_browser():
    """Playwright's sync API, or skip (locally) / fail (in CI) when it or Chromium is missing."""
    problem = None
    try:
        from playwright import sync_api
    except ImportError as error:
        problem, sync_api = f"playwright is not installed ({error})", None
    if problem is None and not Path(CHROMIUM).exists():
        problem = f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests must run in CI: {problem}")
        pytest.skip(problem)
    return sync_api


@pytest.fixture(scope="module")
def playwright_api():
    return _require_browser()


@pytest.fixture(scope="module")
def app(tmp_path_factory, playwright_api):
    root = tmp_path_factory.mktemp("browser")
    model, examples, env = bundled_or_test_assets(root / "assets")
    # A tiny synthetic sample so that the UI's fine-tune ends in seconds.
    env.update(LWDETR_APP_SYNTH_TRAIN="8", LWDETR_APP_SYNTH_VAL="4", LWDETR_APP_SYNTH_SIZE="128")
    process, url = start_app_server(root / "cwd", env)
    yield {"url": url, "model": model, "examples": examples, "downloads": root / "downloads"}
    stop_app_server(process)


def example_frames(examples: list[Path], count: int) -> list[np.ndarray]:
    """`count` RGB frames [256, 256, 3]: the example images in turn, each held for two frames."""
    images = [np.asarray(Image.open(path).convert("RGB").resize((256, 256))) for path in examples]
    return [images[(index // 2) % len(images)] for index in range(count)]


@pytest.fixture(scope="module")
def fake_camera(tmp_path_factory, app) -> Path:
    """A Y4M clip of the example images: what Chromium's fake camera plays (in a loop) to the webcam component."""
    path = tmp_path_factory.mktemp("camera") / "camera.y4m"
    with open(path, "wb") as handle:
        handle.write(b"YUV4MPEG2 W256 H256 F10:1 Ip A1:1 C420jpeg\n")
        for frame in example_frames(app["examples"], 12):
            handle.write(b"FRAME\n" + cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


@pytest.fixture(scope="module")
def chromium_browser(playwright_api, fake_camera):
    camera = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
    camera.append(f"--use-file-for-fake-video-capture={fake_camera}")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + camera)
        yield chromium
        chromium.close()


def open_page(browser, url: str):
    """A page in a new browser context: its own cookies and localStorage, so another visitor of the app."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.goto(url)
    return tab


@pytest.fixture
def ui_page(chromium_browser, app):
    tab = open_page(chromium_browser, app["url"])
    yield tab
    tab.context.close()


@pytest.fixture
def other_visitor(chromium_browser, app):
    tab = open_page(chromium_browser, app["url"])
    yield tab
    tab.context.close()


def drop_file(page, target, path: Path, mime: str) -> None:
    """A real drag-and-drop of `path` onto `target` (dragenter, dragover, drop with a DataTransfer)."""
    data = base64.b64encode(path.read_bytes()).decode()
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: mime}));
            return transfer;
        }""",
        [data, path.name, mime],
    )
    for event in ("dragenter", "dragover", "drop"):
        target.dispatch_event(event, {"dataTransfer": transfer})


def _reddish(css_colour: str) -> bool:
    red, green, blue = (int(v) for v in re.findall(r"\d+", css_colour)[:3])
    return red > green + 60 and red > blue + 60


def expected_counts(model: Path, image: Path) -> tuple[float, int, float, int]:
    """(low threshold, boxes at it, high threshold, fewer boxes at it) as the app should show them (max 100)."""
    scores = [d.score for d in Detector.from_pretrained(model, device="cpu").predict(str(image), 0.01, 300)]

    def count(threshold: float) -> int:
        return min(100, sum(s >= threshold for s in scores))

    def clear(threshold: float) -> bool:  # no score so close that float noise could flip it
        return all(abs(s - threshold) > 5e-4 for s in scores)

    low = next(t for t in (0.05, 0.06, 0.07, 0.08) if clear(t))
    candidates = [t / 100 for t in range(95, 9, -1) if clear(t / 100) and count(t / 100) < count(low)]
    assert candidates, f"no threshold shrinks the table (scores {sorted(scores)[-5:]})"
    # Prefer a few boxes left (a telling screenshot), else any fewer, else none.
    high = next((t for t in candidates if 2 <= count(t) <= 8), next((t for t in candidates if count(t)), candidates[0]))
    return low, count(low), high, count(high)


def test_detect_tab_drop_image_and_refilter_with_the_slider(ui_page, app, playwright_api):
    page, expect = ui_page, playwright_api.expect
    example = app["examples"][0]
    low, n_low, high, n_high = expected_counts(app["model"], example)
    expect(page.locator("#model-status")).to_contain_text("Bundled demo model")
    expect(page.locator("#model-status")).to_contain_text("the hub is unreachable")
    # Offline, the picker offers no hub checkpoint that could not load.
    page.locator("#model-picker input").click()
    expect(page.get_by_role("option", name=re.compile("Bundled demo model"))).to_have_count(1)
    expect(page.get_by_role("option", name=re.compile("AnnaZhang"))).to_have_count(0)
    page.keyboard.press("Escape")
    # The examples are in the first screenful (1280x900), not below the table.
    examples_box = page.get_by_text("Examples: click one to try it").bounding_box()
    assert examples_box is not None and examples_box["y"] < 900, examples_box

    drop_file(page, page.get_by_role("button", name="Drop an image file here to upload"), example, "image/jpeg")
    expect(page.locator("#input-image img")).to_be_visible()
    expect(page.locator("#output-image img")).to_be_visible()
    expect(page.locator("#inference-time textarea")).to_have_value(re.compile(r"^\d+ ms \(.+\)$"))

    count, rows = page.locator("#det-count input"), page.locator("#detections-table [role=row][data-index]")
    page.locator("#threshold input[type=range]").fill(str(low))
    expect(count).to_have_value(str(n_low))
    rows_low = rows.count()
    page.locator("#threshold input[type=range]").fill(str(high))
    expect(page.locator("#threshold input[type=number]")).to_have_value(str(high))
    expect(count).to_have_value(str(n_high))
    if n_high <= 8:  # the table is virtualised: only small tables render every row
        expect(rows).to_have_count(n_high)
    assert rows.count() < rows_low or n_high < n_low
    if n_high:
        expect(rows.first.locator("[data-col='0']")).not_to_be_empty()
    # Nothing left at 1.0: the status line names the best score and suggests a threshold.
    page.locator("#threshold input[type=range]").fill("1")
    expect(count).to_have_value("0")
    expect(page.locator("#detect-status")).to_contain_text("Lower the score threshold to about")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "detect-no-box-hint.png")
    page.locator("#threshold input[type=range]").fill(str(high))
    expect(count).to_have_value(str(n_high))

    with page.expect_download() as download:
        page.locator("#download-json").click()
    results = json.loads(Path(download.value.path()).read_text())
    assert len(results) == n_high and all(r["score"] >= high for r in results)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "detect-tab.png", full_page=True)


def test_detect_tab_webcam_stream_and_video_upload(ui_page, app, playwright_api, tmp_path):
    page, expect = ui_page, playwright_api.expect
    page.get_by_role("tab", name="Webcam").click()
    webcam = page.locator("#webcam")
    webcam.get_by_text("Click to Access Webcam").click()
    record = webcam.get_by_role("button", name="capture photo")  # "Record", then "Stop"
    record.click()
    status = page.locator("#webcam-status")
    expect(status).to_contain_text(re.compile(r"\b[1-9]\d* boxes · \d+\.\d fps · the model: \d+ ms per frame"))
    expect(page.locator("#webcam-output img")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "detect-webcam.png", full_page=True)
    record.click()  # stop streaming

    clip = tmp_path / "clip.webm"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"VP80"), 10, (256, 256))
    for frame in example_frames(app["examples"], 8):
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    page.get_by_role("tab", name="Video").click()
    page.locator("#input-video input[type=file]").set_input_files(clip)
    expect(page.locator("#video-status")).to_contain_text(
        re.compile(r"clip\.webm: 8 frames annotated in [\d.]+ s \([\d.]+ fps\), [1-9]\d* boxes in all\."),
        timeout=120_000,
    )
    # The annotated WebM plays in Chromium: its frames decode in the page.
    page.wait_for_function(
        "() => { const v = document.querySelector('#output-video video'); return v && v.readyState >= 2 "
        "&& v.videoWidth === 256 && v.duration > 0.5; }"
    )
    page.screenshot(path=ARTIFACTS / "detect-video.png", full_page=True)
    with page.expect_download() as download:
        page.locator("#download-video").click()
    capture = cv2.VideoCapture(download.value.path(), cv2.CAP_FFMPEG)
    frames = 0
    while capture.read()[0]:
        frames += 1
    capture.release()
    assert frames == 8


def test_detect_tab_annotates_a_browser_recording_at_its_real_frame_rate(ui_page, playwright_api):
    # Chromium's own MediaRecorder WebM, whose header gives OpenCV 1000 fps (tests/assets/record_browser_videos.py).
    page, expect = ui_page, playwright_api.expect
    page.get_by_role("tab", name="Video").click()
    page.locator("#input-video input[type=file]").set_input_files(REPO / "tests" / "assets" / "mediarecorder.webm")
    expect(page.locator("#video-status")).to_contain_text(
        re.compile(r"mediarecorder\.webm: \d\d frames annotated in"), timeout=120_000
    )
    # It plays in the page for as long as the recording (1.5 s): at its real rate, not 1000 fps.
    page.wait_for_function(
        "() => { const v = document.querySelector('#output-video video'); return v && v.readyState >= 2 "
        "&& v.videoWidth === 160 && v.duration > 1.2 && v.duration < 1.8; }"
    )


def test_finetune_tab_short_run_download_and_use_in_detect(ui_page, other_visitor, app, playwright_api):
    page, expect = ui_page, playwright_api.expect
    page.get_by_role("tab", name="Fine-tune").click()
    page.get_by_role("button", name="Use the built-in synthetic sample").click()
    expect(page.locator("#dataset-report textarea")).to_have_value(re.compile(r"Classes \(3\): circle, square"))
    expect(page.locator("#dataset-gallery img").first).to_be_visible()
    # The gallery opens on its first image, large, with the file name under it.
    captions = page.locator("#dataset-gallery").get_by_text(re.compile(r"^train_\d+\.jpg \(\d+ boxes\)$"))
    expect(captions).to_have_count(6 + 1)  # 6 training images, then the preview's own caption under the large one
    expect(page.locator("#stop-training")).to_be_disabled()
    stop_colour = page.locator("#stop-training").evaluate("b => getComputedStyle(b).backgroundColor")
    start_colour = page.locator("#start-training").evaluate("b => getComputedStyle(b).backgroundColor")
    assert stop_colour != start_colour and not _reddish(stop_colour), stop_colour  # grey, not a faded red
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "finetune-dataset.png", full_page=True)

    page.locator("#base-model input").click()
    page.get_by_role("option", name="Preset nano (random init)").click()
    # Empty settings are auto: their placeholders show the values chosen for this base model and dataset, and
    # follow what the visitor types (batch 2 instead of 8: four times the steps per epoch).
    auto_line = page.locator("#auto-settings")
    expect(auto_line).to_contain_text(re.compile(r"x 1 step, batch 8, .* from scratch"))
    expect(page.locator("#lr input")).to_have_attribute("placeholder", "auto: 0.001")
    expect(page.locator("#epochs input")).to_have_attribute("placeholder", re.compile(r"^auto: \d+$"))
    for elem_id, value in (("batch-size", "2"), ("epochs", "2"), ("image-size", "256")):
        box = page.locator(f"#{elem_id} input")
        box.fill(value)
        box.press("Tab")
    expect(auto_line).to_contain_text(re.compile(r"2 epochs x 4 steps, batch 2, 256 px"))
    expect(page.locator("#lr input")).to_have_value("")  # the learning rate stays auto
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#train-status")).to_contain_text(re.compile("Starting|Training|Finished"))

    # Another visitor (another browser) sees only that the trainer is busy: no log, no stop, no weights.
    other = other_visitor
    other.get_by_role("tab", name="Fine-tune").click()
    expect(other.locator("#train-status")).to_contain_text("The trainer is busy with another visitor's run")
    expect(other.locator("#stop-training")).to_be_disabled()
    expect(other.locator("#start-training")).to_be_disabled()
    expect(other.locator("#download-weights")).to_be_disabled()
    assert "Run " not in other.locator("#train-log textarea").input_value()
    ARTIFACTS.mkdir(exist_ok=True)
    other.screenshot(path=ARTIFACTS / "finetune-other-visitor.png", full_page=True)

    # The job belongs to this browser, not to the page: a reload finds it again.
    page.reload()
    page.get_by_role("tab", name="Fine-tune").click()
    log = page.locator("#train-log textarea")
    expect(log).to_have_value(re.compile(r"Run \d{8}-\d{6}-nano"))
    expect(page.locator("#train-status")).to_contain_text("Finished", timeout=TRAINING_TIMEOUT_MS)
    expect(log).to_have_value(re.compile(r"epoch 2/2"))
    assert log.input_value().splitlines()[-1].split("] ", 1)[1].startswith("done:")  # the newest line is shown
    # Both loss series and the AP points are drawn (without a reload), with x labels that do not overlap.
    expect(page.locator("#loss-plot svg path[aria-roledescription='line mark']")).to_have_count(2)
    expect(page.locator("#ap-plot svg path[aria-roledescription='point']")).to_have_count(6)
    boxes = [label.bounding_box() for label in page.locator("#loss-plot svg g[aria-label^='X-axis'] text").all()]
    boxes = [b for b in boxes if b and b["width"]]
    ticks = sorted((b for b in boxes if b["y"] == min(b["y"] for b in boxes)), key=lambda b: b["x"])  # not the title
    assert len(ticks) >= 2 and all(a["x"] + a["width"] <= b["x"] for a, b in zip(ticks, ticks[1:])), ticks
    metric_cells = page.locator("#metrics [role=row][data-index] [data-col='0']")
    expect(metric_cells.first).to_have_text("AP")

    weights = page.locator("#download-weights")
    expect(weights).to_be_enabled()
    with page.expect_download() as download:
        weights.click()
    target = app["downloads"] / "weights"
    with zipfile.ZipFile(download.value.path()) as archive:
        archive.extractall(target)
    folder = next(p.parent for p in target.rglob("config.json"))
    detector = Detector.from_pretrained(folder, device="cpu")
    assert sorted(detector.id2label.values()) == ["circle", "square", "triangle"]
    assert isinstance(detector.predict(str(app["examples"][0]), threshold=0.0), list)

    expect(page.locator("#your-runs [role=row][data-index]")).to_have_count(1)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "finetune-tab.png", full_page=True)

    # Once it is done, the other visitor still sees nothing of it: not in their runs, log or downloads.
    expect(other.locator("#train-status")).to_contain_text("No training job yet")
    expect(other.locator("#download-weights")).to_be_disabled()
    expect(other.locator("#your-runs [role=row][data-index]")).to_have_count(0)
    other.get_by_role("tab", name="Detect").click()
    other.locator("#model-picker input").click()
    expect(other.get_by_role("option", name=re.compile("Bundled demo model"))).to_have_count(1)
    expect(other.get_by_role("option", name=re.compile("Fine-tuned"))).to_have_count(0)

    page.get_by_role("button", name="Use in Detect").click()
    expect(page.locator("#model-status")).to_contain_text(f"Fine-tuned: {folder.name}")
    expect(page.get_by_role("tab", name="Detect")).to_have_attribute("aria-selected", "true")
