"""The perception stage: analyzers beside the ASR, their timeouts, their budget and their accounting.

    pause (speculative decode) or close ──▶ PerceptionRun: audio analyzers start (worker threads / tasks)
          │                                   │
          ▼                                   │ (after_asr ones start here, once meta has the ASR result)
     ASR decode ──▶ delivery: collect() ──────┴─▶ waits at most perception.budget_ms for what still runs
                                 │
                                 ▼
              meta.perception[name] ──▶ transforms ──▶ JSONL record, `perception` event, /status

The relay (pipeline/relay.py) starts a run on a pause's snapshot beside the speculative decode, and keeps it
when the utterance closes on the same speech (a speculative transcript closes it then, and the analyzers have
had the decode's time); when the speech goes on, that run is abandoned and a new one starts at the close.

Each analyzer call ends with exactly one outcome, counted in `echo_relay_perception_calls_total`:

- `ok`: it returned a dict in time (attached to the utterance); `none`: it returned None (nothing attached);
- `late`: it answered after the echo left without it (the result goes to the event stream only);
- `unused`: it answered for an utterance that was dropped before its echo (the ASR heard nothing), or for a
  pause the speech went on after;
- `cancelled`: the relay was torn down while it ran (a normal stop first waits for every call, each bounded
  by its timeout);
- failures, where the analyzer's `on_error` applies: `timeout` (no answer within `timeout_s`: the call is
  cut), `error` (it raised), `bad_type` (not a dict or None), `bad_value` (not JSON-serialisable, or over
  MAX_RESULT_BYTES), `busy` (MAX_PENDING_CALLS earlier calls of it still running).
  `pass`: the echo goes on without its result; `drop`: the utterance is dropped (ledger
  `perception:<outcome>:<name>`), and the echo waits for such an analyzer up to its `timeout_s`.

Calls run like transform steps (pipeline/transform/chain.py `BoundStep`): sync analyzers in a worker thread,
async ones as tasks on the loop, so neither can block the relay. One call, its verdict and its accounting are
pipeline/perception/calls.py, shared with the camera path (pipeline/perception/video.py), which this stage
builds and holds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, PerceptionSettings
from pipeline.frames import Pcm, UtteranceMeta
from pipeline.perception.builtins import AUDIO_BUILTINS, VIDEO_BUILTINS
from pipeline.perception.calls import (
    FAILURES,
    OUTCOMES,
    BoundAnalyzer,
    Outcome,
    Verdict,
    analyzer_status,
    build_analyzers,
    call_analyzer,
    count_call,
    ended,
)
from pipeline.perception.video import VIDEO_ARGS, VideoPerception, build_video, video_probe

if TYPE_CHECKING:
    from pipeline.events import EventBus
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PerceptionDrop:
    """An `on_error: drop` analyzer failed: the utterance is dropped."""

    analyzer: str
    outcome: Outcome
    detail: str

    @property
    def label(self) -> str:
        return f"{self.outcome}:{self.analyzer}"


class Perception:
    """The analyzers of one relay: audio ones (`perception.analyzers`) and, with a `daily` source, the video
    ones (`perception.video`, pipeline/perception/video.py) whose latest results join each utterance."""

    def __init__(self, analyzers: list[BoundAnalyzer], *, budget_s: float, metrics: Metrics,
                 events: EventBus | None = None, video: VideoPerception | None = None) -> None:
        self.analyzers = analyzers
        self.budget_s = budget_s
        self.metrics = metrics
        self.events = events
        self.video = video
        self.outcomes: dict[str, dict[str, int]] = {a.name: {} for a in analyzers}  # for /status
        self.running: set[asyncio.Task[tuple[Verdict, float]]] = set()  # calls not ended yet, of every utterance
        for a in analyzers:
            for outcome in OUTCOMES:
                metrics.perception_calls.labels(analyzer=a.name, outcome=outcome)

    def __bool__(self) -> bool:
        return bool(self.analyzers) or self.video is not None

    def bind_events(self, events: EventBus) -> None:
        """The relay's event stream (`perception` and `video` events)."""
        self.events = events
        if self.video is not None:
            self.video.events = events

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.analyzers]

    def start(self, audio: Pcm, meta: UtteranceMeta) -> PerceptionRun | None:
        """Start the analyzers on a closed utterance (None when none are configured)."""
        if not self:
            return None
        return PerceptionRun(self, audio, meta)

    def record(self, name: str, verdict: Verdict, seconds: float) -> None:
        count_call(self.metrics, self.outcomes, name, verdict, seconds)

    def status(self) -> dict[str, Any]:
        return {"analyzers": [{**analyzer_status(a, self.outcomes), "after_asr": a.after_asr}
                              for a in self.analyzers],
                "budget_ms": round(self.budget_s * 1000),
                "video": None if self.video is None else self.video.status()}

    async def aclose(self) -> None:
        """Let the calls still running end (each is bounded by its timeout, so this is too) and be counted,
        then close the analyzers (their `aclose()`/`close()`, like transform steps)."""
        if self.running:
            await asyncio.wait(set(self.running))
        for a in self.analyzers:
            await a.step.aclose()
        if self.video is not None:
            await self.video.aclose()


class PerceptionRun:
    """The analyzers' calls on one utterance, from a pause (or its close) to its echo."""

    def __init__(self, perception: Perception, audio: Pcm, meta: UtteranceMeta) -> None:
        self.perception = perception
        self.audio = audio
        self.meta = meta
        self._calls: dict[str, asyncio.Task[tuple[Verdict, float]]] = {}
        self._settled = False  # collected or abandoned: every call's outcome is then looked after
        for a in perception.analyzers:
            if not a.after_asr:
                self._launch(a)

    def _launch(self, a: BoundAnalyzer) -> None:
        task = self._calls[a.name] = asyncio.ensure_future(call_analyzer(a.step, self.audio, self.meta))
        running = self.perception.running
        running.add(task)
        task.add_done_callback(running.discard)

    async def collect(self, meta: UtteranceMeta | None = None) -> PerceptionDrop | None:
        """Once the ASR result is in `meta` (the closed utterance's; default: the one the run started with, which
        differs when the run started on a pause's snapshot): start the after_asr analyzers, wait for the others
        within the budget, and file the results in `meta.perception`. Returns the drop when an `on_error: drop`
        analyzer failed. Calls still running go on; what they bring is counted and sent as a late event."""
        p = self.perception
        if meta is not None:
            self.meta = meta  # after_asr analyzers, the results, and the events are the closed utterance's
        for a in p.analyzers:
            if a.name not in self._calls:
                self._launch(a)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + p.budget_s
        # `drop` analyzers decide whether the utterance goes out at all: they are waited for (their timeout
        # bounds it); the others get what is left of the budget.
        gates = [self._calls[a.name] for a in p.analyzers if a.step.on_error == "drop"]
        if gates:
            await asyncio.wait(gates)
        rest = [t for t in self._calls.values() if not t.done()]
        if rest and deadline > loop.time():
            await asyncio.wait(rest, timeout=deadline - loop.time())
        # From here on this method accounts every call (until now, a cancelled delivery's abandon() would).
        self._settled = True
        drop: PerceptionDrop | None = None
        failed: dict[str, str] = {}
        late: list[str] = []
        for a in p.analyzers:
            task = self._calls[a.name]
            if not task.done():
                late.append(a.name)
                task.add_done_callback(functools.partial(self._late, a.name))
                continue
            verdict, seconds = ended(task)
            p.record(a.name, verdict, seconds)
            if verdict.outcome == "ok":
                self.meta.perception[a.name] = verdict.result
            elif verdict.outcome in FAILURES:
                failed[a.name] = verdict.outcome
                log.warning("analyzer %s failed on utterance %s: %s%s; on_error=%s", a.name, self.meta.utterance_id,
                            verdict.outcome, f": {verdict.detail}" if verdict.detail else "", a.step.on_error)
                if a.step.on_error == "drop" and drop is None:
                    drop = PerceptionDrop(a.name, verdict.outcome, verdict.detail)
        if p.video is not None:
            p.video.attach(self.meta)
        if late:
            log.info("utterance %s goes out without analyzer(s) %s (over the %.0f ms budget)",
                     self.meta.utterance_id, ", ".join(late), p.budget_s * 1000)
        if p.events is not None:
            p.events.emit("perception", utterance_id=self.meta.utterance_id, results=dict(self.meta.perception),
                          late=late, failed=failed)
        return drop

    def abandon(self) -> None:
        """The utterance was dropped before its echo: what the started calls bring is counted `unused`.
        Nothing once `collect()` ran (its calls are accounted there)."""
        if self._settled:
            return
        self._settled = True
        for name, task in self._calls.items():
            task.add_done_callback(functools.partial(self._unused, name))

    def _late(self, name: str, task: asyncio.Task[tuple[Verdict, float]]) -> None:
        verdict, seconds = ended(task)
        if verdict.outcome in ("ok", "none"):
            verdict = Verdict("late", verdict.result)
        self.perception.record(name, verdict, seconds)
        if verdict.outcome in FAILURES:
            log.warning("analyzer %s failed on utterance %s: %s%s", name, self.meta.utterance_id, verdict.outcome,
                        f": {verdict.detail}" if verdict.detail else "")
        events = self.perception.events
        if events is not None and verdict.result is not None:
            events.emit("perception", utterance_id=self.meta.utterance_id, results={name: verdict.result},
                        late=[name], failed={})

    def _unused(self, name: str, task: asyncio.Task[tuple[Verdict, float]]) -> None:
        verdict, seconds = ended(task)
        kept = verdict.outcome in FAILURES or verdict.outcome == "cancelled"
        self.perception.record(name, verdict if kept else Verdict("unused"), seconds)


# ------------------------------------------------------------------------------------ building
def perception_problems(settings: PerceptionSettings, source_kind: str) -> list[ConfigError]:
    """Every analyzer built as `build_perception` would (options checked), each problem naming its key, for
    `config check`; and video analyzers without a camera (`source_kind` other than daily)."""
    problems: list[ConfigError] = []
    lists = (("perception.analyzers", settings.analyzers, AUDIO_BUILTINS, _audio_probe(), AUDIO_ARGS),
             ("perception.video.analyzers", settings.video.analyzers, VIDEO_BUILTINS,
              video_probe(settings.video.color_format), VIDEO_ARGS))
    for key, configs, builtins, probe, args in lists:
        for i, cfg in enumerate(configs):
            try:
                build_analyzers([cfg], key, builtins, probe, args, first=i)
            except ConfigError as exc:
                problems.extend(exc.problems)
    if settings.video.analyzers and source_kind != "daily":
        problems.append(ConfigError(f"video analyzers need a source with a camera (daily), not {source_kind!r}",
                                    "perception.video.analyzers"))
    return problems


AUDIO_ARGS = "(audio, meta)"


def _audio_probe() -> tuple[Any, ...]:
    """Arguments an audio analyzer must accept (its signature is checked against them, nothing is called)."""
    import numpy as np

    return np.zeros(0, dtype=np.int16), UtteranceMeta(utterance_id="", audio_start_s=0.0, audio_end_s=0.0)


def build_perception(settings: PerceptionSettings, metrics: Metrics, clock: Callable[[], float],
                     builtins: Mapping[str, Callable[..., Any]] = AUDIO_BUILTINS) -> Perception:
    """Every configured analyzer (`clock`: the source's stream clock, for video frames)."""
    analyzers = build_analyzers(settings.analyzers, "perception.analyzers", builtins, _audio_probe(), AUDIO_ARGS)
    if analyzers:
        log.info("perception: %s (budget %d ms)", ", ".join(
            f"{a.name}({'after ASR, ' if a.after_asr else ''}timeout={a.step.timeout_s:g}s, on_error={a.step.on_error})"
            for a in analyzers), settings.budget_ms)
    return Perception(analyzers, budget_s=settings.budget_ms / 1000, metrics=metrics,
                      video=build_video(settings.video, metrics, clock))
