"""Reliability: audio input faults during real runs (real speech, VAD, tiny.en).

- a file source that stalls mid-utterance (no frames for a while, then more): no hang, nothing lost;
- a microphone (MicSource with an injected PortAudio stand-in playing real speech) whose device
  disappears mid-utterance and comes back after failed reopen attempts, whose driver wedges (stream
  active, no callbacks), or that reports input overflows: the relay keeps going, every event is
  counted, and the utterances after the fault are delivered with their words.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from faults import (
    FakeMicDevice,
    FaultyAsr,
    RecordingSink,
    Track,
    check_invariants,
    make_track,
    metric_sum,
    real_engine,
    relay_settings,
    run_relay,
    word_recall,
)

from pipeline.frames import SAMPLE_RATE
from pipeline.metrics import Metrics
from pipeline.source.file import FileSource
from pipeline.source.mic import MicSource

MIN_RECALL = 0.6


@pytest.fixture(scope="module")
def track(tmp_path_factory: pytest.TempPathFactory) -> Track:
    return make_track(tmp_path_factory.mktemp("source") / "track.wav")


def delivered_text(sink: RecordingSink) -> str:
    return " ".join(o.text for o in sink.sent)


def assert_clips_delivered(track: Track, sink: RecordingSink, indexes: range | list[int]) -> None:
    text = delivered_text(sink)
    for i in indexes:
        seg = track.segments[i]
        assert word_recall(seg.reference, text) >= MIN_RECALL, (seg.clip, seg.reference, text)


async def test_file_source_stalling_mid_utterance_loses_nothing(track: Track) -> None:
    from faults import StallingSource

    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}")
    mid_second_clip = (track.segments[1].start_s + track.segments[1].end_s) / 2
    source = StallingSource(FileSource(track.path, settings.source), {mid_second_clip: 1.5, 20.0: 1.0})
    relay = await run_relay(settings, sink=sink, source=source, asr=FaultyAsr(real_engine(), metrics=metrics),
                            metrics=metrics, timeout_s=30)
    assert [round(p, 2) for p, _ in source.stalled] == [round(mid_second_clip, 2), 20.0]
    assert relay.ledger.delivered == relay.ledger.closed == len(track.segments)
    check_invariants(relay, sink.sent)
    assert_clips_delivered(track, sink, range(len(track.segments)))


class HintedFileSource(FileSource):
    """Records the relay's idle hints with the stream position (seconds) they came at."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hints: list[tuple[float, bool]] = []

    def set_idle(self, idle: bool) -> None:
        self.hints.append((self._released_end / SAMPLE_RATE, idle))
        super().set_idle(idle)


async def test_relay_tells_the_source_when_nobody_speaks(track: Track) -> None:
    """The source may batch blocks only while no utterance is open: the relay says idle at the start
    and after each utterance, busy as soon as one opens, and every busy span sits on one clip."""
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings(f"file:{track.path}")
    source = HintedFileSource(track.path, settings.source)
    relay = await run_relay(settings, sink=sink, source=source, asr=FaultyAsr(real_engine(), metrics=metrics),
                            metrics=metrics, timeout_s=30)
    hints = source.hints
    assert [idle for _, idle in hints] == [True, False] * len(track.segments) + [True], hints
    assert hints[0][0] < 0.1
    busy = [(hints[i][0], hints[i + 1][0]) for i in range(1, len(hints) - 1, 2)]
    for seg, (opened, closed) in zip(track.segments, busy, strict=True):
        assert seg.start_s <= opened < closed <= seg.end_s + 1.0, (seg, opened, closed)
    assert relay.ledger.delivered == relay.ledger.closed == len(track.segments)


async def run_mic(track: Track, device: FakeMicDevice, **dotted: Any) -> tuple[Any, MicSource, RecordingSink]:
    metrics = Metrics()
    sink = RecordingSink()
    settings = relay_settings("mic", source__mic__reopen_backoff_min_s=0.1, source__mic__reopen_backoff_max_s=0.4,
                              **dotted)
    source = MicSource(settings.source, metrics, stream_factory=device.factory)

    async def stop_when_played(relay: Any) -> None:
        while not device.exhausted:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        relay.stop()

    relay = await run_relay(settings, sink=sink, source=source, asr=FaultyAsr(real_engine(), metrics=metrics),
                            metrics=metrics, during=stop_when_played, timeout_s=60)
    check_invariants(relay, sink.sent)
    return relay, source, sink


async def test_mic_device_disappears_mid_utterance_and_comes_back(
        track: Track, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    seg = track.segments[2]
    vanish_at = int((seg.start_s + 1.0) * SAMPLE_RATE)  # one second into the third clip
    device = FakeMicDevice(track.pcm, speed=16.0, vanish_at=vanish_at, unavailable_opens=2)
    relay, source, sink = await run_mic(track, device)
    stats = source.stats()
    assert device.vanished and device.failed_opens == 2
    assert stats["device_losses"] == 1 and stats["reopens"] == 1 and stats["reopen_failures"] == 2, stats
    assert metric_sum(relay.metrics, "echo_relay_audio_reopens_total") == 1
    assert "audio input lost: the input stream stopped" in caplog.text
    assert "audio input reopened after 3 attempts" in caplog.text
    # Playback resumed where it stopped: every clip, including the interrupted one, is delivered.
    assert relay.ledger.delivered == relay.ledger.closed >= len(track.segments)
    assert_clips_delivered(track, sink, [0, 1, 3, 4, 5, 6])


async def test_mic_driver_wedged_is_detected_as_a_stall_and_reopened(track: Track) -> None:
    seg = track.segments[3]
    device = FakeMicDevice(track.pcm, speed=16.0, stall_at=int((seg.start_s + 0.5) * SAMPLE_RATE), stall_s=1.5)
    relay, source, sink = await run_mic(track, device, source__mic__stall_timeout_s=0.5)
    stats = source.stats()
    assert stats["device_losses"] >= 1 and stats["reopens"] >= 1, stats
    assert relay.ledger.delivered == relay.ledger.closed >= len(track.segments)
    assert_clips_delivered(track, sink, [0, 1, 2, 4, 5, 6])


async def test_mic_input_overflow_is_counted_and_the_relay_continues(track: Track) -> None:
    device = FakeMicDevice(track.pcm, speed=16.0, overflow_at=[40, 41, 300, 900])
    relay, source, sink = await run_mic(track, device)
    assert source.stats()["overflows"] == 4
    assert metric_sum(relay.metrics, "echo_relay_audio_overflows_total") == 4
    assert relay.ledger.delivered == relay.ledger.closed == len(track.segments)
    assert_clips_delivered(track, sink, range(len(track.segments)))
