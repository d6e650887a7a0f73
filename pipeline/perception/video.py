"""Video analyzers: the user participant's camera, sampled at `perception.video.fps`, analysed off the loop.

    SDK thread: renderer callback ──(at most fps frames/s; the others are not even copied)──┐
                                                                                             ▼
    loop: offer() ── analysers idle? ──▶ one task: every analyzer on the frame (worker threads / tasks)
                  └─ busy: the frame waits as `pending`; a newer one replaces it (counted skipped)

The latest result of each analyzer (with `frame_at_s`, the stream time of the frame it describes) is
attached to every utterance that closes afterwards (`meta.perception[name]`) and sent as a `video` event.
A failing call (outcomes as for audio analyzers, pipeline/perception/stage.py; one call is
pipeline/perception/calls.py) keeps the previous result with `on_error: pass` and clears it with
`on_error: drop`, so a stale view is never attached.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import VideoPerceptionSettings
from pipeline.frames import UtteranceMeta
from pipeline.metrics import VIDEO_FRAME_OUTCOMES
from pipeline.perception.base import VideoFrame
from pipeline.perception.builtins import VIDEO_BUILTINS
from pipeline.perception.calls import (
    FAILURES,
    BoundAnalyzer,
    Verdict,
    analyzer_status,
    build_analyzers,
    call_analyzer,
    count_call,
)

if TYPE_CHECKING:
    from pipeline.events import EventBus
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

CHANNELS = 4  # every accepted color format (config `perception.video.color_format`) has four 8-bit channels


class VideoPerception:
    def __init__(self, analyzers: list[BoundAnalyzer], settings: VideoPerceptionSettings, metrics: Metrics,
                 clock: Callable[[], float], events: EventBus | None = None) -> None:
        self.analyzers = analyzers
        self.settings = settings
        self.metrics = metrics
        self.events = events
        self._clock = clock  # the relay's stream clock
        self._interval_s = 1.0 / settings.fps
        self._last_taken = -math.inf  # time.monotonic() of the last frame taken (SDK thread only)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: VideoFrame | None = None
        self._task: asyncio.Task[None] | None = None
        self.latest: dict[str, dict[str, Any]] = {}
        self.frames = {outcome: 0 for outcome in VIDEO_FRAME_OUTCOMES}  # for /status
        self.outcomes: dict[str, dict[str, int]] = {a.name: {} for a in analyzers}

    @property
    def color_format(self) -> str:
        return self.settings.color_format

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop frames are handed to (set before the renderer is registered)."""
        self._loop = loop

    # ------------------------------------------------------------------------------ SDK thread
    def on_frame(self, participant_id: str, frame: Any, video_source: str = "camera") -> None:
        """daily-python's video renderer callback (SDK thread): take at most `fps` frames a second, copy the
        pixels and hand them to the loop; nothing else. Never raises into the SDK."""
        loop = self._loop
        now = time.monotonic()
        if loop is None or now - self._last_taken < self._interval_s:
            return
        self._last_taken = now
        try:
            data = bytes(frame.buffer)
            size = (int(frame.width), int(frame.height))
            loop.call_soon_threadsafe(self._offer, participant_id, data, size, str(frame.color_format),
                                      int(frame.timestamp_us))
        except Exception:  # a closed loop, a malformed frame: nothing to do on this thread
            pass

    # ------------------------------------------------------------------------------ loop
    def _offer(self, participant_id: str, data: bytes, size: tuple[int, int], color_format: str,
               timestamp_us: int) -> None:
        width, height = size
        if width <= 0 or height <= 0 or len(data) != width * height * CHANNELS:
            log.debug("video frame of %dx%d with %d bytes ignored", width, height, len(data))
            return
        pixels = np.frombuffer(data, dtype=np.uint8).reshape(height, width, CHANNELS)  # read-only: bytes
        frame = VideoFrame(pixels, color_format, participant_id, self._clock(), timestamp_us)
        if self._task is not None and not self._task.done():
            if self._pending is not None:
                self._count_frame("skipped")
            self._pending = frame
            return
        self._task = asyncio.ensure_future(self._analyze(frame))

    async def _analyze(self, frame: VideoFrame | None) -> None:
        while frame is not None:
            verdicts = await asyncio.gather(*(call_analyzer(a.step, frame) for a in self.analyzers))
            self._count_frame("analyzed")
            fresh: dict[str, dict[str, Any]] = {}
            for a, (verdict, seconds) in zip(self.analyzers, verdicts, strict=True):
                self._record(a, verdict, seconds)
                if verdict.result is not None:
                    self.latest[a.name] = fresh[a.name] = {**verdict.result, "frame_at_s": round(frame.at_s, 3)}
                elif verdict.outcome in FAILURES and a.step.on_error == "drop":
                    self.latest.pop(a.name, None)
            if self.events is not None and fresh:
                self.events.emit("video", results=fresh)
            frame, self._pending = self._pending, None

    def _record(self, a: BoundAnalyzer, verdict: Verdict, seconds: float) -> None:
        times = count_call(self.metrics, self.outcomes, a.name, verdict, seconds)
        if verdict.outcome in FAILURES and times in (1, 10, 100):  # a failing camera repeats: log a few
            log.warning("video analyzer %s failed: %s%s (%d time(s) so far); on_error=%s", a.name, verdict.outcome,
                        f": {verdict.detail}" if verdict.detail else "", times, a.step.on_error)

    def _count_frame(self, outcome: str) -> None:
        self.frames[outcome] += 1
        self.metrics.video_frames.labels(outcome=outcome).inc()

    def attach(self, meta: UtteranceMeta) -> None:
        """File the latest result of each video analyzer with an utterance."""
        for name, result in self.latest.items():
            meta.perception[name] = dict(result)

    def status(self) -> dict[str, Any]:
        return {"fps": self.settings.fps, "color_format": self.color_format, "frames": dict(self.frames),
                "analyzers": [analyzer_status(a, self.outcomes) for a in self.analyzers],
                "latest": {name: dict(result) for name, result in self.latest.items()}}

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for a in self.analyzers:
            await a.step.aclose()


VIDEO_ARGS = "(frame)"


def video_probe(color_format: str) -> tuple[VideoFrame]:
    """Arguments a video analyzer must accept (its signature is checked against them, nothing is called)."""
    return (VideoFrame(np.zeros((1, 1, CHANNELS), dtype=np.uint8), color_format, "", 0.0, 0),)


def build_video(settings: VideoPerceptionSettings, metrics: Metrics, clock: Callable[[], float],
                events: EventBus | None = None,
                builtins: Mapping[str, Callable[..., Any]] = VIDEO_BUILTINS) -> VideoPerception | None:
    """The video analyzers of `perception.video`, or None when there are none."""
    if not settings.analyzers:
        return None
    analyzers = build_analyzers(settings.analyzers, "perception.video.analyzers", builtins,
                                video_probe(settings.color_format), VIDEO_ARGS)
    log.info("video perception: %s at %g frame(s)/s", ", ".join(a.name for a in analyzers), settings.fps)
    return VideoPerception(analyzers, settings, metrics, clock, events)
