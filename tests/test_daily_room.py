"""Shared Daily room plumbing: module selection, init guard, event parsing, threading, real-SDK smoke."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
import types
from typing import Any

import pytest

from pipeline import daily_room
from pipeline.daily_room import (
    RoomConnection,
    RoomError,
    RoomPhase,
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
