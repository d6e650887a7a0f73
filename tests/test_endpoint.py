"""The endpoint policy: silence needed to finish an utterance, from its speculative transcript."""

from __future__ import annotations

import pytest

from pipeline.config import EndpointSettings
from pipeline.endpoint import required_silence_ms

EP = EndpointSettings(confident_prob=0.9, confident_pause_ms=150, likely_prob=0.6, likely_pause_ms=500)
HANG = 1000


@pytest.mark.parametrize(("text", "p", "expected"), [
    ("Ask what you can do for your country.", 0.95, 150),  # confident sentence end
    ("Is that so?", 0.90, 150),  # the threshold is inclusive
    ("We shall pay any price!", 0.7, 500),  # likely
    ("And so, my fellow Americans.", 0.59, HANG),  # too unsure
    ("and so my fellow Americans", None, HANG),  # no final punctuation
    ("and so my fellow Americans,", 0.99, HANG),  # a comma is not an end
    ("Done.  ", 0.95, 150),  # trailing spaces ignored
    ("Done.", None, HANG),  # engine could not tell
    ("", 1.0, HANG),
])
def test_required_silence(text: str, p: float | None, expected: int) -> None:
    assert required_silence_ms(text, p, EP, HANG) == expected


def test_never_longer_than_hangover() -> None:
    assert required_silence_ms("Yes.", 0.7, EP, 300) == 300


def test_likely_above_confident_is_rejected() -> None:
    with pytest.raises(ValueError, match="likely_prob"):
        EndpointSettings(confident_prob=0.5, likely_prob=0.6)
