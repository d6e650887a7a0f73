"""Speculative decoding: decode an utterance during its pause, and finish it early when the
transcript ends a sentence with confidence (the policy is `pipeline.endpoint.required_silence_ms`).

When a pause inside an utterance reaches `endpoint.speculative_ms` (the segmenter's `SpeechPaused`),
the audio so far is decoded. If speech resumes, the decode is discarded. Otherwise its transcript
says how much silence finishes the utterance; the relay's capture loop, the only place that closes
utterances, asks `should_finish()` on every frame and whenever the decode completes (`pending()`),
and when the utterance does close, `take()` hands the decode over for reuse if it covers the same
audio.

One speculation at a time; nothing here touches the queue or the sink. Off when `endpoint.enabled` is
false, or when the ASR engine takes one request per utterance (`AsrEngine.speculative` false: an
openai-http server unless `asr.openai_http.speculative`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pipeline.config import Settings
from pipeline.delivery import retrieve
from pipeline.endpoint import required_silence_ms
from pipeline.frames import Transcript, Utterance, ms_to_samples
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

Transcribe = Callable[[Utterance], Awaitable[Transcript]]


@dataclass(slots=True)
class _Speculation:
    utterance_id: str
    speech_end: int
    task: asyncio.Future[Transcript]
    finish_after: int | None = None  # silence (samples) that finishes the utterance, once judged
    judged: bool = False


class Speculator:
    def __init__(self, settings: Settings, metrics: Metrics, transcribe: Transcribe, *, allowed: bool = True) -> None:
        self.settings, self.metrics = settings, metrics
        self._transcribe = transcribe
        self._allowed = allowed  # the engine takes speculative decodes (AsrEngine.speculative)
        self._spec: _Speculation | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.endpoint.enabled and self._allowed

    def start(self, snapshot: Utterance) -> None:
        """Decode `snapshot` (the utterance as if it ended now) in the background."""
        if not self.enabled:
            return
        self.discard("superseded")
        task = asyncio.ensure_future(self._transcribe(snapshot))
        self._spec = _Speculation(snapshot.id, snapshot.speech_end, task)

    def discard(self, why: str) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            spec.task.add_done_callback(retrieve)
            spec.task.cancel()  # still waiting for the engine: never decoded (pipeline/asr/scheduler.py)
            self.metrics.speculative.labels(outcome="discarded").inc()
            log.debug("speculative decode of %s discarded (%s)", spec.utterance_id, why)

    def pending(self) -> asyncio.Future[Transcript] | None:
        """The decode in progress whose result may finish the open utterance (to wait on), else None."""
        spec = self._spec
        return spec.task if spec is not None and not spec.task.done() else None

    def should_finish(self, utterance_id: str | None, silence_samples: int) -> bool:
        """True when the open utterance's silence has reached what its speculative transcript asks."""
        spec = self._spec
        if spec is None or spec.utterance_id != utterance_id or not spec.task.done():
            return False
        if not spec.judged:
            spec.judged = True
            spec.finish_after = self._judge(spec)
        return spec.finish_after is not None and silence_samples >= spec.finish_after

    def _judge(self, spec: _Speculation) -> int | None:
        task = spec.task
        if task.cancelled() or task.exception() is not None:
            return None
        tr = task.result()
        if tr.dropped_reason:
            return None
        hangover_ms = self.settings.vad.hangover_ms
        need_ms = required_silence_ms(tr.text, tr.final_punct_prob, self.settings.endpoint, hangover_ms)
        log.debug("speculative %s: …%r p=%s -> finish after %d ms of silence", spec.utterance_id, tr.text[-30:],
                  None if tr.final_punct_prob is None else round(tr.final_punct_prob, 2), need_ms)
        # At the full hangover the segmenter closes the utterance by itself.
        return ms_to_samples(need_ms) if need_ms < hangover_ms else None

    def take(self, utt: Utterance) -> asyncio.Future[Transcript] | None:
        """The utterance closed: its speculative decode if it covers the same audio, else None (and
        any other speculation is discarded)."""
        spec, self._spec = self._spec, None
        if spec is not None and spec.utterance_id == utt.id and spec.speech_end == utt.speech_end:
            self.metrics.speculative.labels(outcome="early" if utt.reason == "sentence_end" else "reused").inc()
            return spec.task
        if spec is not None:
            self._spec = spec
            self.discard("the utterance ended elsewhere")
        return None
