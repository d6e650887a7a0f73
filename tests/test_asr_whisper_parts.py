"""The parts of pipeline/asr/whisper/ on their own: window sizes and padding (pure), the decode ladder driven with
hand-made decodes (no model), the degenerate-decode rules and the sentence-end softmax, and the prompt book on the
real tiny.en tokenizer. The whole engine on real speech is tests/test_asr_whisper.py."""

from __future__ import annotations

import numpy as np
import pytest
from asr_fixtures import shared_engine

from pipeline.asr.whisper.decoder import (
    TEMPERATURE_FALLBACK,
    WindowDecoder,
    degenerate_reason,
    timestamp_segments,
)
from pipeline.asr.whisper.plan import (
    PART_PAD_S,
    _coverage,
    doubtful,
    looks_like_silence,
    second_pass,
    utterance_plan,
    window_plan,
)
from pipeline.asr.whisper.prompts import CONTEXT_TOKENS
from pipeline.asr.whisper.window import (
    FULL_WINDOW_S,
    MIN_SAMPLES,
    MIN_WINDOW_S,
    SHORT_WINDOW_MAX_S,
    Decode,
    Request,
    Segment,
    pad_features,
    to_float,
    token_budget,
    window_s,
)
from pipeline.config import AsrSettings, GateSettings
from pipeline.frames import SAMPLE_RATE, UtteranceMeta


# ------------------------------------------------------------------------------------------ window.py
@pytest.mark.parametrize(("duration", "expected"), [(0.1, MIN_WINDOW_S), (8.9, MIN_WINDOW_S), (9.2, 11),
                                                    (11.0, 12), (14.5, 16), (40.0, FULL_WINDOW_S)])
def test_window_is_whole_seconds_between_the_floor_and_the_full_window(duration: float, expected: int) -> None:
    assert window_s(duration) == expected


def test_token_budget_grows_with_duration() -> None:
    assert token_budget(0.0) < token_budget(2.0) < token_budget(10.0)
    assert token_budget(10.0) >= 50  # read speech is 2-5 tokens/s: the budget never cuts real speech


def test_to_float_scales_int16_and_pads_short_audio() -> None:
    out = to_float(np.array([16384, -32768, 0], np.int16))
    assert out.dtype == np.float32 and len(out) == MIN_SAMPLES
    assert out[:3].tolist() == [0.5, -1.0, 0.0] and not out[3:].any()
    long = to_float(np.ones(MIN_SAMPLES * 3, np.float32) * 0.25)
    assert len(long) == MIN_SAMPLES * 3 and np.all(long == 0.25)


def test_pad_features_cuts_and_zero_pads_to_the_window() -> None:
    a, b = np.ones((80, 250), np.float32), np.full((80, 1500), 2.0, np.float32)
    batch = pad_features([a, b], 10)
    assert batch.shape == (2, 80, 1000)
    assert np.all(batch[0, :, :250] == 1) and not batch[0, :, 250:].any()
    assert np.all(batch[1] == 2)  # cut at the window


def test_requests_batch_by_window_temperature_and_context_length() -> None:
    f = np.zeros((80, 10), np.float32)
    assert Request(f, 10, 0.0, 20).key == Request(f, 10, 0.0, 99, language="de").key
    assert Request(f, 10, 0.0, 20).key != Request(f, 10, 0.0, 20, context=(1, 2)).key
    assert Request(f, 10, 0.0, 20).key != Request(f, 30, 0.0, 20).key
    assert Request(f, 30, 0.2, None).cost == 30.0


# ----------------------------------------------------------------------------------------- decoder.py
@pytest.mark.parametrize(("text", "kwargs", "expected"), [
    ("Ask not what your country can do for you.", {}, None),
    ("anything", {"truncated": True}, "token_budget"),
    ("a a a a a a a a a a a a a a a a a a a a a", {"compression": 3.0}, "compression_ratio"),
    (" ".join(["ask what you can do"] * 4), {}, "repeated_ngram"),
    ("Experience proves this. Experience proves this.", {}, "doubled_phrase"),
    ("Experience proves this. Experience proves this.", {"window_s": FULL_WINDOW_S}, None),
])
def test_degenerate_reasons(text: str, kwargs: dict[str, object], expected: str | None) -> None:
    args: dict[str, object] = {"truncated": False, "compression": 1.2, "window_s": 10, "max_compression_ratio": 2.4}
    args.update(kwargs)
    assert degenerate_reason(text, **args) == expected  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- plan.py
def _decode(text: str = "Fine.", *, degenerate: str | None = None, avg_logprob: float = -0.2,
            no_speech_prob: float = 0.05, window: float = 10.0) -> Decode:
    d = Decode(tokens=[1, 2], text=text, avg_logprob=avg_logprob, no_speech_prob=no_speech_prob,
               compression_ratio=1.0, temperature=0.0, window_s=window, truncated=False, encode_s=0.01,
               generate_s=0.02)
    if degenerate:
        d.extra["degenerate"] = degenerate
    return d


def _drive(plan: object, answers: list[Decode]) -> tuple[list[Request], Decode]:
    """Run a window plan, answering its requests in order; the requests it made and the decode it returned."""
    asked: list[Request] = []
    gen = plan  # a generator
    try:
        req = gen.send(None)  # type: ignore[attr-defined]
        for answer in answers:
            asked.append(req)
            req = gen.send(answer)  # type: ignore[attr-defined]
    except StopIteration as done:
        return asked, done.value
    raise AssertionError(f"the plan asked for more than {len(answers)} windows")


FEATS = np.zeros((80, 300), np.float32)


def test_a_clean_short_window_decode_is_the_only_one() -> None:
    asked, d = _drive(window_plan(FEATS, 3.0, AsrSettings()), [_decode()])
    assert [(r.window_s, r.temperature, r.budget) for r in asked] == [(MIN_WINDOW_S, 0.0, token_budget(3.0))]
    assert d.text == "Fine." and d.extra["attempts"] == 1


@pytest.mark.parametrize("first_stands", [True, False])
def test_the_second_pass_time_is_every_decode_it_took(first_stands: bool) -> None:
    """The decode that stands after the second pass carries the time of both decodes, whichever stands."""
    from types import SimpleNamespace

    meta = UtteranceMeta(utterance_id="u1", audio_start_s=0.0, audio_end_s=3.0)
    d = _decode("Fine, thank you very much." if first_stands else "Fine.")
    ts = _decode("Fine." if first_stands else "Fine, thank you very much.")
    ts.encode_s, ts.generate_s = 0.05, 0.07
    decoder = SimpleNamespace(settings=AsrSettings(), features=lambda audio: FEATS)
    plan = second_pass(d, _coverage(d, meta, 3.0), np.zeros(3 * SAMPLE_RATE, np.float32), FEATS, meta,
                       decoder, -20.0, ())  # type: ignore[arg-type]
    asked, (best, _) = _drive(plan, [ts])
    assert len(asked) == 1 and asked[0].timestamps
    assert best is (d if first_stands else ts)
    assert best.encode_s == pytest.approx(0.06) and best.generate_s == pytest.approx(0.09)


def test_a_looping_short_window_falls_back_to_the_full_window_then_to_sampling() -> None:
    loops = [_decode("x", degenerate="repeated_ngram", avg_logprob=lp) for lp in (-0.5, -0.4, -0.9, -0.3)]
    asked, d = _drive(window_plan(FEATS, 3.0, AsrSettings()), loops)
    assert [(r.window_s, r.temperature) for r in asked] == [
        (MIN_WINDOW_S, 0.0), (FULL_WINDOW_S, 0.0), *((FULL_WINDOW_S, t) for t in TEMPERATURE_FALLBACK)]
    assert d is loops[3] and d.extra["attempts"] == 4  # every try degenerate: the best log-probability wins
    assert d.encode_s == pytest.approx(0.04) and d.generate_s == pytest.approx(0.08)  # the time of every try


def test_a_loop_on_silence_gets_no_fallback() -> None:
    g = GateSettings()
    silence = _decode(". . . .", degenerate="repeated_ngram", no_speech_prob=0.9, avg_logprob=-1.2)
    assert looks_like_silence(silence, g)
    asked, d = _drive(window_plan(FEATS, 3.0, AsrSettings()), [silence])
    assert len(asked) == 1 and d is silence


def test_long_or_full_window_plans_start_at_the_full_window() -> None:
    asked, _ = _drive(window_plan(FEATS, SHORT_WINDOW_MAX_S + 1, AsrSettings()), [_decode()])
    assert asked[0].window_s == FULL_WINDOW_S and asked[0].budget == token_budget(SHORT_WINDOW_MAX_S + 1)
    asked, _ = _drive(window_plan(FEATS, 3.0, AsrSettings(), full_window=True, context=(5, 6)), [_decode()])
    assert asked[0].window_s == FULL_WINDOW_S and asked[0].context == (5, 6)
    asked, _ = _drive(window_plan(FEATS, 3.0, AsrSettings(short_window=False)), [_decode()])
    assert asked[0].window_s == FULL_WINDOW_S


def test_doubt_needs_a_high_no_speech_probability_or_a_low_log_probability() -> None:
    assert not doubtful(_decode())
    assert doubtful(_decode(no_speech_prob=0.5))
    assert doubtful(_decode(avg_logprob=-1.1))


# ----------------------------------------------------------------------------------------- prompts.py
def test_the_prompt_book_builds_prompts_and_context_from_the_real_tokenizer() -> None:
    prompts = shared_engine().decoder.prompts
    tok = prompts.tokenizer("en")
    plain = prompts.prompt("en")
    assert plain[0] == tok.sot and plain[-1] == tok.no_timestamps
    context = prompts.context_tokens("And so, my fellow Americans,", "en")
    assert tok.decode(list(context)).strip() == "And so, my fellow Americans,"
    with_context = prompts.prompt("en", context)
    assert with_context[0] == tok.sot_prev and with_context[1:1 + len(context)] == list(context)
    assert prompts.context_tokens("   ", "en") == ()
    long_text = " ".join(["word"] * 200)
    assert len(prompts.context_tokens(long_text, "en")) == CONTEXT_TOKENS  # only the last tokens
    assert prompts.suppressed("en") and tok.eot not in prompts.suppressed("en")
    # With timestamps: the same prompt without <|notimestamps|>, so Whisper writes segment times.
    timed = prompts.prompt("en", timestamps=True)
    assert tok.no_timestamps not in timed and timed == plain[:-1]
    assert tok.no_timestamps not in prompts.prompt("en", context, timestamps=True)


# ---------------------------------------------------------------------------------- timestamps, second pass
def test_timestamp_segments_are_read_from_the_tokens() -> None:
    tb = 50_000  # the first timestamp token; text tokens are below it
    texts = {1: "He", 2: " remained", 3: " And", 4: " I"}

    def dec(tokens: list[int]) -> str:
        return "".join(texts[t] for t in tokens)

    tokens = [tb + 0, 1, 2, tb + 100, tb + 100, 3, tb + 250, tb + 300, 4]  # the last segment is left open
    assert timestamp_segments(tokens, tb, 9.5, dec) == (
        Segment(0.0, 2.0, "He remained"), Segment(2.0, 5.0, "And"), Segment(6.0, 9.5, "I"))
    assert timestamp_segments([1, 2], tb, 9.5, dec) == ()  # no timestamps: no segments
    assert Request(FEATS, 10, 0.0, None).key != Request(FEATS, 10, 0.0, None, timestamps=True).key


def _timed(text: str, segments: list[tuple[float, float, str]], **kw: float) -> Decode:
    d = _decode(text, **kw)  # type: ignore[arg-type]
    d.segments = tuple(Segment(*s) for s in segments)
    return d


def test_a_decode_that_skips_the_first_sentence_gets_a_timestamped_pass_then_the_gap_alone() -> None:
    """12 s of speech decoded as one short sentence (a 13 s utterance): the plan decodes it again with timestamps;
    that decode covers only 6-12.4 s, so the speech before it is decoded alone, and its words go first."""
    engine = shared_engine()
    audio = (np.random.default_rng(0).standard_normal(13 * SAMPLE_RATE) * 300).astype(np.int16)
    meta = UtteranceMeta("u1", 0.0, 13.0, speech_spans=((0.3, 5.7), (6.1, 12.6)))
    second = "And I will see that there is no shirking about the boys or about the girls either."
    first = "He remained upstairs until after the early dawn showed Mary that she need have no fear."
    plan = utterance_plan(audio, meta, engine.decoder)
    asked: list[Request] = []
    answers = [_decode(second), _timed(second, [(6.0, 12.4, second)]), _decode(first)]
    req = plan.send(None)
    with pytest.raises(StopIteration) as done:
        for answer in answers:
            asked.append(req)
            req = plan.send(answer)
    tr = done.value.value
    assert [r.timestamps for r in asked] == [False, True, False]
    # The speech 0.3-5.5 s (the segment reaches 0.5 s before its start) with PART_PAD_S either side, alone.
    assert asked[2].features.shape[-1] == pytest.approx((5.5 + PART_PAD_S) * 100, abs=2)
    assert tr.text == f"{first} {second}"
    assert tr.extra["second_pass"] == ["timestamps", "part 0.0-5.8 s"]
    assert tr.extra["uncovered_s"] == 0.0 and "uncovered_why" not in tr.extra


def test_speech_no_pass_recovers_is_reported_with_its_seconds_and_reason() -> None:
    engine = shared_engine()
    audio = (np.random.default_rng(0).standard_normal(13 * SAMPLE_RATE) * 300).astype(np.int16)
    meta = UtteranceMeta("u1", 0.0, 13.0, speech_spans=((0.3, 12.6),))
    plan = utterance_plan(audio, meta, engine.decoder)
    req = plan.send(None)
    asked = [req]
    with pytest.raises(StopIteration) as done:
        for answer in [_decode("Either."), _decode("Either.")]:
            req = plan.send(answer)
            asked.append(req)
    tr = done.value.value
    assert [r.timestamps for r in asked[:2]] == [False, True]
    assert tr.text == "Either." and tr.extra["uncovered_s"] > 10.0
    assert "letters expected for 12.3 s of speech" in tr.extra["uncovered_why"]


def test_no_second_pass_when_off_or_for_interim_decodes() -> None:
    engine = shared_engine()
    off = WindowDecoder(engine.decoder.model, engine.decoder.prompts,
                        engine.settings.model_copy(update={"second_pass": False}), engine.decoder.fixed_language)
    audio = (np.random.default_rng(0).standard_normal(13 * SAMPLE_RATE) * 300).astype(np.int16)
    interim = UtteranceMeta("u1", 0.0, 13.0, speech_spans=((0.3, 12.6),), decode="interim")
    final = UtteranceMeta("u1", 0.0, 13.0, speech_spans=((0.3, 12.6),))
    for meta, decoder in ((interim, engine.decoder), (final, off)):
        plan = utterance_plan(audio, meta, decoder)
        plan.send(None)
        with pytest.raises(StopIteration) as done:
            plan.send(_decode("Either."))
        assert done.value.value.extra["uncovered_s"] > 10.0  # still counted, no pass tried
