"""The English benchmark's scorer (scripts/bench_measure.py), which the tests' `wer` shares (tests/conftest.py)."""

from __future__ import annotations

from scripts.bench_measure import normalizer, wer


def test_a_closing_ellipsis_is_not_scored_as_a_word() -> None:
    # EnglishTextNormalizer alone turns "Align..." into "align ." and jiwer counts the "." as an inserted word
    norm = normalizer()
    assert norm("Align...") == "align"
    assert wer(norm, "Align.", "Align...") == 0.0
    assert wer(norm, "so I went", "So... I went…") == 0.0
    # what the normaliser keeps is still scored: numbers, and a wrong word
    assert norm("It was 3.5 metres.") == "it was 3.5 meters"
    assert wer(norm, "Align the words.", "Align... the birds") == 1 / 3
