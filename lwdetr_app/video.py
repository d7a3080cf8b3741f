"""Annotate an uploaded video frame by frame, without gradio: check that it is a video within the limits, decode
sampled frames with OpenCV's FFmpeg, run the detector on batches of them, draw the kept boxes (`lwdetr.draw`, as for
an image) and encode a WebM (VP8) that browsers play.

OpenCV comes with albumentations (the app's training dependency) and its wheel carries FFmpeg with libvpx, so no
other video library is needed; its FFmpeg has no H.264 encoder, hence WebM.

A public app reads whatever a visitor uploads, so:
- Only MP4/MOV, WebM/MKV, AVI and Ogg reach FFmpeg, recognised by their first bytes. FFmpeg would otherwise pick a
  demuxer by content or name: a text playlist (HLS, concat) names other files or URLs to read.
- FFmpeg opens the upload through a link with a server-made name: a visitor's file name is never parsed by it (an
  image-sequence pattern such as `a%d.jpg` would make FFmpeg read other files).
- Frame size and (when the header's timing is plausible) declared duration are checked before any frame is
  annotated. A header whose timing is missing or implausible, as in a browser's recording, is not trusted: the frames'
  timestamps are read first (`frame_times`), and a video longer than `max_seconds` by them is refused before any frame
  is annotated. Whatever the header claimed, no pass over the frames decodes more than `max_seconds` of video by the
  timestamps or more than `max_seconds` x `max_fps` frames, and at most `max_frames` frames are annotated: a longer
  video is sampled on a grid of constant rate, so the work per video is bounded.
- Frames are decoded upright: a phone's rotation metadata is applied, as browsers apply it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from lwdetr.detector import Detector

from . import detection
from .frame_times import Grid, Sampling, Timing, header_timing, measured_timing, plan_sampling

__all__ = [
    "CONTAINERS",
    "OUTPUT_SUFFIX",
    "AnnotatedVideo",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "annotate_video",
    "container_of",
    "output_size",
    "max_frames_read",
    "status_line",
]

CONTAINERS = "MP4, MOV, WebM, MKV, AVI or Ogg"
OUTPUT_SUFFIX = ".webm"
_OUTPUT_MAX_SIDE = 1280  # the annotated video is at most this large: smaller files, faster encoding
_VP8 = cv2.VideoWriter_fourcc(*"VP80")


class VideoError(ValueError):
    """A video that cannot be annotated; the message is one line naming it by the name the visitor knows."""


@dataclass(frozen=True)
class VideoLimits:
    """Bounds on one uploaded video (the byte size is bounded by the upload limit before it gets here)."""

    max_pixels: int = 1920 * 1088
    max_seconds: float = 120.0
    max_fps: float = 120.0  # a header's rate above it is not trusted; with max_seconds it bounds the frames decoded
    max_frames: int = 300  # frames annotated; a longer video is sampled


def max_frames_read(limits: VideoLimits) -> int:
    """The most frames decoded from one video, whatever its header and timestamps say."""
    return math.ceil(limits.max_seconds * limits.max_fps)


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame size (upright), frame rate and frame count (0 when the container does not
    say). A browser's recording may claim any rate: `timing` is None unless it is plausible."""

    width: int
    height: int
    fps: float
    frame_count: int
    timing: Timing | None = None


@dataclass
class AnnotatedVideo:
    """The outcome of `annotate_video`.

    `detections` holds, per annotated frame, its index in the source video (in decoding order) and the detections
    kept by the filters (boxes in source pixels). The annotated video has `written` frames at `fps`: the annotated
    ones, each held over the grid points until the next (`frame_times`).
    """

    info: VideoInfo
    sampling: Sampling
    detections: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    written: int = 0
    seconds: float = 0.0
    truncated: bool = False  # the video went on past the length its header gave, and was cut at `max_frames`

    @property
    def frames(self) -> int:
        return len(self.detections)

    @property
    def step(self) -> int:
        return self.sampling.step

    @property
    def fps(self) -> float:
        return self.sampling.fps

    @property
    def processing_fps(self) -> float:
        """Frames annotated per second of wall time (decoding, detection, drawing and encoding together)."""
        return self.frames / self.seconds if self.seconds > 0 else 0.0


def container_of(path: str | os.PathLike[str]) -> str | None:
    """The container family of the regular file at `path` from its first bytes ("mp4", "matroska", "avi", "ogg"),
    else None. MP4 and MOV share the ISO box layout; WebM is Matroska."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not wait for a writer
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        head = os.read(descriptor, 12)
    except OSError:
        return None
    finally:
        os.close(descriptor)
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"OggS":
        return "ogg"
    return None


@contextmanager
def _linked(path: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """A link with a server-made name to the video at `path`, for FFmpeg to open; `VideoError` naming `name` when
    its first bytes are not a video container's."""
    if container_of(path) is None:
        raise VideoError(f"{name}: not a video ({CONTAINERS} expected)")
    with tempfile.TemporaryDirectory(prefix="video-") as folder:
        link = Path(folder) / "input"
        link.symlink_to(Path(path).resolve())
        yield link


@contextmanager
def _opened(link: Path, name: str) -> Iterator[cv2.VideoCapture]:
    """An FFmpeg capture of the video at `link`, decoding frames upright; `VideoError` naming `name` if it fails."""
    capture = cv2.VideoCapture(str(link), cv2.CAP_FFMPEG)
    try:
        if not capture.isOpened():
            raise VideoError(f"{name}: cannot be decoded (a damaged file, or a codec not supported here)")
        # A phone stores a portrait video as landscape frames and a rotation, which browsers apply: so do we. It is
        # OpenCV's default, set anyway: the frame size read from the capture is the upright one only with it on.
        capture.set(cv2.CAP_PROP_ORIENTATION_AUTO, 1)
        yield capture
    finally:
        capture.release()


def _info(capture: cv2.VideoCapture, name: str, limits: VideoLimits) -> VideoInfo:
    """The header's numbers, checked against `limits`; `VideoError` for a frame size out of bounds, or a plausible
    timing (`header_timing`) longer than `max_seconds`."""
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps, count = float(capture.get(cv2.CAP_PROP_FPS)), capture.get(cv2.CAP_PROP_FRAME_COUNT)
    count = int(count) if math.isfinite(count) and count > 0 else 0
    info = VideoInfo(width, height, fps, count, header_timing(fps, count, limits.max_fps))
    if width < 1 or height < 1:
        raise VideoError(f"{name}: no video frames found")
    if width * height > limits.max_pixels:
        raise VideoError(
            f"{name}: frames of {width} x {height} pixels, more than the limit of {limits.max_pixels / 1e6:.1f} "
            "megapixels"
        )
    if info.timing is not None and info.timing.seconds > limits.max_seconds:
        raise VideoError(f"{name}: {info.timing.seconds:.0f} s long, more than the limit of {limits.max_seconds:g} s")
    return info


def _frame_times(capture: cv2.VideoCapture, name: str, limits: VideoLimits) -> Iterator[float]:
    """Decode the frames of `capture` one by one (`grab`: not yet converted to BGR), yielding each one's timestamp
    in seconds from the first frame's.

    Raises:
        VideoError: past the limits whatever the header said: a timestamp more than `max_seconds` after the first,
            or more than `max_frames_read` frames (a frame rate above `max_fps`).
    """
    most = max_frames_read(limits)
    start = None
    for index in range(most + 1):
        if not capture.grab():
            return  # the end, or a truncated file: what was decoded so far is the video
        if index == most:
            raise VideoError(
                f"{name}: more than {most} frames, past the limit of {limits.max_seconds:g} s at {limits.max_fps:g} fps"
            )
        stamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000
        if not math.isfinite(stamp):
            raise VideoError(f"{name}: a frame without a usable timestamp")
        start = stamp if start is None else start
        if stamp - start > limits.max_seconds:
            raise VideoError(f"{name}: longer than the limit of {limits.max_seconds:g} s by its frame times")
        yield stamp - start


def _timing(link: Path, name: str, limits: VideoLimits) -> tuple[VideoInfo, Timing]:
    """(the checked header, the timing to sample by): the header's when plausible, else measured on every frame's
    timestamp (a first pass that decodes without annotating, bounded as `_frame_times` is)."""
    with _opened(link, name) as capture:
        info = _info(capture, name, limits)
        if info.timing is not None:
            return info, info.timing
        times = list(_frame_times(capture, name, limits))
    if not times:
        raise VideoError(f"{name}: no frame could be decoded (a truncated or damaged file?)")
    return info, measured_timing(times)


def output_size(width: int, height: int, max_side: int = _OUTPUT_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the annotated video: the source's, scaled down to at most `max_side`, both even (the
    encoder stores colour at half resolution)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _scaled_box(box: tuple[float, ...], scale_x: float, scale_y: float) -> tuple[float, ...]:
    """An (x0, y0, x1, y1) box in source pixels -> in the pixels of the (smaller) output frame."""
    x0, y0, x1, y1 = box
    return (x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y)


def _sampled_frames(
    capture: cv2.VideoCapture, limits: VideoLimits, name: str, result: AnnotatedVideo
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(index, grid point, BGR frame [H, W, 3] uint8) of each frame kept by the sampling's grid, at most
    `max_frames` grid points; `result.truncated` is set when the video goes on past them (its header said less)."""
    grid = Grid(result.sampling)
    for index, seconds in enumerate(_frame_times(capture, name, limits)):
        point = grid.point(seconds)
        if point is None:
            continue  # decoded (later frames depend on it), never converted
        if point >= limits.max_frames:
            result.truncated = True
            return
        ok, frame = capture.retrieve()
        if not ok or frame is None:
            return
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] * frame.shape[1] > limits.max_pixels:
            raise VideoError(f"{name}: a frame of {frame.shape[1]} x {frame.shape[0]} pixels is past the limit")
        yield index, point, frame


class _GridWriter:
    """The annotated video's VP8 encoder at the grid's rate: a frame kept for grid point k is written as frame k,
    and the frame before it is held (written again) over the points in between."""

    def __init__(self, target: Path, fps: float, size: tuple[int, int], name: str) -> None:
        self.size, self.written, self._last = size, 0, None
        self._writer = cv2.VideoWriter(str(target), cv2.CAP_FFMPEG, _VP8, fps, size)
        if not self._writer.isOpened():
            raise VideoError(f"{name}: the annotated video could not be encoded (no VP8 encoder)")

    def write(self, point: int, frame: np.ndarray) -> None:
        """Write `frame` (BGR [H, W, 3] uint8 of `size`) at grid point `point`, after the last written one."""
        while self.written < point:
            self._writer.write(self._last)
            self.written += 1
        self._writer.write(frame)
        self._last, self.written = frame, self.written + 1

    def release(self) -> None:
        self._writer.release()


def _annotate_batch(
    detector: Detector,
    batch: list[tuple[int, int, np.ndarray]],
    writer: _GridWriter,
    filters: tuple[float, int, Sequence[str]],
    result: AnnotatedVideo,
) -> None:
    """Detect on the frames of `batch` in one call, keep what passes `filters` (threshold, max detections, classes)
    and write each frame, scaled to the writer's size, with its boxes drawn at its grid point."""
    rgb = [np.ascontiguousarray(frame[:, :, ::-1]) for _, _, frame in batch]
    # As for an image: the model at the floor, then the visitor's filters, so a frame gives what the image path gives.
    predictions = detector.predict_many(
        rgb, detection.FLOOR_THRESHOLD, detection.FLOOR_MAX_DETECTIONS, batch_size=len(rgb)
    )
    size = writer.size
    for (index, point, frame), prediction in zip(batch, predictions):
        if prediction.error is not None:
            raise VideoError(f"frame {index}: {prediction.error}")
        kept = detection.filter_detections(prediction.detections, *filters)
        scale_x, scale_y = size[0] / frame.shape[1], size[1] / frame.shape[0]
        shown = [dataclasses.replace(d, box=_scaled_box(d.box, scale_x, scale_y)) for d in kept]
        small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if size != frame.shape[1::-1] else frame
        drawn = detection.draw(Image.fromarray(small[:, :, ::-1]), shown)
        writer.write(point, np.ascontiguousarray(np.asarray(drawn)[:, :, ::-1]))
        result.detections.append((index, kept))


def annotate_video(
    detector: Detector,
    source: str | os.PathLike[str],
    target: str | os.PathLike[str],
    name: str,
    limits: VideoLimits,
    threshold: float,
    max_detections: int,
    classes: Sequence[str] = (),
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> AnnotatedVideo:
    """Write `target` (a `.webm`): the video at `source` with the detections passing the filters drawn on every
    frame the sampling keeps (`frame_times`), at most `_OUTPUT_MAX_SIDE` pixels large.

    `progress(done, expected)` is called after each batch of `batch_size` frames.

    Raises:
        VideoError: one line naming `name`: not a video, past a limit, or no frame decodable.
    """
    start = time.perf_counter()
    with _linked(source, name) as link:
        info, timing = _timing(link, name, limits)
        result = AnnotatedVideo(info, plan_sampling(timing, limits.max_frames))
        expected = min(limits.max_frames, result.sampling.expected_frames)
        filters = (threshold, max_detections, classes)
        with _opened(link, name) as capture:  # from the first frame again, after `_timing`'s pass if it made one
            writer = _GridWriter(Path(target), result.fps, output_size(info.width, info.height), name)
            try:
                batch: list[tuple[int, int, np.ndarray]] = []
                for item in _sampled_frames(capture, limits, name, result):
                    batch.append(item)
                    if len(batch) == batch_size:
                        _annotate_batch(detector, batch, writer, filters, result)
                        batch = []
                        if progress is not None:
                            progress(result.frames, max(expected, result.frames))
                if batch:
                    _annotate_batch(detector, batch, writer, filters, result)
            finally:
                writer.release()
                result.written = writer.written
    if not result.frames:
        raise VideoError(f"{name}: no frame could be decoded (a truncated or damaged file?)")
    result.seconds = time.perf_counter() - start
    return result


def status_line(result: AnnotatedVideo, name: str, limits: VideoLimits) -> str:
    """What the Detect tab says under an annotated video: frames, boxes, the processing rate and any sampling."""
    boxes = sum(len(kept) for _, kept in result.detections)
    line = (
        f"{name}: {result.frames} frames annotated in {result.seconds:.1f} s ({result.processing_fps:.1f} fps), "
        f"{boxes} boxes in all."
    )
    timing = result.sampling.timing
    if result.step > 1:
        measured = " (measured on its frame times)" if timing.measured else ""
        line += (
            f" One frame in {result.step} of the {timing.fps:.3g} fps video{measured} was annotated (at most "
            f"{limits.max_frames} frames): the result plays at {result.fps:.3g} fps."
        )
    if result.truncated:
        line += (
            f" It stopped at {limits.max_frames} frames: the video goes on longer than its header says, the rest was "
            "not read."
        )
    return line
