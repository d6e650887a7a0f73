"""Coverage: does a decode account for the speech the VAD found in its audio? Pure functions, no model.

Whisper may skip speech and still return fluent text: decoded without timestamps, it can start at an utterance's
second sentence in noise (the first one is not written at all), or drop a quiet speaker's words. The gate
(pipeline/asr/gate.py) sees nothing wrong with such a decode. Two measures catch it:

- **Rate**: the decode's letters per second of the VAD's speech (`UtteranceMeta.speech_spans`) against the
  language's expected rate. Letters (Unicode letters and digits) rather than words, so the measure is the same for
  scripts without spaces (Chinese, Japanese: one character a letter) and does not depend on word length. Read
  speech on the clips of tests/data/speech, in letters per second of VAD speech: English 10-17 (7.8 for a
  monologue of fillers), German, Spanish, French, Italian, Dutch, Portuguese, Russian 11-19, Hindi 6.3-6.9
  (Devanagari vowel signs are marks, not letters), Japanese 5.1-6.8, Korean 7.1, Chinese 4.6-6.1. A decode under
  `LOW_COVERAGE` of the expected rate has left speech out (or the VAD heard noise as speech).
- **Times**: a timestamped decode's segments against the speech spans: speech no segment reaches (each widened by
  `SEGMENT_SLACK_S`: Whisper's times are coarse) is uncovered, and where it is is known.

Engine-agnostic: the relay's delivery checks every engine's text this way (pipeline/delivery.py). The
faster-whisper plan (pipeline/asr/whisper/plan.py) decodes an utterance whose first decode looks short again (the
second pass) and reports what is still uncovered in `Transcript.extra` (`uncovered_s`, `uncovered_why`), which the
relay counts instead.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

Span = tuple[float, float]

# Expected letters per second of VAD speech, by language (the lower end of read speech above, so a slow speaker
# is not taken for skipped speech); languages not listed get DEFAULT_LETTERS_PER_S (alphabetic scripts).
DEFAULT_LETTERS_PER_S = 12.0
EXPECTED_LETTERS_PER_S: dict[str, float] = {
    "zh": 5.0, "yue": 5.0, "ja": 5.5, "ko": 6.0,
    "hi": 6.0, "mr": 6.0, "ne": 6.0, "bn": 6.0, "gu": 6.0, "pa": 6.0, "ta": 6.0, "te": 6.0, "kn": 6.0, "ml": 6.0,
    "th": 9.0, "lo": 9.0, "my": 6.0, "km": 6.0,
}
LOW_COVERAGE = 0.5  # a decode with fewer letters than this share of the expected ones has left speech out
MIN_JUDGED_SPEECH_S = 1.5  # less speech than this: too few letters for a rate to mean anything
SEGMENT_SLACK_S = 0.5  # a segment covers speech up to this far beyond its own times
UNCOVERED_MIN_S = 1.0  # less speech left out than this is not worth another decode (nor counted)


def letters(text: str) -> int:
    """Unicode letters and digits in `text` (a CJK character is one letter)."""
    return sum(1 for c in text if unicodedata.category(c)[0] in "LN")


def _words(text: str) -> list[str]:
    """The words of `text`, lower case, without the punctuation around them."""
    return [w.strip(".,;:!?\"'()").lower() for w in text.split()]


def distinct_letters(text: str) -> int:
    """Letters of the distinct words of `text`: a decoder loop ("illustration buttons illustration buttons ...")
    adds none, so two decodes of the same audio compare by what each has heard."""
    return sum(letters(w) for w in set(_words(text)))


def repeats(text: str, other: str, share: float = 0.5) -> bool:
    """At least `share` of the words of `text` are already in `other` (a part decoded alone that only says again
    what the decode of the whole wrote: Whisper's segment times were off)."""
    seen = set(_words(other))
    words = _words(text)
    return bool(words) and sum(w in seen for w in words) >= share * len(words)


def expected_rate(language: str | None) -> float:
    """Expected letters per second of speech in `language` (None or unknown: DEFAULT_LETTERS_PER_S)."""
    return EXPECTED_LETTERS_PER_S.get((language or "").lower(), DEFAULT_LETTERS_PER_S)


def speech_seconds(spans: Sequence[Span]) -> float:
    return sum(max(0.0, b - a) for a, b in spans)


def subtract(spans: Sequence[Span], covers: Sequence[Span]) -> list[Span]:
    """The parts of `spans` that no interval of `covers` overlaps."""
    out: list[Span] = []
    for a, b in spans:
        pieces = [(a, b)]
        for c, d in covers:
            pieces = [p for x, y in pieces for p in ((x, min(y, c)), (max(x, d), y)) if p[1] > p[0]]
        out.extend(pieces)
    return out


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of an utterance's speech a decode accounts for."""

    speech_s: float  # seconds of VAD speech in the audio
    ratio: float  # letters written / letters expected for that speech (1.0 when too little speech to judge)
    uncovered: tuple[Span, ...] = ()  # speech no timestamped segment reaches (empty without timestamps)

    @property
    def low_rate(self) -> bool:
        """Under LOW_COVERAGE of the expected letters, and the missing ones would take UNCOVERED_MIN_S of speech
        or more: in a short utterance a few letters are within a speaker's own pace (jfk's 1 s "Ask not!" has
        half the letters of a read second; a word stretched with pauses inside it, fewer)."""
        return self.ratio < LOW_COVERAGE and self.speech_s * (1.0 - self.ratio) >= UNCOVERED_MIN_S

    @property
    def uncovered_s(self) -> float:
        """Seconds of speech the decode left out: the spans no segment reaches, or, by the rate, the speech
        its missing letters would take (when the rate is low)."""
        by_rate = self.speech_s * (1.0 - self.ratio) if self.low_rate else 0.0
        return max(speech_seconds(self.uncovered), by_rate)

    @property
    def short(self) -> bool:
        """The decode leaves speech out: worth a second pass, and counted if it still does after it."""
        return self.low_rate or speech_seconds(self.uncovered) >= UNCOVERED_MIN_S

    def why(self) -> str:
        if speech_seconds(self.uncovered) >= UNCOVERED_MIN_S:
            where = ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in self.uncovered)
            return f"no words decoded for speech at {where} of the utterance"
        return (f"the decode has {self.ratio:.0%} of the letters expected for {self.speech_s:.1f} s of speech")


def assess(text: str, language: str | None, spans: Sequence[Span],
           segments: Sequence[Span] | None = None) -> Coverage:
    """Coverage of a decode (`text`, and its timestamped `segments` when it has them) of audio whose speech the
    VAD found at `spans` (seconds in the same audio)."""
    speech_s = speech_seconds(spans)
    judged = speech_s >= MIN_JUDGED_SPEECH_S
    ratio = min(1.0, letters(text) / (expected_rate(language) * speech_s)) if judged else 1.0
    uncovered: tuple[Span, ...] = ()
    if segments is not None:
        widened = [(a - SEGMENT_SLACK_S, b + SEGMENT_SLACK_S) for a, b in segments]
        uncovered = tuple((a, b) for a, b in subtract(spans, widened) if b - a > 0.0)
    return Coverage(speech_s, ratio, uncovered)
