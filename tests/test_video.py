"""Webcam and video in the Detect tab (issue 18, item 7): `lwdetr_app.video` annotates a short synthetic video made
of the example images (every frame, or a sample of a longer one) into a WebM that browsers play, refuses videos past
its limits and hostile files in one line; `AppContext.annotate_video` keeps the results under a server-side id and
`AppContext.stream_frame` annotates webcam frames with the same filters and says the frame rate.
`tests/test_browser.py` drives both in Chromium.

Real visitors' videos: a browser's recording (MediaRecorder) whose header gives OpenCV a false frame rate (1000 fps)
and a phone-style MP4 (variable rate, rotated) are in tests/assets/, recorded by Chromium
(tests/assets/record_browser_videos.py); a WebM whose header lies is also made here from an OpenCV one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import warnings
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
import pytest
from PIL import Image

from lwdetr_app import detection, frame_times, video
from lwdetr_app.ui import build_demo

FPS = 10
FRAMES = 12
RESULT_FOLDER = re.compile(r"[0-9a-f]{32}")
ASSETS = Path(__file__).parent / "assets"
RECORDED_WEBM = ASSETS / "mediarecorder.webm"  # 160 x 120, 1.5 s, ~30 fps with jitter; OpenCV reads 1000 fps
ROTATED_MP4 = ASSETS / "mediarecorder_rotated.mp4"  # H.264 stored 160 x 120, shown 120 x 160 (90 degrees clockwise)


def source_frames(examples: list[Path], count: int = FRAMES) -> list[np.ndarray]:
    """`count` RGB frames [256, 256, 3]: each example image held for four frames, in turn."""
    images = [np.asarray(Image.open(path).convert("RGB").resize((256, 256))) for path in examples]
    return [images[(index // 4) % len(images)] for index in range(count)]


def write_video(path: Path, frames: list[np.ndarray], fps: float = FPS, codec: str = "MJPG") -> Path:
    """`frames` (RGB) as a video at `path` (MJPG in AVI by default: OpenCV's own encoder, quick and lossless
    enough)."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), fps, (width, height))
    assert writer.isOpened()
    for frame in frames:
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path


def with_header(path: Path, frame_ns: int | None = None, duration_ms: float | None = None) -> Path:
    """The Matroska file at `path` (written by OpenCV) with its header rewritten in place: the track's frame duration
    (`frame_ns`, the rate FFmpeg reports) and the segment's duration (`duration_ms`, 0 for none). The frames keep
    their own timestamps."""
    data = bytearray(path.read_bytes())
    if frame_ns is not None:
        at = data.index(bytes.fromhex("23E38384")) + 4  # DefaultDuration, 4 bytes
        data[at : at + 4] = struct.pack(">I", frame_ns)
    if duration_ms is not None:
        at = data.index(bytes.fromhex("448988")) + 3  # Duration, an 8-byte float
        data[at : at + 8] = struct.pack(">d", duration_ms)
    path.write_bytes(bytes(data))
    return path


def frame_times_of(path: Path) -> list[float]:
    """The timestamps (ms) of every frame of the video at `path`, as OpenCV decodes them."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    times = []
    while capture.grab():
        times.append(capture.get(cv2.CAP_PROP_POS_MSEC))
    capture.release()
    return times


def decoded(path: Path) -> tuple[list[np.ndarray], str]:
    """(every frame of the video at `path` as RGB, its codec's four characters)."""
    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG)
    code = int(capture.get(cv2.CAP_PROP_FOURCC))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[:, :, ::-1])
    capture.release()
    return frames, "".join(chr((code >> shift) & 0xFF) for shift in (0, 8, 16, 24))


@pytest.fixture(scope="module")
def detector(assets):
    from lwdetr.detector import Detector

    return Detector.from_pretrained(assets[0], device="cpu")


@pytest.fixture
def clip(assets, tmp_path) -> Path:
    return write_video(tmp_path / "clip.avi", source_frames(assets[1]))


def annotate(detector, source: Path, target: Path, limits=video.VideoLimits(), threshold=0.3, **options):  # noqa: B008
    return video.annotate_video(detector, source, target, source.name, limits, threshold, 100, **options)


# ------------------------------------------------------------------------------------------------ lwdetr_app.video


def test_every_frame_is_annotated_as_the_image_path_would_and_the_result_is_a_webm(detector, clip, tmp_path):
    result = annotate(detector, clip, tmp_path / "out.webm")
    assert [index for index, _ in result.detections] == list(range(FRAMES))
    assert result.step == 1 and result.fps == FPS and result.frames == FRAMES and not result.truncated
    assert "12 frames annotated in" in video.status_line(result, "clip.avi", video.VideoLimits())
    # Each frame's boxes are what the image path (the model at the floor, then the filters) gives for that frame.
    sources, _ = decoded(clip)
    for index in (0, 5, 10):  # one frame of each example image
        kept, frame = result.detections[index][1], sources[index]
        found, _ = detection.run_detection(detector, Image.fromarray(np.ascontiguousarray(frame)))
        expected = detection.filter_detections(found, 0.3, 100)
        assert [(d.label, np.round(d.box, 2).tolist()) for d in kept] == [
            (d.label, np.round(d.box, 2).tolist()) for d in expected
        ], index
    assert sum(len(kept) for _, kept in result.detections) > 0
    # A WebM (VP8) of the same frames: what Chromium plays.
    frames, codec = decoded(tmp_path / "out.webm")
    assert video.container_of(tmp_path / "out.webm") == "matroska" and codec == "VP80"
    assert len(frames) == FRAMES and frames[0].shape == (256, 256, 3)


def test_annotated_frames_differ_from_the_source_where_the_boxes_are(detector, clip, tmp_path):
    boxed = annotate(detector, clip, tmp_path / "boxed.webm")
    annotate(detector, clip, tmp_path / "clean.webm", threshold=1.0)  # no box passes: the frames as they were
    boxed_frames, clean_frames = decoded(tmp_path / "boxed.webm")[0], decoded(tmp_path / "clean.webm")[0]
    for (index, kept), with_boxes, without, source in zip(
        boxed.detections, boxed_frames, clean_frames, decoded(clip)[0]
    ):
        assert np.abs(without.astype(int) - source).mean() < 8, index  # only the codec's noise
        assert kept, index  # every example image has objects the demo model finds at 0.3
        difference = np.abs(with_boxes.astype(int) - without).max(axis=2)
        near = np.zeros(difference.shape, bool)  # the boxes and the tags above them
        for d in kept:
            x0, y0, x1, y1 = (round(v) for v in d.box)
            near[max(0, y0 - 20) : y1 + 4, max(0, x0 - 4) : x1 + 4] = True
        assert difference[near].mean() > max(8, 5 * difference[~near].mean()), index


def test_a_long_video_is_sampled_down_to_the_frame_limit(detector, clip, tmp_path):
    limits = video.VideoLimits(max_frames=5)
    progress = []
    result = annotate(
        detector, clip, tmp_path / "out.webm", limits, batch_size=2, progress=lambda *a: progress.append(a)
    )
    assert result.step == 3 and [index for index, _ in result.detections] == [0, 3, 6, 9]
    assert result.fps == pytest.approx(FPS / 3)
    assert len(decoded(tmp_path / "out.webm")[0]) == 4
    assert progress == [(2, 4), (4, 4)]
    assert "One frame in 3 of the 10 fps video was annotated" in video.status_line(result, "clip.avi", limits)


@pytest.fixture
def lying_clip(assets, tmp_path) -> Path:
    """The clip's 12 frames at 10 fps in a WebM whose header says what a browser's recording often says: 1000 fps
    and no duration (OpenCV reads no frame count)."""
    path = write_video(tmp_path / "lying.webm", source_frames(assets[1]), codec="VP80")
    return with_header(path, frame_ns=1_000_000, duration_ms=0.0)


def test_a_header_with_a_false_frame_rate_and_no_length_is_timed_by_the_frame_timestamps(
    detector, lying_clip, tmp_path
):
    capture = cv2.VideoCapture(str(lying_clip), cv2.CAP_FFMPEG)
    assert capture.get(cv2.CAP_PROP_FPS) == 1000 and capture.get(cv2.CAP_PROP_FRAME_COUNT) <= 0
    capture.release()
    result = annotate(detector, lying_clip, tmp_path / "out.webm")
    assert result.info.timing is None and result.sampling.timing.measured
    assert result.fps == pytest.approx(FPS) and result.step == 1 and not result.truncated
    assert [index for index, _ in result.detections] == list(range(FRAMES)) and result.written == FRAMES
    # The annotated video plays at the source's rate: 12 frames, 100 ms apart.
    assert frame_times_of(tmp_path / "out.webm") == pytest.approx([100.0 * k for k in range(FRAMES)], abs=1)


def test_a_video_sampled_by_its_frame_timestamps_keeps_its_timing(detector, lying_clip, tmp_path):
    limits = video.VideoLimits(max_frames=5)
    result = annotate(detector, lying_clip, tmp_path / "out.webm", limits)
    assert result.step == 3 and [index for index, _ in result.detections] == [0, 3, 6, 9]
    assert result.fps == pytest.approx(FPS / 3) and result.written == 4
    line = video.status_line(result, "lying.webm", limits)
    assert "One frame in 3 of the 10 fps video (measured on its frame times) was annotated" in line


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (video.VideoLimits(max_seconds=1.0), "longer than the limit of 1 s by its frame times"),
        (video.VideoLimits(max_seconds=2.0, max_fps=5), "more than 10 frames, past the limit of 2 s at 5 fps"),
    ],
)
def test_a_header_that_gives_no_length_cannot_pass_the_limits(detector, lying_clip, tmp_path, limits, message):
    with pytest.raises(video.VideoError) as caught:
        annotate(detector, lying_clip, tmp_path / "out.webm", limits)
    assert str(caught.value) == f"lying.webm: {message}"
    assert not (tmp_path / "out.webm").exists()  # refused on a first pass, before any frame was annotated


def test_a_header_that_says_less_than_the_video_holds_is_cut_at_the_frame_limit(detector, assets, tmp_path):
    short = with_header(write_video(tmp_path / "short.webm", source_frames(assets[1]), codec="VP80"), duration_ms=400)
    limits = video.VideoLimits(max_frames=5)
    result = annotate(detector, short, tmp_path / "out.webm", limits)
    assert result.info.frame_count == 4 and result.step == 1  # the header: 4 frames at 10 fps
    assert result.frames == 5 and result.written == 5 and result.truncated
    assert "It stopped at 5 frames: the video goes on longer than its header says" in video.status_line(
        result, "short.webm", limits
    )


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (video.VideoLimits(max_pixels=256 * 255), "frames of 256 x 256 pixels, more than the limit of 0.1 megapixels"),
        (video.VideoLimits(max_seconds=1.0), "1 s long, more than the limit of 1 s"),
    ],
)
def test_videos_past_the_limits_are_refused_before_any_frame_is_annotated(detector, clip, tmp_path, limits, message):
    with pytest.raises(video.VideoError) as caught:
        annotate(detector, clip, tmp_path / "out.webm", limits)
    assert str(caught.value) == f"clip.avi: {message}"
    assert not (tmp_path / "out.webm").exists()


def test_a_browser_recording_is_annotated_at_its_real_frame_rate(detector, tmp_path):
    capture = cv2.VideoCapture(str(RECORDED_WEBM), cv2.CAP_FFMPEG)
    assert capture.get(cv2.CAP_PROP_FPS) > video.VideoLimits().max_fps  # what refused it before
    capture.release()
    times = frame_times_of(RECORDED_WEBM)
    result = annotate(detector, RECORDED_WEBM, tmp_path / "out.webm")
    assert result.sampling.timing.measured and 20 < result.fps < 40 and result.step == 1
    assert result.sampling.timing.frames == len(times)
    # Frames are chosen by time: those stamped too close to the one before share its grid point and are skipped,
    # frames over a gap are held, so the annotated video lasts as long as the recording.
    assert len(times) * 0.7 < result.frames <= len(times)
    out = frame_times_of(tmp_path / "out.webm")
    assert len(out) == result.written and out[-1] == pytest.approx(times[-1], abs=1000 / result.fps)
    # Each annotated frame gives what the image path gives for it.
    sources, _ = decoded(RECORDED_WEBM)
    for index, kept in result.detections[::10]:
        found, _ = detection.run_detection(detector, Image.fromarray(np.ascontiguousarray(sources[index])))
        assert kept == detection.filter_detections(found, 0.3, 100), index


def test_a_browser_recording_is_sampled_and_bounded_by_its_timestamps(detector, tmp_path):
    limits = video.VideoLimits(max_frames=10)
    result = annotate(detector, RECORDED_WEBM, tmp_path / "out.webm", limits)
    assert result.written <= 10 and 5 <= result.frames <= 10 and result.step == 5 and 4 < result.fps < 8
    with pytest.raises(video.VideoError) as caught:
        annotate(detector, RECORDED_WEBM, tmp_path / "refused.webm", video.VideoLimits(max_seconds=1.0))
    assert str(caught.value) == "mediarecorder.webm: longer than the limit of 1 s by its frame times"


def test_a_rotated_phone_video_is_annotated_upright(detector, tmp_path):
    stored = cv2.VideoCapture(str(ROTATED_MP4), cv2.CAP_FFMPEG)
    stored.set(cv2.CAP_PROP_ORIENTATION_AUTO, 0)
    ok, landscape = stored.read()  # as the file stores it: 160 x 120
    stored.release()
    assert ok and landscape.shape == (120, 160, 3)
    result = annotate(detector, ROTATED_MP4, tmp_path / "out.webm", threshold=1.0)  # no box: the frames as they are
    assert (result.info.width, result.info.height) == (120, 160) and not result.sampling.timing.measured
    first = decoded(tmp_path / "out.webm")[0][0].astype(int)
    assert first.shape == (160, 120, 3)
    upright = np.rot90(landscape[:, :, ::-1], k=-1)  # 90 degrees clockwise, as Chromium shows it (see the script)
    assert np.abs(first - upright).mean() < 8 < np.abs(first - np.rot90(landscape[:, :, ::-1], k=1)).mean()


def test_frames_are_kept_for_the_grid_point_they_reach_and_held_over_gaps():
    sampling = frame_times.plan_sampling(frame_times.Timing(fps=10, frames=30), max_frames=10)
    grid = frame_times.Grid(sampling)  # a point every 0.3 s
    stamps = [0.0, 0.1, 0.2, 0.299, 0.4, 1.5, 1.6, 1.8]  # a rounded stamp, then a gap
    assert [grid.point(t) for t in stamps] == [0, None, None, 1, None, 5, None, 6]
    assert frame_times.measured_timing([0.0, 0.033, 0.07, 0.1]).fps == pytest.approx(30)
    assert frame_times.measured_timing([0.0, 0.0, 0.0]).fps == 1.0  # no usable span
    assert frame_times.header_timing(1000.0, 1460, max_fps=120) is None
    assert frame_times.header_timing(30.0, 0, max_fps=120) is None


def _hostile(kind: str, clip: Path, folder: Path) -> Path:
    path = folder / "upload.mp4"
    if kind == "image":
        Image.new("RGB", (64, 64)).save(path, format="PNG")
    elif kind == "playlist":  # FFmpeg would read the files and URLs an HLS playlist names
        path.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n#EXT-X-ENDLIST\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "garbage":
        path.write_bytes(b"\x1a\x45\xdf\xa3" + os.urandom(4000))  # a Matroska signature, then noise
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("image", "not a video (MP4, MOV, WebM, MKV, AVI or Ogg expected)"),
        ("playlist", "not a video"),
        ("empty", "not a video"),
        pytest.param("fifo", "not a video", marks=pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")),
        ("garbage", "cannot be decoded"),
    ],
)
def test_hostile_files_are_refused_in_one_line(detector, clip, tmp_path, kind, message):
    path = _hostile(kind, clip, tmp_path)
    with pytest.raises(video.VideoError) as caught:
        video.annotate_video(detector, path, tmp_path / "out.webm", "holiday.mp4", video.VideoLimits(), 0.3, 100)
    text = str(caught.value)
    assert text.startswith("holiday.mp4: ") and message in text and "\n" not in text and str(tmp_path) not in text


def test_a_truncated_video_gives_the_frames_before_the_cut_or_a_clear_error(detector, assets, tmp_path):
    whole = write_video(tmp_path / "whole.webm", source_frames(assets[1], 40), codec="VP80")
    cut = tmp_path / "cut.webm"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    try:
        result = annotate(detector, cut, tmp_path / "out.webm")
    except video.VideoError as error:
        assert str(error).startswith("cut.webm: ") and "\n" not in str(error)
    else:
        assert 0 < result.frames < 40


def test_the_visitors_file_name_is_never_parsed_by_ffmpeg(detector, clip, tmp_path):
    # Named like an image sequence, FFmpeg would read clip0.jpg, clip1.jpg, ... instead of this file.
    pattern = clip.rename(tmp_path / "clip%d.jpg")
    assert annotate(detector, pattern, tmp_path / "out.webm").frames == FRAMES


def test_output_size_is_even_and_at_most_1280():
    assert video.output_size(1920, 1080) == (1280, 720)
    assert video.output_size(255, 143) == (256, 144)
    assert video.output_size(3, 1) == (4, 2)


# ------------------------------------------------------------------------------------------------ handlers


def _upload(ctx, path: Path) -> dict:
    """`path` copied into Gradio's upload folder, as the raw payload a Video component sends."""
    folder = ctx.paths.gradio / "upload-1"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    target.write_bytes(path.read_bytes())
    return {"path": str(target), "orig_name": "my holiday.avi", "meta": {"_type": "gradio.FileData"}}


def test_video_handler_writes_the_video_and_per_frame_json_under_a_server_side_id(ctx, clip):
    progress = []

    def recorder(value, desc=None, unit=None):
        progress.append((value, desc, unit))

    annotated, download, json_file, status = ctx.annotate_video(
        _upload(ctx, clip), ctx.default.ref, 0.3, 100, [], progress=recorder
    )
    folder = Path(annotated).parent
    assert folder.parent == ctx.paths.results and RESULT_FOLDER.fullmatch(folder.name)
    assert Path(annotated).name == "my_holiday_detections.webm" and download == {
        "value": annotated,
        "interactive": True,
        "__type__": "update",
    }
    results = json.loads(Path(json_file["value"]).read_text())
    assert (
        results and {r["image_id"] for r in results} <= set(range(FRAMES)) and min(r["score"] for r in results) >= 0.3
    )
    assert status.startswith("my holiday.avi: 12 frames annotated in") and "fps)" in status
    assert progress[-1] == ((FRAMES, FRAMES), "Annotating my holiday.avi", "frames")
    assert [p.name for p in ctx.paths.results.iterdir()] == [folder.name]  # no staging folder left behind

    label = next(iter({r["category_id"] for r in results}))
    name = ctx.registry.get(ctx.default.ref).id2label[label]
    *_, json_file, _ = ctx.annotate_video(_upload(ctx, clip), ctx.default.ref, 0.3, 100, [name], progress=recorder)
    assert {r["category_id"] for r in json.loads(Path(json_file["value"]).read_text())} == {label}


@pytest.mark.parametrize("kind", ["outside", "not a video", "too long"])
def test_video_handler_refuses_bad_uploads_in_one_line_naming_the_visitors_file(ctx, clip, tmp_path, kind):
    payload = _upload(ctx, clip)
    if kind == "outside":
        payload["path"] = str(clip)
    elif kind == "not a video":
        Path(payload["path"]).write_bytes(b"<html>hello</html>")
    else:
        ctx.settings.max_video_seconds = 0.5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        annotated, download, json_file, status = ctx.annotate_video(
            payload, ctx.default.ref, 0.3, 100, [], progress=lambda *a, **k: None
        )
    expected = {"outside": "not an uploaded file", "not a video": "not a video", "too long": "s long"}[kind]
    assert annotated is None and not download["interactive"] and not json_file["interactive"]
    assert status.startswith("⚠️ Cannot annotate this video: my holiday.avi: ") and expected in status
    assert "\n" not in status and str(tmp_path) not in status and any(expected in str(w.message) for w in caught)
    assert not any(ctx.paths.results.iterdir())  # nothing kept of a refused video


def _data_url(path: Path) -> dict:
    return {"path": None, "url": "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()}


def test_webcam_frames_are_annotated_with_the_filters_and_the_frame_rate_is_shown(ctx, assets):
    frame = _data_url(assets[1][0])
    drawn, status, recent = ctx.stream_frame(frame, ctx.default.ref, 0.3, 100, [], [])
    source = np.asarray(Image.open(assets[1][0]).convert("RGB"), dtype=int)
    boxes = int(re.match(r"\*\*(\d+) boxes\*\*", status).group(1))
    assert boxes > 0 and "measuring the frame rate" in status and len(recent) == 1
    assert np.abs(np.asarray(drawn, dtype=int) - source).max() > 100  # boxes drawn
    drawn, status, recent = ctx.stream_frame(frame, ctx.default.ref, 0.3, 100, [], recent)
    assert re.search(r"· \d+\.\d fps ·", status) and len(recent) == 2
    drawn, status, _ = ctx.stream_frame(frame, ctx.default.ref, 0.3, 100, ["no-such-class"], recent)
    assert status.startswith("**0 boxes**")
    assert np.abs(np.asarray(drawn, dtype=int) - source).max() == 0  # the class filter applies: nothing drawn
    recent = ctx.stream_frame(frame, ctx.default.ref, 0.3, 100, [], [float(t) for t in range(30)])[2]
    assert len(recent) == 10 and recent[0] == 21.0  # the rate is measured over the last frames: the state stays small


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ({"path": None, "url": "data:image/jpeg;base64,bm90IGFuIGltYWdl"}, "not a recognised image"),
        ({"path": None, "url": "data:image/jpeg;base64"}, "malformed data URL"),
        ({"path": "/etc/passwd", "url": None}, "not an uploaded file"),
        ("large", "pixels"),
    ],
)
def test_webcam_frames_that_cannot_be_read_keep_the_picture_and_say_why(ctx, assets, frame, message):
    if frame == "large":
        ctx.settings.max_video_pixels = 100 * 100
        buffer = io.BytesIO()
        Image.new("RGB", (200, 100)).save(buffer, format="JPEG")
        frame = {"path": None, "url": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()}
    drawn, status, recent = ctx.stream_frame(frame, ctx.default.ref, 0.3, 100, [], [])
    assert drawn == gr.skip() and status.startswith("⚠️ Cannot read this frame") and message in status
    assert "\n" not in status and "/etc" not in status and recent == []


def test_webcam_stream_and_video_events_are_bounded_and_private(ctx):
    demo = build_demo(ctx)
    ids = {getattr(block, "elem_id", None): block_id for block_id, block in demo.blocks.items()}
    stream = next(fn for fn in demo.fns.values() if (ids["webcam"], "stream") in [(t[0], t[1]) for t in fn.targets])
    assert stream.time_limit == 60 and stream.stream_every == 0.2 and stream.concurrency_limit == 2
    annotating = [fn for fn in demo.fns.values() if fn.fn == ctx.annotate_video]
    assert {(t[0], t[1]) for fn in annotating for t in fn.targets} == {
        (ids["input-video"], "upload"),
        (ids["annotate-video"], "click"),
    }
    assert all(fn.concurrency_limit == 1 and fn.api_visibility == "private" for fn in [*annotating])
    assert stream.api_visibility == "private"
    assert ctx.settings.max_video_seconds == 120 and ctx.settings.max_video_frames == 300
