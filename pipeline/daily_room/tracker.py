"""What this client knows of its Daily room, on the loop: call state, participants, the replica, the network,
Tavus's events; whether the room is ready; the lifecycle; subscribers and waiting.

`RoomTracker` is fed two ways, both on the loop: the SDK's callbacks, handed over by the connection
(pipeline/daily_room/connection.py): `on_app_message`, `on_participant_joined/updated/left`,
`on_call_state_updated`, `on_network_status`, `on_error`; and the connection's own steps: `joined()`, `leaving()`,
`left()`, `closed()`. It never calls the SDK, so it runs without one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.daily_room.events import (
    RoomEvent,
    is_local,
    parse_app_message,
    parse_network_status,
    participant_name,
    room_event_label,
)

log = logging.getLogger("pipeline.daily_room")  # one logger for the room plumbing, whichever part logs

LAST_EVENTS_KEPT = 20
DEDUPE_WINDOW = 1024

Subscriber = Callable[[RoomEvent], "Awaitable[None] | None"]


@dataclass(slots=True)
class RoomState:
    """What we know about the room; shown by /status and given to transforms. Sinks without a room
    (console, jsonl) keep the defaults."""

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


class RoomPhase(enum.Enum):
    """A connection's lifecycle: NEW -join()-> JOINED -leave()-> LEAVING -close()-> CLOSED.

    JOINED lasts through reconnects (the SDK's call state may go back to "joining"); the call state
    "left" while JOINED (not after our leave) means the conversation ended server-side (`ended`)."""

    NEW = "new"
    JOINED = "joined"
    LEAVING = "leaving"
    CLOSED = "closed"


class RoomTracker:
    """The room as this client sees it.

    `state` (RoomState) is updated in place: `joined`, `replica_present`, `replica_speaking`, `network`,
    `last_events`. The replica is the participant whose `info.userName` equals `replica_name`. `ready` = in
    the call (joined once, not left; a reconnect keeps it) and the replica is present. `network_ok` = the call
    state is `joined` and the signalling connection is not reported interrupted. `ended` is set once the
    conversation ended (Tavus shut it down, or the room removed us).
    """

    def __init__(self, *, replica_name: str | None = None, metrics: Any = None,
                 state: RoomState | None = None) -> None:
        self.replica_name = replica_name
        self.metrics = metrics
        self.state = state if state is not None else RoomState()
        self.phase = RoomPhase.NEW
        self.ended = asyncio.Event()
        self.ended_reason: str | None = None
        self.shutdown_reason: str | None = None  # properties.shutdown_reason of a system.shutdown
        self.call_state = "new"
        self.replica_id: str | None = None
        self.speaking_inference_id: str | None = None
        self.participants: dict[str, dict[str, Any]] = {}  # remote participants by id, join order
        self.not_ready_since: float | None = None  # monotonic; None while ready
        self.net_down_since: float | None = None  # monotonic; None while the signalling link is up
        self.last_error: str | None = None
        self.unknown_events = 0
        self.duplicate_events = 0
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._seen: collections.OrderedDict[tuple[str | None, int], None] = collections.OrderedDict()
        self._replica_left_at: float | None = None
        self._connections_down: set[str] = set()

    # ---- queries
    @property
    def ready(self) -> bool:
        """In the call (a reconnect in progress counts as in the call) and the replica is present."""
        in_call = self.phase is RoomPhase.JOINED and self.call_state not in ("leaving", "left")
        return in_call and self.state.replica_present and not self.ended.is_set()

    @property
    def network_ok(self) -> bool:
        return self.call_state == "joined" and self.state.network != "interrupted"

    def is_replica(self, p: Mapping[str, Any] | None) -> bool:
        name = participant_name(p)
        wanted = (self.replica_name or "").strip()
        return bool(wanted) and name is not None and name.strip() == wanted

    def remote_participants(self) -> list[dict[str, Any]]:
        return list(self.participants.values())

    # ---- subscribers and waiting
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(event)` on the loop for every RoomEvent; returns an unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    def notify(self) -> None:
        """Wake everything waiting in `wait_until()` to re-check its condition."""
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait (on the loop) until `predicate()` is true; False when `timeout` passes first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + max(0.0, timeout)
        while not predicate():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return predicate()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append(fut)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, remaining)
        return True

    def set_replica_name(self, name: str | None) -> None:
        """Change the name that identifies the replica and re-check present participants."""
        self.replica_name = name
        self.replica_id = None
        self.state.replica_present = False
        for pid, p in self.participants.items():
            if self.is_replica(p):
                self._set_replica(pid, p)
                break
        self._update_readiness()

    # ---- the connection's steps
    def joined(self, participants: Mapping[str, Any], where: str) -> None:
        """The join completed; `participants` as the SDK lists them (by id, the local one included), `where`
        the room's URL for the log (redacted)."""
        self.call_state = "joined"
        self.phase = RoomPhase.JOINED
        self.state.joined = True
        if self.state.network == "unknown":
            self.state.network = "connected"
        for pid, p in participants.items():
            if isinstance(p, Mapping) and not is_local(str(pid), p):
                self._add_participant(p, announce=False)
        log.info("joined Daily room %s (%d other participant(s))", where, len(self.participants))
        self.not_ready_since = None  # the replica wait counts from the join
        self._update_readiness()
        self._emit(RoomEvent(kind="joined"))

    def leaving(self) -> None:
        self.phase = RoomPhase.LEAVING

    def left(self) -> None:
        self.state.joined = False
        self.call_state = "left"

    def closed(self) -> None:
        """The connection is closed: subscriber tasks still running are cancelled, waiters re-check."""
        self.phase = RoomPhase.CLOSED
        for task in list(self._tasks):
            task.cancel()
        self.notify()

    # ---- the SDK's events (on the loop)
    def on_app_message(self, message: Any, sender: str) -> None:
        event = parse_app_message(message, sender)
        if event.seq is not None:
            key = (event.event_type, event.seq)
            if key in self._seen:
                self.duplicate_events += 1
                log.debug("duplicate app-message %s seq=%s ignored", event.event_type, event.seq)
                return
            self._seen[key] = None
            if len(self._seen) > DEDUPE_WINDOW:
                self._seen.popitem(last=False)
        if self.metrics is not None:
            with contextlib.suppress(Exception):
                self.metrics.room_events.labels(event_type=room_event_label(event.event_type)).inc()
        kind = event.kind
        if kind in ("unknown", "invalid"):
            self.unknown_events += 1
            log.debug("ignored app-message from %s: %s", sender,
                      event.detail or f"unknown event_type {event.event_type!r}")
        elif kind == "replica_started_speaking":
            self.state.replica_speaking = True
            self.speaking_inference_id = event.inference_id
        elif kind == "replica_stopped_speaking":
            self.state.replica_speaking = False
            self.speaking_inference_id = None
        elif kind == "replica_interrupted":
            self.state.replica_speaking = False
        elif kind == "shutdown":
            self.shutdown_reason = event.text
            self._mark_ended(f"Tavus shut the conversation down ({event.text or 'no reason given'})")
        self._remember(event)
        self._emit(event)

    def on_participant_joined(self, p: Mapping[str, Any]) -> None:
        self._add_participant(p, announce=True)
        self._update_readiness()

    def on_participant_updated(self, p: Mapping[str, Any]) -> None:
        pid = p.get("id")
        if not isinstance(pid, str) or is_local(pid, p):
            return
        was_replica = pid == self.replica_id
        self.participants[pid] = dict(p)
        if not was_replica and self.is_replica(p):  # the userName may arrive in an update
            self._set_replica(pid, p)
        self._update_readiness()
        self._emit(RoomEvent(kind="participant_updated", participant=dict(p)))

    def on_participant_left(self, p: Mapping[str, Any], reason: str) -> None:
        pid = p.get("id")
        known = self.participants.pop(pid, None) if isinstance(pid, str) else None
        info = known or dict(p)
        if isinstance(pid, str) and pid == self.replica_id:
            self.replica_id = None
            self.state.replica_present = False
            self.state.replica_speaking = False
            self._replica_left_at = time.monotonic()
            log.warning("the replica %r left the room (%s); messages wait for it to return",
                        participant_name(info), reason)
            self._emit(RoomEvent(kind="replica_left", participant=info, detail=reason))
        else:
            log.info("participant %r left the room (%s)", participant_name(info), reason)
        self._update_readiness()
        self._emit(RoomEvent(kind="participant_left", participant=info, detail=reason))

    def on_call_state_updated(self, state: str) -> None:
        previous, self.call_state = self.call_state, str(state)
        self.state.joined = self.call_state == "joined" and not self.ended.is_set()
        if self.call_state == "joined":
            if self.phase is RoomPhase.JOINED and previous != "joined":
                log.info("call state: joined again")
            elif self.phase is RoomPhase.NEW:
                self.phase = RoomPhase.JOINED
            if not self._connections_down:
                self.net_down_since = None
        elif self.call_state == "joining" and previous == "joined":
            log.warning("call state went back to joining (reconnecting); delivery paused")
            if self.net_down_since is None:
                self.net_down_since = time.monotonic()
        if self.call_state == "left" and self.phase is RoomPhase.JOINED:
            extra = ""
            if self._replica_left_at is not None:
                extra = f"; the replica left {time.monotonic() - self._replica_left_at:.1f} s before"
            self._mark_ended(f"removed from the Daily room (call state left){extra}: "
                             "the conversation was ended or the room deleted")
        self._update_readiness()
        self._emit(RoomEvent(kind="call_state", detail=self.call_state))

    def on_network_status(self, status: Any) -> None:
        connection, event = parse_network_status(status)
        # App-messages and call state ride on the signalling connection: only it pauses delivery.
        if connection is not None and "signal" not in connection.lower():
            log.info("network connection %s: %s", connection, event)
            self._emit(RoomEvent(kind="network", detail=f"{connection}:{event}"))
            return
        key = connection or "signalling"
        if event == "interrupted":
            self._connections_down.add(key)
            if self.net_down_since is None:
                self.net_down_since = time.monotonic()
            self.state.network = "interrupted"
            log.warning("Daily network connection interrupted; delivery paused until it reconnects")
        elif event == "connected":
            self._connections_down.discard(key)
            if not self._connections_down:
                if self.net_down_since is not None:
                    log.info("Daily network connection back after %.1f s",
                             time.monotonic() - self.net_down_since)
                if self.call_state == "joined":
                    self.net_down_since = None
                self.state.network = "connected"
        else:
            log.info("Daily network status: %r", status)
        self.notify()
        self._emit(RoomEvent(kind="network", detail=self.state.network))

    def on_error(self, message: str) -> None:
        self.last_error = str(message)
        log.warning("Daily: %s", message)
        self._emit(RoomEvent(kind="error", detail=str(message)))

    # ---- state helpers
    def _add_participant(self, p: Mapping[str, Any], announce: bool) -> None:
        pid = p.get("id")
        if not isinstance(pid, str) or is_local(pid, p):
            return
        known = pid in self.participants
        self.participants[pid] = dict(p)
        if known:  # seen in an event before the join data was processed
            return
        if self.is_replica(p):
            self._set_replica(pid, p)
        elif announce:
            log.info("participant %r joined the room", participant_name(p))
        self._emit(RoomEvent(kind="participant_joined", participant=dict(p)))

    def _set_replica(self, pid: str, p: Mapping[str, Any]) -> None:
        self.replica_id = pid
        self.state.replica_present = True
        self._replica_left_at = None
        log.info("the replica %r is in the room", participant_name(p))
        self._emit(RoomEvent(kind="replica_joined", participant=dict(p)))

    def _update_readiness(self) -> None:
        if self.ready:
            self.not_ready_since = None
        elif self.not_ready_since is None:
            self.not_ready_since = time.monotonic()
        self.notify()

    def _mark_ended(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.ended_reason = reason
        self.state.joined = False
        self.state.replica_present = False
        self.state.replica_speaking = False
        log.warning("the conversation ended: %s", reason)
        self.ended.set()
        self.notify()
        self._emit(RoomEvent(kind="ended", detail=reason))

    def _remember(self, event: RoomEvent) -> None:
        self.state.last_events.append(event.summary())
        if len(self.state.last_events) > LAST_EVENTS_KEPT:
            del self.state.last_events[:-LAST_EVENTS_KEPT]

    def _emit(self, event: RoomEvent) -> None:
        for cb in list(self._subscribers):
            try:
                result = cb(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
            except Exception:
                log.exception("room event subscriber %r failed on %s", cb, event.kind)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("room event subscriber task failed", exc_info=task.exception())
