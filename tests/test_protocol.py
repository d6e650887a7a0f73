"""Protocol messages: exact fields, the size limit with headroom, text splitting, audio chunking."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import protocol

LIMIT = protocol.DEFAULT_MAX_MESSAGE_BYTES
HEADROOM = protocol.ENVELOPE_HEADROOM_BYTES
IID = "0123456789abcdef" * 2  # as long as new_inference_id()
FAMILY = "👩\u200d👩\u200d👧\u200d👦"  # one grapheme cluster of 7 code points (4 emoji joined by ZWJ)


def texts(msgs: list[dict[str, Any]]) -> list[str]:
    return [m["properties"]["text"] for m in msgs]


def grapheme_bounds(text: str) -> set[int]:
    return {0} | {m.end() for m in regex.finditer(r"\X", text)}


def locate(text: str, pieces: list[str]) -> list[tuple[int, int]]:
    """Where each piece sits in `text`: pieces are verbatim slices, in order, separated only by whitespace."""
    spans, pos = [], 0
    for piece in pieces:
        start = text.find(piece, pos)
        assert start >= 0, f"piece {piece[:40]!r} is not in the text after offset {pos}"
        assert text[pos:start].strip() == "", f"lost {text[pos:start]!r} before {piece[:40]!r}"
        spans.append((start, start + len(piece)))
        pos = start + len(piece)
    assert text[pos:].strip() == "", f"lost the tail {text[pos:][:40]!r}"
    return spans


def check_echoes(text: str, msgs: list[dict[str, Any]], conversation_id: str | None, inference_id: str,
                 done: bool, max_bytes: int) -> list[str]:
    """The invariants every text_echoes result must hold; returns the pieces."""
    assert msgs
    for m in msgs:
        assert protocol.serialized_size(m) <= max_bytes - HEADROOM
        assert m["message_type"] == "conversation" and m["event_type"] == protocol.ECHO
        assert m["conversation_id"] == (conversation_id or "")
        assert m["properties"]["modality"] == "text" and m["properties"]["inference_id"] == inference_id
    assert [m["properties"]["done"] for m in msgs] == [False] * (len(msgs) - 1) + [done]
    pieces = texts(msgs)
    bounds = grapheme_bounds(text)
    for start, end in locate(text, pieces):
        assert start in bounds and end in bounds, f"cut inside a grapheme cluster at {start}..{end}"
    if len(pieces) > 1:
        assert all(p.strip() for p in pieces)  # no empty or whitespace-only echo
    return pieces


# ----------------------------------------------------------------------------------------------- fields
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


def test_serialized_size_is_compact_utf8_json() -> None:
    m = protocol.echo_text('é "q"\n', "c", "i", False)
    wire = ('{"message_type":"conversation","event_type":"conversation.echo","conversation_id":"c",'
            '"properties":{"modality":"text","text":"é \\"q\\"\\n","inference_id":"i","done":false}}')
    assert protocol.serialized_size(m) == len(wire.encode("utf-8"))


# ------------------------------------------------------------------------------------------- text echoes
def test_short_text_is_one_verbatim_echo() -> None:
    msgs = protocol.text_echoes("  Hello there.  ", "c1", "utt-1", done=False)
    assert msgs == [protocol.echo_text("  Hello there.  ", "c1", "utt-1", False)]


def test_empty_text_is_one_empty_echo() -> None:
    assert protocol.text_echoes("", "c1", "utt-1") == [protocol.echo_text("", "c1", "utt-1", True)]


@pytest.mark.parametrize("done", [True, False])
def test_long_run_splits_into_two_full_pieces(done: bool) -> None:
    # Old defect: pieces sized as if done=true were 4097 bytes with done=false and got split again,
    # so "x"*5000 went out as 3894, 1 and 1105 characters.
    text = "x" * 5000
    msgs = protocol.text_echoes(text, "c123", IID, done=done, max_bytes=LIMIT)
    pieces = check_echoes(text, msgs, "c123", IID, done, LIMIT)
    assert len(pieces) == 2 and "".join(pieces) == text
    assert protocol.serialized_size(msgs[0]) >= LIMIT - HEADROOM - 2  # the first piece is filled, no waste


@pytest.mark.parametrize("max_bytes", [1024, 2048, LIMIT])
def test_zwj_emoji_sequences_stay_whole(max_bytes: int) -> None:
    # Old defect: a lone U+200D went out as its own echo and a family emoji was cut in two.
    text = FAMILY * 400
    msgs = protocol.text_echoes(text, "c123", IID, max_bytes=max_bytes)
    pieces = check_echoes(text, msgs, "c123", IID, True, max_bytes)
    assert len(pieces) > 1 and "".join(pieces) == text
    for piece in pieces:
        assert set(regex.findall(r"\X", piece)) == {FAMILY}
    assert protocol.serialized_size(msgs[0]) > max_bytes - HEADROOM - len(FAMILY.encode())  # filled to one cluster


def test_combining_marks_stay_with_their_letter() -> None:
    text = "e\u0301" * 3000  # é as e + COMBINING ACUTE ACCENT
    msgs = protocol.text_echoes(text, None, "utt-1", max_bytes=1024)
    pieces = check_echoes(text, msgs, None, "utt-1", True, 1024)
    assert all(not p.startswith("\u0301") for p in pieces) and "".join(pieces) == text


def test_long_text_splits_at_sentences_under_limit() -> None:
    sentences = [f"This is sentence number {i} of a long monologue." for i in range(200)]
    text = " ".join(sentences)
    msgs = protocol.text_echoes(text, "c123", "utt-1", max_bytes=1024)
    pieces = check_echoes(text, msgs, "c123", "utt-1", True, 1024)
    assert len(pieces) > 1
    assert " ".join(pieces) == text  # nothing lost, nothing reordered
    assert all(p.endswith(".") for p in pieces)  # cut at sentence boundaries


def test_sentence_end_wins_over_a_fuller_word_cut() -> None:
    first = "Short first sentence."
    rest = " ".join(["word"] * 2000)  # one sentence far too long for a message
    text = f"{first} {rest}"
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert pieces[0] == first
    assert all(set(p.split()) == {"word"} for p in pieces[1:])  # then whole words


def test_words_not_cut_and_dots_inside_tokens_are_not_sentence_ends() -> None:
    text = " ".join(["v1.2.3", "e.g.", "3.14", "wait...what", "example.com/a?b=c"] * 300)
    msgs = protocol.text_echoes(text, "c", "i", max_bytes=2048)
    pieces = check_echoes(text, msgs, "c", "i", True, 2048)
    assert len(pieces) > 1 and " ".join(pieces) == text  # every cut at whitespace
    tokens = set(text.split())
    assert all(set(p.split()) <= tokens for p in pieces)


def test_cjk_splits_after_ideographic_full_stop() -> None:
    sentence = "今日は晴れです。明日は雨です。"
    text = sentence * 200  # no spaces anywhere
    msgs = protocol.text_echoes(text, "c", "i", max_bytes=1024)
    pieces = check_echoes(text, msgs, "c", "i", True, 1024)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert all(p.endswith("。") and p.startswith(("今日", "明日")) for p in pieces)


@pytest.mark.parametrize("mark", ["！", "？", "‼", "⁉", "؟", "।", "॥", "።", "۔", "．"])
def test_other_scripts_sentence_ends_split_without_space(mark: str) -> None:
    text = f"あいうえおかきくけこ{mark}" * 300
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert all(p.endswith(mark) for p in pieces)


def test_sentence_end_then_closing_quote() -> None:
    text = "「はい。」" * 600
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text and all(p.endswith("。」") for p in pieces)


@pytest.mark.parametrize("offset", range(6))
def test_devanagari_conjuncts_are_never_split(offset: int) -> None:
    """No space, no sentence end: the cut falls between graphemes, and "क्षि" (4 code points, a conjunct of two
    consonants and a vowel sign) is one grapheme. Every alignment of the limit against the conjuncts is tried."""
    text = "अ" * offset + "क्षि" * 2000
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text
    assert all(p.endswith("क्षि") for p in pieces) and all(p.lstrip("अ").startswith("क्षि") for p in pieces)


@pytest.mark.parametrize("conjunct", ["க்ஷ", "ಕ್ಷ", "ക്ഷ", "క్ష"])  # Tamil, Kannada, Malayalam, Telugu
def test_conjuncts_the_grapheme_rules_leave_open_are_not_cut(conjunct: str) -> None:
    """Unicode's conjunct rule (GB9c) covers Malayalam and Telugu but not Tamil or Kannada, whose \\X splits the
    conjunct after the virama: the cut steps back before it instead."""
    text = ("x" + conjunct) * 1500
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text
    virama, second = conjunct[1], conjunct[2]
    assert not any(p.endswith(virama) or p.startswith(second) for p in pieces), [p[-3:] for p in pieces]


def test_cjk_without_marks_is_cut_between_graphemes_and_at_ascii_marks() -> None:
    text = "我很好?你呢" * 400  # Whisper's ASCII "?" between ideographs ends a sentence too
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text and all(p.endswith("?") for p in pieces[:-1])
    text = "漢字かなカナ" * 1000  # nothing to cut at but graphemes
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert len(pieces) > 1 and "".join(pieces) == text


def test_a_no_break_space_at_a_grapheme_cut_is_never_a_piece_of_its_own() -> None:
    """Found by test_split_property: a grapheme cut right before a trailing no-break space sent it alone."""
    text = "ok.👩\u200d👩\u200d👧\u200d👦0\x07𐀀𐀀\x07\x80𐀀𐀀\xa0"
    pieces = texts(protocol.text_echoes(text, None, "inf-1", done=False, max_bytes=480))
    assert all(p.strip() for p in pieces) and "".join(pieces) == text.rstrip("\xa0")


def test_json_escapes_are_counted() -> None:
    text = '"\\\x01\x02' * 1000  # escaped as \" \\ \u0001 \u0002: 2+2+6+6 bytes per 4 characters
    msgs = protocol.text_echoes(text, "c", "i", max_bytes=LIMIT)
    pieces = check_echoes(text, msgs, "c", "i", True, LIMIT)
    assert "".join(pieces) == text
    assert protocol.serialized_size(msgs[0]) >= LIMIT - HEADROOM - 6


def test_whitespace_only_text_over_the_limit_is_one_empty_echo() -> None:
    assert texts(protocol.text_echoes(" " * 5000, "c", "i")) == [""]


def test_no_break_space_is_not_a_cut() -> None:
    text = "a\u00a0b " * 1000
    pieces = texts(protocol.text_echoes(text, "c", "i", max_bytes=1024))
    assert all(set(p.split(" ")) == {"a\u00a0b"} for p in pieces)


def test_refuses_a_limit_too_small_for_one_grapheme() -> None:
    with pytest.raises(protocol.MessageTooLarge):
        protocol.text_echoes("x" * 100, "c", "i", max_bytes=HEADROOM + 50)  # below the envelope alone
    envelope = protocol.serialized_size(protocol.echo_text("", "c", "i", False))
    with pytest.raises(protocol.MessageTooLarge):  # room for 10 bytes of text, a family emoji needs 25
        protocol.text_echoes(FAMILY * 3, "c", "i", max_bytes=HEADROOM + envelope + 10)


# Fragments that exercise every rule: words, whitespace, ZWJ and flag emoji, combining marks, CJK with its
# sentence ends, RTL scripts, Latin punctuation inside tokens, and characters JSON must escape.
FRAGMENTS = ["hello", "world", "ok.", "3.14", "e.g.", "wait...", "Really?!", "“Quoted.”", " ", "  ", "\n", "\r\n",
             "\t", FAMILY, "🏳️\u200d🌈", "🇯🇵", "👍🏽", "e\u0301", "a\u0308\u0301", "今日は", "晴れです", "。", "！",
             "？", "「はい。」", "שלום", "مرحبا", "؟", "नमस्ते", "।", '"', "\\", "\x00", "\x1f", "\x7f", "\u2028",
             "\u00a0", "…", "‼", "क्षि", "க்ஷ", "ಕ್ಷ", "¿", "¡", "你好吗?"]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=900),
       st.integers(min_value=480, max_value=5000), st.booleans(), st.sampled_from([None, "c123", 'c"\\é']))
def test_split_property(parts: list[str], limit: int, done: bool, conversation_id: str | None) -> None:
    text = "".join(parts)
    msgs = protocol.text_echoes(text, conversation_id, "inf-1", done=done, max_bytes=limit)
    pieces = check_echoes(text, msgs, conversation_id, "inf-1", done, limit)
    assert "".join("".join(pieces).split()) == "".join(text.split())


# ------------------------------------------------------------------------------------------ audio echoes
def tone(seconds: float, rate: int = 24_000) -> np.ndarray:
    n = int(rate * seconds)
    return (np.sin(np.arange(n) * 2 * np.pi * 440 / rate) * 10_000).astype(np.int16)


@pytest.mark.parametrize("max_bytes", [LIMIT, 1024, 9000])
def test_audio_echoes_under_limit_one_inference_id_closed_by_silence(max_bytes: int) -> None:
    rate = 24_000
    pcm = tone(1.0, rate)
    msgs = protocol.audio_echoes(pcm, rate, "c1", "aud-1", max_bytes=max_bytes)
    assert {m["properties"]["inference_id"] for m in msgs} == {"aud-1"}
    # Old defect: every chunk was exactly 4096 bytes, no room for Daily's own envelope.
    assert all(protocol.serialized_size(m) <= max_bytes - HEADROOM for m in msgs)
    assert [m["properties"]["done"] for m in msgs] == [False] * (len(msgs) - 1) + [True]
    decoded = b"".join(base64.b64decode(m["properties"]["audio"]) for m in msgs[:-1])
    assert np.array_equal(np.frombuffer(decoded, "<i2"), pcm)  # lossless, in order
    closing = np.frombuffer(base64.b64decode(msgs[-1]["properties"]["audio"]), "<i2")
    assert len(closing) > 0 and not closing.any()  # a short silent chunk closes the utterance
    assert all(m["properties"]["sample_rate"] == rate and m["properties"]["modality"] == "audio" for m in msgs)


def test_audio_echoes_not_done_leave_the_utterance_open() -> None:
    pcm = tone(0.5)
    msgs = protocol.audio_echoes(pcm, 24_000, "c1", "aud-1", done=False)
    assert msgs and all(m["properties"]["done"] is False for m in msgs)
    decoded = b"".join(base64.b64decode(m["properties"]["audio"]) for m in msgs)
    assert np.array_equal(np.frombuffer(decoded, "<i2"), pcm)  # no closing silence appended
    assert all(protocol.serialized_size(m) <= LIMIT - HEADROOM for m in msgs)


def test_audio_echoes_refuse_impossible_limit() -> None:
    with pytest.raises(protocol.MessageTooLarge):  # HEADROOM + 100 is below the audio envelope alone
        protocol.audio_echoes(np.zeros(100, np.int16), 24_000, "c", "i", max_bytes=HEADROOM + 100)
