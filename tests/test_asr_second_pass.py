"""Nothing dropped by the decoder: speech the VAD handed over comes back as words, or is counted (issue 25).

Real audio, real VAD, real tiny.en: the Mary sentence of 1993-147149-0021 followed by another sentence in the
same utterance, under dcase noise at 0-5 dB (tiny.en decoded without timestamps skips that first sentence), the
shared noisy music mixes, silence-padded speech, and decodes an engine wrapper (tests/faults.py) makes return
nothing or only their last words.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asr_fixtures import shared_engine
from faults import (
    AsrFault,
    FaultyAsr,
    RecordingSink,
    check_invariants,
    make_track,
    real_engine,
    relay_settings,
    run_relay,
    word_recall,
    words,
)

from pipeline.asr.base import SyncAsrEngine
from pipeline.asr.coverage import LOW_COVERAGE, assess, letters
from pipeline.asr.scheduler import AsrScheduler
from pipeline.config import AsrBatchSettings, Settings
from pipeline.frames import SAMPLE_RATE, Pcm, Transcript, Utterance, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.source.file import decode_file
from pipeline.vad import make_vad_stage
from tests.conftest import SPEECH, reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import hard_audio

MARY = "clapclap/librispeech_dev_clean/1993-147149-0021.flac"  # "He remained upstairs ... showed Mary that ..."
SECOND = ("clapclap/librispeech_dev_clean/2428-83705-0024.flac", "clapclap/librispeech_dev_clean/2078-142845-0041.flac")
NOISES = ("dev_001", "dev_005", "dev_011")
PAUSE_S = 0.4  # between the two sentences: inside one utterance (vad.hangover_ms is longer)
MUSIC = sorted((SPEECH / "clapclap" / "noisy_music").glob("*.wav"))


def meta_of(u: Utterance) -> UtteranceMeta:
    spans = tuple(((a - u.start) / SAMPLE_RATE, (b - u.start) / SAMPLE_RATE) for a, b in u.spans())
    return UtteranceMeta(u.id, u.audio_start_s, u.audio_end_s, speech_spans=spans)


def utterances(audio: Pcm) -> list[Utterance]:
    return make_vad_stage(Settings()).segment(audio)


def decode(u: Utterance) -> Transcript:
    return shared_engine().transcribe_sync(u.audio, meta_of(u))


def two_sentences(second: str, noise: str, snr_db: float) -> tuple[Pcm, list[tuple[float, float, str]]]:
    """The Mary sentence, PAUSE_S, `second`, under `noise` at `snr_db` (hard_audio's mixing: the SNR on the speech's
    active region, 1 s of noise either side). Returns the audio and each sentence's (start_s, end_s, reference)."""
    mary, other = decode_file(SPEECH / MARY), decode_file(SPEECH / second)
    clean = np.concatenate([mary, np.zeros(int(PAUSE_S * SAMPLE_RATE), np.int16), other])
    bed = decode_file(SPEECH / "clapclap" / "dcase_noise" / f"{noise}.wav")
    item = hard_audio.speech_item("x", "x", clean, "", noise=bed, snr_db=snr_db)
    t0 = hard_audio.NOISE_MARGIN_S
    t1 = t0 + len(mary) / SAMPLE_RATE
    t2 = t1 + PAUSE_S
    return item.audio, [(t0, t1, reference(MARY)), (t2, t2 + len(other) / SAMPLE_RATE, reference(second))]


def reference_letters(u: Utterance, sentences: list[tuple[float, float, str]]) -> float:
    """The letters of the references that lie in the utterance's audio (each sentence's share by time)."""
    a, b = u.start / SAMPLE_RATE, u.end / SAMPLE_RATE
    return sum(letters(ref) * max(0.0, min(b, e) - max(a, s)) / (e - s) for s, e, ref in sentences)


@pytest.mark.parametrize("snr_db", [0.0, 5.0])
@pytest.mark.parametrize("second", SECOND)
@pytest.mark.parametrize("noise", NOISES)
def test_a_first_sentence_in_noise_is_echoed_or_counted(noise: str, second: str, snr_db: float) -> None:
    """Each utterance the gate keeps: a decode with fewer than half the letters of the references it holds (speech
    skipped, not only misheard) says how much speech it left out and why; and the Mary sentence comes back (some of
    its words: in this noise tiny.en mishears much of it) or its utterance is counted."""
    audio, sentences = two_sentences(second, noise, snr_db)
    mary_at = sentences[0][:2]
    mary_heard = False
    mary_counted = False
    for u in utterances(audio):
        tr = decode(u)
        holds_mary = u.start / SAMPLE_RATE < mary_at[1] and u.end / SAMPLE_RATE > mary_at[0]
        if tr.dropped_reason:  # the gate's verdict: the relay counts the utterance as dropped, with the reason
            mary_counted |= holds_mary
            continue
        counted = tr.extra["uncovered_s"] > 0
        if letters(tr.text) < 0.5 * reference_letters(u, sentences):
            assert counted and tr.extra["uncovered_why"], (u.id, tr.text, tr.extra)
        if holds_mary:
            mary_heard |= word_recall(sentences[0][2], tr.text) >= 0.2
            mary_counted |= counted
    held = any(u.start / SAMPLE_RATE < mary_at[1] and u.end / SAMPLE_RATE > mary_at[0] for u in utterances(audio))
    # (Not held: the VAD opened no utterance on it, at 0 dB under dev_005; the VAD's unheard count is
    # tests/test_vad_hearing.py's.)
    assert mary_heard or mary_counted or not held


@pytest.mark.parametrize("path", MUSIC, ids=lambda p: p.name[:6])
def test_the_noisy_music_mixes_are_echoed_or_counted(path: Path) -> None:
    """The shared speech-over-music mixes (the first 20 s: their speech and the start of the music alone). Under
    the music tiny.en mishears part of mix_01's sentence (as its offline decode does): words, not skipped speech."""
    audio = decode_file(path)[:20 * SAMPLE_RATE]
    ref = reference(f"clapclap/noisy_music/{path.name}")
    got: list[str] = []
    for u in utterances(audio):
        tr = decode(u)
        if tr.dropped_reason:
            continue
        cov = assess(tr.text, tr.language, meta_of(u).speech_spans)
        if cov.ratio < LOW_COVERAGE:
            assert tr.extra["uncovered_s"] > 0 and tr.extra["uncovered_why"], (u.id, tr.text, tr.extra)
        got.append(tr.text)
    assert word_recall(ref, " ".join(got)) >= 0.35, got


@pytest.mark.parametrize("clip", ["whisper.cpp/jfk.wav", "clapclap/librispeech_dev_clean/2086-149220-0000.flac"])
def test_silence_padded_speech_gets_no_phantom_text_and_no_second_pass(clip: str) -> None:
    """3 s of digital silence either side of clean speech: the same words, nothing added in the silence, and the
    coverage check finds nothing missing (the VAD's spans leave the silence out)."""
    pcm = decode_file(SPEECH / clip)
    pad = np.zeros(3 * SAMPLE_RATE, np.int16)
    padded = np.concatenate([pad, pcm, pad])
    ref = set(words(reference(clip)))
    for u in utterances(padded):
        tr = decode(u)
        assert tr.extra.get("uncovered_s", 0.0) == 0.0, (tr.text, tr.extra)
        assert "second_pass" not in tr.extra, tr.extra
        extra_words = [w for w in words(tr.text) if w not in ref]
        assert len(extra_words) <= max(2, len(words(tr.text)) // 5), (tr.text, extra_words)


async def test_the_counter_moves_when_a_decode_returns_nothing_or_only_its_last_words(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An engine wrapper makes u2's decode return nothing and u3's only its last quarter of words: both are counted
    as speech the decoder left out (ledger, /metrics, the event, the log line), u2 is also dropped as empty, u3
    is delivered with what it has; the other utterances are delivered and not counted."""
    caplog.set_level(logging.INFO)
    track = make_track(tmp_path / "track.wav", ["clapclap/librispeech_dev_clean/2086-149220-0000.flac",
                                                "clapclap/librispeech_dev_clean/2035-152373-0014.flac",
                                                "clapclap/librispeech_dev_clean/174-168635-0007.flac",
                                                "whisper.cpp/jfk.wav"], gap_s=2.5)
    metrics = Metrics()
    asr = FaultyAsr(real_engine(), {"u2": AsrFault("empty"), "u3": AsrFault("tail")}, metrics=metrics)
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}", endpoint__enabled=False)
    relay = await run_relay(settings, sink=sink, asr=asr, metrics=metrics)
    check_invariants(relay, sink.sent)
    ledger = relay.ledger
    assert ledger.uncovered == 2, ledger.as_dict()
    assert ledger.dropped.get("asr:empty") == 1, ledger.as_dict()
    assert 5.0 < ledger.uncovered_s < 20.0, ledger.as_dict()  # u2's ~6 s and ~3/4 of u3's ~8 s
    assert metrics.value("echo_relay_uncovered_speech_utterances_total") == 2
    assert relay.status()["ledger"]["uncovered"] == {"utterances": 2, "seconds": round(ledger.uncovered_s, 3)}
    assert "uncovered speech in u2" in caplog.text and "the decode returned no text" in caplog.text
    assert "uncovered speech in u3" in caplog.text and "letters expected" in caplog.text
    delivered = {o.utterance_id for o in sink.sent}
    assert "u3" in delivered and "u2" not in delivered and {"u1", "u4"} <= delivered


class RecordingRounds(SyncAsrEngine):
    """The session's tiny.en engine driven round by round by the shared scheduler (`serve`), remembering each
    round's requests as (utterance id, timestamps)."""

    name = "faster-whisper"

    def __init__(self) -> None:
        super().__init__(1)
        self.inner = shared_engine()
        self.rounds: list[list[tuple[str, bool]]] = []
        self._ids: dict[int, str] = {}

    def transcribe_sync(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        raise AssertionError("the scheduler drives a round engine round by round")

    def plan(self, audio: Pcm, meta: UtteranceMeta) -> Any:
        inner = self.inner.plan(audio, meta)
        request = next(inner)
        while True:
            self._ids[id(request)] = meta.utterance_id
            try:
                request = inner.send((yield request))
            except StopIteration as done:
                return done.value

    def decode_round(self, requests: list[Any]) -> list[Any]:
        self.rounds.append([(self._ids[id(r)], r.timestamps) for r in requests])
        return self.inner.decode_round(requests)


async def test_a_second_pass_is_further_rounds_that_other_relays_do_not_wait_for() -> None:
    """In `serve`, relay a's utterance needs a second pass (its 12 s of speech decode as two words); relay b's
    utterance, asked for while a's first round runs, is decoded in the next round, before a's second pass."""
    engine = RecordingRounds()
    scheduler = AsrScheduler(engine, AsrBatchSettings(gather_ms=0))
    a, b = scheduler.client("a"), scheduler.client("b")
    short = decode_file(SPEECH / "clapclap/librispeech_dev_clean/2078-142845-0041.flac")  # "illustration buns"
    long_audio = np.concatenate([short, np.zeros(10 * SAMPLE_RATE, np.int16)])
    claimed = UtteranceMeta("ua", 0.0, 12.7, speech_spans=((0.3, 12.6),))  # the VAD heard 12 s of speech
    jfk = decode_file(SPEECH / "whisper.cpp/jfk.wav")[:int(2.2 * SAMPLE_RATE)]
    first = asyncio.ensure_future(a.transcribe(long_audio, claimed))
    while not engine.rounds:
        await asyncio.sleep(0.005)
    second = asyncio.ensure_future(b.transcribe(jfk, UtteranceMeta("ub", 0.0, 2.2)))
    tr_a, tr_b = await asyncio.gather(first, second)
    await scheduler.close()
    order = [x for r in engine.rounds for x in r]
    assert order[:2] == [("ua", False), ("ub", False)], engine.rounds
    assert ("ua", True) in order[2:]  # the timestamped pass, after b's decode
    assert "second_pass" in tr_a.extra and tr_a.extra["uncovered_s"] > 5.0  # 10 s of "speech" it has no words for
    assert word_recall("and so my fellow americans", tr_b.text) >= 0.75
