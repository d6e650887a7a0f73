"""`RoomConnection`: one CallClient in one Daily room, driven from the asyncio loop.

It joins, sends app-messages, captures a participant's microphone or camera, leaves and releases, and hands
each SDK callback over to the loop, where its `tracker` (pipeline/daily_room/tracker.py) keeps what is known of
the room. `await close()` is reference-counted (`retain()`): the last holder leaves, waits for the completion,
then releases the client off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipeline.daily_room.sdk import (
    InvalidAppMessage,
    RoomError,
    client_created,
    client_released,
    ensure_daily_initialized,
    handler_class,
)
from pipeline.daily_room.tracker import RoomPhase, RoomState, RoomTracker

log = logging.getLogger("pipeline.daily_room")  # one logger for the room plumbing, whichever part logs


def redact_url(url: str | None) -> str:
    """The room URL without its query string (which may carry a meeting token `?t=`)."""
    if not url:
        return ""
    try:
        p = urlsplit(url)
    except ValueError:
        return "<invalid url>"
    return urlunsplit((p.scheme, p.netloc, p.path, "", ""))


class RoomConnection:
    """One CallClient in one Daily room. What is known of the room (readiness, participants, the replica,
    the network, Tavus's events, subscribers, waiting) is its `tracker`."""

    def __init__(self, daily_module: ModuleType, *, user_name: str = "echo-relay",
                 replica_name: str | None = None, metrics: Any = None,
                 unsubscribe_media: bool = True, state: RoomState | None = None) -> None:
        self.module = daily_module
        self.user_name = user_name
        self.unsubscribe_media = unsubscribe_media
        self.tracker = RoomTracker(replica_name=replica_name, metrics=metrics, state=state)
        self.url: str | None = None
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refs = 1

    @property
    def client(self) -> Any:
        return self._client

    @property
    def phase(self) -> RoomPhase:
        return self.tracker.phase

    @property
    def closed(self) -> bool:
        return self.tracker.phase is RoomPhase.CLOSED

    def retain(self) -> RoomConnection:
        """Share this connection (e.g. the Daily source riding on the sink's room); each holder calls
        `close()` once and the last one leaves."""
        self._refs += 1
        return self

    # ---- join / send / media / leave
    async def join(self, url: str, meeting_token: str | None = None, *, timeout_s: float = 30.0,
                   client_settings: Mapping[str, Any] | None = None) -> None:
        """Create the CallClient and join; raise RoomError on failure or timeout."""
        if self._client is not None:
            raise RoomError("this RoomConnection already joined a room")
        self._loop = asyncio.get_running_loop()
        self.url = url
        self.tracker.state.conversation_url = redact_url(url)
        ensure_daily_initialized(self.module)
        self._client = self.module.CallClient(event_handler=handler_class(self.module)(weakref.ref(self)))
        client_created(self.module)
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
        participants = data.get("participants") if isinstance(data, Mapping) else None
        if not isinstance(participants, Mapping):
            try:
                participants = self._client.participants()
            except Exception:
                participants = {}
        self.tracker.joined(participants, redact_url(self.url))

    async def send(self, message: Any, participant_id: str | None = None, *,
                   timeout_s: float | None = None) -> str | None:
        """Send an app-message (broadcast by default). Returns None when the SDK reports success,
        else its error string. Raises InvalidAppMessage when the SDK refuses the message itself."""
        client = self._client
        loop = self._loop
        if client is None or loop is None or self.closed:
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
        self.tracker.leaving()
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
        self.tracker.left()

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
            client_released(self.module)

    async def close(self, leave_timeout_s: float = 5.0) -> bool:
        """Drop one reference; the last one leaves, waits for the completion, then releases.
        Returns True when this call actually left the room."""
        self._refs -= 1
        if self._refs > 0 or self.closed:
            return False
        if self._client is not None:
            await self.leave(leave_timeout_s)
            await self.release()
        self.tracker.closed()
        return True

    # ---- SDK thread -> loop
    def hand_over(self, name: str, *args: Any) -> None:
        """SDK thread (the EventHandler, pipeline/daily_room/sdk.py): run the tracker's `name` with `args` on
        the loop. Never blocks, never calls the SDK."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._dispatch, name, args)

    def _resolve_threadsafe(self, fut: asyncio.Future[Any], value: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed in between
            loop.call_soon_threadsafe(_set_result, fut, value)

    def _logging_completion(self, what: str) -> Callable[[Any], None]:
        def completion(error: Any) -> None:
            if error:
                self.hand_over("on_error", f"{what}: {error}")
        return completion

    def _dispatch(self, name: str, args: tuple[Any, ...]) -> None:
        try:
            getattr(self.tracker, name)(*args)
        except Exception:
            log.exception("error handling Daily event %s", name)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)
