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
- **Word times**, where the rate cannot judge: a decode with few letters in an utterance too short for their
  shortfall to reach `UNCOVERED_MIN_S` (a "Yes." said slowly, or "Hello" of "Hello, can you hear me") is aligned
  word by word (pipeline/asr/whisper/alignment.py); speech no word reaches is uncovered, and a decode whose words
  cover at most half of the speech has left it out.

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
Word = tuple[float, float, str]  # an aligned word: start, end (seconds), its text

# Expected letters per second of VAD speech, by language (the lower end of read speech above, so a slow speaker
# is not taken for skipped speech); languages not listed get DEFAULT_LETTERS_PER_S (alphabetic scripts).
DEFAULT_LETTERS_PER_S = 12.0
EXPECTED_LETTERS_PER_S: dict[str, float] = {
    "zh": 5.0, "yue": 5.0, "ja": 5.5, "ko": 6.0,
    "hi": 6.0, "mr": 6.0, "ne": 6.0, "bn": 6.0, "gu": 6.0, "pa": 6.0, "ta": 6.0, "te": 6.0, "kn": 6.0, "ml": 6.0,
    "th": 9.0, "lo": 9.0, "my": 6.0, "km": 6.0,
}
LOW_COVERAGE = 0.5  # a decode with fewer letters than this share of the expected ones has left speech out
UNCOVERED_MIN_S = 1.0  # less speech left out than this is not worth another decode, nor judged by the rate alone
SEGMENT_SLACK_S = 0.5  # a segment covers speech up to this far beyond its own times
# An aligned word covers speech from at most its longest plausible time before its end: WORD_BASE_S plus its
# letters said at SLOW_SHARE of the language's expected rate (English: 0.15 s + 1/6 s a letter, "I" 0.32 s, "Ask"
# 0.65 s). The warping path stretches a lone word, or the first one, over speech nobody wrote
# (pipeline/asr/whisper/alignment.py: "I" over all of "I picked it up"). A word also covers WORD_SLACK_S either side
# of its times (20 ms steps, median-filtered).
WORD_BASE_S = 0.1
SLOW_SHARE = 0.75
WORD_SLACK_S = 0.05


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
    ratio: float  # letters written / letters expected for that speech (1.0 without speech)
    uncovered: tuple[Span, ...] = ()  # speech that no timestamped segment, or no aligned word, reaches
    timing: str | None = None  # where `uncovered` comes from: "segments", "words", or None (the rate alone)

    @property
    def low_rate(self) -> bool:
        """Under LOW_COVERAGE of the expected letters, and the missing ones would take UNCOVERED_MIN_S of speech
        or more: enough speech for the rate to judge."""
        return self.ratio < LOW_COVERAGE and self.speech_s * (1.0 - self.ratio) >= UNCOVERED_MIN_S

    @property
    def unsure(self) -> bool:
        """Under LOW_COVERAGE of the expected letters in too little speech for the rate to tell skipped speech
        from a speaker's own pace (jfk's 1 s "Ask not!" has half the letters of a read second; a word stretched
        with pauses inside it, fewer): word times decide (pipeline/asr/whisper/plan.py aligns the decode). Where
        no word times can be had, the rate's verdict stands: counted."""
        return self.ratio < LOW_COVERAGE and not self.low_rate and self.timing != "words"

    @property
    def short(self) -> bool:
        """The decode leaves speech out: worth a second pass, and counted if it still does after it. With word
        times: the words cover at most half of the speech, or leave UNCOVERED_MIN_S of it out."""
        timed = speech_seconds(self.uncovered)
        if self.timing == "words":
            return self.speech_s > 0 and timed >= min(UNCOVERED_MIN_S, (1.0 - LOW_COVERAGE) * self.speech_s)
        return self.low_rate or timed >= UNCOVERED_MIN_S

    @property
    def left_out(self) -> bool:
        """Counted as speech the decoder left out: `short`, or `unsure` with no word times to settle it."""
        return self.short or self.unsure

    @property
    def uncovered_s(self) -> float:
        """Seconds of speech the decode left out: the spans no segment or word reaches, or, by the rate, the
        speech its missing letters would take (when the rate is low)."""
        timed = speech_seconds(self.uncovered)
        if self.timing == "words":
            return timed
        by_rate = self.speech_s * (1.0 - self.ratio) if self.ratio < LOW_COVERAGE else 0.0
        return max(timed, by_rate)

    def why(self) -> str:
        if self.timing == "words":
            covered = self.speech_s - speech_seconds(self.uncovered)
            return f"the decoded words' times cover {covered:.1f} s of {self.speech_s:.1f} s of speech"
        if speech_seconds(self.uncovered) >= UNCOVERED_MIN_S:
            where = ", ".join(f"{a:.1f}-{b:.1f} s" for a, b in self.uncovered)
            return f"no words decoded for speech at {where} of the utterance"
        return (f"the decode has {self.ratio:.0%} of the letters expected for {self.speech_s:.1f} s of speech")


def longest_word_s(word: str, language: str | None) -> float:
    """The longest a word of `word`'s letters plausibly takes (WORD_BASE_S, SLOW_SHARE)."""
    return WORD_BASE_S + letters(word) / (SLOW_SHARE * expected_rate(language))


HELD = ("...", "…")  # Whisper's mark of a held or trailing-off sound ("Um...", "So...")


def word_covers(words: Sequence[Word], language: str | None) -> list[Span]:
    """The speech aligned words account for: each from at most `longest_word_s` before its end, WORD_SLACK_S wider;
    a word Whisper wrote as held ("Um...", with its marks attached: whisper/plan.py) all of its aligned time (a
    hesitation lasts as long as the speaker holds it)."""
    def start(a: float, b: float, w: str) -> float:
        return a if w.rstrip().endswith(HELD) else max(a, b - longest_word_s(w, language))
    return [(start(a, b, w) - WORD_SLACK_S, b + WORD_SLACK_S) for a, b, w in words]


def assess(text: str, language: str | None, spans: Sequence[Span],
           segments: Sequence[Span] | None = None, words: Sequence[Word] | None = None) -> Coverage:
    """Coverage of a decode (`text`; its timestamped `segments`, or its aligned `words`, when it has them) of audio
    whose speech the VAD found at `spans` (seconds in the same audio)."""
    speech_s = speech_seconds(spans)
    ratio = min(1.0, letters(text) / (expected_rate(language) * speech_s)) if speech_s > 0 else 1.0
    if words is not None:
        return Coverage(speech_s, ratio, tuple(subtract(spans, word_covers(words, language))), "words")
    if segments is not None:
        widened = [(a - SEGMENT_SLACK_S, b + SEGMENT_SLACK_S) for a, b in segments]
        return Coverage(speech_s, ratio, tuple(subtract(spans, widened)), "segments")
    return Coverage(speech_s, ratio)
