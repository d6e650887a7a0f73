"""Hallucination gate: pure functions that decide whether a decode is dropped.

Whisper makes text out of silence and noise ("Thank you.", "Thanks for watching!") and sometimes
loops on a phrase. The gate looks at the decode's own statistics and the audio level and returns a
drop reason, or None to keep the text. It knows nothing about faster-whisper: engines pass plain
numbers, so any engine (or a test) can use it.

Reasons, checked in this order:

- ``empty``: nothing but whitespace/punctuation was recognised;
- ``no_speech``: Whisper's own rule, ``no_speech_prob > gate.no_speech_prob`` AND
  ``avg_logprob < gate.no_speech_logprob`` (a confident decode is kept despite a high no-speech
  probability, as in openai/whisper and faster-whisper);
- ``low_logprob``: ``avg_logprob < gate.min_avg_logprob`` whatever the no-speech probability;
- ``repetition``: zlib compression ratio of the text above ``gate.max_compression_ratio`` (a loop);
- ``phantom``: the text is a known near-silence hallucination (``gate.phantom_phrases``, compared
  after normalization, also when repeated: "Thank you. Thank you.") and the audio is quieter than
  ``gate.phantom_max_dbfs``; text made only of non-speech annotations (``[Music]``, ``(upbeat
  music)``, ``*coughs*``, ``♪``) is never speech to relay and is dropped as ``phantom`` at any level.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence

from pipeline.config import GateSettings
from pipeline.dsp import SILENCE_DBFS as SILENCE_DBFS  # re-exported: the engines and tests import from here
from pipeline.dsp import rms_dbfs as rms_dbfs
from pipeline.frames import GateReason

DROP_REASONS = ("empty", "no_speech", "low_logprob", "repetition", "phantom")

_ANNOTATION = re.compile(r"^\s*(?:(?:\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|[♪♫#\s-])\s*)+$")


def compression_ratio(text: str) -> float:
    """zlib compression ratio of the UTF-8 text (Whisper's repetition measure; 0 for empty text)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def normalize_phrase(text: str) -> str:
    """Lowercase, drop punctuation and symbols, collapse whitespace: "Thank you!!" -> "thank you"."""
    text = unicodedata.normalize("NFKC", text).lower()
    kept = [ch if not unicodedata.category(ch).startswith(("P", "S")) else " " for ch in text]
    return " ".join("".join(kept).split())


def is_annotation(text: str) -> bool:
    """True for text made only of non-speech annotations: "[Music]", "(upbeat music)", "*coughs*", "♪"."""
    stripped = text.strip()
    return bool(stripped) and bool(_ANNOTATION.match(stripped))


def is_phantom(text: str, phrases: Iterable[str]) -> bool:
    """True when `text` is one of `phrases` (normalized), possibly repeated ("bye bye bye")."""
    norm = normalize_phrase(text)
    if not norm:
        return False
    for phrase in phrases:
        p = normalize_phrase(phrase)
        if not p:
            continue
        if norm == p:
            return True
        # The phrase repeated: "thank you thank you" is still only the phrase.
        n = len(p) + 1
        if (len(norm) + 1) % n == 0 and f"{norm} " == f"{p} " * ((len(norm) + 1) // n):
            return True
    return False


def is_doubled(words: Sequence[str], min_words: int = 3) -> bool:
    """True when the whole text is one phrase of at least `min_words` words said twice
    ("Experience proves this. Experience proves this." from a 2 s clip): how a short encoder window
    loops on short utterances. Checked on short-window output only, which then gets the full window."""
    n = len(words)
    if n < 2 * min_words or n % 2:
        return False
    w = [normalize_phrase(x) for x in words]
    return w[: n // 2] == w[n // 2:]


def has_repetition(words: Sequence[str], *, min_repeats: int = 3, min_span: int = 8) -> bool:
    """True when some n-gram repeats back to back at least `min_repeats` times and the repeated
    stretch covers at least `min_span` words: the signature of a decoder loop
    ("ask what you can do for your country. ask what you can do ..."). Short legitimate
    repetitions ("words words words words", "no no no") stay below `min_span`.
    """
    n_words = len(words)
    if n_words < min_span:
        return False
    w = [normalize_phrase(x) for x in words]
    for n in range(1, n_words // min_repeats + 1):
        run = 0  # consecutive positions j with w[j] == w[j + n]: the stretch is periodic with period n
        for j in range(n_words - n):
            if w[j] == w[j + n]:
                run += 1
                span = run + n
                if span // n >= min_repeats and span >= min_span:
                    return True
            else:
                run = 0
    return False


def gate(text: str, *, no_speech_prob: float, avg_logprob: float, audio_dbfs: float,
         settings: GateSettings, compression_ratio_value: float | None = None) -> GateReason | None:
    """Return why this decode must be dropped, or None to keep it.

    `compression_ratio_value` defaults to `compression_ratio(text)`; pass it when the engine has it.
    `avg_logprob`/`no_speech_prob` are the decode's statistics (engines that cannot tell pass
    0.0 for both, which disables those rules).
    """
    if not normalize_phrase(text):
        return "empty"
    if no_speech_prob > settings.no_speech_prob and avg_logprob < settings.no_speech_logprob:
        return "no_speech"
    if avg_logprob < settings.min_avg_logprob:
        return "low_logprob"
    cr = compression_ratio(text) if compression_ratio_value is None else compression_ratio_value
    if cr > settings.max_compression_ratio:
        return "repetition"
    if is_annotation(text):
        return "phantom"
    if audio_dbfs < settings.phantom_max_dbfs and is_phantom(text, settings.phantom_phrases):
        return "phantom"
    return None
