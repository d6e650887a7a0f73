"""VAD engine interface: speech probability of one fixed-size frame.

The engine only classifies frames; turning frame decisions into utterances (pre-roll, hangover,
min/max length) is the pure state machine in `pipeline.vad.segmenter`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pipeline.frames import Pcm


class VadEngine(ABC):
    name: str = "vad"
    frame_samples: int  # samples per frame at 16 kHz that speech_prob() expects
    threshold: float = 0.5  # speech_prob() >= threshold counts as speech

    @abstractmethod
    def speech_prob(self, frame: Pcm) -> float:
        """Probability in [0, 1] that `frame` (exactly `frame_samples` int16 samples) is speech."""

    def reset(self) -> None:  # noqa: B027 - optional hook, stateless engines need nothing
        """Forget recurrent state (called after stream gaps, when digital silence begins and at the end of
        the stream; not between utterances, where Silero needs its context to catch the next phrase's onset)."""
