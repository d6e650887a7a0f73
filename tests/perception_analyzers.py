"""User analyzers and a transform step for tests/test_perception.py, loaded by dotted path
(`tests.perception_analyzers:...`) exactly as a user's own module would be."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import numpy as np

from pipeline.frames import Pcm, UtteranceMeta

SEEN: list[tuple[str, np.ndarray, float, float, float, str]] = []  # id, audio, offset, start, end, asr_text
_lock = threading.Lock()


class Recorder:
    """Keeps a copy of every utterance's audio and returns its sample count and peak."""

    def __init__(self, label: str = "rec") -> None:
        self.label = label

    def __call__(self, audio: Pcm, meta: UtteranceMeta) -> dict[str, Any]:
        with _lock:
            SEEN.append((meta.utterance_id, audio.copy(), meta.audio_offset_s, meta.audio_start_s, meta.audio_end_s,
                         meta.asr_text))
        return {"samples": len(audio), "peak": int(np.abs(audio.astype(np.int32)).max()), "label": self.label}


def slow(audio: Pcm, meta: UtteranceMeta) -> dict[str, Any]:
    time.sleep(3.0)
    return {"slow": True}


async def slowish(audio: Pcm, meta: UtteranceMeta) -> dict[str, Any]:
    await asyncio.sleep(0.4)
    return {"slowish": True}


def boom(audio: Pcm, meta: UtteranceMeta) -> dict[str, Any]:
    raise RuntimeError("analyzer exploded")


def not_a_dict(audio: Pcm, meta: UtteranceMeta) -> Any:
    return [1, 2, 3]


def not_json(audio: Pcm, meta: UtteranceMeta) -> Any:
    return {"value": float("nan")}


def words_seen(audio: Pcm, meta: UtteranceMeta) -> dict[str, Any]:
    return {"asr_text": meta.asr_text}


words_seen.after_asr = True  # type: ignore[attr-defined]


def tag_with_samples(text: str, meta: UtteranceMeta) -> str:
    """A transform step that uses an analyzer's result: prefixes the recorder's sample count."""
    rec = meta.perception.get("recorder")
    return f"[{rec['samples']}] {text}" if rec else text
