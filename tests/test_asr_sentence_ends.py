"""pipeline/asr/whisper/sentence_ends.py on the multilingual Whisper base's real tokenizer (no model run): which
steps wrote the final mark, in one token or several byte tokens, and the probability over those steps."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest

from pipeline.asr.whisper.sentence_ends import SentenceEndTokens, sentence_end_tokens
from pipeline.text import SENTENCE_END

EOT = 50257  # the multilingual vocabulary's end of text: special tokens from here on


@functools.cache
def tables() -> tuple[Any, SentenceEndTokens]:
    from tokenizers import Tokenizer

    from pipeline.asr.models import packaged_model

    found = packaged_model("base")
    if found is None:
        pytest.fail("the multilingual Whisper base is not installed: scripts/install.sh --dev installs it")
    hf = Tokenizer.from_file(str(found.path / "tokenizer.json"))
    return hf, sentence_end_tokens(hf, EOT)


def encode(text: str) -> list[int]:
    hf, _ = tables()
    return list(hf.encode(text, add_special_tokens=False).ids)


@pytest.mark.parametrize(("text", "n_steps"), [
    ("今日は晴れです。", 1), ("本当？", 3), ("すごい！", 3), ("क्या है।", 2), ("क्या है॥", 2), ("هل أنت؟", 1),
    ("یہ ہے۔", 1), ("¿Qué tal?", 1), ("Done...", 1), ("Wow!!", 1), (" Stop. ", 1),
])
def test_final_mark_steps_cover_the_bytes_of_the_mark(text: str, n_steps: int) -> None:
    hf, ends = tables()
    tokens = encode(text)
    steps = ends.final_mark_steps(tokens)
    assert steps is not None
    first, last = steps
    assert last - first + 1 == n_steps
    written = hf.decode(tokens[first:last + 1]).strip()
    assert written and written[-1] == text.strip()[-1]


@pytest.mark.parametrize("text", ["no mark", "「はい」", "3.14 is pi,", "", "नमस्ते"])
def test_no_final_mark(text: str) -> None:
    _, ends = tables()
    assert ends.final_mark_steps(encode(text)) is None


def test_the_tables_hold_every_way_to_write_a_sentence_end() -> None:
    _, ends = tables()
    complete = {ends.token_bytes[i].decode("utf-8", "replace").strip() for i in ends.ending[b""]}
    assert {".", "?", "!", "...", "。", "؟", "۔", "…"} <= complete
    assert all(s[-1] in SENTENCE_END for s in complete)
    # the last byte of a full-width mark after its first two, and of the danda after its first two
    assert {ends.token_bytes[i] for i in ends.ending["？".encode()[:2]]} >= {"？".encode()[2:], "！".encode()[2:]}
    assert "।".encode()[2:] in {ends.token_bytes[i] for i in ends.ending["।".encode()[:2]]}


def step_logits(vocab: int, probs: dict[int, float]) -> np.ndarray:
    """Logits whose softmax gives `probs` to its ids and spreads the rest evenly."""
    rest = (1.0 - sum(probs.values())) / (vocab - len(probs))
    p = np.full(vocab, rest)
    for i, q in probs.items():
        p[i] = q
    return np.log(p).astype(np.float32)


def test_probability_of_a_three_byte_mark_is_the_product_and_the_mass_adds_the_other_ends() -> None:
    _, ends = tables()
    vocab = len(ends.token_bytes)
    tokens = encode("本当？")  # 本当 + three byte tokens
    first, last = ends.final_mark_steps(tokens) or (0, 0)
    assert (first, last) == (1, 3)
    period = encode("。")[0]
    logits = [step_logits(vocab, {tokens[0]: 0.9}),
              step_logits(vocab, {tokens[1]: 0.3, period: 0.5}),  # the first byte, or "。"
              step_logits(vocab, {tokens[2]: 0.8}),
              step_logits(vocab, {tokens[3]: 0.6})]
    token = ends.final_mark_prob(tokens, logits, first, last, "token")
    assert token == pytest.approx(0.3 * 0.8 * 0.6, rel=1e-4)
    mass = ends.final_mark_prob(tokens, logits, first, last, "mass")
    assert mass is not None and token is not None and mass > 0.5 + token * 0.99  # "。" counted beside "？"
    assert ends.final_mark_prob(tokens, logits[:3], first, last, "token") is None  # a step's logits missing


def test_probability_of_a_one_token_mark_is_its_softmax() -> None:
    _, ends = tables()
    vocab = len(ends.token_bytes)
    tokens = encode("Done.")
    first, last = ends.final_mark_steps(tokens) or (0, 0)
    assert first == last == len(tokens) - 1
    logits = [step_logits(vocab, {t: 0.9}) for t in tokens[:-1]] + [step_logits(vocab, {tokens[-1]: 0.7})]
    assert ends.final_mark_prob(tokens, logits, first, last, "token") == pytest.approx(0.7, rel=1e-4)
    floor = [step_logits(vocab, {t: 0.9}) for t in tokens[:-1]] + [step_logits(vocab, {tokens[-1]: 1e-12})]
    assert ends.final_mark_prob(tokens, floor, first, last, "token") == 1e-9  # clamped above zero
