"""The transform chain: run the configured steps in order over each utterance's text.

A step is a callable `(text, meta) -> str | None`, sync or async (see `pipeline.transform.base`).
The chain gives every step a timeout and an error policy, so one broken or slow step can never
stall the relay or crash it:

- A step returning `None` drops the utterance (counted `dropped{stage="transform",
  reason="dropped_by:<step>"}`).
- A step returning empty or whitespace-only text also drops it (reason `empty:<step>`): there is
  nothing to speak.
- A step that raises, times out, or returns something that is not `str`/`None` (reasons
  `error`, `timeout`, `bad_type`) is handled by its `on_error` policy:
  `pass` continues with the step's *input* (the step's result is discarded and counted
  `dropped{stage="transform_step", reason="<reason>:<step>"}`), `drop` drops the utterance
  (counted `dropped{stage="transform", reason="<reason>:<step>"}`). Either way it is logged with
  the step's name.

Where steps run:

- async steps run on the event loop under `asyncio.timeout`; they must not block (await your I/O)
  and must let themselves be cancelled.
- sync steps run in a worker thread so a slow one cannot block the loop. Python cannot kill a
  thread: a sync step that times out **keeps running** in its thread until it returns (its result
  is then thrown away). Those threads are daemon threads, so they never hold up process exit, and at
  most `MAX_PENDING_CALLS` calls of one step may be in flight: past that the step fails at once
  (reason `busy`) and its `on_error` policy applies, instead of piling up threads.
- steps whose callable has a true `inline` attribute (the built-ins) are trusted to be fast and
  CPU-trivial: they are called directly on the loop, which saves a thread hand-off per step. Their
  timeout cannot interrupt them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pipeline.config import ConfigError, TransformSettings
from pipeline.frames import UtteranceMeta
from pipeline.plugins import TRANSFORM_GROUP, PluginError, resolve
from pipeline.transform.base import OptionError
from pipeline.transform.builtins import BUILTINS

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

OnError = Literal["pass", "drop"]
MAX_PENDING_CALLS = 4  # per sync step: calls still running in threads (e.g. after timeouts)

# Why a step did not hand on text. `dropped_by` = the step returned None.
Reason = Literal["dropped_by", "empty", "error", "timeout", "bad_type", "busy"]


class StepBusyError(RuntimeError):
    """A sync step already has `MAX_PENDING_CALLS` calls running (earlier calls timed out)."""


# ------------------------------------------------------------------------------------ results
@dataclass(frozen=True, slots=True)
class StepTiming:
    """One step's run over one utterance. `outcome` is "ok" or the `Reason` it failed with."""

    step: str
    seconds: float
    outcome: str
    action: Literal["continue", "pass", "drop"] = "continue"


@dataclass(frozen=True, slots=True)
class StepDrop:
    """Which step dropped the utterance and why (`detail` is a human-readable explanation)."""

    step: str
    index: int
    reason: Reason
    detail: str = ""

    @property
    def label(self) -> str:
        """The metric reason it was counted under, e.g. `dropped_by:blocklist`, `timeout:webhook`."""
        return f"{self.reason}:{self.step}"

    def __str__(self) -> str:
        return self.label


@dataclass(slots=True)
class TransformOutcome:
    """The chain's result for one utterance: the final text, or None when it was dropped."""

    text: str | None
    dropped_by: StepDrop | None = None
    timings: list[StepTiming] = field(default_factory=list)

    @property
    def dropped(self) -> bool:
        return self.text is None

    @property
    def total_s(self) -> float:
        return sum(t.seconds for t in self.timings)

    @property
    def errors(self) -> list[StepTiming]:
        """Steps that failed (error, timeout, bad type, busy), whatever their policy did."""
        return [t for t in self.timings if t.outcome in ("error", "timeout", "bad_type", "busy")]


# -------------------------------------------------------------------------------------- steps
def _is_async_callable(fn: Any) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - we want the bound __call__ of instances
    return call is not None and inspect.iscoroutinefunction(call)


@dataclass(eq=False)
class BoundStep:
    """A step ready to run: its callable plus the chain's settings for it.

    `is_async` and `inline` are detected from `fn` when left as None (`inline` from an `inline`
    attribute on the callable).
    """

    name: str
    fn: Callable[[str, UtteranceMeta], Any]
    timeout_s: float = 2.0
    on_error: OnError = "pass"
    index: int = 0
    is_async: bool | None = None
    inline: bool | None = None
    _pending: int = field(default=0, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.is_async is None:
            self.is_async = _is_async_callable(self.fn)
        if self.inline is None:
            self.inline = bool(getattr(self.fn, "inline", False)) and not self.is_async
        if self.timeout_s <= 0:
            raise ValueError(f"step {self.name!r}: timeout_s must be > 0")
        if self.on_error not in ("pass", "drop"):
            raise ValueError(f"step {self.name!r}: on_error must be 'pass' or 'drop'")

    @property
    def pending_calls(self) -> int:
        """Calls of this (sync, threaded) step still running, including ones that timed out."""
        return self._pending

    async def call(self, text: str, meta: UtteranceMeta) -> Any:
        """Call the step once, without timeout or error handling (the chain adds those)."""
        if self.is_async:
            result: Any = self.fn(text, meta)
        elif self.inline:
            result = self.fn(text, meta)
        else:
            result = await self._call_in_thread(text, meta)
        if inspect.isawaitable(result):  # e.g. a sync callable returning a coroutine
            result = await result
        return result

    async def _call_in_thread(self, text: str, meta: UtteranceMeta) -> Any:
        # A fresh daemon thread per call (~0.1 ms): a call that times out keeps its thread until it
        # returns, but never delays interpreter exit the way a ThreadPoolExecutor worker would.
        with self._lock:
            if self._pending >= MAX_PENDING_CALLS:
                raise StepBusyError(f"{self._pending} earlier calls are still running (they timed out)")
            self._pending += 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        ctx = contextvars.copy_context()

        def settle(ok: bool, value: Any) -> None:
            if future.done():  # the chain gave up on it (timeout / cancellation)
                return
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

        def work() -> None:
            try:
                ok, value = True, ctx.run(self.fn, text, meta)
            except BaseException as exc:  # handed to the awaiting coroutine
                ok, value = False, exc
            finally:
                with self._lock:
                    self._pending -= 1
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
                loop.call_soon_threadsafe(settle, ok, value)

        threading.Thread(target=work, name=f"transform:{self.name}", daemon=True).start()
        return await future

    async def aclose(self) -> None:
        """Close the step's callable if it has `aclose()` (async) or `close()`."""
        for attr in ("aclose", "close"):
            closer = getattr(self.fn, attr, None)
            if callable(closer):
                res = closer()
                if inspect.isawaitable(res):
                    await res
                return


# -------------------------------------------------------------------------------------- chain
class TransformChain:
    """Runs `steps` in order over an utterance's text; see the module docstring for the rules."""

    def __init__(self, steps: list[BoundStep], metrics: Metrics | None = None) -> None:
        self.steps = list(steps)
        self.metrics = metrics

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    async def run(self, text: str, meta: UtteranceMeta) -> TransformOutcome:
        """Run every step; the outcome's `text` is the final text, or None if a step dropped it."""
        outcome = TransformOutcome(text=None)
        if not text.strip():
            return self._drop(outcome, StepDrop("input", -1, "empty", "empty text reached the chain"), meta)
        current = text
        for step in self.steps:
            t0 = time.perf_counter()
            reason: Reason | None = None
            detail = ""
            result: Any = None
            try:
                async with asyncio.timeout(step.timeout_s) as cm:
                    result = await step.call(current, meta)
            except TimeoutError:
                if cm.expired():
                    reason, detail = "timeout", f"no result within {step.timeout_s:g} s"
                else:  # the step itself raised TimeoutError
                    reason, detail = "error", "TimeoutError raised by the step"
            except StepBusyError as exc:
                reason, detail = "busy", str(exc)
            except Exception as exc:
                reason, detail = "error", f"{type(exc).__name__}: {exc}"
                log.debug("transform step %s raised", step.name, exc_info=True)
            else:
                if result is not None and not isinstance(result, str):
                    reason, detail = "bad_type", f"returned {type(result).__name__}, expected str or None"
            dt = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.stage_latency.labels(stage="transform").observe(dt)

            if reason is not None:  # the step failed: apply its error policy
                log.warning("transform step %s (#%d) failed on utterance %s: %s: %s; on_error=%s",
                            step.name, step.index, meta.utterance_id, reason, detail, step.on_error)
                if step.on_error == "drop":
                    outcome.timings.append(StepTiming(step.name, dt, reason, "drop"))
                    return self._drop(outcome, StepDrop(step.name, step.index, reason, detail), meta)
                if self.metrics is not None:  # the step's result is what got dropped
                    self.metrics.drop("transform_step", f"{reason}:{step.name}")
                outcome.timings.append(StepTiming(step.name, dt, reason, "pass"))
                continue

            if result is None:
                outcome.timings.append(StepTiming(step.name, dt, "dropped_by", "drop"))
                drop = StepDrop(step.name, step.index, "dropped_by", "the step returned None")
                return self._drop(outcome, drop, meta, level=logging.INFO)
            if not result.strip():
                outcome.timings.append(StepTiming(step.name, dt, "empty", "drop"))
                drop = StepDrop(step.name, step.index, "empty", "the step returned empty text")
                return self._drop(outcome, drop, meta, level=logging.INFO)
            outcome.timings.append(StepTiming(step.name, dt, "ok"))
            current = result
        outcome.text = current
        return outcome

    def _drop(self, outcome: TransformOutcome, drop: StepDrop, meta: UtteranceMeta,
              level: int = logging.WARNING) -> TransformOutcome:
        if self.metrics is not None:
            self.metrics.drop("transform", drop.label)
        if level != logging.WARNING:  # failures were already logged at warning level
            log.log(level, "utterance %s dropped by transform step %s (%s)", meta.utterance_id, drop.step,
                    drop.detail)
        else:
            log.warning("utterance %s dropped by transform step %s (%s)", meta.utterance_id, drop.step,
                        drop.detail)
        outcome.text = None
        outcome.dropped_by = drop
        return outcome

    async def aclose(self) -> None:
        """Close every step that has `aclose()`/`close()` (e.g. the webhook's HTTP client)."""
        for step in self.steps:
            try:
                await step.aclose()
            except Exception:
                log.warning("closing transform step %s failed", step.name, exc_info=True)

    async def __aenter__(self) -> TransformChain:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# ------------------------------------------------------------------------------------ building
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_QUOTED = re.compile(r"'([A-Za-z_][A-Za-z0-9_]*)'")


def _signature(obj: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):  # some builtins / C callables have none
        return None


def is_plain_step(obj: Any) -> bool:
    """True when `obj` is used as a step itself rather than called as a factory.

    That is: not a class, callable, and its signature has exactly two required positional
    parameters (`text`, `meta`). Only consulted when the config gives the step no options.
    """
    if inspect.isclass(obj) or not callable(obj):
        return False
    sig = _signature(obj)
    if sig is None:
        return False
    required = [p for p in sig.parameters.values() if p.kind in _POSITIONAL and p.default is p.empty]
    return len(required) == 2


def _accepted_options(obj: Any) -> list[str]:
    sig = _signature(obj)
    if sig is None:
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def instantiate_step(obj: Any, options: Mapping[str, Any], name: str, key: str) -> Callable[..., Any]:
    """Turn a resolved object plus config options into a step callable (`key` = config key prefix)."""
    if not options and is_plain_step(obj):
        return obj
    if not callable(obj):
        raise ConfigError(f"{name!r} resolved to a {type(obj).__name__}, not a step, factory or class",
                          f"{key}.step")
    if is_plain_step(obj):  # and options were given
        first = next(iter(options))
        raise ConfigError(f"step {name!r} is a plain (text, meta) step and takes no options (got "
                          f"{sorted(options)}); remove them, or make it a factory that accepts them",
                          f"{key}.{first}")
    sig = _signature(obj)
    if sig is not None:
        try:
            sig.bind(**options)
        except TypeError as exc:
            m = _QUOTED.search(str(exc))
            accepted = _accepted_options(obj)
            hint = f"; it accepts: {', '.join(accepted)}" if accepted else "; it takes no options"
            if m and "unexpected keyword" in str(exc):
                raise ConfigError(f"step {name!r} has no option {m.group(1)!r}{hint}",
                                  f"{key}.{m.group(1)}") from None
            if m and "missing" in str(exc):
                raise ConfigError(f"step {name!r} needs option {m.group(1)!r}{hint}",
                                  f"{key}.{m.group(1)}") from None
            raise ConfigError(f"step {name!r} rejects its options: {exc}{hint}", key) from None
    try:
        step = obj(**options)
    except OptionError as exc:
        raise ConfigError(f"step {name!r}: {exc}", f"{key}.{exc.option}") from None
    except TypeError as exc:
        raise ConfigError(f"step {name!r} rejects its options: {exc}", key) from None
    except Exception as exc:
        raise ConfigError(f"step {name!r} could not be created: {type(exc).__name__}: {exc}", key) from None
    if not callable(step):
        raise ConfigError(f"factory {name!r} returned a {type(step).__name__}, not a callable step", key)
    step_sig = _signature(step)
    if step_sig is not None:
        try:
            step_sig.bind("", UtteranceMeta(utterance_id="", audio_start_s=0.0, audio_end_s=0.0))
        except TypeError:
            raise ConfigError(f"step {name!r} does not accept (text, meta): signature {step_sig}",
                              key) from None
    return step


def _display_names(steps: list[str]) -> list[str]:
    """Step names for logs and metric labels: the `step` string, suffixed `[i]` when it repeats."""
    return [s if steps.count(s) == 1 else f"{s}[{i}]" for i, s in enumerate(steps)]


def build_chain(settings: TransformSettings, metrics: Metrics | None = None,
                builtins: Mapping[str, Callable[..., Any]] | None = None) -> TransformChain:
    """Resolve and create every configured step; config mistakes raise `ConfigError` naming the key."""
    if builtins is None:
        builtins = BUILTINS
    names = _display_names([s.step for s in settings.steps])
    # Steps must not hold resources that need a running loop until first use (the webhook creates
    # its HTTP client lazily), so nothing needs closing when a later step fails to build.
    bound: list[BoundStep] = []
    for i, (cfg, display) in enumerate(zip(settings.steps, names, strict=True)):
        key = f"transform.steps[{i}]"
        try:
            obj = resolve(cfg.step, builtins, TRANSFORM_GROUP)
        except PluginError as exc:
            raise ConfigError(str(exc), f"{key}.step") from None
        fn = instantiate_step(obj, cfg.options, cfg.step, key)
        bound.append(BoundStep(name=display, fn=fn, timeout_s=cfg.timeout_s, on_error=cfg.on_error, index=i))
    chain = TransformChain(bound, metrics)
    described = [f"{s.name}(timeout={s.timeout_s:g}s, on_error={s.on_error}, "
                 f"{'async' if s.is_async else 'inline' if s.inline else 'thread'})" for s in bound]
    log.info("transform chain: %s", " -> ".join(described) or "(empty)")
    return chain

