"""The transform chain: run the configured steps in order over each utterance's text.

A step is a callable `(text, meta) -> str | None`, sync or async (see `pipeline.transform.base`).
The chain gives every step a timeout and an error policy, so one broken or slow step can never
stall the relay or crash it:

- A step returning `None` drops the utterance (counted `dropped{stage="transform",
  reason="dropped_by:<step>"}`).
- A step returning empty or whitespace-only text also drops it (reason `empty:<step>`): there is
  nothing to speak.
- A step that fails is handled by its `on_error` policy. Failing is: raising anything at all
  (`error`: every `BaseException`, SystemExit, KeyboardInterrupt, GeneratorExit, a leaked
  StopIteration or CancelledError included; an awaitable it returns that raises counts the same),
  no result within `timeout_s` (`timeout`), returning something that is not `str`/`None`
  (`bad_type`), returning text longer than `transform.max_text_chars` (`too_long`) or text that is
  not valid to send: a lone surrogate, which cannot be encoded as UTF-8, or a control character
  other than tab, LF and CR (`bad_text`, see `pipeline.transform.base.text_problem`).
  `pass` continues with the step's *input* (the step's result is discarded and counted
  `dropped{stage="transform_step", reason="<reason>:<step>"}`), `drop` drops the utterance
  (counted `dropped{stage="transform", reason="<reason>:<step>"}`). Either way it is logged on one
  line with the step's name (the traceback only at debug level).
- Text that reaches the chain too long or not valid to send is dropped before any step runs
  (`too_long:input`, `bad_text:input`), like empty text (`empty:input`).

Only the cancellation of the task running the chain (the relay's drain deadline) propagates; the
chain then stops waiting for the step at once.

Where steps run:

- async steps run on the event loop, each call as its own task, which the chain waits for with
  `asyncio.wait(timeout)`: they must not block (await your I/O). On timeout the task is cancelled
  and given `CANCEL_GRACE_S`; a step that ignores the cancellation is abandoned there (its task is
  kept referenced until it ends), so the timeout and the drain deadline hold whatever the step
  does. At most `MAX_PENDING_CALLS` abandoned calls of one step may pile up: past that the step
  fails at once (reason `busy`). `TransformChain.aclose()` cancels them again and closes the
  coroutines that still ignore it, so shutdown (`asyncio.run`, which waits for every task) cannot
  hang on them.
- sync steps run in a worker thread so a slow one cannot block the loop. Python cannot kill a
  thread: a sync step that times out **keeps running** in its thread until it returns (its result
  is then thrown away). Those threads are daemon threads, so they never hold up process exit, and at
  most `MAX_PENDING_CALLS` calls of one step may be in flight: past that the step fails at once
  (reason `busy`) and its `on_error` policy applies, instead of piling up threads.
- steps whose callable has a true `inline` attribute (the built-ins) are trusted to be fast and
  CPU-trivial: they are called directly on the loop, which saves a thread hand-off per step. Their
  timeout cannot interrupt them.
- a sync or inline step that returns an awaitable (e.g. a coroutine) has it awaited as a task like
  an async step's, within what is left of the same timeout.

What a step raises never goes through asyncio as an exception: it is carried as a value
(`Raised`), because an asyncio task re-raises SystemExit/KeyboardInterrupt out of the event loop
(that ended the daemon with exit 3) and a Future refuses StopIteration.
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
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from pipeline.config import ConfigError, TransformSettings
from pipeline.frames import UtteranceMeta
from pipeline.metrics import init_labels
from pipeline.plugins import TRANSFORM_GROUP, PluginError, resolve
from pipeline.transform.base import OptionError, TextProblem, text_problem
from pipeline.transform.builtins import BUILTINS

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

OnError = Literal["pass", "drop"]
# Per step: calls still running after the chain stopped waiting for them (threads of sync steps that
# timed out, tasks of async steps that ignored cancellation), the current call included.
MAX_PENDING_CALLS = 4
CANCEL_GRACE_S = 0.1  # a cancelled async call that has not ended within this is abandoned
DETAIL_MAX_CHARS = 300  # of a failure's detail in the log (an exception's message can be megabytes)
# `max_text_chars` of a chain built without settings: the documented default, from its one definition.
DEFAULT_MAX_TEXT_CHARS: int = TransformSettings.model_fields["max_text_chars"].default

# Why a step did not hand on text. `dropped_by` = the step returned None.
Reason = Literal["dropped_by", "empty", "error", "timeout", "bad_type", "busy", "too_long", "bad_text"]
# The reasons that are a step's failure (its on_error policy applies).
FAILURES: tuple[Reason, ...] = ("error", "timeout", "bad_type", "busy", "too_long", "bad_text")


class StepBusyError(RuntimeError):
    """A step already has `MAX_PENDING_CALLS` calls running (earlier calls outlived their timeout)."""


class StepTimeoutError(Exception):
    """The step gave no result within its `timeout_s` (raised by `BoundStep.call`, never by a step)."""


@dataclass(frozen=True, slots=True)
class Raised:
    """What a step raised, carried as a value (see the module docstring for why)."""

    exc: BaseException


# Characters of a detail that would break a log line or its encoding: controls and lone surrogates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _printable(detail: str) -> str:
    """`detail` made safe for one log line: unprintable characters escaped, at most DETAIL_MAX_CHARS."""
    clipped = len(detail) > DETAIL_MAX_CHARS
    detail = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                              else f"\\u{ord(m.group()):04x}", detail[:DETAIL_MAX_CHARS])  # clip first: O(limit)
    return detail[:DETAIL_MAX_CHARS] + "..." if clipped or len(detail) > DETAIL_MAX_CHARS else detail


def describe(exc: BaseException) -> str:
    """`Type: message` of what a step raised, even when its `__str__` raises (hostile or buggy)."""
    try:
        message = str(exc)
    except BaseException:  # a step's exception may raise anything from __str__; never let it out
        message = "<unprintable message>"
    return _printable(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _discard(value: Any) -> None:
    """A result nobody will use: close it if it is a coroutine (no 'never awaited' warning)."""
    if inspect.iscoroutine(value):
        value.close()


def _settled(task: asyncio.Future[Any]) -> None:
    """Done callback of a step's tasks: mark the outcome seen (an abandoned call's is never read)."""
    if not task.cancelled():
        task.exception()


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
        """Steps that failed (any of `FAILURES`), whatever their policy did."""
        return [t for t in self.timings if t.outcome in FAILURES]


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
    fn: Callable[..., Any]  # a step's (text, meta); the perception stage's analyzers run here too
    timeout_s: float = 2.0
    on_error: OnError = "pass"
    index: int = 0
    # The language of the text the step returns (a translation step): the chain sets UtteranceMeta.language to it
    # (transform.steps[i].output_language, else the callable's own `output_language` attribute; None: unchanged).
    output_language: str | None = None
    is_async: bool | None = None
    inline: bool | None = None
    _pending: int = field(default=0, init=False, repr=False)  # threads still running this step
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    # Tasks still running this step (async calls, awaitables returned by sync steps), abandoned ones
    # included: the reference keeps them from being garbage-collected while they run.
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.output_language is None:
            declared = getattr(self.fn, "output_language", None)
            self.output_language = declared if isinstance(declared, str) and declared else None
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
        """Calls of this step still running (threads and tasks), including ones the chain gave up on."""
        with self._lock:
            return self._pending + len(self._tasks)

    def _reserve(self) -> None:
        """Count one more running call, or raise StepBusyError at `MAX_PENDING_CALLS`."""
        with self._lock:
            running = self._pending + len(self._tasks)
            if running >= MAX_PENDING_CALLS:
                raise StepBusyError(f"{running} earlier calls are still running (they outlived their timeout)")
            self._pending += 1

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def call(self, *args: Any) -> Any:
        """Call the step once with `args` (a step's text and meta) under its timeout (see the module
        docstring for where it runs).

        Returns what the step returned, or `Raised` with whatever it raised; raises
        `StepTimeoutError` or `StepBusyError`. Only the cancellation of the calling task propagates.
        """
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        result: Any
        if self.is_async:
            result = await self._run_task(lambda: self.fn(*args), deadline)
        elif self.inline:
            try:
                result = self.fn(*args)
            except BaseException as exc:  # synchronous: never the chain's own cancellation
                result = Raised(exc)
        else:
            result = await self._run_thread(args, deadline)
        if inspect.isawaitable(result):  # e.g. a sync callable returning a coroutine
            awaitable = result
            try:
                result = await self._run_task(lambda: awaitable, deadline)
            except StepBusyError:
                _discard(awaitable)
                raise
        return result

    async def _guarded(self, start: Callable[[], Any]) -> Any:
        """The body of a step's task: `start()`, awaited, with whatever it raises returned as `Raised`."""
        try:
            value = start()
            if inspect.isawaitable(value):
                value = await value
            return value
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the chain cancelled it (timeout, shutdown)
                raise
            return Raised(exc)  # the step raised it itself
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, GeneratorExit, ...: the step's failure
            return Raised(exc)

    async def _run_task(self, start: Callable[[], Any], deadline: float) -> Any:
        """Run `start()` (and await it) as its own task until `deadline`; abandon it if it will not end."""
        self._reserve()
        loop = asyncio.get_running_loop()
        try:
            body: Coroutine[Any, Any, Any] = self._guarded(start)
            task = loop.create_task(body, name=f"transform:{self.name}")
            self._tasks.add(task)
        finally:
            self._release()  # from here on the task itself counts, until it ends
        task.add_done_callback(self._task_ended)
        try:
            await asyncio.wait({task}, timeout=max(0.0, deadline - loop.time()))
        except asyncio.CancelledError:  # the relay cancelled the caller (drain deadline): stop waiting
            task.cancel()
            raise
        if not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_GRACE_S)  # a step that ignores it is abandoned
            raise StepTimeoutError
        if task.cancelled():  # the step cancelled its own task (asyncio.current_task().cancel())
            return Raised(asyncio.CancelledError())
        exc = task.exception()
        return Raised(exc) if exc is not None else task.result()

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        _settled(task)

    async def _run_thread(self, args: tuple[Any, ...], deadline: float) -> Any:
        # A fresh daemon thread per call (~0.1 ms): a call that times out keeps its thread until it
        # returns, but never delays interpreter exit the way a ThreadPoolExecutor worker would.
        self._reserve()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        ctx = contextvars.copy_context()

        def settle(value: Any) -> None:
            if future.done():  # the chain gave up on it (timeout / cancellation)
                _discard(value)
            else:
                future.set_result(value)

        def work() -> None:
            try:
                value = ctx.run(self.fn, *args)
            except BaseException as exc:  # any kind: a value for the chain, never raised through asyncio
                value = Raised(exc)
            finally:
                self._release()
            try:
                loop.call_soon_threadsafe(settle, value)
            except RuntimeError:  # a closed loop: nobody is waiting any more
                _discard(value)

        threading.Thread(target=work, name=f"transform:{self.name}", daemon=True).start()
        try:
            await asyncio.wait({future}, timeout=max(0.0, deadline - loop.time()))
        finally:
            if not future.done():  # timeout or the caller's cancellation: the thread's result is unwanted
                future.cancel()
        if future.cancelled():
            raise StepTimeoutError
        return future.result()

    async def abandon_pending(self) -> int:
        """Shutdown: end the calls that outlived their timeout; returns how many had to be forced.

        Each is cancelled again and given `CANCEL_GRACE_S`; the coroutine of one that still runs is
        closed (GeneratorExit at its await), which ends its task. asyncio.run() and
        asyncio.Runner.close() wait for every task of the loop, so one left running would hang exit.
        """
        tasks = [t for t in self._tasks if not t.done()]
        if not tasks:
            return 0
        for task in tasks:
            task.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=CANCEL_GRACE_S)
        for task in stuck:
            task.cancel()  # schedules its next step: it then finds its coroutine closed and ends
            with contextlib.suppress(RuntimeError):  # "coroutine ignored GeneratorExit"
                task.get_coro().close()
        if stuck:
            await asyncio.wait(stuck, timeout=CANCEL_GRACE_S)
        return len(stuck)

    async def aclose(self) -> None:
        """Shutdown: end the abandoned calls (`abandon_pending`), then close the step's callable if it
        has `aclose()` (async) or `close()`, within the step's `timeout_s`. Problems are logged (one
        line, the traceback at debug level), never raised: closing is the step's code too."""
        forced = await self.abandon_pending()
        if forced:
            log.warning("transform step %s: %d call(s) ignored cancellation past their timeout; their "
                        "coroutines were closed at shutdown", self.name, forced)
        closer = next((c for c in (getattr(self.fn, a, None) for a in ("aclose", "close")) if callable(c)), None)
        if closer is None:
            return
        task = asyncio.get_running_loop().create_task(self._guarded(closer), name=f"transform:{self.name}:close")
        self._tasks.add(task)
        task.add_done_callback(self._task_ended)
        await asyncio.wait({task}, timeout=self.timeout_s)
        if not task.done():
            await self.abandon_pending()
            log.warning("closing transform step %s: no end within %g s; abandoned", self.name, self.timeout_s)
            return
        result = None if task.cancelled() or task.exception() is not None else task.result()
        if isinstance(result, Raised):
            log.warning("closing transform step %s failed: %s", self.name, describe(result.exc))
            log.debug("closing transform step %s raised", self.name, exc_info=result.exc)


# -------------------------------------------------------------------------------------- chain
class TransformChain:
    """Runs `steps` in order over an utterance's text; see the module docstring for the rules."""

    def __init__(self, steps: list[BoundStep], metrics: Metrics | None = None,
                 max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> None:
        self.steps = list(steps)
        self.metrics = metrics
        self.max_text_chars = max_text_chars  # transform.max_text_chars
        if metrics is not None:  # every drop this chain can count, at 0 from the start
            input_drops = [f"{reason}:input" for reason in ("empty", *get_args(TextProblem))]
            init_labels(metrics.dropped, stage=["transform"], reason=[
                *input_drops, *(f"{reason}:{step}" for step in self.names for reason in get_args(Reason))])
            init_labels(metrics.dropped, stage=["transform_step"],
                        reason=[f"{reason}:{step}" for step in self.names for reason in FAILURES])
            init_labels(metrics.transform_step_latency, step=self.names)

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
        problem = text_problem(text, self.max_text_chars)
        if problem is not None:  # no step is to blame: refuse it before they run
            return self._drop(outcome, StepDrop("input", -1, problem[0], f"the chain's input: {problem[1]}"), meta)
        t0 = time.perf_counter()
        try:
            return await self._run_steps(text, meta, outcome)
        finally:
            if self.metrics is not None and self.steps:
                self.metrics.stage_latency.labels(stage="transform").observe(time.perf_counter() - t0)

    async def _run_steps(self, text: str, meta: UtteranceMeta, outcome: TransformOutcome) -> TransformOutcome:
        current = text
        for step in self.steps:
            t0 = time.perf_counter()
            reason: Reason | None = None
            detail = ""
            result: Any = None
            try:
                result = await step.call(current, meta)
            except StepTimeoutError:
                reason, detail = "timeout", f"no result within {step.timeout_s:g} s"
            except StepBusyError as exc:
                reason, detail = "busy", str(exc)
            else:
                reason, detail, result = self._judge(step, result)
            dt = time.perf_counter() - t0
            if self.metrics is not None:
                self.metrics.transform_step_latency.labels(step=step.name).observe(dt)

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
            if step.output_language is not None and step.output_language != meta.language:
                meta.language, meta.language_probability = step.output_language, None  # written, not detected
        outcome.text = current
        return outcome

    def _judge(self, step: BoundStep, result: Any) -> tuple[Reason | None, str, Any]:
        """(failure reason or None, detail, the result as exact `str` / None) of what a step handed back."""
        if isinstance(result, Raised):
            log.debug("transform step %s raised", step.name, exc_info=result.exc)
            return "error", describe(result.exc), None
        if result is None:
            return None, "", None
        if not isinstance(result, str):
            _discard(result)
            return "bad_type", _printable(f"returned {type(result).__name__}, expected str or None"), None
        if type(result) is not str:  # a subclass may override strip(), len(), ...: use its plain value
            result = str.__str__(result)
        problem = text_problem(result, self.max_text_chars)
        if problem is not None:
            return problem[0], problem[1], None
        return None, "", result

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
            except Exception as exc:  # a bug of the chain's own: BoundStep.aclose contains the step's
                log.warning("closing transform step %s failed: %s", step.name, describe(exc))
                log.debug("closing transform step %s failed", step.name, exc_info=True)

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


def is_plain_step(obj: Any, arity: int = 2) -> bool:
    """True when `obj` is used as a step itself rather than called as a factory.

    That is: not a class, callable, and its signature has exactly `arity` required positional
    parameters (`text, meta` for a step; `audio, meta` for an analyzer, `frame` for a video analyzer).
    Only consulted when the config gives the step no options.
    """
    if inspect.isclass(obj) or not callable(obj):
        return False
    sig = _signature(obj)
    if sig is None:
        return False
    required = [p for p in sig.parameters.values() if p.kind in _POSITIONAL and p.default is p.empty]
    return len(required) == arity


def _accepted_options(obj: Any) -> list[str]:
    sig = _signature(obj)
    if sig is None:
        return []
    return [p.name for p in sig.parameters.values()
            if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


STEP_ARGS = "(text, meta)"


def instantiate_step(obj: Any, options: Mapping[str, Any], name: str, key: str, *, noun: str = "step",
                     args: str = STEP_ARGS, probe: tuple[Any, ...] | None = None) -> Callable[..., Any]:
    """Turn a resolved object plus config options into a step callable (`key` = config key prefix).

    The perception stage uses it for analyzers too: `noun` names the thing in messages, `args` its call
    signature, `probe` sample arguments it must accept (default: a text step's `("", meta)`)."""
    if probe is None:
        probe = ("", UtteranceMeta(utterance_id="", audio_start_s=0.0, audio_end_s=0.0))
    kind = f"{noun} {name!r}"
    if not options and is_plain_step(obj, len(probe)):
        return obj
    if not callable(obj):
        raise ConfigError(f"{name!r} resolved to a {type(obj).__name__}, not a {noun}, factory or class",
                          f"{key}.{noun}")
    if is_plain_step(obj, len(probe)):  # and options were given
        first = next(iter(options))
        raise ConfigError(f"{kind} is a plain {args} {noun} and takes no options (got "
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
                raise ConfigError(f"{kind} has no option {m.group(1)!r}{hint}",
                                  f"{key}.{m.group(1)}") from None
            if m and "missing" in str(exc):
                raise ConfigError(f"{kind} needs option {m.group(1)!r}{hint}",
                                  f"{key}.{m.group(1)}") from None
            raise ConfigError(f"{kind} rejects its options: {exc}{hint}", key) from None
    try:
        step = obj(**options)
    except OptionError as exc:
        raise ConfigError(f"{kind}: {exc}", f"{key}.{exc.option}") from None
    except TypeError as exc:
        raise ConfigError(f"{kind} rejects its options: {exc}", key) from None
    except Exception as exc:
        raise ConfigError(f"{kind} could not be created: {type(exc).__name__}: {exc}", key) from None
    if not callable(step):
        raise ConfigError(f"factory {name!r} returned a {type(step).__name__}, not a callable {noun}", key)
    step_sig = _signature(step)
    if step_sig is not None:
        try:
            step_sig.bind(*probe)
        except TypeError:
            raise ConfigError(f"{kind} does not accept {args}: signature {step_sig}", key) from None
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
        bound.append(BoundStep(name=display, fn=fn, timeout_s=cfg.timeout_s, on_error=cfg.on_error, index=i,
                               output_language=cfg.output_language))
    chain = TransformChain(bound, metrics, max_text_chars=settings.max_text_chars)
    described = [f"{s.name}(timeout={s.timeout_s:g}s, on_error={s.on_error}, "
                 f"{'async' if s.is_async else 'inline' if s.inline else 'thread'})" for s in bound]
    log.info("transform chain: %s", " -> ".join(described) or "(empty)")
    return chain

