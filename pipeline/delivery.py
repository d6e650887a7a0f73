"""Delivery: the one queue and the one task between the relay and the room, and the ledger.

Every echo takes one path::

    Relay (speech) ─ put() ──┐                                     protocol.text_echoes /
                             ├─▶ queue ─▶ delivery task: transcript ─▶ transforms ─▶ audio_echoes ─▶ Sink.send()
    control API ─ put_nowait()┘                                     (sized, conversation id stamped once)

- Order: items leave the queue in the order they entered; a text that needs several messages (one
  inference_id, done=false on all but the last) goes out piece after piece. The sink sends one
  message, retries it while the room can take it, and raises SinkError(reason) when it gives up; the
  pieces after a failed one are not sent.
- Backpressure: `put()` waits while the queue is full (capture pauses; see docs/reliability.md);
  after `start_draining()` only until the drain deadline. `put_nowait()` (control API) refuses.
- Interrupts do not queue. `interrupt()` goes to the sink at once, even while an echo waits for the
  room, and first drops every echo that has not finished going out: queued ones and the one in
  progress (each counted as dropped "interrupted", with its text in the log). An interrupt stops the
  replica's current line; anything older still queued would start it again.
- Accounting: every item ends as exactly one of delivered / dropped (with a reason) / undeliverable
  (with a reason an operator can act on) in `ledger`; `recent` keeps the last few for /status.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import langcodes, protocol
from pipeline.asr import coverage
from pipeline.config import Settings
from pipeline.control.api import InterruptOutcome, QueueFull
from pipeline.dsp import resample
from pipeline.events import EventBus
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, Utterance, UtteranceMeta
from pipeline.language import Heard, LanguageTracker
from pipeline.logs import log_context
from pipeline.metrics import Metrics
from pipeline.perception import PerceptionRun
from pipeline.sink.base import Outgoing, Sink, SinkError
from pipeline.transform.chain import TransformChain

log = logging.getLogger(__name__)

RECENT_ITEMS = 20  # kept for /status
LATENCY_WINDOW = 1000  # latencies kept for latency_summary() (/status, GET /v1/relays/{id})
QUEUE_POLL_S = 0.1  # put() waiting on a full queue re-checks for the drain deadline this often
INTERRUPTED = "interrupted"  # ledger reason of echoes an interrupt dropped
# Undeliverable because the delivery task was cancelled, not by the drain deadline (issue 27: the message in
# hand when user code stopped the loop was recorded as "not delivered within the shutdown drain time").
CANCELLED_REASON = ("delivery was cancelled before the shutdown drain deadline (not by the relay: the event loop "
                    "shut down, or code outside the relay cancelled the delivery task)")


@dataclass(slots=True)
class Ledger:
    """Where every closed utterance (and control-API message) ended up."""

    closed: int = 0
    delivered: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    undeliverable: int = 0
    unheard: int = 0  # speech-like regions the VAD never opened an utterance on (not in `closed`)
    unheard_s: float = 0.0
    uncovered: int = 0  # utterances whose decode left part of their speech out (in `closed`: counted there too)
    uncovered_s: float = 0.0  # seconds of speech those decodes left out

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    @property
    def settled(self) -> int:
        return self.delivered + sum(self.dropped.values()) + self.undeliverable

    def summary(self) -> str:
        """One line: `closed 3, delivered 2, dropped 1 {'asr:no_speech': 1}, undeliverable 0, in flight 0`."""
        reasons = f" {self.dropped}" if self.dropped else ""
        return (f"closed {self.closed}, delivered {self.delivered}, dropped {sum(self.dropped.values())}{reasons}, "
                f"undeliverable {self.undeliverable}, in flight {self.closed - self.settled}")

    def as_dict(self) -> dict[str, Any]:
        return {"closed": self.closed, "delivered": self.delivered, "dropped": dict(self.dropped),
                "undeliverable": self.undeliverable, "in_flight": self.closed - self.settled,
                "unheard": {"regions": self.unheard, "seconds": round(self.unheard_s, 3)},
                "uncovered": {"utterances": self.uncovered, "seconds": round(self.uncovered_s, 3)}}


class Origin(enum.Enum):
    SPEECH = "speech"  # an utterance the VAD closed
    API = "api"  # a control-API request (POST /send_text_message)


class Stage(enum.Enum):
    """An item's lifecycle: QUEUED -> ACTIVE (the task works on it) [-> INTERRUPTED] -> SETTLED (accounted
    once). An interrupt settles QUEUED items itself; it marks the ACTIVE one INTERRUPTED, and the task
    accounts it at its next step."""

    QUEUED = "queued"
    ACTIVE = "active"
    INTERRUPTED = "interrupted"
    SETTLED = "settled"


@dataclass(slots=True, eq=False)
class QueuedEcho:
    """One item of the delivery queue: recognised speech, or text / audio from the control API."""

    origin: Origin
    meta: UtteranceMeta
    utterance: Utterance | None = None  # speech: its audio (audio echo) and bounds
    transcript: asyncio.Future[Transcript] | None = None  # speech: the decode, running or done
    perception: PerceptionRun | None = None  # speech: the analyzers' calls (None: no analyzers configured)
    text: str = ""  # API text
    pcm: Pcm | None = None  # API audio, already at sink.audio_sample_rate
    through_transforms: bool = True
    inference_id: str | None = None
    done: bool = True
    stage: Stage = Stage.QUEUED

    def known_text(self) -> str:
        """The words of this item as far as they are known (for logs of what was lost)."""
        text = self.text or self.meta.asr_text
        tr = self.transcript
        if not text and tr is not None and tr.done() and not tr.cancelled() and tr.exception() is None:
            text = tr.result().text
        return text


class Delivery:
    """The delivery queue, its one task (`run()`), interrupts and the ledger."""

    def __init__(self, settings: Settings, *, sink: Sink, chain: TransformChain, metrics: Metrics,
                 now_s: Callable[[], float], events: EventBus | None = None, paced: bool = True,
                 language: LanguageTracker | None = None) -> None:
        self.settings, self.sink, self.chain, self.metrics = settings, sink, chain, metrics
        # The conversation's language: each transcript, in the order of speech, is its evidence.
        self.language = language or LanguageTracker(settings.asr.detect, settings.asr.language)
        self._paced = paced  # the stream clock follows wall time: end of speech -> sent is a latency
        self.events = events or EventBus(metrics, now_s)
        self._now_s = now_s  # the stream clock (emitted_at_s)
        self.ledger = Ledger()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_ITEMS)
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)  # end of speech -> sent, last messages
        self._queue: asyncio.Queue[QueuedEcho | None] = asyncio.Queue(maxsize=settings.sink.queue_size)
        self._seq = 0
        self._active: QueuedEcho | None = None
        self._sending: asyncio.Future[None] | None = None  # the sink.send() of the active item
        self._deadline: float | None = None  # time.monotonic() by which everything must be out
        self._deadline_cancel = False  # finish() cancelled the task: the drain deadline passed

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def latency_summary(self) -> dict[str, Any]:
        """End of speech to sent over the last LATENCY_WINDOW speech messages: count, p50, p95 (seconds)."""
        values = sorted(self.latencies)
        if not values:
            return {"count": 0, "p50_s": None, "p95_s": None}

        def pct(q: float) -> float:
            return round(values[max(0, math.ceil(q * len(values)) - 1)], 3)  # nearest rank

        return {"count": len(values), "p50_s": pct(0.5), "p95_s": pct(0.95)}

    @property
    def sending(self) -> bool:
        """A message is with the sink (waiting for the room, being sent or retried)."""
        return self._sending is not None

    @property
    def draining(self) -> bool:
        return self._deadline is not None

    # ------------------------------------------------------------------------------ input
    async def put(self, item: QueuedEcho) -> None:
        """Queue an item, waiting while the queue is full; once draining, only until the deadline
        (then it is accounted undeliverable)."""
        self.ledger.closed += 1
        try:
            queued = await self._put(item)
        except asyncio.CancelledError:  # the relay was cancelled while the queue was full: not in the queue
            self._undeliverable(item, CANCELLED_REASON)
            raise
        if not queued:
            self._undeliverable(item, self._drain_reason())
        self._set_depth()

    def put_nowait(self, item: QueuedEcho) -> None:
        """Queue a control-API item now or raise QueueFull (HTTP 503)."""
        if self.draining:
            raise QueueFull("relay is stopping")
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(f"delivery queue full ({self._queue.maxsize} waiting)") from None
        self.ledger.closed += 1
        self._set_depth()

    async def _put(self, item: QueuedEcho | None) -> bool:
        while True:
            wait = QUEUE_POLL_S if self._deadline is None else self._deadline - time.monotonic()
            if wait <= 0:
                return False
            try:
                await asyncio.wait_for(self._queue.put(item), wait)
                return True
            except TimeoutError:
                continue

    # ------------------------------------------------------------------------------ lifecycle
    def start_draining(self, timeout_s: float) -> None:
        """No more API items; what is queued has `timeout_s` to go out (idempotent)."""
        if self._deadline is None:
            self._deadline = time.monotonic() + timeout_s

    async def finish(self, task: asyncio.Task[None], *, cancelled: bool = False) -> None:
        """End of the run: let `task` (running `run()`) deliver what is queued until the deadline,
        then account whatever is left as undeliverable, saying what delivery was waiting for.
        `cancelled`: the relay itself was cancelled, so nothing more is delivered (a cancel asks for a stop
        now, not after sink.drain_timeout_s)."""
        self.start_draining(self.settings.sink.drain_timeout_s)
        if cancelled:
            if self._queue.qsize() or self._active is not None:
                log.error("%s; %d item(s) still queued", CANCELLED_REASON, self._queue.qsize())
            self._abandon_queued(CANCELLED_REASON)
            task.cancel()  # run() accounts its active item with CANCELLED_REASON (_deadline_cancel is False)
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._abandon_queued(CANCELLED_REASON)  # anything put while the task was stopping
            return
        assert self._deadline is not None
        try:
            if task.done() or not await self._put(None):
                raise TimeoutError
            await asyncio.wait_for(asyncio.shield(task), max(0.0, self._deadline - time.monotonic()))
        except (TimeoutError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and not task.done():
                # The relay itself is being cancelled (not its delivery task): account what is queued, let the
                # task account its active item, and go on being cancelled.
                self._abandon_queued(CANCELLED_REASON)
                task.cancel()
                raise
            cut_short = task.done()  # the task ended before the deadline: someone else cancelled it
            failure = task.exception() if cut_short and not task.cancelled() else None
            reason = (self._drain_reason() if not cut_short else CANCELLED_REASON if failure is None
                      else f"the delivery task failed: {type(failure).__name__}: {failure}")
            log.error("%s; %d item(s) still queued", reason, self._queue.qsize())
            self._deadline_cancel = not cut_short
            task.cancel()  # the active item is accounted by run()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._abandon_queued(reason)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def _abandon_queued(self, reason: str) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and item.stage is Stage.QUEUED:
                self._undeliverable(item, reason)

    def _drain_reason(self) -> str:
        waiting = self.sink.blocked_reason()
        if waiting is None and self._sending is not None:
            waiting = f"the {self.sink.name} sink had not finished sending"
        why = f": {waiting}" if waiting else ""
        return f"not delivered within the shutdown drain time (sink.drain_timeout_s=" \
               f"{self.settings.sink.drain_timeout_s:g} s){why}"

    # ------------------------------------------------------------------------------ the task
    async def run(self) -> None:
        """The delivery task: one item at a time, in order, until `finish()` queues the end."""
        while True:
            item = await self._queue.get()
            self._set_depth()
            if item is None:
                return
            if item.stage is not Stage.QUEUED:  # an interrupt settled it while it waited
                continue
            item.stage = Stage.ACTIVE
            self._active = item
            try:
                with log_context(utterance_id=item.meta.utterance_id):
                    await self._process(item)
            except asyncio.CancelledError:  # the drain deadline passed while this item was active, or not
                self._undeliverable(item, self._drain_reason() if self._deadline_cancel else CANCELLED_REASON)
                raise
            except Exception:  # one bad item must never stop delivery
                log.exception("unexpected error delivering %s", item.meta.utterance_id)
                self._undeliverable(item, "internal error (logged above)")
            finally:
                self._active = None
            if not self._interrupted(item) and item.stage is Stage.ACTIVE:  # every path settles: a safety net
                self._drop(item, "unsettled", ("delivery", "unsettled"))

    async def _process(self, item: QueuedEcho) -> None:
        meta = item.meta
        if item.origin is Origin.SPEECH:
            tr = await self._transcript(item)
            if tr is None:
                return
            meta.asr_text, meta.confidence, meta.language = tr.text, tr.confidence, tr.language
            meta.language_probability = tr.language_probability
            self._observe_language(tr, meta)
            if item.perception is not None:  # waits at most perception.budget_ms (pipeline/perception/stage.py)
                failed = await item.perception.collect(meta)
                if failed is not None:
                    self._drop(item, f"perception:{failed.label}", metric=("perception", failed.label))
                    return
            text = tr.text
        elif item.pcm is not None:  # API audio: sent as given
            await self._send(item, protocol.audio_echoes(
                item.pcm, self.settings.sink.audio_sample_rate, self.sink.conversation_id,
                item.inference_id or protocol.new_inference_id(), item.done,
                self.settings.sink.max_message_bytes), "<audio>")
            return
        else:
            text = item.text
        if item.origin is Origin.SPEECH or item.through_transforms:
            outcome = await self.chain.run(text, meta)
            if outcome.text is None:  # the chain counted it in its own metrics
                self._drop(item, f"transform:{outcome.dropped_by or 'unknown'}", metric=None)
                return
            text = outcome.text
        if item.origin is Origin.SPEECH:
            self.events.emit("transcript", utterance_id=meta.utterance_id, asr_text=meta.asr_text, text=text,
                             language=meta.language)
        if self._interrupted(item):
            return
        inference_id = item.inference_id or protocol.new_inference_id()
        limit = self.settings.sink.max_message_bytes
        if item.origin is Origin.SPEECH and (meta.modality == "audio" or self.settings.sink.mode == "audio"):
            assert item.utterance is not None
            rate = self.settings.sink.audio_sample_rate
            pcm = resample(item.utterance.audio, SAMPLE_RATE, rate)
            messages = protocol.audio_echoes(pcm, rate, self.sink.conversation_id, inference_id, True, limit)
        else:
            messages = protocol.text_echoes(text, self.sink.conversation_id, inference_id, item.done, limit)
        await self._send(item, messages, text)

    def _observe_language(self, tr: Transcript, meta: UtteranceMeta) -> None:
        """Give the transcript's language detection to the conversation's tracker; a lock or a switch is an
        event, a log line and a metric."""
        detected = tr.detected
        change = self.language.observe(Heard(detected[0] if detected else None, detected[1] if detected else None,
                                             max(0.0, meta.audio_end_s - meta.audio_start_s)))
        meta.language_locked = self.language.locked
        label = meta.language if meta.language in langcodes.NAMES else "unknown" if meta.language is None else "other"
        self.metrics.utterances_by_language.labels(language=label).inc()  # a bounded set of label values
        if change is None:
            return
        self.metrics.language_changes.labels(reason=change.reason).inc()
        log.info("conversation language %s: %s (p=%.2f%s)", change.reason, change.language, change.probability,
                 f", was {change.previous}" if change.previous else "")
        self.events.emit("language", utterance_id=meta.utterance_id, language=change.language,
                         probability=change.probability, previous=change.previous, reason=change.reason,
                         text_language=self.text_language)

    @property
    def text_language(self) -> str | None:
        """The language of the echoes: the conversation's, or English under asr.task translate."""
        return "en" if self.settings.asr.task == "translate" else self.language.language

    def language_status(self) -> dict[str, Any]:
        """The conversation's language for /status: `code` (of the echoes), the spoken one, its probability."""
        t = self.language
        return {"code": self.text_language, "spoken": t.language, "probability": t.probability,
                "locked": t.locked, "state": t.state.value, "task": self.settings.asr.task}

    async def _transcript(self, item: QueuedEcho) -> Transcript | None:
        assert item.transcript is not None
        deadline_s = self.settings.asr.deadline_s
        try:
            tr = await asyncio.wait_for(asyncio.shield(item.transcript), timeout=deadline_s)
        except TimeoutError:
            log.warning("ASR missed its %.1fs deadline on %s; utterance dropped", deadline_s, item.meta.utterance_id)
            item.transcript.add_done_callback(retrieve)  # its late result or error is not wanted
            self._drop(item, "asr_deadline", metric=("asr", "deadline"))
            return None
        except Exception as exc:
            log.error("ASR failed on %s: %s", item.meta.utterance_id, exc)
            self._drop(item, "asr_error", metric=("asr", "error"))
            return None
        self.metrics.stage_latency.labels(stage="asr").observe(tr.decode_s)
        if self._interrupted(item):
            return None
        self._check_coverage(item, tr)
        if tr.dropped_reason or not tr.text.strip():
            reason = tr.dropped_reason or "empty"
            self._drop(item, f"asr:{reason}", metric=("asr", reason))
            return None
        return tr

    def _check_coverage(self, item: QueuedEcho, tr: Transcript) -> None:
        """Speech the decoder left out of a decode (pipeline/asr/coverage.py): counted beside the ledger,
        like unheard speech. The engine's own verdict when it gives one (`uncovered_s`, faster-whisper after its
        second pass), else the rate check on the text. A decode the gate dropped as not speech is counted as
        dropped instead; one that came back empty without a verdict left all of its speech out."""
        utt = item.utterance
        if utt is None or tr.dropped_reason not in (None, "empty"):
            return
        if "uncovered_s" in tr.extra:
            seconds, why = float(tr.extra["uncovered_s"]), str(tr.extra.get("uncovered_why", ""))
        else:
            spans = [((a - utt.start) / SAMPLE_RATE, (b - utt.start) / SAMPLE_RATE) for a, b in utt.spans()]
            cov = coverage.assess(tr.text, tr.language, spans)
            seconds, why = (cov.uncovered_s, cov.why()) if cov.left_out else (0.0, "")
            if not tr.text.strip() and cov.speech_s > 0:
                seconds, why = cov.speech_s, "the decode returned no text"
        if seconds <= 0:
            return
        self.ledger.uncovered += 1
        self.ledger.uncovered_s += seconds
        self.metrics.uncovered_utterances.inc()
        self.metrics.uncovered_seconds.inc(seconds)
        self.events.emit("uncovered", utterance_id=item.meta.utterance_id, start_s=round(utt.audio_start_s, 3),
                         end_s=round(utt.audio_end_s, 3), seconds=round(seconds, 3), why=why)
        log.info("uncovered speech in %s at %.2f-%.2f s (%.2f s): %s (text: %r)", item.meta.utterance_id,
                 utt.audio_start_s, utt.audio_end_s, seconds, why, tr.text)

    async def _send(self, item: QueuedEcho, messages: list[dict[str, Any]], text: str) -> None:
        """Hand the item's messages to the sink one by one; stop at the first the sink gives up on."""
        for message in messages:
            if self._interrupted(item):
                return
            piece = message.get("properties", {}).get("text", text) if len(messages) > 1 else text
            error = await self._emit(self._outgoing(item, message, piece))
            if self._interrupted(item):
                return
            if error is not None:
                self._undeliverable(item, error, text)
                return
        self.ledger.delivered += 1  # before _settle, which logs the ledger with this item in it
        self._settle(item, "delivered", text)
        self.metrics.echoes_sent.labels(source=item.origin.value).inc()

    def _outgoing(self, item: QueuedEcho, message: dict[str, Any], text: str) -> Outgoing:
        meta = item.meta
        return Outgoing("echo", message, utterance_id=meta.utterance_id, audio_start_s=meta.audio_start_s,
                        audio_end_s=meta.audio_end_s, asr_text=meta.asr_text, text=text,
                        language=meta.language, language_probability=meta.language_probability,
                        perception=meta.perception if item.perception is not None else None)

    async def _emit(self, out: Outgoing) -> str | None:
        """Send one message; None when the sink took it, else why it gave up."""
        self._stamp(out)
        if self._active is not None and self._active.origin is Origin.SPEECH and self._paced:
            out.latency_s = max(0.0, out.emitted_at_s - out.audio_end_s)
            self.metrics.end_to_sent.observe(out.latency_s)
            self.latencies.append(out.latency_s)
        t0 = time.perf_counter()
        sending = self._sending = asyncio.ensure_future(self.sink.send(out))
        try:
            await asyncio.wait({sending})  # an interrupt may cancel `sending`, never this task
        finally:
            self._sending = None
            if not sending.done():  # this task was cancelled (drain deadline)
                sending.cancel()
            self.metrics.stage_latency.labels(stage="sink").observe(time.perf_counter() - t0)
        if sending.cancelled():
            return INTERRUPTED
        exc = sending.exception()
        if exc is None:
            return None
        if isinstance(exc, SinkError):
            return str(exc)
        log.error("the %s sink failed: %r", self.sink.name, exc)
        return f"the {self.sink.name} sink failed: {exc}"

    def _stamp(self, out: Outgoing) -> None:
        self._seq += 1
        out.seq = self._seq
        out.emitted_at_s = self._now_s()

    # ------------------------------------------------------------------------------ interrupts
    async def interrupt(self, why: str) -> InterruptOutcome:
        """Drop what has not gone out, then send conversation.interrupt at once (not queued)."""
        dropped = 0
        for item in list(self._queue._queue):  # type: ignore[attr-defined]  # asyncio.Queue's deque
            if item is not None and item.stage is Stage.QUEUED:
                self._drop(item, INTERRUPTED, metric=("delivery", INTERRUPTED))
                dropped += 1
        active = self._active
        if active is not None and active.stage is Stage.ACTIVE:
            active.stage = Stage.INTERRUPTED
            dropped += 1
            if self._sending is not None:
                self._sending.cancel()
        out = Outgoing("interrupt", protocol.interrupt(self.sink.conversation_id))
        self._stamp(out)
        try:
            await self.sink.send(out)
        except SinkError as exc:
            log.warning("interrupt (%s) not sent: %s", why, exc)
            self.events.emit("interrupt", sent=False, dropped=dropped, detail=str(exc))
            return InterruptOutcome(False, dropped, str(exc))
        self.metrics.interrupts_sent.inc()
        detail = f"interrupt sent ({why})" + (f"; {dropped} pending echo(es) dropped" if dropped else "")
        log.info("%s", detail)
        self.events.emit("interrupt", sent=True, dropped=dropped, detail=detail)
        return InterruptOutcome(True, dropped, detail)

    def _interrupted(self, item: QueuedEcho) -> bool:
        """An interrupt dropped the active item: account it (once) and stop working on it."""
        if item.stage is not Stage.INTERRUPTED:
            return False
        self._drop(item, INTERRUPTED, metric=("delivery", INTERRUPTED))
        return True

    # ------------------------------------------------------------------------------ accounting
    def _settle(self, item: QueuedEcho, status: str, text: str, reason: str | None = None) -> None:
        item.stage = Stage.SETTLED
        meta = item.meta
        entry = {"utterance_id": meta.utterance_id, "audio_start_s": meta.audio_start_s,
                 "audio_end_s": meta.audio_end_s, "asr_text": meta.asr_text, "text": text,
                 "status": status if reason is None else f"{status}: {reason}"}
        if item.perception is not None:
            item.perception.abandon()  # no-op once collected: calls still running then count as late
            entry["perception"] = dict(meta.perception)
        self.recent.append(entry)
        latency = self._now_s() - meta.audio_end_s if item.origin is Origin.SPEECH and self._paced else None
        self.events.emit("echo", utterance_id=meta.utterance_id, outcome=status, text=text,
                         latency_s=None if latency is None else round(latency, 3), reason=reason)
        # The ledger as of now, every time it changes: a process ended from outside (a thread calling
        # os._exit, SIGKILL) still leaves the run's state in the log (docs/reliability.md).
        log.info("ledger: %s %s; %s", meta.utterance_id, status, self.ledger.summary())

    def _drop(self, item: QueuedEcho, reason: str, metric: tuple[str, str] | None) -> None:
        """Account a dropped item under `reason` (ledger key) and in the dropped-items counter as
        `metric` (stage, reason); None when the stage counted it already (the transform chain)."""
        if item.stage is Stage.SETTLED:
            return
        if metric is not None:
            self.metrics.drop(*metric)
        self.ledger.drop(reason)
        text = item.known_text()
        if reason == INTERRUPTED:
            log.info("dropped %s (interrupted): %r", item.meta.utterance_id, text)
        else:
            log.debug("dropped %s (%s)", item.meta.utterance_id, reason)
        self._settle(item, "dropped", text, reason)

    def _undeliverable(self, item: QueuedEcho, why: str, text: str | None = None) -> None:
        if item.stage is Stage.SETTLED:
            return
        self.ledger.undeliverable += 1
        self.metrics.send_failures.inc()
        text = item.known_text() if text is None else text
        log.error("undeliverable echo %s: %s (text: %r)", item.meta.utterance_id, why, text)
        self._settle(item, "undeliverable", text, why)

    def _set_depth(self) -> None:
        self.metrics.queue_depth.labels(queue="delivery").set(self._queue.qsize())


def retrieve(fut: asyncio.Future[Any]) -> None:
    """Mark an abandoned future's outcome as seen (no 'exception was never retrieved' report)."""
    if not fut.cancelled():
        fut.exception()

