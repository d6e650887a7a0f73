"""One Whisper window: its size, its token budget, and the request and decode that pass between the decode plan
(plan.py) and the decoder (decoder.py). Pure: no model here.

- **Short window** (`asr.short_window`, default on). faster-whisper always pads the features to a 30 s window
  (`pad_or_trim(segment)` in `generate_segments`), so every decode pays a full 30 s encoder pass (~0.2-0.25 s for
  tiny.en int8 on 2 cores). CTranslate2's Whisper encoder accepts fewer frames, so we encode
  ``min(30, max(10, ceil(duration + 1)))`` seconds instead (~0.03-0.05 s). Windows under 10 s made the decoder
  loop on 2-6 s clips, hence the 10 s floor; whole seconds keep the number of distinct encoder shapes small.
- **Token budget.** Generation is capped at ~``8 tokens/s * duration + 16`` (read speech is 2-5 tokens/s), so a
  looping short-window decode stops early.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pipeline.frames import SAMPLE_RATE, Pcm

FULL_WINDOW_S = 30  # Whisper's trained window
MIN_WINDOW_S = 10  # shorter windows made the decoder loop on 2-6 s clips
WINDOW_MARGIN_S = 1.0  # window >= utterance + this
# Longer utterances get the full window at once. A short window leaves them little room after the speech,
# and a loop there costs the whole token budget before the fallback: a 19.3 s utterance of the clean bench
# stream looped in its 20-21 s windows (170 tokens, 1.6 s) and decoded in 0.7-1.0 s with 22-30 s ones.
SHORT_WINDOW_MAX_S = 15.0
TOKENS_PER_S = 8.0  # generation budget per second of audio (read speech: 2-5 tokens/s) ...
TOKENS_MARGIN = 16  # ... plus this
MIN_SAMPLES = SAMPLE_RATE // 10  # shorter audio is zero-padded to 0.1 s (the STFT needs some samples)
FRAMES_PER_S = 100  # Whisper's 10 ms feature frames
ENCODE_MAX_FRAMES = FULL_WINDOW_S * FRAMES_PER_S  # feature frames per encoder pass: one full window, or 3 x 10 s


def window_s(duration_s: float) -> int:
    """The short window for `duration_s` of audio: whole seconds, at least MIN_WINDOW_S, at most the full window."""
    return int(min(FULL_WINDOW_S, max(MIN_WINDOW_S, math.ceil(duration_s + WINDOW_MARGIN_S))))


def token_budget(duration_s: float) -> int:
    return math.ceil(TOKENS_PER_S * duration_s) + TOKENS_MARGIN


def to_float(audio: Pcm) -> np.ndarray:
    """int16 (or float) audio -> float32 in [-1, 1), zero-padded to at least MIN_SAMPLES."""
    a = np.asarray(audio)
    n = len(a)
    buf = np.zeros(max(n, MIN_SAMPLES), dtype=np.float32)
    if np.issubdtype(a.dtype, np.integer):
        np.multiply(a, np.float32(1.0 / 32768.0), out=buf[:n], casting="unsafe")
    else:
        buf[:n] = a
    return buf


def pad_features(features: list[np.ndarray], window: int) -> np.ndarray:
    """A batch of log-mel features cut or zero-padded to `window` seconds (zero features, as faster-whisper pads)."""
    frames = window * FRAMES_PER_S
    padded = np.zeros((len(features), features[0].shape[0], frames), dtype=np.float32)
    for i, f in enumerate(features):
        n = min(f.shape[1], frames)
        padded[i, :, :n] = f[:, :n]
    return padded


@dataclass(frozen=True, slots=True)
class Request:
    """One window to decode for one utterance (the decoder batches requests that share a `key`)."""

    features: np.ndarray
    window_s: int
    temperature: float
    budget: int | None  # token budget (None: the model's maximum)
    language: str | None = None  # the conversation's (UtteranceMeta.language); None: asr.language, else detected
    context: tuple[int, ...] = ()  # previous-text tokens (the utterance's committed beginning)
    timestamps: bool = False  # Whisper writes segment times (its prompt lacks <|notimestamps|>): asr/coverage.py
    audio_s: float = 0.0  # seconds of audio in the window (how much speech its language detection heard)
    # Text tokens to align to the audio (word times, alignment.py) instead of generating: coverage.py's check
    # of an utterance too short for the letter rate; `language` is then the text's.
    align: tuple[int, ...] | None = None

    @property
    def key(self) -> tuple[int, float, int, bool, str | None]:
        """Requests with the same key can be decoded in one batch. CTranslate2 batches only prompts of one
        length ("requires the <|startoftranscript|> token to be at the same position"), hence the context length
        and whether the prompt holds <|notimestamps|>; an alignment batch shares one start sequence, hence its
        language."""
        aligned = None if self.align is None else f"align:{self.language}"
        return self.window_s, self.temperature, len(self.context), self.timestamps, aligned

    @property
    def cost(self) -> float:
        """Window seconds to encode (the encoder dominates a decode on CPU)."""
        return float(self.window_s)


class Segment(NamedTuple):
    """One segment of a timestamped decode, or one aligned word: seconds from the window's start, and its text."""

    start: float
    end: float
    text: str


@dataclass(slots=True)
class Decode:
    """One CTranslate2 decode of one window."""

    tokens: list[int]
    text: str
    avg_logprob: float
    no_speech_prob: float
    compression_ratio: float
    temperature: float
    window_s: float
    truncated: bool
    final_punct_prob: float | None = None
    encode_s: float = 0.0
    generate_s: float = 0.0
    segments: tuple[Segment, ...] | None = None  # a timestamped decode's segments; None without timestamps
    words: tuple[Segment, ...] | None = None  # an alignment request's word times (Request.align); else None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def degenerate_reason(self) -> str | None:
        return self.extra.get("degenerate")
