"""Several sinks at once (`sink.also`): one primary sink that the relay delivers to, and secondary sinks
that get a copy of what the primary sent, e.g. the Daily room plus a JSONL record plus the console.

::

    delivery ─ send(out) ─▶ FanoutSink ─▶ primary.send(out) ─▶ (outcome = the ledger's)
                                              │ accepted
                                              ├─▶ queue ─▶ task ─▶ secondary 1 (e.g. jsonl)
                                              └─▶ queue ─▶ task ─▶ secondary 2 (e.g. console)

- Everything the relay reads follows the primary: `room`, `conversation_id`, `ended*`, `is_ready()`,
  `blocked_reason()`, `owned_conversation()` and the outcome of `send()` (SinkError when the primary
  gives up), so the ledger and the exit status are the primary's.
- A secondary gets each message the primary accepted, the same `Outgoing` object (same seq and
  emitted_at_s), so a JSONL record written beside the room is exactly what the room got. Messages the
  primary gave up on are in the log already (delivery logs each with its text).
- A secondary never blocks or fails the primary's delivery: each has a bounded queue and its own task.
  A full queue loses its oldest message; a secondary's send that fails loses that message. Each lost
  message counts in `echo_relay_secondary_failures_total{sink=...}` and in `stats()["secondary"]`;
  each kind of failure (cannot start, send failed, queue full, drain time out) is logged once.
- start(): the primary first (its errors propagate as from a single sink), then the secondaries; one
  that cannot start is logged and disabled for the run (its messages count as failed).
- close(drain_timeout_s): the primary, then the secondaries' queues drain within what is left of the
  drain time (their tasks keep writing while the primary closes), then the secondaries close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.daily_room import RoomState
from pipeline.metrics import Metrics, init_labels
from pipeline.sink.base import Outgoing, Sink, SinkError

log = logging.getLogger(__name__)

SECONDARY_QUEUE_SIZE = 1000  # messages waiting per secondary (an audio message is at most ~4 KB)


@dataclass(eq=False)
class Secondary:
    """One secondary sink, its queue, its task and its counts (`stats()`)."""

    sink: Sink
    label: str  # stats key and metric label: the sink's name, `#2`, `#3` for repeats
    queue: asyncio.Queue[Outgoing]
    task: asyncio.Task[None] | None = None
    disabled: str | None = None  # why it could not start (nothing is handed to it)
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    busy: bool = False  # a send is in progress
    logged: set[str] = field(default_factory=set)  # failure kinds already logged

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped,
                "queued": self.queue.qsize()}


class FanoutSink(Sink):
    """A Sink that delivers to `primary` and copies what it sent to `secondaries` (see the module doc)."""

    def __init__(self, primary: Sink, secondaries: Sequence[Sink], *, metrics: Metrics | None = None,
                 queue_size: int = SECONDARY_QUEUE_SIZE) -> None:
        # Sink.__init__ is not called: room, conversation_id and ended* are the primary's (properties).
        self.primary = primary
        self.name = primary.name  # in the relay's messages ("the daily sink had not finished sending")
        self.metrics = metrics or Metrics()
        self.secondaries: list[Secondary] = []
        seen: dict[str, int] = {}
        for sink in secondaries:
            seen[sink.name] = seen.get(sink.name, 0) + 1
            label = sink.name if seen[sink.name] == 1 else f"{sink.name}#{seen[sink.name]}"
            self.secondaries.append(Secondary(sink, label, asyncio.Queue(maxsize=queue_size)))
        init_labels(self.metrics.secondary_failures, sink=[s.label for s in self.secondaries])
        self._closed = False

    # ---------------------------------------------------------------- what the relay reads: the primary's
    @property
    def room(self) -> RoomState:
        return self.primary.room

    @room.setter
    def room(self, value: RoomState) -> None:
        self.primary.room = value

    @property
    def conversation_id(self) -> str | None:
        return self.primary.conversation_id

    @conversation_id.setter
    def conversation_id(self, value: str | None) -> None:
        self.primary.conversation_id = value

    @property
    def ended(self) -> asyncio.Event:
        return self.primary.ended

    @ended.setter
    def ended(self, value: asyncio.Event) -> None:
        self.primary.ended = value

    @property
    def ended_reason(self) -> str | None:
        return self.primary.ended_reason

    @ended_reason.setter
    def ended_reason(self, value: str | None) -> None:
        self.primary.ended_reason = value

    @property
    def ended_with_error(self) -> bool:
        return self.primary.ended_with_error

    @ended_with_error.setter
    def ended_with_error(self, value: bool) -> None:
        self.primary.ended_with_error = value

    def is_ready(self) -> bool:
        return self.primary.is_ready()

    def blocked_reason(self) -> str | None:
        return self.primary.blocked_reason()

    def owned_conversation(self) -> str | None:
        return self.primary.owned_conversation()

    def stats(self) -> dict[str, Any]:
        return {**self.primary.stats(), "secondary": {s.label: s.stats() for s in self.secondaries}}

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.primary.start()  # its errors end the run as a single sink's do
        for sec in self.secondaries:
            if sec.task is not None or sec.disabled is not None:
                continue
            try:
                await sec.sink.start()
            except Exception as exc:  # whatever it is, the run goes on without it
                sec.disabled = str(exc) or type(exc).__name__
                log.error("secondary sink %s cannot start: %s; it is disabled for this run (the %s sink is "
                          "not affected; each message it misses counts in echo_relay_secondary_failures_total)",
                          sec.label, sec.disabled, self.primary.name)
                continue
            sec.task = asyncio.create_task(self._run(sec), name=f"secondary-sink-{sec.label}")

    async def send(self, out: Outgoing) -> None:
        await self.primary.send(out)  # SinkError (the ledger's outcome) propagates; nothing is copied then
        for sec in self.secondaries:
            self._hand_off(sec, out)

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + drain_timeout_s
        try:
            await self.primary.close(drain_timeout_s)
        finally:
            await self._close_secondaries(deadline, drain_timeout_s)

    # ------------------------------------------------------------------------------ secondaries
    def _hand_off(self, sec: Secondary, out: Outgoing) -> None:
        """Queue `out` for `sec` without waiting: a full queue loses its oldest message (counted)."""
        if sec.disabled is not None or self._closed:
            self._lost(sec, "failed")
            return
        if sec.task is None:  # start() was not called (or the primary's failed): nobody would write it
            self._lost(sec, "failed")
            self._report(sec, "not_started", "the sink was not started; message not written")
            return
        if sec.queue.full():
            sec.queue.get_nowait()
            sec.queue.task_done()
            self._lost(sec, "dropped")
            self._report(sec, "queue_full", f"its queue is full ({sec.queue.maxsize} messages): it cannot keep "
                                            "up; the oldest waiting messages are dropped")
        sec.queue.put_nowait(out)

    async def _run(self, sec: Secondary) -> None:
        """The secondary's task: write its queue in order; a failure loses that message only."""
        while True:
            out = await sec.queue.get()
            sec.busy = True
            try:
                await sec.sink.send(out)
            except asyncio.CancelledError:
                self._lost(sec, "dropped")  # close() gave up on it (drain time out)
                raise
            except SinkError as exc:
                self._lost(sec, "failed")
                self._report(sec, "send", f"a message was not written: {exc}")
            except Exception as exc:  # a broken secondary must never stop the others
                self._lost(sec, "failed")
                self._report(sec, f"error:{type(exc).__name__}", f"a message was not written: {exc!r}")
            else:
                sec.sent += 1
            finally:
                sec.busy = False
                sec.queue.task_done()

    def _lost(self, sec: Secondary, how: str) -> None:
        if how == "dropped":
            sec.dropped += 1
        else:
            sec.failed += 1
        self.metrics.secondary_failures.labels(sink=sec.label).inc()

    def _report(self, sec: Secondary, kind: str, detail: str) -> None:
        """Log a secondary's failure once per kind (the counts are in stats() and the metric)."""
        if kind in sec.logged:
            return
        sec.logged.add(kind)
        log.error("secondary sink %s: %s (the %s sink is not affected; further failures of this kind are "
                  "only counted, in echo_relay_secondary_failures_total)", sec.label, detail, self.primary.name)

    async def _close_secondaries(self, deadline: float, drain_timeout_s: float) -> None:
        running = [s for s in self.secondaries if s.task is not None]
        if running:
            drained = asyncio.gather(*(s.queue.join() for s in running))
            try:
                await asyncio.wait_for(drained, max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                for sec in running:
                    left = sec.queue.qsize() + int(sec.busy)
                    if left:
                        self._report(sec, "drain", f"{left} message(s) not written within the shutdown drain "
                                                   f"time ({drain_timeout_s:g} s)")
            for sec in running:
                assert sec.task is not None
                sec.task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sec.task
                while not sec.queue.empty():  # what the drain time did not cover
                    sec.queue.get_nowait()
                    self._lost(sec, "dropped")
        for sec in self.secondaries:
            try:
                await sec.sink.close(max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # the primary's run is over and fine
                log.error("secondary sink %s: closing failed: %s", sec.label, exc)
            if sec.failed or sec.dropped:
                log.warning("secondary sink %s: %d message(s) written, %d failed, %d dropped", sec.label,
                            sec.sent, sec.failed, sec.dropped)
