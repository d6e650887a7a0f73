"""Tavus Interactions Protocol messages: the one place that builds what is sent to the room.

Facts (see shared/reference/tavus-daily-protocol.md §A):
- envelope: message_type "conversation", event_type, conversation_id; payload under `properties`;
- `conversation.echo` text: modality "text", text, inference_id, done (JSON boolean);
- `conversation.echo` audio: raw s16le mono PCM, base64, sample_rate, one inference_id per
  utterance, done=false on every chunk and a short silent closing chunk with done=true;
- `conversation.interrupt`: the envelope only;
- Daily documents 4096 bytes per app-message: every serialized message is kept under a limit.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from typing import Any

import numpy as np

from pipeline.frames import Pcm

MESSAGE_TYPE = "conversation"
ECHO = "conversation.echo"
INTERRUPT = "conversation.interrupt"

DEFAULT_MAX_MESSAGE_BYTES = 4096  # Daily's documented app-message limit
DEFAULT_AUDIO_SAMPLE_RATE = 24_000  # Tavus recommends 24 kHz for audio echo (16 kHz is its fallback)
CLOSING_SILENCE_S = 0.04  # pipecat closes an audio utterance with 40 ms of silence, done=true

_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


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


def split_text(text: str, conversation_id: str | None, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
               ) -> list[str]:
    """Split `text` into pieces whose echo messages each fit `max_bytes`.

    Splits at sentence boundaries first, then at word boundaries for a sentence that is too long
    on its own, and only then inside a word (a single "word" of thousands of characters).
    """
    overhead = serialized_size(echo_text("", conversation_id, inference_id="0" * 32))

    def fits(piece: str) -> bool:
        return overhead + len(json.dumps(piece, ensure_ascii=False).encode("utf-8")) - 2 <= max_bytes

    if overhead >= max_bytes:
        raise MessageTooLarge(f"the message envelope alone is {overhead} bytes, over the {max_bytes}-byte limit")
    if fits(text):
        return [text]
    pieces: list[str] = []
    for unit_list in (_SENTENCE_END.split(text),):
        current = ""
        for unit in unit_list:
            candidate = f"{current} {unit}".strip() if current else unit
            if fits(candidate):
                current = candidate
                continue
            if current:
                pieces.append(current)
            if fits(unit):
                current = unit
                continue
            # One sentence is too long: fall back to words, then characters.
            current = ""
            for word in unit.split():
                candidate = f"{current} {word}".strip() if current else word
                if fits(candidate):
                    current = candidate
                    continue
                if current:
                    pieces.append(current)
                current = ""
                for ch in word:
                    if fits(current + ch):
                        current += ch
                    else:
                        pieces.append(current)
                        current = ch
        if current:
            pieces.append(current)
    return pieces


def audio_chunks(pcm: Pcm, sample_rate: int, conversation_id: str | None, inference_id: str | None = None,
                 max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, chunk_s: float = 0.1) -> list[dict[str, Any]]:
    """Cut int16 mono PCM at `sample_rate` into audio echo messages under `max_bytes`.

    All chunks share one inference_id and carry done=false; a final chunk of silence
    (CLOSING_SILENCE_S) carries done=true, as pipecat does for Tavus.
    """
    inference_id = inference_id or new_inference_id()
    overhead = serialized_size(echo_audio_chunk(b"", sample_rate, conversation_id, inference_id, False))
    budget_b64 = max_bytes - overhead
    # base64 makes 4 characters of every 3 bytes; samples are 2 bytes, keep whole samples and whole
    # base64 quanta (6 bytes = 3 samples) so no chunk carries padding in the middle of the stream.
    max_bytes_raw = (budget_b64 // 4) * 3
    max_samples = (max_bytes_raw // 6) * 3
    if max_samples <= 0:
        raise MessageTooLarge(f"no audio fits a {max_bytes}-byte message")
    samples = min(max_samples, max(1, int(sample_rate * chunk_s)))
    data = np.ascontiguousarray(pcm, dtype="<i2")
    messages = [
        echo_audio_chunk(data[i:i + samples].tobytes(), sample_rate, conversation_id, inference_id, False)
        for i in range(0, len(data), samples)
    ]
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
