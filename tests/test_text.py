"""pipeline.text: the one sentence-end definition (used by ASR, endpointing, transforms and protocol)."""

from __future__ import annotations

import pytest

from pipeline.text import CLOSERS, LATIN_SENTENCE_END, SCRIPT_SENTENCE_END, SENTENCE_END, ends_sentence


def test_sentence_end_covers_the_old_definitions_and_other_scripts() -> None:
    # The definitions it replaced: endpoint.py (". ? !"), asr/whisper.py and asr/openai_http.py (".?!"),
    # transform/builtins.py (".!?…").
    assert set(".?!…") <= set(SENTENCE_END)
    assert set("。！？‼⁇⁈⁉؟।॥።۔．") <= set(SENTENCE_END)
    assert SENTENCE_END == LATIN_SENTENCE_END + SCRIPT_SENTENCE_END
    assert not set(SENTENCE_END) & set(CLOSERS)
    assert len(set(SENTENCE_END)) == len(SENTENCE_END)


@pytest.mark.parametrize("text", ["Done.", "Really?", "Stop!", "Wait…", "He said \"stop.\"", "(See above.)  ",
                                  "今日は晴れです。", "本当？", "「はい。」", "क्या है।", "هل أنت؟", "Wow‼ ", "ok.\n"])
def test_ends_sentence(text: str) -> None:
    assert ends_sentence(text)


@pytest.mark.parametrize("text", ["", "   ", "and then", "a comma,", "semi;", "\"quoted\"", "3.14 is pi", "「はい」",
                                  "))"])
def test_does_not_end_sentence(text: str) -> None:
    assert not ends_sentence(text)


# --------------------------------------------------------------------------- sentences of every script
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pipeline.text import (  # noqa: E402
    cut_at_grapheme,
    full_stop,
    grapheme_boundaries,
    sentence_end_offsets,
    split_sentences,
)


@pytest.mark.parametrize(("text", "sentences"), [
    ("Hello there. How are you?", ["Hello there.", "How are you?"]),
    ("¿Qué tal? ¡Muy bien! Gracias.", ["¿Qué tal?", "¡Muy bien!", "Gracias."]),  # ¿ ¡ open, never end
    ("今日は晴れです。明日は雨ですか？そうです！", ["今日は晴れです。", "明日は雨ですか？", "そうです！"]),
    ("你好吗?我很好.谢谢", ["你好吗?", "我很好.", "谢谢"]),  # Whisper's ASCII marks between ideographs
    ("「はい。」と言った。", ["「はい。」", "と言った。"]),
    ("मैं घर जा रहा हूँ। तुम कहाँ हो?", ["मैं घर जा रहा हूँ।", "तुम कहाँ हो?"]),
    ("क्या है।क्षत्रिय॥", ["क्या है।", "क्षत्रिय॥"]),
    ("هل أنت بخير؟ نعم.", ["هل أنت بخير؟", "نعم."]),
    ("یہ کتاب ہے۔ وہ قلم ہے۔", ["یہ کتاب ہے۔", "وہ قلم ہے۔"]),
    ("Он сказал: «Нет.» Потом ушёл.", ["Он сказал: «Нет.»", "Потом ушёл."]),
    ("그는 갔다. 나는 남았다.", ["그는 갔다.", "나는 남았다."]),
    ("Pi is 3.14, e.g. roughly. See example.com now", ["Pi is 3.14, e.g.", "roughly.", "See example.com now"]),
    ("wait...what? Yes.", ["wait...what?", "Yes."]),
    # Thai writes no sentence punctuation: one piece, the spaces are not sentence ends
    ("ฉันไปตลาด เขาอยู่บ้าน", ["ฉันไปตลาด เขาอยู่บ้าน"]),
    ("", []),
])
def test_split_sentences_in_every_script(text: str, sentences: list[str]) -> None:
    assert split_sentences(text) == sentences


@given(st.lists(st.sampled_from(["Hola", "¿qué?", "¡sí!", "今日は", "晴れ", "。", "！", "？", "नमस्ते", "।", "क्षि",
                                 "؟", "۔", " ", ".", "3.14", "「", "」", "\"", "ok", "ฉัน", "…"]), max_size=40))
def test_sentence_offsets_cut_only_after_a_mark_and_keep_the_text(parts: list[str]) -> None:
    text = "".join(parts)
    offsets = sentence_end_offsets(text)
    assert offsets == sorted(set(offsets)) and all(0 < e <= len(text) for e in offsets)
    for e in offsets:  # what ends before a cut is a mark, possibly closed by quotes
        assert text[:e].rstrip(CLOSERS)[-1:] in SENTENCE_END
        assert e == len(text) or text[e] not in SENTENCE_END + CLOSERS  # the whole run of marks stays with it
    assert "".join(split_sentences(text)).replace(" ", "") == text.replace(" ", "")
    assert set(offsets) <= set(grapheme_boundaries(text)) | {len(text)}


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("क्षि", 2, ""), ("क्षि", 4, "क्षि"), ("नमस्ते", 4, "नम"), ("e\u0301e\u0301", 3, "e\u0301"),
    ("今日は", 2, "今日"), ("👩\u200d👩\u200d👧", 4, ""),
])
def test_cut_at_grapheme_never_splits_a_character(text: str, limit: int, expected: str) -> None:
    assert cut_at_grapheme(text, limit) == expected


@pytest.mark.parametrize(("text", "language", "mark"), [
    ("你好", "zh", "。"), ("こんにちは", None, "。"), ("नमस्ते", "hi", "।"), ("नमस्ते", None, "।"), ("سلام", "ur", "۔"),
    ("สวัสดี", "th", ""), ("Hola", "es", "."), ("Hello", None, "."), ("你好", "zh-TW", "。"),
])
def test_full_stop_per_language_and_script(text: str, language: str | None, mark: str) -> None:
    assert full_stop(text, language) == mark
