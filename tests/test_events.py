"""The event stream (pipeline/events.py) on a real run: a shared clip through the real VAD and tiny.en,
paced in real time so interim decodes happen while the person speaks."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from faults import (
    FaultyAsr,
    RecordingSink,
    padded_clip_file,
    real_engine,
    reference,
    relay_settings,
    run_relay,
)

from pipeline.events import MAX_SUBSCRIBERS, Event, EventBus, TooManySubscribers
from pipeline.metrics import Metrics
from tests.conftest import wer

CLIP = "mfa/61-70968-0000.flac"  # one long sentence (~6 s): several interim decodes


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return padded_clip_file(tmp_path_factory.mktemp("events"), CLIP)


async def test_a_real_run_yields_the_documented_events_in_order(clip_file: Path) -> None:
    metrics = Metrics()
    sink = RecordingSink()
    events: list[Event] = []

    async def listen(relay: Any) -> None:
        async for event in relay.events.subscribe(partial=True):
            events.append(event)

    relay = await run_relay(relay_settings(f"file:{clip_file}", source__file__speed=1.5), sink=sink,
                            asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics, during=listen, timeout_s=60)
    kinds = [e.kind for e in events]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert kinds.count("level") >= 10  # about 10 a second over ~5 s of stream time
    started = kinds.index("speech_started")
    ended = kinds.index("speech_ended")
    transcript = kinds.index("transcript")
    echo = kinds.index("echo")
    partials = [i for i, k in enumerate(kinds) if k == "partial"]
    assert partials, kinds  # interim text while the person spoke ...
    assert started < partials[0] and partials[-1] < ended < transcript < echo  # ... before the final text
    uid = events[started].data["utterance_id"]
    assert all(events[i].data["utterance_id"] == uid for i in (ended, transcript, echo, *partials))
    assert 0.5 <= events[started].data["prob"] <= 1.0
    final = events[transcript].data
    assert wer(reference(CLIP), final["text"]) <= 0.25, final
    assert events[echo].data["outcome"] == "delivered" and events[echo].data["text"] == final["text"]
    assert 0 < events[echo].data["latency_s"] < 5
    first_partial = events[partials[0]].data["text"].lower().split()
    assert first_partial and first_partial[0].strip(",.") in reference(CLIP).lower().split()
    assert [o.text for o in sink.sent] == [final["text"]]
    assert metrics.value("echo_relay_partial_decodes_total") >= len(partials)
    assert relay.ledger.delivered == 1


async def test_interim_decodes_are_made_only_for_a_subscriber_that_asks(clip_file: Path) -> None:
    """They share the ASR thread with the decodes that end an utterance (latency): a subscriber that did
    not ask (the terminal view) gets no `partial` events and causes no interim decode."""
    metrics = Metrics()
    kinds: list[str] = []

    async def listen(relay: Any) -> None:
        async for event in relay.events.subscribe():
            kinds.append(event.kind)

    await run_relay(relay_settings(f"file:{clip_file}", source__file__speed=1.5), sink=RecordingSink(),
                    asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics, during=listen, timeout_s=60)
    assert "transcript" in kinds and "partial" not in kinds
    assert metrics.value("echo_relay_partial_decodes_total") == 0


async def test_a_slow_subscriber_loses_its_oldest_events_counted_and_never_blocks() -> None:
    metrics = Metrics()
    bus = EventBus(metrics, clock=lambda: 1.0)
    slow = bus.subscribe(maxlen=4)
    fast = bus.subscribe(maxlen=100)
    for i in range(10):
        bus.emit("level", dbfs=-float(i))
    assert [e.data["dbfs"] for e in slow.pending()] == [-6.0, -7.0, -8.0, -9.0]
    assert slow.dropped == 6 and metrics.value("echo_relay_events_dropped_total") == 6
    assert len(fast.pending()) == 10 and fast.dropped == 0
    bus.emit("level", dbfs=float("inf"))  # JSON has no inf: None
    assert fast.pending()[0].json().endswith('"dbfs": null}')
    slow.close()
    fast.close()
    assert not bus.listening
    subs = [bus.subscribe() for _ in range(MAX_SUBSCRIBERS)]
    with pytest.raises(TooManySubscribers):
        bus.subscribe()
    for s in subs:
        s.close()


async def test_a_closed_subscription_ends_its_iteration() -> None:
    bus = EventBus(Metrics(), clock=lambda: 0.0)
    sub = bus.subscribe()
    got: list[str] = []

    async def consume() -> None:
        async for event in sub:
            got.append(event.kind)

    task = asyncio.ensure_future(consume())
    bus.emit("room", joined=True)
    await asyncio.sleep(0.01)
    sub.close()
    await asyncio.wait_for(task, 1)
    assert got == ["room"]
