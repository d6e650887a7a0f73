"""Shared ASR scheduling: one engine (one model in memory) decoding for one or many relays.

Every relay transcribes through a `ScheduledAsr`, a client of an `AsrScheduler` (`run` has one
relay and its own scheduler; `serve` shares one scheduler between all its relays). A request waits
in the scheduler until the engine is free; then one dispatch takes up to `asr.batch.max_size`
waiting requests and decodes them together.

Engines with the round API (`RoundEngine`: faster-whisper, pipeline/asr/whisper/engine.py) are driven one
decode round at a time: an utterance's decode is a plan of windows (short window, then fallbacks
and second opinions when needed), and one round decodes, in one batch, the next window of the
utterances that need the same window, at most `asr.batch.round_window_s` seconds of windows. An
utterance that needs another round goes back to the queue, so the fallback of one utterance (two
30 s windows: ~1 s on two cores) never holds up the first decode of the others for longer than a
round. Other batching engines get all their requests in one `transcribe_batch` call.

Engines whose calls may overlap (`AsrEngine.batching` false: a remote server, most user engines)
are not queued: each request goes to their `transcribe` at once.

Which requests go first::

    waited >= asr.batch.max_wait_ms ─▶ first, oldest first      (a bound on waiting: nothing starves)
    else by kind:  final ─▶ speculative ─▶ interim              (UtteranceMeta.decode)
    within a kind: first rounds before later ones, then oldest first, one request per relay per pass
                                                                 (fair between relays)

- A speculative decode that the relay takes as its utterance's final decode is promoted
  (`ScheduledAsr.promote`). One the relay discards before it is dispatched is never decoded.
- `asr.batch.workers`: batches decoded at once (faster-whisper runs that many CTranslate2 calls in
  parallel), so a short decode need not wait for a long one; each batch is picked as above.
- `asr.batch.gather_ms`: with several relays, an idle engine waits this long after the first
  request for others to join its batch (relays whose utterances end together).
- A failure of one item (its exception) is that item's; a failure of the whole batch call is each
  of its items'. Nothing here drops a request: every one ends with a result, an exception, or its
  caller's cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Generator, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

from pipeline.asr.base import AsrEngine
from pipeline.config import AsrBatchSettings
from pipeline.frames import DecodeKind, Pcm, Transcript, UtteranceMeta
from pipeline.metrics import AsrSchedulingMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")

KIND_ORDER: dict[DecodeKind, int] = {"final": 0, "speculative": 1, "interim": 2}


class RoundRequest(Protocol):
    """One window a `RoundEngine` plan asks for: requests with equal `key` share a batch; `cost` is
    what `asr.batch.round_window_s` bounds (seconds of window to encode)."""

    @property
    def key(self) -> Hashable: ...

    @property
    def cost(self) -> float: ...


@runtime_checkable
class RoundEngine(Protocol):
    """An engine decoded round by round (pipeline/asr/whisper/plan.py). `plan` and `decode_round` are called
    through `run_sync`, in the engine's own thread."""

    def plan(self, audio: Pcm, meta: UtteranceMeta) -> Generator[Any, Any, Transcript]: ...

    def decode_round(self, requests: list[Any]) -> list[Any]: ...

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T: ...


@dataclass(eq=False, slots=True)
class _Request:
    client: str
    audio: Pcm
    meta: UtteranceMeta
    future: asyncio.Future[Transcript]
    queued_at: float = field(default_factory=time.monotonic)
    seq: int = 0
    ready_at: float = 0.0  # when it last became ready for a round (queued_at, then after each round)
    running: bool = False  # in a batch being decoded
    # Round engines: the utterance's plan, the window it waits for, and its outcome once the plan ends.
    plan: Generator[Any, Any, Transcript] | None = None
    pending: Any = None
    outcome: Transcript | Exception | None = None

    def __post_init__(self) -> None:
        self.ready_at = self.ready_at or self.queued_at

    @property
    def started(self) -> bool:
        return self.plan is not None


def pick(waiting: Sequence[_Request], max_size: int, max_wait_s: float, now: float) -> list[_Request]:
    """The next batch (pure: the order rule of the module docstring)."""
    def key(r: _Request) -> tuple[int, int, bool, float, int]:
        overdue = now - r.ready_at >= max_wait_s
        if overdue:
            return (0, 0, False, r.ready_at, r.seq)
        return (1, KIND_ORDER[r.meta.decode], r.started, r.ready_at, r.seq)

    ordered = sorted(waiting, key=key)
    batch: list[_Request] = []
    taken: Counter[str] = Counter()  # requests taken per client so far
    level = 0
    while len(batch) < min(max_size, len(ordered)):
        for r in ordered:  # each pass takes at most one more request per client
            if len(batch) < max_size and taken[r.client] == level and r not in batch:
                batch.append(r)
                taken[r.client] += 1
        level += 1
    return batch


class AsrScheduler:
    """Queues transcription requests from its clients and decodes them in batches on one engine."""

    def __init__(self, engine: AsrEngine, settings: AsrBatchSettings,
                 metrics: AsrSchedulingMetrics | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._waiting: list[_Request] = []
        self._wake: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches being decoded
        self._load_lock: asyncio.Lock | None = None
        self._loaded = False
        self._clients: set[str] = set()
        self._seq = itertools.count()
        self.batches = 0  # dispatches so far
        self.decoded = 0  # requests decoded so far

    @property
    def name(self) -> str:
        return str(getattr(self.engine, "name", "asr"))

    @property
    def model_name(self) -> str:
        return str(getattr(self.engine, "model_name", ""))

    @property
    def loaded(self) -> bool:
        return self._loaded

    @property
    def speculative(self) -> bool:
        """Whether the engine takes speculative and interim decodes (`AsrEngine.speculative`)."""
        return bool(getattr(self.engine, "speculative", True))

    @property
    def only_language(self) -> str | None:
        """The one language the loaded engine writes (`AsrEngine.only_language`)."""
        value = getattr(self.engine, "only_language", None)
        return value if isinstance(value, str) else None

    def readiness(self) -> dict[str, bool]:
        """The engine's own readiness checks (`AsrEngine.readiness`; none for engines without it)."""
        checks = getattr(self.engine, "readiness", None)
        return dict(checks()) if callable(checks) else {}

    @property
    def depth(self) -> int:
        return len(self._waiting)

    def client(self, client_id: str, *, owner: bool = False) -> ScheduledAsr:
        """The engine as one relay sees it. `owner`: closing this client closes the scheduler and the
        engine (`run`); shared clients only detach (`serve` closes the scheduler itself)."""
        if client_id in self._clients:
            raise ValueError(f"ASR client {client_id!r} exists")
        self._clients.add(client_id)
        return ScheduledAsr(self, client_id, owner)

    async def load(self) -> None:
        """Load the engine once, however many clients ask."""
        if self._load_lock is None:
            self._load_lock = asyncio.Lock()
        async with self._load_lock:
            if not self._loaded:
                load = getattr(self.engine, "load", None)
                if load is not None:
                    await load()
                self._loaded = True

    async def transcribe(self, client_id: str, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        if not getattr(self.engine, "batching", False):
            return await self._pass_through(audio, meta)
        loop = asyncio.get_running_loop()
        request = _Request(client_id, audio, meta, loop.create_future(), seq=next(self._seq))
        self._waiting.append(request)
        self._ensure_dispatcher()
        assert self._wake is not None
        self._wake.set()
        try:
            return await request.future
        finally:
            if not request.future.done():  # the caller gave up (a discarded speculation, a deadline)
                request.future.cancel()
            if request in self._waiting:  # never dispatched: never decoded
                self._waiting.remove(request)
                self._count(request, "cancelled")

    async def _pass_through(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        if self.metrics is not None:
            self.metrics.wait.labels(kind=meta.decode).observe(0.0)
        try:
            result = await self.engine.transcribe(audio, meta)
        except asyncio.CancelledError:
            self._count_kind(meta.decode, "cancelled")
            raise
        except Exception:
            self._count_kind(meta.decode, "failed")
            raise
        self._count_kind(meta.decode, "decoded")
        self.decoded += 1
        return result

    def promote(self, client_id: str, utterance_id: str) -> None:
        """A waiting speculative decode of this utterance now stands for its final decode."""
        for r in self._waiting:
            if r.client == client_id and r.meta.utterance_id == utterance_id and r.meta.decode == "speculative":
                r.meta.decode = "final"

    def detach(self, client_id: str) -> None:
        self._clients.discard(client_id)

    async def close(self) -> None:
        for task in [self._dispatcher, *self._running]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._dispatcher = None
        for r in self._waiting:
            if not r.future.done():
                r.future.set_exception(RuntimeError("the ASR engine was closed"))
        self._waiting.clear()
        close = getattr(self.engine, "close", None)
        if close is not None:
            await close()

    # ------------------------------------------------------------------------------ dispatch
    def _ensure_dispatcher(self) -> None:
        if self._dispatcher is None or self._dispatcher.done():
            self._wake = asyncio.Event()
            self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="asr-dispatch")

    async def _dispatch(self) -> None:
        """Start batches while the engine has a free slot (`concurrency`: decode calls it runs at once)."""
        assert self._wake is not None
        s = self.settings
        slots = max(1, int(getattr(self.engine, "concurrency", 1)))
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._running) < slots:
                ready = [r for r in self._waiting if not r.running]
                if not ready:
                    break
                if s.gather_ms > 0 and not self._running and len(self._clients) > 1 and len(ready) < s.max_size:
                    await asyncio.sleep(s.gather_ms / 1000)  # let utterances ending together share the batch
                    ready = [r for r in self._waiting if not r.running]
                batch = pick(ready, s.max_size, s.max_wait_ms / 1000, time.monotonic())
                if not batch:
                    break
                for r in batch:
                    r.running = True
                task = asyncio.get_running_loop().create_task(self._run_batch(batch), name="asr-batch")
                self._running.add(task)
                task.add_done_callback(self._batch_done)

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ASR scheduling failed: %s", task.exception())
        if self._wake is not None:
            self._wake.set()

    async def _run_batch(self, batch: list[_Request]) -> None:
        try:
            if isinstance(self.engine, RoundEngine):
                await self._round(batch)
            else:
                for r in batch:
                    if r in self._waiting:
                        self._waiting.remove(r)
                batch = [r for r in batch if not r.future.done()]
                if batch:
                    await self._decode(batch)
        finally:
            for r in batch:
                r.running = False

    async def _decode(self, batch: list[_Request]) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(batch))
            for r in batch:
                self.metrics.wait.labels(kind=r.meta.decode).observe(now - r.queued_at)
        self.batches += 1
        items = [(r.audio, r.meta) for r in batch]
        try:
            batch_call = getattr(self.engine, "transcribe_batch", None)
            if batch_call is not None:
                results: list[Any] = list(await batch_call(items))
            else:  # a user engine with transcribe() only
                results = list(await asyncio.gather(*(self.engine.transcribe(a, m) for a, m in items),
                                                    return_exceptions=True))
        except asyncio.CancelledError:
            for r in batch:
                r.future.cancel()
            raise
        except Exception as exc:
            results = [exc] * len(batch)
        log.debug("ASR batch of %d (%s) decoded in %.3f s", len(batch),
                  ", ".join(f"{r.client}/{r.meta.utterance_id}/{r.meta.decode}" for r in batch), time.monotonic() - now)
        if len(results) != len(batch):
            results = [RuntimeError(f"the ASR engine returned {len(results)} results for {len(batch)} utterances")
                       ] * len(batch)
        for r, result in zip(batch, results, strict=True):
            self._settle(r, result)

    async def _round(self, batch: list[_Request]) -> None:
        """One decode round (RoundEngine): start the plans of new requests, decode the next window of
        those that share the first one's key (within round_window_s), settle the finished ones."""
        assert isinstance(self.engine, RoundEngine)
        batch = [r for r in batch if not r.future.done()]
        now = time.monotonic()
        if self.metrics is not None:
            for r in batch:
                if not r.started:
                    self.metrics.wait.labels(kind=r.meta.decode).observe(now - r.queued_at)
        try:
            decoded = await self.engine.run_sync(self._round_sync, batch)
        except asyncio.CancelledError:
            for r in batch:
                r.future.cancel()
            raise
        self.batches += 1
        if self.metrics is not None and decoded:
            self.metrics.batch_size.observe(len(decoded))
        log.debug("ASR round of %d (%s) in %.3f s", len(decoded), ", ".join(
            f"{r.client}/{r.meta.utterance_id}/{r.meta.decode}" for r in decoded), time.monotonic() - now)
        done_at = time.monotonic()
        for r in decoded:
            r.ready_at = done_at
        for r in batch:
            if r.outcome is None and not r.future.done():
                continue  # it needs another round
            if r.plan is not None and r.outcome is None:
                r.plan.close()  # its caller gave up mid-plan: no more rounds for it
            if r in self._waiting:  # else transcribe() removed it when its caller gave up, and counted it
                self._waiting.remove(r)
                self._settle(r, r.outcome)

    def _round_sync(self, batch: list[_Request]) -> list[_Request]:
        """In the engine's thread: the round itself. Returns the requests it decoded a window of."""
        engine = self.engine
        assert isinstance(engine, RoundEngine)
        for r in batch:
            if r.plan is None:
                try:
                    r.plan = engine.plan(r.audio, r.meta)
                except Exception as exc:
                    r.outcome = exc
                    continue
                self._advance(r, None)
        live = [r for r in batch if r.outcome is None and r.pending is not None]
        if not live:
            return []
        key = live[0].pending.key
        group: list[_Request] = []
        cost = 0.0
        for r in live:
            if r.pending.key == key and (not group or cost + r.pending.cost <= self.settings.round_window_s):
                group.append(r)
                cost += r.pending.cost
        try:
            results = engine.decode_round([r.pending for r in group])
        except Exception as exc:  # the batch failed: each of its utterances fails
            for r in group:
                r.outcome = exc
            return group
        for r, result in zip(group, results, strict=True):
            self._advance(r, result)
        return group

    @staticmethod
    def _advance(r: _Request, value: Any) -> None:
        assert r.plan is not None
        try:
            r.pending = r.plan.send(value)
        except StopIteration as finished:
            r.pending, r.outcome = None, finished.value
        except Exception as exc:  # this utterance fails; the others go on
            r.pending, r.outcome = None, exc

    def _settle(self, r: _Request, result: Transcript | BaseException | None) -> None:
        if r.future.done():
            self._count(r, "discarded" if result is not None else "cancelled")
        elif isinstance(result, BaseException) or result is None:
            self._count(r, "failed")
            r.future.set_exception(result or RuntimeError("the decode ended without a result"))
        else:
            self._count(r, "decoded")
            self.decoded += 1
            r.future.set_result(result)

    def _count(self, r: _Request, outcome: str) -> None:
        self._count_kind(r.meta.decode, outcome)

    def _count_kind(self, kind: str, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(kind=kind, outcome=outcome).inc()


class ScheduledAsr(AsrEngine):
    """One relay's view of a shared engine: `transcribe` goes through the scheduler."""

    def __init__(self, scheduler: AsrScheduler, client_id: str, owner: bool) -> None:
        self.scheduler = scheduler
        self.client_id = client_id
        self.owner = owner
        self.name = scheduler.name
        self.model_name = scheduler.model_name
        self.speculative = scheduler.speculative

    async def load(self) -> None:
        await self.scheduler.load()

    @property
    def only_language(self) -> str | None:
        return self.scheduler.only_language

    def readiness(self) -> dict[str, bool]:
        return self.scheduler.readiness()

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        return await self.scheduler.transcribe(self.client_id, audio, meta)

    def promote(self, utterance_id: str) -> None:
        self.scheduler.promote(self.client_id, utterance_id)

    async def close(self) -> None:
        self.scheduler.detach(self.client_id)
        if self.owner:
            await self.scheduler.close()
