"""Sink interface: send one outgoing protocol message (echo / interrupt) to where it goes.

The relay owns the queue and the order (`pipeline.delivery`); a sink sends the one message it is
given, retrying it while its destination can take it, and raises SinkError(reason) when it gives up.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.daily_room import RoomState


class SinkError(Exception):
    """A message could not be delivered (the sink gave up). Message is user-facing."""


class SinkOutputError(SinkError):
    """The sink's local output (a file, stdout) cannot be written: an operator's output problem, not a
    refusal by Tavus/Daily. Raised by start() it exits with pipeline.app.EXIT_OUTPUT."""


@dataclass(slots=True)
class Outgoing:
    """One message for the room plus the record fields of the jsonl sink (README "JSONL output")."""

    event: Literal["echo", "interrupt"]
    message: dict[str, Any]
    utterance_id: str = ""
    audio_start_s: float = 0.0
    audio_end_s: float = 0.0
    asr_text: str = ""
    text: str = ""
    seq: int = 0  # assigned by the relay's delivery, increasing per run
    emitted_at_s: float = 0.0  # stream clock when handed to the sink (set by the relay's delivery)
    latency_s: float | None = None  # end of speech -> handed to the sink, when that is a latency (paced source)
    perception: dict[str, Any] | None = None  # analyzer results by name; None when no analyzer is configured
    language: str | None = None  # of the text (the conversation's; English under asr.task translate)
    language_probability: float | None = None  # the detector's; None when the language is fixed

    def record(self) -> dict[str, Any]:
        record = {"event": self.event, "seq": self.seq, "utterance_id": self.utterance_id,
                  "audio_start_s": round(self.audio_start_s, 3), "audio_end_s": round(self.audio_end_s, 3),
                  "emitted_at_s": round(self.emitted_at_s, 3), "asr_text": self.asr_text, "text": self.text,
                  "language": self.language, "language_probability": self.language_probability,
                  "message": self.message}
        if self.perception is not None:
            record["perception"] = self.perception
        return record


class Sink(ABC):
    """What the relay reads from a sink: `room`, `conversation_id`, `ended` (set when the conversation
    ended server-side, with `ended_reason`; `ended_with_error` when that end names an error),
    `is_ready()`, `blocked_reason()` and `stats()`."""

    name: str = "sink"

    def __init__(self) -> None:
        self.room = RoomState()
        self.conversation_id: str | None = None
        self.ended = asyncio.Event()
        self.ended_reason: str | None = None
        self.ended_with_error = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open files / join the room. Sending may begin before the room is ready (send() waits)."""

    def is_ready(self) -> bool:
        return True

    def blocked_reason(self) -> str | None:
        """What a send() would be waiting for right now, in words an operator can act on (None when
        nothing blocks it)."""
        return None

    def stats(self) -> dict[str, int]:
        return {}

    def owned_conversation(self) -> str | None:
        """The id of a conversation this sink created and ends on close (None otherwise)."""
        return None

    @abstractmethod
    async def send(self, out: Outgoing) -> None:
        """Send one message. Raises SinkError when it gives up. An interrupt is sent once, at once
        (a late interrupt would cut a later line); it fails when there is nothing to interrupt."""

    async def close(self, drain_timeout_s: float = 10.0) -> None:  # noqa: B027 - optional hook
        """Release everything (the relay has delivered or accounted every message before)."""
