"""Source interface: produce 16 kHz mono int16 `AudioFrame`s with stream positions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from pipeline.frames import AudioFrame

if TYPE_CHECKING:
    from pipeline.config import SourceSettings


class SourceError(Exception):
    """The source cannot start or has failed for good (bad file, no device). Message is user-facing."""


class Source(ABC):
    """An audio source.

    Capture threads (sounddevice, daily-python) only hand data to the event loop with
    `loop.call_soon_threadsafe`; `frames()` is consumed on the loop.
    """

    name: str = "source"
    # The stream clock runs at a fixed ratio to wall time (live capture, a paced file): the time from the
    # end of speech to an echo is then a latency. A file read as fast as possible (--speed 0) is not.
    paced: bool = True

    @abstractmethod
    def frames(self) -> AsyncIterator[AudioFrame]:
        """Yield frames in stream order until the stream ends (files) or `close()` is called."""

    @abstractmethod
    def now_s(self) -> float:
        """Stream clock: seconds since the first sample was captured, on the same scale as frame
        positions (for a paced file at speed 2, stream seconds, not wall seconds). Used for
        `emitted_at_s`."""

    def set_idle(self, idle: bool) -> None:  # noqa: B027 - optional hook
        """The relay's hint, given when it changes: True while no utterance is open. A live source
        may then hand audio over `idle_blocks()` blocks at a time (fewer wakeups in silence); False
        must take effect from the next block, because the end of speech is timed block by block."""

    # Whether the source can deliver the speaker's camera (`watch_video`); the config refuses video
    # analyzers on a source without it (pipeline/perception/video.py).
    has_video: bool = False

    def watch_video(self, callback: Callable[[str, Any, str], None], color_format: str) -> None:  # noqa: B027
        """Hand the speaker's camera frames to `callback(participant_id, frame, video_source)`, called on the
        capture thread with daily-python's VideoFrame (buffer, width, height, timestamp_us, color_format).
        Only sources with `has_video` do anything."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop capturing; `frames()` ends after what was already captured."""

    def stats(self) -> dict[str, int]:
        """Counters for metrics (overflows, reopens, dropped blocks, ...)."""
        return {}


def idle_blocks(settings: SourceSettings) -> int:
    """Blocks handed over per wakeup while idle (`source.idle_block_ms` / `block_ms`, at least 1)."""
    return max(1, settings.idle_block_ms // settings.block_ms)
