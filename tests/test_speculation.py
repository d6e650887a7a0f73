"""Committed beginnings (pipeline/speculation.py): a long utterance decoded piece by piece while it is spoken.

The pure parts (`crop`, `join`) and the Speculator's bookkeeping with a scripted transcriber; the whole
path on real speech is in tests/test_relay_endpointing.py."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.frames import SAMPLE_RATE, Transcript, Utterance
from pipeline.metrics import Metrics
from pipeline.speculation import Prefix, Speculator, crop, join

S = SAMPLE_RATE


def utt(end_s: float, uid: str = "u1", start_s: float = 1.0) -> Utterance:
    """An utterance from `start_s` to `end_s` of the stream whose samples are their own stream positions
    (so a crop can be checked sample by sample)."""
    start, end = int(start_s * S), int(end_s * S)
    audio = (np.arange(start, end) % 30000).astype(np.int16)
    return Utterance(id=uid, audio=audio, start=start, speech_start=start + S // 4, speech_end=end - S // 10)


def test_crop_keeps_the_audio_after_the_committed_beginning() -> None:
    u = utt(12.0)
    rest = crop(u, Prefix("u1", 6 * S, Transcript("first part")))
    assert rest.start == 6 * S and rest.end == u.end
    assert np.array_equal(rest.audio, u.audio[5 * S:])  # utterance starts at 1 s
    assert rest.speech_start == 6 * S and rest.speech_end == u.speech_end and rest.id == "u1"


@pytest.mark.parametrize("prefix", [None, Prefix("u2", 6 * S, Transcript("x")), Prefix("u1", 12 * S, Transcript("x")),
                                    Prefix("u1", S // 2, Transcript("x"))])
def test_crop_without_a_prefix_inside_the_utterance_is_the_utterance(prefix: Prefix | None) -> None:
    u = utt(12.0)
    assert crop(u, prefix) is u


def test_join_continues_the_beginning_and_ends_as_the_rest_ends() -> None:
    first = Transcript("And so, my fellow Americans,", confidence=0.9, avg_logprob=-0.2, final_punct_prob=None,
                       language="en", no_speech_prob=0.01)
    rest = Transcript("ask not what your country can do for you.", confidence=0.6, avg_logprob=-0.6,
                      final_punct_prob=0.93, language="en", no_speech_prob=0.02, decode_s=0.2,
                      extra={"window_s": 10.0})
    whole = join(first, rest)
    assert whole.text == "And so, my fellow Americans, ask not what your country can do for you."
    assert whole.final_punct_prob == 0.93 and whole.decode_s == 0.2 and whole.dropped_reason is None
    assert 0.6 < whole.confidence < 0.9 and -0.6 < whole.avg_logprob < -0.2  # weighted by words (5 and 9)
    assert whole.extra["committed_words"] == 5 and whole.extra["window_s"] == 10.0


@pytest.mark.parametrize(("head", "tail", "text"), [
    ("of helpless and debauched slaveholders.", "doomed to utter extermination.",
     "of helpless and debauched slaveholders, doomed to utter extermination."),
    ("It was over.", "Then she left.", "It was over. Then she left."),
    ("but who cares...", "this is me talking.", "but who cares... this is me talking."),
    ("Was it over?", "no, said she.", "Was it over? no, said she.")])
def test_join_mends_a_period_the_pause_put_mid_sentence(head: str, tail: str, text: str) -> None:
    assert join(Transcript(head), Transcript(tail)).text == text


@pytest.mark.parametrize(("head", "tail", "text"), [
    ("今日は晴れです。", "明日は雨です。", "今日は晴れです。明日は雨です。"),  # Japanese writes no spaces
    ("我在这一个讲堂中", "便须常常随喜", "我在这一个讲堂中便须常常随喜"),
    ("ฉันไปตลาด", "เขาอยู่บ้าน", "ฉันไปตลาด เขาอยู่บ้าน"),  # Thai: a space where the speaker paused
    ("그는 이리저리 피하면서", "길 한 옆으로 걸어갔다.", "그는 이리저리 피하면서 길 한 옆으로 걸어갔다."),
    ("मैं घर जा रहा हूँ।", "तुम कहाँ हो?", "मैं घर जा रहा हूँ। तुम कहाँ हो?"),
    ("¿Qué pasó?", "¡Nada!", "¿Qué pasó? ¡Nada!")])
def test_join_in_other_scripts(head: str, tail: str, text: str) -> None:
    assert join(Transcript(head), Transcript(tail)).text == text


@pytest.mark.parametrize("rest", [Transcript("", dropped_reason="no_speech", decode_s=0.1),
                                  Transcript("  ", decode_s=0.1)])
def test_join_when_the_rest_holds_no_words_keeps_the_beginning(rest: Transcript) -> None:
    first = Transcript("We choose to go to the moon.", final_punct_prob=0.97)
    whole = join(first, rest)
    assert whole.text == first.text and whole.final_punct_prob == 0.97 and whole.dropped_reason is None
    assert whole.extra["rest_dropped"] == (rest.dropped_reason or "empty")


class Script:
    """A transcriber whose decodes end when the test says: records what it was asked."""

    def __init__(self) -> None:
        self.asked: list[Utterance] = []
        self.futures: list[asyncio.Future[Transcript]] = []

    async def __call__(self, u: Utterance) -> Transcript:
        self.asked.append(u)
        fut: asyncio.Future[Transcript] = asyncio.get_running_loop().create_future()
        self.futures.append(fut)
        return await fut


def speculator(commit_min_ms: int = 4000) -> tuple[Speculator, Script, Metrics]:
    settings = Settings.model_validate({"endpoint": {"commit_min_ms": commit_min_ms}})
    metrics = Metrics()
    script = Script()
    return Speculator(settings, metrics, script), script, metrics


def count(metrics: Metrics, outcome: str) -> float:
    return metrics.value("echo_relay_speculative_decodes_total", {"outcome": outcome})


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def pause_then_resume(spec: Speculator, end_s: float = 6.0) -> None:
    """A pause at `end_s` starts a speculative decode; then speech resumes."""
    spec.start(utt(end_s))
    await settle()
    spec.resumed()


async def test_a_long_pause_decode_becomes_the_committed_beginning_when_speech_resumes() -> None:
    spec, script, metrics = speculator()
    await pause_then_resume(spec)  # 5 s of audio: more than commit_min_ms
    script.futures[0].set_result(Transcript("the first five seconds,"))
    await settle()
    later = utt(9.0)
    assert spec.prefix(later) is None  # 3 s after it: too little for a decode of its own
    longer = utt(11.0)
    p = spec.prefix(longer)
    assert p is not None and p.end == 6 * S and p.transcript.text == "the first five seconds,"
    assert count(metrics, "committed") == 1 and count(metrics, "discarded") == 0


async def test_short_pause_decodes_and_dropped_ones_are_discarded_not_committed() -> None:
    spec, script, metrics = speculator()
    spec.start(utt(3.0))  # 2 s: too short to commit
    await settle()
    spec.resumed()
    await settle()
    assert script.futures[0].cancelled() and count(metrics, "discarded") == 1
    spec.start(utt(7.0))
    await settle()
    spec.resumed()
    script.futures[1].set_result(Transcript("", dropped_reason="no_speech"))  # the gate kept nothing
    await settle()
    assert spec.prefix(utt(20.0)) is None
    assert count(metrics, "discarded") == 2 and count(metrics, "committed") == 0


async def test_one_candidate_at_a_time_and_nothing_waits_for_it() -> None:
    spec, script, metrics = speculator()
    await pause_then_resume(spec)  # candidate in flight
    spec.start(utt(11.0))  # the next pause: decoded from the utterance's start (nothing committed yet)
    await settle()
    assert script.asked[1].end == utt(11.0).end
    spec.resumed()
    await settle()
    assert script.futures[1].cancelled()  # a second candidate is not kept
    assert spec.prefix(utt(14.0)) is None  # a decode asked for now does not wait: it starts at the beginning
    script.futures[0].set_result(Transcript("the first five seconds,"))
    await settle()
    p = spec.prefix(utt(14.0))
    assert p is not None and p.end == 6 * S  # once settled, later decodes start after it
    assert count(metrics, "committed") == 1 and count(metrics, "discarded") == 1


async def test_a_candidate_still_in_flight_when_its_utterance_closes_is_cancelled() -> None:
    spec, script, metrics = speculator()
    await pause_then_resume(spec)
    assert spec.take(utt(9.0)) is None  # closed before the candidate settled
    await settle()
    assert script.futures[0].cancelled() and spec.prefix(utt(20.0)) is None
    assert count(metrics, "discarded") == 1 and count(metrics, "committed") == 0


async def test_beginnings_belong_to_their_utterance_and_off_means_never() -> None:
    spec, script, _ = speculator()
    await pause_then_resume(spec)
    script.futures[0].set_result(Transcript("the first five seconds,"))
    await settle()
    assert spec.prefix(utt(14.0, uid="u2")) is None
    off, script_off, metrics_off = speculator(commit_min_ms=0)
    off.start(utt(16.0))
    await settle()
    off.resumed()
    await settle()
    assert script_off.futures[0].cancelled() and count(metrics_off, "discarded") == 1
