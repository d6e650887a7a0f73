"""What an analyzer is, and what a video analyzer sees.

An **audio analyzer** is a callable (or a class whose instances are callable)::

    analyze(audio: Pcm, meta: UtteranceMeta) -> dict | None      # sync or async

`audio` is the closed utterance's 16 kHz mono int16 audio as the ASR decodes it (pre-roll and hangover
included: it starts at stream time `meta.audio_offset_s`; the VAD's speech runs from `meta.audio_start_s`
to `meta.audio_end_s`). The dict must be JSON-serialisable; None means "nothing to say" (nothing is
attached). Analyzers start beside the ASR (at a pause, or when the utterance closes), so `meta.asr_text` is empty;
an analyzer that needs the transcript sets `after_asr = True` (an attribute of the callable, or of its
class) and is called once the ASR result is in `meta` (`asr_text`, `language`, `language_probability`).

A **video analyzer** is a callable ``analyze(frame: VideoFrame) -> dict | None`` (sync or async). It sees
the user participant's camera at `perception.video.fps` frames per second, one frame at a time.

Both run off the event loop (sync callables in a worker thread, async ones as tasks that must await
their I/O), each call under its `timeout_s`; see pipeline/perception/stage.py for what happens to
results that are late, failing or not a dict.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from pipeline.frames import Pcm, UtteranceMeta

Result = dict[str, Any] | None


class Analyzer(Protocol):
    def __call__(self, audio: Pcm, meta: UtteranceMeta) -> Result | Awaitable[Result]: ...


class VideoAnalyzer(Protocol):
    def __call__(self, frame: VideoFrame) -> Result | Awaitable[Result]: ...


def runs_after_asr(analyzer: object) -> bool:
    """True when the analyzer asked for the ASR result (`after_asr = True`)."""
    return bool(getattr(analyzer, "after_asr", False))


@dataclass(frozen=True, slots=True)
class VideoFrame:
    """One camera frame of the user participant. `pixels` is (height, width, 4) uint8 in `color_format`
    channel order (RGBA by default); the array is read-only and shared, copy it to modify it."""

    pixels: npt.NDArray[np.uint8]
    color_format: str
    participant_id: str
    at_s: float  # the relay's stream clock when the frame arrived (comparable with utterance times)
    timestamp_us: int  # the SDK's own frame timestamp

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def channel(self, name: str) -> npt.NDArray[np.uint8]:
        """One colour channel ("R", "G", "B" or "A") as a (height, width) view."""
        index = self.color_format.find(name)
        if index < 0 or len(self.color_format) != self.pixels.shape[2]:
            raise ValueError(f"no channel {name!r} in a {self.color_format} frame")
        return self.pixels[:, :, index]
