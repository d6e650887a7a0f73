"""The Daily sink: send `conversation.echo` / `conversation.interrupt` app-messages to the Tavus
replica in the conversation's Daily room (docs/tavus.md).

The relay owns the queue and the order (`pipeline.delivery`); this sink is about the room only.

Contract of `send(out)`:
- It returns once daily-python accepted the message (the send completion reported no error) and
  raises `SinkError(reason)` when it gives up; the relay accounts the message and logs the reason.
- Echoes wait while the room is not ready (not joined yet, or the replica, recognised by
  `info.userName` == persona name, is not in the room). If it stays not ready for
  `sink.daily.replica_timeout_s` the echo is given up with a reason that names the replica, and later
  echoes fail at once until the replica is there again.
- Send failures (completion error string) are retried with exponential backoff (`retry_initial_s` ..
  `retry_max_s`) until `send_deadline_s` after the first attempt. A network interruption
  (`on_network_connection_status_updated` "interrupted", or the call state leaving `joined`) pauses
  sending until "connected"; the pause counts against the same deadline. A retried message can only
  be duplicated if daily-python reports an error for a send that actually went out (not observed;
  the SDK has no delivery receipts).
- Interrupts are sent once and at once: there is nothing to interrupt without a replica, and a
  retried interrupt would cut a later line. They fail when the room is not ready.
- Messages are sent as given: `pipeline.protocol` sized them and stamped the conversation id.
- The conversation ended server-side (call state `left` without our leave, or a `system.shutdown`
  app-message): sends fail with that reason, `ended` is set and `ended_reason` says why;
  `ended_with_error` is True only for a shutdown reason that names an error (`ERROR_SHUTDOWN_WORDS`):
  max_call_duration, the participant timeouts and a conversation ended from the dashboard or the API
  are normal ends.

Lifecycle (`SinkPhase`): NEW -start()-> OPEN -close()-> CLOSED. The conversation to join comes from
`pipeline.tavus.provision` (given, or created and then ended on close when
`sink.daily.end_conversation_on_exit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

from pipeline.daily_room import (
    InvalidAppMessage,
    RoomConnection,
    RoomError,
    RoomEvent,
    RoomTracker,
    resolve_daily_module,
)
from pipeline.logs import bind_log_context
from pipeline.protocol import ECHO, INTERRUPT
from pipeline.sink.base import Outgoing, Sink, SinkError
from pipeline.tavus.provision import ProvisionError, conversation_language, end_conversation, provision

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

SEND_COMPLETION_GRACE_S = 5.0  # extra wait for a send completion beyond the message's deadline
INTERRUPT_SEND_TIMEOUT_S = 2.0  # an interrupt later than this would stop the wrong line
# Shutdown reasons that mean something went wrong (Tavus's list: exception_encountered_during_
# conversation_startup, bot_could_not_join_meeting_it_was_probably_ended, internal error at step x).
ERROR_SHUTDOWN_WORDS = ("error", "exception", "could_not_join")


class SinkPhase(enum.Enum):
    NEW = "new"  # constructed; start() provisions and joins
    OPEN = "open"  # joined: send() works (waiting for the replica if needed)
    CLOSED = "closed"  # close() ran: sends fail


def describe(message: dict[str, Any]) -> str:
    """A log label for a room message: the text for text echoes, a summary otherwise."""
    event_type = message.get("event_type")
    raw_props = message.get("properties")
    props: dict[str, Any] = raw_props if isinstance(raw_props, dict) else {}
    if event_type == ECHO and props.get("modality") == "text":
        text = str(props.get("text", ""))
        return repr(text if len(text) <= 300 else text[:300] + "…")
    if event_type == ECHO and props.get("modality") == "audio":
        raw = len(str(props.get("audio", ""))) * 3 // 4
        return f"audio echo inference_id={props.get('inference_id')} (~{raw} bytes, done={props.get('done')})"
    if event_type == INTERRUPT:
        return "conversation.interrupt"
    return f"{event_type} message"


def ended_with_error(shutdown_reason: str | None) -> bool:
    """A Tavus shutdown reason that names an error (not a normal end such as max_call_duration).
    A conversation that ended without one (the call state left: ended from the dashboard or the
    API, room deleted) is a normal end."""
    text = (shutdown_reason or "").lower()
    return any(w in text for w in ERROR_SHUTDOWN_WORDS)


class DailySink(Sink):
    name = "daily"

    def __init__(self, settings: Settings, metrics: Metrics,
                 tavus_client_factory: Callable[..., Any] | None = None,
                 daily_module: ModuleType | str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = metrics
        self._tavus_factory = tavus_client_factory
        self._daily_module_spec = daily_module
        self.phase = SinkPhase.NEW
        self.conversation_url: str | None = None
        self.persona_name: str | None = None
        self.created_conversation = False  # we created it (and may end it on close)
        self.delivered = 0  # room messages accepted by daily-python
        self.given_up = 0  # messages given up
        self._conn: RoomConnection | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._subscribers: list[Callable[[RoomEvent], Any]] = []
        self._retrying: str | None = None  # the last send error while a message is being retried
        self._room_released = asyncio.Event()  # close() left and released the room: no completion will come
        # The one language the relay's loaded model writes (AsrEngine.only_language), read at start, after the
        # model loads (Relay.start): Tavus is told it. Wired by pipeline/wiring.py; None: asr settings decide.
        self.model_language: Callable[[], str | None] = lambda: None

    # ------------------------------------------------------------------------------ properties
    @property
    def connection(self) -> RoomConnection | None:
        """The RoomConnection after start() (the Daily source listens in it)."""
        return self._conn

    @property
    def _tracker(self) -> RoomTracker | None:
        """What is known of the room (pipeline/daily_room/tracker.py), once start() created the connection."""
        return self._conn.tracker if self._conn is not None else None

    def stats(self) -> dict[str, int]:
        tracker = self._tracker
        return {"delivered": self.delivered, "given_up": self.given_up,
                "unknown_room_events": tracker.unknown_events if tracker is not None else 0,
                "duplicate_room_events": tracker.duplicate_events if tracker is not None else 0}

    def is_ready(self) -> bool:
        tracker = self._tracker
        return bool(tracker is not None and tracker.ready and tracker.network_ok)

    def owned_conversation(self) -> str | None:
        if self.created_conversation and self.settings.sink.daily.end_conversation_on_exit:
            return self.conversation_id
        return None

    def blocked_reason(self) -> str | None:
        tracker = self._tracker
        if self.phase is SinkPhase.CLOSED:
            return "the Daily sink is closed"
        if self.phase is SinkPhase.NEW or tracker is None:
            return "the Daily room was not joined yet"
        if tracker.ended.is_set():
            return f"the conversation ended ({tracker.ended_reason})"
        now = time.monotonic()
        if not tracker.ready:
            return self._not_ready_reason(now)
        if not tracker.network_ok:
            down = now - (tracker.net_down_since or now)
            return f"the Daily connection has been down for {down:.1f} s"
        if self._retrying:
            return f"sends are failing and being retried (last error: {self._retrying})"
        return None

    def subscribe(self, callback: Callable[[RoomEvent], Any]) -> Callable[[], None]:
        """Receive every RoomEvent (replica started/stopped speaking, utterances, ...) on the loop.
        Works before start(): subscriptions are attached when the room connection exists."""
        self._subscribers.append(callback)
        if self._conn is not None:
            return self._conn.tracker.subscribe(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    # ------------------------------------------------------------------------------ start
    async def start(self) -> None:
        if self.phase is not SinkPhase.NEW:
            return
        sd = self.settings.sink.daily
        try:
            module = resolve_daily_module(self._daily_module_spec, self.settings)
        except RoomError as exc:
            raise SinkError(str(exc)) from None
        try:
            conversation = await provision(self.settings.tavus, replica_name=sd.replica_name,
                                           client_factory=self._tavus_factory,
                                           language=conversation_language(self.settings.tavus, self.settings.asr,
                                                                          self.settings.transform.output_language,
                                                                          self.model_language()))
        except ProvisionError as exc:
            raise SinkError(str(exc)) from None
        self.conversation_id = conversation.conversation_id
        # start() runs in the relay's task before it starts the others: their records carry the id too
        bind_log_context(conversation_id=conversation.conversation_id or None)
        self.conversation_url = conversation.url
        self.persona_name = conversation.persona_name
        self.created_conversation = conversation.created
        conn = RoomConnection(module, user_name=sd.user_name, replica_name=conversation.persona_name,
                              metrics=self.metrics, unsubscribe_media=True, state=self.room)
        self.room.conversation_id = conversation.conversation_id
        self._conn = conn
        tracker = conn.tracker
        tracker.subscribe(self._on_room_event)
        for cb in self._subscribers:
            tracker.subscribe(cb)
        try:
            await conn.join(conversation.url, conversation.meeting_token, timeout_s=sd.join_timeout_s)
        except RoomError as exc:
            await conn.close()
            await self._end_conversation()
            raise SinkError(str(exc)) from None
        self.phase = SinkPhase.OPEN
        self._watcher = asyncio.create_task(self._watch_replica(), name="daily-sink-replica-watch")
        if not tracker.ready:
            log.info("waiting up to %g s for the replica %r to join (sink.daily.replica_timeout_s); "
                     "echoes wait until then", sd.replica_timeout_s, conversation.persona_name)

    async def _end_conversation(self) -> None:
        cid = self.owned_conversation()
        if cid is None:
            return
        if await end_conversation(self.settings.tavus, cid, client_factory=self._tavus_factory):  # logs the outcome
            self.created_conversation = False

    # ------------------------------------------------------------------------------ sending
    async def send(self, out: Outgoing) -> None:
        if not isinstance(out.message, dict):
            self._give_up(f"outgoing message must be a JSON object, got {type(out.message).__name__}")
        refusal = self._refusal(out)
        if refusal is not None:
            self._give_up(refusal)
        conn = self._conn
        assert conn is not None
        if out.event == "interrupt":
            error = await self._send_interrupt(conn, out.message)
        else:
            error = await self._send_echo(conn, out.message)
        if error is not None:
            self._give_up(error)

    def _closed(self) -> bool:
        return self.phase is SinkPhase.CLOSED

    def _give_up(self, reason: str) -> None:
        self.given_up += 1
        raise SinkError(reason)

    def _refusal(self, out: Outgoing) -> str | None:
        """Why a message must fail at once (closed, ended, long-unready room), or None."""
        tracker = self._tracker
        if self.phase is SinkPhase.CLOSED:
            return "the Daily sink is closed"
        if tracker is None:
            return "the Daily sink was not started"
        if self.ended.is_set() or tracker.ended.is_set():
            return f"the conversation ended ({self.ended_reason or tracker.ended_reason})"
        now = time.monotonic()
        if out.event == "interrupt":
            return None if tracker.ready and tracker.network_ok else \
                f"nothing to interrupt: {self.blocked_reason() or 'the room is not ready'}"
        sd = self.settings.sink.daily
        if not tracker.ready and tracker.not_ready_since is not None \
                and now - tracker.not_ready_since >= sd.replica_timeout_s:
            return self._not_ready_reason(now)
        if tracker.ready and not tracker.network_ok and tracker.net_down_since is not None \
                and now - tracker.net_down_since >= sd.send_deadline_s:
            return f"the Daily connection has been down for {now - tracker.net_down_since:.0f} s " \
                   "(sink.daily.send_deadline_s)"
        return None

    def _not_ready_reason(self, now: float) -> str:
        tracker = self._tracker
        assert tracker is not None
        waited = now - (tracker.not_ready_since or now)
        if not tracker.state.joined:
            return f"not joined to the Daily room for {waited:.1f} s"
        return (f"the replica {tracker.replica_name!r} is not in the Daily room (waited {waited:.1f} s of "
                f"sink.daily.replica_timeout_s={self.settings.sink.daily.replica_timeout_s:g}); check that "
                "the conversation is live and the persona's name matches")

    async def _room_send(self, conn: RoomConnection, message: dict[str, Any], timeout_s: float) -> str | None:
        """`conn.send()`, but stop waiting once close() has released the room: a completion daily-python
        has not reported by then may never come (one it reports in time still counts)."""
        sending = asyncio.ensure_future(conn.send(message, timeout_s=timeout_s))
        released = asyncio.ensure_future(self._room_released.wait())
        try:
            await asyncio.wait({sending, released}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            released.cancel()
            completed = sending.done()
            if not completed:
                sending.cancel()
        if not completed:
            return "the Daily sink was closed before daily-python reported the send"
        return sending.result()  # raises InvalidAppMessage

    async def _send_interrupt(self, conn: RoomConnection, message: dict[str, Any]) -> str | None:
        try:
            error = await self._room_send(conn, message, INTERRUPT_SEND_TIMEOUT_S)
        except InvalidAppMessage as exc:
            return str(exc)
        if error is None:
            self.delivered += 1
            return None
        return f"interrupt not sent: {error}"

    async def _send_echo(self, conn: RoomConnection, message: dict[str, Any]) -> str | None:
        """Send one echo: None when delivered, else why it was given up."""
        sd = self.settings.sink.daily
        tracker = conn.tracker
        backoff = sd.retry_initial_s
        attempts = 0
        first_ready_at: float | None = None
        label = describe(message)
        try:
            while True:
                if self.phase is SinkPhase.CLOSED:
                    return "the Daily sink was closed before it could be delivered"
                if tracker.ended.is_set():
                    return f"the conversation ended ({tracker.ended_reason})"
                now = time.monotonic()
                if not tracker.ready:
                    first_ready_at = None
                    since = tracker.not_ready_since if tracker.not_ready_since is not None else now
                    # close() wakes the waiters (tracker.notify()): stop waiting once the sink is closed
                    if not await tracker.wait_until(lambda: tracker.ready or tracker.ended.is_set() or self._closed(),
                                                    since + sd.replica_timeout_s - now):
                        return self._not_ready_reason(time.monotonic())
                    continue
                if first_ready_at is None:
                    first_ready_at = now
                deadline = first_ready_at + sd.send_deadline_s
                if not tracker.network_ok:
                    if not await tracker.wait_until(lambda: tracker.network_ok or not tracker.ready
                                                    or tracker.ended.is_set() or self._closed(), deadline - now):
                        return (f"the Daily connection stayed down past sink.daily.send_deadline_s="
                                f"{sd.send_deadline_s:g} s")
                    continue
                attempts += 1
                try:
                    error = await self._room_send(conn, message, max(0.0, deadline - now) + SEND_COMPLETION_GRACE_S)
                except InvalidAppMessage as exc:
                    return str(exc)
                if error is None:
                    self.delivered += 1
                    if attempts > 1:
                        log.info("delivered after %d attempts: %s", attempts, label)
                    return None
                self._retrying = error
                if tracker.ended.is_set() or self._closed():
                    continue  # the check above says why it stops
                now = time.monotonic()
                if now >= deadline:
                    return (f"send failed {attempts} time(s) over {now - first_ready_at:.1f} s "
                            f"(sink.daily.send_deadline_s={sd.send_deadline_s:g}); last error: {error}")
                self.metrics.send_retries.inc()
                log.warning("send failed (%s); retrying in %.2f s: %s", error, min(backoff, deadline - now), label)
                await tracker.wait_until(lambda: tracker.ended.is_set() or self._closed(), min(backoff, deadline - now))
                backoff = min(backoff * 2, sd.retry_max_s)
        finally:
            self._retrying = None

    # ------------------------------------------------------------------------------ room events
    def _on_room_event(self, event: RoomEvent) -> None:
        if event.kind == "ended" and not self.ended.is_set():
            self.ended_reason = event.detail
            self.ended_with_error = ended_with_error(self._tracker.shutdown_reason if self._tracker else None)
            log.log(logging.ERROR if self.ended_with_error else logging.WARNING,
                    "the conversation ended: %s", event.detail)
            self.ended.set()

    async def _watch_replica(self) -> None:
        """Say clearly when the replica has not shown up, even if nothing is being sent."""
        tracker = self._tracker
        assert tracker is not None
        timeout = self.settings.sink.daily.replica_timeout_s
        while self.phase is SinkPhase.OPEN:
            await tracker.wait_until(lambda: not tracker.ready or tracker.ended.is_set(), None)
            if tracker.ended.is_set():
                return
            since = tracker.not_ready_since or time.monotonic()
            if not await tracker.wait_until(lambda: tracker.ready or tracker.ended.is_set(),
                                         since + timeout - time.monotonic()):
                log.error("%s; echoes fail until it is ready", self._not_ready_reason(time.monotonic()))
                await tracker.wait_until(lambda: tracker.ready or tracker.ended.is_set(), None)

    # ------------------------------------------------------------------------------ close
    async def close(self, drain_timeout_s: float = 10.0) -> None:
        if self.phase is SinkPhase.CLOSED:
            return
        was_open, self.phase = self.phase is SinkPhase.OPEN, SinkPhase.CLOSED
        if self._watcher is not None and not self._watcher.done():
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watcher
        conn = self._conn
        if conn is not None:
            conn.tracker.notify()  # a send waiting for the room re-checks and sees the sink closed
            if was_open:
                await conn.close()
        self._room_released.set()
        await self._end_conversation()
