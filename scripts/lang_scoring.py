"""Error rate of a transcript in any language: the one scoring rule of the tests and the benchmarks.

tests/conftest.py (`ml_error`) and scripts/multilingual_audio.py both import it, so a figure in BENCHMARKS.md
and a bound in a test are the same measurement. The rule is Whisper's multilingual evaluation, as the clips'
README (tests/data/speech/multilingual/README.md) asks: Whisper's basic, language-neutral normaliser (lower
case, punctuation and symbols removed) on both sides, then word error rate; Japanese and Chinese, which put no
spaces between words, by character error rate with the spaces removed. The normaliser keeps Unicode marks
(whisper_normalizer's preserve_marks): without it every Devanagari vowel sign and virama becomes a space, so
"रोटियाँ" would score as four "words" (र ट य ...).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

CHARACTER_SCORED = ("ja", "zh")  # no spaces between words: scored by character error rate


def metric(language: str) -> str:
    """'CER' or 'WER': how `language`'s transcripts are scored."""
    return "CER" if language in CHARACTER_SCORED else "WER"


@cache
def _basic_normalizer() -> Callable[[str], str]:
    from whisper_normalizer.basic import BasicTextNormalizer

    normalizer: Callable[[str], str] = BasicTextNormalizer(preserve_marks=True)
    return normalizer


def normalize(text: str) -> str:
    """Whisper's basic normaliser (marks kept) with runs of white space collapsed."""
    return " ".join(_basic_normalizer()(text).split())


def error_rate(language: str, ref: str, hyp: str) -> float:
    """WER with Whisper's basic normaliser, or CER for Japanese and Chinese. An empty reference scores 0 for an
    empty hypothesis and 1 for any text."""
    import jiwer

    r, h = normalize(ref), normalize(hyp)
    if language in CHARACTER_SCORED:
        r, h = r.replace(" ", ""), h.replace(" ", "")
        return float(jiwer.cer(r, h)) if r else float(bool(h))
    return float(jiwer.wer(r, h)) if r else float(bool(h))
