"""The relay's adaptive endpointing on real speech, with the stream in lockstep with Whisper.

A speculative decode only ends an utterance early if its result arrives while the pause lasts, so a
real-time replay splits a monologue at its pauses or not depending on how busy the CPU is. Here the
source waits for every decode (and what the relay does with its result) before it hands over the next
block: as if Whisper took no time. The outcome then depends only on the audio, the model and the
endpoint policy, and a test can assert it exactly. (Latency in real time is `scripts/bench.py`'s job.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from faults import FaultyAsr, RecordingSink, check_invariants, real_engine, relay_settings, run_relay

from pipeline.asr.base import AsrEngine
from pipeline.dsp import envelope_db, wav_bytes, window_center
from pipeline.frames import SAMPLE_RATE, AudioFrame, Pcm, Transcript, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.source.base import Source
from pipeline.source.file import FileSource, decode_file
from tests.conftest import clip, normalize, reference, wer

MONOLOGUE = "mfa/acoustic_corpus.wav"  # 26.7 s read fast, with pauses of 0.4-1.5 s between sentences
SETTLE_STEPS = 5  # loop turns for a finished decode's callbacks (speculation bookkeeping, early finish)


class CountingAsr(AsrEngine):
    """Delegates to `inner`, knows when no decode is in flight, and remembers what it was asked:
    (utterance id, decode kind, seconds of audio, context)."""

    def __init__(self, inner: AsrEngine) -> None:
        self.inner = inner
        self.name = inner.name
        self.model_name = inner.model_name
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.asked: list[tuple[str, str, float, str]] = []

    async def load(self) -> None:
        await self.inner.load()

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        self.asked.append((meta.utterance_id, meta.decode, len(audio) / SAMPLE_RATE, meta.context))
        self.in_flight += 1
        self.idle.clear()
        try:
            return await self.inner.transcribe(audio, meta)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    async def close(self) -> None:
        await self.inner.close()


class LockstepSource(Source):
    """A file source that hands over the next block only once the ASR is idle."""

    name = "lockstep"

    def __init__(self, inner: Source, asr: CountingAsr) -> None:
        self.inner = inner
        self.asr = asr

    async def frames(self) -> AsyncIterator[AudioFrame]:
        async for frame in self.inner.frames():
            await asyncio.sleep(0)  # a decode the relay just asked for starts here
            await self.asr.idle.wait()
            for _ in range(SETTLE_STEPS):
                await asyncio.sleep(0)
            yield frame

    def now_s(self) -> float:
        return self.inner.now_s()

    async def close(self) -> None:
        await self.inner.close()


async def test_monologue_is_ended_at_its_sentence_pauses_not_only_after_the_hangover() -> None:
    """Whisper's speculative transcript ends an utterance at pauses shorter than the 700 ms hangover:
    the monologue arrives as one echo per stretch between pauses (plain segmentation with this
    hangover gives 2), each boundary on a real pause, the words intact."""
    path = clip(MONOLOGUE)
    audio = decode_file(path)
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{path}")
    asr = CountingAsr(FaultyAsr(real_engine(), metrics=metrics))
    source = LockstepSource(FileSource(path, settings.source), asr)
    relay = await run_relay(settings, sink=sink, source=source, asr=asr, metrics=metrics, timeout_s=60)
    check_invariants(relay, sink.sent)
    texts = [o.text for o in sink.sent]
    assert len(texts) >= 3, texts
    assert relay.metrics.value("echo_relay_utterances_total", {"reason": "sentence_end"}) >= 1

    db = envelope_db(audio)
    floor = float(np.percentile(db, 10))
    centers = np.array([window_center(i) for i in range(len(db))]) / SAMPLE_RATE
    for a, b in itertools.pairwise(sink.sent):
        end, start = a.audio_end_s, b.audio_start_s
        assert start > end  # in order, never overlapping
        # A real pause lies between them: the envelope dips near the noise floor there.
        assert db[(centers >= end) & (centers <= start)].min() <= floor + 6, (end, start)
    fillers = {"um", "uh", "yknow"}
    ref = " ".join(w for w in normalize(reference(MONOLOGUE)).split() if w not in fillers)
    assert wer(ref, " ".join(texts)) <= 0.35, texts


LONG_SENTENCE = "clapclap/librispeech_dev_clean/2902-9006-0017.flac"  # 23.8 s; one sentence of 18.5 s with pauses


async def test_a_long_sentence_is_decoded_piece_by_piece_and_echoed_whole() -> None:
    """Each pause of the long sentence that leaves `endpoint.commit_min_ms` of new audio commits what was
    decoded so far: the final decode covers only the rest (with the committed words as context) and the
    echo is the whole sentence, each word once."""
    path = clip(LONG_SENTENCE)
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{path}")
    asr = CountingAsr(FaultyAsr(real_engine(), metrics=metrics))
    relay = await run_relay(settings, sink=sink, source=LockstepSource(FileSource(path, settings.source), asr),
                            asr=asr, metrics=metrics, timeout_s=120)
    check_invariants(relay, sink.sent)
    assert metrics.value("echo_relay_speculative_decodes_total", {"outcome": "committed"}) >= 1
    first = sink.sent[0]
    length = first.audio_end_s - first.audio_start_s
    assert length > 12, sink.sent  # the long utterance, not pieces of it
    final = [a for a in asr.asked if a[0] == first.utterance_id and a[1] == "final"]
    last_spec = [a for a in asr.asked if a[0] == first.utterance_id and a[1] == "speculative"][-1]
    ending = final[-1] if final else last_spec  # the decode whose transcript was echoed
    committed_s = asr.asked[0][2]  # the first pause's decode: at least commit_min_ms of audio, kept
    assert committed_s >= settings.endpoint.commit_min_ms / 1000, asr.asked
    # the rest only: the utterance's audio (speech + 0.3 s pre-roll + at most 0.15 s pad) minus the committed part
    assert ending[3] and ending[2] <= length + 0.45 - committed_s, asr.asked
    assert normalize(ending[3]).split()[:3] == normalize(reference(LONG_SENTENCE)).split()[:3]
    words = normalize(" ".join(o.text for o in sink.sent)).split()
    assert wer(reference(LONG_SENTENCE), " ".join(words)) <= 0.08, [o.text for o in sink.sent]
    ref_pairs = Counter(itertools.pairwise(normalize(reference(LONG_SENTENCE)).split()))
    doubled = Counter(itertools.pairwise(words)) - ref_pairs
    assert not [pair for pair, n in doubled.items() if ref_pairs[pair]], doubled  # nothing twice at a join


ONE_SENTENCE = "clapclap/librispeech_dev_clean/2086-149220-0000.flac"  # 12 s, one sentence, clause pauses of 0.2-0.5 s


def _with_silence_after(name: str, tmp_path: Path) -> Path:
    """The clip followed by 2.5 s of silence (a turn's end: the clip's own file stops 0.5 s after the speech)."""
    path = tmp_path / "turn.wav"
    audio = np.concatenate([decode_file(clip(name)), np.zeros(int(2.5 * SAMPLE_RATE), np.int16)])
    path.write_bytes(wav_bytes(audio, SAMPLE_RATE))
    return path


async def _echoes_of(path: Path, **dotted: object) -> tuple[list, Metrics]:  # type: ignore[type-arg]
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{path}", **dotted)
    asr = CountingAsr(FaultyAsr(real_engine(), metrics=metrics))
    relay = await run_relay(settings, sink=sink, source=LockstepSource(FileSource(path, settings.source), asr),
                            asr=asr, metrics=metrics, timeout_s=60)
    check_invariants(relay, sink.sent)
    return sink.sent, metrics


async def test_the_turn_end_rule_keeps_a_sentence_with_clause_pauses_whole_and_ends_it_at_its_end(
        tmp_path: Path) -> None:
    """Its pauses inside (one ends "... within small compass." at p 0.93) leave the sentence in one echo; at its
    end the turn-end rule finishes it after endpoint.turn_pause_ms of silence, where the graded policy alone
    waits endpoint.likely_pause_ms (stream clock; the lockstep source takes decode time out)."""
    path = _with_silence_after(ONE_SENTENCE, tmp_path)
    sent, metrics = await _echoes_of(path)
    assert len(sent) == 1, [o.text for o in sent]
    assert wer(reference(ONE_SENTENCE), sent[0].text) <= 0.1, sent[0].text
    assert metrics.value("echo_relay_utterances_total", {"reason": "sentence_end"}) == 1
    assert metrics.value("echo_relay_turn_decisions_total", {"rule": "turn"}) == 1
    waited = sent[0].emitted_at_s - sent[0].audio_end_s
    settings = relay_settings("file:x")
    # one idle batch of blocks (source.idle_block_ms) may be released before the echo is handed over
    assert waited <= (settings.endpoint.turn_pause_ms + settings.source.idle_block_ms + 40) / 1000, waited

    graded, graded_metrics = await _echoes_of(path, endpoint__turn_rule=False)
    assert [o.text for o in graded] == [o.text for o in sent]
    assert graded_metrics.value("echo_relay_turn_decisions_total", {"rule": "turn"}) == 0
    assert graded[0].emitted_at_s - graded[0].audio_end_s >= settings.endpoint.likely_pause_ms / 1000 - 0.04
