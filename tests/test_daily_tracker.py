"""RoomTracker (pipeline/daily_room/tracker.py) on its own: the room as this client sees it, fed on the loop with
what the SDK reports (participants in daily-python's shape, Tavus app-messages from docs/tavus.md's event list),
no SDK and no connection. The connection that feeds it is tested in tests/test_daily_room.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from pipeline.daily_room import RoomEvent, RoomPhase, RoomState, RoomTracker
from pipeline.daily_room.tracker import LAST_EVENTS_KEPT
from pipeline.metrics import Metrics

ROOM = "https://example.daily.co/room"


def participant(pid: str, name: str | None, *, local: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"isLocal": local}
    if name is not None:
        info["userName"] = name
    return {"id": pid, "info": info}


def tavus(event_type: str, seq: int | None = None, **properties: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"message_type": "conversation", "event_type": event_type,
                               "conversation_id": "c1", "properties": properties}
    if seq is not None:
        message["seq"] = seq
    return message


def tracked(replica_name: str | None = "Persona", **kwargs: Any) -> tuple[RoomTracker, list[RoomEvent]]:
    tracker = RoomTracker(replica_name=replica_name, **kwargs)
    events: list[RoomEvent] = []
    tracker.subscribe(events.append)
    return tracker, events


async def test_a_join_with_the_replica_present_is_ready_and_announces_it_before_joined() -> None:
    tracker, events = tracked()
    assert tracker.phase is RoomPhase.NEW and not tracker.ready and not tracker.network_ok
    tracker.joined({"local": participant("local", "echo-relay", local=True),
                    "p-1": participant("p-1", "alice"), "p-2": participant("p-2", "Persona")}, ROOM)
    assert tracker.phase is RoomPhase.JOINED and tracker.call_state == "joined"
    assert tracker.ready and tracker.network_ok and tracker.not_ready_since is None
    assert tracker.replica_id == "p-2" and list(tracker.participants) == ["p-1", "p-2"]  # not the local one
    assert tracker.state.joined and tracker.state.replica_present and tracker.state.network == "connected"
    kinds = [(e.kind, (e.participant or {}).get("id")) for e in events]
    assert kinds == [("participant_joined", "p-1"), ("replica_joined", "p-2"), ("participant_joined", "p-2"),
                     ("joined", None)]


async def test_without_the_replica_the_wait_counts_from_the_join_and_ends_when_it_arrives() -> None:
    tracker, events = tracked()
    before = time.monotonic()
    tracker.joined({"p-1": participant("p-1", "alice")}, ROOM)
    assert not tracker.ready and tracker.not_ready_since is not None and tracker.not_ready_since >= before
    tracker.on_participant_joined(participant("p-2", None))  # no name yet: not the replica
    assert not tracker.ready and tracker.replica_id is None
    tracker.on_participant_updated(participant("p-2", " Persona "))  # the name arrives in an update
    assert tracker.ready and tracker.replica_id == "p-2" and tracker.not_ready_since is None
    assert [e.kind for e in events][-3:] == ["participant_joined", "replica_joined", "participant_updated"]


async def test_the_replica_leaving_and_then_the_call_ending_is_an_ended_conversation() -> None:
    tracker, events = tracked()
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    tracker.on_participant_left(participant("p-2", "Persona"), "leftCall")
    assert not tracker.ready and not tracker.state.replica_present and tracker.replica_id is None
    assert tracker.not_ready_since is not None and not tracker.ended.is_set()
    assert [e.kind for e in events][-2:] == ["replica_left", "participant_left"]
    tracker.on_call_state_updated("left")  # while JOINED, not after our leave: the room removed us
    assert tracker.ended.is_set() and not tracker.state.joined
    assert tracker.ended_reason is not None and "the replica left" in tracker.ended_reason
    assert "removed from the Daily room" in tracker.ended_reason
    assert [e.kind for e in events][-2:] == ["ended", "call_state"]


async def test_our_own_leave_is_not_an_ended_conversation() -> None:
    tracker, _ = tracked()
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    tracker.leaving()
    assert tracker.phase is RoomPhase.LEAVING and not tracker.ready
    tracker.on_call_state_updated("left")
    tracker.left()
    assert not tracker.ended.is_set() and tracker.call_state == "left" and not tracker.state.joined


async def test_app_messages_update_the_state_are_deduplicated_and_counted() -> None:
    metrics = Metrics()
    tracker, events = tracked(metrics=metrics)
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    tracker.on_app_message(tavus("conversation.replica.started_speaking", 1, inference_id="i-1"), "p-2")
    assert tracker.state.replica_speaking and tracker.speaking_inference_id == "i-1"
    tracker.on_app_message(tavus("conversation.replica.started_speaking", 1, inference_id="i-1"), "p-2")  # again
    tracker.on_app_message(tavus("conversation.brand_new", 2), "p-2")
    tracker.on_app_message("not an object", "p-2")
    tracker.on_app_message(tavus("conversation.replica.stopped_speaking", 3, inference_id="i-1"), "p-2")
    assert not tracker.state.replica_speaking and tracker.speaking_inference_id is None
    assert tracker.duplicate_events == 1 and tracker.unknown_events == 2
    kinds = [e.kind for e in events if e.event_type or e.kind == "invalid"]
    assert kinds == ["replica_started_speaking", "unknown", "invalid", "replica_stopped_speaking"]
    assert [e["kind"] for e in tracker.state.last_events] == kinds
    assert metrics.value("echo_relay_room_events_total",
                         {"event_type": "conversation.replica.started_speaking"}) == 1  # the duplicate is not
    assert metrics.value("echo_relay_room_events_total", {"event_type": "other"}) == 2


async def test_last_events_keep_the_most_recent_ones() -> None:
    tracker, _ = tracked()
    for seq in range(LAST_EVENTS_KEPT + 7):
        tracker.on_app_message(tavus("conversation.utterance", seq, role="user", speech=f"line {seq}"), "p-1")
    texts = [e["text"] for e in tracker.state.last_events]
    assert texts == [f"line {seq}" for seq in range(7, LAST_EVENTS_KEPT + 7)]


async def test_a_tavus_shutdown_ends_the_conversation_with_its_reason() -> None:
    tracker, events = tracked()
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    tracker.on_app_message({"message_type": "system", "event_type": "system.shutdown",
                            "properties": {"shutdown_reason": "max_call_duration reached"}}, "p-2")
    assert tracker.ended.is_set() and not tracker.ready
    assert tracker.shutdown_reason == "max_call_duration reached"
    assert tracker.ended_reason == "Tavus shut the conversation down (max_call_duration reached)"
    tracker.on_call_state_updated("left")  # the room then removes us: still one end, the first reason
    assert tracker.ended_reason == "Tavus shut the conversation down (max_call_duration reached)"
    assert [e.kind for e in events].count("ended") == 1


async def test_only_the_signalling_connection_pauses_delivery() -> None:
    tracker, events = tracked()
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    tracker.on_network_status({"connection": "sfu", "event": "interrupted"})  # media only
    assert tracker.network_ok and tracker.net_down_since is None
    tracker.on_network_status({"connection": "signalling", "event": "interrupted"})
    assert not tracker.network_ok and tracker.ready and tracker.net_down_since is not None
    assert tracker.state.network == "interrupted"
    tracker.on_network_status({"connection": "signalling", "event": "connected"})
    assert tracker.network_ok and tracker.net_down_since is None and tracker.state.network == "connected"
    assert [e.detail for e in events if e.kind == "network"] == ["sfu:interrupted", "interrupted", "connected"]


async def test_a_reconnect_keeps_the_room_ready_but_pauses_the_network() -> None:
    tracker, _ = tracked()
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    tracker.on_call_state_updated("joining")  # the SDK reconnecting
    assert tracker.ready and not tracker.network_ok and tracker.net_down_since is not None
    assert tracker.phase is RoomPhase.JOINED
    tracker.on_call_state_updated("joined")
    assert tracker.ready and tracker.network_ok and tracker.net_down_since is None


async def test_the_sdk_reporting_joined_first_moves_the_phase_on() -> None:
    """The call state can arrive before the join completion: the phase follows it."""
    tracker, _ = tracked()
    tracker.on_call_state_updated("joined")
    assert tracker.phase is RoomPhase.JOINED and tracker.state.joined


async def test_waiters_wake_on_changes_and_time_out() -> None:
    tracker, _ = tracked()
    tracker.joined({}, ROOM)
    waiting = asyncio.ensure_future(tracker.wait_until(lambda: tracker.ready, 5))
    await asyncio.sleep(0)
    assert not waiting.done()
    tracker.on_participant_joined(participant("p-2", "Persona"))
    assert await asyncio.wait_for(waiting, 1) is True
    t0 = time.monotonic()
    assert await tracker.wait_until(lambda: tracker.ended.is_set(), 0.05) is False
    assert time.monotonic() - t0 < 1


async def test_a_failing_subscriber_does_not_stop_the_others_and_async_ones_run_as_tasks() -> None:
    tracker = RoomTracker(replica_name="Persona")
    seen: list[str] = []
    done = asyncio.Event()

    def broken(event: RoomEvent) -> None:
        raise RuntimeError("subscriber bug")

    async def later(event: RoomEvent) -> None:
        seen.append(f"async {event.kind}")
        done.set()

    tracker.subscribe(broken)
    tracker.subscribe(lambda e: seen.append(e.kind))
    unsubscribe_async = tracker.subscribe(later)
    tracker.on_error("update_subscriptions: refused")
    await asyncio.wait_for(done.wait(), 1)
    assert seen == ["error", "async error"] and tracker.last_error == "update_subscriptions: refused"
    unsubscribe_async()
    tracker.on_error("again")
    assert seen == ["error", "async error", "error"]


async def test_closing_cancels_subscriber_tasks_still_running() -> None:
    tracker = RoomTracker()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(event: RoomEvent) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    tracker.subscribe(slow)
    tracker.on_error("x")
    await asyncio.wait_for(started.wait(), 1)
    tracker.closed()
    await asyncio.wait_for(cancelled.wait(), 1)
    assert tracker.phase is RoomPhase.CLOSED


@pytest.mark.parametrize("new_name", ["Other persona", None])
async def test_changing_the_replica_name_rechecks_who_is_present(new_name: str | None) -> None:
    tracker, _ = tracked()
    tracker.joined({"p-1": participant("p-1", "Other persona"), "p-2": participant("p-2", "Persona")}, ROOM)
    assert tracker.replica_id == "p-2"
    tracker.set_replica_name(new_name)
    assert tracker.replica_id == ("p-1" if new_name else None) and tracker.ready is bool(new_name)


async def test_a_shared_state_is_updated_in_place() -> None:
    """The Daily sink hands its RoomState (shown by /status) to the tracker."""
    state = RoomState(conversation_id="c1")
    tracker = RoomTracker(replica_name="Persona", state=state)
    tracker.joined({"p-2": participant("p-2", "Persona")}, ROOM)
    assert tracker.state is state and state.as_dict() == {
        "joined": True, "replica_present": True, "replica_speaking": False, "conversation_id": "c1",
        "network": "connected"}
