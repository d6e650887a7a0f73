"""Transform chain: order, drops, sync/async steps, timeouts, error policies, config errors."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from pipeline.config import ConfigError, Settings, TransformSettings, TransformStep, load_settings
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.transform import BUILTINS, BoundStep, TransformChain, build_chain
from pipeline.transform.base import OptionError
from pipeline.transform.chain import MAX_PENDING_CALLS, is_plain_step

DROPPED = "echo_relay_dropped_total"


def meta(uid: str = "u1") -> UtteranceMeta:
    return UtteranceMeta(utterance_id=uid, audio_start_s=1.0, audio_end_s=2.5, asr_text="raw", confidence=0.9,
                         language="en")


def dropped(m: Metrics, reason: str, stage: str = "transform") -> float:
    return m.value(DROPPED, {"stage": stage, "reason": reason})


def latency_count(m: Metrics) -> float:
    """Chain runs timed as the transform stage."""
    return m.value("echo_relay_stage_latency_seconds_count", {"stage": "transform"})


def step_count(m: Metrics, step: str) -> float:
    return m.value("echo_relay_transform_step_latency_seconds_count", {"step": step})


def chain_of(*steps: Any, metrics: Metrics | None = None, timeout_s: float = 1.0,
             on_error: str = "pass") -> TransformChain:
    bound = [BoundStep(name=getattr(fn, "__name__", f"s{i}"), fn=fn, timeout_s=timeout_s, on_error=on_error,  # type: ignore[arg-type]
                       index=i) for i, fn in enumerate(steps)]
    return TransformChain(bound, metrics)


# ----------------------------------------------------------------------------------- basics
async def test_steps_run_in_order_sync_and_async() -> None:
    seen: list[str] = []

    def add_a(text: str, meta: UtteranceMeta) -> str:
        seen.append("a")
        return text + "a"

    async def add_b(text: str, meta: UtteranceMeta) -> str:
        await asyncio.sleep(0)
        seen.append("b")
        return text + "b"

    class AddC:
        def __call__(self, text: str, meta: UtteranceMeta) -> str:
            return text + "c"

    class AddD:
        async def __call__(self, text: str, meta: UtteranceMeta) -> str:
            return text + "d"

    m = Metrics()
    chain = chain_of(add_a, add_b, AddC(), AddD(), metrics=m)
    assert [s.is_async for s in chain.steps] == [False, True, False, True]
    out = await chain.run("x", meta())
    assert out.text == "xabcd" and not out.dropped and out.dropped_by is None
    assert seen == ["a", "b"]
    assert [t.outcome for t in out.timings] == ["ok"] * 4
    assert latency_count(m) == 1  # one chain run, each of its four steps timed under its own name
    assert [step_count(m, s.name) for s in chain.steps] == [1, 1, 1, 1]
    assert len({s.name for s in chain.steps}) == 4
    assert out.total_s >= 0


async def test_empty_chain_passes_text() -> None:
    out = await TransformChain([], Metrics()).run("hello", meta())
    assert out.text == "hello"


async def test_sync_steps_run_off_the_loop_and_builtins_inline() -> None:
    threads: list[str] = []

    def where(text: str, meta: UtteranceMeta) -> str:
        threads.append(threading.current_thread().name)
        return text

    chain = chain_of(where, BUILTINS["whitespace"]())
    assert [s.inline for s in chain.steps] == [False, True]
    assert (await chain.run(" hi ", meta())).text == "hi"
    assert threads and threads[0] != threading.main_thread().name and threads[0].startswith("transform:")


async def test_meta_reaches_steps_and_steps_may_annotate_it() -> None:
    def stamp(text: str, meta: UtteranceMeta) -> str:
        meta.extra["seen_by"] = "stamp"
        return f"{text} [{meta.utterance_id} {meta.audio_start_s}-{meta.audio_end_s} {meta.language}]"

    md = meta("utt-7")
    out = await chain_of(stamp).run("hi", md)
    assert out.text == "hi [utt-7 1.0-2.5 en]"
    assert md.extra["seen_by"] == "stamp"


# ------------------------------------------------------------------------------------ drops
async def test_none_drops_and_counts_step_name() -> None:
    called: list[str] = []

    def veto(text: str, meta: UtteranceMeta) -> None:
        return None

    def after(text: str, meta: UtteranceMeta) -> str:
        called.append(text)
        return text

    m = Metrics()
    out = await chain_of(veto, after, metrics=m).run("hello", meta())
    assert out.dropped and out.text is None
    assert out.dropped_by is not None
    assert (out.dropped_by.step, out.dropped_by.index, out.dropped_by.reason) == ("veto", 0, "dropped_by")
    assert called == []  # later steps do not run
    assert dropped(m, "dropped_by:veto") == 1


@pytest.mark.parametrize("result", ["", "   ", "\n\t"])
async def test_empty_result_is_a_drop(result: str) -> None:
    def blank(text: str, meta: UtteranceMeta) -> str:
        return result

    m = Metrics()
    out = await chain_of(blank, metrics=m).run("hello", meta())
    assert out.dropped and out.dropped_by is not None and out.dropped_by.reason == "empty"
    assert dropped(m, "empty:blank") == 1


async def test_empty_input_is_dropped_without_running_steps() -> None:
    def boom(text: str, meta: UtteranceMeta) -> str:
        raise AssertionError("must not run")

    m = Metrics()
    out = await chain_of(boom, metrics=m).run("  ", meta())
    assert out.dropped and out.dropped_by is not None and out.dropped_by.step == "input"
    assert dropped(m, "empty:input") == 1


# ---------------------------------------------------------------------------- error policies
async def test_exception_pass_continues_with_step_input(caplog: pytest.LogCaptureFixture) -> None:
    def upper(text: str, meta: UtteranceMeta) -> str:
        return text.upper()

    def broken(text: str, meta: UtteranceMeta) -> str:
        raise RuntimeError("model crashed")

    def exclaim(text: str, meta: UtteranceMeta) -> str:
        return text + "!"

    m = Metrics()
    out = await chain_of(upper, broken, exclaim, metrics=m, on_error="pass").run("hi", meta())
    assert out.text == "HI!"
    assert [t.outcome for t in out.timings] == ["ok", "error", "ok"]
    assert out.timings[1].action == "pass" and out.errors == [out.timings[1]]
    assert dropped(m, "error:broken", stage="transform_step") == 1
    assert dropped(m, "error:broken") == 0  # the utterance itself was not dropped
    assert any("broken" in r.getMessage() and "model crashed" in r.getMessage() for r in caplog.records)


async def test_exception_drop_policy_drops() -> None:
    async def broken(text: str, meta: UtteranceMeta) -> str:
        raise ValueError("bad")

    m = Metrics()
    out = await chain_of(broken, metrics=m, on_error="drop").run("hi", meta())
    assert out.dropped and out.dropped_by is not None
    assert out.dropped_by.reason == "error" and "ValueError: bad" in out.dropped_by.detail
    assert dropped(m, "error:broken") == 1


@pytest.mark.parametrize("policy", ["pass", "drop"])
async def test_async_timeout_policies(policy: str) -> None:
    async def slow(text: str, meta: UtteranceMeta) -> str:
        await asyncio.sleep(1.0)
        return "late"

    m = Metrics()
    t0 = time.perf_counter()
    out = await chain_of(slow, metrics=m, timeout_s=0.05, on_error=policy).run("hi", meta())
    assert time.perf_counter() - t0 < 0.5
    assert out.timings[0].outcome == "timeout"
    if policy == "pass":
        assert out.text == "hi"
        assert dropped(m, "timeout:slow", stage="transform_step") == 1
    else:
        assert out.dropped and out.dropped_by is not None and out.dropped_by.reason == "timeout"
        assert dropped(m, "timeout:slow") == 1
    assert latency_count(m) == 1 and step_count(m, "slow") == 1


@pytest.mark.parametrize("policy", ["pass", "drop"])
async def test_sync_timeout_does_not_block_the_loop(policy: str) -> None:
    release = threading.Event()

    def stuck(text: str, meta: UtteranceMeta) -> str:
        release.wait(5)
        return "late"

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    m = Metrics()
    task = asyncio.create_task(ticker())
    try:
        out = await chain_of(stuck, metrics=m, timeout_s=0.1, on_error=policy).run("hi", meta())
    finally:
        task.cancel()
        release.set()
    assert ticks >= 5  # the loop kept running while the step was stuck in its thread
    assert out.timings[0].outcome == "timeout"
    assert (out.text == "hi") if policy == "pass" else out.dropped


async def test_stuck_sync_step_is_bounded() -> None:
    release = threading.Event()

    def stuck(text: str, meta: UtteranceMeta) -> str:
        release.wait(5)
        return text

    chain = chain_of(stuck, timeout_s=0.02)
    try:
        outcomes = [(await chain.run("hi", meta())).timings[0].outcome for _ in range(MAX_PENDING_CALLS + 2)]
        assert outcomes[:MAX_PENDING_CALLS] == ["timeout"] * MAX_PENDING_CALLS
        assert outcomes[MAX_PENDING_CALLS:] == ["busy", "busy"]  # no more threads piled up
        assert chain.steps[0].pending_calls == MAX_PENDING_CALLS
    finally:
        release.set()
    for _ in range(200):
        if chain.steps[0].pending_calls == 0:
            break
        await asyncio.sleep(0.01)
    assert chain.steps[0].pending_calls == 0
    assert (await chain.run("hi", meta())).text == "hi"


@pytest.mark.parametrize("garbage", [42, {"text": "hi"}, b"bytes", ["a"]])
@pytest.mark.parametrize("policy", ["pass", "drop"])
async def test_garbage_return_type(garbage: Any, policy: str) -> None:
    def weird(text: str, meta: UtteranceMeta) -> Any:
        return garbage

    m = Metrics()
    out = await chain_of(weird, metrics=m, on_error=policy).run("hi", meta())
    assert out.timings[0].outcome == "bad_type"
    if policy == "pass":
        assert out.text == "hi"
        assert dropped(m, "bad_type:weird", stage="transform_step") == 1
    else:
        assert out.dropped and out.dropped_by is not None and out.dropped_by.reason == "bad_type"
        assert dropped(m, "bad_type:weird") == 1


async def test_step_raising_timeouterror_is_an_error_not_a_timeout() -> None:
    async def raises(text: str, meta: UtteranceMeta) -> str:
        raise TimeoutError("upstream")

    out = await chain_of(raises, timeout_s=5).run("hi", meta())
    assert out.timings[0].outcome == "error" and out.text == "hi"


async def test_sync_callable_returning_coroutine_is_awaited() -> None:
    async def inner(text: str) -> str:
        return text + "!"

    out = await chain_of(lambda text, meta: inner(text)).run("hi", meta())
    assert out.text == "hi!"


async def test_cancellation_propagates() -> None:
    async def slow(text: str, meta: UtteranceMeta) -> str:
        await asyncio.sleep(5)
        return text

    task = asyncio.create_task(chain_of(slow, timeout_s=10).run("hi", meta()))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_aclose_closes_steps() -> None:
    closed: list[str] = []

    class A:
        def __call__(self, text: str, meta: UtteranceMeta) -> str:
            return text

        async def aclose(self) -> None:
            closed.append("a")

    class B:
        def __call__(self, text: str, meta: UtteranceMeta) -> str:
            return text

        def close(self) -> None:
            closed.append("b")

    async with chain_of(A(), B(), lambda t, m: t) as chain:
        assert (await chain.run("x", meta())).text == "x"
    assert closed == ["a", "b"]


# ------------------------------------------------------------------------------- build_chain
def settings(*steps: dict[str, Any]) -> TransformSettings:
    return TransformSettings(steps=[TransformStep(**s) for s in steps])


async def test_build_chain_default_config() -> None:
    chain = build_chain(Settings().transform, Metrics())
    assert chain.names == ["filler_words", "whitespace"]
    out = await chain.run("  So, um,  I think   we should go. ", meta())
    assert out.text == "So, I think we should go."


async def test_build_chain_options_timeouts_and_duplicate_names() -> None:
    chain = build_chain(settings(
        {"step": "regex_replace", "pattern": "gonna", "replacement": "going to"},
        {"step": "regex_replace", "pattern": "wanna", "replacement": "want to", "timeout_s": 0.5,
         "on_error": "drop"},
        {"step": "casing", "mode": "upper"},
    ))
    assert chain.names == ["regex_replace[0]", "regex_replace[1]", "casing"]
    assert (chain.steps[1].timeout_s, chain.steps[1].on_error) == (0.5, "drop")
    out = await chain.run("I'm gonna say what I wanna say", meta())
    assert out.text == "I'M GOING TO SAY WHAT I WANT TO SAY"


def test_unknown_step_names_the_key() -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "filler_words"}, {"step": "no_such_step"}))
    assert ei.value.key == "transform.steps[1].step"
    assert "no_such_step" in str(ei.value) and "filler_words" in str(ei.value)


def test_unimportable_dotted_path_names_the_key() -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "nonexistent_pkg.mod:fn"}))
    assert ei.value.key == "transform.steps[0].step"


def test_unknown_option_names_the_option() -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "filler_words", "wordz": ["um"]}))
    assert ei.value.key == "transform.steps[0].wordz"
    assert "words" in str(ei.value)  # lists what it accepts


def test_missing_required_option_names_it() -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "whitespace"}, {"step": "webhook"}))
    assert ei.value.key == "transform.steps[1].url"


def test_invalid_option_value_names_the_option() -> None:
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "blocklist", "words": ["x"], "mode": "explode"}))
    assert ei.value.key == "transform.steps[0].mode"
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "regex_replace", "pattern": "(unclosed"}))
    assert ei.value.key == "transform.steps[0].pattern"


def test_factory_errors_become_config_errors() -> None:
    def picky(level: int = 1) -> Any:
        if level > 3:
            raise ValueError("level must be <= 3")
        return lambda text, meta: text

    def opt_err(level: int = 1) -> Any:
        raise OptionError("level", "level is wrong")

    def not_callable() -> Any:
        return 42

    def wrong_arity() -> Any:
        return lambda text: text

    builtins: dict[str, Any] = {"picky": picky, "opt_err": opt_err, "not_callable": not_callable,
                                "wrong_arity": wrong_arity}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"step": "picky", "level": 9}, "transform.steps[0]", "level must be <= 3"),
        ({"step": "opt_err"}, "transform.steps[0].level", "level is wrong"),
        ({"step": "not_callable"}, "transform.steps[0]", "not a callable"),
        ({"step": "wrong_arity"}, "transform.steps[0]", "(text, meta)"),
    ]
    for step, key, words in cases:
        with pytest.raises(ConfigError) as ei:
            build_chain(settings(step), builtins=builtins)
        assert ei.value.key == key and words in str(ei.value)


def test_plain_step_detection_rule() -> None:
    def plain(text: str, meta: UtteranceMeta) -> str:
        return text

    async def plain_async(text: str, meta: UtteranceMeta, extra: int = 0) -> str:
        return text

    def factory(pattern: str = "x") -> Any:
        return plain

    class Cls:
        def __init__(self, a: int = 1) -> None: ...

        def __call__(self, text: str, meta: UtteranceMeta) -> str:
            return text

    assert is_plain_step(plain) and is_plain_step(plain_async) and is_plain_step(Cls())
    assert not is_plain_step(factory) and not is_plain_step(Cls) and not is_plain_step(42)
    builtins: dict[str, Any] = {"plain": plain, "factory": factory, "cls": Cls}
    chain = build_chain(settings({"step": "plain"}, {"step": "factory", "pattern": "y"},
                                 {"step": "cls", "a": 2}), builtins=builtins)
    assert chain.steps[0].fn is plain and chain.steps[1].fn is plain and isinstance(chain.steps[2].fn, Cls)
    # A plain step given options is called as a factory: its signature rejects them, naming the key.
    with pytest.raises(ConfigError) as ei:
        build_chain(settings({"step": "plain", "level": 1}), builtins=builtins)
    assert ei.value.key == "transform.steps[0].level"


def test_bad_step_in_yaml_config_names_the_key(tmp_path: Any) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("transform:\n  steps:\n    - step: filler_words\n"
                   "    - step: blocklist\n      mode: redact\n")
    s = load_settings(cfg, env={})
    with pytest.raises(ConfigError) as ei:
        build_chain(s.transform)
    assert ei.value.key == "transform.steps[1].words"


async def test_drop_label_matches_metric_reason() -> None:
    def veto(text: str, meta: UtteranceMeta) -> None:
        return None

    m = Metrics()
    out = await chain_of(veto, metrics=m).run("hi", meta())
    assert out.dropped_by is not None
    assert out.dropped_by.label == str(out.dropped_by) == "dropped_by:veto"
    assert dropped(m, out.dropped_by.label) == 1
