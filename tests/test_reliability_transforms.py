"""Reliability: transform steps that raise, hang past their timeout, or return garbage, during a real
run (real speech, VAD, tiny.en). Each step's `on_error` policy (pass / drop) is honoured, every
failure is counted, and the relay carries on with the next utterance.
"""

from __future__ import annotations

import logging

import pytest
from faults import (
    FaultyAsr,
    RecordingSink,
    Track,
    check_invariants,
    make_track,
    metric_drops,
    real_engine,
    relay_settings,
    run_relay,
    word_recall,
)

from pipeline.metrics import Metrics

SYNC = "tests.faults:FaultStep"
ASYNC = "tests.faults:AsyncFaultStep"


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("transforms") / "track.wav")


async def test_raise_hang_and_garbage_follow_their_policy(track: Track, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    steps = [
        {"step": "filler_words"},
        {"step": SYNC, "faults": {"u1": "raise"}, "on_error": "pass"},                     # [1]
        {"step": ASYNC, "faults": {"u2": "hang"}, "timeout_s": 0.3, "on_error": "drop"},
        {"step": SYNC, "faults": {"u3": "hang"}, "hang_s": 1.5, "timeout_s": 0.3, "on_error": "pass"},  # [3]
        {"step": SYNC, "faults": {"u4": "garbage:dict"}, "on_error": "drop"},              # [4]
        {"step": SYNC, "faults": {"u5": "garbage:bytes"}, "on_error": "pass"},             # [5]
        {"step": SYNC, "faults": {"u6": "raise"}, "on_error": "drop"},                     # [6]
        {"step": "whitespace"},
    ]
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}", transform__steps=steps)
    relay = await run_relay(settings, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics)

    ledger = relay.ledger
    assert ledger.closed == 7, ledger.as_dict()
    assert ledger.dropped == {
        f"transform:timeout:{ASYNC}": 1,
        f"transform:bad_type:{SYNC}[4]": 1,
        f"transform:error:{SYNC}[6]": 1,
    }, ledger.as_dict()
    report = check_invariants(relay, sink.sent)
    assert report.delivered_uids == ["u1", "u3", "u5", "u7"]
    # `pass` hands the step's input on: the text is the transcript, cleaned by the built-ins only.
    for out in sink.sent:
        assert isinstance(out.text, str) and out.text.strip()
        assert word_recall(out.text, out.asr_text) >= 0.9, (out.text, out.asr_text)
    # Failures under `pass` are counted per step (stage transform_step), drops under stage transform.
    drops = metric_drops(metrics)
    assert drops[("transform_step", f"error:{SYNC}[1]")] == 1
    assert drops[("transform_step", f"timeout:{SYNC}[3]")] == 1
    assert drops[("transform_step", f"bad_type:{SYNC}[5]")] == 1
    # Each failure is logged with the step's name and the utterance.
    text = caplog.text
    for needle in (f"{SYNC}[1] (#1) failed on utterance u1: error", f"{ASYNC} (#2) failed on utterance u2: timeout",
                   f"{SYNC}[3] (#3) failed on utterance u3: timeout", f"{SYNC}[4] (#4) failed on utterance u4: "
                   "bad_type: returned dict", f"{SYNC}[5] (#5) failed on utterance u5: bad_type: returned bytes",
                   f"{SYNC}[6] (#6) failed on utterance u6: error"):
        assert needle in text, needle


async def test_a_step_that_always_hangs_never_stalls_the_relay(track: Track) -> None:
    """Every call of a sync step hangs: after MAX_PENDING_CALLS stuck threads it fails fast as `busy`,
    so a run of 7 utterances with a 0.2 s timeout still ends promptly and delivers everything (pass)."""
    steps = [{"step": SYNC, "faults": {f"u{i}": "hang" for i in range(1, 20)}, "hang_s": 2.0,
              "timeout_s": 0.2, "on_error": "pass"}]
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}", transform__steps=steps)
    relay = await run_relay(settings, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics), metrics=metrics,
                            timeout_s=30)
    assert relay.ledger.delivered == relay.ledger.closed == 7
    check_invariants(relay, sink.sent)
    drops = metric_drops(metrics)
    failed = sum(v for (stage, reason), v in drops.items() if stage == "transform_step")
    assert failed == 7
