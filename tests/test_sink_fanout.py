"""Several sinks at once (`sink.also`, pipeline/sink/fanout.py): the primary (here the Daily sink on the
daily-python stand-in, or the recording sink of tests/faults.py) gets every message as if it were alone,
while secondaries that fail, crawl or cannot start lose only their own copies, counted and logged once.

Also: JSONL records written beside the room equal what the room got (same seq, text, emitted_at_s), the
ledger and the exit status follow the primary, and `sink.also` is validated with the sink spec grammar.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from faults import (
    RecordingSink,
    ReferenceAsr,
    Track,
    check_invariants,
    fail_utterances,
    make_track,
    relay_settings,
    run_relay,
)

from pipeline import protocol
from pipeline.config import ConfigError, Settings, load_settings, set_dotted
from pipeline.metrics import Metrics
from pipeline.sink import make_sink
from pipeline.sink.base import Outgoing, SinkError, SinkOutputError
from pipeline.sink.console import ConsoleSink
from pipeline.sink.daily import DailySink
from pipeline.sink.fanout import FanoutSink
from pipeline.sink.jsonl import JsonlSink
from pipeline.testing.fake_daily import FakeRoom
from pipeline.wiring import build_relay
from tests.conftest import REPO, clip

FAKE = "pipeline.testing.fake_daily"
PERSONA = "Fanout Persona"
FAILURES = "echo_relay_secondary_failures_total"
CLIP = "deepspeech-examples/2830-3980-0043.wav"


# ------------------------------------------------------------------------------------ helpers
def daily_settings(room: FakeRoom, **dotted: Any) -> Settings:
    tree: dict[str, Any] = {
        "sink": {"spec": "daily", "daily": {"module": FAKE, "join_timeout_s": 2.0, "replica_timeout_s": 2.0,
                                            "send_deadline_s": 2.0, "retry_initial_s": 0.02, "retry_max_s": 0.1}},
        "tavus": {"persona_name": PERSONA, "conversation_url": room.url, "conversation_id": room.conversation_id},
    }
    for key, value in dotted.items():
        set_dotted(tree, key.replace("__", "."), value)
    return Settings.model_validate(tree)


_seq = 0


def echo(text: str, cid: str | None) -> Outgoing:
    """A text echo stamped as the relay's delivery stamps it (seq, emitted_at_s)."""
    global _seq
    _seq += 1
    message = protocol.echo_text(text, cid, protocol.new_inference_id(), True)
    return Outgoing("echo", message, utterance_id=f"u{_seq}", text=text, seq=_seq, emitted_at_s=_seq / 10)


def room_texts(room: FakeRoom) -> list[str]:
    return [m["properties"]["text"] for m in room.replica_inbox if m.get("event_type") == protocol.ECHO]


async def wait_for(pred: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def started_fanout(room: FakeRoom, secondaries: list[Any], metrics: Metrics, **kw: Any) -> FanoutSink:
    """A FanoutSink around a Daily sink in `room` (which has the replica), started and ready."""
    fanout = FanoutSink(DailySink(daily_settings(room), metrics), secondaries, metrics=metrics, **kw)
    await fanout.start()
    await wait_for(fanout.is_ready)
    return fanout


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ECHO_RELAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("fanout") / "track.wav", [
        "deepspeech-examples/2830-3980-0043.wav", "realtimestt_ljspeech/LJ001-0002.wav",
        "deepspeech-examples/4507-16021-0012.wav"])


# ------------------------------------------------------------------------------ the room first
@pytest.mark.usefixtures("clean_fake_daily")
async def test_the_room_gets_every_echo_while_a_secondary_always_fails(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pipeline.sink.fanout")
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    broken = RecordingSink(fail=lambda out: True)
    fanout = await started_fanout(room, [broken], metrics)
    texts = [f"Message number {i}." for i in range(8)]
    for text in texts:
        await fanout.send(echo(text, fanout.conversation_id))  # never raises: the room took each
    await fanout.close(5.0)
    assert room_texts(room) == texts
    assert len(broken.failed) == 8 and not broken.sent  # each copy was tried, in order, and lost
    assert [o.text for o in broken.failed] == texts
    assert fanout.stats()["secondary"] == {"recording": {"sent": 0, "failed": 8, "dropped": 0, "queued": 0}}
    assert fanout.stats()["delivered"] == 8  # the primary's own stats are still there
    assert metrics.value(FAILURES, {"sink": "recording"}) == 8
    logged = [r.getMessage() for r in caplog.records if "a message was not written" in r.getMessage()]
    assert len(logged) == 1, logged  # once per kind of failure, however many messages it costs
    assert "secondary sink recording" in logged[0] and "injected send failure" in logged[0]
    assert broken.closed


@pytest.mark.usefixtures("clean_fake_daily")
async def test_a_very_slow_secondary_overflows_its_queue_counted_and_the_room_is_unaffected(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pipeline.sink.fanout")
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    slow = RecordingSink(delay_s=60.0)  # never finishes one message within the test
    fanout = await started_fanout(room, [slow], metrics, queue_size=3)
    texts = [f"Line {i}." for i in range(10)]
    t0 = time.monotonic()
    for text in texts:
        await fanout.send(echo(text, fanout.conversation_id))
    assert time.monotonic() - t0 < 10.0  # the primary never waited for the 60 s secondary
    assert room_texts(room) == texts
    await asyncio.sleep(0.05)
    stats = fanout.stats()["secondary"]["recording"]
    # One in its send, the newest 3 queued, the 6 oldest waiting ones dropped as newer ones came.
    assert stats == {"sent": 0, "failed": 0, "dropped": 6, "queued": 3}, stats
    t0 = time.monotonic()
    await fanout.close(0.5)
    assert time.monotonic() - t0 < 5.0  # the drain time bounds the wait for the secondary
    stats = fanout.stats()["secondary"]["recording"]
    assert stats == {"sent": 0, "failed": 0, "dropped": 10, "queued": 0}, stats  # + the 3 queued + the one in flight
    assert metrics.value(FAILURES, {"sink": "recording"}) == 10
    text = caplog.text
    assert text.count("its queue is full (3 messages)") == 1
    assert "not written within the shutdown drain time (0.5 s)" in text
    assert slow.closed and not slow.sent


@pytest.mark.usefixtures("clean_fake_daily")
async def test_a_secondary_that_cannot_start_is_disabled_and_the_room_gets_every_echo(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="pipeline.sink.fanout")
    (tmp_path / "plain-file").write_text("not a directory\n")
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    metrics = Metrics()
    good = tmp_path / "good.jsonl"
    fanout = await started_fanout(room, [JsonlSink(tmp_path / "plain-file" / "x.jsonl"), JsonlSink(good)], metrics)
    texts = ["First line.", "Second line.", "Third line."]
    sent = [echo(text, fanout.conversation_id) for text in texts]
    for out in sent:
        await fanout.send(out)
    await fanout.close(5.0)
    assert room_texts(room) == texts
    secondary = fanout.stats()["secondary"]
    assert secondary["jsonl"] == {"sent": 0, "failed": 3, "dropped": 0, "queued": 0}
    assert secondary["jsonl#2"] == {"sent": 3, "failed": 0, "dropped": 0, "queued": 0}
    assert metrics.value(FAILURES, {"sink": "jsonl"}) == 3 and metrics.value(FAILURES, {"sink": "jsonl#2"}) == 0
    assert [(r["seq"], r["text"]) for r in records(good)] == [(o.seq, o.text) for o in sent]
    starts = [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]
    assert len(starts) == 1 and "plain-file" in starts[0] and "disabled for this run" in starts[0]


@pytest.mark.usefixtures("clean_fake_daily")
async def test_everything_the_relay_reads_is_the_primarys() -> None:
    room = FakeRoom.create()
    metrics = Metrics()
    primary = DailySink(daily_settings(room), metrics)
    fanout = FanoutSink(primary, [RecordingSink()], metrics=metrics)
    assert fanout.name == "daily" and fanout.blocked_reason() == "the Daily room was not joined yet"
    await fanout.start()
    assert not fanout.is_ready() and "is not in the Daily room" in (fanout.blocked_reason() or "")
    room.add_replica(PERSONA)
    await wait_for(fanout.is_ready)
    assert fanout.room is primary.room and fanout.room.joined and fanout.blocked_reason() is None
    assert fanout.conversation_id == primary.conversation_id == room.conversation_id
    assert fanout.owned_conversation() is None  # joined an existing conversation: not ours to end
    assert fanout.ended is primary.ended and not fanout.ended.is_set()
    room.end_conversation(shutdown_message=True)
    await asyncio.wait_for(fanout.ended.wait(), 5.0)
    assert fanout.ended_reason == primary.ended_reason and fanout.ended_reason
    assert fanout.ended_with_error == primary.ended_with_error
    await fanout.close(2.0)


async def test_a_message_the_primary_gives_up_on_fails_the_send_and_is_not_copied(tmp_path: Path) -> None:
    primary = RecordingSink(fail=fail_utterances("u2"))
    copy = RecordingSink()
    fanout = FanoutSink(primary, [copy])
    await fanout.start()
    outs = [Outgoing("echo", {}, utterance_id=f"u{i}", text=f"t{i}", seq=i, emitted_at_s=i / 4) for i in (1, 2, 3)]
    await fanout.send(outs[0])
    with pytest.raises(SinkError, match="injected send failure for u2"):
        await fanout.send(outs[1])
    await fanout.send(outs[2])
    await fanout.close(2.0)
    assert copy.sent == primary.sent == [outs[0], outs[2]]
    assert all(a is b for a, b in zip(copy.sent, primary.sent, strict=True))  # the same Outgoing objects
    assert fanout.stats()["secondary"]["recording"]["sent"] == 2


async def test_the_primarys_start_error_propagates_and_no_secondary_starts(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_text("x")
    copy = RecordingSink()
    fanout = FanoutSink(JsonlSink(tmp_path / "plain-file" / "out.jsonl"), [copy])
    with pytest.raises(SinkOutputError, match="cannot open"):  # pipeline.app turns it into exit 7
        await fanout.start()
    assert not copy.started
    await fanout.close(1.0)  # the relay still closes it: harmless
    assert copy.closed


async def test_close_lets_a_slowish_secondary_finish_its_queue(tmp_path: Path) -> None:
    """The secondaries write while the primary closes; within the drain time nothing is lost."""
    primary = RecordingSink()
    slowish = RecordingSink(delay_s=0.05)
    fanout = FanoutSink(primary, [slowish])
    await fanout.start()
    outs = [Outgoing("echo", {}, utterance_id=f"u{i}", text=f"t{i}", seq=i) for i in range(1, 11)]
    for out in outs:
        await fanout.send(out)
    assert len(slowish.sent) < 10  # still writing when close() begins
    await fanout.close(10.0)
    assert slowish.sent == outs and slowish.closed
    assert fanout.stats()["secondary"]["recording"] == {"sent": 10, "failed": 0, "dropped": 0, "queued": 0}


# ------------------------------------------------------------------------------- whole relays
@pytest.mark.usefixtures("clean_fake_daily")
async def test_relay_into_the_room_records_exactly_what_the_room_got(tmp_path: Path, track: Track) -> None:
    """make_sink builds the fanout from sink.also; real VAD, reference transcripts, the Daily stand-in."""
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    record, unwritable = tmp_path / "room.jsonl", tmp_path / "plain-file" / "x.jsonl"
    (tmp_path / "plain-file").write_text("x")
    settings = relay_settings(
        f"file:{track.path}", sink__spec="daily", sink__also=[f"jsonl:{record}", f"jsonl:{unwritable}"],
        sink__daily__module=FAKE, sink__daily__replica_timeout_s=5.0, tavus__persona_name=PERSONA,
        tavus__conversation_url=room.url, tavus__conversation_id=room.conversation_id)
    metrics = Metrics()
    relay = build_relay(settings, metrics=metrics, asr=ReferenceAsr(track))
    assert isinstance(relay.sink, FanoutSink) and isinstance(relay.sink.primary, DailySink)
    await relay.start()
    await asyncio.wait_for(relay.run(), 60)
    ledger = relay.ledger
    assert ledger.delivered == ledger.closed == 3 and not ledger.undeliverable, ledger.as_dict()
    got = room_texts(room)
    assert len(got) == 3 and all(t.strip() for t in got)
    rows = records(record)
    assert [r["text"] for r in rows] == got
    assert [r["message"] for r in rows] == [m for m in room.replica_inbox if m.get("event_type") == protocol.ECHO]
    assert [r["seq"] for r in rows] == [1, 2, 3]
    assert not unwritable.exists() and metrics.value(FAILURES, {"sink": "jsonl#2"}) == 3
    assert relay.status()["sink"] == "daily"


async def test_ledger_follows_the_primary_and_the_record_equals_what_it_sent(tmp_path: Path, track: Track) -> None:
    metrics = Metrics()
    primary = RecordingSink(fail=fail_utterances("u2"))
    record = tmp_path / "beside.jsonl"
    fanout = FanoutSink(primary, [JsonlSink(record), RecordingSink(fail=lambda out: True)], metrics=metrics)
    relay = await run_relay(relay_settings(f"file:{track.path}"), sink=fanout, asr=ReferenceAsr(track),
                            metrics=metrics)
    ledger = relay.ledger
    assert ledger.closed == 3 and ledger.delivered == 2 and ledger.undeliverable == 1, ledger.as_dict()
    check_invariants(relay, primary.sent)  # the accounting is the primary's, secondaries change nothing
    rows = records(record)
    assert [(r["seq"], r["utterance_id"], r["text"], r["emitted_at_s"]) for r in rows] == \
        [(o.seq, o.utterance_id, o.text, round(o.emitted_at_s, 3)) for o in primary.sent]
    assert [r["utterance_id"] for r in rows] == ["u1", "u3"]
    assert metrics.value(FAILURES, {"sink": "recording"}) == 2  # the always-failing secondary's 2 copies


# ---------------------------------------------------------------------------------- config, CLI
def test_make_sink_builds_a_fanout_only_when_also_is_set(tmp_path: Path) -> None:
    plain = make_sink(load_settings(None, {"sink.spec": "console"}), Metrics())
    assert isinstance(plain, ConsoleSink)
    settings = load_settings(None, {"sink.spec": f"jsonl:{tmp_path / 'a.jsonl'}",
                                    "sink.also": ["console", f"jsonl:{tmp_path / 'b.jsonl'}"]})
    fanout = make_sink(settings, Metrics())
    assert isinstance(fanout, FanoutSink) and isinstance(fanout.primary, JsonlSink)
    assert [type(s.sink) for s in fanout.secondaries] == [ConsoleSink, JsonlSink]
    assert fanout.name == "jsonl" and load_settings(None).sink.also == []


@pytest.mark.parametrize(("also", "words"), [
    (["daily"], ["sink.also", "[0]", "'daily' cannot be a secondary sink", "one room per relay"]),
    (["jsonl:b.jsonl", "kafka:x"], ["sink.also", "[1]", "unknown sink spec 'kafka:x'"]),
    (["jsonl:"], ["sink.also", "[0]", "unknown sink spec 'jsonl:'"]),
    (["jsonl:b.jsonl", "jsonl:./b.jsonl"], ["sink.also", "[1]", "already sink.also[0]"]),
    (["jsonl:a.jsonl"], ["sink.also", "[0]", "already sink.spec"]),
])
def test_sink_also_is_validated_in_settings(also: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"sink.spec": "jsonl:a.jsonl", "sink.also": also})
    assert err.value.key == "sink.also"
    for w in words:
        assert w in str(err.value), str(err.value)


@pytest.mark.parametrize(("also", "words"), [
    ('["daily"]', ["sink.also", "'daily' cannot be a secondary sink"]),
    ('[console, "tape:deck"]', ["sink.also", "[1]", "unknown sink spec 'tape:deck'"]),
])
def test_config_check_names_sink_also_and_exits_2(tmp_path: Path, also: str, words: list[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sink:\n  spec: daily\n  also: {also}\n", encoding="utf-8")
    proc = cli("config", "check", "--config", str(cfg), timeout=60)
    assert proc.returncode == 2, proc.stderr
    # config check reports every problem at once: here also the daily sink's missing Tavus key.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("echo-relay:") and "sink.also" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


def test_run_also_option_is_validated_like_the_config(tmp_path: Path) -> None:
    out = tmp_path / "never.jsonl"
    proc = cli("run", "--no-control", "--sink", f"jsonl:{out}", "--also", "console", "--also", "daily", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "sink.also: [1] 'daily' cannot be a secondary sink" in proc.stderr
    assert not out.exists()  # refused before anything started


def test_cli_run_with_sink_also_writes_the_same_record_twice_and_exits_0(tmp_path: Path) -> None:
    """A real run (tiny.en): the primary jsonl and the secondary jsonl are the same bytes; the console
    secondary prints each echo; the exit status is the primary's."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sink:\n  also: [{json.dumps('jsonl:' + str(b))}, console]\n", encoding="utf-8")
    proc = cli("run", "--config", str(cfg), "--source", f"file:{clip(CLIP)}", "--sink", f"jsonl:{a}",
               "--speed", "0", "--no-control")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = records(a)
    assert rows and all(r["event"] == "echo" and r["text"].strip() for r in rows)
    assert a.read_bytes() == b.read_bytes()
    printed = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(printed) == len(rows)
    for line, row in zip(printed, rows, strict=True):
        assert line.endswith(row["text"])
