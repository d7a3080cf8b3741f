"""Regenerate the browser-recorded videos in this folder (`python tests/assets/record_browser_videos.py`, ~10 s).

Headless Debian Chromium (through Playwright, as `tests/test_browser.py` drives it) paints the example images on a
160 x 120 canvas, a frame every 33 ms give or take 20 ms as a busy webcam delivers them, one image per half second,
and records 1.5 s of `canvas.captureStream()` with MediaRecorder, as a visitor's browser records a webcam:

- `mediarecorder.webm` (VP8): the timestamps are irregular, so FFmpeg cannot guess a frame rate; OpenCV reports the
  Matroska time base instead (1000 fps, and a frame count of the duration in milliseconds). The script checks that it
  does, else the file would not test what it is for.
- `mediarecorder_rotated.mp4` (H.264): the MP4 that Chromium records, with the rotation a phone writes for a portrait
  video (the track header's display matrix set to 90 degrees clockwise). The script checks that Chromium shows it
  upright as OpenCV decodes it (the same 120 x 160 picture, not the stored 160 x 120 one).
"""

from __future__ import annotations

import base64
import os
import struct
from pathlib import Path

import cv2
import numpy as np

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parents[1] / "examples" / "images"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
PAGE = "http://localhost/"  # a secure context (MediaRecorder, blobs), served by the route below: no server

RECORD = """async ([images, mimeType, milliseconds]) => {
    const canvas = Object.assign(document.createElement("canvas"), {width: 160, height: 120});
    document.body.append(canvas);
    const context = canvas.getContext("2d");
    const pictures = await Promise.all(images.map(async url => createImageBitmap(await (await fetch(url)).blob())));
    const recorder = new MediaRecorder(canvas.captureStream(), {mimeType, videoBitsPerSecond: 150000});
    const parts = [];
    recorder.ondataavailable = event => parts.push(event.data);
    const stopped = new Promise(resolve => { recorder.onstop = resolve; });
    const start = performance.now();
    let painting = true;
    const paint = () => {
        const elapsed = performance.now() - start;
        context.drawImage(pictures[Math.floor(elapsed / 500) % pictures.length], 0, 0, 160, 120);
        if (painting) setTimeout(paint, 33 + (Math.random() - 0.5) * 40);
    };
    recorder.start();
    paint();
    await new Promise(resolve => setTimeout(resolve, milliseconds));
    painting = false;
    recorder.stop();
    await stopped;
    const bytes = new Uint8Array(await new Blob(parts).arrayBuffer());
    let text = "";
    for (const byte of bytes) text += String.fromCharCode(byte);
    return btoa(text);
}"""

SHOW = """async (b64) => {
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const video = Object.assign(document.createElement("video"), {muted: true});
    video.src = URL.createObjectURL(new Blob([bytes], {type: "video/mp4"}));
    await new Promise((resolve, reject) => { video.onloadeddata = resolve; video.onerror = reject; });
    await video.play();  // a frame presented, as a visitor sees it
    await new Promise(resolve => video.requestVideoFrameCallback(resolve));
    video.pause();
    video.currentTime = 0;
    await new Promise(resolve => { video.onseeked = resolve; });
    const canvas = Object.assign(document.createElement("canvas"), {width: video.videoWidth,
                                                                     height: video.videoHeight});
    const context = canvas.getContext("2d");
    context.drawImage(video, 0, 0);
    return [video.videoWidth, video.videoHeight, Array.from(context.getImageData(0, 0, canvas.width,
                                                                                 canvas.height).data)];
}"""


def data_urls() -> list[str]:
    paths = sorted(EXAMPLES.glob("*.jpg"))
    return [f"data:image/jpeg;base64,{base64.b64encode(path.read_bytes()).decode()}" for path in paths]


def header(path: Path) -> tuple[float, float]:
    """(frame rate, frame count) as OpenCV reads them from the container."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    try:
        return capture.get(cv2.CAP_PROP_FPS), capture.get(cv2.CAP_PROP_FRAME_COUNT)
    finally:
        capture.release()


def first_frame_rgb(path: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
    ok, frame = capture.read()
    capture.release()
    assert ok, path
    return frame[:, :, ::-1]


def rotate_mp4(data: bytes, degrees_clockwise: int = 90) -> bytes:
    """`data` (an MP4 with one track) with the track header's display matrix set to a clockwise rotation, as phones
    write a portrait video."""
    assert degrees_clockwise == 90, "only the phone's portrait rotation is needed"
    data = bytearray(data)
    at = data.index(b"tkhd")
    version = data[at + 4]
    # After the box type: version and flags (4), creation and modification times, track id, reserved, duration,
    # reserved (8), layer, alternate group, volume, reserved (8), then the 3 x 3 matrix of 32-bit numbers.
    matrix = at + 4 + 4 + (8 if version == 0 else 16) + 8 + (4 if version == 0 else 8) + 8 + 8
    one, minus_one, w_one = 0x10000, 0xFFFF0000, 0x40000000  # 16.16 fixed point; the last column is 2.30
    data[matrix : matrix + 36] = struct.pack(">9I", 0, one, 0, minus_one, 0, 0, 0, 0, w_one)
    return bytes(data)


def main() -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.route(PAGE, lambda route: route.fulfill(body="<!doctype html><body></body>", content_type="text/html"))
        page.goto(PAGE)
        images = data_urls()

        webm = HERE / "mediarecorder.webm"
        for _ in range(5):  # the timer's jitter is random: record again until FFmpeg cannot guess a rate
            webm.write_bytes(base64.b64decode(page.evaluate(RECORD, [images, "video/webm;codecs=vp8", 1500])))
            if header(webm)[0] > 120:
                break
        else:
            raise SystemExit(f"{webm.name}: OpenCV reads a plausible frame rate {header(webm)}; record again")
        print(f"{webm.name}: {webm.stat().st_size} bytes, OpenCV reads fps and frame count {header(webm)}")

        mp4 = HERE / "mediarecorder_rotated.mp4"
        recorded = base64.b64decode(page.evaluate(RECORD, [images, "video/mp4;codecs=avc1", 1500]))
        mp4.write_bytes(rotate_mp4(recorded))
        width, height, pixels = page.evaluate(SHOW, base64.b64encode(mp4.read_bytes()).decode())
        shown = np.array(pixels, np.uint8).reshape(height, width, 4)[:, :, :3].astype(int)
        decoded = first_frame_rgb(mp4)
        assert (width, height) == (120, 160) and decoded.shape == (160, 120, 3), (width, height, decoded.shape)
        difference = np.abs(shown - decoded).mean()
        assert difference < 10, f"Chromium shows another picture than OpenCV decodes (mean difference {difference})"
        print(
            f"{mp4.name}: {mp4.stat().st_size} bytes, shown upright {width} x {height} by Chromium as by OpenCV "
            f"(mean difference {difference:.1f}), fps and frame count {header(mp4)}"
        )
        browser.close()


if __name__ == "__main__":
    main()
