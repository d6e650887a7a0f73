"""File source: decode an audio file (wav/flac/mp3/ogg/... anything FFmpeg reads) and play it as a stream.

Design choices:
- The whole file is decoded up front, in a worker thread (`asyncio.to_thread`), to 16 kHz mono int16
  (`decode_file`). Inputs are utterance- to minute-scale recordings (a minute is ~1.9 MB of int16),
  so this is simpler than a decode thread feeding a queue and keeps pacing free of decode jitter.
  Cheap checks (missing path, directory, empty file) happen in the constructor so a bad
  `--source file:PATH` fails before the relay starts; decode errors surface from `frames()`.
- Frames are `block_ms` long; the final frame of the file may be shorter (never padded with
  fake silence), so positions and the stream length are exact. With `loop: true` the file repeats
  with continuing positions and full blocks straddle the loop point.
- Pacing (`speed > 0`) mimics a live microphone: a frame is released when its LAST sample would
  have been captured, i.e. at `t0 + frame.end_s / speed` on `time.monotonic()`. Deadlines are
  absolute, so sleep jitter never accumulates, and a consumer that falls behind gets the backlog
  at once (like a device queue) instead of slowing the stream. `now_s()` is then
  `(monotonic() - t0) * speed`, which is >= the end of every frame already released.
- `speed == 0` releases frames as fast as the consumer takes them (still yielding to the event
  loop after every frame); `now_s()` is then the end of the last frame released.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import SourceSettings
from pipeline.dsp import Reblocker
from pipeline.frames import SAMPLE_RATE, AudioFrame, Pcm
from pipeline.source.base import Source, SourceError, idle_blocks

log = logging.getLogger(__name__)


def _check_path(path: Path) -> None:
    """Fail early, with a one-line message naming the path, for paths that cannot be audio files."""
    try:
        if not path.exists():
            raise SourceError(f"audio file not found: {path}")
        if path.is_dir():
            raise SourceError(f"audio file path is a directory, not a file: {path}")
        if path.stat().st_size == 0:
            raise SourceError(f"audio file is empty (0 bytes): {path}")
    except OSError as e:  # permission problems on a parent directory, broken mounts, ...
        raise SourceError(f"cannot access audio file {path}: {e.strerror or e}") from None


def _reason(e: BaseException) -> str:
    """A short, single-line reason from an FFmpeg/OS error (no traceback text, no repeated path)."""
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return " ".join(str(msg).split())


def decode_file(path: str | Path) -> Pcm:
    """Decode a whole audio file to 16 kHz mono int16 (any rate, channel count or FFmpeg format).

    Raises `SourceError` with a one-line message including the path for a missing file, a
    directory, an empty or unreadable file, data that is not audio, or a file without audio.
    """
    import av  # PyAV; imported here so importing the source package stays cheap

    p = Path(path)
    _check_path(p)
    try:
        container = av.open(str(p), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise SourceError(f"cannot decode audio file {p}: {_reason(e)}") from None
    chunks: list[np.ndarray[Any, Any]] = []
    try:
        with container:
            if not container.streams.audio:
                fmt = getattr(container.format, "name", "?")
                raise SourceError(f"no audio stream in {p} (FFmpeg read it as '{fmt}')")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush what the resampler still holds
                chunks.append(out.to_ndarray().reshape(-1))
    except SourceError:
        raise
    except (av.FFmpegError, OSError, ValueError, RuntimeError) as e:
        raise SourceError(f"cannot decode audio file {p}: {_reason(e)}") from None
    if not chunks:
        raise SourceError(f"no audio samples in {p} (the audio stream is empty)")
    pcm = np.concatenate(chunks).astype(np.int16, copy=False)
    if len(pcm) == 0:
        raise SourceError(f"no audio samples in {p} (the audio stream is empty)")
    return pcm


class FileSource(Source):
    """Play an audio file as a 16 kHz mono stream; see the module docstring for pacing semantics."""

    name = "file"

    def __init__(self, path: str | Path, settings: SourceSettings | None = None) -> None:
        self.settings = settings if settings is not None else SourceSettings.model_validate({})
        self.path = Path(path)
        _check_path(self.path)
        self.speed = float(self.settings.file.speed)
        self.loop = bool(self.settings.file.loop)
        self.block = max(1, SAMPLE_RATE * self.settings.block_ms // 1000)
        self._pcm: Pcm | None = None
        self._t0: float | None = None  # monotonic time of stream position 0 (paced mode)
        self._released_end = 0  # end position of the last frame released
        self._closed = asyncio.Event()
        self._started = False
        self._blocks = 0
        self._loops = 0
        self._batch = 1  # frames released per wait: idle_blocks() while the relay is idle (set_idle)

    # ------------------------------------------------------------------------------ public API
    async def load(self) -> Pcm:
        """Decode the file (once, in a worker thread) and return the 16 kHz mono int16 samples."""
        if self._pcm is None:
            self._pcm = await asyncio.to_thread(decode_file, self.path)
            log.info("file source %s: %.2f s of audio, speed %s%s", self.path,
                     len(self._pcm) / SAMPLE_RATE, self.speed or "max", ", looping" if self.loop else "")
        return self._pcm

    @property
    def duration_s(self) -> float | None:
        """Length of the decoded file in seconds (None before `load()`/`frames()`)."""
        return None if self._pcm is None else len(self._pcm) / SAMPLE_RATE

    async def frames(self) -> AsyncIterator[AudioFrame]:
        if self._started:
            raise RuntimeError("FileSource.frames() can only be iterated once")
        self._started = True
        pcm = await self.load()
        reblocker = Reblocker(self.block)
        paced = self.speed > 0
        self._t0 = time.monotonic()
        # One future for the whole run: a wait_for(Event.wait()) per block made a task per block.
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            async for frame in self._paced(pcm, reblocker, paced, closed):
                yield frame
        finally:
            closed.cancel()

    async def _paced(self, pcm: Pcm, reblocker: Reblocker, paced: bool,
                     closed: asyncio.Future[Any]) -> AsyncIterator[AudioFrame]:
        assert self._t0 is not None
        while not self._closed.is_set():
            pending = reblocker.push(pcm)
            if not self.loop:
                tail = reblocker.flush()
                if tail is not None:
                    pending.append(tail)
            released_until = 0  # frames ending by here are already due: no wait before them
            for i, frame in enumerate(pending):
                if paced and frame.end > released_until:
                    # While idle, wait once for the last of the next `idle_blocks` frames, then
                    # release them together, as a live source that batches its blocks would.
                    released_until = pending[min(i + self._batch - 1, len(pending) - 1)].end
                    await self._wait_for_position(released_until, closed)
                elif not paced:
                    await asyncio.sleep(0)  # let the rest of the relay run between frames
                if self._closed.is_set():
                    return
                self._released_end = frame.end
                self._blocks += 1
                yield frame
            if not self.loop:
                return
            self._loops += 1

    async def _wait_for_position(self, pos: int, closed: asyncio.Future[Any]) -> None:
        """Paced mode: wait until stream position `pos` has been "captured" (or the source closes)."""
        assert self._t0 is not None
        delay = self._t0 + pos / SAMPLE_RATE / self.speed - time.monotonic()
        if delay > 0:
            await asyncio.wait((closed,), timeout=delay)

    def set_idle(self, idle: bool) -> None:
        self._batch = idle_blocks(self.settings) if idle else 1

    @property
    def paced(self) -> bool:  # type: ignore[override]  # a property over the base's class attribute
        return self.speed > 0

    def now_s(self) -> float:
        if self.speed > 0:
            if self._t0 is None:
                return 0.0
            return (time.monotonic() - self._t0) * self.speed
        return self._released_end / SAMPLE_RATE

    async def close(self) -> None:
        """Stop: `frames()` ends at the next frame boundary (a pending pacing wait is cut short)."""
        self._closed.set()

    def stats(self) -> dict[str, int]:
        return {"blocks": self._blocks, "samples": self._released_end, "loops": self._loops}
