"""WebRTC VAD engine (the `webrtcvad` module, installed from `webrtcvad-wheels`).

The GMM classifier from WebRTC: a yes/no decision per 10, 20 or 30 ms frame, tens of microseconds
per frame, no model file. Good at separating speech from silence, weaker at speech vs noise (it counts
jfk's applause and hiss as speech: BENCHMARKS.md, "What was tried", item 6); Silero is the option for
noisy rooms.
"""

from __future__ import annotations

import numpy as np

from pipeline.frames import SAMPLE_RATE, Pcm, ms_to_samples
from pipeline.vad.base import VadEngine

DEFAULT_AGGRESSIVENESS = 3  # 0 (lenient) .. 3 (strict): strict keeps hiss and hum out of utterances
DEFAULT_FRAME_MS = 30
FRAME_MS_CHOICES = (10, 20, 30)  # the only sizes webrtcvad accepts


class WebRtcVad(VadEngine):
    """`speech_prob` is 1.0 for a frame WebRTC calls speech, else 0.0."""

    name = "webrtc"

    def __init__(self, aggressiveness: int = DEFAULT_AGGRESSIVENESS,
                 frame_ms: int = DEFAULT_FRAME_MS) -> None:
        import webrtcvad  # imported here so `import pipeline.vad` stays cheap

        if aggressiveness not in (0, 1, 2, 3):
            raise ValueError(f"webrtc aggressiveness must be 0, 1, 2 or 3 (got {aggressiveness!r})")
        if frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"webrtc frame_ms must be one of {FRAME_MS_CHOICES} (got {frame_ms!r})")
        self.aggressiveness = aggressiveness
        self.frame_ms = frame_ms
        self.frame_samples = ms_to_samples(frame_ms)
        self.threshold = 0.5
        self._vad = webrtcvad.Vad(aggressiveness)

    def speech_prob(self, frame: Pcm) -> float:
        if len(frame) != self.frame_samples:
            raise ValueError(f"webrtc VAD expects {self.frame_samples} samples per frame, got {len(frame)}")
        data = np.ascontiguousarray(frame, dtype="<i2").tobytes()
        return 1.0 if self._vad.is_speech(data, SAMPLE_RATE) else 0.0

    def reset(self) -> None:
        """WebRTC keeps a little adaptive noise state; a fresh instance forgets it."""
        import webrtcvad

        self._vad = webrtcvad.Vad(self.aggressiveness)

    def describe(self) -> str:
        return f"webrtc (aggressiveness {self.aggressiveness}, {self.frame_ms} ms frames)"

    def __repr__(self) -> str:
        return f"WebRtcVad(aggressiveness={self.aggressiveness}, frame_ms={self.frame_ms})"
