"""Reliability: Daily room faults during real runs (real speech, VAD, tiny.en) through the real Daily
sink, against the daily-python stand-in (pipeline.testing.fake_daily) with a scripted Tavus replica.

Network interruption and reconnection, transient and permanent send failures, the replica leaving
and rejoining, an outage longer than the send deadline, and the conversation ended server-side.
What the replica received is compared with the relay's ledger: delivered means received, once, in order.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from faults import (
    FaultyAsr,
    Track,
    check_invariants,
    echo_text_of,
    inbox_echo_ids,
    make_track,
    poison_sends,
    real_engine,
    recording_daily_sink,
    relay_settings,
    run_relay,
    word_recall,
)

from pipeline.app import EXIT_OK, EXIT_RUNTIME, run_daemon
from pipeline.metrics import Metrics
from pipeline.testing.fake_daily import FakeRoom
from pipeline.wiring import build_relay

FAKE = "pipeline.testing.fake_daily"
PERSONA = "Echo Persona"


pytestmark = pytest.mark.usefixtures("clean_fake_daily")  # fresh rooms, no error inside a callback


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("daily") / "track.wav")


def room_settings(track: Track, room: FakeRoom, **dotted: Any) -> Any:
    base: dict[str, Any] = {
        "sink__spec": "daily", "sink__daily__module": FAKE, "sink__daily__join_timeout_s": 3.0,
        "sink__daily__replica_timeout_s": 5.0, "sink__daily__send_deadline_s": 5.0,
        "sink__daily__retry_initial_s": 0.02, "sink__daily__retry_max_s": 0.2,
        "tavus__conversation_url": room.url, "tavus__conversation_id": room.conversation_id,
        "tavus__persona_name": PERSONA, "sink__barge_in": "off",
    }
    return relay_settings(f"file:{track.path}", **{**base, **dotted})


async def wait_until(pred: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def run_in_room(track: Track, room: FakeRoom, during: Any = None, **dotted: Any) -> tuple[Any, Any]:
    metrics = Metrics()
    settings = room_settings(track, room, **dotted)
    sink = recording_daily_sink(settings, metrics)
    relay = await run_relay(settings, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics,
                            during=during, timeout_s=60)
    return relay, sink


def check_room(relay: Any, sink: Any, room: FakeRoom) -> None:
    """Delivered == received by the replica: same inference_ids, same order, each exactly once."""
    check_invariants(relay, sink.sent)
    received = inbox_echo_ids(room.replica_inbox)
    delivered = [o.message["properties"]["inference_id"] for o in sink.sent if o.event == "echo"]
    assert received == delivered
    assert len(set(received)) == len(received)
    assert {m["conversation_id"] for m in room.replica_inbox} <= {room.conversation_id}


def assert_all_clips(track: Track, room: FakeRoom) -> None:
    said = " ".join(echo_text_of(m) for m in room.replica_inbox)
    for seg in track.segments:
        assert word_recall(seg.reference, said) >= 0.6, (seg.reference, said)


@pytest.mark.parametrize("call_state_changes", [False, True])
async def test_network_interruption_mid_stream_then_reconnect(track: Track, call_state_changes: bool) -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)

    async def interrupt(relay: Any) -> None:
        await wait_until(lambda: len(room.replica_inbox) >= 1)
        room.drop_network(1.5, call_state_changes=call_state_changes)

    relay, sink = await run_in_room(track, room, interrupt)
    assert relay.ledger.delivered == relay.ledger.closed == len(track.segments), relay.ledger.as_dict()
    check_room(relay, sink, room)
    assert_all_clips(track, room)
    assert sink.room.network == "connected"


async def test_transient_send_failures_are_retried_without_duplicates(track: Track) -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)

    async def fail_some(relay: Any) -> None:
        await wait_until(lambda: len(room.replica_inbox) >= 1)
        room.fail_sends(3)

    relay, sink = await run_in_room(track, room, fail_some)
    assert relay.ledger.delivered == relay.ledger.closed == len(track.segments)
    assert relay.metrics.value("echo_relay_send_retries_total") == 3
    check_room(relay, sink, room)
    assert_all_clips(track, room)


async def test_permanent_send_failure_is_undeliverable_with_text_and_the_rest_delivered(
        track: Track, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    order: list[str] = []

    def third_echo(message: Any) -> bool:
        iid = message.get("properties", {}).get("inference_id")
        if iid not in order:
            order.append(iid)
        return len(order) >= 3 and iid == order[2]

    metrics = Metrics()
    settings = room_settings(track, room, sink__daily__send_deadline_s=0.5)
    sink = recording_daily_sink(settings, metrics)
    refused: list[Any] = []

    async def poison(relay: Any) -> None:  # runs once the relay started, i.e. the sink joined
        assert sink.connection is not None
        refused.append(poison_sends(sink.connection.client, third_echo))

    relay = await run_relay(settings, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics,
                            during=poison, timeout_s=60)
    ledger = relay.ledger
    assert ledger.undeliverable == 1 and ledger.delivered == ledger.closed - 1 == len(track.segments) - 1
    check_room(relay, sink, room)
    refused_msgs = refused[0]
    assert len(refused_msgs) >= 2  # retried until the deadline
    text = echo_text_of(refused_msgs[0])
    assert text and f"(text: {text!r})" in caplog.text  # the relay's log line names what was lost
    assert relay.metrics.value("echo_relay_send_retries_total") >= 1


async def test_replica_leaves_and_rejoins(track: Track, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    room = FakeRoom.create()
    replica = room.add_replica(PERSONA)

    async def leave_and_return(relay: Any) -> None:
        await wait_until(lambda: len(room.replica_inbox) >= 1)
        replica.rejoin(delay_s=1.5)  # leaves now, back in 1.5 s with a new session id

    relay, sink = await run_in_room(track, room, leave_and_return)
    assert relay.ledger.delivered == relay.ledger.closed == len(track.segments)
    check_room(relay, sink, room)
    assert_all_clips(track, room)
    assert "the replica 'Echo Persona' left the room" in caplog.text


async def test_outage_longer_than_the_send_deadline(track: Track, caplog: pytest.LogCaptureFixture) -> None:
    """Messages that cannot go out within sink.daily.send_deadline_s are given up (undeliverable, with
    their text); after the link is back, delivery resumes, in order."""
    caplog.set_level(logging.ERROR)
    room = FakeRoom.create()
    room.add_replica(PERSONA)

    async def outage(relay: Any) -> None:
        await wait_until(lambda: len(room.replica_inbox) >= 1)
        room.drop_network(None)
        # Until the sink has given up on a message (not a fixed time: how many echoes fall into a fixed
        # outage depends on the machine's decode speed), but at least 1.5 s.
        await asyncio.sleep(1.5)
        await wait_until(lambda: relay.ledger.undeliverable >= 1, timeout=30.0)
        room.restore_network()

    relay, sink = await run_in_room(track, room, outage, source__file__speed=8, sink__daily__send_deadline_s=0.6)
    ledger = relay.ledger
    assert ledger.undeliverable >= 1 and ledger.delivered >= 3, ledger.as_dict()
    assert ledger.closed == ledger.settled == len(track.segments)
    check_room(relay, sink, room)
    last = track.segments[-1]
    said = " ".join(echo_text_of(m) for m in room.replica_inbox)
    assert word_recall(last.reference, said) >= 0.6
    assert caplog.text.count("undeliverable echo u") == ledger.undeliverable


@pytest.mark.parametrize(("reason", "is_error"), [("end_conversation_endpoint_hit", False),
                                                  ("max_call_duration reached", False),
                                                  (None, False),  # no shutdown message: the call state left
                                                  ("exception_encountered_during_conversation_startup", True),
                                                  ("replica error: pipeline crashed", True)])
async def test_conversation_ended_server_side_stops_cleanly(track: Track, caplog: pytest.LogCaptureFixture,
                                                            reason: str | None, is_error: bool) -> None:
    """Tavus ends the conversation mid-stream: the relay stops capture at once, counts what can no longer
    be delivered as undeliverable (logged with its text), says why, and exits: 1 for an error reason or
    when anything was undeliverable (README: exit statuses), else 0."""
    caplog.set_level(logging.WARNING)
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    room.completion_delay_s = 0.3  # the end overtakes the last send's completion: it still counts as delivered
    metrics = Metrics()
    settings = room_settings(track, room, source__file__speed=3)
    sink = recording_daily_sink(settings, metrics)
    relay = build_relay(settings, metrics=metrics, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics))

    async def end_it() -> None:
        await wait_until(lambda: len(room.replica_inbox) >= 2, timeout=30)
        if reason is None:  # ended from the dashboard or the API: the room just goes away
            room.end_conversation(shutdown_message=False)
        else:
            room.end_conversation(shutdown_message=True, reason=reason)

    ender = asyncio.ensure_future(end_it())
    t0 = asyncio.get_running_loop().time()
    exit_status = await asyncio.wait_for(run_daemon(settings, relay), 30)
    await ender
    elapsed = asyncio.get_running_loop().time() - t0
    ledger = relay.ledger
    assert exit_status == (EXIT_RUNTIME if is_error or ledger.undeliverable else EXIT_OK), ledger.as_dict()
    assert elapsed < track.duration_s / 3 * 0.7  # stopped early, not at the end of the file
    assert ledger.delivered >= 2 and ledger.closed == ledger.settled, ledger.as_dict()
    check_room(relay, sink, room)
    if reason is None:
        assert "the conversation ended (removed from the Daily room (call state left)" in caplog.text
    else:
        assert f"the conversation ended (Tavus shut the conversation down ({reason})); stopping" in caplog.text
    assert ("run failed" in caplog.text) == (exit_status == EXIT_RUNTIME)
    if is_error:
        assert "run failed: Tavus shut the conversation down" in caplog.text
    assert caplog.text.count("undeliverable echo u") == ledger.undeliverable
