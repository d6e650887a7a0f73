"""End to end on the Daily path (issue 3): real speech -> VAD -> tiny.en -> transforms -> the Daily sink,
against the fake Tavus API (a real HTTP server on 127.0.0.1) and the daily-python stand-in with a
scripted Tavus replica.

- `test_cli_run_sink_daily_*` runs `python -m pipeline run --sink daily` exactly as a user would, in a
  subprocess. The fake room lives in that process, scripted through the stand-in's
  ECHO_RELAY_FAKE_DAILY_* variables (late replica, replica speaking each echo, network drop, and a
  JSON-lines log of what the replica received, which this test reads).
- The other tests run the relay in this process (`build_relay(settings)`, `start()`, `run()`) and drive
  the room while it runs: late replica, barge-in on/off, a network drop, a replica that never comes.

Texts are compared with the clips' reference transcripts (WER <= 0.25), in stream order; nothing
here measures speed (timeouts only guard against hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import protocol
from pipeline.config import Settings, load_settings
from pipeline.dsp import wav_bytes
from pipeline.relay import Relay
from pipeline.sink.daily import DailySink
from pipeline.source.file import decode_file
from pipeline.testing import fake_daily
from pipeline.testing.fake_daily import FakeRoom
from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer
from pipeline.wiring import build_relay
from tests.conftest import REPO, clip, reference, wer

FAKE_DAILY = "pipeline.testing.fake_daily"
API_KEY = "e2e-fake-tavus-key-7c1d"  # distinctive, so a leak into any output would be found
PERSONA = "E2E Echo Persona"
SR = 16_000
GAP_S = 1.5
CLIPS = ["deepspeech-examples/2830-3980-0043.wav", "realtimestt_ljspeech/LJ001-0002.wav",
         "deepspeech-examples/4507-16021-0012.wav", "deepspeech-examples/8455-210777-0068.wav"]
MAX_WER = 0.25
RUN_TIMEOUT_S = 60.0  # against hangs only


# ------------------------------------------------------------------------------------ fixtures
@dataclass(frozen=True)
class Stream:
    path: Path
    names: list[str]
    spans: list[tuple[float, float]]  # true speech (start, end) of each clip, stream seconds


def _speech_bounds(audio: np.ndarray) -> tuple[float, float]:
    """Speech bounds from the clip's own energy envelope (independent of the relay's VAD)."""
    frame = SR // 100
    n = len(audio) // frame
    db = 10 * np.log10((audio[: n * frame].astype(np.float64).reshape(n, frame) ** 2).mean(axis=1) + 1e-9)
    loud = np.flatnonzero(db > db.max() - 35)
    return loud[0] / 100, (loud[-1] + 1) / 100


def _build_stream(path: Path, names: list[str]) -> Stream:
    """The clips joined by GAP_S of silence (and GAP_S before the first and after the last)."""
    gap = np.zeros(int(GAP_S * SR), np.int16)
    parts, spans, pos = [gap], [], len(gap)
    for name in names:
        audio = decode_file(clip(name))
        start, end = _speech_bounds(audio)
        spans.append((pos / SR + start, pos / SR + end))
        parts += [audio, gap]
        pos += len(audio) + len(gap)
    path.write_bytes(wav_bytes(np.concatenate(parts), SR))
    return Stream(path, list(names), spans)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> Stream:
    return _build_stream(tmp_path_factory.mktemp("daily_e2e") / "four_clips.wav", CLIPS)


@pytest.fixture(scope="module")
def short_stream(tmp_path_factory: pytest.TempPathFactory) -> Stream:
    return _build_stream(tmp_path_factory.mktemp("daily_e2e") / "three_clips.wav", CLIPS[:3])


@pytest.fixture
def tavus() -> Iterator[FakeTavusServer]:
    with FakeTavusServer(api_key=API_KEY) as server:
        yield server


@pytest.fixture
def rooms(clean_fake_daily: None) -> list[FakeRoom]:
    """Rooms the fake Daily created for conversation URLs it did not know (the provisioned ones)."""
    return []


def autocreate(rooms: list[FakeRoom], replica_delay_s: float | None = 0.0) -> None:
    """Rooms for provisioned conversations get a replica named after the persona (None: no replica)."""
    def configure(room: FakeRoom) -> None:
        rooms.append(room)
        if replica_delay_s is not None:
            room.add_replica(PERSONA, delay_s=replica_delay_s)
    FakeRoom.set_autocreate(configure)


# ------------------------------------------------------------------------------------- helpers
def settings_for(tavus: FakeTavusServer, stream: Stream, *, speed: float, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "source.spec": f"file:{stream.path}", "source.file.speed": speed, "control.enabled": False,
        "asr.download": False, "sink.spec": "daily", "sink.daily.module": FAKE_DAILY,
        "sink.daily.join_timeout_s": 10.0, "sink.daily.replica_timeout_s": 20.0,
        "sink.daily.send_deadline_s": 10.0, "sink.daily.retry_initial_s": 0.02, "sink.daily.retry_max_s": 0.2,
        "tavus.api_url": tavus.url, "tavus.api_key": API_KEY, "tavus.replica_id": FAKE_REPLICA_ID,
        "tavus.persona_name": PERSONA, "tavus.retries": 0,
    }
    return load_settings(None, {**base, **overrides}, env={})


async def run_relay(settings: Settings, during: Callable[[Relay], Awaitable[None]] | None = None) -> Relay:
    """build_relay -> start -> run to the end of the file, with `during(relay)` running alongside."""
    relay = build_relay(settings)
    await relay.start()
    helper = asyncio.ensure_future(during(relay)) if during is not None else None
    try:
        await asyncio.wait_for(relay.run(), RUN_TIMEOUT_S)
    finally:
        unfinished = helper is not None and not helper.done()
        if helper is not None and unfinished:
            helper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await helper
    if helper is not None:
        assert not unfinished, "the relay finished before the scripted room actions did"
        await helper  # its assertion errors fail the test
    return relay


async def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


def echoes(inbox: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in inbox if m.get("event_type") == protocol.ECHO]


def event_types(inbox: list[dict[str, Any]]) -> list[str]:
    return [str(m.get("event_type")) for m in inbox]


def assert_echoes_match_clips(inbox: list[dict[str, Any]], names: list[str], conversation_id: str) -> None:
    """One text echo per clip, in stream order, each exactly once, well formed, with the clip's words."""
    got = echoes(inbox)
    texts = [m["properties"]["text"] for m in got]
    assert len(got) == len(names), texts
    for msg, name in zip(got, names, strict=True):
        assert msg["message_type"] == "conversation" and msg["conversation_id"] == conversation_id, msg
        props = msg["properties"]
        assert props["modality"] == "text" and props["done"] is True, msg
        assert wer(reference(name), props["text"]) <= MAX_WER, (name, props["text"])
    ids = [m["properties"]["inference_id"] for m in got]
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids), ids


def assert_all_delivered(relay: Relay, n: int) -> None:
    ledger = relay.ledger
    assert ledger.as_dict() == {"closed": n, "delivered": n, "dropped": {}, "undeliverable": 0, "in_flight": 0,
                                "unheard": {"regions": 0, "seconds": 0.0}}
    assert relay.metrics.value("echo_relay_send_failures_total") == 0
    assert relay.metrics.value("echo_relay_echoes_sent_total", {"source": "speech"}) == n
    assert relay.failed is None


def only_conversation(tavus: FakeTavusServer) -> dict[str, Any]:
    conversations = tavus.conversations
    assert len(conversations) == 1, conversations
    return next(iter(conversations.values()))


def assert_provisioned_and_ended(tavus: FakeTavusServer) -> dict[str, Any]:
    """We created an echo persona and a conversation with our replica, and ended it on exit."""
    personas = list(tavus.personas.values())
    assert len(personas) == 1 and personas[0]["pipeline_mode"] == "echo", personas
    assert personas[0]["persona_name"] == PERSONA
    conv = only_conversation(tavus)
    assert conv["persona_id"] == personas[0]["persona_id"] and conv["replica_id"] == FAKE_REPLICA_ID
    assert conv["status"] == "ended" and conv["ended_by"] == "api", conv
    assert tavus.end_calls(conv["conversation_id"]) == 1
    assert all(r.api_key_ok for r in tavus.requests)
    return conv


# --------------------------------------------------------------------------- 1. the real CLI
def run_cli(args: list[str], env_extra: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ECHO_RELAY_", "TAVUS_"))}  # nothing from the developer's shell
    env.update({"HF_HUB_OFFLINE": "1", **env_extra})
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_run_sink_daily_provisions_delivers_survives_a_drop_and_ends(
        tmp_path: Path, tavus: FakeTavusServer, stream: Stream) -> None:
    """`echo-relay run --source file:... --sink daily`: the replica joins 1 s late, "speaks" every echo for
    30 s (so later speech talks over it), the network drops for 1 s after its 2nd message; on exit the
    conversation we created is ended through the API. Barge-in is off by default (a relay's replica is
    always a line behind the speaker), so no interrupt cuts a line."""
    config = tmp_path / "config.yaml"
    config.write_text(f"tavus:\n  replica_id: {FAKE_REPLICA_ID}\n  persona_name: {PERSONA}\n"
                      "sink:\n  daily:\n    replica_timeout_s: 30\n    send_deadline_s: 20\n")
    room_log = tmp_path / "room.jsonl"
    proc = run_cli(
        ["run", "--config", str(config), "--source", f"file:{stream.path}", "--sink", "daily", "--no-control",
         "--speed", "2"],
        {"TAVUS_API_KEY": API_KEY, "TAVUS_API_URL": tavus.url, "ECHO_RELAY_DAILY_MODULE": FAKE_DAILY,
         fake_daily.ENV_REPLICA: PERSONA, fake_daily.ENV_REPLICA_DELAY: "1.0",
         fake_daily.ENV_AUTO_SPEAK: "30", fake_daily.ENV_DROP: "2:1.0", fake_daily.ENV_LOG: str(room_log)})
    assert proc.returncode == 0, proc.stderr
    n = len(stream.names)
    assert re.search(rf"done: {n} utterance\(s\), {n} delivered, 0 dropped, 0 undeliverable", proc.stderr), \
        proc.stderr
    assert "Traceback" not in proc.stderr
    assert API_KEY not in proc.stderr + proc.stdout

    # The Tavus side: an echo persona and a conversation were created, and the conversation was ended.
    conv = assert_provisioned_and_ended(tavus)
    assert tavus.count("POST /v2/personas") == 1 and tavus.count("POST /v2/conversations") == 1
    assert tavus.requests[-1].method == "POST" and tavus.requests[-1].path.endswith("/end")  # ended last

    # The Daily side, from the stand-in's log of the room the relay joined.
    log = [json.loads(line) for line in room_log.read_text().splitlines()]
    assert {e["room"] for e in log} == {conv["conversation_url"]}
    kinds = [e["event"] for e in log]
    assert kinds[0] == "replica_joined"  # nothing can arrive before the replica is in the room
    inbox = [e["message"] for e in log if e["event"] == "received"]
    assert_echoes_match_clips(inbox, stream.names, conv["conversation_id"])
    # The replica was speaking (since the first echo) when later clips started: no interrupt by default.
    assert set(event_types(inbox)) == {protocol.ECHO}, event_types(inbox)

    # The network drop happened mid-stream: nothing arrived during it, echoes arrived after it, none lost
    # (checked above: every clip exactly once, in order).
    down, up = kinds.index("network_down"), kinds.index("network_up")
    assert down < up and "received" not in kinds[down:up]
    assert any(e["event"] == "received" and e["message"]["event_type"] == protocol.ECHO for e in log[up:])


def test_second_ctrl_c_exits_at_once_and_still_ends_the_conversation_it_created(
        tmp_path: Path, tavus: FakeTavusServer, stream: Stream) -> None:
    """Before: the second Ctrl-C called os._exit and left the created conversation running (billed until
    its timeout). The replica never comes, so the first Ctrl-C's drain waits; the second exits with 130
    at once and the conversation is ended through the API on the way out."""
    config = tmp_path / "config.yaml"
    config.write_text(f"tavus:\n  replica_id: {FAKE_REPLICA_ID}\n  persona_name: {PERSONA}\n"
                      "sink:\n  drain_timeout_s: 30\n  daily:\n    replica_timeout_s: 60\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ECHO_RELAY_", "TAVUS_"))}
    env.update({"HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "TAVUS_API_KEY": API_KEY,
                "TAVUS_API_URL": tavus.url, "ECHO_RELAY_DAILY_MODULE": FAKE_DAILY,
                fake_daily.ENV_REPLICA: PERSONA, fake_daily.ENV_REPLICA_DELAY: "3600"})  # it never comes
    err = tmp_path / "stderr.log"
    with err.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", str(config), "--source",
                                 f"file:{stream.path}", "--sink", "daily", "--no-control"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=fh)

    def log() -> str:
        return err.read_text(encoding="utf-8", errors="replace")

    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while "waiting up to 60 s for the replica" not in log():
            assert proc.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.05)
        # Into the first clip's speech (real time): the first Ctrl-C then closes that utterance, which waits
        # for the replica in the drain. Before any speech there would be nothing to drain, and no second signal.
        time.sleep(GAP_S + 1.0)
        proc.send_signal(signal.SIGINT)
        while "SIGINT: stopping capture" not in log():
            assert proc.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=15)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 130, log()
    assert elapsed < 5.0, log()  # at once: not after the 30 s drain (ending the conversation takes <= 3 s)
    conv = only_conversation(tavus)
    assert conv["status"] == "ended" and tavus.end_calls(conv["conversation_id"]) == 1, log()
    assert f"ended Tavus conversation {conv['conversation_id']}" in log()
    assert API_KEY not in log()


# -------------------------------------------------------------------------- 2. in-process runs
async def test_late_replica_gets_every_utterance_in_order_and_the_conversation_is_ended(
        tavus: FakeTavusServer, rooms: list[FakeRoom], stream: Stream) -> None:
    """(a) + (d): the replica joins only once the relay has utterances waiting; all of them reach it."""
    autocreate(rooms, replica_delay_s=None)
    held_at_join: list[int] = []

    async def replica_joins_late(relay: Relay) -> None:
        sink = relay.sink
        assert isinstance(sink, DailySink)
        # The first echo waits in the sink (its send() returns once delivered); the next utterances wait
        # behind it in the relay's delivery queue.
        await wait_until(lambda: relay.delivery.sending and relay.ledger.closed >= 2)
        held_at_join.append(relay.ledger.closed)
        rooms[0].add_replica(PERSONA, delay_s=0.5)

    relay = await run_relay(settings_for(tavus, stream, speed=0), replica_joins_late)
    assert held_at_join and held_at_join[0] >= 2  # utterances were waiting when the replica came
    conv = assert_provisioned_and_ended(tavus)
    room = rooms[0]
    assert room.url == conv["conversation_url"] and event_types(room.replica_inbox) == [protocol.ECHO] * 4
    assert_echoes_match_clips(room.replica_inbox, stream.names, conv["conversation_id"])
    assert_all_delivered(relay, len(stream.names))
    assert room.clients() == []  # we left the room


@pytest.mark.parametrize("barge_in", ["speech_start", "off"])
async def test_barge_in_when_the_replica_speaks_and_a_given_conversation_is_not_ended(
        tavus: FakeTavusServer, rooms: list[FakeRoom], short_stream: Stream, barge_in: str) -> None:
    """(b) + (d): the replica starts speaking just before the 2nd clip's speech; with barge-in on, the
    relay interrupts it once (before that clip's echo), and not again once it stopped; with barge-in
    off, never. The conversation was given (tavus.conversation_url): it is left, not ended."""
    persona = tavus.add_persona(PERSONA)
    conv = tavus.add_conversation(persona["persona_id"], replica_id=FAKE_REPLICA_ID)
    room = FakeRoom.create(conv["conversation_url"])
    replica = room.add_replica(PERSONA)
    start2 = short_stream.spans[1][0]

    async def replica_speaks_before_clip_2(relay: Relay) -> None:
        await wait_until(lambda: relay.source.now_s() >= start2 - 0.6)  # stream clock (speed 2: 0.3 s ahead)
        replica.started_speaking("replica-turn-1")
        await wait_until(lambda: protocol.INTERRUPT in event_types(room.replica_inbox)
                         or len(echoes(room.replica_inbox)) >= 2)
        replica.stopped_speaking("replica-turn-1", duration=1.0,
                                 interrupted=protocol.INTERRUPT in event_types(room.replica_inbox))

    settings = settings_for(tavus, short_stream, speed=2, **{
        "sink.barge_in": barge_in, "tavus.conversation_url": conv["conversation_url"],
        "tavus.conversation_id": conv["conversation_id"], "tavus.persona_id": persona["persona_id"]})
    relay = await run_relay(settings, replica_speaks_before_clip_2)

    types = event_types(room.replica_inbox)
    assert_echoes_match_clips(room.replica_inbox, short_stream.names, conv["conversation_id"])
    assert_all_delivered(relay, len(short_stream.names))
    if barge_in == "off":
        assert types == [protocol.ECHO] * 3
        assert relay.metrics.value("echo_relay_interrupts_sent_total") == 0
    else:
        assert types.count(protocol.INTERRUPT) == 1, types
        second_echo = [i for i, t in enumerate(types) if t == protocol.ECHO][1]
        assert types.index(protocol.INTERRUPT) < second_echo, types
        assert room.replica_inbox[types.index(protocol.INTERRUPT)] == protocol.interrupt(conv["conversation_id"])
        assert relay.metrics.value("echo_relay_interrupts_sent_total") == 1
    # A conversation we did not create is left but never ended (and nothing was provisioned).
    assert room.clients() == []
    assert tavus.conversation(conv["conversation_id"])["status"] == "active"
    assert tavus.end_calls(conv["conversation_id"]) == 0
    assert tavus.count("POST /v2/.*") == 0
    assert tavus.count("GET /v2/personas/.*") == 1  # the replica is recognised by the persona's name


async def test_network_drop_mid_stream_loses_nothing(
        tavus: FakeTavusServer, rooms: list[FakeRoom], stream: Stream) -> None:
    """(c): the network drops after the first echo and comes back only once more utterances were
    waiting; every utterance still arrives exactly once, in order, and the ledger closes clean."""
    autocreate(rooms, replica_delay_s=0.0)
    seen: dict[str, int] = {}

    async def drop_after_first_echo(relay: Relay) -> None:
        sink = relay.sink
        assert isinstance(sink, DailySink)
        await wait_until(lambda: bool(rooms) and len(echoes(rooms[0].replica_inbox)) >= 1)
        rooms[0].drop_network(None)
        await asyncio.sleep(1.0)
        await wait_until(lambda: relay.delivery.sending)  # an utterance is held by the outage
        seen["during_outage"] = len(rooms[0].replica_inbox)
        seen["held"] = relay.ledger.closed - relay.ledger.settled
        rooms[0].restore_network()

    relay = await run_relay(settings_for(tavus, stream, speed=4), drop_after_first_echo)
    room = rooms[0]
    assert seen["during_outage"] == 1 and seen["held"] >= 1, seen  # nothing got through while down
    conv = assert_provisioned_and_ended(tavus)
    assert event_types(room.replica_inbox) == [protocol.ECHO] * 4
    assert_echoes_match_clips(room.replica_inbox, stream.names, conv["conversation_id"])
    assert_all_delivered(relay, len(stream.names))
    assert relay.ledger.closed == relay.ledger.delivered


async def test_replica_never_joins_every_utterance_is_reported_undeliverable(
        tavus: FakeTavusServer, rooms: list[FakeRoom], stream: Stream, caplog: pytest.LogCaptureFixture) -> None:
    """(e): no replica within sink.daily.replica_timeout_s: the relay still finishes, and each
    utterance is counted undeliverable and logged with its text; nothing is silently lost."""
    autocreate(rooms, replica_delay_s=None)
    caplog.set_level(logging.ERROR)
    settings = settings_for(tavus, stream, speed=0, **{"sink.daily.replica_timeout_s": 1.0})
    relay = await run_relay(settings)
    n = len(stream.names)
    assert relay.ledger.as_dict() == {"closed": n, "delivered": 0, "dropped": {}, "undeliverable": n,
                                      "in_flight": 0, "unheard": {"regions": 0, "seconds": 0.0}}
    assert relay.metrics.value("echo_relay_send_failures_total") == n
    assert relay.metrics.value("echo_relay_echoes_sent_total", {"source": "speech"}) == 0
    assert rooms[0].replica_inbox == [] and rooms[0].messages == []
    # The relay logged each lost utterance with its words, in order.
    pattern = re.compile(r"^undeliverable echo u\w+: .*\(text: (['\"])(.*)\1\)$")
    lost = [m.group(2) for r in caplog.records if r.name == "pipeline.delivery"
            for m in [pattern.search(r.getMessage())] if m]
    assert len(lost) == n, caplog.text
    for text, name in zip(lost, stream.names, strict=True):
        assert wer(reference(name), text) <= MAX_WER, (name, text)
    assert "replica 'E2E Echo Persona' is not in the Daily room" in caplog.text
    assert_provisioned_and_ended(tavus)  # we created it: ended even though nothing was delivered
