#!/usr/bin/env python
"""Soak test: many minutes of real speech through the whole relay with faults injected at random,
then an account of every utterance and of the process's resources.

    python scripts/soak.py --minutes 20 --seed 1

What runs (in-process, one event loop, `pipeline.wiring.build_relay`):
- source: every clip of tests/data/speech laid end to end (1.5 s of silence between), played in a
  loop by the real file source at `--speed` times real time (default 16) until `--minutes` of stream
  time have passed;
- VAD: the configured default (real);
- ASR: the real tiny.en for a seeded share of the utterances (`--real-share`, default 0.1); the others
  get the clip's reference text from a fast stand-in, because tiny.en at many times real time would
  dominate the CPU of a 2-core machine. Both sit behind `FaultyAsr`, which injects decode errors and
  answers later than `asr.deadline_s`;
- transforms: the built-ins plus two fault-injecting steps (one sync with on_error=pass, one async
  with on_error=drop) that raise, hang past their timeout or return garbage types;
- sink: the real Daily sink on the daily-python stand-in with a Tavus replica; a chaos task keeps
  injecting transient send failures, short network drops (some with the call state going back to
  `joining`), outages longer than `sink.daily.send_deadline_s`, the replica leaving and rejoining, and
  permanent send failures of chosen messages.

Faults are drawn from random generators seeded by `--seed`: the same seed gives the same fault
decisions per utterance and the same sequence of room faults (their timing is wall-clock based, so
counts may differ slightly between runs on different machines).

Printed: faults injected by kind, utterances produced (closed by the VAD), delivered, dropped by
reason, undeliverable, lost (must be 0), and RSS / thread count / open fds at start and end.
"lost" = utterances never settled + messages reported delivered that the replica never received +
duplicates the replica received. Exits 1 if anything is lost, the ledger or metrics disagree, or
threads/fds/RSS leak (see LEAK_* below), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import psutil  # noqa: E402
from faults import (  # noqa: E402
    AsrFault,
    FaultyAsr,
    ReferenceAsr,
    Track,
    all_clips,
    check_invariants,
    inbox_echo_ids,
    make_track,
    poison_sends,
    real_engine,
    recording_daily_sink,
    relay_settings,
)

from pipeline.asr.base import AsrEngine  # noqa: E402
from pipeline.frames import Pcm, Transcript, UtteranceMeta  # noqa: E402
from pipeline.metrics import Metrics  # noqa: E402
from pipeline.testing.fake_daily import FakeRoom  # noqa: E402
from pipeline.wiring import build_relay  # noqa: E402

PERSONA = "Soak Persona"
ASR_DEADLINE_S = 1.0
SEND_DEADLINE_S = 1.0
P_ASR_ERROR = 0.03
P_ASR_SLOW = 0.03
P_STEP_FAULT = 0.03  # per transform step
P_SEND_PERMANENT = 0.02  # per message
CHAOS_INTERVAL_S = (0.3, 1.2)  # wall time between room faults
# Leak limits. Threads and fds: end vs start (after the model is loaded and the room joined).
# RSS: end vs the middle of the run. The first minutes hold one-time growth (the looped file is decoded
# and re-blocked, ONNX/CTranslate2 buffers per input shape, malloc arenas of the worker threads) that
# then plateaus; a leak keeps growing through the second half.
LEAK_THREADS = 2
LEAK_FDS = 4
LEAK_RSS_MB = 64.0


class MixedAsr(AsrEngine):
    """The real engine for a seeded share of utterances, the reference stand-in for the rest."""

    name = "mixed"

    def __init__(self, real: AsrEngine, reference: AsrEngine, share: float, seed: int, metrics: Metrics) -> None:
        self.real, self.reference, self.share = real, reference, share
        self.model_name = real.model_name
        self.rng = random.Random(f"{seed}-real")
        self.choice: dict[str, bool] = {}
        if hasattr(real, "metrics"):
            real.metrics = metrics

    async def load(self) -> None:
        await self.real.load()

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        uid = meta.utterance_id
        if uid not in self.choice:
            self.choice[uid] = self.rng.random() < self.share
        engine = self.real if self.choice[uid] else self.reference
        return await engine.transcribe(audio, meta)


@dataclass
class Resources:
    rss_mb: float
    threads: int
    py_threads: int
    fds: int

    names: tuple[str, ...] = ()

    @classmethod
    def now(cls) -> Resources:
        p = psutil.Process()
        names = tuple(sorted(t.name for t in threading.enumerate()))
        return cls(p.memory_info().rss / 2**20, p.num_threads(), threading.active_count(), p.num_fds(), names)


@dataclass
class Chaos:
    room: FakeRoom
    rng: random.Random
    injected: Counter[str] = field(default_factory=Counter)

    async def run(self, stop: asyncio.Event) -> None:
        weights = {"send_transient": 4, "network_drop": 3, "network_drop_rejoining": 2, "network_outage": 1,
                   "replica_rejoin": 2}
        kinds, w = list(weights), list(weights.values())
        while not stop.is_set():
            await asyncio.sleep(self.rng.uniform(*CHAOS_INTERVAL_S))
            if stop.is_set():
                return
            kind = self.rng.choices(kinds, w)[0]
            self.injected[kind] += 1
            if kind == "send_transient":
                self.room.fail_sends(self.rng.randint(1, 3))
            elif kind in ("network_drop", "network_drop_rejoining"):
                self.room.drop_network(self.rng.uniform(0.1, 0.4), call_state_changes=kind.endswith("rejoining"))
                await asyncio.sleep(0.5)
            elif kind == "network_outage":  # longer than the send deadline: in-flight messages are given up
                self.room.drop_network(None)
                await asyncio.sleep(SEND_DEADLINE_S + 0.5)
                self.room.restore_network()
            else:
                self.room.replica.rejoin(delay_s=self.rng.uniform(0.1, 0.5))
                await asyncio.sleep(0.6)


async def soak(minutes: float, seed: int, real_share: float, speed: float, log_path: Path,
               intensity: float = 1.0) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="echo-relay-soak-"))
    clips = all_clips()
    track: Track = make_track(tmp / "all_clips.wav", clips, gap_s=1.5, lead_s=0.5, tail_s=1.5)
    stream_s = minutes * 60.0
    FakeRoom.reset()
    room = FakeRoom.create()
    room.add_replica(PERSONA)

    steps = [
        {"step": "filler_words"},
        {"step": "tests.faults:FaultStep", "rate": P_STEP_FAULT * intensity, "seed": seed, "hang_s": 0.4,
         "timeout_s": 0.15, "kinds": ["raise", "hang", "garbage:int"], "on_error": "pass"},
        {"step": "tests.faults:AsyncFaultStep", "rate": P_STEP_FAULT * intensity, "seed": seed + 1,
         "timeout_s": 0.15, "kinds": ["raise", "hang", "garbage:dict"], "on_error": "drop"},
        {"step": "whitespace"},
    ]
    settings = relay_settings(
        f"file:{track.path}", source__file__loop=True, source__file__speed=speed, asr__deadline_s=ASR_DEADLINE_S,
        transform__steps=steps, sink__spec="daily", sink__daily__module="pipeline.testing.fake_daily",
        sink__daily__join_timeout_s=5, sink__daily__replica_timeout_s=5, sink__daily__send_deadline_s=SEND_DEADLINE_S,
        sink__daily__retry_initial_s=0.02, sink__daily__retry_max_s=0.2, sink__drain_timeout_s=30,
        sink__barge_in="off", tavus__conversation_url=room.url, tavus__conversation_id=room.conversation_id,
        tavus__persona_name=PERSONA, logging__level="info")

    metrics = Metrics()
    asr_rng = random.Random(f"{seed}-asr")

    def asr_plan(meta: UtteranceMeta) -> AsrFault | None:
        r = asr_rng.random()
        if r < P_ASR_ERROR * intensity:
            return AsrFault("raise")
        if r < (P_ASR_ERROR + P_ASR_SLOW) * intensity:
            return AsrFault("slow", ASR_DEADLINE_S + 0.3)
        return None

    mixed = MixedAsr(real_engine(), ReferenceAsr(track, looped=True), real_share, seed, metrics)
    asr = FaultyAsr(mixed, plan=asr_plan)
    sink = recording_daily_sink(settings, metrics)
    relay = build_relay(settings, metrics=metrics, sink=sink, asr=asr)
    t_start = time.monotonic()
    await relay.start()
    assert sink.connection is not None and sink.connection.client is not None
    send_rng = random.Random(f"{seed}-send")
    poisoned: dict[str, bool] = {}

    def permanent_failure(message: Any) -> bool:
        props = message.get("properties") if isinstance(message, dict) else None
        iid = str(props.get("inference_id")) if isinstance(props, dict) else ""
        if iid not in poisoned:
            poisoned[iid] = send_rng.random() < P_SEND_PERMANENT * intensity
        return poisoned[iid]

    poison_sends(sink.connection.client, permanent_failure)
    chaos = Chaos(room, random.Random(f"{seed}-room"))
    stop_chaos = asyncio.Event()
    gc.collect()
    res_start = Resources.now()
    samples: list[tuple[float, Resources]] = []

    async def watch() -> None:
        marks = [stream_s * k / 8 for k in range(1, 8)]
        while relay.source.now_s() < stream_s:
            if marks and relay.source.now_s() >= marks[0]:
                samples.append((marks.pop(0) / 60, Resources.now()))
            await asyncio.sleep(0.05)
        stop_chaos.set()
        relay.stop()

    chaos_task = asyncio.ensure_future(chaos.run(stop_chaos))
    watcher = asyncio.ensure_future(watch())
    await relay.run()
    await watcher
    stop_chaos.set()
    chaos_task.cancel()
    room.restore_network()
    wall = time.monotonic() - t_start
    await asyncio.sleep(1.0)  # hung sync transform calls (0.4 s) finish; SDK threads stop
    FakeRoom.reset()
    gc.collect()
    res_end = Resources.now()

    # ------------------------------------------------------------------------------ the account
    ledger = relay.ledger
    received = inbox_echo_ids(room.replica_inbox)
    delivered_ids = [o.message["properties"]["inference_id"] for o in sink.sent if o.event == "echo"
                     and o.message["properties"].get("done") in (True, "true")]
    duplicates = len(received) - len(set(received))
    missing = set(delivered_ids) - set(received)
    unexpected = set(received) - set(delivered_ids)
    lost = (ledger.closed - ledger.settled) + len(missing) + duplicates
    problems: list[str] = []
    try:
        check_invariants(relay, sink.sent)
    except AssertionError as exc:
        problems.append(f"invariant: {exc}")
    if unexpected:
        problems.append(f"{len(unexpected)} message(s) reached the replica but were counted undeliverable")

    injected: Counter[str] = Counter()
    for kind, n in asr.injected.items():
        injected[f"asr_{'error' if kind == 'raise' else 'past_deadline'}"] += n
    for step in relay.chain.steps:
        fn = step.fn
        for kind, n in getattr(fn, "injected", Counter()).items():
            injected[f"transform_{kind} ({step.on_error})"] += n
    for kind, n in chaos.injected.items():
        injected[kind] += n
    injected["send_permanent"] = sum(poisoned.values())

    real_n = sum(mixed.choice.values())
    print(f"soak: {stream_s / 60:.1f} min of speech (seed {seed}, speed {speed:g}) in {wall:.1f} s wall; "
          f"{relay.source.now_s() / track.duration_s:.1f} loops of {len(clips)} clips ({track.duration_s:.0f} s)")
    print(f"ASR: real tiny.en on {real_n} utterance(s), reference text on {len(mixed.choice) - real_n}")
    print("faults injected:")
    for kind, n in sorted(injected.items()):
        print(f"  {kind:<32} {n}")
    print(f"produced (utterances closed by the VAD): {ledger.closed}")
    print(f"delivered:     {ledger.delivered}  (received by the replica: {len(set(received))})")
    print(f"dropped:       {sum(ledger.dropped.values())}")
    for reason, n in sorted(ledger.dropped.items()):
        print(f"  {reason:<44} {n}")
    print(f"undeliverable: {ledger.undeliverable}")
    # Reconciliation: each injected ASR/transform(drop) fault must show up as exactly its drop reason.
    transform_drop_faults = sum(n for k, n in injected.items()
                                if k.startswith("transform_") and k.endswith("(drop)"))
    transform_drops = sum(n for r, n in ledger.dropped.items() if r.startswith("transform:"))
    print(f"check: asr_error {ledger.dropped.get('asr_error', 0)} dropped / {injected['asr_error']} injected; "
          f"asr_deadline {ledger.dropped.get('asr_deadline', 0)} / {injected['asr_past_deadline']} injected "
          f"(more = real decodes slower than asr.deadline_s under load); transform drops {transform_drops} / "
          f"{transform_drop_faults} injected with on_error=drop")
    if ledger.dropped.get("asr_error", 0) != injected["asr_error"]:
        problems.append("asr_error drops do not match the injected decode errors")
    if ledger.dropped.get("asr_deadline", 0) < injected["asr_past_deadline"]:
        problems.append("fewer asr_deadline drops than decodes made late")
    if transform_drops != transform_drop_faults:
        problems.append("transform drops do not match the injected faults of on_error=drop steps")
    print(f"send retries:  {metrics.value('echo_relay_send_retries_total'):.0f}")
    print(f"lost:          {lost}  (unsettled {ledger.closed - ledger.settled}, delivered but not received "
          f"{len(missing)}, duplicates {duplicates})")
    print("resources        start      " + "  ".join(f"{m:>5.1f}min" for m, _ in samples) + "      end")
    for label, attr, fmt in (("RSS MB", "rss_mb", "{:>9.1f}"), ("threads (OS)", "threads", "{:>9d}"),
                             ("threads (py)", "py_threads", "{:>9d}"), ("open fds", "fds", "{:>9d}")):
        row = [fmt.format(getattr(res_start, attr))] + [fmt.format(getattr(r, attr)) for _, r in samples] + \
              [fmt.format(getattr(res_end, attr))]
        print(f"  {label:<12}" + "  ".join(row))
    print(f"log: {log_path}")

    extra = sorted(set(res_end.names) - set(res_start.names))
    if extra:
        print(f"python threads alive at the end that were not at the start: {', '.join(extra)}")
    mid = samples[len(samples) // 2][1] if samples else res_start
    print(f"RSS growth: {res_end.rss_mb - res_start.rss_mb:+.1f} MB since start, "
          f"{res_end.rss_mb - mid.rss_mb:+.1f} MB over the second half (limit {LEAK_RSS_MB:.0f} MB)")
    if res_end.threads > res_start.threads + LEAK_THREADS:
        problems.append(f"thread leak: {res_start.threads} -> {res_end.threads}")
    if res_end.fds > res_start.fds + LEAK_FDS:
        problems.append(f"fd leak: {res_start.fds} -> {res_end.fds}")
    if res_end.rss_mb > mid.rss_mb + LEAK_RSS_MB:
        problems.append(f"RSS grew {res_end.rss_mb - mid.rss_mb:.0f} MB over the second half")
    if lost:
        problems.append(f"{lost} lost")
    for p in problems:
        print(f"FAIL: {p}")
    print("OK" if not problems else "FAILED")
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=20.0, help="minutes of speech (stream time) to relay")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--speed", type=float, default=16.0,
                    help="times real time (0 = as fast as possible; room faults then have little wall time)")
    ap.add_argument("--real-share", type=float, default=0.1, help="share of utterances decoded by tiny.en")
    ap.add_argument("--intensity", type=float, default=1.0, help="multiplies every per-utterance fault probability")
    ap.add_argument("--log", type=Path, help="log file (default: a temporary file)")
    args = ap.parse_args(argv)
    log_path = args.log or Path(tempfile.mkstemp(prefix="echo-relay-soak-", suffix=".log")[1])
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    return asyncio.run(soak(args.minutes, args.seed, args.real_share, args.speed, log_path, args.intensity))


if __name__ == "__main__":
    raise SystemExit(main())
