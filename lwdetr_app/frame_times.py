"""When a video's frames are shown, and which of them the annotated video keeps: pure arithmetic, no decoding.

A container's header gives a frame rate and a frame count, but a browser's recording (MediaRecorder) stamps each
frame with the time it was captured, a busy webcam's frames a few milliseconds early or late: FFmpeg finds no common
rate in such times and reports the Matroska time base instead (1000 fps), with a frame count of the duration in
milliseconds or none. Phones record at a variable rate too. So the header is used only when it is plausible; else the
rate and length are measured on the frames' timestamps.

Either way the frames are chosen by their timestamps, on a grid of constant rate (what the WebM encoder writes): grid
point k is at k x `Sampling.period` seconds, and a frame is kept for the first grid point it reaches. A frame that
stays on screen over several grid points (a gap in the source) is held over them, so the annotated video keeps the
source's timing. The grid is coarse enough for at most `max_frames` points over the video.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Grid", "Sampling", "Timing", "header_timing", "measured_timing", "plan_sampling"]


@dataclass(frozen=True)
class Timing:
    """A video's frame rate (frames per second) and length in frames, and whether they were measured on the frames'
    timestamps (the header's were missing or implausible)."""

    fps: float
    frames: int
    measured: bool = False

    @property
    def seconds(self) -> float:
        return self.frames / self.fps


def header_timing(fps: float, frame_count: int, max_fps: float) -> Timing | None:
    """The header's timing when it is plausible: a rate above 0 and at most `max_fps`, and a frame count; else None
    (the timestamps must tell)."""
    if math.isfinite(fps) and 0 < fps <= max_fps and frame_count > 0:
        return Timing(fps, frame_count)
    return None


def measured_timing(times: Sequence[float]) -> Timing:
    """The timing of frames shown at `times` (seconds from the first frame, in decoding order, at least one): their
    mean rate over the span they cover. One frame, or frames that all claim the same time, count as 1 fps."""
    span = max(times) - times[0]
    fps = (len(times) - 1) / span if len(times) > 1 and span > 0 else 1.0
    return Timing(fps, len(times), measured=True)


@dataclass(frozen=True)
class Sampling:
    """One grid point of the annotated video every `step` frame periods of the source."""

    timing: Timing
    step: int

    @property
    def fps(self) -> float:
        """The annotated video's frame rate."""
        return self.timing.fps / self.step

    @property
    def period(self) -> float:
        """Seconds between grid points."""
        return self.step / self.timing.fps

    @property
    def expected_frames(self) -> int:
        """Frames annotated if the timing holds (fewer when the source has gaps)."""
        return math.ceil(self.timing.frames / self.step)


def plan_sampling(timing: Timing, max_frames: int) -> Sampling:
    """The finest grid with at most `max_frames` points over the video: every frame of a short one, every
    `step`-th frame period of a longer one."""
    return Sampling(timing, max(1, math.ceil(timing.frames / max(1, max_frames))))


class Grid:
    """Assigns frames, by their timestamps, to the grid points of a `Sampling`, in decoding order."""

    def __init__(self, sampling: Sampling) -> None:
        self.period = sampling.period
        # A frame up to half a source period before a grid point counts as reaching it: timestamps are rounded (to
        # the millisecond in WebM), so the k-th frame of a constant-rate video may be stamped a little early.
        self.tolerance = 0.5 / sampling.timing.fps
        self.next_point = 0

    def point(self, time: float) -> int | None:
        """The grid point the frame shown at `time` (seconds from the first frame) is kept for, or None when it
        reaches no new point (skip it). The points between the previous kept frame's and this one are the previous
        frame's, held."""
        point = math.floor((time + self.tolerance) / self.period)
        if point < self.next_point:
            return None
        self.next_point = point + 1
        return point
