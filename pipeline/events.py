"""The relay's event stream: one ordered stream of what it hears, decides and sends.

Stages call `EventBus.emit(kind, **fields)` on the event loop; it never blocks and never raises. Each
subscriber (the live page, the terminal view, a script on GET /events) gets its own bounded buffer:
a subscriber that does not keep up loses its oldest events, counted in `Subscription.dropped` and in
`echo_relay_events_dropped_total`, and the relay is never slowed down.

Kinds and their fields (docs/control-api.md "Event stream" is the reference for scripts):

    speech_started   utterance_id, at_s, prob          an utterance opened (VAD)
    partial          utterance_id, text                interim decode while the person speaks (only
                                                       made while a subscriber asked for them)
    speech_ended     utterance_id, start_s, end_s, reason
    transcript       utterance_id, asr_text, text, language   final text before / after the transform chain
    language         utterance_id, language, probability, previous, reason, text_language
                                                       the conversation's language locked or switched
    echo             utterance_id, outcome, text, latency_s, reason
                     outcome: delivered | dropped | undeliverable
    interrupt        sent, dropped, detail
    unheard          start_s, end_s, seconds, why       speech-like audio that never became an utterance
    uncovered        utterance_id, start_s, end_s,      speech of an utterance its decode left out, after the
                     seconds, why                      second pass (pipeline/asr/coverage.py)
    perception       utterance_id, results, late, failed  analyzer results ({name: dict}) before the echo; late
                                                       ones again when they come (results = just theirs)
    video            results                           video analyzers' results on the latest camera frame
    room             joined, replica_present, replica_speaking, network, conversation_id
    level            dbfs                              input level, about 10 per second
    stats            ledger, queues                    once a second while someone listens

Every event carries `seq` (increasing per run), `kind` and `t` (the stream clock, seconds).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.metrics import Metrics

SUBSCRIBER_BUFFER = 512  # events held per subscriber before its oldest are dropped (~50 s of levels)
MAX_SUBSCRIBERS = 16  # a page, a terminal view and a few scripts; more are refused


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    kind: str
    t: float
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "t": round(self.t, 3), **self.data}

    def json(self) -> str:
        return json.dumps(self.as_dict(), ensure_ascii=False, default=_jsonable, allow_nan=False)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


class TooManySubscribers(Exception):
    """MAX_SUBSCRIBERS are already listening."""


class Subscription:
    """One consumer's bounded buffer. Iterate it (async) to receive events; `close()` to stop."""

    def __init__(self, bus: EventBus, maxlen: int, partial: bool) -> None:
        self._bus = bus
        self.partial = partial  # this consumer asked for interim decodes (`partial` events)
        self._buffer: deque[Event] = deque(maxlen=maxlen)
        self._wake = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _offer(self, event: Event) -> None:
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
            self._bus.metrics.events_dropped.inc()
        self._buffer.append(event)
        self._wake.set()

    def pending(self) -> list[Event]:
        """Take what is buffered now (without waiting)."""
        events = list(self._buffer)
        self._buffer.clear()
        return events

    async def get(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds (or once closed)."""
        while not self._buffer:
            if self.closed:
                return None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None
        return self._buffer.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while (event := await self.get()) is not None:
            yield event

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._wake.set()
            self._bus._remove(self)


class EventBus:
    def __init__(self, metrics: Metrics, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self._clock = clock
        self._seq = itertools.count(1)
        self._subscribers: list[Subscription] = []

    @property
    def listening(self) -> bool:
        """Someone is subscribed (work done only for watchers can be skipped otherwise)."""
        return bool(self._subscribers)

    @property
    def wants_partial(self) -> bool:
        """A subscriber asked for interim decodes. They share the ASR engine and the CPU with the decodes that
        end an utterance, so they cost latency (measured on jfk.wav: "Ask not!" delivered after 2.0-3.9 s
        instead of 1.2-2.2 s) and are only made for a consumer that asks."""
        return any(sub.partial for sub in self._subscribers)

    def emit(self, kind: str, **data: Any) -> None:
        if not self._subscribers:
            return  # nothing to build: the relay's hot path pays one attribute check
        event = Event(next(self._seq), kind, _finite(self._clock()), {k: _finite(v) for k, v in data.items()})
        for sub in list(self._subscribers):
            sub._offer(event)

    def subscribe(self, maxlen: int = SUBSCRIBER_BUFFER, *, partial: bool = False) -> Subscription:
        """A new consumer; `partial` asks for interim decodes while the person speaks (see wants_partial)."""
        if len(self._subscribers) >= MAX_SUBSCRIBERS:
            raise TooManySubscribers(f"{MAX_SUBSCRIBERS} event-stream subscribers are already connected")
        sub = Subscription(self, maxlen, partial)
        self._subscribers.append(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: such floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
