"""One analyzer call: its verdict, its accounting, and the building of configured analyzers.

Shared by the perception stage (pipeline/perception/stage.py, audio analyzers per utterance) and the camera path
(pipeline/perception/video.py, video analyzers per frame); it knows neither of them. The outcomes are described
in pipeline/perception/stage.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from pipeline.config import ConfigError, PerceptionAnalyzer
from pipeline.perception.base import runs_after_asr
from pipeline.plugins import PERCEPTION_GROUP, PluginError, resolve
from pipeline.transform.chain import BoundStep, Raised, StepBusyError, StepTimeoutError, describe, instantiate_step

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

Outcome = Literal["ok", "none", "late", "unused", "cancelled", "timeout", "error", "bad_type", "bad_value", "busy"]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)
FAILURES: frozenset[Outcome] = frozenset({"timeout", "error", "bad_type", "bad_value", "busy"})
MAX_RESULT_BYTES = 16_384  # of one result as JSON: it rides on every record and event of the utterance


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one analyzer call came to: its outcome, the result (a JSON-safe copy) when ok, and why when not."""

    outcome: Outcome
    result: dict[str, Any] | None = None
    detail: str = ""


def judge(value: Any) -> Verdict:
    """Classify what an analyzer handed back (pure). An ok result is copied through JSON, so the relay keeps
    exactly what will be written, whatever the analyzer does with its dict afterwards."""
    if isinstance(value, Raised):
        return Verdict("error", detail=describe(value.exc))
    if value is None:
        return Verdict("none")
    if not isinstance(value, dict):
        return Verdict("bad_type", detail=f"returned {type(value).__name__}, expected dict or None")
    try:
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return Verdict("bad_value", detail=f"not JSON-serialisable: {describe(exc)}")
    if len(text.encode("utf-8")) > MAX_RESULT_BYTES:
        return Verdict("bad_value", detail=f"result is over {MAX_RESULT_BYTES} bytes as JSON")
    return Verdict("ok", json.loads(text))


@dataclass(eq=False, slots=True)
class BoundAnalyzer:
    step: BoundStep  # name, callable, timeout_s, on_error
    after_asr: bool = False

    @property
    def name(self) -> str:
        return self.step.name


async def call_analyzer(step: BoundStep, *args: Any) -> tuple[Verdict, float]:
    """One call under the step's timeout: its verdict and how long it took."""
    t0 = time.perf_counter()
    try:
        verdict = judge(await step.call(*args))
    except StepTimeoutError:
        verdict = Verdict("timeout", detail=f"no result within {step.timeout_s:g} s")
    except StepBusyError as exc:
        verdict = Verdict("busy", detail=str(exc))
    return verdict, time.perf_counter() - t0


TIMED: frozenset[Outcome] = frozenset({"ok", "none", "late"})  # outcomes whose duration is the analyzer's own


def count_call(metrics: Metrics, outcomes: dict[str, dict[str, int]], name: str, verdict: Verdict,
               seconds: float) -> int:
    """Account one call (audio or video analyzer): the metrics and the /status counts. Returns how many calls of
    this analyzer have had this outcome so far."""
    metrics.perception_calls.labels(analyzer=name, outcome=verdict.outcome).inc()
    if verdict.outcome in TIMED:
        metrics.perception_latency.labels(analyzer=name).observe(seconds)
    counts = outcomes[name]
    counts[verdict.outcome] = counts.get(verdict.outcome, 0) + 1
    return counts[verdict.outcome]


def analyzer_status(a: BoundAnalyzer, outcomes: dict[str, dict[str, int]]) -> dict[str, Any]:
    """One analyzer as /status shows it."""
    return {"name": a.name, "timeout_s": a.step.timeout_s, "on_error": a.step.on_error,
            "outcomes": dict(outcomes[a.name])}


def ended(task: asyncio.Task[tuple[Verdict, float]]) -> tuple[Verdict, float]:
    """The verdict of a finished call; `cancelled` when the relay was torn down under it."""
    return (Verdict("cancelled"), 0.0) if task.cancelled() else task.result()


def build_analyzers(configs: list[PerceptionAnalyzer], key: str, builtins: Mapping[str, Callable[..., Any]],
                    probe: tuple[Any, ...], args: str, first: int = 0) -> list[BoundAnalyzer]:
    """Resolve and create each configured analyzer (`configs` are `key[first]`, `key[first + 1]`, ...);
    mistakes raise ConfigError naming the key."""
    bound: list[BoundAnalyzer] = []
    for i, cfg in enumerate(configs, start=first):
        at = f"{key}[{i}]"
        try:
            obj = resolve(cfg.analyzer, builtins, PERCEPTION_GROUP)
        except PluginError as exc:
            raise ConfigError(str(exc), f"{at}.analyzer") from None
        fn = instantiate_step(obj, cfg.options, cfg.analyzer, at, noun="analyzer", args=args, probe=probe)
        step = BoundStep(name=cfg.key, fn=fn, timeout_s=cfg.timeout_s, on_error=cfg.on_error, index=i, inline=False)
        bound.append(BoundAnalyzer(step, after_asr=runs_after_asr(fn) or runs_after_asr(obj)))
    return bound
