"""A stand-in for daily-python 0.36 (`import daily`) that runs without a network.

Install it with `pipeline.daily_room.get_daily_module("pipeline.testing.fake_daily")` (or the env var
`ECHO_RELAY_DAILY_MODULE=pipeline.testing.fake_daily`). Public names and signatures mirror the real
module exactly (`tests/test_daily_fake.py` compares them with the installed `daily`), and the
behaviour follows what the installed daily-python 0.36.0 was observed to do in offline probes (no room):

- `Daily.init()` must run once before any `CallClient`; a second `init()` (or a `CallClient` before
  `init()`) aborts the real process (Rust panic, SIGABRT). Here it raises `DailyAbort`, a
  `BaseException` that `except Exception` does not swallow. `init()` after `deinit()` is allowed.
- Completions and `EventHandler` methods run on another thread (one dispatcher thread per client,
  named `Dummy-N` like the foreign SDK threads Python sees), in order. An exception raised inside one
  goes to `sys.unraisablehook` and is swallowed (and recorded in `callback_errors`).
- Synchronous errors: `send_app_message(None)` -> ValueError, a non-UUID `participant_id` ->
  ValueError, bytes -> Exception, unsupported types -> TypeError, unknown kwargs -> TypeError, any
  method after `release()` -> RuntimeError("this object has already been released"),
  `CallClient(event_handler=<not EventHandler>)` -> TypeError, `EventHandler(kw=...)` -> TypeError.
- A send before the join completes -> completion('AppMessage(Signalling(ChannelNotOpen))') then
  on_error('Error handling sendAppMessage: AppMessage(Signalling(ChannelNotOpen))').
- A malformed URL -> join completion (None, 'Failed to parse url: InvalidUrl(...)') then on_error.
- App messages reach only the participants present when they are sent; never the sender.
- `leave()` when not joined still goes leaving -> left and completes with None.
- Existing participants at join time are in the join data and `participants()`; no
  `on_participant_joined` is emitted for them (only for later joiners).

Scripted rooms (`FakeRoom`) are shared by every client that joins the same URL (query ignored):

    room = FakeRoom.create(url=None, join_delay_s=0.01, meeting_token=None, max_message_bytes=None)
    FakeRoom.set_autocreate(lambda room: room.add_replica("Persona"))  # rooms for unknown URLs
    replica = room.add_replica("Persona", delay_s=0.5, auto_speak_s=None)  # userName = persona name
    room.replica_inbox                 # every app-message a replica received, in order
    room.wait_for_inbox(n, timeout)    # block until n messages arrived
    replica.started_speaking(iid) / stopped_speaking(iid, duration, interrupted) / utterance(text)
    replica.replica_interrupted(iid) / emit(event_type, properties, seq=..) / emit_raw(anything)
    replica.leave() / replica.rejoin(delay_s)          # a rejoin gets a new participant id
    speaker = room.add_speaker("alice", pcm16k_int16, speed=1.0)  # 0 = as fast as possible
    speaker.feed(more_pcm) / speaker.wait_played() / speaker.leave() / speaker.rejoin()
    speaker.show(lambda i: rgba_uint8_hxwx4, fps=10.0)  # its camera: frame i of a synthetic video
    room.drop_network(0.5, send_error=None, call_state_changes=False) / room.restore_network()
    room.fail_sends(n, error="...") / room.clear_send_failures()
    room.completion_delay_s = 0.3      # send completions arrive late (events can overtake them)
    room.end_conversation(shutdown_message=False)  # replica leaves, clients removed (state `left`)
    room.largest_message_bytes / room.messages / room.clients()
    sdk_state()        # {"initialized", "init_calls", "deinit_calls", "live_clients"}
    callback_errors    # exceptions raised inside completions/handlers (tests assert it stays empty)

Scripting from the environment, for a relay running in another process (`echo-relay run --sink daily`
in a subprocess test), where the test cannot call `FakeRoom` itself. Read when a client joins a URL
that has no room and no `set_autocreate` hook is set (`configure_from_env`):

    ECHO_RELAY_FAKE_DAILY_REPLICA=<userName>   create rooms for unknown URLs, with a replica of this
                                               name (the persona name); unset = unknown URLs fail
    ECHO_RELAY_FAKE_DAILY_REPLICA_DELAY_S=<s>  the replica joins s seconds after the room is created
    ECHO_RELAY_FAKE_DAILY_AUTO_SPEAK_S=<s>     it "speaks" every done echo for s seconds
                                               (replica.started_speaking, then stopped_speaking)
    ECHO_RELAY_FAKE_DAILY_DROP=<n>:<s>         the network drops for s seconds once the replicas have
                                               received n messages
    ECHO_RELAY_FAKE_DAILY_LOG=<path>           append one JSON line per room event: {"t": unix time,
                                               "event": "received" | "emitted" | "replica_joined" |
                                               "replica_left" | "network_down" | "network_up",
                                               "room": url, "message": ... (received/emitted)}

Behaviour that is NOT confirmed against a live room (the real strings/ordering are unknown) is marked
[unconfirmed] below; the code under test must not depend on those exact details.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np

__all__ = [
    "AudioData",
    "CallClient",
    "CustomAudioSource",
    "CustomAudioTrack",
    "Daily",
    "DailyAbort",
    "EventHandler",
    "FakeReplica",
    "FakeRoom",
    "FakeSpeaker",
    "LogLevel",
    "NativeVad",
    "VirtualCameraDevice",
    "VirtualMicrophoneDevice",
    "VirtualSpeakerDevice",
    "callback_errors",
    "configure_from_env",
    "sdk_state",
]

log = logging.getLogger(__name__)

CHANNEL_NOT_OPEN = "AppMessage(Signalling(ChannelNotOpen))"
DEFAULT_SEND_FAILURE = "AppMessage(Signalling(SendFailed))"  # [unconfirmed] wording
MESSAGE_TOO_LARGE = "AppMessage(Signalling(MessageTooLarge))"  # [unconfirmed] wording
UNKNOWN_ROOM_DELAY_S = 0.05  # the real SDK takes ~20 s to report an unreachable room
SAMPLE_RATE = 16_000  # speakers' PCM rate

# Scripting a room from the environment (see the module docstring and `configure_from_env`).
ENV_REPLICA = "ECHO_RELAY_FAKE_DAILY_REPLICA"
ENV_REPLICA_DELAY = "ECHO_RELAY_FAKE_DAILY_REPLICA_DELAY_S"
ENV_AUTO_SPEAK = "ECHO_RELAY_FAKE_DAILY_AUTO_SPEAK_S"
ENV_DROP = "ECHO_RELAY_FAKE_DAILY_DROP"
ENV_LOG = "ECHO_RELAY_FAKE_DAILY_LOG"

# Exceptions raised inside completions/handlers (also passed to sys.unraisablehook). Tests assert empty.
callback_errors: list[BaseException] = []


class DailyAbort(BaseException):
    """What the real SDK does by aborting the process (Rust panic + SIGABRT, not catchable)."""


class LogLevel(Enum):
    Off = 0
    Error = 1
    Warn = 2
    Info = 3
    Debug = 4
    Trace = 5


# ------------------------------------------------------------------------------------ dispatching
_thread_ids = itertools.count(1)


class _Dispatcher:
    """One SDK-like thread that runs completions and events in order."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"Dummy-{next(_thread_ids)}", daemon=True)
        self._stopped = False
        self.thread.start()

    def post(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        if fn is None or self._stopped:
            return
        self._q.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException as exc:  # like the SDK: report as unraisable, keep going
                _report_unraisable(exc, fn)

    def flush(self, timeout: float = 5.0) -> None:
        if threading.current_thread() is self.thread or self._stopped:
            return
        done = threading.Event()
        self._q.put((done.set, ()))
        done.wait(timeout)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._q.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(5.0)


def _report_unraisable(exc: BaseException, obj: Any) -> None:
    callback_errors.append(exc)
    args = types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=exc.__traceback__,
                                 err_msg="Exception ignored in a daily callback", object=obj)
    try:
        sys.unraisablehook(args)
    except TypeError:  # CPython's default hook only takes its own struct type
        traceback.print_exception(exc, file=sys.stderr)


def _after(delay_s: float, fn: Callable[[], Any]) -> None:
    if delay_s <= 0:
        fn()
        return
    t = threading.Timer(delay_s, fn)
    t.daemon = True
    t.start()


# ------------------------------------------------------------------------------------------ Daily
class _SdkState:
    lock = threading.RLock()
    initialized = False
    init_calls = 0
    deinit_calls = 0
    live_clients = 0


class Daily:
    """Static SDK entry points. `Daily.init_calls` etc. are exposed for tests."""

    @staticmethod
    def init(worker_threads: int = 2, log_level: LogLevel = LogLevel.Off) -> None:
        with _SdkState.lock:
            _SdkState.init_calls += 1
            if _SdkState.initialized:
                raise DailyAbort("Daily.init() called twice: the real daily-python aborts the process here")
            _SdkState.initialized = True

    @staticmethod
    def deinit() -> None:
        with _SdkState.lock:
            _SdkState.deinit_calls += 1
            _SdkState.initialized = False

    @staticmethod
    def set_log_level(log_level: LogLevel) -> None:
        return None

    @staticmethod
    def create_camera_device(device_name: str, width: int, height: int,
                             color_format: str = "RGBA") -> VirtualCameraDevice:
        _require_init()
        return VirtualCameraDevice(device_name, width, height, color_format)

    @staticmethod
    def create_speaker_device(device_name: str, sample_rate: int = 16000, channels: int = 1,
                              non_blocking: bool = False) -> VirtualSpeakerDevice:
        _require_init()
        return VirtualSpeakerDevice(device_name, sample_rate, channels)

    @staticmethod
    def create_microphone_device(device_name: str, sample_rate: int = 16000, channels: int = 1,
                                 non_blocking: bool = False) -> VirtualMicrophoneDevice:
        _require_init()
        return VirtualMicrophoneDevice(device_name, sample_rate, channels)

    @staticmethod
    def create_native_vad(reset_period_ms: int = 1000, sample_rate: int = 16000,
                          channels: int = 1) -> NativeVad:
        _require_init()
        return NativeVad(reset_period_ms, sample_rate, channels)

    @staticmethod
    def select_speaker_device(device_name: str) -> None:
        return None


def sdk_state() -> dict[str, int | bool]:
    """Test helper (not in the real module): init/deinit calls, whether initialized, live clients."""
    with _SdkState.lock:
        return {"initialized": _SdkState.initialized, "init_calls": _SdkState.init_calls,
                "deinit_calls": _SdkState.deinit_calls, "live_clients": _SdkState.live_clients}


def _require_init() -> None:
    if not _SdkState.initialized:
        raise DailyAbort("daily object used before Daily.init(): the real daily-python aborts the "
                         "process here")


class VirtualCameraDevice:
    def __init__(self, name: str, width: int, height: int, color_format: str) -> None:
        self.name, self.width, self.height, self.color_format = name, width, height, color_format

    def write_frame(self, frame: bytes) -> None:
        return None


class VirtualMicrophoneDevice:
    def __init__(self, name: str, sample_rate: int, channels: int) -> None:
        self.name, self.sample_rate, self.channels = name, sample_rate, channels

    def write_frames(self, frame: bytes, completion: Callable[[int], None] | None = None) -> int:
        n = len(frame) // (2 * self.channels)
        if completion is not None:
            completion(n)
        return n


class VirtualSpeakerDevice:
    def __init__(self, name: str, sample_rate: int, channels: int) -> None:
        self.name, self.sample_rate, self.channels = name, sample_rate, channels

    def read_frames(self, num_frame: int, completion: Callable[[bytes], None] | None = None) -> bytes:
        data = bytes(2 * self.channels * num_frame)
        if completion is not None:
            completion(data)
        return data


class NativeVad:
    def __init__(self, reset_period_ms: int, sample_rate: int, channels: int) -> None:
        self.reset_period_ms, self.sample_rate, self.channels = reset_period_ms, sample_rate, channels

    def analyze_frames(self, frame: bytes) -> float:
        return 0.0


class CustomAudioSource:
    def __init__(self, sample_rate: int, channels: int, auto_silence: bool = True) -> None:
        self.sample_rate, self.channels = sample_rate, channels

    def write_frames(self, frame: bytes, completion: Callable[[int], None] | None = None) -> int:
        n = len(frame) // (2 * self.channels)
        if completion is not None:
            completion(n)
        return n


class CustomAudioTrack:
    def __init__(self, audio_source: CustomAudioSource) -> None:
        self.id = str(uuid.uuid4())


class AudioData:
    """What an audio renderer callback receives: s16le PCM and its format."""

    def __init__(self, audio_frames: bytes, sample_rate: int, num_channels: int = 1) -> None:
        self._frames = audio_frames
        self._rate = sample_rate
        self._channels = num_channels

    @property
    def bits_per_sample(self) -> int:
        return 16

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def num_channels(self) -> int:
        return self._channels

    @property
    def num_audio_frames(self) -> int:
        return len(self._frames) // (2 * self._channels)

    @property
    def audio_frames(self) -> bytes:
        return self._frames


VIDEO_COLOR_FORMATS = ("RGBA", "BGRA", "ARGB", "ABGR")  # the four-channel ColorFormat values the fake renders


class VideoFrame:
    """What a video renderer callback receives: the pixels in the renderer's color format."""

    def __init__(self, buffer: bytes, width: int, height: int, timestamp_us: int, color_format: str) -> None:
        self._buffer, self._width, self._height = buffer, width, height
        self._timestamp_us, self._color_format = timestamp_us, color_format

    @property
    def buffer(self) -> bytes:
        return self._buffer

    @property
    def width(self) -> int:
        return self._width

    @property
    def height(self) -> int:
        return self._height

    @property
    def timestamp_us(self) -> int:
        return self._timestamp_us

    @property
    def color_format(self) -> str:
        return self._color_format


# ----------------------------------------------------------------------------------- EventHandler
class EventHandler:
    """Base class of event handlers; subclass it and override the `on_*` methods you need.

    Like the real binding, construction accepts positional arguments only (`__new__(*args)`).
    """

    def __new__(cls, *args: Any) -> EventHandler:  # keyword arguments -> TypeError, like the SDK
        return super().__new__(cls)

    def __init__(self, *args: Any) -> None:
        pass

    def on_active_speaker_changed(self, participant: Mapping[str, Any]) -> None: ...
    def on_app_message(self, message: Any, sender: str) -> None: ...
    def on_available_devices_updated(self, available_devices: Mapping[str, Any]) -> None: ...
    def on_call_state_updated(self, state: str) -> None: ...
    def on_dialin_connected(self, data: Mapping[str, Any]) -> None: ...
    def on_dialin_error(self, data: Mapping[str, Any]) -> None: ...
    def on_dialin_ready(self, sip_endpoint: str) -> None: ...
    def on_dialin_stopped(self, data: Mapping[str, Any]) -> None: ...
    def on_dialin_warning(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_answered(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_connected(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_error(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_stopped(self, data: Mapping[str, Any]) -> None: ...
    def on_dialout_warning(self, data: Mapping[str, Any]) -> None: ...
    def on_dtmf_event(self, data: Mapping[str, Any]) -> None: ...
    def on_error(self, message: str) -> None: ...
    def on_inputs_updated(self, input_settings: Mapping[str, Any]) -> None: ...
    def on_live_stream_error(self, stream_id: str, message: str) -> None: ...
    def on_live_stream_started(self, status: Mapping[str, Any]) -> None: ...
    def on_live_stream_stopped(self, stream_id: str) -> None: ...
    def on_live_stream_updated(self, update: Mapping[str, Any]) -> None: ...
    def on_live_stream_warning(self, stream_id: str, message: str) -> None: ...
    def on_network_connection_status_updated(self, status: Mapping[str, Any]) -> None: ...
    def on_network_stats_updated(self, stats: Mapping[str, Any]) -> None: ...
    def on_participant_counts_updated(self, counts: Mapping[str, Any]) -> None: ...
    def on_participant_joined(self, participant: Mapping[str, Any]) -> None: ...
    def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None: ...
    def on_participant_updated(self, participant: Mapping[str, Any]) -> None: ...
    def on_publishing_updated(self, publishing_settings: Mapping[str, Any]) -> None: ...
    def on_recording_error(self, stream_id: str, message: str) -> None: ...
    def on_recording_started(self, status: Mapping[str, Any]) -> None: ...
    def on_recording_stopped(self, stream_id: str) -> None: ...
    def on_subscription_profiles_updated(self, subscription_profiles: Mapping[str, Any]) -> None: ...
    def on_subscriptions_updated(self, subscriptions: Mapping[str, Any]) -> None: ...
    def on_transcription_error(self, message: str) -> None: ...
    def on_transcription_message(self, message: Mapping[str, Any]) -> None: ...
    def on_transcription_started(self, status: Mapping[str, Any]) -> None: ...
    def on_transcription_stopped(self, stopped_by: str, stopped_by_error: bool) -> None: ...
    def on_transcription_updated(self, update: Mapping[str, Any]) -> None: ...


# --------------------------------------------------------------------------------- JSON checking
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


def _to_json_value(value: Any) -> Any:
    """Convert like the binding does, raising its synchronous errors (probed on 0.36.0)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        if not _I64_MIN <= value <= _U64_MAX:
            raise Exception("JSON number out of range")
        return value
    if isinstance(value, float):
        return None if (math.isnan(value) or math.isinf(value)) else value
    if isinstance(value, (bytes, bytearray, memoryview)):
        raise Exception("invalid type: byte array, expected any valid JSON value")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"unexpected type: '{type(k).__name__}' object is not an instance of 'str'")
            out[k] = _to_json_value(v)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_to_json_value(v) for v in value]
    raise TypeError(f"unsupported type {type(value).__name__}")


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _wire_size(message: Any) -> int:
    return len(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def configure_from_env(room: FakeRoom) -> None:
    """Script a room created for an unknown URL from the ECHO_RELAY_FAKE_DAILY_* variables (module
    docstring). Bad values raise ValueError naming the variable."""
    env = os.environ

    def number(name: str, default: float | None) -> float | None:
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None

    room.event_log = env.get(ENV_LOG) or None
    drop = env.get(ENV_DROP, "").strip()
    if drop:
        n, _, seconds = drop.partition(":")
        try:
            room.drop_after = (int(n), float(seconds))
        except ValueError:
            raise ValueError(f"{ENV_DROP}={drop!r}: expected <messages>:<seconds>") from None
    name = env.get(ENV_REPLICA, "").strip()
    if name:
        room.add_replica(name, delay_s=number(ENV_REPLICA_DELAY, 0.0) or 0.0,
                         auto_speak_s=number(ENV_AUTO_SPEAK, None))


def _room_key(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}".lower()


def _parse_error(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return f'Failed to parse url: InvalidUrl("{url}", InvalidPort)'
    if not parts.scheme:
        return f'Failed to parse url: InvalidUrl("{url}", RelativeUrlWithoutBase)'
    if parts.scheme in ("http", "https") and not parts.netloc:
        return f'Failed to parse url: InvalidUrl("{url}", EmptyHost)'
    return None


# ------------------------------------------------------------------------------------- CallClient
class _Renderer:
    def __init__(self, callback: Callable[..., Any], audio_source: str, sample_rate: int,
                 interval_ms: int) -> None:
        self.callback = callback
        self.audio_source = audio_source
        self.sample_rate = sample_rate
        self.interval_ms = max(10, round(interval_ms / 10.0) * 10)
        self.buffer: list[np.ndarray] = []
        self.buffered = 0


class CallClient:
    """A participant of a (fake) Daily call. Signatures match daily-python 0.36.0."""

    def __init__(self, event_handler: EventHandler | None = None) -> None:
        _require_init()
        if event_handler is not None and not isinstance(event_handler, EventHandler):
            raise TypeError("event_handler should be a subclass of `EventHandler`")
        self._handler = event_handler
        self._lock = threading.RLock()
        self._dispatcher = _Dispatcher()
        self._released = False
        self._id = str(uuid.uuid4())
        self._user_name: str | None = None
        self._joined_at = int(time.time())
        self._call_state = "initialized"
        self._room: FakeRoom | None = None
        self._network_up = True
        self._renderers: dict[tuple[str, str], _Renderer] = {}
        self._video_renderers: dict[tuple[str, str], tuple[Callable[..., Any], str]] = {}
        self._profiles: dict[str, Any] = {"base": {"camera": "subscribed", "microphone": "subscribed"}}
        self._participant_subs: dict[str, Any] = {}
        self._inputs: dict[str, Any] = {"camera": {"isEnabled": False}, "microphone": {"isEnabled": False}}
        self._publishing: dict[str, Any] = {}
        self.sent_count = 0  # test helper: successful sends
        with _SdkState.lock:
            _SdkState.live_clients += 1

    # ---- helpers
    def _check(self) -> None:
        if self._released:
            raise RuntimeError("this object has already been released")

    def _event(self, name: str, *args: Any) -> None:
        handler = self._handler
        if handler is None:
            return
        self._dispatcher.post(getattr(handler, name), *args)

    def _complete(self, completion: Callable[..., Any] | None, *args: Any) -> None:
        self._dispatcher.post(completion, *args)

    def _set_state(self, state: str) -> None:
        self._call_state = state
        self._event("on_call_state_updated", state)

    def _local_participant(self) -> dict[str, Any]:
        info: dict[str, Any] = {"isLocal": True, "isOwner": False, "joinedAt": self._joined_at}
        if self._user_name is not None:
            info["userName"] = self._user_name
        return {"id": self._id, "info": info, "media": _media(False)}

    def _remote_view(self) -> dict[str, Any]:
        p = self._local_participant()
        p["info"]["isLocal"] = False
        return p

    def _subscribed_to(self, participant_id: str, media: str = "microphone") -> bool:
        per = self._participant_subs.get(participant_id, {})
        state = per.get("media", {}).get(media) if isinstance(per, Mapping) else None
        if state is None:
            profile = per.get("profile", "base") if isinstance(per, Mapping) else "base"
            state = self._profiles.get(profile, {}).get(media, "subscribed")
        return state == "subscribed"

    # ---- lifecycle
    def release(self) -> None:
        self._check()
        self._released = True
        room = self._room
        if room is not None:
            room._remove_client(self, "leftCall", notify_self=False)
            self._room = None
        self._dispatcher.flush()  # "blocks until earlier async operations complete"
        self._dispatcher.stop()
        with _SdkState.lock:
            _SdkState.live_clients -= 1

    def join(self, meeting_url: str, meeting_token: str | None = None,
             client_settings: Mapping[str, Any] | None = None,
             completion: Callable[[Mapping[str, Any] | None, str | None], None] | None = None) -> None:
        self._check()
        err = _parse_error(meeting_url)
        if err is not None:
            self._complete(completion, None, err)
            self._event("on_error", f"Error handling join: {err}")
            return
        if self._call_state in ("joining", "joined"):  # [unconfirmed] wording
            err = "Join(AlreadyJoined)"
            self._complete(completion, None, err)
            self._event("on_error", f"Error handling join: {err}")
            return
        if client_settings:
            inputs = client_settings.get("inputs")
            if isinstance(inputs, Mapping):
                self._inputs.update(dict(inputs))
        room = FakeRoom.lookup(meeting_url)
        self._set_state("joining")
        delay = UNKNOWN_ROOM_DELAY_S if room is None else room.join_delay_s

        def finish() -> None:
            if self._released:
                return
            failure: str | None = None
            if room is None or room.ended:
                host = urlsplit(meeting_url).netloc
                failure = f'Connection(Api(RoomLookup("{host}")))'  # [unconfirmed] exact text
            elif room.meeting_token is not None and meeting_token != room.meeting_token:
                failure = "Connection(Api(InvalidToken))"  # [unconfirmed] exact text
            if failure is not None:
                self._complete(completion, None, failure)
                self._event("on_error", f"Error handling join: {failure}")
                self._set_state("leaving")
                self._set_state("left")
                return
            assert room is not None
            others = room._add_client(self)
            self._room = room
            self._network_up = True
            self._set_state("joined")
            self._event("on_network_connection_status_updated",
                        {"connection": "signalling", "event": "connected"})
            participants = {"local": self._local_participant()}
            participants.update({p["id"]: p for p in others})
            data = {"meetingSession": {"id": room.session_id}, "participants": participants}
            self._complete(completion, copy.deepcopy(data), None)

        _after(delay, finish)

    def leave(self, completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._set_state("leaving")
        room = self._room
        if room is not None:
            room._remove_client(self, "leftCall", notify_self=False)
            self._room = None
        self._set_state("left")
        self._complete(completion, None)

    # ---- identity / participants
    def set_user_name(self, user_name: str) -> None:
        self._check()
        self._user_name = user_name
        if self._room is not None:
            self._room._participant_updated(self._remote_view(), exclude=self)

    def participants(self) -> Mapping[str, Any]:
        self._check()
        out: dict[str, Any] = {"local": self._local_participant()}
        room = self._room
        if room is not None and self._call_state == "joined":
            for p in room._participants_for(self):
                out[p["id"]] = p
        return copy.deepcopy(out)

    def participant_counts(self) -> Mapping[str, Any]:
        self._check()
        n = len(self.participants())
        return {"present": n, "hidden": 0}

    def active_speaker(self) -> Mapping[str, Any]:
        self._check()
        return {}

    def get_network_stats(self) -> Mapping[str, Any]:
        self._check()
        up = self._network_up
        return {"threshold": "good" if up else "very-low", "quality": 100 if up else 0}

    # ---- inputs / publishing / subscriptions
    def inputs(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self._inputs)

    def update_inputs(self, input_settings: Mapping[str, Any],
                      completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._inputs.update(dict(input_settings))
        self._event("on_inputs_updated", copy.deepcopy(self._inputs))
        self._complete(completion, None)

    def publishing(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self._publishing)

    def update_publishing(self, publishing_settings: Mapping[str, Any],
                          completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._publishing.update(dict(publishing_settings))
        self._event("on_publishing_updated", copy.deepcopy(self._publishing))
        self._complete(completion, None)

    def subscriptions(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self._participant_subs)

    def subscription_profiles(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self._profiles)

    def update_subscriptions(self, participant_settings: Mapping[str, Any] | None = None,
                             profile_settings: Mapping[str, Any] | None = None,
                             completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        with self._lock:
            for pid, s in (participant_settings or {}).items():
                merged = dict(self._participant_subs.get(pid, {}))
                for key, val in dict(s).items():
                    if isinstance(val, Mapping) and isinstance(merged.get(key), Mapping):
                        merged[key] = {**merged[key], **val}
                    else:
                        merged[key] = copy.deepcopy(val)
                self._participant_subs[pid] = merged
            for name, s in (profile_settings or {}).items():
                self._profiles[name] = {**self._profiles.get(name, {}), **dict(s)}
        self._event("on_subscriptions_updated", copy.deepcopy(self._participant_subs))
        self._complete(completion, None)

    def update_subscription_profiles(self, profile_settings: Mapping[str, Any],
                                     completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        with self._lock:
            for name, s in profile_settings.items():
                self._profiles[name] = {**self._profiles.get(name, {}), **dict(s)}
        self._event("on_subscription_profiles_updated", copy.deepcopy(self._profiles))
        self._complete(completion, None)

    # ---- app messages
    def send_app_message(self, message: Any, participant_id: str | None = None,
                         completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        if message is None:
            raise ValueError("invalid app message 'None'")
        if participant_id is not None and not _is_uuid(participant_id):
            raise ValueError(f"invalid participant ID '{participant_id}'")
        value = _to_json_value(message)
        room = self._room
        err: str | None = None
        if room is None or self._call_state != "joined":
            err = CHANNEL_NOT_OPEN
        elif not self._network_up:
            err = room.network_send_error
        else:
            err = room._take_send_failure()
            limit = room.max_message_bytes
            if err is None and limit is not None and _wire_size(value) > limit:
                err = MESSAGE_TOO_LARGE
            if err is None:
                room._broadcast(self, value, participant_id)
                self.sent_count += 1
        if room is not None and room.completion_delay_s > 0:
            _after(room.completion_delay_s, lambda: self._complete(completion, err))
        else:
            self._complete(completion, err)
        if err is not None:
            self._event("on_error", f"Error handling sendAppMessage: {err}")

    def send_prebuilt_chat_message(self, message: str, user_name: str | None = None,
                                   completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._complete(completion, None if self._call_state == "joined" else CHANNEL_NOT_OPEN)

    # ---- audio
    def set_audio_renderer(self, participant_id: str, callback: Callable[[str, AudioData, str], None],
                           audio_source: str = "microphone", sample_rate: int = 16000,
                           callback_interval_ms: int = 20, logging_interval_ms: int = 10000) -> None:
        self._check()
        if not _is_uuid(participant_id):  # the SDK only logs this error
            log.error("setParticipantAudioRenderer: Failed to parse participant ID %r", participant_id)
            return
        with self._lock:
            self._renderers[(participant_id, audio_source)] = _Renderer(
                callback, audio_source, sample_rate, callback_interval_ms)

    def _deliver_audio(self, participant_id: str, pcm16k: np.ndarray) -> None:
        """Called by a speaker thread with 10 ms of 16 kHz audio; buffers to the callback interval."""
        if self._released or not self._network_up or self._call_state != "joined":
            return
        with self._lock:
            r = self._renderers.get((participant_id, "microphone"))
            if r is None or not self._subscribed_to(participant_id, "microphone"):
                return
            if r.sample_rate != SAMPLE_RATE:
                n_out = round(len(pcm16k) * r.sample_rate / SAMPLE_RATE)
                x = np.linspace(0, len(pcm16k) - 1, n_out)
                pcm = np.interp(x, np.arange(len(pcm16k)), pcm16k.astype(np.float64)).astype(np.int16)
            else:
                pcm = pcm16k
            r.buffer.append(pcm)
            r.buffered += len(pcm)
            need = r.sample_rate * r.interval_ms // 1000
            if r.buffered < need:
                return
            data = np.concatenate(r.buffer)
            r.buffer, r.buffered = [], 0
        audio = AudioData(data.astype("<i2").tobytes(), r.sample_rate, 1)
        self._dispatcher.post(r.callback, participant_id, audio, r.audio_source)

    # ---- video
    def set_video_renderer(self, participant_id: str, callback: Callable[[str, VideoFrame, str], None],
                           video_source: str = "camera", color_format: str = "RGBA",
                           logging_interval_ms: int = 10000) -> None:
        self._check()
        if not _is_uuid(participant_id):  # as set_audio_renderer: the SDK only logs it
            log.error("setParticipantVideoRenderer: Failed to parse participant ID %r", participant_id)
            return
        if color_format not in VIDEO_COLOR_FORMATS:
            raise ValueError(f"invalid color format {color_format!r}")
        with self._lock:
            self._video_renderers[(participant_id, video_source)] = (callback, color_format)

    def _deliver_video(self, participant_id: str, rgba: np.ndarray, timestamp_us: int) -> None:
        """Called by a speaker's camera thread with one (height, width, 4) RGBA frame."""
        if self._released or not self._network_up or self._call_state != "joined":
            return
        with self._lock:
            r = self._video_renderers.get((participant_id, "camera"))
            if r is None or not self._subscribed_to(participant_id, "camera"):
                return
        callback, color_format = r
        order = ["RGBA".index(c) for c in color_format]
        pixels = np.ascontiguousarray(rgba[:, :, order])
        frame = VideoFrame(pixels.tobytes(), int(rgba.shape[1]), int(rgba.shape[0]), timestamp_us, color_format)
        self._dispatcher.post(callback, participant_id, frame, "camera")

    # ---- network (driven by FakeRoom)
    def _set_network(self, up: bool, call_state_changes: bool) -> None:
        if self._released or self._call_state not in ("joined", "joining") or self._network_up == up:
            return
        self._network_up = up
        self._event("on_network_connection_status_updated",
                    {"connection": "signalling", "event": "connected" if up else "interrupted"})
        if call_state_changes:  # [unconfirmed] whether the real SDK re-enters `joining` on a reconnect
            self._set_state("joined" if up else "joining")

    # ---- not implemented (present on the real client; here they only complete)
    def update_remote_participants(self, remote_participants: Mapping[str, Any],
                                   completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._complete(completion, None)

    def eject_remote_participants(self, ids: list[str],
                                  completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._complete(completion, None)

    def update_permissions(self, permissions: Mapping[str, Any],
                           completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._complete(completion, None)

    def set_proxy_url(self, proxy_url: str | None = None,
                      completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._complete(completion, None)

    def set_ice_config(self, ice_config: Mapping[str, Any] | None = None,
                       completion: Callable[[str | None], None] | None = None) -> None:
        self._check()
        self._complete(completion, None)


def _media(mic_on: bool, camera_on: bool = False) -> dict[str, Any]:
    off = {"offReasons": ["user"], "state": "off", "subscribed": "unsubscribed"}
    on = {"state": "playable", "subscribed": "subscribed"}
    return {"camera": dict(on if camera_on else off), "microphone": dict(on if mic_on else off),
            "screenAudio": dict(off), "screenVideo": dict(off), "customAudio": {}, "customVideo": {}}


# -------------------------------------------------------------------------------- scripted members
class _Scripted:
    """A remote participant driven by the test (replica, speaker)."""

    def __init__(self, room: FakeRoom, user_name: str) -> None:
        self.room = room
        self.user_name = user_name
        self.id = str(uuid.uuid4())
        self.present = False
        self.joined_at = int(time.time())
        self.mic_on = False
        self.camera_on = False

    def participant(self) -> dict[str, Any]:
        return {"id": self.id,
                "info": {"isLocal": False, "isOwner": False, "joinedAt": self.joined_at,
                         "userName": self.user_name},
                "media": _media(self.mic_on, self.camera_on)}

    def join(self, delay_s: float = 0.0) -> None:
        _after(delay_s, lambda: self.room._add_scripted(self))

    def leave(self, reason: str = "leftCall") -> None:
        self.room._remove_scripted(self, reason)

    def rejoin(self, delay_s: float = 0.0) -> None:
        """Leave (if present) and join again later with a new session id, as Daily does."""
        if self.present:
            self.leave()
        self.id = str(uuid.uuid4())
        self.joined_at = int(time.time())
        self.join(delay_s)

    def _receive(self, message: Any, sender: str) -> None:  # overridden
        pass


class FakeReplica(_Scripted):
    """A Tavus replica: records app-messages, emits Tavus events (their envelope and event types as in
    Tavus's Interactions Protocol docs, https://docs.tavus.io/api-reference/interactions-protocol)."""

    def __init__(self, room: FakeRoom, user_name: str, auto_speak_s: float | None = None) -> None:
        super().__init__(room, user_name)
        self.inbox: list[dict[str, Any]] = []
        self.auto_speak_s = auto_speak_s
        self._seq = itertools.count(1)

    def _receive(self, message: Any, sender: str) -> None:
        with self.room._cond:
            self.inbox.append(message)
            self.room.replica_inbox.append(message)
            received = len(self.room.replica_inbox)
            self.room._cond.notify_all()
        self.room._log("received", message=message)
        drop = self.room.drop_after
        if drop is not None and received == drop[0]:
            self.room.drop_network(drop[1])
        if (self.auto_speak_s is not None and isinstance(message, dict)
                and message.get("event_type") == "conversation.echo"):
            props = message.get("properties") or {}
            if props.get("done") in (True, "true"):
                iid = props.get("inference_id")
                self.started_speaking(iid)
                speak_s = self.auto_speak_s
                _after(speak_s, lambda: self.stopped_speaking(iid, duration=speak_s))

    def emit(self, event_type: str, properties: Mapping[str, Any] | None = None, *,
             inference_id: str | None = None, seq: int | None = None, to: str | None = None,
             message_type: str = "conversation", **extra: Any) -> dict[str, Any]:
        """Send a Tavus event to the clients in the room (or one of them). Returns the message."""
        msg: dict[str, Any] = {"message_type": message_type, "event_type": event_type,
                               "conversation_id": self.room.conversation_id,
                               "seq": next(self._seq) if seq is None else seq, "timestamp": time.time()}
        if inference_id is not None:
            msg["inference_id"] = inference_id
        if properties is not None:
            msg["properties"] = dict(properties)
        msg.update(extra)
        self.room._log("emitted", message=msg)
        self.emit_raw(msg, to=to)
        return msg

    def emit_raw(self, message: Any, to: str | None = None) -> None:
        self.room._broadcast(self, message, to)

    def started_speaking(self, inference_id: str | None) -> dict[str, Any]:
        return self.emit("conversation.replica.started_speaking", {"inference_id": inference_id},
                         inference_id=inference_id)

    def stopped_speaking(self, inference_id: str | None, duration: float | None = None,
                         interrupted: bool = False) -> dict[str, Any]:
        return self.emit("conversation.replica.stopped_speaking",
                         {"inference_id": inference_id, "duration": duration, "interrupted": interrupted},
                         inference_id=inference_id)

    def utterance(self, speech: str, role: str = "replica",
                  inference_id: str | None = None) -> dict[str, Any]:
        return self.emit("conversation.utterance", {"role": role, "speech": speech},
                         inference_id=inference_id)

    def replica_interrupted(self, inference_id: str | None) -> dict[str, Any]:
        return self.emit("conversation.replica_interrupted", None, inference_id=inference_id)


class FakeSpeaker(_Scripted):
    """A participant whose microphone plays 16 kHz int16 PCM into the room, paced by `speed`
    (1 = real time, 2 = twice as fast, 0 = as fast as possible), in 10 ms pieces."""

    def __init__(self, room: FakeRoom, user_name: str, pcm: np.ndarray | bytes, speed: float = 1.0) -> None:
        super().__init__(room, user_name)
        self.mic_on = True
        self.speed = speed
        self._pcm = self._as_pcm(pcm)
        self._pos = 0  # samples played
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._camera: tuple[Callable[[int], np.ndarray], float] | None = None  # show(): frame maker, fps
        self._camera_thread: threading.Thread | None = None
        self.frames_shown = 0

    def show(self, frame: Callable[[int], np.ndarray], fps: float = 10.0) -> None:
        """Turn the camera on: frame i is `frame(i)`, a (height, width, 4) uint8 RGBA array, every 1/fps s
        while the speaker is present."""
        self._camera = frame, fps
        self.camera_on = True
        self._start_camera()

    def _start_camera(self) -> None:
        if self._camera is None or not self.present or (self._camera_thread is not None
                                                         and self._camera_thread.is_alive()):
            return
        self._camera_thread = threading.Thread(target=self._film, name=f"fake-camera-{self.user_name}", daemon=True)
        self._camera_thread.start()

    def _film(self) -> None:
        assert self._camera is not None
        make, fps = self._camera
        t0 = time.monotonic()
        while not self._stop.is_set():
            rgba = np.ascontiguousarray(make(self.frames_shown), dtype=np.uint8)
            self.room._deliver_video(self, rgba, int((time.monotonic() - t0) * 1e6))
            self.frames_shown += 1
            self._stop.wait(max(0.0, t0 + self.frames_shown / fps - time.monotonic()))

    @staticmethod
    def _as_pcm(pcm: np.ndarray | bytes) -> np.ndarray:
        if isinstance(pcm, (bytes, bytearray)):
            return np.frombuffer(bytes(pcm), dtype="<i2").astype(np.int16)
        return np.asarray(pcm, dtype=np.int16).reshape(-1)

    @property
    def played_samples(self) -> int:
        return self._pos

    def feed(self, pcm: np.ndarray | bytes) -> None:
        """Queue more audio after what is already queued."""
        with self._lock:
            self._pcm = np.concatenate([self._pcm, self._as_pcm(pcm)])
            self._idle.clear()
        self._start_thread()

    def wait_played(self, timeout: float = 10.0) -> bool:
        return self._idle.wait(timeout)

    def _on_present(self) -> None:
        self._stop.clear()
        self._start_thread()
        self._start_camera()

    def _on_absent(self) -> None:
        self._stop.set()

    def _start_thread(self) -> None:
        if not self.present or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._play, name=f"fake-speaker-{self.user_name}", daemon=True)
        self._thread.start()

    def _play(self) -> None:
        step = SAMPLE_RATE // 100
        next_t = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                if self._pos >= len(self._pcm):
                    self._idle.set()
                    return
                self._idle.clear()
                piece = self._pcm[self._pos:self._pos + step]
                self._pos += len(piece)
            self.room._deliver_audio(self, piece)
            if self.speed > 0:
                next_t += len(piece) / SAMPLE_RATE / self.speed
                delay = next_t - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


# ------------------------------------------------------------------------------------------ rooms
class FakeRoom:
    """A Daily room shared by every fake client that joins its URL (query string ignored)."""

    _registry: ClassVar[dict[str, FakeRoom]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()
    _autocreate: ClassVar[Callable[[FakeRoom], Any] | None] = None

    def __init__(self, url: str, *, join_delay_s: float = 0.01, meeting_token: str | None = None,
                 conversation_id: str | None = None, max_message_bytes: int | None = None) -> None:
        self.url = url
        self.join_delay_s = join_delay_s
        self.meeting_token = meeting_token
        self.conversation_id = conversation_id or urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1]
        self.max_message_bytes = max_message_bytes  # None = no size check (like the local SDK)
        # The SDK reports a send after the network round trip, so events (a replica leaving, the call
        # ending) can overtake it. > 0 holds each send completion this long after the message arrived.
        self.completion_delay_s = 0.0
        self.session_id = str(uuid.uuid4())
        self.ended = False
        self.network_send_error = CHANNEL_NOT_OPEN  # [unconfirmed] what a send during an outage returns
        self._cond = threading.Condition(threading.RLock())
        self._clients: list[CallClient] = []
        self._scripted: list[_Scripted] = []
        self._send_failures: list[str] = []
        self.replica_inbox: list[dict[str, Any]] = []  # what any replica of this room received, in order
        self.messages: list[tuple[str, str | None, Any]] = []  # (sender id, target, message)
        self.largest_message_bytes = 0
        self.replicas: list[FakeReplica] = []
        self.speakers: list[FakeSpeaker] = []
        self.drop_after: tuple[int, float] | None = None  # (n received, outage s): see ECHO_RELAY_FAKE_DAILY_DROP
        self.event_log: str | None = None  # JSON-lines file of room events: see ECHO_RELAY_FAKE_DAILY_LOG
        self._log_lock = threading.Lock()

    # ---- registry
    @classmethod
    def create(cls, url: str | None = None, **kwargs: Any) -> FakeRoom:
        room = cls(url or f"https://fake.daily.co/c{uuid.uuid4().hex[:10]}", **kwargs)
        with cls._registry_lock:
            cls._registry[_room_key(room.url)] = room
        return room

    @classmethod
    def lookup(cls, url: str) -> FakeRoom | None:
        key = _room_key(url)
        with cls._registry_lock:
            room = cls._registry.get(key)
            hook = cls._autocreate
        if hook is None and os.environ.get(ENV_REPLICA):
            hook = configure_from_env
        if room is None and hook is not None:
            room = cls.create(url.split("?", 1)[0])
            hook(room)
        return room

    @classmethod
    def set_autocreate(cls, configure: Callable[[FakeRoom], Any] | None) -> None:
        """Create a room on first join of any unknown URL and call `configure(room)` (e.g. to add a
        replica); None turns it off (unknown URLs then fail like an unreachable room)."""
        cls._autocreate = configure

    @classmethod
    def reset(cls) -> None:
        with cls._registry_lock:
            rooms = list(cls._registry.values())
            cls._registry.clear()
            cls._autocreate = None
        for room in rooms:
            for s in list(room._scripted):
                if isinstance(s, FakeSpeaker):
                    s._on_absent()

    # ---- scripting
    def add_replica(self, user_name: str, delay_s: float = 0.0,
                    auto_speak_s: float | None = None) -> FakeReplica:
        """A replica that joins after `delay_s` with info.userName = `user_name` (the persona name)."""
        r = FakeReplica(self, user_name, auto_speak_s=auto_speak_s)
        self.replicas.append(r)
        r.join(delay_s)
        return r

    @property
    def replica(self) -> FakeReplica:
        return self.replicas[-1]

    def add_speaker(self, user_name: str, pcm16k_int16: np.ndarray | bytes, *, speed: float = 1.0,
                    delay_s: float = 0.0) -> FakeSpeaker:
        s = FakeSpeaker(self, user_name, pcm16k_int16, speed=speed)
        self.speakers.append(s)
        s.join(delay_s)
        return s

    def fail_sends(self, n: int, error: str = DEFAULT_SEND_FAILURE) -> None:
        """The next `n` sends (from any client) fail with `error` and are not delivered."""
        with self._cond:
            self._send_failures.extend([error] * n)

    def clear_send_failures(self) -> None:
        with self._cond:
            self._send_failures.clear()

    def drop_network(self, duration_s: float | None, *, send_error: str | None = None,
                     call_state_changes: bool = False) -> None:
        """Interrupt every joined client's connection: status event `interrupted`, sends fail, nothing
        is received; after `duration_s` (None = until `restore_network()`) status `connected` again.
        With `call_state_changes`, the call state also goes `joining` then back to `joined`."""
        if send_error is not None:
            self.network_send_error = send_error
        self._call_state_changes = call_state_changes
        self._log("network_down")
        for c in self._clients_snapshot():
            c._set_network(False, call_state_changes)
        if duration_s is not None:
            _after(duration_s, self.restore_network)

    def restore_network(self) -> None:
        self._log("network_up")
        for c in self._clients_snapshot():
            c._set_network(True, getattr(self, "_call_state_changes", False))

    def end_conversation(self, *, shutdown_message: bool = False,
                         reason: str = "end_conversation_endpoint_hit",
                         error: str | None = "Meeting has ended") -> None:
        """Tavus ends the conversation: (optionally a system.shutdown app-message), the replica leaves,
        then every client is removed from the call (call state `left`). [unconfirmed] sequence/texts."""
        for r in self.replicas:
            if r.present:
                if shutdown_message:
                    r.emit("system.shutdown", {"shutdown_reason": reason}, message_type="system")
                r.leave()
        self.ended = True
        for c in self._clients_snapshot():
            self._remove_client(c, "leftCall", notify_self=False)
            c._room = None
            if error:
                c._event("on_error", error)
            c._set_state("left")
        for s in self.speakers:
            if s.present:
                s.leave()

    # ---- waiting helpers for tests
    def wait_for_inbox(self, n: int, timeout: float = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.replica_inbox) >= n, timeout)

    def clients(self) -> list[CallClient]:
        return self._clients_snapshot()

    # ---- internals
    def _log(self, event: str, **fields: Any) -> None:
        """Append one JSON line to `event_log` (if set): written and closed per line, so another
        process can read it at any time."""
        path = self.event_log
        if path is None:
            return
        line = json.dumps({"t": time.time(), "event": event, "room": self.url, **fields}, default=str)
        with self._log_lock, open(path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def _clients_snapshot(self) -> list[CallClient]:
        with self._cond:
            return list(self._clients)

    def _present_scripted(self) -> list[_Scripted]:
        with self._cond:
            return [s for s in self._scripted if s.present]

    def _participants_for(self, viewer: CallClient) -> list[dict[str, Any]]:
        with self._cond:
            out = [c._remote_view() for c in self._clients if c is not viewer]
            out += [s.participant() for s in self._scripted if s.present]
            return out

    def _add_client(self, client: CallClient) -> list[dict[str, Any]]:
        with self._cond:
            others = self._participants_for(client)
            self._clients.append(client)
            view = client._remote_view()
            for c in self._clients:
                if c is not client:
                    c._event("on_participant_joined", copy.deepcopy(view))
            return others

    def _remove_client(self, client: CallClient, reason: str, notify_self: bool) -> None:
        with self._cond:
            if client not in self._clients:
                return
            self._clients.remove(client)
            view = client._remote_view()
            for c in self._clients:
                c._event("on_participant_left", copy.deepcopy(view), reason)

    def _participant_updated(self, view: dict[str, Any], exclude: CallClient | None = None) -> None:
        for c in self._clients_snapshot():
            if c is not exclude:
                c._event("on_participant_updated", copy.deepcopy(view))

    def _add_scripted(self, s: _Scripted) -> None:
        if self.ended:
            return
        with self._cond:
            if s.present:
                return
            s.present = True
            if s not in self._scripted:
                self._scripted.append(s)
            view = s.participant()
            for c in self._clients:
                c._event("on_participant_joined", copy.deepcopy(view))
        if isinstance(s, FakeReplica):
            self._log("replica_joined")
        if isinstance(s, FakeSpeaker):
            s._on_present()

    def _remove_scripted(self, s: _Scripted, reason: str) -> None:
        with self._cond:
            if not s.present:
                return
            s.present = False
            view = s.participant()
            for c in self._clients:
                c._event("on_participant_left", copy.deepcopy(view), reason)
        if isinstance(s, FakeReplica):
            self._log("replica_left")
        if isinstance(s, FakeSpeaker):
            s._on_absent()

    def _take_send_failure(self) -> str | None:
        with self._cond:
            return self._send_failures.pop(0) if self._send_failures else None

    def _broadcast(self, sender: CallClient | _Scripted, message: Any, target: str | None) -> None:
        """Deliver a JSON copy to every participant present now (never to the sender)."""
        wire = json.loads(json.dumps(message))
        size = _wire_size(wire)
        sender_id = sender._id if isinstance(sender, CallClient) else sender.id
        with self._cond:
            self.messages.append((sender_id, target, wire))
            self.largest_message_bytes = max(self.largest_message_bytes, size)
            clients = [c for c in self._clients if c is not sender and (target is None or c._id == target)]
            scripted = [s for s in self._scripted
                        if s.present and s is not sender and (target is None or s.id == target)]
        for c in clients:
            if c._network_up:
                c._event("on_app_message", copy.deepcopy(wire), sender_id)
        for s in scripted:
            s._receive(copy.deepcopy(wire), sender_id)

    def _deliver_audio(self, speaker: FakeSpeaker, piece: np.ndarray) -> None:
        for c in self._clients_snapshot():
            c._deliver_audio(speaker.id, piece)

    def _deliver_video(self, speaker: FakeSpeaker, rgba: np.ndarray, timestamp_us: int) -> None:
        for c in self._clients_snapshot():
            c._deliver_video(speaker.id, rgba, timestamp_us)
