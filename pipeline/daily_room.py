"""Daily room plumbing shared by the Daily sink and the Daily source.

Threading rule (daily-python 0.36 API reference): daily-python runs every completion and event on
its own native thread with the GIL held. Here those callbacks only copy their arguments onto the asyncio loop
with `loop.call_soon_threadsafe`; they never block, never wait, and never call a CallClient method.
Everything else (state, parsing, subscribers) happens on the loop.

- `get_daily_module(name)`: "daily" imports daily-python; a dotted path (e.g.
  "pipeline.testing.fake_daily") imports a stand-in with the same API. `resolve_daily_module()` picks
  the name: explicit argument > env `ECHO_RELAY_DAILY_MODULE` > `settings.sink.daily.module` > "daily".
- `ensure_daily_initialized(module)`: `Daily.init()` exactly once per process and module (a second
  init aborts the real process). `Daily.deinit()` runs at interpreter exit when no client is alive
  (or explicitly via `deinit_daily()`), never in between, so any number of sinks/sources may come and go.
- `RoomConnection`: owns one CallClient. `await join()`, `await send() -> None | error string`,
  `await close()` (reference-counted: leave -> wait for the completion -> release, off the loop).
  Tracks participants (the replica is the participant whose `info.userName` equals the persona name),
  call/network state, parses Tavus app-messages into `RoomEvent`s, updates a `RoomState`, and hands
  every event to subscribers.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import enum
import importlib
import inspect
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

DAILY_MODULE_ENV = "ECHO_RELAY_DAILY_MODULE"
DEFAULT_DAILY_MODULE = "daily"
FAKE_DAILY_MODULE = "pipeline.testing.fake_daily"

# CallClient methods this package calls; tests check their signatures against daily-python.
CALL_CLIENT_METHODS_USED = ("join", "leave", "release", "send_app_message", "participants", "set_user_name",
                            "update_subscription_profiles", "update_subscriptions", "set_audio_renderer",
                            "set_video_renderer")
EVENT_HANDLERS_USED = ("on_app_message", "on_participant_joined", "on_participant_left",
                       "on_participant_updated", "on_call_state_updated", "on_error",
                       "on_network_connection_status_updated")

LAST_EVENTS_KEPT = 20
DEDUPE_WINDOW = 1024


class RoomError(Exception):
    """Joining or using the room failed. The message is user-facing (no secrets)."""


class InvalidAppMessage(RoomError):
    """daily-python refused the message synchronously (not JSON-serializable, bad participant id):
    retrying cannot help."""


# ------------------------------------------------------------------------------ module and init
def get_daily_module(name: str | None = None) -> ModuleType:
    """Import the daily module: "daily" (daily-python) or a dotted path of a stand-in."""
    name = (name or DEFAULT_DAILY_MODULE).strip()
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if name == DEFAULT_DAILY_MODULE:
            raise RoomError("daily-python is not installed (pip install 'daily-python>=0.36,<0.37')") from exc
        raise RoomError(f"cannot import the Daily module {name!r}: {exc}") from exc
    missing = [attr for attr in ("Daily", "CallClient", "EventHandler") if not hasattr(module, attr)]
    if missing:
        raise RoomError(f"module {name!r} is not a daily-python stand-in (missing {', '.join(missing)})")
    return module


def resolve_daily_module(module: ModuleType | str | None = None, settings: Any = None) -> ModuleType:
    """Explicit module/name > env ECHO_RELAY_DAILY_MODULE > settings.sink.daily.module > "daily"."""
    if isinstance(module, ModuleType):
        return module
    name = module or os.environ.get(DAILY_MODULE_ENV) or None
    if name is None and settings is not None:
        daily_settings = getattr(getattr(settings, "sink", None), "daily", None)
        name = getattr(daily_settings, "module", None)
    return get_daily_module(name)


_init_lock = threading.Lock()
_initialized: set[str] = set()
_atexit_registered: set[str] = set()
_live_clients: collections.Counter[str] = collections.Counter()


def ensure_daily_initialized(module: ModuleType) -> None:
    """`Daily.init()` once per process for this module (guarded: a second init aborts the process)."""
    name = module.__name__
    with _init_lock:
        if name in _initialized:
            return
        module.Daily.init()
        _initialized.add(name)
        if name not in _atexit_registered:
            _atexit_registered.add(name)
            atexit.register(_deinit_at_exit, module)
        log.debug("Daily.init() done (%s)", name)


def deinit_daily(module: ModuleType) -> bool:
    """`Daily.deinit()` if initialized and no CallClient of this module is alive. Returns True if done.
    A later `ensure_daily_initialized()` initializes again (allowed after deinit in 0.36)."""
    name = module.__name__
    with _init_lock:
        if name not in _initialized or _live_clients[name] > 0:
            return False
        module.Daily.deinit()
        _initialized.discard(name)
        return True


def _deinit_at_exit(module: ModuleType) -> None:
    try:
        if not deinit_daily(module) and _live_clients[module.__name__] > 0:
            log.debug("Daily.deinit() skipped at exit: %d client(s) still alive",
                      _live_clients[module.__name__])
    except Exception:  # interpreter shutdown: never raise from atexit
        pass


def redact_url(url: str | None) -> str:
    """The room URL without its query string (which may carry a meeting token `?t=`)."""
    if not url:
        return ""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    return urlunsplit((p.scheme, p.netloc, p.path, "", ""))


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


# ------------------------------------------------------------------------------------- events
KNOWN_EVENT_KINDS = {
    "conversation.replica.started_speaking": "replica_started_speaking",
    "conversation.replica.stopped_speaking": "replica_stopped_speaking",
    "conversation.user.started_speaking": "user_started_speaking",
    "conversation.user.stopped_speaking": "user_stopped_speaking",
    "conversation.utterance": "utterance",
    "conversation.utterance.streaming": "utterance_streaming",
    "conversation.replica_interrupted": "replica_interrupted",
    "conversation.tool_call": "tool_call",
    "conversation.perception_tool_call": "perception",
    "conversation.perception_analysis": "perception",
    "system.replica_joined": "replica_joined_message",
    "system.shutdown": "shutdown",
    # Messages other participants send (our own kind of traffic): seen, not acted on.
    "conversation.echo": "echo_seen",
    "conversation.interrupt": "interrupt_seen",
    "conversation.respond": "respond_seen",
}
# The event_type label values of echo_relay_room_events_total: the types above and the unified
# speaking events (their role is in the properties); anything else a peer sends is "other", so a peer
# cannot grow the metric's series.
ROOM_EVENT_TYPES = (*KNOWN_EVENT_KINDS, "conversation.started_speaking", "conversation.stopped_speaking")
OTHER_EVENT = "other"


def room_event_label(event_type: str | None) -> str:
    """The event_type label for an app-message's `event_type`: one of ROOM_EVENT_TYPES or "other"."""
    return event_type if event_type in ROOM_EVENT_TYPES else OTHER_EVENT


@dataclass(slots=True)
class RoomEvent:
    """Something that happened in the room, delivered to subscribers on the event loop.

    kind: replica_started_speaking | replica_stopped_speaking | user_started_speaking |
    user_stopped_speaking | utterance | utterance_streaming | replica_interrupted | tool_call |
    perception | shutdown | replica_joined_message | echo_seen | interrupt_seen | respond_seen |
    unknown | invalid (app-messages), and joined | participant_joined | participant_left |
    participant_updated | replica_joined | replica_left | network | call_state | error | ended (room).
    """

    kind: str
    event_type: str | None = None
    inference_id: str | None = None
    role: str | None = None
    text: str | None = None
    seq: int | None = None
    timestamp: float | None = None
    interrupted: bool | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    message: Any = None
    sender: str | None = None
    participant: dict[str, Any] | None = None
    detail: str | None = None
    received_at: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "at": round(self.received_at, 3)}
        for key in ("event_type", "inference_id", "role", "seq", "interrupted", "detail"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.text is not None:
            out["text"] = self.text[:200]
        return out


def parse_app_message(message: Any, sender: str | None = None) -> RoomEvent:
    """Turn a Tavus app-message (already JSON-decoded) into a RoomEvent; never raises."""
    if not isinstance(message, Mapping):
        return RoomEvent(kind="invalid", message=message, sender=sender,
                         detail=f"app-message is a {type(message).__name__}, not an object")
    event_type = message.get("event_type")
    event_type = event_type if isinstance(event_type, str) else None
    props_raw = message.get("properties")
    props: dict[str, Any] = dict(props_raw) if isinstance(props_raw, Mapping) else {}
    kind = KNOWN_EVENT_KINDS.get(event_type or "", "unknown")
    role = props.get("role") if isinstance(props.get("role"), str) else None
    if event_type in ("conversation.started_speaking", "conversation.stopped_speaking"):
        who = "user" if role == "user" else "replica"  # newer unified form: properties.role
        kind = f"{who}_{event_type.rsplit('.', 1)[1]}"
    if role == "pal":  # Tavus sends PAL turns twice, as "pal" and as legacy "replica" (its Interactions docs)
        role = "replica"
    inference_id = message.get("inference_id") or props.get("inference_id")
    seq = message.get("seq")
    ts = message.get("timestamp")
    interrupted = props.get("interrupted", props.get("is_interrupted"))
    text = props.get("speech", props.get("text"))
    if kind == "shutdown":
        reason = props.get("shutdown_reason") or message.get("shutdown_reason")
        text = str(reason) if reason is not None else None
    return RoomEvent(
        kind=kind, event_type=event_type,
        inference_id=str(inference_id) if inference_id not in (None, "") else None,
        role=role, text=text if isinstance(text, str) else None,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        timestamp=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
        interrupted=bool(interrupted) if isinstance(interrupted, (bool, str)) and interrupted != "" else None,
        properties=props, message=message, sender=sender)


def parse_network_status(status: Any) -> tuple[str | None, str]:
    """`NetworkConnectionStatus` -> (connection name or None, "connected" | "interrupted" | raw).

    The schema is [unconfirmed]; the binary holds the fields `connection`/`event` and the values
    `connected`/`interrupted`. A bare string is accepted too.
    """
    connection: str | None = None
    event: Any = status
    if isinstance(status, Mapping):
        connection = status.get("connection") or status.get("type")
        event = status.get("event") or status.get("state") or status.get("status")
    text = str(event or "").strip().lower()
    if any(word in text for word in ("interrupt", "disconnect", "reconnecting", "lost", "fail")):
        return (str(connection) if connection else None), "interrupted"
    if "connected" in text:
        return (str(connection) if connection else None), "connected"
    return (str(connection) if connection else None), text or "unknown"


def participant_name(p: Mapping[str, Any] | None) -> str | None:
    if not isinstance(p, Mapping):
        return None
    info = p.get("info")
    name = info.get("userName") if isinstance(info, Mapping) else None
    return name if isinstance(name, str) else None


def _is_local(pid: str, p: Mapping[str, Any]) -> bool:
    info = p.get("info")
    return pid == "local" or (isinstance(info, Mapping) and bool(info.get("isLocal")))


# --------------------------------------------------------------------------------- the handler
_handler_classes: dict[str, type] = {}


def _handler_class(module: ModuleType) -> type:
    """An EventHandler subclass of `module.EventHandler` that forwards to a RoomConnection (weakly)."""
    cls = _handler_classes.get(module.__name__)
    if cls is not None:
        return cls

    base: type = module.EventHandler

    class _RoomEventHandler(base):
        # The SDK's EventHandler.__new__ accepts positional arguments only.
        def __init__(self, conn_ref: weakref.ReferenceType[RoomConnection]) -> None:
            super().__init__()
            self._conn_ref = conn_ref

        def _post(self, name: str, *args: Any) -> None:
            conn = self._conn_ref()
            if conn is not None:
                conn._post(name, *args)

        def on_app_message(self, message: Any, sender: str) -> None:
            self._post("_on_app_message", message, sender)

        def on_participant_joined(self, participant: Mapping[str, Any]) -> None:
            self._post("_on_participant_joined", participant)

        def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None:
            self._post("_on_participant_left", participant, reason)

        def on_participant_updated(self, participant: Mapping[str, Any]) -> None:
            self._post("_on_participant_updated", participant)

        def on_call_state_updated(self, state: str) -> None:
            self._post("_on_call_state_updated", state)

        def on_error(self, message: str) -> None:
            self._post("_on_error", message)

        def on_network_connection_status_updated(self, status: Mapping[str, Any]) -> None:
            self._post("_on_network_status", status)

    _handler_classes[module.__name__] = _RoomEventHandler
    return _RoomEventHandler


Subscriber = Callable[[RoomEvent], "Awaitable[None] | None"]


# ----------------------------------------------------------------------------- RoomConnection
class RoomPhase(enum.Enum):
    """A RoomConnection's lifecycle: NEW -join()-> JOINED -leave()-> LEAVING -close()-> CLOSED.

    JOINED lasts through reconnects (the SDK's call state may go back to "joining"); the call state
    "left" while JOINED (not after our leave) means the conversation ended server-side (`ended`)."""

    NEW = "new"
    JOINED = "joined"
    LEAVING = "leaving"
    CLOSED = "closed"


class RoomConnection:
    """One CallClient in one Daily room, driven from the asyncio loop.

    `state` (RoomState) is updated in place: `joined`, `replica_present`, `replica_speaking`,
    `network`, `last_events`. `ready` = in the call (joined once, not left; a reconnect keeps it)
    and the replica is present. `network_ok` = the call state is `joined` and the signalling
    connection is not reported interrupted.
    """

    def __init__(self, daily_module: ModuleType, *, user_name: str = "echo-relay",
                 replica_name: str | None = None, metrics: Any = None,
                 unsubscribe_media: bool = True, state: RoomState | None = None) -> None:
        self.module = daily_module
        self.user_name = user_name
        self.replica_name = replica_name
        self.metrics = metrics
        self.unsubscribe_media = unsubscribe_media
        self.state = state if state is not None else RoomState()
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
        self.url: str | None = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self._seen: collections.OrderedDict[tuple[str | None, int], None] = collections.OrderedDict()
        self._refs = 1
        self._replica_left_at: float | None = None
        self._connections_down: set[str] = set()
        self.phase = RoomPhase.NEW

    # ---- properties
    @property
    def ready(self) -> bool:
        """In the call (a reconnect in progress counts as in the call) and the replica is present."""
        in_call = self.phase is RoomPhase.JOINED and self.call_state not in ("leaving", "left")
        return in_call and self.state.replica_present and not self.ended.is_set()

    @property
    def network_ok(self) -> bool:
        return self.call_state == "joined" and self.state.network != "interrupted"

    @property
    def client(self) -> Any:
        return self._client

    @property
    def closed(self) -> bool:
        return self.phase is RoomPhase.CLOSED

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

    def retain(self) -> RoomConnection:
        """Share this connection (e.g. the Daily source riding on the sink's room); each holder calls
        `close()` once and the last one leaves."""
        self._refs += 1
        return self

    # ---- join / send / leave
    async def join(self, url: str, meeting_token: str | None = None, *, timeout_s: float = 30.0,
                   client_settings: Mapping[str, Any] | None = None) -> None:
        """Create the CallClient and join; raise RoomError on failure or timeout."""
        if self._client is not None:
            raise RoomError("this RoomConnection already joined a room")
        self._loop = asyncio.get_running_loop()
        self.url = url
        self.state.conversation_url = redact_url(url)
        ensure_daily_initialized(self.module)
        self._client = self.module.CallClient(event_handler=_handler_class(self.module)(weakref.ref(self)))
        _live_clients[self.module.__name__] += 1
        client = self._client
        client.set_user_name(self.user_name)
        if self.unsubscribe_media:  # the replica's video and audio are not needed
            client.update_subscription_profiles(
                {"base": {"camera": "unsubscribed", "microphone": "unsubscribed"}},
                completion=self._logging_completion("update_subscription_profiles"))
        fut: asyncio.Future[tuple[Any, Any]] = self._loop.create_future()

        def on_join(data: Any, error: Any) -> None:  # SDK thread: hand over only
            self._resolve_threadsafe(fut, (data, error))

        settings = dict(client_settings) if client_settings else \
            {"inputs": {"camera": False, "microphone": False}}
        log.info("joining Daily room %s as %r", redact_url(url), self.user_name)
        client.join(url, meeting_token=meeting_token, client_settings=settings, completion=on_join)
        try:
            data, error = await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise RoomError(f"joining the Daily room {redact_url(url)} timed out after {timeout_s:g} s "
                            "(sink.daily.join_timeout_s)") from None
        if error:
            raise RoomError(f"could not join the Daily room {redact_url(url)}: {error}")
        self._apply_join(data)

    def _apply_join(self, data: Any) -> None:
        self.call_state = "joined"
        self.phase = RoomPhase.JOINED
        self.state.joined = True
        if self.state.network == "unknown":
            self.state.network = "connected"
        participants = data.get("participants") if isinstance(data, Mapping) else None
        if not isinstance(participants, Mapping):
            try:
                participants = self._client.participants()
            except Exception:
                participants = {}
        for pid, p in participants.items():
            if isinstance(p, Mapping) and not _is_local(str(pid), p):
                self._add_participant(p, announce=False)
        log.info("joined Daily room %s (%d other participant(s))", redact_url(self.url),
                 len(self.participants))
        self.not_ready_since = None  # the replica wait counts from the join
        self._update_readiness()
        self._emit(RoomEvent(kind="joined"))

    async def send(self, message: Any, participant_id: str | None = None, *,
                   timeout_s: float | None = None) -> str | None:
        """Send an app-message (broadcast by default). Returns None when the SDK reports success,
        else its error string. Raises InvalidAppMessage when the SDK refuses the message itself."""
        client = self._client
        loop = self._loop
        if client is None or loop is None or self.phase is RoomPhase.CLOSED:
            return "not connected (the room connection is closed)"
        fut: asyncio.Future[Any] = loop.create_future()

        def on_sent(error: Any) -> None:  # SDK thread: hand over only
            self._resolve_threadsafe(fut, error)

        try:
            client.send_app_message(message, participant_id, completion=on_sent)
        except RuntimeError as exc:  # released
            return f"not connected ({exc})"
        except (ValueError, TypeError) as exc:
            raise InvalidAppMessage(f"daily-python refused the app-message: {exc}") from exc
        except Exception as exc:  # the binding raises plain Exception for e.g. bytes
            raise InvalidAppMessage(f"daily-python refused the app-message: {exc}") from exc
        try:
            error = await asyncio.wait_for(fut, timeout_s) if timeout_s is not None else await fut
        except TimeoutError:
            return f"no send completion within {timeout_s:g} s"
        return None if error is None else str(error)

    def capture_audio(self, participant_id: str, callback: Callable[[str, Any, str], None], *,
                      sample_rate: int = 16000, callback_interval_ms: int = 20) -> None:
        """Subscribe to a participant's microphone and register an audio renderer for it.
        `callback` runs on the SDK thread: it must only hand data to the loop."""
        client = self._client
        if client is None:
            raise RoomError("not joined")
        client.update_subscriptions(
            participant_settings={participant_id: {"media": {"microphone": "subscribed"}}},
            completion=self._logging_completion("update_subscriptions"))
        interval = max(10, round(callback_interval_ms / 10.0) * 10)
        client.set_audio_renderer(participant_id, callback, audio_source="microphone",
                                  sample_rate=sample_rate, callback_interval_ms=interval)

    def capture_video(self, participant_id: str, callback: Callable[[str, Any, str], None], *,
                      color_format: str = "RGBA") -> None:
        """Subscribe to a participant's camera and register a video renderer for it (daily-python 0.36:
        `set_video_renderer(participant_id, callback, video_source, color_format)`; the callback gets
        `(participant_id, VideoFrame, video_source)`). `callback` runs on the SDK thread, for every frame."""
        client = self._client
        if client is None:
            raise RoomError("not joined")
        client.update_subscriptions(
            participant_settings={participant_id: {"media": {"camera": "subscribed"}}},
            completion=self._logging_completion("update_subscriptions"))
        client.set_video_renderer(participant_id, callback, video_source="camera", color_format=color_format)

    async def leave(self, timeout_s: float = 5.0) -> None:
        client = self._client
        if client is None or self._loop is None:
            return
        self.phase = RoomPhase.LEAVING
        fut: asyncio.Future[Any] = self._loop.create_future()

        def on_left(error: Any) -> None:
            self._resolve_threadsafe(fut, error)

        try:
            client.leave(completion=on_left)
            error = await asyncio.wait_for(fut, timeout_s)
            if error:
                log.warning("leaving the Daily room reported: %s", error)
        except TimeoutError:
            log.warning("no leave completion within %g s; releasing anyway", timeout_s)
        except RuntimeError:
            pass
        self.state.joined = False
        self.call_state = "left"

    async def release(self) -> None:
        """Free the CallClient (off the loop: release() blocks until pending SDK work completes)."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await asyncio.to_thread(client.release)
        except RuntimeError:
            pass
        finally:
            _live_clients[self.module.__name__] -= 1

    async def close(self, leave_timeout_s: float = 5.0) -> bool:
        """Drop one reference; the last one leaves, waits for the completion, then releases.
        Returns True when this call actually left the room."""
        self._refs -= 1
        if self._refs > 0 or self.phase is RoomPhase.CLOSED:
            return False
        if self._client is not None:
            await self.leave(leave_timeout_s)
            await self.release()
        self.phase = RoomPhase.CLOSED
        for task in list(self._tasks):
            task.cancel()
        self.notify()
        return True

    # ---- SDK thread -> loop
    def _resolve_threadsafe(self, fut: asyncio.Future[Any], value: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(_set_result, fut, value)

    def _post(self, name: str, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._dispatch, name, args)

    def _logging_completion(self, what: str) -> Callable[[Any], None]:
        def completion(error: Any) -> None:
            if error:
                self._post("_on_error", f"{what}: {error}")
        return completion

    # ---- on the loop
    def _dispatch(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            getattr(self, name)(*args)
        except Exception:
            log.exception("error handling Daily event %s", name)

    def _on_app_message(self, message: Any, sender: str) -> None:
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

    def _on_participant_joined(self, p: Mapping[str, Any]) -> None:
        self._add_participant(p, announce=True)
        self._update_readiness()

    def _on_participant_updated(self, p: Mapping[str, Any]) -> None:
        pid = p.get("id")
        if not isinstance(pid, str) or _is_local(pid, p):
            return
        was_replica = pid == self.replica_id
        self.participants[pid] = dict(p)
        if not was_replica and self.is_replica(p):  # the userName may arrive in an update
            self._set_replica(pid, p)
        self._update_readiness()
        self._emit(RoomEvent(kind="participant_updated", participant=dict(p)))

    def _on_participant_left(self, p: Mapping[str, Any], reason: str) -> None:
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

    def _on_call_state_updated(self, state: str) -> None:
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

    def _on_network_status(self, status: Any) -> None:
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

    def _on_error(self, message: str) -> None:
        self.last_error = str(message)
        log.warning("Daily: %s", message)
        self._emit(RoomEvent(kind="error", detail=str(message)))

    # ---- state helpers
    def _add_participant(self, p: Mapping[str, Any], announce: bool) -> None:
        pid = p.get("id")
        if not isinstance(pid, str) or _is_local(pid, p):
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


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
