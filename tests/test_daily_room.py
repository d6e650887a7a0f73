"""Shared Daily room plumbing: module selection, init guard, event parsing, the connection (join, send, media,
lifecycle, SDK thread -> loop), the event handler, real-SDK smoke. The tracker: tests/test_daily_tracker.py."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import daily_room
from pipeline.daily_room import (
    RoomConnection,
    RoomError,
    RoomPhase,
    RoomTracker,
    get_daily_module,
    parse_app_message,
    parse_network_status,
    resolve_daily_module,
)
from pipeline.testing import fake_daily
from pipeline.testing.fake_daily import FakeRoom

FAKE = "pipeline.testing.fake_daily"


pytestmark = pytest.mark.usefixtures("clean_fake_daily")  # fresh rooms, no error inside a callback


def test_module_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_daily_module(FAKE) is fake_daily
    with pytest.raises(RoomError, match="cannot import"):
        get_daily_module("no_such_module_here")
    with pytest.raises(RoomError, match="not a daily-python stand-in"):
        get_daily_module("json")
    settings = types.SimpleNamespace(sink=types.SimpleNamespace(daily=types.SimpleNamespace(module=FAKE)))
    monkeypatch.delenv(daily_room.DAILY_MODULE_ENV, raising=False)
    assert resolve_daily_module(None, settings) is fake_daily  # settings.sink.daily.module
    monkeypatch.setenv(daily_room.DAILY_MODULE_ENV, FAKE)
    assert resolve_daily_module(None, None) is fake_daily  # env var
    assert resolve_daily_module(fake_daily, None) is fake_daily  # explicit module wins


def test_parse_tavus_events() -> None:
    ev = parse_app_message({"message_type": "conversation",
                            "event_type": "conversation.replica.started_speaking",
                            "conversation_id": "c1", "inference_id": "i1", "seq": 4, "timestamp": 1.5}, "s")
    got = (ev.kind, ev.inference_id, ev.seq, ev.timestamp, ev.sender)
    assert got == ("replica_started_speaking", "i1", 4, 1.5, "s")
    ev = parse_app_message({"event_type": "conversation.replica.stopped_speaking",
                            "properties": {"inference_id": "i2", "duration": None, "interrupted": True}})
    assert (ev.kind, ev.inference_id, ev.interrupted) == ("replica_stopped_speaking", "i2", True)
    ev = parse_app_message({"event_type": "conversation.started_speaking", "properties": {"role": "user"}})
    assert ev.kind == "user_started_speaking"
    ev = parse_app_message({"event_type": "conversation.stopped_speaking", "properties": {"role": "replica"}})
    assert ev.kind == "replica_stopped_speaking"
    ev = parse_app_message({"event_type": "conversation.utterance",
                            "properties": {"role": "pal", "speech": "Hi"}})
    assert (ev.kind, ev.role, ev.text) == ("utterance", "replica", "Hi")
    ev = parse_app_message({"event_type": "system.shutdown", "message_type": "system",
                            "properties": {"shutdown_reason": "participant_left_timeout reached"}})
    assert ev.kind == "shutdown" and ev.text == "participant_left_timeout reached"
    assert parse_app_message({"event_type": "conversation.brand_new"}).kind == "unknown"
    assert parse_app_message("text").kind == "invalid"
    assert parse_app_message({"seq": True}).seq is None


def test_parse_network_status_tolerates_unknown_shapes() -> None:
    status = {"connection": "signalling", "event": "interrupted"}
    assert parse_network_status(status) == ("signalling", "interrupted")
    assert parse_network_status({"event": "connected"}) == (None, "connected")
    assert parse_network_status({"type": "sfu", "state": "reconnecting"}) == ("sfu", "interrupted")
    assert parse_network_status("connected") == (None, "connected")
    assert parse_network_status({"something": 1}) == (None, "unknown")


async def test_callbacks_reach_subscribers_on_the_loop_thread() -> None:
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily, user_name="relay", replica_name="Persona")
    seen: list[tuple[str, str]] = []
    conn.tracker.subscribe(lambda ev: seen.append((ev.kind, threading.current_thread().name)))
    await conn.join(room.url, timeout_s=2)
    replica = room.add_replica("Persona")
    assert await conn.tracker.wait_until(lambda: conn.tracker.ready, 2)
    replica.started_speaking("x")
    assert await conn.tracker.wait_until(lambda: conn.tracker.state.replica_speaking, 2)
    main = threading.current_thread().name
    assert {t for _, t in seen} == {main}
    kinds = [k for k, _ in seen]
    assert "joined" in kinds and kinds.index("joined") < kinds.index("replica_joined")
    assert conn.tracker.replica_id == replica.id
    assert await conn.send({"hello": 1}) is None
    assert room.replica_inbox == [{"hello": 1}]
    with pytest.raises(daily_room.InvalidAppMessage):
        await conn.send({"bad": object()})
    assert await conn.close() is True
    assert conn.closed and room.clients() == []


async def test_a_retained_connection_is_reference_counted() -> None:
    """The Daily source riding on the sink's room retains it: the last holder's close() leaves."""
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily)
    await conn.join(room.url, timeout_s=2)
    assert conn.phase is RoomPhase.JOINED
    conn.retain()
    assert await conn.close() is False and len(room.clients()) == 1 and conn.phase is RoomPhase.JOINED
    assert await conn.close() is True and room.clients() == [] and conn.phase is RoomPhase.CLOSED


async def test_replica_name_arriving_in_an_update_is_recognised() -> None:
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily, replica_name="Persona")
    await conn.join(room.url, timeout_s=2)
    other = fake_daily.CallClient()  # joins without a name, sets it later (participant-updated)
    joined = threading.Event()
    other.join(room.url, completion=lambda data, err: joined.set())
    assert joined.wait(2)
    assert await conn.tracker.wait_until(lambda: len(conn.tracker.participants) == 1, 2)
    assert not conn.tracker.ready
    other.set_user_name("Persona")
    assert await conn.tracker.wait_until(lambda: conn.tracker.ready, 2)
    other.release()
    assert await conn.tracker.wait_until(lambda: not conn.tracker.ready, 2)
    await conn.close()


def test_real_daily_python_smoke_in_a_subprocess() -> None:
    """The real binding, offline: our EventHandler subclass is accepted, completions hop to the loop,
    a malformed URL becomes a clear RoomError, init runs once, leave/release/deinit are clean."""
    pytest.importorskip("daily")
    script = textwrap.dedent("""
        import asyncio, json, daily
        from pipeline import daily_room
        from pipeline.daily_room import RoomConnection, RoomError

        async def main():
            out = {}
            daily_room.ensure_daily_initialized(daily)
            daily_room.ensure_daily_initialized(daily)  # a second real init would abort the process
            conn = RoomConnection(daily, user_name="probe", replica_name="Persona")
            try:
                await conn.join("not a url", timeout_s=10)
            except RoomError as exc:
                out["join_error"] = str(exc)
            out["send_error"] = await conn.send({"a": 1}, timeout_s=10)
            try:
                await conn.send({"a": object()})
            except daily_room.InvalidAppMessage as exc:
                out["invalid"] = str(exc)
            out["closed"] = await conn.close()
            from pipeline.config import Settings
            from pipeline.metrics import Metrics
            from pipeline.sink.base import SinkError
            from pipeline.sink.daily import DailySink
            sink = DailySink(Settings.model_validate({"tavus": {"conversation_url": "not a url"}}), Metrics(),
                             daily_module="daily")
            try:
                await sink.start()
            except SinkError as exc:
                out["sink_error"] = str(exc)
            await sink.close()
            out["deinit"] = daily_room.deinit_daily(daily)
            print(json.dumps(out))

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Failed to parse url: InvalidUrl(" in out["join_error"]
    assert out["send_error"] == "AppMessage(Signalling(ChannelNotOpen))"
    assert "unsupported type object" in out["invalid"]
    assert "Failed to parse url" in out["sink_error"]
    assert out["closed"] is True and out["deinit"] is True


def test_fake_matches_the_real_send_and_join_errors() -> None:
    """Same probe against the stand-in: identical strings for the behaviours it mirrors."""
    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        conn = RoomConnection(fake_daily, user_name="probe")
        try:
            await conn.join("not a url", timeout_s=2)
        except RoomError as exc:
            out["join_error"] = str(exc)
        out["send_error"] = await conn.send({"a": 1}, timeout_s=2)
        out["closed"] = await conn.close()
        return out

    out = asyncio.run(main())
    assert "Failed to parse url: InvalidUrl(" in out["join_error"]
    assert out["send_error"] == "AppMessage(Signalling(ChannelNotOpen))" and out["closed"] is True
    json.dumps(out)


# --------------------------------------------------------------------------- the connection's own steps
async def test_a_join_that_does_not_complete_in_time_is_a_room_error_and_close_releases_the_client() -> None:
    room = FakeRoom.create(join_delay_s=5.0)
    conn = RoomConnection(fake_daily)
    with pytest.raises(RoomError, match=r"timed out after 0.1 s \(sink.daily.join_timeout_s\)"):
        await conn.join(room.url, timeout_s=0.1)
    assert conn.client is not None and conn.phase is RoomPhase.NEW
    assert await conn.close() is True
    assert conn.client is None and conn.closed and conn.tracker.phase is RoomPhase.CLOSED


async def test_one_connection_joins_one_room_once() -> None:
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily)
    await conn.join(room.url, timeout_s=2)
    with pytest.raises(RoomError, match="already joined"):
        await conn.join(room.url, timeout_s=2)
    await conn.close()
    assert await conn.send({"after": "close"}) == "not connected (the room connection is closed)"


async def test_the_join_url_is_redacted_in_the_state_and_the_log(caplog: pytest.LogCaptureFixture) -> None:
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily)
    with caplog.at_level("INFO", logger="pipeline.daily_room"):
        await conn.join(room.url + "?t=secret-meeting-token", timeout_s=2)
    assert conn.tracker.state.conversation_url == room.url and conn.tracker.state.joined
    assert "secret-meeting-token" not in caplog.text and f"joined Daily room {room.url} (0 other" in caplog.text
    await conn.close()


async def test_media_is_captured_only_once_joined_and_frames_stay_on_the_sdk_thread() -> None:
    from pipeline.source.file import decode_file

    pcm = decode_file(Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "jfk.wav")[:8000]
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily, replica_name="Persona")
    with pytest.raises(RoomError, match="not joined"):
        conn.capture_audio("anyone", lambda *a: None)
    with pytest.raises(RoomError, match="not joined"):
        conn.capture_video("anyone", lambda *a: None)
    await conn.join(room.url, timeout_s=2)
    speaker = room.add_speaker("alice", np.zeros(0, dtype=np.int16), speed=0)
    assert await conn.tracker.wait_until(lambda: len(conn.tracker.participants) == 1, 2)
    (pid,) = conn.tracker.participants
    chunks: list[bytes] = []
    threads: set[str] = set()

    def on_audio(participant_id: str, audio: Any, source: str) -> None:  # SDK thread
        assert (participant_id, source) == (pid, "microphone")
        threads.add(threading.current_thread().name)
        chunks.append(audio.audio_frames)

    conn.capture_audio(pid, on_audio, sample_rate=16000, callback_interval_ms=20)
    await asyncio.sleep(0.05)  # the subscription update reaches the fake SDK first
    speaker.feed(pcm)
    assert await asyncio.to_thread(speaker.wait_played, 5)
    await conn.tracker.wait_until(lambda: sum(map(len, chunks)) >= (len(pcm) - 320) * 2, 2)
    received = np.frombuffer(b"".join(chunks), dtype="<i2")
    assert len(received) >= len(pcm) - 320 and np.array_equal(received, pcm[:len(received)])  # every 20 ms
    assert threads and threading.current_thread().name not in threads
    await conn.close()


async def test_sdk_callbacks_reach_the_tracker_and_a_failing_one_is_logged(caplog: pytest.LogCaptureFixture
                                                                          ) -> None:
    room = FakeRoom.create()
    conn = RoomConnection(fake_daily)
    await conn.join(room.url, timeout_s=2)
    conn.hand_over("on_error", "from the SDK thread")
    assert await conn.tracker.wait_until(lambda: conn.tracker.last_error == "from the SDK thread", 2)
    with caplog.at_level("ERROR", logger="pipeline.daily_room"):
        conn.hand_over("on_participant_joined")  # missing its argument: a bug, logged, the loop goes on
        await asyncio.sleep(0.05)
    assert "error handling Daily event on_participant_joined" in caplog.text
    await conn.close()


def test_a_callback_after_the_loop_closed_is_dropped_silently() -> None:
    async def joined() -> RoomConnection:
        conn = RoomConnection(fake_daily)
        await conn.join(FakeRoom.create().url, timeout_s=2)
        await conn.close()
        return conn

    conn = asyncio.run(joined())
    conn.hand_over("on_error", "late")  # the SDK may still call in after the loop is gone
    assert conn.tracker.last_error is None


# ------------------------------------------------------------------------------------------ the SDK side
def test_the_event_handler_hands_every_callback_to_a_tracker_method_of_that_name() -> None:
    """Each EventHandler method the package overrides hands over a name RoomTracker has, with arguments that
    fit it; the target is held weakly (the SDK's reference never keeps a connection alive)."""
    posted: list[tuple[str, tuple[Any, ...]]] = []

    class Target:
        def hand_over(self, name: str, *args: Any) -> None:
            posted.append((name, args))

    target = Target()
    cls = daily_room.sdk.handler_class(fake_daily)
    assert daily_room.sdk.handler_class(fake_daily) is cls and issubclass(cls, fake_daily.EventHandler)
    handler = cls(weakref.ref(target))
    for method in daily_room.EVENT_HANDLERS_USED:
        params = [p for p in inspect.signature(getattr(fake_daily.EventHandler, method)).parameters if p != "self"]
        args = tuple(f"{method}:{p}" for p in params)
        getattr(handler, method)(*args)
        name, got = posted[-1]
        assert got == args
        inspect.signature(getattr(RoomTracker, name)).bind(None, *got)  # RoomTracker.<name>(*args) fits
    assert len(posted) == len(daily_room.EVENT_HANDLERS_USED)
    del target
    handler.on_error("after the connection is gone")
    assert len(posted) == len(daily_room.EVENT_HANDLERS_USED)


async def test_every_client_is_counted_until_released_and_deinit_waits_for_them() -> None:
    alive = daily_room.sdk.live_clients(fake_daily)  # other tests' connections may still be open
    conn = RoomConnection(fake_daily)
    await conn.join(FakeRoom.create().url, timeout_s=2)
    try:
        assert daily_room.sdk.live_clients(fake_daily) == alive + 1
        assert daily_room.deinit_daily(fake_daily) is False  # a live CallClient: deinit would crash it
    finally:
        await conn.close()
    assert daily_room.sdk.live_clients(fake_daily) == alive


def test_deinit_runs_once_the_last_client_is_released() -> None:
    """In a fresh process (no other test's client alive): join, close, deinit, init again."""
    script = textwrap.dedent("""
        import asyncio, json
        from pipeline import daily_room
        from pipeline.testing import fake_daily
        from pipeline.testing.fake_daily import FakeRoom

        async def main():
            conn = daily_room.RoomConnection(fake_daily)
            await conn.join(FakeRoom.create().url, timeout_s=2)
            out = {"while_joined": daily_room.deinit_daily(fake_daily)}
            await conn.close()
            out["after_close"] = daily_room.deinit_daily(fake_daily)
            out["state"] = fake_daily.sdk_state()
            daily_room.ensure_daily_initialized(fake_daily)
            out["again"] = fake_daily.sdk_state()["initialized"]
            print(json.dumps(out))

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["while_joined"] is False and out["after_close"] is True
    assert out["state"]["initialized"] is False and out["state"]["deinit_calls"] == 1 and out["again"] is True
