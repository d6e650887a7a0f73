"""Data that flows between stages.

Audio inside the relay is always 16 kHz mono int16 (`SAMPLE_RATE`); positions are sample indices
counted from the first sample of the source stream, so `pos / SAMPLE_RATE` is seconds into the stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000  # Whisper's rate; every source resamples to it
Pcm = npt.NDArray[np.int16]


# Pauses inside an utterance shorter than this do not split its speech spans (`Utterance.speech_spans`): gaps
# between words stay inside a span, pauses between phrases separate spans.
SPAN_GAP_MS = 250


def samples_to_s(samples: int) -> float:
    return samples / SAMPLE_RATE


def s_to_samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def ms_to_samples(ms: float) -> int:
    """Milliseconds -> samples at SAMPLE_RATE (exact for whole ms: 16 samples per ms)."""
    return round(ms * SAMPLE_RATE / 1000)


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A block of 16 kHz mono int16 audio and its position in the source stream."""

    samples: Pcm
    start: int  # sample index of samples[0] in the stream

    @property
    def end(self) -> int:
        return self.start + len(self.samples)

    @property
    def start_s(self) -> float:
        return samples_to_s(self.start)


EndReason = Literal["silence", "sentence_end", "max_length", "end_of_stream"]
# Which decode of an utterance an ASR request is: the one that closes it, one made during a pause
# in case the utterance ends there, or an interim one for watchers (pipeline/asr/scheduler.py orders
# requests by it).
DecodeKind = Literal["final", "speculative", "interim"]
# Why the hallucination gate (pipeline/asr/gate.py) drops a decode: `Transcript.dropped_reason` and the
# `reason` of echo_relay_dropped_total{stage="asr"}.
GateReason = Literal["empty", "no_speech", "low_logprob", "repetition", "phantom"]


@dataclass(slots=True)
class Utterance:
    """One stretch of speech closed by the VAD segmenter.

    `audio` starts at `start` (pre-roll included) and ends at `end` (hangover included);
    `speech_start`/`speech_end` are the VAD's own speech bounds inside it, and `speech_spans` its runs of
    speech between them (stream positions; pauses of `SPAN_GAP_MS` or more split them). Empty: one span,
    `speech_start`..`speech_end`.
    """

    id: str
    audio: Pcm
    start: int
    speech_start: int
    speech_end: int
    reason: EndReason = "silence"
    speech_spans: tuple[tuple[int, int], ...] = ()

    def spans(self) -> tuple[tuple[int, int], ...]:
        """The speech spans (at least the one from `speech_start` to `speech_end`)."""
        return self.speech_spans or ((self.speech_start, self.speech_end),)

    @property
    def end(self) -> int:
        return self.start + len(self.audio)

    @property
    def audio_start_s(self) -> float:
        return samples_to_s(self.speech_start)

    @property
    def audio_end_s(self) -> float:
        return samples_to_s(self.speech_end)

    @property
    def duration_s(self) -> float:
        return samples_to_s(self.speech_end - self.speech_start)


@dataclass(slots=True)
class Transcript:
    """What an ASR engine returns for one utterance.

    `text` is empty when nothing was recognised or the hallucination gate dropped it
    (`dropped_reason` then says why). `confidence` is in [0, 1].
    """

    text: str
    confidence: float = 1.0
    language: str | None = None
    language_probability: float | None = None  # of a detected language (None: fixed by config or the model)
    # The language detector's own top choice on this audio and its probability (within asr.languages), whatever
    # the text was decoded in: the conversation's language tracker weighs it (pipeline/language.py).
    detected: tuple[str, float] | None = None
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    # Probability the model gave the final . ? ! token (None when the text does not end a sentence
    # or the engine cannot tell); the endpointer uses it to finish confident sentences early.
    final_punct_prob: float | None = None
    decode_s: float = 0.0
    dropped_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class UtteranceMeta:
    """Metadata handed to ASR engines and transform steps alongside the audio or text."""

    utterance_id: str
    audio_start_s: float
    audio_end_s: float
    reason: EndReason = "silence"
    asr_text: str = ""
    confidence: float = 1.0
    # Before the ASR: the conversation's language, decoded in (None: not locked yet, detected per utterance).
    # From the transcript on (transforms, perception, the sink): the language of the text (English under
    # asr.task translate), with the detector's probability of it (None when fixed or not detected).
    language: str | None = None
    language_probability: float | None = None
    language_locked: bool = False  # the conversation's language was locked (or fixed) when the text came
    # Stream time of the first sample of the audio the ASR and the analyzers get (pre-roll included).
    audio_offset_s: float = 0.0
    # Room state the transforms may use (e.g. whether the replica is speaking).
    room: dict[str, Any] = field(default_factory=dict)
    # Transforms may set this to ask the sink to send audio instead of text (audio echo).
    modality: Literal["text", "audio"] = "text"
    decode: DecodeKind = "final"  # for ASR engines and the shared scheduler
    # Text already transcribed of this utterance, before the audio the engine gets (its committed beginning,
    # pipeline/speculation.py); engines may condition on it (Whisper's previous-text prompt).
    context: str = ""
    # What the perception analyzers found (pipeline/perception/), by analyzer name; filled before the transforms.
    perception: dict[str, Any] = field(default_factory=dict)
    # The VAD's speech spans in the audio the ASR engine gets, in seconds from its first sample (empty: unknown,
    # the whole audio); engines compare their decode with them (pipeline/asr/coverage.py).
    speech_spans: tuple[tuple[float, float], ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
