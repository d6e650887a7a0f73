"""DailySink against the daily-python stand-in (and the fake Tavus server when it provisions)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import sys
import textwrap
import time
from typing import Any

import numpy as np
import pytest

from pipeline import daily_room, protocol
from pipeline.config import Settings, set_dotted
from pipeline.metrics import Metrics
from pipeline.sink.base import Outgoing, SinkError
from pipeline.sink.daily import DailySink
from pipeline.testing import fake_daily
from pipeline.testing.fake_daily import FakeRoom

FAKE = "pipeline.testing.fake_daily"
PERSONA = "Echo Persona"


pytestmark = pytest.mark.usefixtures("clean_fake_daily")  # fresh rooms, no error inside a callback


def make_settings(room: FakeRoom | None = None, **dotted: Any) -> Settings:
    tree: dict[str, Any] = {
        "sink": {"spec": "daily", "daily": {"join_timeout_s": 2.0, "replica_timeout_s": 2.0,
                                            "send_deadline_s": 2.0, "retry_initial_s": 0.02,
                                            "retry_max_s": 0.1}},
        "tavus": {"persona_name": PERSONA},
    }
    if room is not None:
        tree["tavus"]["conversation_url"] = room.url
        tree["tavus"]["conversation_id"] = room.conversation_id
    for key, value in dotted.items():
        set_dotted(tree, key.replace("__", "."), value)
    return Settings.model_validate(tree)


def echo(text: str, inference_id: str | None = None, done: bool = True) -> Outgoing:
    return Outgoing("echo", protocol.echo_text(text, None, inference_id or protocol.new_inference_id(), done),
                    utterance_id="u1", text=text)


def texts(room: FakeRoom) -> list[str]:
    return [m["properties"]["text"] for m in room.replica_inbox if m.get("event_type") == protocol.ECHO]


async def wait_for(pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def started_sink(settings: Settings, **kw: Any) -> DailySink:
    sink = DailySink(settings, Metrics(), daily_module=FAKE, **kw)
    await sink.start()
    return sink


# ------------------------------------------------------------------------------------ ordering
async def test_messages_before_join_and_replica_are_delivered_in_order() -> None:
    room = FakeRoom.create(join_delay_s=0.05)
    sink = DailySink(make_settings(room), Metrics(), daily_module=FAKE)
    outs = [echo(f"message {i}.") for i in range(6)]
    early = [await sink.submit(o) for o in outs[:2]]  # before start(): not even joined
    await sink.start()
    assert sink.room.joined and not sink.is_ready()
    later = [asyncio.ensure_future(sink.send(o)) for o in outs[2:]]  # concurrent senders, call order
    await asyncio.sleep(0.1)
    assert room.replica_inbox == []  # nothing is sent while the replica is absent
    room.add_replica(PERSONA, delay_s=0.05)
    await asyncio.wait_for(asyncio.gather(*early, *later), 3)
    assert texts(room) == [f"message {i}." for i in range(6)]
    assert [m["properties"]["inference_id"] for m in room.replica_inbox] == \
        [o.message["properties"]["inference_id"] for o in outs]
    assert {m["conversation_id"] for m in room.replica_inbox} == {room.conversation_id}
    assert sink.is_ready() and sink.conversation_id == room.conversation_id
    await sink.close()


async def test_replica_already_in_the_room_is_recognised_from_join_data() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    await asyncio.sleep(0.05)
    sink = await started_sink(make_settings(room))
    assert sink.is_ready() and sink.room.replica_present
    await asyncio.wait_for(sink.send(echo("hi")), 2)
    assert texts(room) == ["hi"]
    await sink.close()


async def test_replica_never_joins_reports_every_queued_message(caplog: pytest.LogCaptureFixture) -> None:
    room = FakeRoom.create()
    room.add_speaker("somebody else", np.zeros(0, dtype=np.int16))  # a participant, not the replica
    sink = await started_sink(make_settings(room, sink__daily__replica_timeout_s=0.3))
    futures = [await sink.submit(echo(f"lost {i}")) for i in range(3)]
    caplog.set_level(logging.ERROR)
    for fut in futures:
        with pytest.raises(SinkError, match="replica 'Echo Persona' is not in the Daily room"):
            await asyncio.wait_for(fut, 2)
    assert sink.given_up == 3
    log_text = caplog.text
    assert "3 queued message(s) undeliverable" in log_text
    for i in range(3):
        assert f"'lost {i}'" in log_text
    # Fails fast while the replica is still absent: the refusal comes in send()'s first step,
    # before it waits on anything (a clock bound here would be flaky on a busy CI machine).
    step = sink.send(echo("too late")).send
    with pytest.raises(SinkError, match="replica 'Echo Persona' is not in the Daily room"):
        step(None)
    assert sink.given_up == 4
    room.add_replica(PERSONA)  # it finally comes: delivery works again
    await wait_for(sink.is_ready)
    await asyncio.wait_for(sink.send(echo("back")), 2)
    assert texts(room) == ["back"]
    await sink.close()


# ------------------------------------------------------------------------------------ failures
async def test_transient_send_failures_are_retried_without_duplicates() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    sink = DailySink(make_settings(room), metrics, daily_module=FAKE)
    await sink.start()
    await wait_for(sink.is_ready)
    room.fail_sends(2, error="AppMessage(Signalling(SendFailed))")
    outs = [echo(f"m{i}") for i in range(3)]
    for o in outs:
        await asyncio.wait_for(sink.send(o), 3)
    ids = [m["properties"]["inference_id"] for m in room.replica_inbox]
    assert ids == [o.message["properties"]["inference_id"] for o in outs]  # once each, in order
    assert metrics.value("echo_relay_send_retries_total") == 2
    assert sink.given_up == 0 and sink.delivered == 3
    await sink.close()


async def test_permanent_failure_gives_up_with_sink_error_then_continues_in_order(
        caplog: pytest.LogCaptureFixture) -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    sink = DailySink(make_settings(room, sink__daily__send_deadline_s=0.3), metrics, daily_module=FAKE)
    await sink.start()
    await wait_for(sink.is_ready)
    room.fail_sends(10_000, error="AppMessage(Signalling(SendFailed))")
    caplog.set_level(logging.ERROR)
    t0 = time.monotonic()
    with pytest.raises(SinkError, match="SendFailed"):
        await sink.send(echo("never arrives"))
    assert 0.25 < time.monotonic() - t0 < 1.5
    assert sink.given_up == 1 and metrics.value("echo_relay_send_retries_total") >= 2
    assert "'never arrives'" in caplog.text
    room.clear_send_failures()
    await asyncio.wait_for(sink.send(echo("next one")), 2)
    assert texts(room) == ["next one"]
    await sink.close()


@pytest.mark.parametrize("call_state_changes", [False, True])
async def test_network_drop_mid_stream_loses_nothing_and_keeps_order(call_state_changes: bool) -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await started_sink(make_settings(room, sink__daily__send_deadline_s=3.0))
    await wait_for(sink.is_ready)
    seen: list[str] = []
    sink.subscribe(lambda ev: seen.append(ev.detail or "") if ev.kind == "network" else None)
    outs = [echo(f"n{i}") for i in range(30)]

    async def produce() -> None:
        for o in outs:
            await sink.send(o)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(produce())
    await wait_for(lambda: len(room.replica_inbox) >= 5)
    room.drop_network(0.3, call_state_changes=call_state_changes)
    await asyncio.wait_for(task, 5)
    assert texts(room) == [f"n{i}" for i in range(30)]
    assert "interrupted" in seen and seen[-1] == "connected"
    assert sink.room.network == "connected"
    await sink.close()


async def test_conversation_ended_server_side_stops_cleanly() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await started_sink(make_settings(room))
    await wait_for(sink.is_ready)
    room.replica.leave()
    await wait_for(lambda: not sink.is_ready())
    pending = await sink.submit(echo("queued while the replica is gone"))
    room.end_conversation()
    await asyncio.wait_for(sink.ended.wait(), 2)
    assert "call state left" in (sink.ended_reason or "")
    with pytest.raises(SinkError, match="conversation ended"):
        await asyncio.wait_for(pending, 2)
    with pytest.raises(SinkError, match="conversation ended"):
        await sink.send(echo("after the end"))
    await asyncio.wait_for(sink.close(), 3)


async def test_message_in_flight_when_the_conversation_ends_is_settled_by_its_completion() -> None:
    """The call ends after a message reached the replica but before the SDK reported the send: it
    counts as delivered (it was), while what was still queued behind it is undeliverable."""
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    room.completion_delay_s = 0.4
    sink = await started_sink(make_settings(room))
    await wait_for(sink.is_ready)
    first = await sink.submit(echo("already on the wire."))
    second = await sink.submit(echo("still queued."))
    await wait_for(lambda: len(room.replica_inbox) == 1)
    room.end_conversation()
    await asyncio.wait_for(sink.ended.wait(), 2)
    assert not first.done()  # the end does not settle a send the SDK has not reported yet
    await asyncio.wait_for(first, 2)  # delivered: no SinkError
    with pytest.raises(SinkError, match="conversation ended"):
        await asyncio.wait_for(second, 2)
    assert texts(room) == ["already on the wire."]
    assert sink.stats()["delivered"] == 1
    await asyncio.wait_for(sink.close(), 3)


async def test_shutdown_app_message_ends_too() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await started_sink(make_settings(room))
    await wait_for(sink.is_ready)
    room.replica.emit("system.shutdown", {"shutdown_reason": "max_call_duration reached"},
                      message_type="system")
    await asyncio.wait_for(sink.ended.wait(), 2)
    assert "max_call_duration" in (sink.ended_reason or "") and not sink.ended_with_error
    await sink.close()


# ------------------------------------------------------------------------------------ sizes
async def test_oversize_text_is_split_under_the_limit() -> None:
    room = FakeRoom.create(max_message_bytes=512)  # the stand-in refuses anything bigger
    room.add_replica(PERSONA)
    sink = await started_sink(make_settings(room, sink__max_message_bytes=512))
    await wait_for(sink.is_ready)
    text = " ".join(f"This is sentence number {i} with a few more words in it." for i in range(40))
    out = echo(text, inference_id="i" * 32)
    await asyncio.wait_for(sink.send(out), 3)
    assert len(room.replica_inbox) > 3
    assert room.largest_message_bytes <= 512
    assert all(protocol.serialized_size(m) <= 512 for m in room.replica_inbox)
    assert " ".join(texts(room)) == text
    assert {m["properties"]["inference_id"] for m in room.replica_inbox} == {"i" * 32}
    n = len(room.replica_inbox)
    assert [m["properties"]["done"] for m in room.replica_inbox] == [False] * (n - 1) + [True]
    assert out.message["properties"]["text"] == text  # the caller's message is not modified
    await sink.close()


async def test_oversize_audio_is_recut_and_unsplittable_is_refused() -> None:
    room = FakeRoom.create(max_message_bytes=1024)
    room.add_replica(PERSONA)
    sink = await started_sink(make_settings(room, sink__max_message_bytes=1024))
    await wait_for(sink.is_ready)
    pcm = (np.arange(4000) % 3000).astype("<i2")
    msg = protocol.echo_audio_chunk(pcm.tobytes(), 24000, None, "aud", done=True)
    await asyncio.wait_for(sink.send(Outgoing("echo", msg)), 3)
    got = room.replica_inbox
    assert len(got) > 1 and all(protocol.serialized_size(m) <= 1024 for m in got)
    audio = b"".join(base64.b64decode(m["properties"]["audio"]) for m in got)
    assert audio == pcm.tobytes()
    assert got[-1]["properties"]["done"] is True
    assert not any(m["properties"]["done"] for m in got[:-1])
    weird = {"message_type": "conversation", "event_type": "conversation.respond",
             "properties": {"text": "x" * 5000}}
    with pytest.raises(SinkError, match="max_message_bytes"):
        await sink.send(Outgoing("echo", weird))
    assert room.largest_message_bytes <= 1024
    await sink.close()


async def test_interrupt_goes_in_order() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await started_sink(make_settings(room))
    await wait_for(sink.is_ready)
    await sink.send(echo("one"))
    await sink.send(Outgoing("interrupt", protocol.interrupt(None)))
    await sink.send(echo("two"))
    assert [m["event_type"] for m in room.replica_inbox] == [protocol.ECHO, protocol.INTERRUPT, protocol.ECHO]
    assert room.replica_inbox[1] == {"message_type": "conversation", "event_type": "conversation.interrupt",
                                     "conversation_id": room.conversation_id}
    await sink.close()


# ------------------------------------------------------------------------------------ events
async def test_replica_events_update_room_state_and_reach_subscribers() -> None:
    room = FakeRoom.create()
    metrics = Metrics()
    sink = DailySink(make_settings(room), metrics, daily_module=FAKE)
    events: list[Any] = []
    sink.subscribe(events.append)  # before start() works too
    await sink.start()
    replica = room.add_replica(PERSONA)
    await wait_for(sink.is_ready)
    replica.started_speaking("inf-1")
    await wait_for(lambda: sink.room.replica_speaking)
    started = [e for e in events if e.kind == "replica_started_speaking"]
    assert started and started[0].inference_id == "inf-1"
    replica.utterance("Hello there.", inference_id="inf-1")
    replica.emit_raw({"message_type": "conversation", "event_type": "conversation.utterance", "seq": 2,
                      "properties": {"role": "pal", "speech": "Hello there."}})  # duplicate seq (PAL twice)
    replica.emit_raw("not an object")
    replica.emit_raw([1, 2, 3])
    replica.emit("conversation.something_new", {"x": 1})
    replica.emit_raw({"event_type": 5})
    replica.stopped_speaking("inf-1", duration=1.2)
    await wait_for(lambda: not sink.room.replica_speaking)
    conn = sink.connection
    assert conn is not None
    assert conn.unknown_events == 4 and conn.duplicate_events == 1
    utterances = [e for e in events if e.kind == "utterance"]
    assert len(utterances) == 1 and utterances[0].text == "Hello there." and utterances[0].role == "replica"
    kinds = [e["kind"] for e in sink.room.last_events]
    assert kinds[0] == "replica_started_speaking" and kinds[-1] == "replica_stopped_speaking"
    assert metrics.value("echo_relay_room_events_total",
                         {"event_type": "conversation.replica.started_speaking"}) == 1
    assert metrics.value("echo_relay_room_events_total", {"event_type": "other"}) == 4
    await sink.close()


# ------------------------------------------------------------------------------------ lifecycle
async def test_close_leaves_and_releases_but_keeps_a_given_conversation() -> None:
    from pipeline.testing.fake_tavus import FakeTavusServer
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    with FakeTavusServer(api_key="k") as server:
        settings = make_settings(room, tavus__api_url=server.url, tavus__api_key="k")
        sink = await started_sink(settings)
        before = fake_daily.sdk_state()["live_clients"]
        await wait_for(sink.is_ready)
        await sink.send(echo("x"))
        await sink.close()
        assert room.clients() == []
        assert fake_daily.sdk_state()["live_clients"] == before - 1
        assert sink.connection is not None and sink.connection.client is None
        assert server.count() == 0  # never touched the API: we did not create the conversation


async def test_provisions_a_conversation_and_ends_it_on_close() -> None:
    from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer
    FakeRoom.set_autocreate(lambda room: room.add_replica("Created Persona", delay_s=0.05))
    with FakeTavusServer(api_key="k") as server:
        settings = make_settings(None, tavus__api_url=server.url, tavus__api_key="k",
                                 tavus__persona_name="Created Persona", tavus__replica_id=FAKE_REPLICA_ID,
                                 tavus__max_call_duration=600, tavus__participant_left_timeout=10)
        sink = await started_sink(settings)
        cid = sink.conversation_id
        assert cid is not None and sink.created_conversation
        conv = server.conversation(cid)
        assert conv["status"] == "active" and conv["replica_id"] == FAKE_REPLICA_ID
        assert conv["properties"] == {"max_call_duration": 600, "participant_left_timeout": 10}
        persona = server.personas[conv["persona_id"]]
        assert persona["pipeline_mode"] == "echo" and persona["persona_name"] == "Created Persona"
        await asyncio.wait_for(sink.send(echo("provisioned")), 3)
        room = FakeRoom.lookup(conv["conversation_url"])
        assert room is not None and texts(room) == ["provisioned"]
        assert room.replica_inbox[0]["conversation_id"] == cid
        await sink.close()
        assert server.conversation(cid)["status"] == "ended" and server.end_calls(cid) == 1


async def test_reuses_persona_id_and_recognises_the_replica_by_its_name() -> None:
    from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer
    with FakeTavusServer(api_key="k") as server:
        persona = server.add_persona("Stored Persona Name")
        FakeRoom.set_autocreate(lambda room: room.add_replica("Stored Persona Name"))
        settings = make_settings(None, tavus__api_url=server.url, tavus__api_key="k",
                                 tavus__persona_id=persona["persona_id"], tavus__replica_id=FAKE_REPLICA_ID,
                                 sink__daily__end_conversation_on_exit=False)
        sink = await started_sink(settings)
        assert sink.persona_name == "Stored Persona Name"
        await wait_for(sink.is_ready)
        assert server.count("POST /v2/personas") == 0
        cid = sink.conversation_id
        await sink.close()
        assert server.conversation(cid or "")["status"] == "active"  # end_conversation_on_exit=false


async def test_start_errors_are_clear() -> None:
    with pytest.raises(SinkError, match="Failed to parse url"):
        await started_sink(make_settings(None, tavus__conversation_url="not a url"))
    with pytest.raises(SinkError, match=r"tavus\.api_key"):
        await started_sink(make_settings(None))
    from pipeline.testing.fake_tavus import FakeTavusServer
    with FakeTavusServer(api_key="right") as server:
        with pytest.raises(SinkError, match="Tavus API") as err:
            await started_sink(make_settings(None, tavus__api_url=server.url, tavus__api_key="wrong-secret"))
        assert "wrong-secret" not in str(err.value)


async def test_close_gives_up_what_cannot_drain() -> None:
    room = FakeRoom.create()
    sink = await started_sink(make_settings(room, sink__daily__replica_timeout_s=30))
    fut = await sink.submit(echo("stuck"))
    t0 = time.monotonic()
    await sink.close(drain_timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    with pytest.raises(SinkError, match="drain"):
        await fut
    assert sink.given_up == 1 and room.clients() == []


async def test_pending_queue_is_bounded_and_waits_in_order() -> None:
    room = FakeRoom.create()
    sink = await started_sink(make_settings(room, sink__daily__pending_max=2))
    f1 = await sink.submit(echo("a"))
    f2 = await sink.submit(echo("b"))
    third = asyncio.ensure_future(sink.submit(echo("c")))
    await asyncio.sleep(0.05)
    assert not third.done() and sink.pending == 2  # full: the third caller waits (nothing dropped)
    room.add_replica(PERSONA)
    f3 = await asyncio.wait_for(third, 2)
    await asyncio.wait_for(asyncio.gather(f1, f2, f3), 2)
    assert texts(room) == ["a", "b", "c"]
    await sink.close()


async def test_cancelled_send_is_withdrawn() -> None:
    room = FakeRoom.create()
    metrics = Metrics()
    sink = DailySink(make_settings(room), metrics, daily_module=FAKE)
    await sink.start()
    task = asyncio.ensure_future(sink.send(echo("withdrawn")))
    await asyncio.sleep(0.05)
    task.cancel()
    keep = await sink.submit(echo("kept"))
    room.add_replica(PERSONA)
    await asyncio.wait_for(keep, 2)
    assert texts(room) == ["kept"]
    assert metrics.value("echo_relay_dropped_total", {"stage": "sink", "reason": "cancelled"}) == 1
    await sink.close()


# ------------------------------------------------------------------------------------ init once
async def test_daily_init_runs_once_with_two_sinks_and_a_source() -> None:
    from pipeline.source.daily import DailySource
    was = fake_daily.sdk_state()
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    settings = make_settings(room)
    a = await started_sink(settings)
    b = await started_sink(settings)
    src = DailySource(settings, daily_module=FAKE, room=None)
    daily_room.share_connection(None)  # force the source to join on its own
    await src.start()
    now = fake_daily.sdk_state()
    assert now["init_calls"] - was["init_calls"] == (0 if was["initialized"] else 1)
    assert now["initialized"] and len(room.clients()) == 3
    await src.close()
    await a.close()
    await b.close()


def test_daily_init_once_in_a_fresh_process_with_the_env_var() -> None:
    """A clean interpreter: two sinks and a source, module chosen by ECHO_RELAY_DAILY_MODULE."""
    script = textwrap.dedent(f"""
        import asyncio, json
        from pipeline.config import Settings
        from pipeline.metrics import Metrics
        from pipeline.sink.daily import DailySink
        from pipeline.source.daily import DailySource
        from pipeline.testing import fake_daily
        from pipeline.testing.fake_daily import FakeRoom
        from pipeline import daily_room

        async def main():
            room = FakeRoom.create()
            room.add_replica({PERSONA!r})
            s = Settings.model_validate(
                {{"tavus": {{"conversation_url": room.url, "persona_name": {PERSONA!r}}}}})
            sinks = [DailySink(s, Metrics()), DailySink(s, Metrics())]
            for sink in sinks:
                await sink.start()
            daily_room.share_connection(None)
            src = DailySource(s)
            await src.start()
            for sink in sinks:
                await sink.send(__import__("pipeline.sink.base", fromlist=["Outgoing"]).Outgoing(
                    "echo", {{"message_type": "conversation", "event_type": "conversation.echo",
                             "properties": {{"modality": "text", "text": "hi", "done": True}}}}))
            await src.close()
            for sink in sinks:
                await sink.close()
            print(json.dumps({{**fake_daily.sdk_state(), "inbox": len(room.replica_inbox)}}))

        asyncio.run(main())
    """)
    env = {**__import__("os").environ, daily_room.DAILY_MODULE_ENV: FAKE}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["init_calls"] == 1 and state["live_clients"] == 0 and state["inbox"] == 2
