"""Reliability: ASR faults during a real run (file source of real speech, real VAD, real tiny.en).

One utterance's decode raises, or answers after `asr.deadline_s`, or blocks the engine's own thread:
that utterance is dropped with reason asr_error / asr_deadline (counted in the ledger and metrics),
and every other utterance still flows and is delivered, in order, with its words.
"""

from __future__ import annotations

import gc
import logging

import pytest
from faults import (
    AsrFault,
    FaultyAsr,
    RecordingSink,
    Track,
    check_invariants,
    make_track,
    real_engine,
    relay_settings,
    run_relay,
    word_recall,
)

from pipeline.metrics import Metrics

MIN_RECALL = 0.6  # tiny.en on clean read speech recalls ~0.9 of the reference words


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("asr") / "track.wav")


def check_content(track: Track, relay: object, sink: RecordingSink, faulted: set[str]) -> None:
    report = check_invariants(relay, sink.sent)
    assert not faulted & set(report.delivered_uids), "a faulted utterance was delivered"
    covered: set[str] = set()
    for uid in report.delivered_uids:
        first = next(o for o in sink.sent if o.utterance_id == uid)
        segs = track.segments_in(first.audio_start_s, first.audio_end_s)
        assert segs, f"{uid} delivered but no speech at {first.audio_start_s}-{first.audio_end_s}"
        covered.update(s.clip for s in segs)
        if len(segs) == 1 and segs[0].start_s >= first.audio_start_s - 0.5 and \
                segs[0].end_s <= first.audio_end_s + 0.5:  # the utterance holds the whole clip
            assert word_recall(segs[0].reference, report.texts[uid]) >= MIN_RECALL, (uid, report.texts[uid])
    # Every clip is delivered except the ones under the faulted utterances.
    assert len(covered) >= len(track.segments) - len(faulted)


async def test_asr_error_and_deadline_drop_one_utterance_each_and_the_rest_flow(
        track: Track, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    metrics = Metrics()
    asr = FaultyAsr(real_engine(), {"u2": AsrFault("raise"), "u4": AsrFault("slow", 2.5)}, metrics=metrics)
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}", asr__deadline_s=1.0)
    relay = await run_relay(settings, sink=sink, asr=asr, metrics=metrics)

    ledger = relay.ledger
    assert ledger.dropped == {"asr_error": 1, "asr_deadline": 1}, ledger.as_dict()
    assert ledger.undeliverable == 0
    assert ledger.delivered == ledger.closed - 2 >= len(track.segments) - 2
    check_content(track, relay, sink, {"u2", "u4"})
    assert "ASR failed on u2: injected ASR failure on u2" in caplog.text
    assert "ASR missed its 1.0s deadline on u4" in caplog.text
    gc.collect()  # a failed decode nobody looked at is reported when its task is collected
    assert "exception was never retrieved" not in caplog.text


async def test_engine_thread_blocked_past_the_deadline(track: Track) -> None:
    """A hung local decode holds the engine's only thread: the utterance is dropped at its deadline and
    the next ones, queued behind it in the engine, are decoded once it returns, and delivered."""
    metrics = Metrics()
    asr = FaultyAsr(real_engine(), {"u2": AsrFault("block", 2.0)}, metrics=metrics)
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}", asr__deadline_s=1.5, endpoint__enabled=False)
    relay = await run_relay(settings, sink=sink, asr=asr, metrics=metrics)

    assert relay.ledger.dropped == {"asr_deadline": 1}, relay.ledger.as_dict()
    assert relay.ledger.delivered == relay.ledger.closed - 1
    check_content(track, relay, sink, {"u2"})


async def test_every_decode_failing_drops_everything_and_ends_cleanly(
        track: Track, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing is delivered, nothing hangs, and every utterance is accounted as asr_error."""
    metrics = Metrics()
    asr = FaultyAsr(real_engine(), plan=lambda meta: AsrFault("raise"), metrics=metrics)
    sink = RecordingSink()
    relay = await run_relay(relay_settings(f"file:{track.path}"), sink=sink, asr=asr, metrics=metrics)
    assert relay.ledger.closed >= len(track.segments)
    assert relay.ledger.dropped == {"asr_error": relay.ledger.closed}
    assert sink.sent == []
    check_invariants(relay, sink.sent)
    gc.collect()
    assert "exception was never retrieved" not in caplog.text
