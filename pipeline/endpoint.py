"""Adaptive endpointing: how much silence ends an utterance, given its speculative transcript.

A pure function, so the policy can be unit-tested and swept offline (scripts/endpoint_sweep.py).
Whisper ends almost any pause with a period, and in read speech it is often confident about it at
clause boundaries too (measured: p >= 0.89 at 5 of 10 mid-sentence pauses of the LibriSpeech set),
so the probability alone cannot tell a sentence end from a breath. The policy therefore grades the
wait: a very confident sentence end finishes almost at once, a likely one after a medium pause, and
anything else after the full hangover.
"""

from __future__ import annotations

from pipeline.config import EndpointSettings
from pipeline.text import SENTENCE_END


def required_silence_ms(text: str, final_punct_prob: float | None, settings: EndpointSettings,
                        hangover_ms: int) -> int:
    """Silence (ms after the speech end) after which an utterance with this transcript is finished."""
    text = text.rstrip()
    if not text or not text.endswith(tuple(SENTENCE_END)) or final_punct_prob is None:
        return hangover_ms
    if final_punct_prob >= settings.confident_prob:
        return min(settings.confident_pause_ms, hangover_ms)
    if final_punct_prob >= settings.likely_prob:
        return min(settings.likely_pause_ms, hangover_ms)
    return hangover_ms
