"""Whisper's sentence-end probability for a mark of any script, across byte tokens.

Whisper's byte-level BPE writes a sentence end in one of three ways: a token of its own (". ? ! 。 ؟ ۔"), a token
that also holds other marks ("...", "?!", "。。", '".'), or several byte tokens: the full-width "！ ？ ．" are three
single-byte tokens, the Devanagari danda "।" two. One token's softmax misses the last case (its last byte decodes
to "\ufffd", not to a mark, so Chinese "？" and Hindi "।" had no probability at all).

`SentenceEndTokens` holds, per tokenizer, each token's bytes and the ids of the tokens that end a sentence after
each possible carried-in partial mark (b"" at a character boundary, b"\xef\xbc" after the first two bytes of a
full-width mark, ...). `final_mark_steps` finds the steps that wrote the text's final mark and
`final_mark_prob` computes, from those steps' logits:

- `mode="token"` (what the engine uses): the probability of the tokens written, their product (a one-token mark:
  that token's softmax, which the English endpointing thresholds were tuned on);
- `mode="mass"`: the probability that a sentence ends at that position whatever its mark: each step's mass of the
  tokens that complete a sentence end there, plus the chosen partial mark's probability times the same at the next
  step (other partial marks' continuations are unknown, so it is a lower bound). It did not separate clip ends from
  mid-clip cuts better on base's multilingual clips (scripts/sentence_end_probs.py prints both), so it is kept for
  that measurement only.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.text import SENTENCE_END

PunctMode = Literal["mass", "token"]


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (every byte is one printable character), reversed: character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _ends_sentence(data: bytes) -> bool:
    text = data.decode("utf-8", errors="replace").rstrip()
    return bool(text) and text[-1] in SENTENCE_END


def _partial_marks() -> list[bytes]:
    """The proper byte prefixes of the multi-byte sentence-end marks (b"\\xe0\\xa5" for "।", ...)."""
    out: set[bytes] = set()
    for ch in SENTENCE_END:
        b = ch.encode("utf-8")
        out.update(b[:k] for k in range(1, len(b)))
    return sorted(out)


def _incomplete_tail(data: bytes) -> bytes:
    """The bytes at the end of `data` that begin a UTF-8 character not yet complete (b"" when none)."""
    for k in range(1, min(4, len(data)) + 1):
        lead = data[-k]
        if lead < 0x80:
            return b""  # ASCII: complete
        if lead >= 0xC0:  # a lead byte: complete when its sequence length is k
            need = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
            return data[-k:] if need > k else b""
    return b""


@dataclass(frozen=True, slots=True)
class SentenceEndTokens:
    """One tokenizer's byte strings, and the ids that end a sentence after each carried-in partial mark."""

    token_bytes: tuple[bytes, ...]  # by id; b"" for special tokens
    ending: dict[bytes, np.ndarray]  # carried-in partial mark (b"": none) -> ids that complete a sentence end

    @classmethod
    def build(cls, hf_tokenizer: Any, eot: int) -> SentenceEndTokens:
        """From a `tokenizers.Tokenizer` (byte-level BPE); ids from `eot` on are special tokens."""
        dec = _byte_decoder()
        size = int(hf_tokenizer.get_vocab_size())
        token_bytes: list[bytes] = []
        for i in range(size):
            piece = hf_tokenizer.id_to_token(i) if i < eot else None
            token_bytes.append(bytes(dec[c] for c in piece if c in dec) if piece else b"")
        ending = {b"": np.array([i for i, tb in enumerate(token_bytes) if tb and _ends_sentence(tb)], np.int64)}
        continuation = [i for i, tb in enumerate(token_bytes) if tb and 0x80 <= tb[0] < 0xC0]
        for prefix in _partial_marks():
            ending[prefix] = np.array([i for i in continuation if _ends_sentence(prefix + token_bytes[i])], np.int64)
        return cls(tuple(token_bytes), ending)

    def final_mark_steps(self, tokens: Sequence[int]) -> tuple[int, int] | None:
        """The steps (first, last) whose tokens wrote the text's final sentence-end mark, or None when the text
        does not end with one (trailing whitespace ignored; a closing quote after the mark is not an end here,
        as in the endpointer)."""
        data = b"".join(self.token_bytes[t] if 0 <= t < len(self.token_bytes) else b"" for t in tokens)
        end = len(data.rstrip())
        if not end or not _ends_sentence(data[:end]):
            return None
        text = data[:end].decode("utf-8", errors="replace")
        start = end - len(text[-1].encode("utf-8"))
        first = last = None
        pos = 0
        for step, t in enumerate(tokens):
            n = len(self.token_bytes[t]) if 0 <= t < len(self.token_bytes) else 0
            if n and first is None and pos + n > start:
                first = step
            if n and pos + n >= end:
                last = step
                break
            pos += n
        if first is None or last is None:
            return None
        return first, last

    def final_mark_prob(self, tokens: Sequence[int], step_logits: Sequence[Any], first: int, last: int,
                        mode: PunctMode = "mass") -> float | None:
        """The probability of the final mark written over steps first..last (see the module doc), from each
        step's logits (`step_logits[k]` is step k's distribution); None when a step's logits are missing."""
        if len(step_logits) <= last:
            return None
        carried = _incomplete_tail(b"".join(self.token_bytes[t] for t in tokens[:first]))
        total, reach = 0.0, 1.0  # reach: probability of the chosen partial mark so far
        for step in range(first, last + 1):
            p = _softmax(step_logits[step])
            chosen = tokens[step]
            if mode == "mass":
                ids = self.ending.get(carried)
                if ids is not None and len(ids):
                    total += reach * float(p[ids[ids < len(p)]].sum())
            reach *= float(p[chosen])
            carried = _incomplete_tail(carried + self.token_bytes[chosen])
        if mode == "token":
            total = reach
        return min(1.0, max(total, 1e-9))


def _softmax(logits: Any) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float32).astype(np.float64).ravel()
    x = x - x.max()
    p = np.exp(x)
    out: np.ndarray = p / p.sum()
    return out


@functools.lru_cache(maxsize=8)
def sentence_end_tokens(hf_tokenizer: Any, eot: int) -> SentenceEndTokens:
    """The tables of one tokenizer, built once (~0.3 s for Whisper's 51k tokens); every language of a model
    shares its tokenizer."""
    return SentenceEndTokens.build(hf_tokenizer, eot)
