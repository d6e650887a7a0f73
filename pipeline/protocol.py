"""Tavus Interactions Protocol messages: the one place that builds what is sent to the room, and that fits
every message to the size limit.

Facts (sources in docs/tavus.md):
- envelope: message_type "conversation", event_type, conversation_id; payload under `properties`;
- `conversation.echo` text: modality "text", text, inference_id, done (JSON boolean);
- `conversation.echo` audio: raw s16le mono PCM, base64, sample_rate, one inference_id per
  utterance, done=false on every chunk and a short silent closing chunk with done=true;
- `conversation.interrupt`: the envelope only;
- Daily documents 4096 bytes per app-message; every message built here is at most
  max_bytes - ENVELOPE_HEADROOM_BYTES serialized (docs/tavus.md, "Message size").
"""

from __future__ import annotations

import base64
import json
import unicodedata
import uuid
from bisect import bisect_right
from typing import Any

import numpy as np
import regex

from pipeline.frames import Pcm
from pipeline.text import sentence_end_offsets

MESSAGE_TYPE = "conversation"
ECHO = "conversation.echo"
INTERRUPT = "conversation.interrupt"

DEFAULT_MAX_MESSAGE_BYTES = 4096  # Daily's documented app-message limit
# Daily relays our JSON inside its own signalling message (message type, sender and recipient session ids:
# roughly 100-150 bytes), and its docs say neither whether the 4 KB counts that wrapper nor whether "4kb"
# means 4096 or 4000. 256 bytes covers the wrapper about twice over and keeps a 4096 limit under 4000 too
# (3840 bytes); it costs ~6% of each message's payload.
ENVELOPE_HEADROOM_BYTES = 256
DEFAULT_AUDIO_SAMPLE_RATE = 24_000  # Tavus recommends 24 kHz for audio echo (16 kHz is its fallback)
CLOSING_SILENCE_S = 0.04  # pipecat closes an audio utterance with 40 ms of silence, done=true

_GRAPHEME = regex.compile(r"\X")  # extended grapheme clusters: what a reader sees as one character
# No-break spaces join words on purpose (numbers, "Mr.\u00a0Smith", French "?\u00a0"): never cut there.
_NO_BREAK_SPACES = "\u00a0\u2007\u202f"
VIRAMA_CLASS = 9  # Unicode canonical combining class of the Indic viramas (्, ্, ், ್, ...)


class MessageTooLarge(ValueError):
    """A single message cannot fit the size limit even after splitting."""


def new_inference_id() -> str:
    return uuid.uuid4().hex


def serialized_size(message: dict[str, Any]) -> int:
    """Bytes on the wire: compact UTF-8 JSON, as daily-python serializes app-messages."""
    return len(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def envelope(event_type: str, conversation_id: str | None) -> dict[str, Any]:
    return {"message_type": MESSAGE_TYPE, "event_type": event_type, "conversation_id": conversation_id or ""}


def echo_text(text: str, conversation_id: str | None, inference_id: str | None = None,
              done: bool = True) -> dict[str, Any]:
    msg = envelope(ECHO, conversation_id)
    msg["properties"] = {"modality": "text", "text": text,
                         "inference_id": inference_id or new_inference_id(), "done": bool(done)}
    return msg


def interrupt(conversation_id: str | None) -> dict[str, Any]:
    return envelope(INTERRUPT, conversation_id)


def echo_audio_chunk(pcm_bytes: bytes, sample_rate: int, conversation_id: str | None,
                     inference_id: str, done: bool) -> dict[str, Any]:
    msg = envelope(ECHO, conversation_id)
    msg["properties"] = {"modality": "audio", "audio": base64.b64encode(pcm_bytes).decode("ascii"),
                         "sample_rate": int(sample_rate), "inference_id": inference_id, "done": bool(done)}
    return msg


def text_echoes(text: str, conversation_id: str | None, inference_id: str, done: bool = True,
                max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[dict[str, Any]]:
    """The text echo messages that say `text`, each at most `max_bytes - ENVELOPE_HEADROOM_BYTES` serialized.

    Text that fits is sent verbatim in one message. Longer text is cut at the last sentence end that fits,
    else at the last whitespace, else between grapheme clusters (never inside one: a ZWJ emoji or a letter
    with its combining accent stays whole). Whitespace at a cut is dropped, so the pieces joined with one
    space where whitespace was cut (nothing after a CJK sentence end or a grapheme cut) give back the text.
    All pieces share `inference_id`; all but the last carry done=false, the last carries `done`.
    """
    inference_id = inference_id or new_inference_id()  # "" would give every piece its own id
    limit = max_bytes - ENVELOPE_HEADROOM_BYTES
    whole = echo_text(text, conversation_id, inference_id, done)
    if serialized_size(whole) <= limit:
        return [whole]
    # The message size is the empty message's size plus the escaped text; "false" is one byte longer than
    # "true", so every piece but the last gets the done=false budget.
    budget = limit - serialized_size(echo_text("", conversation_id, inference_id, False))
    budget_last = limit - serialized_size(echo_text("", conversation_id, inference_id, done))
    if budget_last < 0:
        raise MessageTooLarge(f"the echo envelope alone is over the {limit}-byte limit "
                              f"({max_bytes} minus {ENVELOPE_HEADROOM_BYTES} headroom)")
    pieces = _split(text, budget, budget_last) or [""]  # whitespace only: nothing to say
    messages = [echo_text(piece, conversation_id, inference_id, done if i == len(pieces) - 1 else False)
                for i, piece in enumerate(pieces)]
    largest = max(serialized_size(m) for m in messages)
    if largest > limit:  # cannot happen if the arithmetic above is right; never send an oversized message anyway
        raise MessageTooLarge(f"split produced a {largest}-byte message over the {limit}-byte limit")
    return messages


def _escaped_size(s: str) -> int:
    """UTF-8 bytes of `s` inside a JSON string (quotes, backslashes and control characters are escaped)."""
    return len(json.dumps(s, ensure_ascii=False).encode("utf-8")) - 2


def _split(text: str, budget: int, budget_last: int) -> list[str]:
    """Cut `text` into pieces of at most `budget` escaped bytes (`budget_last` for the last one)."""
    clusters: list[str] = _GRAPHEME.findall(text)
    n = len(clusters)
    sizes: dict[str, int] = {}
    prefix = [0]  # prefix[k]: escaped bytes of clusters[:k]
    for c in clusters:
        if c not in sizes:
            sizes[c] = _escaped_size(c)
        prefix.append(prefix[-1] + sizes[c])
    # `blank`: whitespace, dropped at the ends of a piece; `space`: whitespace a cut may be made at (no-break
    # spaces are blank but join words: a grapheme cut falling before one still drops it, never a piece of it alone).
    blank = [c.isspace() for c in clusters]
    space = [b and not any(ch in _NO_BREAK_SPACES for ch in c) for b, c in zip(blank, clusters, strict=True)]
    spaces = [k for k in range(n) if space[k]]  # a cut before a whitespace cluster drops the whitespace
    sentence_cuts = _sentence_cuts(clusters)
    content_end = n
    while content_end and blank[content_end - 1]:
        content_end -= 1

    pieces: list[str] = []
    i = 0
    while True:
        while i < content_end and blank[i]:
            i += 1
        if i >= content_end:
            return pieces
        if prefix[content_end] - prefix[i] <= budget_last:
            pieces.append("".join(clusters[i:content_end]))
            return pieces
        j = bisect_right(prefix, prefix[i] + budget) - 1  # clusters[i:j] is the longest prefix that fits
        if j <= i:
            raise MessageTooLarge(f"the grapheme {clusters[i]!r} ({sizes[clusters[i]]} bytes escaped) does not "
                                  f"fit the {budget} bytes left for text in one message")
        cut = _last_in(sentence_cuts, i, j) or _last_in(spaces, i, j) or _grapheme_cut(clusters, i, j)
        end = cut
        while blank[end - 1]:  # the run of whitespace before a word cut
            end -= 1
        pieces.append("".join(clusters[i:end]))
        i = cut


def _grapheme_cut(clusters: list[str], i: int, j: int) -> int:
    """The last cut in (i, j] between graphemes that splits no conjunct (j itself when every one would)."""
    cut = j
    while cut > i + 1 and _joined_to_next(clusters, cut):
        cut -= 1
    return cut if not _joined_to_next(clusters, cut) else j


def _last_in(sorted_cuts: list[int], lo: int, hi: int) -> int | None:
    """The largest cut in (lo, hi], if any."""
    k = bisect_right(sorted_cuts, hi) - 1
    return sorted_cuts[k] if k >= 0 and sorted_cuts[k] > lo else None


def _sentence_cuts(clusters: list[str]) -> list[int]:
    """Cluster indices e such that a sentence ends just before clusters[e] (pipeline.text.sentence_end_offsets:
    Latin marks need whitespace after them, other scripts' marks end a sentence wherever they stand, so CJK
    text without spaces is cut after its 。！？)."""
    text = "".join(clusters)
    ends = set(sentence_end_offsets(text))
    cuts, offset = [], 0
    for e, c in enumerate(clusters):
        if e and offset in ends:
            cuts.append(e)
        offset += len(c)
    return cuts


def _joined_to_next(clusters: list[str], k: int) -> bool:
    """True when a cut before clusters[k] would split a conjunct the grapheme rules leave open: a virama
    (combining class 9) closing clusters[k - 1] and a letter opening clusters[k]. Unicode's conjunct rule
    (GB9c) joins such pairs in Devanagari, Bengali, Gujarati, Oriya, Telugu and Malayalam only; Tamil "க்ஷ" or
    Kannada "ಕ್ಷ" would still be cut."""
    return (unicodedata.combining(clusters[k - 1][-1]) == VIRAMA_CLASS
            and unicodedata.category(clusters[k][0]).startswith("L"))


def audio_echoes(pcm: Pcm, sample_rate: int, conversation_id: str | None, inference_id: str | None = None,
                 done: bool = True, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 chunk_s: float = 0.1) -> list[dict[str, Any]]:
    """Cut int16 mono PCM at `sample_rate` into audio echo messages of at most `max_bytes - ENVELOPE_HEADROOM_BYTES`.

    All chunks share one inference_id and carry done=false. With done=True a final chunk of silence
    (CLOSING_SILENCE_S) carries done=true, as pipecat does for Tavus; with done=False it is left out, so a
    caller streaming one utterance in several calls closes it itself.
    """
    inference_id = inference_id or new_inference_id()
    limit = max_bytes - ENVELOPE_HEADROOM_BYTES
    overhead = serialized_size(echo_audio_chunk(b"", sample_rate, conversation_id, inference_id, False))
    budget_b64 = limit - overhead
    # base64 makes 4 characters of every 3 bytes; samples are 2 bytes, keep whole samples and whole
    # base64 quanta (6 bytes = 3 samples) so no chunk carries padding in the middle of the stream.
    max_bytes_raw = (budget_b64 // 4) * 3
    max_samples = (max_bytes_raw // 6) * 3
    if max_samples <= 0:
        raise MessageTooLarge(f"no audio fits a {max_bytes}-byte message ({ENVELOPE_HEADROOM_BYTES} bytes headroom)")
    samples = min(max_samples, max(1, int(sample_rate * chunk_s)))
    data = np.ascontiguousarray(pcm, dtype="<i2")
    messages = [
        echo_audio_chunk(data[i:i + samples].tobytes(), sample_rate, conversation_id, inference_id, False)
        for i in range(0, len(data), samples)
    ]
    if done:
        silence = np.zeros(min(samples, max(1, int(sample_rate * CLOSING_SILENCE_S))), dtype="<i2")
        messages.append(echo_audio_chunk(silence.tobytes(), sample_rate, conversation_id, inference_id, True))
    return messages


def normalize_done(value: Any) -> bool:
    """Tavus's quickstart sends done as "true"/"false" strings; the schema says boolean."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"done must be a boolean or 'true'/'false', got {value!r}")
