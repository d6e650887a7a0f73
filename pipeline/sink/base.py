"""Sink interface: deliver outgoing protocol messages (echo / interrupt)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Literal


class SinkError(Exception):
    """A message could not be delivered (the sink gave up). Message is user-facing."""


@dataclass(slots=True)
class Outgoing:
    """One message for the room plus the record fields of the jsonl sink (shared/DESIGN.md)."""

    event: Literal["echo", "interrupt"]
    message: dict[str, Any]
    utterance_id: str = ""
    audio_start_s: float = 0.0
    audio_end_s: float = 0.0
    asr_text: str = ""
    text: str = ""
    seq: int = 0  # assigned by the relay, increasing per run
    emitted_at_s: float = 0.0  # stream clock when handed to the sink (set by the relay)

    def record(self) -> dict[str, Any]:
        return {"event": self.event, "seq": self.seq, "utterance_id": self.utterance_id,
                "audio_start_s": round(self.audio_start_s, 3), "audio_end_s": round(self.audio_end_s, 3),
                "emitted_at_s": round(self.emitted_at_s, 3), "asr_text": self.asr_text, "text": self.text,
                "message": self.message}


@dataclass(slots=True)
class RoomState:
    """What the sink knows about the room; shown by /status and given to transforms."""

    joined: bool = False
    replica_present: bool = False
    replica_speaking: bool = False
    conversation_id: str | None = None
    conversation_url: str | None = None
    network: str = "unknown"
    last_events: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"joined": self.joined, "replica_present": self.replica_present,
                "replica_speaking": self.replica_speaking, "conversation_id": self.conversation_id,
                "network": self.network}


class Sink(ABC):
    name: str = "sink"
    conversation_id: str | None = None

    def __init__(self) -> None:
        self.room = RoomState()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open files / join the room. Sending may begin before the room is ready (sinks queue)."""

    def is_ready(self) -> bool:
        return True

    @abstractmethod
    async def send(self, out: Outgoing) -> None:
        """Deliver (or durably queue) one message, in order. Raises SinkError when it gives up."""

    async def close(self, drain_timeout_s: float = 10.0) -> None:  # noqa: B027 - optional hook
        """Deliver what is queued within the deadline, then release everything."""
