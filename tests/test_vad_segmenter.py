"""Segmenter state machine on synthetic frame decisions (pure and fast).

The default signal is a ramp whose sample value encodes its stream position, so every utterance's
audio can be compared sample-for-sample with the slice of the stream it claims to cover.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import VadSettings
from pipeline.frames import Utterance
from pipeline.vad.segmenter import (
    TAIL_RISE,
    Discarded,
    Event,
    Segmenter,
    SegmenterParams,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    State,
    Unheard,
    UtteranceEnded,
)

F = 160  # 10 ms frames keep the arithmetic readable

PARAMS = SegmenterParams(
    frame_samples=F,
    threshold=0.5,
    pre_roll_samples=3 * F,
    start_samples=3 * F,
    hangover_samples=10 * F,
    min_utterance_samples=5 * F,
    max_utterance_samples=100 * F,
    split_search_samples=30 * F,
    speech_pad_samples=2 * F,
    speculative_samples=4 * F,
)


def ramp(n_frames: int) -> np.ndarray:
    """Sample i has value (i % 30000) - 15000: distinct and position-revealing."""
    return ((np.arange(n_frames * F) % 30000) - 15000).astype(np.int16)


def decisions(pattern: str) -> list[bool]:
    """'S' = speech frame, '.' = non-speech frame (spaces ignored)."""
    return [c == "S" for c in pattern.replace(" ", "")]


def feed(seg: Segmenter, speech: Sequence[bool], signal: np.ndarray | None = None,
         first: int = 0) -> list[Event]:
    """Push frames `first..first+len(speech)` of `signal` (a ramp by default)."""
    if signal is None:
        signal = ramp(first + len(speech))
    events: list[Event] = []
    for k, s in enumerate(speech):
        i = first + k
        events += seg.push(signal[i * F:(i + 1) * F], i * F, 1.0 if s else 0.0)
    return events


def ended(events: Sequence[Event]) -> list[Utterance]:
    return [e.utterance for e in events if isinstance(e, UtteranceEnded)]


def of(events: Sequence[Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def assert_audio_matches(u: Utterance, signal: np.ndarray) -> None:
    assert u.start <= u.speech_start <= u.speech_end <= u.end
    np.testing.assert_array_equal(u.audio, signal[u.start:u.end])


# ------------------------------------------------------------------------------------- start
def test_first_word_survives_with_pre_roll() -> None:
    pattern = "." * 20 + "S" * 10 + "." * 12
    signal = ramp(len(pattern))
    events = feed(Segmenter(PARAMS), decisions(pattern), signal)
    [started] = of(events, SpeechStarted)
    [u] = ended(events)
    assert started == SpeechStarted("u1", 20 * F, None)
    assert u.speech_start == 20 * F  # onset of the first speech frame, not the detection point
    assert u.start == 20 * F - PARAMS.pre_roll_samples
    assert u.speech_end == 30 * F
    assert u.end == 30 * F + PARAMS.speech_pad_samples
    assert_audio_matches(u, signal)


def test_pre_roll_is_clamped_to_the_stream_start() -> None:
    pattern = "." + "S" * 10 + "." * 12
    signal = ramp(len(pattern))
    [u] = ended(feed(Segmenter(PARAMS), decisions(pattern), signal))
    assert (u.start, u.speech_start) == (0, F)
    assert_audio_matches(u, signal)


def test_start_needs_start_ms_of_speech_and_tolerates_one_gap() -> None:
    seg = Segmenter(PARAMS)
    events = feed(seg, decisions("....SS"))
    assert seg.state is State.STARTING and not events
    events = feed(seg, decisions("."), first=6)  # one gap is tolerated
    assert seg.state is State.STARTING
    events = feed(seg, decisions("S"), first=7)  # third speech frame opens, onset = first frame of the run
    assert events == [SpeechStarted("u1", 4 * F)]
    assert seg.state is State.SPEAKING


def test_two_gaps_in_a_row_abandon_the_start_run() -> None:
    seg = Segmenter(PARAMS)
    events = feed(seg, decisions("..SS..SSS"))
    assert events == [SpeechStarted("u1", 6 * F)]  # the second run, not the abandoned one


def test_isolated_blips_never_open() -> None:
    seg = Segmenter(PARAMS)
    events = feed(seg, decisions("S..S..SS..S.." * 10))
    assert seg.state is State.QUIET
    # Never an utterance, but not silently gone either: one unheard run (gaps of two frames are bridged).
    assert events + seg.flush() == [Unheard(0, 128 * F, 50 * F, 1.0)]


def feed_probs(seg: Segmenter, probs: Sequence[float]) -> list[Event]:
    events: list[Event] = []
    for i, p in enumerate(probs):
        events += seg.push(ramp(1), i * F, p)
    return events


def test_weak_speech_that_never_opens_is_unheard() -> None:
    """Probabilities between unheard_threshold (0.35) and the threshold (0.5): counted, with its extent."""
    seg = Segmenter(PARAMS)
    events = feed_probs(seg, [0.0] * 5 + [0.4] * 20 + [0.1] * 10)
    assert events == [Unheard(5 * F, 25 * F, 20 * F, 0.4)]
    # Shorter than unheard_min_samples (150 ms = 15 frames here): not counted.
    assert feed_probs(Segmenter(PARAMS), [0.4] * 10 + [0.0] * 10) == []


def test_weak_run_that_opens_an_utterance_is_not_unheard() -> None:
    seg = Segmenter(PARAMS)
    events = feed_probs(seg, [0.4] * 20 + [0.9] * 10 + [0.0] * 30)
    assert not of(events, Unheard)
    assert [type(e) for e in events if not isinstance(e, SpeechPaused)] == [SpeechStarted, UtteranceEnded]


# ---------------------------------------------------------------------------------- hangover
def test_hangover_boundary_is_exact() -> None:
    hang = PARAMS.hangover_samples // F
    seg = Segmenter(PARAMS)
    signal = ramp(10 + hang)
    events = feed(seg, decisions("S" * 10 + "." * (hang - 1)), signal)
    assert not ended(events)
    assert seg.state is State.PAUSING and seg.utterance_id == "u1"
    assert seg.silence_samples == (hang - 1) * F
    events = feed(seg, [False], signal, first=10 + hang - 1)
    [u] = ended(events)
    assert u.reason == "silence"
    assert seg.state is State.QUIET and seg.utterance_id is None
    # the utterance keeps speech_pad of the silence, not the whole hangover
    assert u.speech_end == 10 * F
    assert u.end == u.speech_end + PARAMS.speech_pad_samples
    assert_audio_matches(u, signal)


def test_speech_inside_hangover_keeps_one_utterance() -> None:
    hang = PARAMS.hangover_samples // F
    pattern = "S" * 10 + "." * (hang - 1) + "S" * 10 + "." * hang
    signal = ramp(len(pattern))
    [u] = ended(feed(Segmenter(PARAMS), decisions(pattern), signal))
    assert (u.speech_start, u.speech_end) == (0, (10 + hang - 1 + 10) * F)
    assert_audio_matches(u, signal)


# ---------------------------------------------------------------------------------- speculative
def test_speech_paused_once_then_resumed() -> None:
    spec = PARAMS.speculative_samples // F  # type: ignore[operator]
    pattern = "S" * 10 + "." * (spec + 3) + "S" * 8 + "." * spec
    signal = ramp(len(pattern))
    seg = Segmenter(PARAMS)
    events = feed(seg, decisions(pattern), signal)
    paused = of(events, SpeechPaused)
    resumed = of(events, SpeechResumed)
    assert [p.pos for p in paused] == [10 * F, (10 + spec + 3 + 8) * F]  # once per pause
    assert resumed == [SpeechResumed("u1", (10 + spec + 3) * F)]
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStarted", "SpeechPaused", "SpeechResumed", "SpeechPaused"]
    snap = paused[0].snapshot
    assert snap.id == "u1" and snap.speech_end == 10 * F
    assert snap.end == 10 * F + min(PARAMS.speech_pad_samples, spec * F)
    assert_audio_matches(snap, signal)
    # the final utterance keeps the same id and the speech_end of the last pause
    [u] = ended(feed(seg, [False] * 10, ramp(len(pattern) + 10), first=len(pattern)))
    assert u.id == "u1" and u.speech_end == paused[1].pos


def test_speech_paused_not_emitted_for_too_short_speech() -> None:
    seg = Segmenter(PARAMS)
    events = feed(seg, decisions("SSS" + "." * 8))
    assert not of(events, SpeechPaused)


def test_speculative_disabled() -> None:
    params = dataclasses.replace(PARAMS, speculative_samples=None)
    events = feed(Segmenter(params), decisions("S" * 10 + "." * 20))
    assert not of(events, SpeechPaused) and len(ended(events)) == 1


# ------------------------------------------------------------------------------------ end_now
def test_end_now_in_a_pause_ends_at_the_last_speech_frame() -> None:
    pattern = "." * 5 + "S" * 10 + "." * 5
    signal = ramp(60)
    seg = Segmenter(PARAMS)
    feed(seg, decisions(pattern), signal)
    u = seg.end_now()
    assert u is not None
    assert (u.id, u.reason, u.speech_start, u.speech_end) == ("u1", "sentence_end", 5 * F, 15 * F)
    assert u.end == 15 * F + PARAMS.speech_pad_samples
    assert_audio_matches(u, signal)
    assert seg.state is State.QUIET and seg.end_now() is None
    # the rest of the silence does not produce another event, and new speech is a new utterance
    events = feed(seg, decisions("." * 3 + "S" * 10 + "." * 10), signal, first=len(pattern))
    [u2] = ended(events)
    assert u2.id == "u2" and u2.start >= u.end
    assert_audio_matches(u2, signal)


def test_end_now_while_speaking_and_when_nothing_is_open() -> None:
    seg = Segmenter(PARAMS)
    assert seg.end_now() is None
    feed(seg, decisions("SS"))
    assert seg.end_now() is None  # still STARTING: nothing is open
    feed(seg, decisions("SSSS"), first=2)
    u = seg.end_now("silence")
    assert u is not None and u.reason == "silence"
    assert u.speech_end == u.end == 6 * F  # no silence seen yet, so no pad


# -------------------------------------------------------------------------------- min length
def test_too_short_utterances_are_discarded_and_reported() -> None:
    seg = Segmenter(PARAMS)
    hang = PARAMS.hangover_samples // F
    pattern = "SSSS" + "." * hang + "S" * 10 + "." * hang
    events = feed(seg, decisions(pattern))
    discarded = of(events, Discarded)
    assert discarded == [Discarded("u1", "too_short", 0, 4 * F)]
    [u] = ended(events)
    assert u.id == "u2"  # ids are never reused


# -------------------------------------------------------------------------------- max length
def _loud_signal(n_frames: int, quiet: dict[int, int], loud: int = 8000) -> np.ndarray:
    """A square wave of amplitude `loud`, with frames listed in `quiet` at their own amplitude."""
    amp = np.full(n_frames, loud)
    for i, a in quiet.items():
        amp[i] = a
    sign = np.where(np.arange(F) % 2 == 0, 1, -1)
    return (amp[:, None] * sign[None, :]).reshape(-1).astype(np.int16)


def test_max_length_splits_at_the_quietest_frame_and_continues() -> None:
    max_frames = PARAMS.max_utterance_samples // F  # 100
    quiet_frame = 85  # inside the last 30 frames when the limit is reached at frame 99
    n = 130
    signal = _loud_signal(n, {quiet_frame: 50, 60: 10})  # frame 60 is quieter but outside the window
    seg = Segmenter(PARAMS)
    events = feed(seg, [True] * n, signal)
    cut = quiet_frame * F + F // 2  # the middle of the quietest frame
    first = ended(events)[0]
    assert (first.id, first.reason, first.speech_start, first.speech_end, first.end) == \
        ("u1", "max_length", 0, cut, cut)
    assert_audio_matches(first, signal)
    starts = of(events, SpeechStarted)
    assert starts[1] == SpeechStarted("u2", cut, continues="u1")
    # the split happened when the utterance reached max length
    split_at = next(i for i, e in enumerate(events) if isinstance(e, UtteranceEnded))
    assert of(events[:split_at], SpeechStarted) == [starts[0]]
    assert seg.state is State.SPEAKING and seg.utterance_id == "u2"
    assert max_frames == 100
    [tail] = ended(seg.flush())
    assert (tail.id, tail.start, tail.speech_start, tail.reason) == ("u2", cut, cut, "end_of_stream")
    assert_audio_matches(tail, signal)
    assert first.end == tail.start  # nothing lost, nothing duplicated


def test_split_prefers_a_non_speech_frame() -> None:
    n = 101
    signal = _loud_signal(n, {80: 100, 90: 3000})
    speech = [True] * n
    speech[90] = False  # louder than frame 80, but not speech
    events = feed(Segmenter(PARAMS), speech, signal)
    first = ended(events)[0]
    assert first.speech_end == 90 * F  # the last speech frame before the cut
    assert first.end == 90 * F + F // 2
    assert of(events, SpeechStarted)[1].pos == 91 * F  # the continuation starts at the next speech frame


def test_split_lands_in_the_middle_of_a_pause() -> None:
    # a 9-frame pause (shorter than the 10-frame hangover) of digital silence inside the window
    speech = [True] * 80 + [False] * 9 + [True] * 11
    signal = _loud_signal(100, {i: 0 for i in range(80, 89)})
    seg = Segmenter(PARAMS)
    events = feed(seg, speech, signal)
    [first] = ended(events)
    assert (first.speech_end, first.end) == (80 * F, 80 * F + PARAMS.speech_pad_samples)
    assert of(events, SpeechStarted)[1] == SpeechStarted("u2", 89 * F, continues="u1")
    # equally quiet frames: the cut is in the middle of the run (frame 84), and the continuation's
    # audio starts pre_roll before its speech (after the cut)
    [tail] = ended(seg.flush())
    cut = 84 * F + F // 2
    assert tail.start == max(cut, 89 * F - PARAMS.pre_roll_samples) == 86 * F
    assert_audio_matches(tail, signal)


def test_split_inside_a_trailing_pause_closes_without_continuation() -> None:
    # speech up to frame 95, then silence: at frame 99 the limit is reached inside the pause
    speech = [True] * 96 + [False] * 4
    signal = _loud_signal(100, {96: 0, 97: 0, 98: 0, 99: 0})
    seg = Segmenter(PARAMS)
    events = feed(seg, speech, signal)
    [u] = ended(events)
    assert u.reason == "max_length" and u.speech_end == 96 * F
    assert u.end == 96 * F + PARAMS.speech_pad_samples
    assert len(of(events, SpeechStarted)) == 1
    assert seg.state is State.QUIET
    assert ended(seg.flush()) == []


def test_long_speech_is_split_repeatedly_and_stays_bounded() -> None:
    n = 1000
    signal = _loud_signal(n, {i: 100 for i in range(0, n, 37)})
    seg = Segmenter(PARAMS)
    peak = 0
    events: list[Event] = []
    for i in range(n):
        events += seg.push(signal[i * F:(i + 1) * F], i * F, 1.0)
        peak = max(peak, seg.buffered_samples)
    events += seg.flush()
    utts = ended(events)
    assert len(utts) >= n // 100
    assert all(u.speech_end - u.speech_start <= PARAMS.max_utterance_samples for u in utts)
    assert all(a.end == b.start for a, b in itertools.pairwise(utts))
    assert peak <= PARAMS.pre_roll_samples + PARAMS.max_utterance_samples + 2 * F
    for u in utts:
        assert_audio_matches(u, signal)


# ----------------------------------------------------------------------------------- flush
def test_flush_closes_an_open_utterance_at_end_of_stream() -> None:
    signal = ramp(20)
    seg = Segmenter(PARAMS)
    feed(seg, decisions("..." + "S" * 10 + "..."), signal)
    [u] = ended(seg.flush())
    assert u.reason == "end_of_stream" and u.speech_end == 13 * F and u.end == 15 * F
    assert_audio_matches(u, signal)
    assert seg.state is State.QUIET and seg.position is None and seg.buffered_samples == 0


def test_flush_discards_short_speech_and_ignores_a_start_run() -> None:
    seg = Segmenter(PARAMS)
    feed(seg, decisions("SSS"))
    assert seg.flush() == [Discarded("u1", "too_short", 0, 3 * F)]
    feed(seg, decisions("SS"))  # a new stream may start anywhere after flush
    assert seg.flush() == []


# ------------------------------------------------------------------------- positions, input
def test_runs_are_deterministic() -> None:
    rng = np.random.default_rng(7)
    speech = list(rng.random(3000) < 0.6)
    signal = ramp(3000)

    def run() -> list[tuple[object, ...]]:
        seg = Segmenter(PARAMS)
        events = feed(seg, speech, signal) + seg.flush()
        out: list[tuple[object, ...]] = []
        for e in events:
            if isinstance(e, UtteranceEnded | SpeechPaused):
                u = e.utterance if isinstance(e, UtteranceEnded) else e.snapshot
                out.append((type(e).__name__, u.id, u.start, u.speech_start, u.speech_end, u.end, u.reason))
            else:
                out.append((e,))
        return out

    first = run()
    assert first == run()
    ids = [str(t[1]) for t in first if t[0] == "UtteranceEnded"]
    assert ids == sorted(ids, key=lambda s: int(s[1:]))


def test_small_gap_counts_as_silence_and_long_gap_starts_afresh() -> None:
    seg = Segmenter(PARAMS)
    signal = ramp(200)
    feed(seg, [True] * 10, signal)
    # 3 frames missing: silence inside the utterance (zeros in its audio), speech goes on
    events = feed(seg, [True] * 10, signal, first=13)
    assert not ended(events) and seg.utterance_id == "u1"
    events = feed(seg, [False] * 20, signal, first=23)
    [u] = ended(events)
    assert (u.speech_start, u.speech_end) == (0, 23 * F)
    np.testing.assert_array_equal(u.audio[10 * F:13 * F], 0)
    np.testing.assert_array_equal(u.audio[13 * F:23 * F], signal[13 * F:23 * F])
    # a gap far longer than the hangover closes what is open
    feed(seg, [True] * 10, signal, first=50)
    events = seg.push(signal[150 * F:151 * F], 150 * F, 1.0)
    [u2] = ended(events)
    assert u2.id == "u2" and u2.speech_end == 60 * F
    assert seg.state is State.STARTING


def test_bad_input_is_rejected() -> None:
    seg = Segmenter(PARAMS)
    with pytest.raises(ValueError, match="160"):
        seg.push(np.zeros(100, dtype=np.int16), 0, 1.0)
    with pytest.raises(ValueError, match="int16"):
        seg.push(np.zeros(F, dtype=np.float32), 0, 1.0)
    seg.push(np.zeros(F, dtype=np.int16), F * 5, 0.0)
    with pytest.raises(ValueError, match="goes back"):
        seg.push(np.zeros(F, dtype=np.int16), 0, 0.0)
    with pytest.raises(ValueError, match="hangover"):
        SegmenterParams(frame_samples=F, hangover_samples=0)


def test_frames_are_copied() -> None:
    seg = Segmenter(PARAMS)
    buf = np.full(F, 1000, dtype=np.int16)
    for i in range(10):
        seg.push(buf, i * F, 1.0)
        buf[:] = -1  # a capture callback reusing its buffer must not corrupt the utterance
        buf[:] = 1000
    [u] = ended(seg.flush())
    assert (u.audio == 1000).all()


def test_params_from_settings() -> None:
    s = VadSettings(pre_roll_ms=300, start_ms=90, hangover_ms=700, min_utterance_ms=200,
                    max_utterance_s=12.5, split_search_s=2.0, speech_pad_ms=150, threshold=0.6)
    p = SegmenterParams.from_settings(s, 512, speculative_ms=200)
    assert p == SegmenterParams(frame_samples=512, threshold=0.6, pre_roll_samples=4800, start_samples=1440,
                                hangover_samples=11200, min_utterance_samples=3200,
                                max_utterance_samples=200000, split_search_samples=32000,
                                speech_pad_samples=2400, speculative_samples=3200, neg_threshold=0.6 - 0.15)
    assert p.start_frames == 3
    p2 = SegmenterParams.from_settings(s, 480, threshold=0.5, speculative_ms=None)
    assert p2.threshold == 0.5 and p2.speculative_samples is None


# ------------------------------------------------------------------------------- properties
@settings(max_examples=200, deadline=None)
@given(
    runs=st.lists(st.tuples(st.booleans(), st.integers(1, 40)), min_size=1, max_size=40),
    pre_roll=st.integers(0, 6),
    start=st.integers(0, 5),
    hangover=st.integers(1, 15),
    pad=st.integers(0, 2000),  # samples: utterance ends fall inside frames
    max_frames=st.integers(8, 60),
    search=st.integers(1, 30),
    end_now_at=st.sets(st.integers(0, 800), max_size=3),
)
def test_utterances_are_ordered_disjoint_and_cover_their_speech(
        runs: list[tuple[bool, int]], pre_roll: int, start: int, hangover: int, pad: int,
        max_frames: int, search: int, end_now_at: set[int]) -> None:
    params = SegmenterParams(
        frame_samples=F, pre_roll_samples=pre_roll * F, start_samples=start * F,
        hangover_samples=hangover * F, min_utterance_samples=0, max_utterance_samples=max_frames * F,
        split_search_samples=search * F, speech_pad_samples=pad, speculative_samples=2 * F)
    speech = [s for s, n in runs for _ in range(n)]
    signal = ramp(len(speech))
    seg = Segmenter(params)
    utts: list[Utterance] = []
    open_ids: list[str] = []
    peak = 0
    for i, s in enumerate(speech):
        for e in seg.push(signal[i * F:(i + 1) * F], i * F, 1.0 if s else 0.0):
            if isinstance(e, SpeechStarted):
                open_ids.append(e.utterance_id)
            elif isinstance(e, UtteranceEnded):
                utts.append(e.utterance)
            elif isinstance(e, SpeechPaused | SpeechResumed):
                assert e.utterance_id == open_ids[-1]
        peak = max(peak, seg.buffered_samples)
        if i in end_now_at:
            u = seg.end_now()
            if u is not None:
                utts.append(u)
    utts += ended(seg.flush())

    assert peak <= params.pre_roll_samples + params.max_utterance_samples + 2 * F
    assert [u.id for u in utts] == open_ids  # every opened utterance ends exactly once, in order
    for a, b in itertools.pairwise(utts):
        assert a.end <= b.start  # in order, audio never shared
    for u in utts:
        assert_audio_matches(u, signal)
        assert u.speech_end - u.speech_start <= params.max_utterance_samples
    # every frame of a speech run long enough to open lies inside some utterance's speech span
    need = params.start_frames
    pos = 0
    for is_speech, n in runs:
        if is_speech and n >= need:
            for i in range(pos, pos + n):
                frame_start = i * F
                if any(i == k + 1 for k in end_now_at) or any(k < i <= k + need for k in end_now_at):
                    continue  # right after end_now a new start run is needed
                assert any(u.speech_start <= frame_start < u.speech_end for u in utts), (frame_start, utts)
        pos += n


# -------------------------------------------------------------------------------- hysteresis
def test_speech_continues_down_to_neg_threshold() -> None:
    """Silero's hysteresis: 0.5 starts speech, frames down to 0.35 keep it going (not a pause) once
    they rise again after a dip (0.45 after 0.38)."""
    seg = Segmenter(PARAMS)
    events = feed_probs(seg, [0.9] * 10 + [0.45, 0.38] + [0.45] * 10 + [0.9] * 5 + [0.0] * 12)
    assert [type(e) for e in events] == [SpeechStarted, SpeechPaused, UtteranceEnded]
    (ended,) = of(events, UtteranceEnded)
    assert ended.utterance.speech_end == 27 * F  # the 0.45 frames were speech: no pause, no resume
    # The same frames at 0.3 are a pause that the hangover (10 frames) ends.
    events = feed_probs(Segmenter(PARAMS), [0.9] * 10 + [0.3] * 12 + [0.9] * 5 + [0.0] * 12)
    assert [e.utterance.speech_end for e in of(events, UtteranceEnded)] == [10 * F, 27 * F]


def test_falling_tail_after_clear_speech_is_silence() -> None:
    """Silero's probability decays over a few frames after the last word (0.53, 0.47, 0.45, 0.45, 0.32
    at the end of 2902-9006-0017): those frames end the utterance where the speech frames end, so the
    echo is not delayed by the tail. A tail that rises by TAIL_RISE is speech again."""
    tail = [0.48, 0.45, 0.452, 0.44, 0.4]
    (ended,) = of(feed_probs(Segmenter(PARAMS), [0.9] * 10 + tail + [0.0] * 12), UtteranceEnded)
    assert ended.utterance.speech_end == 10 * F
    rising = [0.48, 0.40, 0.40 + TAIL_RISE, 0.47]
    (ended,) = of(feed_probs(Segmenter(PARAMS), [0.9] * 10 + rising + [0.0] * 12), UtteranceEnded)
    assert ended.utterance.speech_end == 14 * F
    # Without clear speech before it (a whisper peaking at 0.6) a falling run keeps the utterance going.
    (ended,) = of(feed_probs(Segmenter(PARAMS), [0.6] * 10 + tail + [0.0] * 12), UtteranceEnded)
    assert ended.utterance.speech_end == 15 * F


def test_neg_threshold_frames_alone_open_only_after_weak_start() -> None:
    """No frame reaches the threshold: the run must last weak_start_samples (here 6 frames)."""
    params = dataclasses.replace(PARAMS, weak_start_samples=6 * F)
    assert of(feed_probs(Segmenter(params), [0.4] * 5 + [0.0] * 20), SpeechStarted) == []
    events = feed_probs(Segmenter(params), [0.4] * 6 + [0.0] * 20)
    assert of(events, SpeechStarted) == [SpeechStarted("u1", 0)]
    # With one frame at the threshold the usual start_samples (3 frames) is enough.
    events = feed_probs(Segmenter(params), [0.4, 0.6, 0.4] + [0.0] * 20)
    assert of(events, SpeechStarted) == [SpeechStarted("u1", 0)]


def level(dbfs: float) -> np.ndarray:
    """One frame of a full-band signal at `dbfs` (alternating +-a: RMS = a)."""
    a = 32768.0 * 10 ** (dbfs / 20)
    return np.rint(np.resize([a, -a], F)).astype(np.int16)


def test_weak_probability_continues_speech_only_well_above_the_noise_floor() -> None:
    """A whisper: Silero gives it 0.2 while it stands 30 dB over the room. The same 0.2 on frames at the
    room's level (steady noise) is not speech, and neither after speech Silero was sure of (0.9: an
    applause after a clear sentence)."""
    def run(weak_dbfs: float, onset_prob: float = 0.6) -> list[Event]:
        seg = Segmenter(PARAMS)
        frames = [(level(-70), 0.0)] * 20 + [(level(-40), onset_prob)] * 5 + [(level(weak_dbfs), 0.2)] * 15 \
            + [(level(-70), 0.0)] * 15
        events: list[Event] = []
        for i, (samples, p) in enumerate(frames):
            events += seg.push(samples, i * F, p)
        return events

    (loud,) = of(run(-40), UtteranceEnded)
    assert loud.utterance.speech_end == 40 * F  # through the weak frames
    (quiet,) = of(run(-68), UtteranceEnded)
    assert quiet.utterance.speech_end == 25 * F  # ended at the last frame over neg_threshold
    (clear,) = of(run(-40, onset_prob=0.9), UtteranceEnded)
    assert clear.utterance.speech_end == 25 * F


# ------------------------------------------------------------------------------------- speech spans
def test_speech_spans_split_at_pauses_of_span_gap_ms_and_bridge_shorter_ones() -> None:
    """An utterance carries its runs of speech (for the ASR's coverage check, pipeline/asr/coverage.py): a pause of
    SPAN_GAP_MS (250 ms) or more separates two spans, a shorter one (between words) does not."""
    from pipeline.frames import SPAN_GAP_MS, ms_to_samples

    gap = ms_to_samples(SPAN_GAP_MS) // F
    params = dataclasses.replace(PARAMS, hangover_samples=(gap + 20) * F, speculative_samples=None,
                                 max_utterance_samples=300 * F)
    pattern = "." * 5 + "S" * 20 + "." * gap + "S" * 20 + "." * (gap - 1) + "S" * 20 + "." * (gap + 21)
    [u] = ended(feed(Segmenter(params), decisions(pattern)))
    assert u.spans() == ((5 * F, 25 * F), ((25 + gap) * F, (65 + 2 * gap - 1) * F))
    assert u.spans()[0][0] == u.speech_start and u.spans()[-1][1] == u.speech_end


def test_a_max_length_split_gives_each_part_its_own_spans() -> None:
    params = dataclasses.replace(PARAMS, hangover_samples=40 * F)
    pattern = "S" * 60 + "." * 30 + "S" * 60 + "." * 60  # reaches max_utterance_samples (100 frames) in the second run
    us = ended(feed(Segmenter(params), decisions(pattern)))
    assert len(us) == 2
    for u in us:
        assert u.spans()[0][0] == u.speech_start and u.spans()[-1][1] == u.speech_end
        assert all(b > a for a, b in u.spans())
    assert us[0].spans() == ((0, 60 * F),)


def test_cropping_after_a_committed_beginning_keeps_the_spans_after_it() -> None:
    from pipeline.frames import Transcript
    from pipeline.speculation import Prefix, crop

    u = Utterance("u1", np.zeros(100 * F, np.int16), 0, 5 * F, 95 * F,
                  speech_spans=((5 * F, 40 * F), (60 * F, 95 * F)))
    rest = crop(u, Prefix("u1", 50 * F, Transcript("a")))
    assert rest.spans() == ((60 * F, 95 * F),)
    rest = crop(u, Prefix("u1", 30 * F, Transcript("a")))
    assert rest.spans() == ((30 * F, 40 * F), (60 * F, 95 * F))
