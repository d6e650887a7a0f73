"""The relay: wires source -> VAD -> ASR -> delivery (transforms, sink) and runs the capture loop.

Threads at the edges, asyncio in the middle:
- the source hands frames to the loop (capture threads use call_soon_threadsafe);
- VAD runs on the loop (microseconds per frame);
- ASR runs in the engine's one-thread executor;
- one delivery task (`pipeline.delivery`) runs transcripts through the transform chain into the sink.

Only the capture loop closes utterances: the VAD's hangover, or `pipeline.speculation` saying that a
speculative transcript ends the sentence (checked on every frame and as soon as the decode completes).
A closed utterance is queued for delivery with its decode (the speculative one when it covers the same
audio), so the queue's order is the order of speech.

Accounting: every utterance the VAD closes ends as exactly one of delivered / dropped (with a reason)
/ undeliverable (`Delivery.ledger`); speech-like audio that never became an utterance is counted as
unheard beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from pipeline import protocol
from pipeline.asr.base import AsrEngine
from pipeline.asr.scheduler import AsrScheduler, ScheduledAsr
from pipeline.config import Settings
from pipeline.control.api import InterruptOutcome
from pipeline.delivery import Delivery, Ledger, Origin, QueuedEcho
from pipeline.dsp import dbfs, resample, rms
from pipeline.events import EventBus
from pipeline.frames import (
    SAMPLE_RATE,
    AudioFrame,
    DecodeKind,
    Pcm,
    Transcript,
    Utterance,
    UtteranceMeta,
    ms_to_samples,
)
from pipeline.language import LanguageTracker
from pipeline.metrics import Metrics
from pipeline.perception import Perception, PerceptionRun
from pipeline.sink.base import Sink
from pipeline.source.base import Source
from pipeline.speculation import Speculator, crop, join
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

log = logging.getLogger(__name__)

LEVEL_EVERY_SAMPLES = SAMPLE_RATE // 10  # input-level gauge (and `level` event) update period
# Interim decodes for watchers of the event stream (`partial` events): only while someone listens,
# while the person is speaking, at most this often, once the utterance has this much speech.
PARTIAL_EVERY_SAMPLES = ms_to_samples(400)
PARTIAL_MIN_SAMPLES = ms_to_samples(500)
STATE_EVERY_S = 1.0  # `room` and `stats` events while someone listens


class Relay:
    def __init__(self, settings: Settings, *, source: Source, sink: Sink, asr: AsrEngine, vad: VadStage,
                 chain: TransformChain, metrics: Metrics, perception: Perception | None = None) -> None:
        self.settings = settings
        self.source, self.sink, self.vad, self.chain = source, sink, vad, chain
        self.perception = perception or Perception([], budget_s=0.0, metrics=metrics)
        # Decodes go through a scheduler (pipeline/asr/scheduler.py): `serve` hands every relay a client of
        # one shared scheduler; alone, the relay schedules its own engine (final decodes before interim ones).
        self.asr = asr if isinstance(asr, ScheduledAsr) else AsrScheduler(
            asr, settings.asr.batch, metrics.asr).client("relay", owner=True)
        self.metrics = metrics
        self.events = EventBus(metrics, source.now_s)
        self.perception.bind_events(self.events)
        # The conversation's language (pipeline/language.py): delivery feeds it, every ASR request carries it.
        self.language = LanguageTracker(settings.asr.detect, settings.asr.language)
        self.delivery = Delivery(settings, sink=sink, chain=chain, metrics=metrics, now_s=source.now_s,
                                 events=self.events, paced=source.paced, language=self.language)
        self.speculator = Speculator(settings, metrics, lambda utt: self._transcribe(utt, "speculative"),
                                     allowed=self.asr.speculative)
        self._model_loaded = False
        self._stopping = asyncio.Event()
        self._barge_pending: int | None = None  # speech start position awaiting barge_in_min_ms
        self._partial: asyncio.Future[Transcript] | None = None  # the interim decode in progress
        self._partial_at = 0  # stream position of the last interim decode
        # Analyzers started on a pause's snapshot, beside its speculative decode: (utterance id, speech_end, run).
        self._spec_perception: tuple[str, int, PerceptionRun] | None = None
        self._api_count = 0
        self._background: set[asyncio.Future[Any]] = set()  # fire-and-forget work, referenced until done
        self.failed: str | None = None  # why the run failed (exit status 1), None when it did not
        self.ended: str | None = None  # why the conversation ended server-side, None when it did not

    @property
    def ledger(self) -> Ledger:
        return self.delivery.ledger

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load the model (once, warmed up) and open the sink."""
        t0 = time.perf_counter()
        await self.asr.load()
        self._model_loaded = True
        only = self.asr.only_language
        if only is not None and self.language.language != only:
            self.language.fix(only)  # an English-only model: "en" whatever asr.language says (engine's warning)
        self.metrics.model_loaded.set(1)
        self.metrics.process.describe_asr(self.asr.name, self.asr.model_name)
        log.info("ASR ready: %s %s in %.2fs", self.asr.name, self.asr.model_name, time.perf_counter() - t0)
        log.info("VAD: %s", self.vad.describe())
        ep = self.settings.endpoint
        log.info("endpointing: %s", (
            f"speculative decode after {ep.speculative_ms} ms of silence; finish after {ep.confident_pause_ms} ms "
            f"when the final . ? ! has p >= {ep.confident_prob}, after {ep.likely_pause_ms} ms when p >= "
            f"{ep.likely_prob}, else after {self.settings.vad.hangover_ms} ms"
            + (f"; turn-end rule: after {ep.turn_pause_ms} ms when the combined turn-end probability is >= "
               f"{ep.turn_prob}" if ep.turn_rule else "; turn-end rule off"))
            if self.speculator.enabled else f"plain: decode after {self.settings.vad.hangover_ms} ms of silence"
            + ("" if self.asr.speculative else " (one request per utterance: asr.openai_http.speculative is off)"))
        await self.sink.start()
        video = self.perception.video
        if video is not None:  # the speaker's camera, for the video analyzers (pipeline/perception/video.py)
            video.bind(asyncio.get_running_loop())
            self.source.watch_video(video.on_frame, video.color_format)

    async def run(self) -> None:
        """Relay until the source ends or stop() is called, then deliver what is pending."""
        deliver = asyncio.create_task(self.delivery.run(), name="deliver")
        watch = asyncio.create_task(self._watch_sink(), name="watch-sink")
        publish = asyncio.create_task(self._publish_state(), name="publish-state")
        cancelled = False  # code outside the relay cancelled this task: stop now, not after a drain
        try:
            await self._capture_loop()
        except asyncio.CancelledError:
            cancelled = True
            self._count_open_speech()
            raise
        finally:
            watch.cancel()
            publish.cancel()
            self.speculator.discard("the run ended")
            await self.delivery.finish(deliver, cancelled=cancelled)
            await self.sink.close(0.0 if cancelled else self.settings.sink.drain_timeout_s)
            await self.asr.close()
            with contextlib.suppress(Exception):
                await self.chain.aclose()
            with contextlib.suppress(Exception):
                await self.perception.aclose()

    def _count_open_speech(self) -> None:
        """The run was cancelled mid-capture: the utterance still open (and a speech-like run not yet judged)
        will never be decoded; count them unheard rather than lose them silently."""
        for event in self.vad.flush():
            if isinstance(event, UtteranceEnded):
                utt = event.utterance
                self._unheard(utt.start, utt.end, sum(b - a for a, b in utt.spans()),
                              f"utterance {utt.id} was open when the relay was cancelled")
            elif isinstance(event, Unheard | Discarded):
                self._not_relayed(event)

    async def abandon(self) -> None:
        """After a failed start(): release what it may have opened (the room and a conversation it created,
        the output, the source, this relay's use of the ASR engine). `serve` carries on without it."""
        closers = (lambda: self.sink.close(0.0), self.source.close, self.asr.close, self.chain.aclose,
                   self.perception.aclose)
        for close in closers:
            with contextlib.suppress(Exception):
                await close()

    async def _watch_sink(self) -> None:
        """A conversation that ends server-side stops the relay: cleanly (exit 0 when everything was
        delivered) for a normal end, as a failure when Tavus names an error."""
        await self.sink.ended.wait()
        reason = self.sink.ended_reason or "the conversation ended"
        self.ended = reason
        if self.sink.ended_with_error:
            self.failed = reason
        log.warning("the conversation ended (%s); stopping", reason)
        self.stop()

    async def _publish_state(self) -> None:
        """`room` and `stats` events once a second while someone watches the event stream."""
        while True:
            await asyncio.sleep(STATE_EVERY_S)
            if self.events.listening:
                self.events.emit("room", **self.sink.room.as_dict())
                self.events.emit("stats", ledger=self.ledger.as_dict(), queues={"delivery": self.delivery.depth},
                                 sink=self.sink.stats())

    def _spawn(self, aw: Any) -> None:
        """Run a coroutine in the background, keeping a reference so it cannot be garbage-collected."""
        fut = asyncio.ensure_future(aw)
        self._background.add(fut)
        fut.add_done_callback(self._background.discard)

    def stop(self) -> None:
        """Graceful stop: capture ends, the utterance in progress and the queue are delivered."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.delivery.start_draining(self.settings.sink.drain_timeout_s)
            self._spawn(self.source.close())

    # -------------------------------------------------------------------------------- capture
    async def _capture_loop(self) -> None:
        next_level = 0  # the input-level gauge is for dashboards: 10 updates a second are plenty
        idle = False
        async for frame in self._frames():
            if frame is None:  # a speculative decode completed: it may finish the utterance now
                await self._maybe_finish()
                continue
            if frame.start >= next_level:
                level = rms(frame.samples)
                self.metrics.input_level.set(level)
                self.events.emit("level", dbfs=round(dbfs(level), 1))
                next_level = frame.start + LEVEL_EVERY_SAMPLES
            for event in self.vad.process(frame):
                await self._on_vad_event(event)
            await self._maybe_finish()
            self._check_barge_in(frame.end)
            self._maybe_partial(frame.end)
            # No open utterance: the source may batch its blocks (CPU in silence); an open one is
            # ended block by block, so the end of speech is never seen late.
            if idle != (self.vad.utterance_id is None):
                idle = not idle
                self.source.set_idle(idle)
        for event in self.vad.flush():
            await self._on_vad_event(event)

    async def _frames(self) -> AsyncIterator[AudioFrame | None]:
        """The source's frames, and None whenever a speculative decode completes in between (so the
        capture loop, not a callback, finishes the utterance it speaks for)."""
        frames = aiter(self.source.frames())
        next_frame: asyncio.Future[AudioFrame | None] | None = None
        try:
            while True:
                decode = self.speculator.pending()
                if next_frame is None and decode is None:
                    frame = await anext(frames, None)  # the common case: no task per frame (CPU in silence)
                else:
                    if next_frame is None:
                        next_frame = asyncio.ensure_future(anext(frames, None))
                    if decode is not None:
                        either: set[asyncio.Future[Any]] = {next_frame, decode}
                        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                        if not next_frame.done():
                            yield None
                            continue
                    frame = await next_frame
                    next_frame = None
                if frame is None:
                    return
                yield frame
        finally:
            if next_frame is not None and not next_frame.done():
                next_frame.cancel()

    async def _on_vad_event(self, event: object) -> None:
        if isinstance(event, SpeechStarted):
            self.events.emit("speech_started", utterance_id=event.utterance_id, at_s=round(event.pos / SAMPLE_RATE, 3),
                             prob=round(self.vad.peak_prob, 3), continues=event.continues)
            if event.continues is None:  # a max-length split continues speech already barged in on
                self._on_speech_started(event.pos)
        elif isinstance(event, SpeechPaused):
            self.speculator.start(event.snapshot)
            self._speculate_perception(event.snapshot)
        elif isinstance(event, SpeechResumed):
            self.speculator.resumed()
            self._speculate_perception(None)
        elif isinstance(event, UtteranceEnded):
            await self._utterance_closed(event.utterance)
        elif isinstance(event, Unheard | Discarded):
            self._not_relayed(event)

    def _not_relayed(self, event: Unheard | Discarded) -> None:
        if isinstance(event, Unheard):
            self._unheard(event.start, event.end, event.speech_samples,
                          f"no utterance opened, peak VAD probability {event.peak_prob:.2f}")
        else:  # opened, but shorter than vad.min_utterance_ms
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
        self.events.emit("unheard", start_s=round(start / SAMPLE_RATE, 3), end_s=round(end / SAMPLE_RATE, 3),
                         seconds=round(seconds, 3), why=why)
        log.info("unheard speech-like audio at %.2f-%.2f s (%.2f s): %s", start / SAMPLE_RATE, end / SAMPLE_RATE,
                 seconds, why)

    async def _maybe_finish(self) -> None:
        """Close the open utterance once its silence reaches what its speculative transcript asks for."""
        if self.speculator.should_finish(self.vad.utterance_id, self.vad.silence_samples):
            utt = self.vad.end_now("sentence_end")
            if utt is not None:
                await self._utterance_closed(utt)

    def _transcribe(self, utt: Utterance, kind: DecodeKind) -> asyncio.Future[Transcript]:
        """Decode the utterance after its committed beginning, if it has one (pipeline/speculation.py), with
        that beginning's text as context; the result is the two joined."""
        meta = self._meta(utt)
        meta.decode = kind
        prefix = self.speculator.prefix(utt)
        rest = crop(utt, prefix)
        meta.speech_spans = tuple(((a - rest.start) / SAMPLE_RATE, (b - rest.start) / SAMPLE_RATE)
                                  for a, b in rest.spans())  # in the audio the engine gets
        if rest is utt or prefix is None:
            return asyncio.ensure_future(self.asr.transcribe(utt.audio, meta))
        meta.context = prefix.transcript.text
        return asyncio.ensure_future(self._joined(prefix.transcript, self.asr.transcribe(rest.audio, meta)))

    @staticmethod
    async def _joined(prefix: Transcript, rest: Awaitable[Transcript]) -> Transcript:
        return join(prefix, await rest)

    def _maybe_partial(self, pos: int) -> None:
        """An interim decode for watchers (never sent to the room). It takes the ASR engine and CPU, so it is
        only done while someone listens and while the person speaks (not in a pause, where the
        speculative and final decodes of the utterance's end need it; the scheduler decodes those first)."""
        if not self.events.wants_partial or self._partial is not None or self.speculator.pending() is not None:
            return
        if not self.asr.speculative:  # one request per utterance (asr.openai_http.speculative): no interim ones
            return
        if self.vad.silence_samples > 0 or pos - self._partial_at < PARTIAL_EVERY_SAMPLES:
            return
        snap = self.vad.snapshot()
        if snap is None or snap.speech_end - snap.speech_start < PARTIAL_MIN_SAMPLES:
            return
        self._partial_at = pos
        self.metrics.partial_decodes.inc()
        task = self._partial = self._transcribe(snap, "interim")
        task.add_done_callback(lambda t: self._partial_done(snap.id, t))

    def _partial_done(self, utterance_id: str, task: asyncio.Future[Transcript]) -> None:
        self._partial = None
        if task.cancelled() or task.exception() is not None:
            return
        tr = task.result()
        if not tr.dropped_reason and tr.text.strip() and self.vad.utterance_id == utterance_id:
            self.events.emit("partial", utterance_id=utterance_id, text=tr.text)

    async def _utterance_closed(self, utt: Utterance) -> None:
        self.metrics.utterances.labels(reason=utt.reason).inc()
        self.events.emit("speech_ended", utterance_id=utt.id, start_s=round(utt.audio_start_s, 3),
                         end_s=round(utt.audio_end_s, 3), reason=utt.reason)
        self._barge_pending = None
        transcript = self.speculator.take(utt)
        if transcript is not None:
            self.asr.promote(utt.id)  # if still waiting for the engine, it is this utterance's final decode now
        else:
            transcript = self._transcribe(utt, "final")
        meta = self._meta(utt)
        perception = self._perception_for(utt, meta)
        # Backpressure: a full queue pauses capture here (docs/reliability.md).
        await self.delivery.put(QueuedEcho(Origin.SPEECH, meta, utterance=utt, transcript=transcript,
                                           perception=perception))

    def _speculate_perception(self, snapshot: Utterance | None) -> None:
        """Start the analyzers on a pause's snapshot, as the speculative decode starts (their results are ready
        when a speculative transcript closes the utterance); None: the speech resumed, drop the last start."""
        spec, self._spec_perception = self._spec_perception, None
        if spec is not None:
            spec[2].abandon()  # what its calls bring is counted `unused`
        if snapshot is not None and self.perception and self.speculator.enabled:
            run = self.perception.start(snapshot.audio, self._meta(snapshot))
            if run is not None:
                self._spec_perception = snapshot.id, snapshot.speech_end, run

    def _perception_for(self, utt: Utterance, meta: UtteranceMeta) -> PerceptionRun | None:
        """The analyzers' run for a closed utterance: the pause's one when it covers the same speech, else a new
        one started now, beside the ASR."""
        spec, self._spec_perception = self._spec_perception, None
        if spec is not None and spec[:2] == (utt.id, utt.speech_end):
            return spec[2]
        if spec is not None:
            spec[2].abandon()
        return self.perception.start(utt.audio, meta)

    def _meta(self, utt: Utterance) -> UtteranceMeta:
        return UtteranceMeta(utterance_id=utt.id, audio_start_s=utt.audio_start_s, audio_end_s=utt.audio_end_s,
                             reason=utt.reason, room=self.sink.room.as_dict(), audio_offset_s=utt.start / SAMPLE_RATE,
                             language=self.language.language, language_locked=self.language.locked)

    # -------------------------------------------------------------------------------- barge-in
    def _on_speech_started(self, pos: int) -> None:
        mode = self.settings.sink.barge_in
        if mode == "off" or not self.sink.room.replica_speaking:
            return
        if mode == "speech_start":
            self._spawn(self.delivery.interrupt("barge-in"))
        else:
            self._barge_pending = pos

    def _check_barge_in(self, pos: int) -> None:
        if self._barge_pending is None:
            return
        if pos - self._barge_pending >= ms_to_samples(self.settings.sink.barge_in_min_ms):
            self._barge_pending = None
            if self.sink.room.replica_speaking:
                self._spawn(self.delivery.interrupt("barge-in"))

    # --------------------------------------------------------------------- control API handle
    def _api_meta(self, kind: str) -> UtteranceMeta:
        self._api_count += 1
        now = self.source.now_s()
        return UtteranceMeta(utterance_id=f"api{self._api_count}", audio_start_s=now, audio_end_s=now,
                             room=self.sink.room.as_dict(), extra={"kind": kind},
                             language=self.delivery.text_language, language_locked=self.language.locked)

    async def submit_text(self, text: str, *, inference_id: str | None = None, done: bool = True,
                          through_transforms: bool = True) -> list[str]:
        inference_id = inference_id or protocol.new_inference_id()
        self.delivery.put_nowait(QueuedEcho(Origin.API, self._api_meta("text"), text=text, inference_id=inference_id,
                                            done=done, through_transforms=through_transforms))
        return [inference_id]

    async def submit_audio(self, pcm: Pcm, sample_rate: int, *, inference_id: str | None = None,
                           done: bool = True) -> list[str]:
        inference_id = inference_id or protocol.new_inference_id()
        out_rate = self.settings.sink.audio_sample_rate
        if sample_rate != out_rate:
            pcm = resample(pcm, sample_rate, out_rate)
        self.delivery.put_nowait(QueuedEcho(Origin.API, self._api_meta("audio"), pcm=pcm, inference_id=inference_id,
                                            done=done))
        return [inference_id]

    async def interrupt(self) -> InterruptOutcome:
        return await self.delivery.interrupt("POST /interrupt")

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": self._model_loaded, **self.asr.readiness(), "sink_ready": self.sink.is_ready(),
                "running": not self._stopping.is_set()}

    def status(self) -> dict[str, Any]:
        return {"room": self.sink.room.as_dict(), "conversation_id": self.sink.conversation_id,
                "latency": self.delivery.latency_summary(),
                "sink": self.sink.name, "source": self.source.name,
                "model": {"engine": self.asr.name, "name": self.asr.model_name, "loaded": self._model_loaded},
                "queues": {"delivery": self.delivery.depth}, "ledger": self.ledger.as_dict(),
                "language": self.delivery.language_status(),
                "perception": self.perception.status() if self.perception else None,
                "source_stats": self.source.stats(), "sink_stats": self.sink.stats(),
                "recent": list(self.delivery.recent)}
