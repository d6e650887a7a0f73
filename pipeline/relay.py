"""The relay: the only place that wires source -> VAD -> ASR -> transforms -> sink.

Threads at the edges, asyncio in the middle:
- the source hands frames to the loop (capture threads use call_soon_threadsafe);
- VAD runs on the loop (microseconds per frame);
- ASR runs in the engine's one-thread executor;
- one ordered delivery task runs transcripts through the transform chain into the sink.

Latency (see BENCHMARKS.md): when a pause inside an utterance reaches `endpoint.speculative_ms`,
the audio so far is decoded speculatively. If the transcript ends a sentence with enough model
confidence in its final punctuation, the utterance is finished right away (reason "sentence_end");
otherwise it ends after the full `vad.hangover_ms` and the speculative transcript is reused when no
speech came in between. Speech resuming discards the speculative result.

Accounting: every utterance the VAD closes ends as exactly one of delivered / dropped (with a
reason) / undeliverable; `Ledger` counts them and `status()` shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline import protocol
from pipeline.asr.base import AsrEngine
from pipeline.config import Settings
from pipeline.control.api import QueueFull
from pipeline.dsp import resample, rms_dbfs
from pipeline.endpoint import required_silence_ms
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, Utterance, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.sink.base import Outgoing, Sink, SinkError
from pipeline.source.base import Source
from pipeline.transform.chain import TransformChain
from pipeline.vad import (
    Discarded,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    Unheard,
    UtteranceEnded,
    VadStage,
)

log = logging.getLogger("echo_relay.relay")

RECENT_UTTERANCES = 20  # kept for /status
LEVEL_EVERY_SAMPLES = SAMPLE_RATE // 10  # input-level gauge update period
QUEUE_POLL_S = 0.1  # a capture waiting on a full delivery queue re-checks for stop() this often


@dataclass(slots=True)
class Ledger:
    """Where every closed utterance (and control-API message) ended up."""

    closed: int = 0
    delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    undeliverable: int = 0
    unheard: int = 0  # speech-like regions the VAD never opened an utterance on (not in `closed`)
    unheard_s: float = 0.0

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def settled(self) -> int:
        return self.delivered + sum(self.dropped.values()) + self.undeliverable

    def as_dict(self) -> dict[str, Any]:
        return {"closed": self.closed, "delivered": self.delivered, "dropped": dict(self.dropped),
                "undeliverable": self.undeliverable, "in_flight": self.closed - self.settled,
                "unheard": {"regions": self.unheard, "seconds": round(self.unheard_s, 3)}}


@dataclass(slots=True)
class _Speculation:
    utterance_id: str
    speech_end: int
    task: asyncio.Future[Transcript]
    valid: bool = True
    finish_after: int | None = None  # silence (samples) that finishes the utterance, once decoded


@dataclass(slots=True)
class _Job:
    """One unit of delivery, processed strictly in order."""

    kind: Literal["speech", "text", "audio"]
    meta: UtteranceMeta
    utterance: Utterance | None = None
    transcript: asyncio.Future[Transcript] | None = None
    text: str = ""
    through_transforms: bool = True
    pcm: Pcm | None = None  # audio jobs: already at the sink's audio rate
    inference_id: str | None = None
    done: bool = True
    queued_ids: list[str] = field(default_factory=list)


class Relay:
    def __init__(self, settings: Settings, *, source: Source, sink: Sink, asr: AsrEngine, vad: VadStage,
                 chain: TransformChain, metrics: Metrics) -> None:
        self.settings = settings
        self.source, self.sink, self.asr, self.vad, self.chain = source, sink, asr, vad, chain
        self.metrics = metrics
        self.ledger = Ledger()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_UTTERANCES)
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue(maxsize=settings.sink.queue_size)
        self._seq = 0
        self._spec: _Speculation | None = None
        self._model_loaded = False
        self._stopping = asyncio.Event()
        self._drain_deadline: float | None = None  # time.monotonic() by which pending work must be out
        self._barge_pending: int | None = None  # speech start position awaiting barge_in_min_ms
        self._send_lock = asyncio.Lock()
        self._api_count = 0
        self._background: set[asyncio.Future[Any]] = set()  # fire-and-forget work, referenced until done
        self.failed: str | None = None  # why the run failed (exit status 1), None when it did not

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model (once, warmed up) and open the sink."""
        t0 = time.perf_counter()
        await self.asr.load()
        self._model_loaded = True
        self.metrics.model_loaded.set(1)
        log.info("ASR ready: %s %s in %.2fs", self.asr.name, self.asr.model_name, time.perf_counter() - t0)
        log.info("VAD: %s", self.vad.describe())
        ep = self.settings.endpoint
        log.info("endpointing: %s", (
            f"speculative decode after {ep.speculative_ms} ms of silence; finish after {ep.confident_pause_ms} ms "
            f"when the final . ? ! has p >= {ep.confident_prob}, after {ep.likely_pause_ms} ms when p >= "
            f"{ep.likely_prob}, else after {self.settings.vad.hangover_ms} ms") if ep.enabled
            else f"plain: decode after {self.settings.vad.hangover_ms} ms of silence")
        await self.sink.start()

    async def run(self) -> None:
        """Relay until the source ends or stop() is called, then deliver what is pending."""
        deliver = asyncio.create_task(self._deliver_loop(), name="deliver")
        watch = asyncio.create_task(self._watch_sink(), name="watch-sink")
        try:
            await self._capture_loop()
        finally:
            watch.cancel()
            await self._finish(deliver)

    async def _watch_sink(self) -> None:
        """A room that ends server-side (Tavus shutdown) stops the relay cleanly."""
        ended: asyncio.Event | None = getattr(self.sink, "ended", None)
        if ended is None:
            return
        await ended.wait()
        reason = getattr(self.sink, "ended_reason", None) or "the conversation ended"
        log.warning("room closed: %s; stopping", reason)
        self.failed = reason if getattr(self.sink, "ended_with_error", False) else None
        self.stop()

    def _spawn(self, aw: Any) -> None:
        """Run a coroutine in the background, keeping a reference so it cannot be garbage-collected."""
        fut = asyncio.ensure_future(aw)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    def stop(self) -> None:
        """Graceful stop: capture ends, the utterance in progress and the queue are delivered."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._drain_deadline = time.monotonic() + self.settings.sink.drain_timeout_s
            self._spawn(self.source.close())

    async def _finish(self, deliver: asyncio.Task[None]) -> None:
        drain = self.settings.sink.drain_timeout_s
        if self._drain_deadline is None:  # the source ended by itself: the drain time starts now
            self._drain_deadline = time.monotonic() + drain
        try:
            if not await self._queue_job(None):
                raise TimeoutError
            left = max(0.0, self._drain_deadline - time.monotonic())
            await asyncio.wait_for(asyncio.shield(deliver), timeout=left)
        except TimeoutError:
            log.error("drain deadline (%.1fs) passed with %d item(s) queued", drain, self._jobs.qsize())
            deliver.cancel()  # the item being delivered is counted undeliverable by _deliver_loop
            with contextlib.suppress(asyncio.CancelledError):
                await deliver
            while not self._jobs.empty():
                job = self._jobs.get_nowait()
                if job is not None:
                    self._undeliverable(job, "drain deadline passed")
        with contextlib.suppress(asyncio.CancelledError):
            await deliver
        await self.sink.close(drain)
        await self.asr.close()
        with contextlib.suppress(Exception):
            await self.chain.aclose()

    # -------------------------------------------------------------------------------- capture
    async def _capture_loop(self) -> None:
        next_level = 0  # the input-level gauge is for dashboards: 10 updates a second are plenty
        idle = False
        async for frame in self.source.frames():
            if frame.start >= next_level:
                self.metrics.input_level.set(rms_dbfs(frame.samples))
                next_level = frame.start + LEVEL_EVERY_SAMPLES
            for event in self.vad.process(frame):
                await self._on_vad_event(event)
            await self._maybe_finish()
            self._check_barge_in(frame.end)
            # No open utterance: the source may batch its blocks (CPU in silence); an open one is
            # ended block by block, so the end of speech is never seen late.
            if idle != (self.vad.utterance_id is None):
                idle = not idle
                self.source.set_idle(idle)
        for event in self.vad.flush():
            await self._on_vad_event(event)

    async def _on_vad_event(self, event: object) -> None:
        if isinstance(event, SpeechStarted):
            if event.continues is None:  # a max-length split continues speech already barged in on
                self._on_speech_started(event.pos)
        elif isinstance(event, SpeechPaused):
            self._speculate(event.utterance_id, event.snapshot)
        elif isinstance(event, SpeechResumed):
            self._discard_speculation("resumed")
        elif isinstance(event, UtteranceEnded):
            await self._utterance_closed(event.utterance)
        elif isinstance(event, Unheard):
            self._unheard(event.start, event.end, event.speech_samples,
                          f"no utterance opened, peak VAD probability {event.peak_prob:.2f}")
        elif isinstance(event, Discarded):  # opened, but shorter than vad.min_utterance_ms
            self.metrics.drop("vad", event.reason)
            self._unheard(event.speech_start, event.speech_end, event.speech_end - event.speech_start,
                          f"utterance {event.utterance_id} discarded: {event.reason}")

    def _unheard(self, start: int, end: int, speech_samples: int, why: str) -> None:
        """Speech-like audio that will not be relayed: counted beside the ledger, never silently lost."""
        seconds = speech_samples / SAMPLE_RATE
        self.ledger.unheard += 1
        self.ledger.unheard_s += seconds
        self.metrics.unheard_regions.inc()
        self.metrics.unheard_seconds.inc(seconds)
        log.info("unheard speech-like audio at %.2f-%.2f s (%.2f s): %s", start / SAMPLE_RATE, end / SAMPLE_RATE,
                 seconds, why)

    # ----------------------------------------------------------------------- speculative ASR
    def _speculate(self, utterance_id: str, snapshot: Utterance) -> None:
        if not self.settings.endpoint.enabled:
            return
        self._discard_speculation("superseded")
        meta = self._meta(snapshot)
        meta.extra["speculative"] = True  # engines do not count drops of results that may be thrown away
        task = asyncio.ensure_future(self.asr.transcribe(snapshot.audio, meta))
        spec = _Speculation(utterance_id, snapshot.speech_end, task)
        self._spec = spec
        task.add_done_callback(lambda _t: self._spawn(self._speculation_done(spec)))

    def _discard_speculation(self, why: str) -> None:
        if self._spec is not None and self._spec.valid:
            self._spec.valid = False
            self.metrics.speculative.labels(outcome="discarded").inc()
            log.debug("speculative decode of %s discarded (%s)", self._spec.utterance_id, why)
        self._spec = None

    async def _speculation_done(self, spec: _Speculation) -> None:
        # exception() first: a failed decode that was superseded must still be retrieved (else asyncio
        # logs "Task exception was never retrieved" with a traceback when the task is collected).
        if spec.task.cancelled() or spec.task.exception() is not None or not spec.valid or spec is not self._spec:
            return
        tr = spec.task.result()
        if tr.dropped_reason:
            return
        need_ms = required_silence_ms(tr.text, tr.final_punct_prob, self.settings.endpoint,
                                      self.settings.vad.hangover_ms)
        log.debug("speculative %s: …%r p=%s -> finish after %d ms of silence", spec.utterance_id, tr.text[-30:],
                  None if tr.final_punct_prob is None else round(tr.final_punct_prob, 2), need_ms)
        if need_ms < self.settings.vad.hangover_ms:  # otherwise the segmenter's hangover closes it
            spec.finish_after = need_ms * SAMPLE_RATE // 1000
            await self._maybe_finish()

    async def _maybe_finish(self) -> None:
        """Close the open utterance once its silence reaches what its speculative transcript asks for."""
        spec = self._spec
        if spec is None or not spec.valid or spec.finish_after is None:
            return
        if self.vad.utterance_id != spec.utterance_id or self.vad.silence_samples < spec.finish_after:
            return
        utt = self.vad.end_now("sentence_end")
        if utt is not None:
            await self._utterance_closed(utt)

    # ----------------------------------------------------------------------- utterance -> job
    async def _utterance_closed(self, utt: Utterance) -> None:
        self.ledger.closed += 1
        self.metrics.utterances.labels(reason=utt.reason).inc()
        self._barge_pending = None
        meta = self._meta(utt)
        spec, self._spec = self._spec, None
        if spec is not None and spec.valid and spec.utterance_id == utt.id and spec.speech_end == utt.speech_end:
            transcript = spec.task
            self.metrics.speculative.labels(outcome="early" if utt.reason == "sentence_end" else "reused").inc()
        else:
            if spec is not None and spec.valid:
                self.metrics.speculative.labels(outcome="discarded").inc()
            transcript = asyncio.ensure_future(self.asr.transcribe(utt.audio, meta))
        job = _Job("speech", meta, utterance=utt, transcript=transcript)
        self.metrics.queue_depth.labels(queue="delivery").set(self._jobs.qsize() + 1)
        if not await self._queue_job(job):  # backpressure: a full queue pauses capture (docs/reliability.md)
            self._undeliverable(job, "drain deadline passed")

    async def _queue_job(self, job: _Job | None) -> bool:
        """Put on the delivery queue, waiting while it is full; after stop() only until the drain
        deadline (False when it passed: the caller accounts the job)."""
        while True:
            deadline = self._drain_deadline
            wait = QUEUE_POLL_S if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return False
            try:
                await asyncio.wait_for(self._jobs.put(job), wait)
                return True
            except TimeoutError:
                continue

    def _meta(self, utt: Utterance) -> UtteranceMeta:
        return UtteranceMeta(utterance_id=utt.id, audio_start_s=utt.audio_start_s, audio_end_s=utt.audio_end_s,
                             reason=utt.reason, room=self.sink.room.as_dict())

    # -------------------------------------------------------------------------------- barge-in
    def _on_speech_started(self, pos: int) -> None:
        mode = self.settings.sink.barge_in
        if mode == "off" or not self.sink.room.replica_speaking:
            return
        if mode == "speech_start":
            self._spawn(self.interrupt())
        else:
            self._barge_pending = pos

    def _check_barge_in(self, pos: int) -> None:
        if self._barge_pending is None:
            return
        if pos - self._barge_pending >= self.settings.sink.barge_in_min_ms * SAMPLE_RATE // 1000:
            self._barge_pending = None
            if self.sink.room.replica_speaking:
                self._spawn(self.interrupt())

    # -------------------------------------------------------------------------------- delivery
    async def _deliver_loop(self) -> None:
        while True:
            job = await self._jobs.get()
            self.metrics.queue_depth.labels(queue="delivery").set(self._jobs.qsize())
            if job is None:
                return
            try:
                await self._deliver(job)
            except asyncio.CancelledError:  # the drain deadline passed while this item was in flight
                self._undeliverable(job, "drain deadline passed")
                raise
            except Exception:  # one bad item must never stop the relay
                log.exception("unexpected error delivering %s", job.meta.utterance_id)
                self._undeliverable(job, "internal error")

    async def _deliver(self, job: _Job) -> None:
        meta = job.meta
        if job.kind == "speech":
            tr = await self._await_transcript(job)
            if tr is None:
                return
            meta.asr_text, meta.confidence, meta.language = tr.text, tr.confidence, tr.language
            text = tr.text
        elif job.kind == "audio":
            await self._send_audio(job, job.pcm if job.pcm is not None else np.zeros(0, np.int16))
            return
        else:
            text = job.text
        if job.kind == "speech" or job.through_transforms:
            outcome = await self.chain.run(text, meta)  # the chain counts its own drops and timings
            if outcome.text is None:
                self._drop(meta, f"transform:{outcome.dropped_by or 'unknown'}", counted=True)
                return
            text = outcome.text
        if job.kind == "speech" and (meta.modality == "audio" or self.settings.sink.mode == "audio"):
            assert job.utterance is not None
            pcm = resample(job.utterance.audio, SAMPLE_RATE, self.settings.sink.audio_sample_rate)
            await self._send_audio(job, pcm, text=text)
            return
        await self._send_text(job, text)

    async def _await_transcript(self, job: _Job) -> Transcript | None:
        assert job.transcript is not None and job.utterance is not None
        meta = job.meta
        try:
            tr = await asyncio.wait_for(asyncio.shield(job.transcript), timeout=self.settings.asr.deadline_s)
        except TimeoutError:
            log.warning("ASR missed its %.1fs deadline on %s; utterance dropped", self.settings.asr.deadline_s,
                        meta.utterance_id)
            job.transcript.add_done_callback(_retrieve)  # its late result or error is not wanted
            self._drop(meta, "asr_deadline", metric=("asr", "deadline"))
            return None
        except Exception as exc:
            log.error("ASR failed on %s: %s", meta.utterance_id, exc)
            self._drop(meta, "asr_error", metric=("asr", "error"))
            return None
        self.metrics.stage_latency.labels(stage="asr").observe(tr.decode_s)
        if tr.dropped_reason or not tr.text.strip():
            self._drop(meta, f"asr:{tr.dropped_reason or 'empty'}", counted=bool(tr.extra.get("drop_counted")))
            return None
        return tr

    async def _send_text(self, job: _Job, text: str) -> None:
        meta = job.meta
        limit = self.settings.sink.max_message_bytes
        pieces = protocol.split_text(text, self.sink.conversation_id, limit)
        inference_id = job.inference_id or protocol.new_inference_id()
        ok = True
        for i, piece in enumerate(pieces):
            # Pieces of one long text share an inference_id; only the last closes it (done).
            done = job.done if i == len(pieces) - 1 else False
            msg = protocol.echo_text(piece, self.sink.conversation_id, inference_id, done)
            ok = await self._emit(self._outgoing("echo", msg, meta, piece)) and ok
        job.queued_ids.append(inference_id)
        self._settle(job, ok, text)

    async def _send_audio(self, job: _Job, pcm: Pcm, text: str = "") -> None:
        rate = self.settings.sink.audio_sample_rate
        msgs = protocol.audio_chunks(pcm, rate, self.sink.conversation_id, job.inference_id,
                                     self.settings.sink.max_message_bytes)
        if not job.done:  # a caller streaming its own chunks closes the utterance itself
            msgs = msgs[:-1]
        ok = True
        for msg in msgs:
            ok = await self._emit(self._outgoing("echo", msg, job.meta, text)) and ok
        if msgs:
            job.queued_ids.append(msgs[0]["properties"]["inference_id"])
        self._settle(job, ok, text or "<audio>")

    def _outgoing(self, event: Literal["echo", "interrupt"], msg: dict[str, Any], meta: UtteranceMeta,
                  text: str) -> Outgoing:
        return Outgoing(event, msg, utterance_id=meta.utterance_id, audio_start_s=meta.audio_start_s,
                        audio_end_s=meta.audio_end_s, asr_text=meta.asr_text, text=text)

    async def _emit(self, out: Outgoing) -> bool:
        """Hand one message to the sink; False when the sink gave up on it."""
        async with self._send_lock:  # seq order == delivery order, interrupts included
            self._seq += 1
            out.seq = self._seq
            out.emitted_at_s = self.source.now_s()
            if out.event == "echo" and out.utterance_id.startswith("u"):
                self.metrics.end_to_sent.observe(max(0.0, out.emitted_at_s - out.audio_end_s))
            t0 = time.perf_counter()
            try:
                await self.sink.send(out)
            except SinkError as exc:
                log.error("undeliverable %s %s: %s (text: %r)", out.event, out.utterance_id, exc, out.text)
                self.metrics.send_failures.inc()
                return False
            finally:
                self.metrics.stage_latency.labels(stage="sink").observe(time.perf_counter() - t0)
        return True

    def _settle(self, job: _Job, ok: bool, text: str) -> None:
        if ok:
            self.ledger.delivered += 1
            self.metrics.echoes_sent.labels(source="speech" if job.kind == "speech" else "api").inc()
        else:
            self.ledger.undeliverable += 1
        self.recent.append({"utterance_id": job.meta.utterance_id, "audio_start_s": job.meta.audio_start_s,
                            "audio_end_s": job.meta.audio_end_s, "asr_text": job.meta.asr_text, "text": text,
                            "status": "delivered" if ok else "undeliverable"})

    def _drop(self, meta: UtteranceMeta, reason: str, counted: bool = False,
              metric: tuple[str, str] | None = None) -> None:
        """Account a dropped utterance under `reason` (ledger key); the metric is labelled `metric`
        (stage, reason), else from "stage:reason"; `counted` when the stage already counted it."""
        if not counted:
            stage, _, why = reason.partition(":")
            self.metrics.drop(*(metric or (stage, why or reason)))
        self.ledger.drop(reason)
        log.debug("dropped %s (%s)", meta.utterance_id, reason)
        self.recent.append({"utterance_id": meta.utterance_id, "asr_text": meta.asr_text,
                            "status": f"dropped: {reason}"})

    def _undeliverable(self, job: _Job, why: str) -> None:
        self.ledger.undeliverable += 1
        self.metrics.send_failures.inc()
        text = job.text or job.meta.asr_text
        tr = job.transcript
        if not text and tr is not None and tr.done() and not tr.cancelled() and tr.exception() is None:
            text = tr.result().text  # not yet handed to the transforms, but the words are known
        log.error("undeliverable %s: %s (text: %r)", job.meta.utterance_id, why, text)

    # --------------------------------------------------------------------- control API handle
    def _enqueue(self, job: _Job) -> None:
        if self._stopping.is_set():
            raise QueueFull("relay is stopping")
        try:
            self._jobs.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(f"delivery queue full ({self._jobs.maxsize} waiting)") from None
        self.ledger.closed += 1
        self.metrics.queue_depth.labels(queue="delivery").set(self._jobs.qsize())

    def _api_meta(self, kind: str) -> UtteranceMeta:
        self._api_count += 1
        now = self.source.now_s()
        return UtteranceMeta(utterance_id=f"api{self._api_count}", audio_start_s=now, audio_end_s=now,
                             room=self.sink.room.as_dict(), extra={"origin": kind})

    async def submit_text(self, text: str, *, inference_id: str | None = None, done: bool = True,
                          through_transforms: bool = True) -> list[str]:
        inference_id = inference_id or protocol.new_inference_id()
        self._enqueue(_Job("text", self._api_meta("text"), text=text, through_transforms=through_transforms,
                           inference_id=inference_id, done=done))
        return [inference_id]

    async def submit_audio(self, pcm: Pcm, sample_rate: int, *, inference_id: str | None = None,
                           done: bool = True) -> list[str]:
        inference_id = inference_id or protocol.new_inference_id()
        out_rate = self.settings.sink.audio_sample_rate
        if sample_rate != out_rate:
            pcm = resample(pcm, sample_rate, out_rate)
        self._enqueue(_Job("audio", self._api_meta("audio"), pcm=pcm, inference_id=inference_id, done=done))
        return [inference_id]

    async def interrupt(self) -> None:
        await self._emit(Outgoing("interrupt", protocol.interrupt(self.sink.conversation_id)))
        self.metrics.interrupts_sent.inc()

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": self._model_loaded, "sink_ready": self.sink.is_ready(),
                "running": not self._stopping.is_set()}

    def status(self) -> dict[str, Any]:
        return {"room": self.sink.room.as_dict(), "conversation_id": self.sink.conversation_id,
                "sink": self.sink.name, "source": self.source.name,
                "model": {"engine": self.asr.name, "name": self.asr.model_name, "loaded": self._model_loaded},
                "queues": {"delivery": self._jobs.qsize()}, "ledger": self.ledger.as_dict(),
                "source_stats": self.source.stats(), "recent": list(self.recent)}


def _retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen (no 'exception was never retrieved' report)."""
    if not fut.cancelled():
        fut.exception()
