"""Protocol messages: exact fields, size limits, splitting, audio chunking."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import protocol


def test_text_echo_fields() -> None:
    m = protocol.echo_text("Hello there.", "c123", inference_id="utt-1")
    assert m == {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "c123",
                 "properties": {"modality": "text", "text": "Hello there.", "inference_id": "utt-1", "done": True}}
    assert protocol.echo_text("x", "c")["properties"]["done"] is True  # JSON boolean, not "true"


def test_interrupt_is_envelope_only() -> None:
    assert protocol.interrupt("c9") == {"message_type": "conversation", "event_type": "conversation.interrupt",
                                        "conversation_id": "c9"}


@pytest.mark.parametrize(("value", "expected"), [(True, True), (False, False), ("true", True), ("false", False),
                                                 (" TRUE ", True)])
def test_normalize_done(value: object, expected: bool) -> None:
    assert protocol.normalize_done(value) is expected


@pytest.mark.parametrize("value", ["yes", 1, None, "1"])
def test_normalize_done_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        protocol.normalize_done(value)


def test_long_text_splits_at_sentences_under_limit() -> None:
    sentences = [f"This is sentence number {i} of a long monologue." for i in range(200)]
    text = " ".join(sentences)
    pieces = protocol.split_text(text, "c123", max_bytes=1024)
    assert len(pieces) > 1
    assert " ".join(pieces) == text  # nothing lost, nothing reordered
    for piece in pieces:
        assert piece.endswith(".")  # cut at sentence boundaries
        assert protocol.serialized_size(protocol.echo_text(piece, "c123")) <= 1024


@settings(max_examples=150, deadline=None)
@given(st.text(min_size=0, max_size=3000), st.integers(min_value=400, max_value=5000))
def test_split_never_exceeds_limit_or_loses_words(text: str, limit: int) -> None:
    pieces = protocol.split_text(text, "conv", max_bytes=limit)
    for piece in pieces:
        assert protocol.serialized_size(protocol.echo_text(piece, "conv")) <= limit
    assert "".join("".join(pieces).split()) == "".join(text.split())


def test_audio_chunks_under_limit_one_inference_id_closed_by_silence() -> None:
    rate = 24_000
    pcm = (np.sin(np.arange(rate) * 2 * np.pi * 440 / rate) * 10_000).astype(np.int16)  # 1 s tone
    msgs = protocol.audio_chunks(pcm, rate, "c1", max_bytes=4096)
    assert len({m["properties"]["inference_id"] for m in msgs}) == 1
    assert all(protocol.serialized_size(m) <= 4096 for m in msgs)
    assert [m["properties"]["done"] for m in msgs] == [False] * (len(msgs) - 1) + [True]
    decoded = b"".join(base64.b64decode(m["properties"]["audio"]) for m in msgs[:-1])
    assert np.array_equal(np.frombuffer(decoded, "<i2"), pcm)  # lossless, in order
    closing = np.frombuffer(base64.b64decode(msgs[-1]["properties"]["audio"]), "<i2")
    assert len(closing) > 0 and not closing.any()  # a short silent chunk closes the utterance
    assert all(m["properties"]["sample_rate"] == rate and m["properties"]["modality"] == "audio" for m in msgs)


def test_audio_chunks_refuse_impossible_limit() -> None:
    with pytest.raises(protocol.MessageTooLarge):
        protocol.audio_chunks(np.zeros(100, np.int16), 24_000, "c", max_bytes=100)
