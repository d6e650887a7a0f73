"""Contracts of the control API (pipeline/control/server.py) with what it serves.

- `RelayHandle`: one running relay (`run`; implemented by `pipeline.relay.Relay`);
- `RelayPoolHandle`: the relays of `serve` (implemented by `pipeline.serve.RelayPool`), each a `PooledRelay`,
  created from a `RelayRequest`; a request the pool refuses raises `RelayRequestError`.

The server depends on these, never on their implementations, which import them (no import cycle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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


# ------------------------------------------------------------------------------------- serve
class RelayRequestError(Exception):
    """A request the pool refuses: `field` names what is wrong, `status` is the HTTP status."""

    def __init__(self, field: str | None, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message, self.status = field, message, status


class AtCapacity(RelayRequestError):
    def __init__(self, active: int, limit: int) -> None:
        super().__init__(None, f"at capacity: {active} relays running (serve.max_relays = {limit}); "
                               "send this conversation to another instance", status=503)


@dataclass(frozen=True, slots=True)
class RelayRequest:
    """What POST /v1/relays asks for (pipeline/control/models.py `CreateRelayRequest` is its HTTP form)."""

    source: str | None = None  # SPEC as in `run`; None: the configuration's (daily with a Tavus shortcut)
    sink: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # overrides: nested sections or dotted keys
    conversation_url: str | None = None  # Tavus shortcut: join this conversation's room
    persona_id: str | None = None  # Tavus shortcut: create a conversation with this persona


class RelayPhaseView(Protocol):
    """Where a pooled relay is in its lifecycle (`pipeline.serve.RelayPhase`)."""

    @property
    def value(self) -> str:
        """Its name in the API: starting, running, draining, ended, failed."""
        ...

    @property
    def takes_messages(self) -> bool:
        """Whether POST /send_text_message and /interrupt are still served (409 once not)."""
        ...


class PooledRelay(Protocol):
    """One relay of the pool (`pipeline.serve.ManagedRelay`)."""

    @property
    def id(self) -> str: ...

    @property
    def phase(self) -> RelayPhaseView: ...

    @property
    def relay(self) -> RelayHandle: ...

    def describe(self, *, detail: bool = False) -> dict[str, Any]:
        """JSON-able: id, phase, error, created_at, source, sink, conversation_id, ledger, latency; with
        `detail`, also room, ended and the relay's status."""
        ...


class MetricsText(Protocol):
    def render(self) -> bytes:
        """Prometheus text exposition format."""
        ...


class RelayPoolHandle(Protocol):
    """What `serve`'s control API serves: relays created, listed and deleted; readiness and metrics."""

    @property
    def active(self) -> int:
        """Relays starting, running or draining (counted against serve.max_relays)."""
        ...

    @property
    def metrics(self) -> MetricsText: ...

    async def create(self, request: RelayRequest) -> PooledRelay:
        """Build and start a relay. Raises RelayRequestError (4xx) or AtCapacity (503)."""
        ...

    def get(self, relay_id: str) -> PooledRelay:
        """Raises RelayRequestError (404) for an unknown id."""
        ...

    def list(self) -> Sequence[PooledRelay]: ...

    async def delete(self, relay_id: str) -> dict[str, Any]:
        """Stop the relay, wait for its drain, forget it; its final state (as `describe()`)."""
        ...

    def readiness(self) -> dict[str, bool]: ...
