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
