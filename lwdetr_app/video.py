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
- Frame size, frame rate and declared duration are checked before any frame is annotated; decoding stops after
  `max_seconds` worth of frames whatever the header claimed, and at most `max_frames` frames are annotated: a longer
  video is sampled (every k-th frame), so the work per video is bounded.
"""

from __future__ import annotations

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
    "probe_video",
    "sample_step",
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
    max_fps: float = 120.0
    max_frames: int = 300  # frames annotated; a longer video is sampled


@dataclass(frozen=True)
class VideoInfo:
    """What a video's header says: frame size, frame rate and frame count (0 when the container does not say)."""

    width: int
    height: int
    fps: float
    frame_count: int

    @property
    def seconds(self) -> float | None:
        return self.frame_count / self.fps if self.frame_count > 0 else None


@dataclass
class AnnotatedVideo:
    """The outcome of `annotate_video`.

    `detections` holds, per annotated frame, its index in the source video and the detections kept by the filters
    (boxes in source pixels). `fps` is the annotated video's frame rate: the source's divided by `step`.
    """

    info: VideoInfo
    step: int
    detections: list[tuple[int, list[dict[str, Any]]]] = field(default_factory=list)
    seconds: float = 0.0
    truncated: bool = False  # decoding stopped at a limit (frames annotated, seconds read) with frames left

    @property
    def frames(self) -> int:
        return len(self.detections)

    @property
    def fps(self) -> float:
        return self.info.fps / self.step

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
def _capture(path: str | os.PathLike[str], name: str) -> Iterator[cv2.VideoCapture]:
    """An opened FFmpeg capture of the video at `path`; `VideoError` naming `name` when it is not a video."""
    if container_of(path) is None:
        raise VideoError(f"{name}: not a video ({CONTAINERS} expected)")
    with tempfile.TemporaryDirectory(prefix="video-") as folder:
        link = Path(folder) / "input"
        link.symlink_to(Path(path).resolve())
        capture = cv2.VideoCapture(str(link), cv2.CAP_FFMPEG)
        try:
            if not capture.isOpened():
                raise VideoError(f"{name}: cannot be decoded (a damaged file, or a codec not supported here)")
            yield capture
        finally:
            capture.release()


def _info(capture: cv2.VideoCapture, name: str, limits: VideoLimits) -> VideoInfo:
    """The header's numbers, checked against `limits`; `VideoError` for anything out of bounds."""
    width, height = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps, count = float(capture.get(cv2.CAP_PROP_FPS)), capture.get(cv2.CAP_PROP_FRAME_COUNT)
    info = VideoInfo(width, height, fps, int(count) if math.isfinite(count) and count > 0 else 0)
    if width < 1 or height < 1:
        raise VideoError(f"{name}: no video frames found")
    if width * height > limits.max_pixels:
        raise VideoError(
            f"{name}: frames of {width} x {height} pixels, more than the limit of {limits.max_pixels / 1e6:.1f} "
            "megapixels"
        )
    if not (math.isfinite(fps) and 0 < fps <= limits.max_fps):
        raise VideoError(f"{name}: a frame rate of {fps:g} fps; it must be above 0 and at most {limits.max_fps:g}")
    if info.seconds is not None and info.seconds > limits.max_seconds:
        raise VideoError(f"{name}: {info.seconds:.0f} s long, more than the limit of {limits.max_seconds:g} s")
    return info


def probe_video(path: str | os.PathLike[str], name: str, limits: VideoLimits) -> VideoInfo:
    """The header of the video at `path` (frame size, rate, count), checked against `limits`.

    Raises:
        VideoError: one line naming `name`: not a video, not decodable, or past a limit.
    """
    with _capture(path, name) as capture:
        return _info(capture, name, limits)


def sample_step(info: VideoInfo, limits: VideoLimits) -> int:
    """Annotate every `step`-th frame, so that at most `limits.max_frames` frames of the video (or of
    `limits.max_seconds` of it, when the header gives no frame count) are annotated."""
    frames = info.frame_count or math.ceil(limits.max_seconds * info.fps)
    return max(1, math.ceil(frames / max(1, limits.max_frames)))


def output_size(width: int, height: int, max_side: int = _OUTPUT_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the annotated video: the source's, scaled down to at most `max_side`, both even (the
    encoder stores colour at half resolution)."""
    scale = min(1.0, max_side / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def _sampled_frames(
    capture: cv2.VideoCapture, info: VideoInfo, step: int, limits: VideoLimits, name: str, result: AnnotatedVideo
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, BGR frame [H, W, 3] uint8) of every `step`-th frame, at most `max_frames` of them and never past
    `max_seconds` of video, whatever the header said; `result.truncated` is set when frames were left."""
    last = math.ceil(limits.max_seconds * info.fps)
    kept = 0
    for index in range(last):
        if index % step:
            if not capture.grab():  # decodes (later frames depend on it) without converting to BGR
                return
            continue
        ok, frame = capture.read()
        if not ok or frame is None:
            return  # the end, or a truncated file: what was decoded so far is the video
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.shape[0] * frame.shape[1] > limits.max_pixels:
            raise VideoError(f"{name}: a frame of {frame.shape[1]} x {frame.shape[0]} pixels is past the limit")
        yield index, frame
        kept += 1
        if kept >= limits.max_frames:
            break
    result.truncated = capture.grab()


def _open_writer(target: Path, fps: float, size: tuple[int, int], name: str) -> cv2.VideoWriter:
    writer = cv2.VideoWriter(str(target), cv2.CAP_FFMPEG, _VP8, fps, size)
    if not writer.isOpened():
        raise VideoError(f"{name}: the annotated video could not be encoded (no VP8 encoder)")
    return writer


def _annotate_batch(
    detector: Detector,
    batch: list[tuple[int, np.ndarray]],
    writer: cv2.VideoWriter,
    size: tuple[int, int],
    filters: tuple[float, int, Sequence[str]],
    result: AnnotatedVideo,
) -> None:
    """Detect on the frames of `batch` in one call, keep what passes `filters` (threshold, max detections, classes)
    and write each frame, scaled to `size`, with its boxes drawn."""
    rgb = [np.ascontiguousarray(frame[:, :, ::-1]) for _, frame in batch]
    # As for an image: the model at the floor, then the visitor's filters, so a frame gives what the image path gives.
    predictions = detector.predict_many(
        rgb, detection.FLOOR_THRESHOLD, detection.FLOOR_MAX_DETECTIONS, batch_size=len(rgb)
    )
    for (index, frame), prediction in zip(batch, predictions):
        if prediction.error is not None:
            raise VideoError(f"frame {index}: {prediction.error}")
        kept = detection.filter_detections(detection.as_dicts(prediction.detections), *filters)
        scale_x, scale_y = size[0] / frame.shape[1], size[1] / frame.shape[0]
        shown = [{**d, "box": [d["box"][0] * scale_x, d["box"][1] * scale_y, d["box"][2] * scale_x,
                               d["box"][3] * scale_y]} for d in kept]  # fmt: skip
        small = cv2.resize(frame, size, interpolation=cv2.INTER_AREA) if size != frame.shape[1::-1] else frame
        drawn = detection.draw(Image.fromarray(small[:, :, ::-1]), shown)
        writer.write(np.ascontiguousarray(np.asarray(drawn)[:, :, ::-1]))
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
    sampled frame (`sample_step`), at most `_OUTPUT_MAX_SIDE` pixels large.

    `progress(done, expected)` is called after each batch of `batch_size` frames (expected is an estimate when the
    header gives no frame count).

    Raises:
        VideoError: one line naming `name`: not a video, past a limit, or no frame decodable.
    """
    start = time.perf_counter()
    with _capture(source, name) as capture:
        info = _info(capture, name, limits)
        step = sample_step(info, limits)
        result = AnnotatedVideo(info, step)
        expected = min(limits.max_frames, math.ceil((info.frame_count or limits.max_seconds * info.fps) / step))
        size = output_size(info.width, info.height)
        writer = _open_writer(Path(target), result.fps, size, name)
        filters = (threshold, max_detections, classes)
        try:
            batch: list[tuple[int, np.ndarray]] = []
            for item in _sampled_frames(capture, info, step, limits, name, result):
                batch.append(item)
                if len(batch) == batch_size:
                    _annotate_batch(detector, batch, writer, size, filters, result)
                    batch = []
                    if progress is not None:
                        progress(result.frames, max(expected, result.frames))
            if batch:
                _annotate_batch(detector, batch, writer, size, filters, result)
        finally:
            writer.release()
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
    if result.step > 1:
        line += (
            f" One frame in {result.step} of the {result.info.fps:.3g} fps video was annotated (at most "
            f"{limits.max_frames} frames): the result plays at {result.fps:.3g} fps."
        )
    if result.truncated:
        line += f" It stopped at a limit ({limits.max_frames} frames, {limits.max_seconds:g} s): the rest was not read."
    return line
