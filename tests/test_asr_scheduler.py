"""The shared ASR scheduler (pipeline/asr/scheduler.py) without a model: the pure batch order `pick()`, and
`AsrScheduler` driving a small fake batching engine that records every batch it is handed.

The real engine's batched decode (FasterWhisperEngine.transcribe_batch_sync) is tested on real speech in
tests/test_serve.py, and the scheduler under many relays there too.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from pipeline.asr.base import AsrEngine, SyncAsrEngine
from pipeline.asr.scheduler import AsrScheduler, _Request, pick
from pipeline.config import AsrBatchSettings
from pipeline.frames import DecodeKind, Pcm, Transcript, UtteranceMeta
from pipeline.metrics import AsrSchedulingMetrics

AUDIO = np.zeros(1600, np.int16)
T0 = 1000.0  # a monotonic clock reading for the pure tests
MAX_WAIT_S = 1.0


# ------------------------------------------------------------------------------------- pick()
def request(loop: asyncio.AbstractEventLoop, client: str, uid: str, kind: DecodeKind = "final",
            queued_at: float = T0, seq: int = 0) -> _Request:
    meta = UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=0.1, decode=kind)
    return _Request(client, AUDIO, meta, loop.create_future(), queued_at=queued_at, seq=seq)


def names(batch: Sequence[_Request]) -> list[str]:
    return [r.meta.utterance_id for r in batch]


async def test_pick_orders_final_then_speculative_then_interim_oldest_first() -> None:
    loop = asyncio.get_running_loop()
    waiting = [
        request(loop, "a", "a-interim", "interim", T0 - 0.5, 0),
        request(loop, "b", "b-spec", "speculative", T0 - 0.4, 1),
        request(loop, "c", "c-final-new", "final", T0 - 0.1, 2),
        request(loop, "d", "d-final-old", "final", T0 - 0.3, 3),
        request(loop, "e", "e-spec-old", "speculative", T0 - 0.6, 4),
    ]
    batch = pick(waiting, max_size=8, max_wait_s=MAX_WAIT_S, now=T0)
    assert names(batch) == ["d-final-old", "c-final-new", "e-spec-old", "b-spec", "a-interim"]
    assert names(waiting) == ["a-interim", "b-spec", "c-final-new", "d-final-old", "e-spec-old"]  # not mutated


async def test_pick_takes_at_most_max_size() -> None:
    loop = asyncio.get_running_loop()
    waiting = [request(loop, f"c{i}", f"u{i}", "final", T0 - i * 0.01, i) for i in range(10)]
    batch = pick(waiting, max_size=3, max_wait_s=MAX_WAIT_S, now=T0)
    assert names(batch) == ["u9", "u8", "u7"]  # the oldest three
    assert pick(waiting, max_size=64, max_wait_s=MAX_WAIT_S, now=T0) == sorted(waiting, key=lambda r: r.queued_at)
    assert pick([], max_size=4, max_wait_s=MAX_WAIT_S, now=T0) == []


async def test_pick_is_fair_one_request_per_client_per_round() -> None:
    """A relay with a backlog does not fill the batch: every client gets one request in before any gets a
    second, even a client whose request is of a lower kind or newer."""
    loop = asyncio.get_running_loop()
    waiting = [request(loop, "busy", f"busy{i}", "final", T0 - 0.5 + i * 0.01, i) for i in range(5)]
    waiting += [request(loop, "quiet", "quiet0", "speculative", T0 - 0.1, 10),
                request(loop, "other", "other0", "interim", T0 - 0.05, 11)]
    assert names(pick(waiting, max_size=2, max_wait_s=MAX_WAIT_S, now=T0)) == ["busy0", "quiet0"]
    assert names(pick(waiting, max_size=3, max_wait_s=MAX_WAIT_S, now=T0)) == ["busy0", "quiet0", "other0"]
    # Room for more: the second round goes back to the clients that still have requests, in order.
    assert names(pick(waiting, max_size=5, max_wait_s=MAX_WAIT_S, now=T0)) == [
        "busy0", "quiet0", "other0", "busy1", "busy2"]
    two = [request(loop, "x", "x0", "final", T0 - 0.3, 0), request(loop, "x", "x1", "final", T0 - 0.2, 1),
           request(loop, "y", "y0", "interim", T0 - 0.1, 2), request(loop, "y", "y1", "interim", T0 - 0.05, 3)]
    assert names(pick(two, max_size=4, max_wait_s=MAX_WAIT_S, now=T0)) == ["x0", "y0", "x1", "y1"]


async def test_pick_promotes_overdue_requests_whatever_their_kind() -> None:
    """A request waiting max_wait_s or more goes first (oldest first), before fresh finals: nothing starves."""
    loop = asyncio.get_running_loop()
    waiting = [
        request(loop, "a", "fresh-final", "final", T0 - 0.2, 0),
        request(loop, "b", "old-interim", "interim", T0 - 1.5, 1),
        request(loop, "c", "older-spec", "speculative", T0 - 2.0, 2),
        request(loop, "d", "just-overdue", "interim", T0 - MAX_WAIT_S, 3),  # exactly max_wait_s: overdue
        request(loop, "e", "almost", "interim", T0 - MAX_WAIT_S + 0.01, 4),
    ]
    batch = pick(waiting, max_size=5, max_wait_s=MAX_WAIT_S, now=T0)
    assert names(batch) == ["older-spec", "old-interim", "just-overdue", "fresh-final", "almost"]
    assert names(pick(waiting, max_size=1, max_wait_s=MAX_WAIT_S, now=T0)) == ["older-spec"]
    # Not yet overdue (an earlier `now`): the kinds decide again.
    assert names(pick(waiting, max_size=2, max_wait_s=MAX_WAIT_S, now=T0 - 1.5)) == ["fresh-final", "older-spec"]
    # max_wait_s = 0: every request is overdue, so the oldest goes first whatever its kind.
    assert names(pick(waiting, max_size=2, max_wait_s=0.0, now=T0)) == ["older-spec", "old-interim"]


async def test_pick_same_time_falls_back_to_arrival_order() -> None:
    loop = asyncio.get_running_loop()
    waiting = [request(loop, f"c{i}", f"u{i}", "final", T0, seq) for i, seq in enumerate([3, 1, 2, 0])]
    assert names(pick(waiting, max_size=4, max_wait_s=MAX_WAIT_S, now=T0)) == ["u3", "u1", "u2", "u0"]


REQUESTS = st.lists(st.tuples(st.sampled_from("abcd"), st.sampled_from(["final", "speculative", "interim"]),
                              st.floats(0.0, 3.0)), max_size=24)


@hsettings(max_examples=200, deadline=None)
@given(spec=REQUESTS, max_size=st.integers(1, 10), max_wait_s=st.sampled_from([0.0, 0.5, 1.0, 5.0]))
def test_pick_invariants(spec: list[tuple[str, DecodeKind, float]], max_size: int, max_wait_s: float) -> None:
    """Any waiting set: min(max_size, waiting) distinct waiting requests; each client's requests in the
    batch are its first ones in priority order (overdue oldest first, then final > speculative > interim,
    oldest first); one request per client per round: nobody gets a (k+1)-th in before every client with
    more waiting got its k-th."""
    loop = asyncio.new_event_loop()
    try:
        waiting = [request(loop, c, f"r{i}", k, T0 - age, i) for i, (c, k, age) in enumerate(spec)]
        batch = pick(waiting, max_size, max_wait_s, T0)
    finally:
        loop.close()
    assert len(batch) == min(max_size, len(waiting))
    assert len({id(r) for r in batch}) == len(batch) and all(any(r is w for w in waiting) for r in batch)
    per_client = Counter(r.client for r in batch)
    waiting_per_client = Counter(r.client for r in waiting)
    for c, n in per_client.items():  # round robin: nobody is two requests ahead of a client with more waiting
        for other, m in per_client.items():
            if waiting_per_client[other] > m:
                assert n <= m + 1, (c, n, other, m)
    kinds = {"final": 0, "speculative": 1, "interim": 2}

    def priority(r: _Request) -> tuple[int, int, float, int]:
        overdue = T0 - r.queued_at >= max_wait_s
        return (0, 0, r.queued_at, r.seq) if overdue else (1, kinds[r.meta.decode], r.queued_at, r.seq)

    for c in per_client:
        mine = [r for r in batch if r.client == c]
        best = sorted((r for r in waiting if r.client == c), key=priority)[:len(mine)]
        assert sorted(mine, key=priority) == best, c
    for r in waiting:  # a client left out entirely means the batch filled up in the first round
        if per_client[r.client] == 0:
            assert len(batch) == max_size and all(n == 1 for n in per_client.values())


# ----------------------------------------------------------------------------- AsrScheduler
class RecordingEngine(SyncAsrEngine):
    """A batching engine (SyncAsrEngine: one thread, `transcribe_batch` -> `transcribe_batch_sync`) that
    records every batch as [(client-visible utterance id, decode kind)], answers "text of <id>", fails
    the ids in `fail`, and can be held (`hold()` / `release()`) so that requests pile up meanwhile."""

    name = "recording"
    model_name = "fake"

    def __init__(self, fail: Sequence[str] = ()) -> None:
        super().__init__()
        self.batches: list[list[tuple[str, str]]] = []
        self.fail = set(fail)
        self.raise_batch: Exception | None = None
        self.in_batch = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self.loaded = 0

    def load_sync(self) -> None:
        self.loaded += 1

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        raise AssertionError("the scheduler must call transcribe_batch")

    def transcribe_batch_sync(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | Exception]:
        self.in_batch.set()
        assert self._go.wait(10), "held too long"
        self.batches.append([(m.utterance_id, m.decode) for _, m in items])
        if self.raise_batch is not None:
            raise self.raise_batch
        return [RuntimeError(f"cannot decode {m.utterance_id}") if m.utterance_id in self.fail
                else Transcript(text=f"text of {m.utterance_id}") for _, m in items]


def meta(uid: str, kind: DecodeKind = "final") -> UtteranceMeta:
    return UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=0.1, decode=kind)


def make_scheduler(engine: AsrEngine, **batch: Any) -> tuple[AsrScheduler, AsrSchedulingMetrics]:
    metrics = AsrSchedulingMetrics(CollectorRegistry())
    return AsrScheduler(engine, AsrBatchSettings(**batch), metrics), metrics


def outcomes(metrics: AsrSchedulingMetrics) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in metrics.requests.collect():
        for s in family.samples:
            if s.name.endswith("_total") and s.value:
                out[(s.labels["kind"], s.labels["outcome"])] = s.value
    return out


async def wait_in_batch(engine: RecordingEngine) -> None:
    """Until the engine's thread is inside a batch (held there by hold())."""
    for _ in range(500):
        if engine.in_batch.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine never got a batch")


async def queued(scheduler: AsrScheduler, n: int) -> None:
    for _ in range(500):
        if scheduler.depth >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{n} requests never queued (depth {scheduler.depth})")


async def test_concurrent_requests_of_several_clients_share_one_batch() -> None:
    engine = RecordingEngine()
    scheduler, metrics = make_scheduler(engine, gather_ms=50)
    clients = [scheduler.client(f"relay{i}") for i in range(3)]
    await asyncio.gather(*(c.load() for c in clients))
    assert engine.loaded == 1 and scheduler.loaded  # one load, however many clients ask
    results = await asyncio.gather(*(c.transcribe(AUDIO, meta(f"u-of-{c.client_id}")) for c in clients))
    assert [r.text for r in results] == [f"text of u-of-relay{i}" for i in range(3)]  # each its own answer
    assert len(engine.batches) == 1 and sorted(engine.batches[0]) == [(f"u-of-relay{i}", "final") for i in range(3)]
    assert scheduler.batches == 1 and scheduler.decoded == 3 and scheduler.depth == 0
    sizes = {s.name: s.value for family in metrics.batch_size.collect() for s in family.samples}
    assert sizes["echo_relay_asr_batch_size_count"] == 1 and sizes["echo_relay_asr_batch_size_sum"] == 3
    assert outcomes(metrics) == {("final", "decoded"): 3}
    await scheduler.close()


async def test_gather_ms_lets_a_request_arriving_just_after_join_the_batch() -> None:
    engine = RecordingEngine()
    scheduler, _ = make_scheduler(engine, gather_ms=300)
    a, b = scheduler.client("a"), scheduler.client("b")
    first = asyncio.ensure_future(a.transcribe(AUDIO, meta("a1")))
    await asyncio.sleep(0.05)  # well inside the gathering window
    second = asyncio.ensure_future(b.transcribe(AUDIO, meta("b1")))
    assert (await first).text == "text of a1" and (await second).text == "text of b1"
    assert [sorted(batch) for batch in engine.batches] == [[("a1", "final"), ("b1", "final")]]
    await scheduler.close()


async def test_requests_queued_while_the_engine_is_busy_go_in_the_next_batch_in_order() -> None:
    """While a batch decodes, requests of several relays wait; the next batch takes them together, final
    first, then speculative, then interim, at most max_size; the rest follow."""
    engine = RecordingEngine()
    scheduler, metrics = make_scheduler(engine, max_size=3, gather_ms=0)
    a, b, c, d = (scheduler.client(n) for n in "abcd")
    engine.hold()
    busy = asyncio.ensure_future(a.transcribe(AUDIO, meta("a0")))
    await wait_in_batch(engine)
    pending = [asyncio.ensure_future(b.transcribe(AUDIO, meta("b-interim", "interim"))),
               asyncio.ensure_future(c.transcribe(AUDIO, meta("c-spec", "speculative"))),
               asyncio.ensure_future(d.transcribe(AUDIO, meta("d-final"))),
               asyncio.ensure_future(a.transcribe(AUDIO, meta("a-final")))]
    await queued(scheduler, 4)
    engine.release()
    await busy
    texts = [(await p).text for p in pending]
    assert texts == ["text of b-interim", "text of c-spec", "text of d-final", "text of a-final"]
    assert engine.batches == [[("a0", "final")],
                              [("d-final", "final"), ("a-final", "final"), ("c-spec", "speculative")],
                              [("b-interim", "interim")]]
    assert outcomes(metrics) == {("final", "decoded"): 3, ("speculative", "decoded"): 1, ("interim", "decoded"): 1}
    await scheduler.close()


async def test_a_request_cancelled_before_dispatch_is_never_decoded() -> None:
    engine = RecordingEngine()
    scheduler, metrics = make_scheduler(engine, gather_ms=0)
    a, b = scheduler.client("a"), scheduler.client("b")
    engine.hold()
    busy = asyncio.ensure_future(a.transcribe(AUDIO, meta("a0")))
    await wait_in_batch(engine)
    discarded = asyncio.ensure_future(b.transcribe(AUDIO, meta("b-spec", "speculative")))
    kept = asyncio.ensure_future(b.transcribe(AUDIO, meta("b-final")))
    await queued(scheduler, 2)
    discarded.cancel()  # the relay discards its speculation (the speaker went on) before the engine is free
    with pytest.raises(asyncio.CancelledError):
        await discarded
    assert scheduler.depth == 1  # gone from the queue at once
    engine.release()
    assert (await busy).text == "text of a0" and (await kept).text == "text of b-final"
    decoded = [uid for batch in engine.batches for uid, _ in batch]
    assert decoded == ["a0", "b-final"] and "b-spec" not in decoded
    assert outcomes(metrics) == {("final", "decoded"): 2, ("speculative", "cancelled"): 1}
    await scheduler.close()


async def test_promote_makes_a_waiting_speculative_decode_final() -> None:
    """The relay takes a waiting speculative decode as its utterance's final one: promoted, it goes before
    an older speculative request of another relay, and is counted as final."""
    engine = RecordingEngine()
    scheduler, metrics = make_scheduler(engine, max_size=1, gather_ms=0)
    a, b, c = scheduler.client("a"), scheduler.client("b"), scheduler.client("c")
    engine.hold()
    busy = asyncio.ensure_future(a.transcribe(AUDIO, meta("a0")))
    await wait_in_batch(engine)
    older = asyncio.ensure_future(b.transcribe(AUDIO, meta("b-spec", "speculative")))
    await asyncio.sleep(0.01)
    mine = asyncio.ensure_future(c.transcribe(AUDIO, meta("c-utt", "speculative")))
    await queued(scheduler, 2)
    c.promote("c-utt")
    b.promote("not-waiting")  # nothing of b's by that id: no effect
    a.promote("b-spec")  # another client's utterance: not a's to promote
    engine.release()
    await asyncio.gather(busy, older, mine)
    assert engine.batches == [[("a0", "final")], [("c-utt", "final")], [("b-spec", "speculative")]]
    assert outcomes(metrics) == {("final", "decoded"): 2, ("speculative", "decoded"): 1}
    await scheduler.close()


async def test_one_failing_item_fails_only_that_request() -> None:
    engine = RecordingEngine(fail=["bad"])
    scheduler, metrics = make_scheduler(engine, gather_ms=0)
    clients = [scheduler.client(n) for n in ("a", "b", "c")]
    engine.hold()
    busy = asyncio.ensure_future(clients[0].transcribe(AUDIO, meta("first")))
    await wait_in_batch(engine)
    futures = [asyncio.ensure_future(cl.transcribe(AUDIO, meta(uid))) for cl, uid in zip(clients, ["ok1", "bad", "ok2"],
                                                                                        strict=True)]
    await queued(scheduler, 3)
    engine.release()
    await busy
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(results[1], RuntimeError) and "cannot decode bad" in str(results[1])
    assert [r.text for r in (results[0], results[2]) if isinstance(r, Transcript)] == ["text of ok1", "text of ok2"]
    assert len(engine.batches) == 2 and len(engine.batches[1]) == 3  # decoded together, failed alone
    assert outcomes(metrics) == {("final", "decoded"): 3, ("final", "failed"): 1}
    # The scheduler goes on.
    assert (await clients[1].transcribe(AUDIO, meta("after"))).text == "text of after"
    await scheduler.close()


async def test_a_failing_batch_call_fails_each_of_its_requests_and_the_next_batch_works() -> None:
    engine = RecordingEngine()
    scheduler, metrics = make_scheduler(engine, gather_ms=0)
    a, b = scheduler.client("a"), scheduler.client("b")
    engine.raise_batch = ValueError("CTranslate2 exploded")
    results = await asyncio.gather(a.transcribe(AUDIO, meta("a1")), b.transcribe(AUDIO, meta("b1")),
                                   return_exceptions=True)
    assert all(isinstance(r, ValueError) and "exploded" in str(r) for r in results), results
    engine.raise_batch = None
    assert (await a.transcribe(AUDIO, meta("a2"))).text == "text of a2"
    assert outcomes(metrics) == {("final", "failed"): 2, ("final", "decoded"): 1}
    await scheduler.close()


async def test_close_fails_waiting_requests_and_duplicate_client_ids_are_refused() -> None:
    engine = RecordingEngine()
    scheduler, _ = make_scheduler(engine, gather_ms=0)
    a = scheduler.client("a")
    with pytest.raises(ValueError, match="exists"):
        scheduler.client("a")
    engine.hold()
    busy = asyncio.ensure_future(a.transcribe(AUDIO, meta("a0")))
    await wait_in_batch(engine)
    waiting = asyncio.ensure_future(a.transcribe(AUDIO, meta("a1")))
    await queued(scheduler, 1)
    closing = asyncio.ensure_future(scheduler.close())
    with pytest.raises(RuntimeError, match="closed"):
        await waiting  # failed, not left waiting forever
    engine.release()
    await closing
    await asyncio.gather(busy, return_exceptions=True)  # the batch in progress ends too (however it ends)
    assert busy.done() and scheduler.depth == 0
    await asyncio.sleep(0.1)  # the engine's thread finishes the batch it was in
    assert [uid for batch in engine.batches for uid, _ in batch] == ["a0"]  # a1 never reached the engine


class OverlappingEngine(AsrEngine):
    """Not batching (a remote server): calls may overlap, so the scheduler passes each one straight on."""

    name = "remote"

    def __init__(self) -> None:
        self.active = 0
        self.most = 0

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        self.active += 1
        self.most = max(self.most, self.active)
        await asyncio.sleep(0.05)
        self.active -= 1
        return Transcript(text=f"remote {meta.utterance_id}")

    async def transcribe_batch(self, items: Sequence[tuple[Pcm, UtteranceMeta]]) -> list[Transcript | BaseException]:
        raise AssertionError("a non-batching engine is never handed a batch")


async def test_a_non_batching_engine_gets_every_request_at_once() -> None:
    engine = OverlappingEngine()
    scheduler, metrics = make_scheduler(engine)
    clients = [scheduler.client(f"c{i}") for i in range(4)]
    results = await asyncio.gather(*(c.transcribe(AUDIO, meta(f"u{i}")) for i, c in enumerate(clients)))
    assert [r.text for r in results] == [f"remote u{i}" for i in range(4)]
    assert engine.most == 4 and scheduler.batches == 0 and scheduler.decoded == 4
    assert outcomes(metrics) == {("final", "decoded"): 4}
    await scheduler.close()


# ------------------------------------------------------------------------------ round engines
class Window:
    """A window a FakeRoundEngine plan asks for (`key` batches, `cost` is what round_window_s bounds)."""

    def __init__(self, uid: str, key: str, cost: float) -> None:
        self.uid, self.key, self.cost = uid, key, cost


class FakeRoundEngine(SyncAsrEngine):
    """The round API of FasterWhisperEngine without a model: an utterance whose id starts with "long" needs
    three rounds (a short window, then two 30 s windows, as a degenerate decode's fallbacks), any other one
    round; every round is recorded as [ids], and can be held (hold()/release()) like RecordingEngine."""

    name = "rounds"
    model_name = "fake"

    def __init__(self, concurrency: int = 1, block: Sequence[str] = ()) -> None:
        super().__init__(concurrency)
        self.rounds: list[list[str]] = []
        self.in_round = threading.Event()
        self._go = threading.Event()
        self._go.set()
        self.block = set(block)  # rounds holding one of these ids wait for unblock()
        self._unblocked = threading.Event()

    def unblock(self) -> None:
        self._unblocked.set()

    def hold(self) -> None:
        self._go.clear()

    def release(self) -> None:
        self._go.set()

    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        raise AssertionError("the scheduler must drive a round engine round by round")

    def plan(self, audio: Pcm, meta: UtteranceMeta) -> Any:
        uid = meta.utterance_id
        decodes = [(yield Window(uid, "10s", 10.0))]
        if uid.startswith("long"):
            decodes.append((yield Window(uid, "30s", 30.0)))
            decodes.append((yield Window(uid, "30s-T0.2", 30.0)))
        if uid.startswith("bad"):
            raise ValueError(f"plan of {uid} failed")
        return Transcript(text=f"text of {uid} after {len(decodes)} round(s)")

    def decode_round(self, requests: list[Any]) -> list[Any]:
        self.in_round.set()
        assert self._go.wait(10), "held too long"
        if self.block & {r.uid for r in requests}:
            assert self._unblocked.wait(10), "blocked too long"
        assert len({r.key for r in requests}) == 1, "a round mixes windows"
        self.rounds.append([r.uid for r in requests])
        return [f"decode of {r.uid}" for r in requests]


async def test_a_round_engine_interleaves_other_relays_between_the_rounds_of_a_long_decode() -> None:
    """One relay's utterance needs three rounds (its fallbacks); another relay's utterance, arriving while
    the first round runs, is decoded in the next round instead of waiting for the whole fallback chain,
    and both get their text."""
    engine = FakeRoundEngine()
    scheduler, metrics = make_scheduler(engine)
    a, b = scheduler.client("a"), scheduler.client("b")
    engine.hold()
    long_task = asyncio.ensure_future(a.transcribe(AUDIO, meta("long-a")))
    for _ in range(500):
        if engine.in_round.is_set():
            break
        await asyncio.sleep(0.01)
    short_task = asyncio.ensure_future(b.transcribe(AUDIO, meta("short-b")))
    await queued(scheduler, 2)
    engine.release()
    short, long_ = await asyncio.gather(short_task, long_task)
    assert short.text == "text of short-b after 1 round(s)" and long_.text == "text of long-a after 3 round(s)"
    assert engine.rounds == [["long-a"], ["short-b"], ["long-a"], ["long-a"]]
    assert outcomes(metrics) == {("final", "decoded"): 2}
    await scheduler.close()


async def test_a_round_holds_at_most_round_window_s_of_windows_and_one_key() -> None:
    """Four utterances that all need their 30 s fallbacks: with round_window_s = 60 a round decodes at most
    two 30 s windows (while four 10 s windows fit in one); rounds never mix window lengths; a plan that
    raises fails only its own request."""
    engine = FakeRoundEngine()
    scheduler, metrics = make_scheduler(engine, round_window_s=60)
    clients = [scheduler.client(f"c{i}") for i in range(5)]
    engine.hold()
    tasks = [asyncio.ensure_future(c.transcribe(AUDIO, meta(f"long{i}"))) for i, c in enumerate(clients[:4])]
    bad = asyncio.ensure_future(clients[4].transcribe(AUDIO, meta("bad4")))
    await queued(scheduler, 5)
    engine.release()
    results = await asyncio.gather(*tasks)
    assert [r.text for r in results] == [f"text of long{i} after 3 round(s)" for i in range(4)]
    with pytest.raises(ValueError, match="plan of bad4 failed"):
        await bad
    sizes = [len(r) for r in engine.rounds]
    assert engine.rounds[0] == ["long0", "long1", "long2", "long3", "bad4"]  # 5 x 10 s = 50 s <= 60 s
    assert max(sizes[1:]) == 2 and sum(sizes[1:]) == 8, engine.rounds  # 8 windows of 30 s, two per round
    assert outcomes(metrics) == {("final", "decoded"): 4, ("final", "failed"): 1}
    await scheduler.close()


async def test_a_request_cancelled_between_rounds_is_not_decoded_further() -> None:
    """A speculative decode discarded after its first round: its plan is closed, its later rounds never run."""
    engine = FakeRoundEngine()
    scheduler, metrics = make_scheduler(engine)
    client = scheduler.client("a")
    engine.hold()
    task = asyncio.ensure_future(client.transcribe(AUDIO, meta("long-spec", "speculative")))
    for _ in range(500):
        if engine.in_round.is_set():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    engine.release()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if engine.rounds:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # time for more rounds, if any were (wrongly) started
    assert scheduler.depth == 0 and engine.rounds == [["long-spec"]]
    assert outcomes(metrics) == {("speculative", "cancelled"): 1}
    await scheduler.close()


async def test_with_two_workers_a_short_decode_does_not_wait_for_a_long_one() -> None:
    """asr.batch.workers: an engine that runs two calls at once gets two batches at once, so a relay's short
    decode completes while another relay's long decode is still in its round."""
    engine = FakeRoundEngine(concurrency=2, block=["long-a"])
    scheduler, _metrics = make_scheduler(engine, gather_ms=0)
    a, b = scheduler.client("a"), scheduler.client("b")
    long_task = asyncio.ensure_future(a.transcribe(AUDIO, meta("long-a")))
    for _ in range(500):
        if engine.in_round.is_set():
            break
        await asyncio.sleep(0.01)
    short = await asyncio.wait_for(b.transcribe(AUDIO, meta("short-b")), 5)
    assert short.text == "text of short-b after 1 round(s)" and not long_task.done()
    engine.unblock()
    assert (await long_task).text == "text of long-a after 3 round(s)"
    assert engine.rounds[0] == ["short-b"] and engine.rounds[1:] == [["long-a"]] * 3
    await scheduler.close()
