"""The Daily sink: deliver `conversation.echo` / `conversation.interrupt` app-messages to the Tavus
replica in the conversation's Daily room (shared/reference §A, §C, §D, §E).

Delivery contract (what the relay relies on)
- `await send(out)` returns once every room message of `out` was accepted by daily-python (the send
  completion reported no error) and raises `SinkError` when the sink gives up on it. So the caller
  knows, per utterance, delivered vs undeliverable. Every give-up is logged (error, with its text)
  and counted in `self.given_up` / `stats()`; the caller that receives the SinkError counts it in
  `metrics.send_failures` (the relay's `_emit` does, once per SinkError), so the sink does not, to
  avoid counting twice. Likewise `echoes_sent` / `interrupts_sent` are counted by the relay when
  `send()` returns; the sink counts `metrics.send_retries` and `metrics.drop("sink", "cancelled")`.
- `await submit(out)` queues without waiting for delivery and returns the delivery future (resolved
  or failed exactly like `send()`), for a caller that wants to pipeline. Cancelling a `send()` (or the
  future) withdraws a message that has not started; a started message finishes its current piece.
- Strict order: one message at a time; a message is sent only after the previous one was delivered or
  given up. Interrupts (Outgoing(event="interrupt")) take their place in the same order: they do not
  overtake queued echoes (a caller doing barge-in should cancel what it no longer wants first).
- Pending queue: at most `sink.daily.pending_max` Outgoing wait in the sink. When it is full,
  `send()`/`submit()` wait for room (FIFO, nothing dropped): back-pressure goes to the relay's own
  bounded queue and its documented full policy.
- Not ready (not joined yet, or the replica, recognised by `info.userName` == persona name, is not in
  the room): messages wait. If the room stays not ready for `sink.daily.replica_timeout_s`, every
  queued message is given up (one error naming the replica and the count, then each text), and new
  messages fail at once until the replica is there again.
- Send failures (completion error string) are retried with exponential backoff
  (`retry_initial_s` .. `retry_max_s`) until `send_deadline_s` after the first attempt. A network
  interruption (`on_network_connection_status_updated` "interrupted", or the call state leaving
  `joined`) pauses delivery until "connected"; the pause counts against the same deadline, and an
  outage longer than it gives up everything queued, then fails fast until the link is back.
  A retried message can only be duplicated if daily-python reports an error for a send that actually
  went out (not observed; the SDK has no delivery receipts).
- Size: every serialized message is <= `sink.max_message_bytes`. An oversize text echo is split at
  sentence (then word) boundaries into consecutive echoes with the same inference_id, done=false on all
  but the last (which keeps the original `done`); an oversize audio echo is re-cut into smaller
  chunks the same way. Anything else oversize is refused (SinkError), never sent.
- `conversation_id` is filled in (ours wins) on every message; `self.conversation_id` is set by
  `start()`. `self.room` is the live `RoomState`.
- Conversation ended server-side (call state `left` without our leave, or a `system.shutdown`
  app-message): everything pending fails with a clear SinkError, `self.ended` (asyncio.Event) is set
  and `self.ended_reason` says why (`ended_with_error` is True only for a shutdown reason that names an
  error); later sends fail at once.
- The room connection is registered as the process's shared Daily room (`daily_room.shared_connection`)
  so a Daily source started after the sink rides on it instead of joining a second time.

Room: `tavus.conversation_url` (+ `conversation_id`, `meeting_token`) is joined as given; otherwise a
conversation is created through the Tavus API (reusing `tavus.persona_id`, or creating an echo persona
named `tavus.persona_name`), and ended on `close()` when `sink.daily.end_conversation_on_exit`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline.daily_room import (
    InvalidAppMessage,
    RoomConnection,
    RoomError,
    RoomEvent,
    redact_url,
    resolve_daily_module,
    share_connection,
)
from pipeline.protocol import (
    ECHO,
    INTERRUPT,
    MessageTooLarge,
    serialized_size,
    split_text,
)
from pipeline.sink.base import Outgoing, Sink, SinkError

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

_WITHDRAWN = "withdrawn by the caller"  # sentinel (compared by identity)
SEND_COMPLETION_GRACE_S = 5.0  # extra wait for a send completion beyond the message's deadline
ERROR_SHUTDOWN_WORDS = ("error", "exception", "could_not_join", "deleted")  # in a shutdown reason
END_CONVERSATION_TIMEOUT_S = 20.0


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


def conversation_id_from_url(url: str) -> str | None:
    """Tavus rooms are https://tavus.daily.co/<conversation_id>."""
    try:
        path = urlsplit(url).path.strip("/")
    except ValueError:
        return None
    return path.rsplit("/", 1)[-1] or None


@dataclass(eq=False)
class _Job:
    """One Outgoing: its room messages (one, or several after a split) and its delivery future."""

    out: Outgoing
    messages: list[dict[str, Any]]
    future: asyncio.Future[None]
    label: str
    enqueued_at: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    started: bool = False
    # A piece is with the SDK, awaiting its completion. A concurrent give-up (the conversation ended,
    # the replica timed out) must not settle this job: the completion may still report it delivered.
    in_flight: bool = False


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
        self.conversation_id: str | None = None
        self.conversation_url: str | None = None
        self.persona_id: str | None = settings.tavus.persona_id
        self.persona_name: str | None = None
        self.created_conversation = False  # we created it (and may end it on close)
        self.ended = asyncio.Event()
        self.ended_reason: str | None = None
        self.ended_with_error = False
        self.delivered = 0  # room messages accepted by daily-python
        self.given_up = 0  # Outgoing given up
        self._conn: RoomConnection | None = None
        self._queue: collections.deque[_Job] = collections.deque()
        self._space_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._drained: list[asyncio.Future[None]] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._started = False
        self._closing = False
        self._closed = False
        self._abort = False
        self._unsubscribe: Callable[[], None] | None = None
        self._subscribers: list[Callable[[RoomEvent], Any]] = []
        self._not_ready_reported: float | None = None

    # ------------------------------------------------------------------------------ properties
    @property
    def connection(self) -> RoomConnection | None:
        """The RoomConnection after start() (the Daily source can share it: `DailySource(room=...)`)."""
        return self._conn

    @property
    def pending(self) -> int:
        return len(self._queue)

    def stats(self) -> dict[str, int]:
        conn = self._conn
        return {"delivered": self.delivered, "given_up": self.given_up, "pending": len(self._queue),
                "unknown_room_events": conn.unknown_events if conn is not None else 0,
                "duplicate_room_events": conn.duplicate_events if conn is not None else 0}

    def is_ready(self) -> bool:
        conn = self._conn
        return bool(conn is not None and conn.ready and conn.network_ok)

    def subscribe(self, callback: Callable[[RoomEvent], Any]) -> Callable[[], None]:
        """Receive every RoomEvent (replica started/stopped speaking, utterances, ...) on the loop.
        Works before start(): subscriptions are attached when the room connection exists."""
        self._subscribers.append(callback)
        if self._conn is not None:
            return self._conn.subscribe(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)
        return unsubscribe

    # ------------------------------------------------------------------------------ start
    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        sd = self.settings.sink.daily
        try:
            module = resolve_daily_module(self._daily_module_spec, self.settings)
        except RoomError as exc:
            raise SinkError(str(exc)) from None
        url, token, conversation_id, persona_name = await self._provision()
        self.conversation_id = conversation_id
        self.conversation_url = url
        self.persona_name = persona_name
        replica_name = getattr(sd, "replica_name", None) or persona_name
        conn = RoomConnection(module, user_name=sd.user_name, replica_name=replica_name, metrics=self.metrics,
                              unsubscribe_media=True, state=self.room)
        self.room.conversation_id = conversation_id
        for job in list(self._queue):  # queued before start(): now the conversation_id is known
            if not job.started and not job.future.done():
                try:
                    job.messages = self._prepare(job.out)
                except SinkError as exc:
                    self._give_up([job], str(exc))
        self._conn = conn
        conn.subscribe(self._on_room_event)
        for cb in self._subscribers:
            conn.subscribe(cb)
        try:
            await conn.join(url, token, timeout_s=sd.join_timeout_s)
        except RoomError as exc:
            await conn.close()
            if self.created_conversation:
                await self._end_conversation()
            raise SinkError(str(exc)) from None
        share_connection(conn)
        self._wake = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="daily-sink-worker")
        self._watcher = asyncio.create_task(self._watch_replica(), name="daily-sink-replica-watch")
        if not conn.ready:
            log.info("waiting up to %g s for the replica %r to join (sink.daily.replica_timeout_s); "
                     "messages are queued until then", sd.replica_timeout_s, replica_name)

    async def _provision(self) -> tuple[str, str | None, str | None, str]:
        """-> (room url, meeting token, conversation id, persona name that identifies the replica)."""
        t = self.settings.tavus
        api_key = t.api_key.get_secret_value() if t.api_key is not None else None
        if t.conversation_url:
            url = t.conversation_url
            conversation_id = t.conversation_id or conversation_id_from_url(url)
            token = t.meeting_token.get_secret_value() if t.meeting_token is not None else None
            persona_name = t.persona_name
            if t.persona_id and api_key and not getattr(self.settings.sink.daily, "replica_name", None):
                try:
                    async with self._tavus_client(api_key) as client:
                        persona = await client.get_persona(t.persona_id)
                    persona_name = str(persona.get("persona_name") or persona_name)
                except Exception as exc:
                    log.warning("could not read persona %s (%s); recognising the replica by "
                                "tavus.persona_name=%r", t.persona_id, _safe_error(exc), persona_name)
            log.info("using the given conversation %s (%s)", conversation_id, redact_url(url))
            return url, token, conversation_id, persona_name
        if not api_key:
            raise SinkError("the daily sink needs tavus.api_key (env TAVUS_API_KEY) to create a "
                            "conversation, or tavus.conversation_url to join an existing one")
        try:
            async with self._tavus_client(api_key) as client:
                if t.persona_id:
                    persona = await client.get_persona(t.persona_id)
                    persona_id = t.persona_id
                    persona_name = str(persona.get("persona_name") or t.persona_name)
                    mode = persona.get("pipeline_mode")
                    if mode is not None and mode != "echo":
                        log.warning("persona %s has pipeline_mode=%r, not 'echo': echoes may be ignored",
                                    persona_id, mode)
                else:
                    persona = await client.create_persona(t.persona_name, pipeline_mode="echo")
                    persona_id = str(persona["persona_id"])
                    persona_name = str(persona.get("persona_name") or t.persona_name)
                    log.info("created echo persona %s named %r (set tavus.persona_id to reuse it)",
                             persona_id, persona_name)
                self.persona_id = persona_id
                properties = {k: getattr(t, k) for k in
                              ("max_call_duration", "participant_left_timeout", "participant_absent_timeout")
                              if getattr(t, k) is not None}
                conversation = await client.create_conversation(
                    persona_id, replica_id=t.replica_id, conversation_name=t.conversation_name,
                    test_mode=True if t.test_mode else None, properties=properties or None)
        except SinkError:
            raise
        except Exception as exc:
            raise SinkError(f"Tavus API: {_safe_error(exc)}") from None
        try:
            conversation_id = str(conversation["conversation_id"])
            url = str(conversation["conversation_url"])
        except (KeyError, TypeError):
            raise SinkError("Tavus API: create conversation answered without "
                            "conversation_id/conversation_url") from None
        self.created_conversation = True
        token = conversation.get("meeting_token")
        log.info("created Tavus conversation %s (%s)", conversation_id, redact_url(url))
        if t.test_mode:
            log.warning("tavus.test_mode is on: the replica does not join, so echoes cannot be delivered")
        return url, (str(token) if token else None), conversation_id, persona_name

    def _tavus_client(self, api_key: str) -> Any:
        t = self.settings.tavus
        factory = self._tavus_factory
        if factory is None:
            from pipeline.tavus.client import TavusClient
            factory = TavusClient
        return factory(t.api_url, api_key, timeout_s=t.timeout_s, retries=t.retries)

    async def _end_conversation(self) -> None:
        t = self.settings.tavus
        if not self.conversation_id or t.api_key is None:
            return
        try:
            async with self._tavus_client(t.api_key.get_secret_value()) as client:
                await asyncio.wait_for(client.end_conversation(self.conversation_id),
                                       END_CONVERSATION_TIMEOUT_S)
            log.info("ended Tavus conversation %s", self.conversation_id)
        except Exception as exc:
            log.warning("could not end Tavus conversation %s: %s (it ends by itself after "
                        "participant_left_timeout)", self.conversation_id, _safe_error(exc))

    # ------------------------------------------------------------------------------ sending
    async def send(self, out: Outgoing) -> None:
        job = await self._enqueue(out)
        try:
            await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.future.cancel()  # withdraws it (see _on_job_done)
            raise

    async def submit(self, out: Outgoing) -> asyncio.Future[None]:
        """Queue `out` (waiting while the pending queue is full) and return its delivery future."""
        job = await self._enqueue(out)
        return job.future

    async def _enqueue(self, out: Outgoing) -> _Job:
        try:
            messages = self._prepare(out)
        except SinkError as exc:  # a message that cannot fit
            self._give_up_unsent(out, str(exc))
            raise
        label = describe(messages[0]) if len(messages) == 1 else \
            f"{describe(messages[0])} (+{len(messages) - 1} more piece(s))"
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        job = _Job(out, messages, future, label)
        future.add_done_callback(lambda fut: self._on_job_done(job, fut))
        refusal = self._refusal()
        if refusal is not None:
            self._give_up([job], refusal)
            raise SinkError(f"{refusal}: {label}")
        # FIFO wait for room in the pending queue (nothing is dropped).
        if len(self._queue) >= self.settings.sink.daily.pending_max or self._space_waiters:
            waiter: asyncio.Future[None] = loop.create_future()
            self._space_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._space_waiters:
                    self._space_waiters.remove(waiter)
                self._wake_space()
                raise
            refusal = self._refusal()
            if refusal is not None:
                self._give_up([job], refusal)
                self._wake_space()
                raise SinkError(f"{refusal}: {label}")
        self._queue.append(job)
        self._set_depth()
        if self._wake is not None:
            self._wake.set()
        return job

    def _refusal(self) -> str | None:
        """Why a new message must fail at once (closed, ended, long-unready room), or None."""
        if self._closing or self._closed:
            return "the Daily sink is closed"
        conn = self._conn
        if self.ended.is_set() or (conn is not None and conn.ended.is_set()):
            return f"the conversation ended ({self.ended_reason or (conn.ended_reason if conn else '')})"
        if conn is None or conn.call_state == "new":
            return None
        sd = self.settings.sink.daily
        now = time.monotonic()
        if not conn.ready and conn.not_ready_since is not None \
                and now - conn.not_ready_since >= sd.replica_timeout_s:
            return self._not_ready_reason(now)
        if conn.ready and not conn.network_ok and conn.net_down_since is not None \
                and now - conn.net_down_since >= sd.send_deadline_s:
            return f"the Daily connection has been down for {now - conn.net_down_since:.0f} s"
        return None

    def _not_ready_reason(self, now: float) -> str:
        conn = self._conn
        assert conn is not None
        waited = now - (conn.not_ready_since or now)
        if not conn.state.joined:
            return f"not joined to the Daily room for {waited:.1f} s"
        return (f"the replica {conn.replica_name!r} is not in the Daily room "
                f"(waited {waited:.1f} s, sink.daily.replica_timeout_s)")

    def _prepare(self, out: Outgoing) -> list[dict[str, Any]]:
        """Copy the message, set conversation_id, and make every piece fit max_message_bytes."""
        if not isinstance(out.message, dict):
            raise SinkError(f"outgoing message must be a JSON object, got {type(out.message).__name__}")
        msg = copy.deepcopy(out.message)
        if self.conversation_id and msg.get("message_type", "conversation") == "conversation":
            msg["conversation_id"] = self.conversation_id
        limit = self.settings.sink.max_message_bytes
        size = serialized_size(msg)
        if size <= limit:
            return [msg]
        props = msg.get("properties") if isinstance(msg.get("properties"), dict) else None
        try:
            if msg.get("event_type") == ECHO and props is not None and props.get("modality") == "text":
                pieces = self._split_text_message(msg, props, limit)
            elif msg.get("event_type") == ECHO and props is not None and props.get("modality") == "audio":
                pieces = self._split_audio_message(msg, props, limit)
            else:
                raise MessageTooLarge(f"{msg.get('event_type')} message of {size} bytes cannot be split")
        except (MessageTooLarge, ValueError) as exc:
            raise SinkError(f"message over sink.max_message_bytes={limit}: {exc}") from None
        log.info("split a %d-byte echo into %d messages under %d bytes", size, len(pieces), limit)
        return pieces

    def _split_text_message(self, msg: dict[str, Any], props: dict[str, Any],
                            limit: int) -> list[dict[str, Any]]:
        text = str(props.get("text", ""))
        done = props.get("done", True)
        budget = limit
        for _ in range(8):  # split_text assumes a standard envelope: shrink the budget until all fit
            pieces = split_text(text, msg.get("conversation_id"), budget)
            out = []
            for i, piece in enumerate(pieces):
                m = copy.deepcopy(msg)
                m["properties"]["text"] = piece
                m["properties"]["done"] = done if i == len(pieces) - 1 else False
                out.append(m)
            excess = max(serialized_size(m) for m in out) - limit
            if excess <= 0:
                return out
            budget -= excess
        raise MessageTooLarge("could not split the text under the limit")

    def _split_audio_message(self, msg: dict[str, Any], props: dict[str, Any],
                             limit: int) -> list[dict[str, Any]]:
        raw = base64.b64decode(str(props.get("audio", "")))
        done = props.get("done", True)
        empty = copy.deepcopy(msg)
        empty["properties"]["audio"] = ""
        empty["properties"]["done"] = False
        overhead = serialized_size(empty)
        per = ((limit - overhead) // 4) * 3 // 6 * 6  # whole base64 quanta of whole samples
        if per <= 0:
            raise MessageTooLarge("no audio fits the limit")
        out = []
        chunks = [raw[i:i + per] for i in range(0, len(raw), per)] or [b""]
        for i, chunk in enumerate(chunks):
            m = copy.deepcopy(msg)
            m["properties"]["audio"] = base64.b64encode(chunk).decode("ascii")
            m["properties"]["done"] = done if i == len(chunks) - 1 else False
            out.append(m)
        if max(serialized_size(m) for m in out) > limit:
            raise MessageTooLarge("could not cut the audio under the limit")
        return out

    # ------------------------------------------------------------------------------ the worker
    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            while not self._queue:
                self._notify_drained()
                self._wake.clear()
                await self._wake.wait()
            job = self._queue[0]
            if job.cancelled:
                self._withdrawn(job, 0)
            elif not job.future.done():
                try:
                    await self._deliver(job)
                except asyncio.CancelledError:
                    self._give_up([job], "the Daily sink was closed while sending")
                    raise
                except Exception as exc:  # a bug must not stall the queue silently
                    log.exception("Daily sink: unexpected error")
                    self._give_up([job], f"unexpected error: {exc}")
            if self._queue and self._queue[0] is job:
                self._queue.popleft()
            self._set_depth()
            self._wake_space()

    def _withdrawn(self, job: _Job, sent: int) -> None:
        self.metrics.drop("sink", "cancelled")
        if sent:
            log.info("withdrawn after %d of %d piece(s): %s", sent, len(job.messages), job.label)
        else:
            log.info("withdrawn before sending: %s", job.label)

    async def _deliver(self, job: _Job) -> None:
        conn = self._conn
        assert conn is not None
        sd = self.settings.sink.daily
        for index, message in enumerate(job.messages):
            error = await self._deliver_one(conn, job, message, sd)
            if error is _WITHDRAWN:
                self._withdrawn(job, index)
                return
            if error is not None or job.future.done():
                self._give_up([job], error or "given up")
                return
        if not job.future.done():
            job.future.set_result(None)

    async def _deliver_one(self, conn: RoomConnection, job: _Job, message: dict[str, Any],
                           sd: Any) -> str | None:
        """Send one room message: None when delivered, `_WITHDRAWN` when the caller cancelled, else
        why it was given up. May give up the whole queue (readiness timeout, long outage)."""
        backoff = sd.retry_initial_s
        attempts = 0
        first_ready_at: float | None = None
        last_error = ""

        def interrupted() -> bool:
            return conn.ended.is_set() or self._abort or job.cancelled

        while True:
            if job.cancelled:
                return _WITHDRAWN
            if self._abort:
                return "the Daily sink was closed before it could be delivered"
            if conn.ended.is_set():
                return f"the conversation ended ({conn.ended_reason})"
            now = time.monotonic()
            if not conn.ready:
                first_ready_at = None
                since = conn.not_ready_since if conn.not_ready_since is not None else now
                ok = await conn.wait_until(lambda: conn.ready or interrupted(),
                                           since + sd.replica_timeout_s - now)
                if not ok:
                    reason = self._not_ready_reason(time.monotonic())
                    self._report_not_ready(reason)
                    return reason
                continue
            if first_ready_at is None:
                first_ready_at = now
            deadline = first_ready_at + sd.send_deadline_s
            if not conn.network_ok:
                ok = await conn.wait_until(lambda: conn.network_ok or not conn.ready or interrupted(),
                                           deadline - now)
                if not ok:
                    reason = (f"the Daily connection stayed down past sink.daily.send_deadline_s="
                              f"{sd.send_deadline_s:g} s")
                    self._give_up_all(reason, headline=True)
                    return reason
                continue
            attempts += 1
            job.started = True
            job.in_flight = True
            try:
                error = await conn.send(message, timeout_s=max(0.0, deadline - now) + SEND_COMPLETION_GRACE_S)
            except InvalidAppMessage as exc:
                return str(exc)
            finally:
                job.in_flight = False
            if error is None:
                self.delivered += 1
                if attempts > 1:
                    log.info("delivered after %d attempts: %s", attempts, job.label)
                return None
            last_error = error
            if interrupted():
                continue  # no retry: the checks above say why it stops
            now = time.monotonic()
            if now >= deadline:
                return (f"send failed {attempts} time(s) over {now - first_ready_at:.1f} s "
                        f"(sink.daily.send_deadline_s={sd.send_deadline_s:g}); last error: {last_error}")
            self.metrics.send_retries.inc()
            log.warning("send failed (%s); retrying in %.2f s: %s", error, min(backoff, deadline - now),
                        job.label)
            await conn.wait_until(interrupted, min(backoff, deadline - now))
            backoff = min(backoff * 2, sd.retry_max_s)

    # ------------------------------------------------------------------------------ give-ups
    def _give_up(self, jobs: list[_Job], reason: str) -> None:
        for job in jobs:
            if job.future.done():
                continue
            self.given_up += 1
            log.error("undeliverable: %s: %s", reason, job.label)
            job.future.set_exception(SinkError(f"{reason}: {job.label}"))

    def _give_up_unsent(self, out: Outgoing, reason: str) -> None:
        self.given_up += 1
        label = describe(out.message) if isinstance(out.message, dict) else repr(out.message)[:200]
        log.error("undeliverable: %s: %s", reason, label)

    def _give_up_all(self, reason: str, headline: bool = False) -> None:
        """Give up every queued message except a piece already with the SDK: its worker settles it
        from the completion (delivered, or given up for the same reason on its next check)."""
        jobs = [j for j in self._queue if not j.future.done() and not j.cancelled and not j.in_flight]
        if headline:
            log.error("%s: %d queued message(s) undeliverable", reason, len(jobs))
        self._give_up(jobs, reason)

    def _report_not_ready(self, reason: str) -> None:
        """The room stayed not ready for replica_timeout_s: one clear error, then every queued message
        is given up (each logged with its text). Reported once per not-ready period."""
        conn = self._conn
        marker = conn.not_ready_since if conn is not None else None
        if marker is None or marker != self._not_ready_reported:
            self._not_ready_reported = marker
            queued = sum(1 for j in self._queue if not j.future.done() and not j.cancelled and not j.in_flight)
            log.error("%s: %d queued message(s) undeliverable; new messages fail until it is ready",
                      reason, queued)
        self._give_up_all(reason)

    # ------------------------------------------------------------------------------ room events
    def _on_room_event(self, event: RoomEvent) -> None:
        if event.kind == "ended":
            self.ended_reason = event.detail
            detail = (event.detail or "").lower()
            self.ended_with_error = any(w in detail for w in ERROR_SHUTDOWN_WORDS)
            if not self.ended.is_set():
                log.error("stopping the Daily sink: %s", event.detail)
                self.ended.set()
            self._give_up_all(f"the conversation ended ({event.detail})", headline=bool(self._queue))
            if self._wake is not None:
                self._wake.set()

    async def _watch_replica(self) -> None:
        """Say clearly when the replica has not shown up, even if nothing is queued yet."""
        conn = self._conn
        assert conn is not None
        timeout = self.settings.sink.daily.replica_timeout_s
        while not self._closed:
            await conn.wait_until(lambda: not conn.ready or conn.ended.is_set() or self._closing, None)
            if conn.ended.is_set() or self._closing:
                return
            since = conn.not_ready_since or time.monotonic()
            ok = await conn.wait_until(lambda: conn.ready or conn.ended.is_set() or self._closing,
                                       since + timeout - time.monotonic())
            if conn.ended.is_set() or self._closing:
                return
            if not ok:
                self._report_not_ready(self._not_ready_reason(time.monotonic()))
                await conn.wait_until(lambda: conn.ready or conn.ended.is_set() or self._closing, None)

    def _on_job_done(self, job: _Job, fut: asyncio.Future[None]) -> None:
        if fut.cancelled():  # the caller withdrew it (cancelled send() or the submit() future)
            job.cancelled = True
            if self._conn is not None:
                self._conn.notify()  # a worker waiting on this job re-checks at once
        else:
            fut.exception()  # failures are logged by the sink: no 'exception never retrieved' warning

    # ------------------------------------------------------------------------------ queue plumbing
    def _wake_space(self) -> None:
        free = self.settings.sink.daily.pending_max - len(self._queue)
        while self._space_waiters and free > 0:
            waiter = self._space_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def _notify_drained(self) -> None:
        waiters, self._drained = self._drained, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    def _set_depth(self) -> None:
        with contextlib.suppress(Exception):
            self.metrics.queue_depth.labels(queue="daily_sink").set(len(self._queue))

    # ------------------------------------------------------------------------------ close
    async def close(self, drain_timeout_s: float = 10.0) -> None:
        if self._closed:
            return
        self._closing = True
        conn = self._conn
        try:
            if self._queue and self._worker is not None and not self._worker.done():
                loop = asyncio.get_running_loop()
                waiter: asyncio.Future[None] = loop.create_future()
                self._drained.append(waiter)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, drain_timeout_s)
            if self._queue:
                self._abort = True
                self._give_up_all(f"not delivered within the shutdown drain time ({drain_timeout_s:g} s)",
                                  headline=True)
            for waiter in self._space_waiters:
                if not waiter.done():
                    waiter.set_result(None)  # they re-check and see the sink closed
            for task in (self._worker, self._watcher):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if conn is not None:
                conn.notify()
                await conn.close()
        finally:
            self._closed = True
            if self.created_conversation and self.settings.sink.daily.end_conversation_on_exit:
                await self._end_conversation()




def _safe_error(exc: BaseException) -> str:
    """An error text for logs that cannot carry the API key (it is never put in messages anyway)."""
    text = str(exc) or type(exc).__name__
    return text[:500]
