"""Speculative decoding: decode an utterance during its pause, and finish it early when the
transcript ends a sentence with confidence (the policy is `pipeline.endpoint.required_silence_ms`).

When a pause inside an utterance reaches `endpoint.speculative_ms` (the segmenter's `SpeechPaused`),
the audio so far is decoded. If speech resumes, the decode is discarded. Otherwise its transcript
says how much silence finishes the utterance; the relay's capture loop, the only place that closes
utterances, asks `should_finish()` on every frame and whenever the decode completes (`pending()`),
and when the utterance does close, `take()` hands the decode over for reuse if it covers the same
audio.

**Committed beginnings** (`endpoint.commit_min_ms`). When speech resumes after a pause whose decode
covers at least that much new audio, the decode is not thrown away: once it completes (and the gate
kept it), it becomes a committed beginning of the utterance (`Prefix`), and every later decode of the
utterance (speculative, interim, final) decodes only the audio after the latest one that leaves it at
least `commit_min_ms` of audio (a few words alone, with no audio before them, decode worse), with its
text as context (`UtteranceMeta.context`), and is joined to it (`join`). So a long utterance is decoded
piece by piece while the person speaks: its end costs one short window instead of the whole utterance
again (a 30 s window encodes ~6 times slower than a 10 s one, pipeline/asr/whisper/window.py), and a pause's
decode is work kept, not repeated. At most one such candidate is in flight. Nothing waits for it: a
decode asked for meanwhile starts after the last settled beginning (a candidate on music can take
seconds of fallbacks, and the final decode waiting for it once missed `asr.deadline_s`); when the
utterance closes first, the candidate is cancelled. One the gate dropped, or that goes no further than
the last committed beginning, is discarded. 8 s (the default) left the WER of every clip and noisy mix tried unchanged,
where 4 s cost words at some piece boundaries (BENCHMARKS.md, session 7).

One speculation at a time; nothing here touches the queue or the sink. Off when `endpoint.enabled` is
false, or when the ASR engine takes one request per utterance (`AsrEngine.speculative` false: an
openai-http server unless `asr.openai_http.speculative`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import Settings
from pipeline.delivery import retrieve
from pipeline.frames import Transcript, Utterance, ms_to_samples, samples_to_s
from pipeline.metrics import Metrics
from pipeline.text import joiner
from pipeline.turn.prosody import Prosody, prosody
from pipeline.turn.rule import decide

log = logging.getLogger(__name__)

Transcribe = Callable[[Utterance], Awaitable[Transcript]]


@dataclass(frozen=True, slots=True)
class Prefix:
    """An utterance's committed beginning: its audio up to stream position `end` is `transcript`."""

    utterance_id: str
    end: int
    transcript: Transcript


def crop(utt: Utterance, prefix: Prefix | None) -> Utterance:
    """The part of `utt` after its committed beginning (all of it when there is none)."""
    if prefix is None or prefix.utterance_id != utt.id or not utt.start < prefix.end < utt.end:
        return utt
    spans = tuple((max(a, prefix.end), b) for a, b in utt.spans() if b > prefix.end)
    return Utterance(id=utt.id, audio=utt.audio[prefix.end - utt.start:], start=prefix.end,
                     speech_start=max(utt.speech_start, prefix.end), speech_end=utt.speech_end, reason=utt.reason,
                     speech_spans=spans)


def join(prefix: Transcript, rest: Transcript) -> Transcript:
    """The whole utterance's transcript from its committed beginning and the decode of the rest. The rest
    decides how the utterance ends (final punctuation); when the gate dropped it (a breath, a cough after
    the last words), the beginning stands alone."""
    if rest.dropped_reason or not rest.text.strip():
        return replace(prefix, decode_s=rest.decode_s, extra={**prefix.extra, "rest_dropped": rest.dropped_reason
                                                                 or "empty"})
    head, tail = prefix.text.rstrip(), rest.text.lstrip()
    if head.endswith(".") and not head.endswith("..") and tail[:1].islower():
        # Decoded alone, the beginning ended its last sentence where the speaker only paused; the rest,
        # decoded with it as context, goes on in lower case: one sentence ("slaveholders, doomed to ...").
        head = head[:-1] + ","
    n1, n2 = len(head.split()), len(tail.split())
    weight = n1 / (n1 + n2) if n1 + n2 else 0.5
    return Transcript(
        text=head + joiner(head, tail) + tail,  # no space inside Chinese or Japanese
        confidence=weight * prefix.confidence + (1 - weight) * rest.confidence,
        language=prefix.language or rest.language,
        language_probability=prefix.language_probability,
        detected=prefix.detected or rest.detected,  # the beginning is the longer witness (>= commit_min_ms)
        no_speech_prob=min(prefix.no_speech_prob, rest.no_speech_prob),
        avg_logprob=weight * prefix.avg_logprob + (1 - weight) * rest.avg_logprob,
        final_punct_prob=rest.final_punct_prob,
        decode_s=rest.decode_s,
        extra={**rest.extra, "committed_words": n1},
    )


@dataclass(slots=True)
class _Speculation:
    utterance_id: str
    speech_end: int
    task: asyncio.Future[Transcript]
    end: int = 0  # stream position of the end of the decoded audio
    start: int = 0  # stream position of the utterance's audio start
    finish_after: int | None = None  # silence (samples) that finishes the utterance, once judged
    judged: bool = False
    prosody: asyncio.Future[Prosody] | None = None  # the snapshot's prosody (endpoint.turn_rule), off the loop


class Speculator:
    def __init__(self, settings: Settings, metrics: Metrics, transcribe: Transcribe, *, allowed: bool = True) -> None:
        self.settings, self.metrics = settings, metrics
        self._transcribe = transcribe
        self._allowed = allowed  # the engine takes speculative decodes (AsrEngine.speculative)
        self._spec: _Speculation | None = None
        self._candidate: _Speculation | None = None  # a resumed pause's decode that may become the prefix
        self._prefixes: list[Prefix] = []  # committed beginnings of the open utterance, oldest first

    @property
    def enabled(self) -> bool:
        return self.settings.endpoint.enabled and self._allowed

    def prefix(self, utt: Utterance) -> Prefix | None:
        """The committed beginning a decode of `utt` starts after: the latest that leaves it at least
        `endpoint.commit_min_ms` of audio (a few words alone decode worse than with the audio before them)."""
        for p in reversed(self._prefixes):
            if p.utterance_id == utt.id and self._leaves_room(p.end, utt):
                return p
        return None

    def _leaves_room(self, end: int, utt: Utterance) -> bool:
        return utt.end - end >= ms_to_samples(self.settings.endpoint.commit_min_ms)

    def start(self, snapshot: Utterance) -> None:
        """Decode `snapshot` (the utterance as if it ended now) in the background."""
        if not self.enabled:
            return
        self.discard("superseded")
        task = asyncio.ensure_future(self._transcribe(snapshot))
        cues = None
        if self.settings.endpoint.turn_rule:  # a few ms of numpy per pause, beside the decode (not on the loop)
            cues = asyncio.get_running_loop().run_in_executor(None, prosody, snapshot.audio,
                                                              snapshot.speech_end - snapshot.start)
        self._spec = _Speculation(snapshot.id, snapshot.speech_end, task, end=snapshot.end, start=snapshot.start,
                                  prosody=cues)

    def resumed(self) -> None:
        """Speech came back after the pause: keep the pause's decode as a candidate beginning when it covers
        `endpoint.commit_min_ms` of audio past the last committed beginning and no other candidate is in
        flight; else discard it."""
        spec = self._spec
        room = ms_to_samples(self.settings.endpoint.commit_min_ms)
        if spec is None or not room or self._candidate is not None:
            self.discard("resumed")
            return
        last = max((p.end for p in self._prefixes if p.utterance_id == spec.utterance_id), default=0)
        if spec.end - max(spec.start, last) < room:
            self.discard("resumed")
            return
        self._spec, self._candidate = None, spec
        spec.task.add_done_callback(lambda _: self._commit(spec))

    def _commit(self, spec: _Speculation) -> None:
        """A candidate settled: it becomes the newest committed beginning if the gate kept it and it goes
        further than the others."""
        if self._candidate is spec:
            self._candidate = None
        task = spec.task
        tr = task.result() if not task.cancelled() and task.exception() is None else None
        mine = [p for p in self._prefixes if p.utterance_id == spec.utterance_id]
        if (tr is None or tr.dropped_reason or not tr.text.strip() or "rest_dropped" in tr.extra
                or (mine and spec.end <= mine[-1].end)):
            self.metrics.speculative.labels(outcome="discarded").inc()
            return
        self._prefixes = [*mine, Prefix(spec.utterance_id, spec.end, tr)]  # an earlier utterance's are done
        self.metrics.speculative.labels(outcome="committed").inc()
        log.debug("%s: committed up to %.2f s: …%r", spec.utterance_id, samples_to_s(spec.end), tr.text[-60:])

    def discard(self, why: str) -> None:
        spec, self._spec = self._spec, None
        if spec is not None:
            spec.task.add_done_callback(retrieve)
            spec.task.cancel()  # still waiting for the engine: never decoded (pipeline/asr/scheduler.py)
            if spec.prosody is not None:
                spec.prosody.add_done_callback(retrieve)
            self.metrics.speculative.labels(outcome="discarded").inc()
            log.debug("speculative decode of %s discarded (%s)", spec.utterance_id, why)

    def pending(self) -> asyncio.Future[Any] | None:
        """The work in progress (the decode, then the prosody) whose result may finish the open utterance (to
        wait on), else None."""
        spec = self._spec
        if spec is None:
            return None
        if not spec.task.done():
            return spec.task
        return spec.prosody if spec.prosody is not None and not spec.prosody.done() else None

    def should_finish(self, utterance_id: str | None, silence_samples: int) -> bool:
        """True when the open utterance's silence has reached what its speculative transcript asks."""
        spec = self._spec
        if spec is None or spec.utterance_id != utterance_id or self.pending() is not None:
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
        cues = spec.prosody
        spoken = cues.result() if cues is not None and not cues.cancelled() and cues.exception() is None else None
        decision = decide(tr.text, tr.final_punct_prob, tr.language, spoken, self.settings.endpoint, hangover_ms)
        need_ms = decision.silence_ms
        self.metrics.turn_decisions.labels(rule=decision.rule).inc()
        log.debug("speculative %s: …%r p=%s turn p=%s (%s%s) -> finish after %d ms of silence", spec.utterance_id,
                  tr.text[-30:], None if tr.final_punct_prob is None else round(tr.final_punct_prob, 2),
                  None if decision.turn_prob is None else round(decision.turn_prob, 2), decision.rule,
                  f": {decision.why}" if decision.why else "", need_ms)
        # At the full hangover the segmenter closes the utterance by itself.
        return ms_to_samples(need_ms) if need_ms < hangover_ms else None

    def take(self, utt: Utterance) -> asyncio.Future[Transcript] | None:
        """The utterance closed: its speculative decode if it covers the same audio, else None (and
        any other speculation is discarded)."""
        cand = self._candidate
        if cand is not None and cand.utterance_id == utt.id:
            cand.task.cancel()  # too late to shorten this utterance's decodes (counted by `_commit`)
        spec, self._spec = self._spec, None
        if spec is not None and spec.utterance_id == utt.id and spec.speech_end == utt.speech_end:
            self.metrics.speculative.labels(outcome="early" if utt.reason == "sentence_end" else "reused").inc()
            return spec.task
        if spec is not None:
            self._spec = spec
            self.discard("the utterance ended elsewhere")
        return None
