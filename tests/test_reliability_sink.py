"""Reliability: sinks slower than speech, sinks that refuse messages, and a drain that runs out of time,
during real runs (real speech, VAD, tiny.en).

Policy (docs/reliability.md): the relay's delivery queue holds at most `sink.queue_size` utterances;
when it is full, capture waits. A file source simply pauses (nothing lost); a microphone keeps
producing, so its own bounded queue (`source.mic.queue_blocks`) drops the OLDEST blocks, counted as
dropped{stage="source",reason="queue_full"}. A message the sink gives up on is counted undeliverable
and logged with its text.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from faults import (
    FakeMicDevice,
    FaultyAsr,
    RecordingSink,
    Track,
    check_invariants,
    fail_utterances,
    make_track,
    metric_drops,
    real_engine,
    relay_settings,
    run_relay,
)

from pipeline.metrics import Metrics
from pipeline.source.mic import MicSource


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("sink") / "track.wav")


async def test_slow_sink_backpressure_bounds_the_queue_and_loses_nothing(track: Track) -> None:
    metrics = Metrics()
    sink = RecordingSink(delay_s=0.4)
    queue_size = 2
    samples: list[tuple[int, int]] = []  # (delivery queue depth, utterances closed but not settled)

    async def sample(relay: Any) -> None:
        while True:
            samples.append((relay.delivery.depth, relay.ledger.closed - relay.ledger.settled))
            await asyncio.sleep(0.02)

    settings = relay_settings(f"file:{track.path}", sink__queue_size=queue_size)
    relay = await run_relay(settings, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics,
                            during=sample)
    ledger = relay.ledger
    assert ledger.delivered == ledger.closed == 7 and not ledger.dropped and not ledger.undeliverable
    check_invariants(relay, sink.sent)
    assert sink.max_inflight == 1  # one message at a time, in order
    assert samples and max(depth for depth, _ in samples) <= queue_size + 1  # + the end-of-stream marker
    # Work held in memory is bounded: queued + the one being delivered + the one capture waits to put.
    assert max(pending for _, pending in samples) <= queue_size + 2
    # The file source was paused, not drained ahead: it never ran far past what was delivered.
    assert not any(stage == "source" for stage, _ in metric_drops(metrics))


async def test_sink_refusing_some_messages_counts_them_undeliverable_with_their_text(
        track: Track, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    metrics = Metrics()
    sink = RecordingSink(fail=fail_utterances("u2", "u5"))
    relay = await run_relay(relay_settings(f"file:{track.path}"), sink=sink,
                            asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics)
    ledger = relay.ledger
    assert ledger.undeliverable == 2 and ledger.delivered == ledger.closed - 2 == 5, ledger.as_dict()
    report = check_invariants(relay, sink.sent)
    assert report.delivered_uids == ["u1", "u3", "u4", "u6", "u7"]
    for out in sink.failed:
        assert out.text.strip()
        assert f"undeliverable echo {out.utterance_id}: injected send failure for {out.utterance_id} " \
               f"(text: {out.text!r})" in caplog.text
    status = {r["utterance_id"]: r["status"] for r in relay.status()["recent"]}
    assert status["u1"] == "delivered"
    for uid in ("u2", "u5"):  # /status says why, too
        assert status[uid] == f"undeliverable: injected send failure for {uid}"


async def test_drain_deadline_counts_the_message_in_the_sink_as_undeliverable(
        track: Track, caplog: pytest.LogCaptureFixture) -> None:
    """A sink stuck on one message at shutdown: after sink.drain_timeout_s the message being sent and
    everything still queued are counted undeliverable (logged with their text), none vanishes."""
    caplog.set_level(logging.ERROR)
    metrics = Metrics()
    sink = RecordingSink(delay_s=30.0)  # never finishes within the drain time
    settings = relay_settings(f"file:{track.path}", sink__drain_timeout_s=1.0, sink__queue_size=3,
                              endpoint__enabled=False)

    async def stop_soon(relay: Any) -> None:
        while relay.ledger.closed < 2:
            await asyncio.sleep(0.05)
        relay.stop()

    relay = await run_relay(settings, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics,
                            during=stop_soon, timeout_s=20)
    ledger = relay.ledger
    assert ledger.closed >= 2 and ledger.delivered == 0
    assert ledger.undeliverable == ledger.closed, ledger.as_dict()
    check_invariants(relay, sink.sent, single_piece=False)
    assert "not delivered within the shutdown drain time (sink.drain_timeout_s=1 s): the recording sink " \
           "had not finished sending" in caplog.text
    assert caplog.text.count("undeliverable echo u") == ledger.closed


async def test_mic_with_a_slow_sink_drops_oldest_blocks_counted(track: Track) -> None:
    """Live input cannot pause: while the relay waits for a slow sink, the microphone's bounded queue
    drops its oldest blocks, counted in metrics and the source stats; the relay's accounting stays whole."""
    metrics = Metrics()
    sink = RecordingSink(delay_s=0.6)
    device = FakeMicDevice(track.pcm, speed=24.0)
    settings = relay_settings("mic", sink__queue_size=1, source__mic__queue_blocks=10)
    source = MicSource(settings.source, metrics, stream_factory=device.factory)

    async def stop_when_played(relay: Any) -> None:
        while not device.exhausted:
            await asyncio.sleep(0.05)
        relay.stop()

    relay = await run_relay(settings, sink=sink, source=source, asr=FaultyAsr(real_engine(), metrics=metrics),
                            metrics=metrics, during=stop_when_played, timeout_s=40)
    dropped_blocks = source.stats()["dropped_queue_full"]
    assert dropped_blocks > 0
    assert metric_drops(metrics)[("source", "queue_full")] == dropped_blocks
    assert relay.ledger.closed >= 1
    check_invariants(relay, sink.sent)
