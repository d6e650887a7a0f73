"""Contract between the control API and the running relay (implemented by `pipeline.relay.Relay`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pipeline.frames import Pcm

if TYPE_CHECKING:  # importing the package stays cheap (pipeline/control/__init__.py)
    from pipeline.events import EventBus


class QueueFull(Exception):
    """The relay cannot accept more messages right now (maps to HTTP 503)."""


@dataclass(frozen=True, slots=True)
class InterruptOutcome:
    """What POST /interrupt did: whether conversation.interrupt went out, and how many pending echoes
    it dropped (pipeline/delivery.py gives the rule)."""

    sent: bool
    dropped: int
    detail: str


class RelayHandle(Protocol):
    events: EventBus
    """The relay's event stream (pipeline/events.py), served as GET /events and shown by the live page."""

    async def submit_text(self, text: str, *, inference_id: str | None = None, done: bool = True,
                          through_transforms: bool = True) -> list[str]:
        """Queue text for the sink like recognised speech. Returns the inference ids queued (a long
        text may become several messages); [] when a transform dropped it. Raises QueueFull."""
        ...

    async def submit_audio(self, pcm: Pcm, sample_rate: int, *, inference_id: str | None = None,
                           done: bool = True) -> list[str]:
        """Queue int16 mono PCM (any rate; resampled to sink.audio_sample_rate) as audio echo.
        Returns the inference id(s) queued. Raises QueueFull."""
        ...

    async def interrupt(self) -> InterruptOutcome:
        """Send conversation.interrupt at once (not queued), dropping the echoes not yet sent."""
        ...

    def status(self) -> dict[str, Any]:
        """Room state, conversation id, model, queue depths, counters, last utterances (JSON-able)."""
        ...

    def readiness(self) -> dict[str, bool]:
        """{'model_loaded': ..., 'sink_ready': ...}: ready when all are true."""
        ...
