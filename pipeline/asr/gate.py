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
- ``phantom``, at any level: text made only of non-speech annotations (``[Music]``, ``(upbeat music)``,
  ``*coughs*``, ``♪``), or only of subtitle credits and channel promotions (``gate.phantom_patterns``:
  "Sous-titres réalisés par la communauté d'Amara.org", "Untertitel im Auftrag des ZDF", "字幕由…提供"): Whisper
  learnt them from subtitled video, and nobody in a conversation speaks them;
- ``phantom``, on near-silence only (audio quieter than ``gate.phantom_max_dbfs``): text made only of known
  near-silence hallucinations, in any language (``gate.phantom_phrases`` and
  ``gate.phantom_phrases_by_language``: "Thank you.", "ご視聴ありがとうございました", "Продолжение следует"), also
  repeated or several of them ("Thank you. Thank you.", "Thanks for watching. Bye."). At speech level they are
  kept: somebody may really say them.

Phrases and patterns are compared after `normalize_phrase` (NFKC, case folding, punctuation and symbols as
spaces), sentence by sentence (`pipeline.text.split_sentences`, every script's marks); a phrase also matches
without its spaces, since Whisper spaces CJK text at random ("谢谢 观看").
"""

from __future__ import annotations

import functools
import re
import unicodedata
import zlib
from collections.abc import Iterable, Sequence

from pipeline.config import GateSettings
from pipeline.dsp import SILENCE_DBFS as SILENCE_DBFS  # re-exported: the engines and tests import from here
from pipeline.dsp import rms_dbfs as rms_dbfs
from pipeline.frames import GateReason
from pipeline.text import split_sentences

DROP_REASONS = ("empty", "no_speech", "low_logprob", "repetition", "phantom")

_ANNOTATION = re.compile(r"^\s*(?:(?:\[[^\]]*\]|\([^)]*\)|\*[^*]*\*|[♪♫#\s-])\s*)+$")


def compression_ratio(text: str) -> float:
    """zlib compression ratio of the UTF-8 text (Whisper's repetition measure; 0 for empty text)."""
    data = text.encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(zlib.compress(data))


def normalize_phrase(text: str) -> str:
    """Case-fold, drop punctuation and symbols, collapse whitespace: "Thank you!!" -> "thank you"."""
    text = unicodedata.normalize("NFKC", text).casefold()
    kept = [ch if not unicodedata.category(ch).startswith(("P", "S")) else " " for ch in text]
    return " ".join("".join(kept).split())


def is_annotation(text: str) -> bool:
    """True for text made only of non-speech annotations: "[Music]", "(upbeat music)", "*coughs*", "♪"."""
    stripped = text.strip()
    return bool(stripped) and bool(_ANNOTATION.match(stripped))


def is_phantom(text: str, phrases: Iterable[str]) -> bool:
    """True when `text` is made only of `phrases` (normalized), each sentence one of them, possibly repeated
    ("bye bye bye", "Thank you. Thank you.", "Thanks for watching. Bye.")."""
    keys = _phrase_keys(tuple(phrases))
    sentences = [_key(s) for s in split_sentences(text)]
    return bool(sentences) and all(s and _repeats_one_of(s, keys) for s in sentences)


def is_credit(text: str, patterns: Iterable[str]) -> bool:
    """True when every sentence of `text` is a subtitle credit (one of `patterns` matches all of it, normalized)."""
    compiled = _compiled(tuple(patterns))
    sentences = [normalize_phrase(s) for s in split_sentences(text)]
    return bool(compiled) and bool(sentences) and all(
        s and any(rx.fullmatch(s) for rx in compiled) for s in sentences)


def _key(text: str) -> str:
    return normalize_phrase(text).replace(" ", "")


@functools.lru_cache(maxsize=16)
def _phrase_keys(phrases: tuple[str, ...]) -> frozenset[str]:
    return frozenset(k for k in map(_key, phrases) if k)


@functools.lru_cache(maxsize=16)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p, re.IGNORECASE) for p in patterns)


def _repeats_one_of(key: str, keys: frozenset[str]) -> bool:
    """`key` is one of `keys`, or one of them said several times over ("byebyebye")."""
    if key in keys:
        return True
    n = len(key)
    for period in range(1, n // 2 + 1):
        if n % period == 0 and key[:period] in keys and key == key[:period] * (n // period):
            return True
    return False


def all_phantom_phrases(settings: GateSettings) -> tuple[str, ...]:
    """`gate.phantom_phrases` and every language's `gate.phantom_phrases_by_language`."""
    return (*settings.phantom_phrases, *(p for ps in settings.phantom_phrases_by_language.values() for p in ps))


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
    if is_annotation(text) or is_credit(text, settings.phantom_patterns):
        return "phantom"
    if audio_dbfs < settings.phantom_max_dbfs and is_phantom(text, all_phantom_phrases(settings)):
        return "phantom"
    return None
