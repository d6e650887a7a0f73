"""DailySink against the daily-python stand-in (and the fake Tavus server when it provisions).

The sink sends ONE message as given: `send()` returns when daily-python accepted it and raises
SinkError(reason) when it gives up. The relay (`pipeline.delivery`) owns the queue and the order, and
`pipeline.protocol` sizes the messages and stamps the conversation id, so these tests send messages
one after the other, built the way the relay builds them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest

from pipeline import daily_room, protocol
from pipeline.config import Settings, set_dotted
from pipeline.logs import current_log_context
from pipeline.metrics import Metrics
from pipeline.sink.base import Outgoing, SinkError
from pipeline.sink.daily import DailySink, SinkPhase, ended_with_error
from pipeline.testing import fake_daily
from pipeline.testing.fake_daily import FakeRoom

FAKE = "pipeline.testing.fake_daily"
PERSONA = "Echo Persona"
SEND_FAILED = "AppMessage(Signalling(SendFailed))"
REPLICA_ABSENT = "the replica 'Echo Persona' is not in the Daily room"


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


def echo(text: str, cid: str | None = None, inference_id: str | None = None, done: bool = True) -> Outgoing:
    """A text echo as the relay hands it over: built (and stamped with `cid`) by pipeline.protocol."""
    message = protocol.echo_text(text, cid, inference_id or protocol.new_inference_id(), done)
    return Outgoing("echo", message, utterance_id="u1", text=text)


def interrupt(cid: str | None) -> Outgoing:
    return Outgoing("interrupt", protocol.interrupt(cid))


def texts(room: FakeRoom) -> list[str]:
    return [m["properties"]["text"] for m in room.replica_inbox if m.get("event_type") == protocol.ECHO]


def event_types(room: FakeRoom) -> list[str]:
    """What any participant was sent, in order (the replica's inbox misses sends made while it was away)."""
    return [m.get("event_type") for _, _, m in room.messages if isinstance(m, dict)]


async def wait_for(pred: Callable[[], Any], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def refused_at_once(send: Coroutine[Any, Any, None]) -> SinkError:
    """Run a send's first step only: a refusal raises there, before the send waits on anything
    (a wall-clock bound would be flaky on a busy CI machine)."""
    try:
        send.send(None)
    except SinkError as exc:
        return exc
    except StopIteration:
        raise AssertionError("the send succeeded instead of failing at once") from None
    send.close()
    raise AssertionError("the send waited instead of failing at once")


async def started_sink(settings: Settings, metrics: Metrics | None = None, **kw: Any) -> DailySink:
    sink = DailySink(settings, metrics or Metrics(), daily_module=FAKE, **kw)
    await sink.start()
    return sink


async def ready_sink(room: FakeRoom, metrics: Metrics | None = None, **dotted: Any) -> DailySink:
    """A started sink in `room` (which has the replica), once the replica is seen."""
    sink = await started_sink(make_settings(room, **dotted), metrics)
    await wait_for(sink.is_ready)
    return sink


# ------------------------------------------------------------------------------------ readiness
async def test_sends_wait_for_the_replica_then_go_in_order() -> None:
    room = FakeRoom.create(join_delay_s=0.05)
    sink = DailySink(make_settings(room), Metrics(), daily_module=FAKE)
    assert sink.phase is SinkPhase.NEW and sink.blocked_reason() == "the Daily room was not joined yet"
    await sink.start()
    assert sink.phase is SinkPhase.OPEN and sink.room.joined and not sink.is_ready()
    assert REPLICA_ABSENT in (sink.blocked_reason() or "")
    # the relay's task (and the tasks it starts next) logs with the conversation id (JSON logs)
    assert current_log_context()["conversation_id"] == room.conversation_id
    outs = [echo(f"message {i}.", room.conversation_id) for i in range(4)]

    async def relay() -> None:  # the relay sends one message after the other
        for out in outs:
            await sink.send(out)

    task = asyncio.create_task(relay())
    await asyncio.sleep(0.1)
    assert not task.done() and room.messages == []  # nothing is sent while the replica is absent
    room.add_replica(PERSONA, delay_s=0.05)
    await asyncio.wait_for(task, 3)
    assert room.replica_inbox == [o.message for o in outs]  # in order, exactly as given
    assert {m["conversation_id"] for m in room.replica_inbox} == {room.conversation_id}
    assert sink.is_ready() and sink.blocked_reason() is None
    assert sink.conversation_id == room.conversation_id and sink.delivered == 4 and sink.given_up == 0
    await sink.close()
    assert sink.phase is SinkPhase.CLOSED


async def test_replica_already_in_the_room_is_recognised_from_join_data() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    await asyncio.sleep(0.05)
    sink = await started_sink(make_settings(room))
    assert sink.is_ready() and sink.room.replica_present  # at once: from the join data, no event needed
    await asyncio.wait_for(sink.send(echo("hi", room.conversation_id)), 2)
    assert texts(room) == ["hi"]
    await sink.close()


async def test_replica_never_joins_fails_naming_the_replica_then_recovers(
        caplog: pytest.LogCaptureFixture) -> None:
    room = FakeRoom.create()
    room.add_speaker("somebody else", np.zeros(0, dtype=np.int16))  # a participant, not the replica
    caplog.set_level(logging.ERROR, logger="pipeline.sink.daily")
    sink = await started_sink(make_settings(room, sink__daily__replica_timeout_s=0.3))
    t0 = time.monotonic()
    with pytest.raises(SinkError) as err:
        await asyncio.wait_for(sink.send(echo("lost")), 3)
    assert time.monotonic() - t0 >= 0.25  # it did wait for the replica first
    assert REPLICA_ABSENT in str(err.value) and "sink.daily.replica_timeout_s=0.3" in str(err.value)
    assert sink.given_up == 1
    # Later sends fail at once while the replica is still absent.
    again = refused_at_once(sink.send(echo("too late")))
    assert REPLICA_ABSENT in str(again) and "sink.daily.replica_timeout_s=0.3" in str(again)
    assert sink.given_up == 2
    blocked = sink.blocked_reason() or ""
    assert REPLICA_ABSENT in blocked and "waited" in blocked
    assert event_types(room) == []  # nothing went to the other participant either
    # Said once in the log even for a relay that sends nothing (the replica watcher).
    await wait_for(lambda: "echoes fail until it is ready" in caplog.text)
    assert REPLICA_ABSENT in caplog.text
    room.add_replica(PERSONA)  # it finally comes: sending works again
    await wait_for(sink.is_ready)
    assert sink.blocked_reason() is None
    await asyncio.wait_for(sink.send(echo("back", room.conversation_id)), 2)
    assert texts(room) == ["back"] and sink.delivered == 1 and sink.given_up == 2
    await sink.close()


async def test_a_send_waits_while_the_replica_rejoins() -> None:
    room = FakeRoom.create()
    replica = room.add_replica(PERSONA)
    sink = await ready_sink(room, sink__daily__replica_timeout_s=3.0)
    first_id = sink.connection.tracker.replica_id if sink.connection else None
    replica.leave()
    await wait_for(lambda: not sink.is_ready())
    assert REPLICA_ABSENT in (sink.blocked_reason() or "")
    task = asyncio.ensure_future(sink.send(echo("after the rejoin", room.conversation_id)))
    await asyncio.sleep(0.1)
    assert not task.done() and room.replica_inbox == []
    replica.rejoin(delay_s=0.05)  # back under a new participant id, recognised by its name
    await asyncio.wait_for(task, 3)
    assert texts(room) == ["after the rejoin"]
    assert sink.connection is not None and sink.connection.tracker.replica_id not in (None, first_id)
    await sink.close()


# ------------------------------------------------------------------------------------ failures
async def test_transient_send_failures_are_retried_without_duplicates() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    sink = await ready_sink(room, metrics)
    room.fail_sends(2, error=SEND_FAILED)
    outs = [echo(f"m{i}", room.conversation_id) for i in range(3)]
    for o in outs:
        await asyncio.wait_for(sink.send(o), 3)
    assert room.replica_inbox == [o.message for o in outs]  # once each, in order
    assert metrics.value("echo_relay_send_retries_total") == 2
    assert sink.given_up == 0 and sink.delivered == 3 and sink.blocked_reason() is None
    await sink.close()


async def test_permanent_failure_gives_up_at_the_deadline_then_the_next_send_works() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    sink = await ready_sink(room, metrics, sink__daily__send_deadline_s=0.3)
    room.fail_sends(10_000, error=SEND_FAILED)
    t0 = time.monotonic()
    task = asyncio.ensure_future(sink.send(echo("never arrives", room.conversation_id)))
    # While it is being retried, blocked_reason says so, with the error.
    await wait_for(lambda: metrics.value("echo_relay_send_retries_total") >= 1)
    assert sink.blocked_reason() == f"sends are failing and being retried (last error: {SEND_FAILED})"
    with pytest.raises(SinkError) as err:
        await asyncio.wait_for(task, 3)
    assert 0.25 < time.monotonic() - t0 < 3
    reason = str(err.value)
    assert reason.startswith("send failed ") and "sink.daily.send_deadline_s=0.3" in reason
    assert reason.endswith(f"last error: {SEND_FAILED}")
    assert sink.given_up == 1 and metrics.value("echo_relay_send_retries_total") >= 2
    assert sink.blocked_reason() is None and room.replica_inbox == []
    room.clear_send_failures()
    await asyncio.wait_for(sink.send(echo("next one", room.conversation_id)), 2)
    assert texts(room) == ["next one"]
    await sink.close()


async def test_a_message_the_sdk_refuses_is_given_up_at_once_without_retry() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    sink = await ready_sink(room, metrics, sink__daily__send_deadline_s=30)
    bad = {"message_type": "conversation", "event_type": protocol.ECHO, "properties": {"x": object()}}
    with pytest.raises(SinkError, match="daily-python refused the app-message: unsupported type object"):
        await asyncio.wait_for(sink.send(Outgoing("echo", bad)), 2)
    wrong = refused_at_once(sink.send(Outgoing("echo", ["not", "an", "object"])))  # type: ignore[arg-type]
    assert str(wrong) == "outgoing message must be a JSON object, got list"
    assert metrics.value("echo_relay_send_retries_total") == 0  # retrying cannot help
    assert sink.given_up == 2 and room.messages == []
    await asyncio.wait_for(sink.send(echo("fine", room.conversation_id)), 2)
    assert texts(room) == ["fine"]
    await sink.close()


@pytest.mark.parametrize("call_state_changes", [False, True])
async def test_network_drop_mid_stream_loses_nothing_and_keeps_order(call_state_changes: bool) -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room, sink__daily__send_deadline_s=3.0)
    seen: list[str] = []
    sink.subscribe(lambda ev: seen.append(ev.detail or "") if ev.kind == "network" else None)
    outs = [echo(f"n{i}", room.conversation_id) for i in range(30)]

    async def produce() -> None:
        for o in outs:
            await sink.send(o)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(produce())
    await wait_for(lambda: len(room.replica_inbox) >= 5)
    room.drop_network(0.3, call_state_changes=call_state_changes)
    await asyncio.wait_for(task, 5)
    assert texts(room) == [f"n{i}" for i in range(30)]  # none lost, none twice, in order
    assert "interrupted" in seen and seen[-1] == "connected"
    assert sink.room.network == "connected" and sink.given_up == 0
    await sink.close()


async def test_network_outage_pauses_sending_and_blocked_reason_says_so() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room, sink__daily__send_deadline_s=5.0)
    room.drop_network(None)
    await wait_for(lambda: not sink.is_ready())
    assert (sink.blocked_reason() or "").startswith("the Daily connection has been down for ")
    task = asyncio.ensure_future(sink.send(echo("after the outage", room.conversation_id)))
    await asyncio.sleep(0.1)
    assert not task.done() and room.messages == []  # paused, not failing into the outage
    room.restore_network()
    await asyncio.wait_for(task, 3)
    assert texts(room) == ["after the outage"] and sink.given_up == 0
    assert sink.blocked_reason() is None
    await sink.close()


async def test_outage_longer_than_the_deadline_gives_up_then_fails_at_once_until_back() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room, sink__daily__send_deadline_s=0.3)
    room.drop_network(None)
    await wait_for(lambda: not sink.is_ready())
    with pytest.raises(SinkError, match=r"the Daily connection stayed down past sink\.daily\.send_deadline_s=0\.3 s"):
        await asyncio.wait_for(sink.send(echo("lost in the outage")), 3)
    down = refused_at_once(sink.send(echo("still down")))
    assert str(down).startswith("the Daily connection has been down for ")
    assert "(sink.daily.send_deadline_s)" in str(down)
    assert sink.given_up == 2
    room.restore_network()
    await wait_for(sink.is_ready)
    await asyncio.wait_for(sink.send(echo("back", room.conversation_id)), 2)
    assert texts(room) == ["back"]
    await sink.close()


async def test_a_cancelled_send_sends_nothing_and_leaves_the_sink_usable() -> None:
    """The relay cancels the active send on an interrupt: nothing of it may arrive later."""
    room = FakeRoom.create()
    sink = await started_sink(make_settings(room, sink__daily__replica_timeout_s=5.0))
    waiting = asyncio.ensure_future(sink.send(echo("cancelled while waiting")))
    await asyncio.sleep(0.05)
    waiting.cancel()
    room.add_replica(PERSONA)
    await wait_for(sink.is_ready)
    room.fail_sends(10_000, error=SEND_FAILED)
    retrying = asyncio.ensure_future(sink.send(echo("cancelled while retrying")))
    await wait_for(lambda: sink.blocked_reason() is not None)
    retrying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await retrying
    assert waiting.cancelled() and sink.blocked_reason() is None  # no stale retry state
    room.clear_send_failures()
    await asyncio.wait_for(sink.send(echo("kept", room.conversation_id)), 2)
    await asyncio.sleep(0.1)  # room for a stray retry of a cancelled send to show up
    assert texts(room) == ["kept"] and sink.delivered == 1 and sink.given_up == 0
    await sink.close()


# ------------------------------------------------------------------------------------ the end
async def test_conversation_ended_by_the_call_state_going_left_is_a_normal_end() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room, sink__daily__replica_timeout_s=30)
    room.replica.leave()
    await wait_for(lambda: not sink.is_ready())
    pending = asyncio.ensure_future(sink.send(echo("waiting while the replica is gone")))
    await asyncio.sleep(0.05)
    room.end_conversation()  # ended from the dashboard / the API, or the room deleted
    await asyncio.wait_for(sink.ended.wait(), 2)
    reason = sink.ended_reason or ""
    assert "call state left" in reason and "the replica left" in reason
    assert sink.ended_with_error is False  # a normal end, not an error
    with pytest.raises(SinkError, match=r"^the conversation ended \(removed from the Daily room"):
        await asyncio.wait_for(pending, 2)
    after = refused_at_once(sink.send(echo("after the end")))
    assert str(after) == f"the conversation ended ({reason})"
    assert str(refused_at_once(sink.send(interrupt(room.conversation_id)))).startswith("the conversation ended")
    assert sink.blocked_reason() == f"the conversation ended ({reason})"
    assert sink.given_up == 3 and room.replica_inbox == []
    await asyncio.wait_for(sink.close(), 3)
    assert sink.phase is SinkPhase.CLOSED


@pytest.mark.parametrize(("shutdown_reason", "how", "is_error"), [
    ("max_call_duration reached", "message", False),
    ("exception_encountered_during_conversation_startup", "message", True),
    ("participant_left_timeout reached", "end", False),
    ("bot_could_not_join_meeting_it_was_probably_ended", "end", True),
])
async def test_shutdown_app_message_ends_the_conversation(shutdown_reason: str, how: str, is_error: bool) -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room)
    if how == "message":  # the app-message alone (the call state still says joined)
        room.replica.emit("system.shutdown", {"shutdown_reason": shutdown_reason}, message_type="system")
    else:  # Tavus's whole sequence: shutdown message, the replica leaves, we are removed from the call
        room.end_conversation(shutdown_message=True, reason=shutdown_reason)
    await asyncio.wait_for(sink.ended.wait(), 2)
    assert sink.ended_reason == f"Tavus shut the conversation down ({shutdown_reason})"
    assert sink.ended_with_error is is_error
    with pytest.raises(SinkError, match=r"^the conversation ended \(Tavus shut the conversation down"):
        await asyncio.wait_for(sink.send(echo("after the shutdown")), 2)
    assert room.replica_inbox == []
    await asyncio.wait_for(sink.close(), 3)


def test_which_shutdown_reasons_are_errors() -> None:
    for normal in (None, "", "max_call_duration reached", "participant_left_timeout reached",
                   "participant_absent_timeout reached", "end_conversation_endpoint_hit"):
        assert ended_with_error(normal) is False, normal
    for error in ("exception_encountered_during_conversation_startup",
                  "bot_could_not_join_meeting_it_was_probably_ended", "internal error at step 3",
                  "Internal Error"):
        assert ended_with_error(error) is True, error


async def test_message_in_flight_when_the_conversation_ends_is_settled_by_its_completion() -> None:
    """The call ends after a message reached the replica but before the SDK reported the send: it
    counts as delivered (it was); the next one fails with the end."""
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room)
    room.completion_delay_s = 0.4
    first = asyncio.ensure_future(sink.send(echo("already on the wire.", room.conversation_id)))
    await wait_for(lambda: len(room.replica_inbox) == 1)
    room.end_conversation()
    await asyncio.wait_for(sink.ended.wait(), 2)
    assert not first.done()  # the end does not settle a send the SDK has not reported yet
    await asyncio.wait_for(first, 2)  # delivered: no SinkError
    with pytest.raises(SinkError, match="conversation ended"):
        await asyncio.wait_for(sink.send(echo("too late.")), 2)
    assert texts(room) == ["already on the wire."]
    assert sink.stats()["delivered"] == 1 and sink.stats()["given_up"] == 1
    await asyncio.wait_for(sink.close(), 3)


# ------------------------------------------------------------------------------------ interrupts
async def test_interrupt_goes_where_it_is_sent_as_given() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    sink = await ready_sink(room)
    cid = sink.conversation_id
    await sink.send(echo("one", cid))
    await sink.send(interrupt(cid))
    await sink.send(echo("two", cid))
    assert [m["event_type"] for m in room.replica_inbox] == [protocol.ECHO, protocol.INTERRUPT, protocol.ECHO]
    assert room.replica_inbox[1] == {"message_type": "conversation", "event_type": "conversation.interrupt",
                                     "conversation_id": room.conversation_id}
    assert sink.delivered == 3
    await sink.close()


async def test_interrupt_without_the_replica_fails_at_once() -> None:
    room = FakeRoom.create()
    unstarted = DailySink(make_settings(room), Metrics(), daily_module=FAKE)
    assert str(refused_at_once(unstarted.send(interrupt(None)))) == "the Daily sink was not started"
    sink = await started_sink(make_settings(room, sink__daily__replica_timeout_s=30))
    err = refused_at_once(sink.send(interrupt(room.conversation_id)))  # no wait for the replica
    assert str(err).startswith("nothing to interrupt: ") and REPLICA_ABSENT in str(err)
    t0 = time.monotonic()  # and awaited as the relay does: far below replica_timeout_s
    with pytest.raises(SinkError, match=r"^nothing to interrupt: "):
        await sink.send(interrupt(room.conversation_id))
    assert time.monotonic() - t0 < 1
    assert sink.given_up == 2 and room.messages == []
    room.add_replica(PERSONA)  # an interrupt that failed is not sent later either
    await wait_for(sink.is_ready)
    await asyncio.sleep(0.05)
    assert room.replica_inbox == []
    await sink.close()


async def test_interrupt_is_sent_once_even_when_the_send_fails() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    sink = await ready_sink(room, metrics, sink__daily__send_deadline_s=5.0)
    room.fail_sends(1, error=SEND_FAILED)
    with pytest.raises(SinkError) as err:
        await asyncio.wait_for(sink.send(interrupt(room.conversation_id)), 2)
    assert str(err.value) == f"interrupt not sent: {SEND_FAILED}"
    await asyncio.sleep(0.1)  # room for a retry to show up, if there were one
    assert room.replica_inbox == [] and metrics.value("echo_relay_send_retries_total") == 0
    assert sink.given_up == 1
    # The failure took one send: the next interrupt goes out, exactly once.
    await asyncio.wait_for(sink.send(interrupt(room.conversation_id)), 2)
    assert room.replica_inbox == [protocol.interrupt(room.conversation_id)]
    await sink.close()


# ------------------------------------------------------------------------------------ sizes
async def test_text_echoes_built_by_protocol_fit_and_are_sent_as_given() -> None:
    room = FakeRoom.create(max_message_bytes=512)  # the stand-in refuses anything bigger
    room.add_replica(PERSONA)
    sink = await ready_sink(room)
    text = " ".join(f"This is sentence number {i} with a few more words in it." for i in range(40))
    messages = protocol.text_echoes(text, sink.conversation_id, "i" * 32, max_bytes=512)
    assert len(messages) > 3
    given = [json.loads(json.dumps(m)) for m in messages]  # to check that the sink changes nothing
    for m in messages:
        await asyncio.wait_for(sink.send(Outgoing("echo", m)), 3)
    assert room.replica_inbox == given and messages == given
    assert room.largest_message_bytes <= 512 - protocol.ENVELOPE_HEADROOM_BYTES
    assert " ".join(texts(room)) == text
    assert [m["properties"]["done"] for m in room.replica_inbox] == [False] * (len(given) - 1) + [True]
    assert sink.delivered == len(given)
    await sink.close()


async def test_audio_echoes_built_by_protocol_arrive_whole() -> None:
    room = FakeRoom.create(max_message_bytes=1024)
    room.add_replica(PERSONA)
    sink = await ready_sink(room)
    pcm = (np.arange(4000) % 3000).astype("<i2")
    messages = protocol.audio_echoes(pcm, 24000, sink.conversation_id, "aud", max_bytes=1024)
    for m in messages:
        await asyncio.wait_for(sink.send(Outgoing("echo", m)), 3)
    got = room.replica_inbox
    assert got == messages and room.largest_message_bytes <= 1024
    audio = b"".join(base64.b64decode(m["properties"]["audio"]) for m in got)
    closing = base64.b64decode(got[-1]["properties"]["audio"])
    assert audio == pcm.tobytes() + closing and set(closing) == {0}  # the speech, then closing silence
    assert [m["properties"]["done"] for m in got] == [False] * (len(got) - 1) + [True]
    await sink.close()


async def test_an_oversize_message_is_not_cut_by_the_sink() -> None:
    """Sizing is pipeline.protocol's job: the sink sends what it is given, and the room refuses it whole."""
    room = FakeRoom.create(max_message_bytes=512)
    room.add_replica(PERSONA)
    sink = await ready_sink(room, sink__daily__send_deadline_s=0.3)
    big = echo("x" * 5000, room.conversation_id)
    with pytest.raises(SinkError, match=r"last error: AppMessage\(Signalling\(MessageTooLarge\)\)"):
        await asyncio.wait_for(sink.send(big), 3)
    assert room.messages == [] and room.largest_message_bytes == 0  # no piece of it went out
    assert big.message["properties"]["text"] == "x" * 5000
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
    assert conn.tracker.unknown_events == 4 and conn.tracker.duplicate_events == 1
    assert sink.stats()["unknown_room_events"] == 4 and sink.stats()["duplicate_room_events"] == 1
    utterances = [e for e in events if e.kind == "utterance"]
    assert len(utterances) == 1 and utterances[0].text == "Hello there." and utterances[0].role == "replica"
    kinds = [e["kind"] for e in sink.room.last_events]
    assert kinds[0] == "replica_started_speaking" and kinds[-1] == "replica_stopped_speaking"
    assert metrics.value("echo_relay_room_events_total",
                         {"event_type": "conversation.replica.started_speaking"}) == 1
    assert metrics.value("echo_relay_room_events_total", {"event_type": "other"}) == 4
    # Bounded: a peer's own event types are "other"; every known type has its series from the start.
    labels = {s.labels["event_type"]: s.value for f in metrics.registry.collect() if f.name == "echo_relay_room_events"
              for s in f.samples if s.name.endswith("_total")}
    assert set(labels) == {*daily_room.ROOM_EVENT_TYPES, "other"}, labels
    assert labels["system.shutdown"] == 0
    await sink.close()


# ------------------------------------------------------------------------------------ lifecycle
@pytest.mark.parametrize("state", ["waiting for the replica", "retrying", "network down", "completion pending"])
async def test_a_send_in_flight_during_close_ends_and_never_hangs(state: str) -> None:
    room = FakeRoom.create()
    if state != "waiting for the replica":
        room.add_replica(PERSONA)
    metrics = Metrics()
    # Every wait is far longer than the test allows: only close() can end the send in time.
    sink = await started_sink(make_settings(room, sink__daily__replica_timeout_s=30,
                                            sink__daily__send_deadline_s=30), metrics)
    if state != "waiting for the replica":
        await wait_for(sink.is_ready)
    if state == "retrying":
        room.fail_sends(10_000, error=SEND_FAILED)
    elif state == "network down":
        room.drop_network(None)
        await wait_for(lambda: not sink.is_ready())
    elif state == "completion pending":
        room.completion_delay_s = 30  # reached the replica; daily-python has not reported it yet
    task = asyncio.ensure_future(sink.send(echo("in flight", room.conversation_id)))
    if state == "retrying":
        await wait_for(lambda: metrics.value("echo_relay_send_retries_total") >= 1)
    elif state == "completion pending":
        await wait_for(lambda: len(room.replica_inbox) == 1)
    else:
        await asyncio.sleep(0.05)
    assert not task.done()
    t0 = time.monotonic()
    await asyncio.wait_for(sink.close(), 3)
    try:
        await asyncio.wait_for(task, 2)
    except SinkError as exc:
        assert "closed" in str(exc)
        assert sink.given_up == 1
    else:  # allowed: daily-python reported the send before the room was released
        assert sink.delivered == 1
    assert time.monotonic() - t0 < 3
    assert str(refused_at_once(sink.send(echo("after close")))) == "the Daily sink is closed"
    assert str(refused_at_once(sink.send(interrupt(room.conversation_id)))) == "the Daily sink is closed"
    assert sink.phase is SinkPhase.CLOSED and room.clients() == []


async def test_close_leaves_and_releases_but_keeps_a_given_conversation() -> None:
    from pipeline.testing.fake_tavus import FakeTavusServer
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    with FakeTavusServer(api_key="k") as server:
        settings = make_settings(room, tavus__api_url=server.url, tavus__api_key="k")
        sink = await started_sink(settings)
        before = fake_daily.sdk_state()["live_clients"]
        await wait_for(sink.is_ready)
        assert not sink.created_conversation and sink.owned_conversation() is None
        await sink.send(echo("x", sink.conversation_id))
        await sink.close()
        await sink.close()  # idempotent
        assert sink.phase is SinkPhase.CLOSED and room.clients() == []
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
        assert cid is not None and sink.created_conversation and sink.owned_conversation() == cid
        conv = server.conversation(cid)
        assert conv["status"] == "active" and conv["replica_id"] == FAKE_REPLICA_ID
        assert conv["properties"] == {"max_call_duration": 600, "participant_left_timeout": 10,
                                      "language": "english"}  # asr.language en (docs/tavus.md "Language")
        persona = server.personas[conv["persona_id"]]
        assert persona["pipeline_mode"] == "echo" and persona["persona_name"] == "Created Persona"
        assert sink.persona_name == "Created Persona" and sink.conversation_url == conv["conversation_url"]
        await asyncio.wait_for(sink.send(echo("provisioned", cid)), 3)
        room = FakeRoom.lookup(conv["conversation_url"])
        assert room is not None and texts(room) == ["provisioned"]
        assert room.replica_inbox[0]["conversation_id"] == cid
        await sink.close()
        assert server.conversation(cid)["status"] == "ended" and server.end_calls(cid) == 1
        assert sink.owned_conversation() is None  # ended: nothing left to end


async def test_a_created_conversation_is_ended_when_the_join_fails() -> None:
    from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer
    with FakeTavusServer(api_key="k") as server:  # no fake room for its URL: the join fails
        settings = make_settings(None, tavus__api_url=server.url, tavus__api_key="k",
                                 tavus__replica_id=FAKE_REPLICA_ID)
        sink = DailySink(settings, Metrics(), daily_module=FAKE)
        with pytest.raises(SinkError, match="could not join the Daily room"):
            await sink.start()
        (cid,) = server.conversations
        assert server.conversation(cid)["status"] == "ended" and server.end_calls(cid) == 1
        assert sink.phase is SinkPhase.NEW and sink.owned_conversation() is None
        await sink.close()
        assert server.end_calls(cid) == 1  # not ended twice


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
        assert sink.created_conversation and sink.owned_conversation() is None  # kept on exit
        cid = sink.conversation_id
        await sink.close()
        assert server.conversation(cid or "")["status"] == "active"  # end_conversation_on_exit=false


async def test_start_errors_are_clear() -> None:
    with pytest.raises(SinkError, match="Failed to parse url"):
        await started_sink(make_settings(None, tavus__conversation_url="not a url"))
    unconfigured = DailySink(make_settings(None), Metrics(), daily_module=FAKE)
    with pytest.raises(SinkError, match=r"tavus\.api_key"):
        await unconfigured.start()
    assert unconfigured.phase is SinkPhase.NEW
    assert str(refused_at_once(unconfigured.send(echo("x")))) == "the Daily sink was not started"
    from pipeline.testing.fake_tavus import FakeTavusServer
    with FakeTavusServer(api_key="right") as server:
        with pytest.raises(SinkError, match="Tavus API") as err:
            await started_sink(make_settings(None, tavus__api_url=server.url, tavus__api_key="wrong-secret"))
        assert "wrong-secret" not in str(err.value)


# ------------------------------------------------------------------------------------ init once
async def test_daily_init_runs_once_with_two_sinks_and_two_sources() -> None:
    from pipeline.source.daily import DailySource
    was = fake_daily.sdk_state()
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    settings = make_settings(room)
    a = await started_sink(settings)
    b = await started_sink(settings)
    riding = DailySource(settings, daily_module=FAKE)
    riding.room_from = lambda: a.connection  # what build_relay wires when both are daily
    own = DailySource(settings, daily_module=FAKE)  # nothing to ride on: joins on its own
    await riding.start()
    await own.start()
    now = fake_daily.sdk_state()
    assert now["init_calls"] - was["init_calls"] == (0 if was["initialized"] else 1)
    assert now["initialized"] and len(room.clients()) == 3  # two sinks and the source on its own
    await riding.close()  # the sink still uses the room it shares
    assert len(room.clients()) == 3
    await asyncio.wait_for(a.send(echo("still there", a.conversation_id)), 2)
    assert texts(room) == ["still there"]
    await own.close()
    await a.close()
    await b.close()
    assert room.clients() == []


def test_daily_init_once_in_a_fresh_process_with_the_env_var() -> None:
    """A clean interpreter: two sinks and two sources (one in a sink's room), module chosen by
    ECHO_RELAY_DAILY_MODULE."""
    script = textwrap.dedent(f"""
        import asyncio, json
        from pipeline import protocol
        from pipeline.config import Settings
        from pipeline.metrics import Metrics
        from pipeline.sink.base import Outgoing
        from pipeline.sink.daily import DailySink
        from pipeline.source.daily import DailySource
        from pipeline.testing import fake_daily
        from pipeline.testing.fake_daily import FakeRoom

        async def main():
            room = FakeRoom.create()
            room.add_replica({PERSONA!r})
            s = Settings.model_validate(
                {{"tavus": {{"conversation_url": room.url, "persona_name": {PERSONA!r}}}}})
            sinks = [DailySink(s, Metrics()), DailySink(s, Metrics())]
            for sink in sinks:
                await sink.start()
            sources = [DailySource(s, room=sinks[0].connection), DailySource(s)]
            for src in sources:
                await src.start()
            clients = len(room.clients())
            for sink in sinks:
                await sink.send(Outgoing("echo", protocol.echo_text("hi", sink.conversation_id)))
            for src in sources:
                await src.close()
            for sink in sinks:
                await sink.close()
            print(json.dumps({{**fake_daily.sdk_state(), "inbox": len(room.replica_inbox),
                               "clients": clients}}))

        asyncio.run(main())
    """)
    env = {**os.environ, daily_room.DAILY_MODULE_ENV: FAKE}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    state = json.loads(proc.stdout.strip().splitlines()[-1])
    assert state["init_calls"] == 1 and state["live_clients"] == 0
    assert state["inbox"] == 2 and state["clients"] == 3
