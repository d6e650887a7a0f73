"""DailySource against the daily-python stand-in: a remote participant's microphone as frames."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import numpy as np
import pytest

from pipeline.config import Settings, set_dotted
from pipeline.frames import SAMPLE_RATE, AudioFrame
from pipeline.metrics import Metrics
from pipeline.sink.daily import DailySink
from pipeline.source.base import SourceError
from pipeline.source.daily import DailySource
from pipeline.testing.fake_daily import FakeRoom
from pipeline.wiring import build_relay

FAKE = "pipeline.testing.fake_daily"
PERSONA = "Echo Persona"


pytestmark = pytest.mark.usefixtures("clean_fake_daily")  # fresh rooms, no error inside a callback


def make_settings(room: FakeRoom | None, **dotted: Any) -> Settings:
    # 20 ms blocks: the test signals are whole multiples of it (the default 32 ms is rounded to 30).
    tree: dict[str, Any] = {"tavus": {"persona_name": PERSONA}, "source": {"block_ms": 20},
                            "sink": {"daily": {"join_timeout_s": 2.0}}}
    if room is not None:
        tree["tavus"]["conversation_url"] = room.url
    for key, value in dotted.items():
        set_dotted(tree, key.replace("__", "."), value)
    return Settings.model_validate(tree)


def signal(seconds: float, offset: int = 0) -> np.ndarray:
    """Never-zero test audio, so filled silence can be told apart."""
    n = int(seconds * SAMPLE_RATE)
    return ((np.arange(n) + offset) % 5000 + 1000).astype(np.int16)


async def wait_for(pred: Any, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def collect(src: DailySource, until: Any, timeout: float = 5.0) -> list[AudioFrame]:
    frames: list[AudioFrame] = []

    async def run() -> None:
        async for frame in src.frames():
            frames.append(frame)
            if until(frames):
                return

    await asyncio.wait_for(run(), timeout)
    return frames


def assert_contiguous(frames: list[AudioFrame]) -> None:
    assert frames[0].start == 0
    for a, b in itertools.pairwise(frames):
        assert b.start == a.end
    assert all(f.samples.dtype == np.int16 and f.samples.ndim == 1 for f in frames)


async def test_speaker_audio_arrives_as_contiguous_16k_frames() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)  # never picked: it is the replica
    pcm = signal(1.0)
    src = DailySource(make_settings(room), Metrics(), daily_module=FAKE)
    await src.start()
    assert src.participant_id is None
    speaker = room.add_speaker("alice", np.zeros(0, dtype=np.int16), speed=4.0, delay_s=0.05)
    await wait_for(lambda: src.participant_id is not None)
    speaker.feed(pcm)  # live audio: what plays before the renderer is registered is not captured
    frames = await collect(src, lambda fs: sum(len(f.samples) for f in fs) >= len(pcm))
    assert_contiguous(frames)
    assert src.participant_id == speaker.id
    assert len(frames[0].samples) == 320  # 20 ms blocks (source.block_ms)
    assert np.array_equal(np.concatenate([f.samples for f in frames]), pcm)
    assert src.now_s() > 0
    await src.close()
    assert room.clients() == []


async def test_participant_leaves_and_rejoins_and_audio_resumes() -> None:
    room = FakeRoom.create()
    part1, part2 = signal(0.4), signal(0.4, offset=7)
    src = DailySource(make_settings(room), Metrics(), daily_module=FAKE)
    await src.start()
    speaker = room.add_speaker("alice", np.zeros(0, dtype=np.int16), speed=1.0)
    await wait_for(lambda: src.participant_id is not None)
    speaker.feed(part1)
    first = await collect(src, lambda fs: sum(len(f.samples) for f in fs) >= len(part1))
    old_id = speaker.id
    speaker.leave()
    await asyncio.sleep(0.8)  # absent long enough for the stream clock to be kept running
    speaker.rejoin(delay_s=0.0)  # a new participant id, same user name
    await wait_for(lambda: src.participant_id == speaker.id)
    speaker.feed(part2)
    rest = await collect(src, lambda fs: int(np.count_nonzero(np.concatenate([f.samples for f in fs])))
                         >= len(part2))
    frames = first + rest
    assert_contiguous(frames)
    assert speaker.id != old_id and src.participant_id == speaker.id
    audio = np.concatenate([f.samples for f in frames])
    voiced = audio[audio != 0]
    assert np.array_equal(voiced, np.concatenate([part1, part2]))  # nothing lost, nothing doubled
    gap = len(audio) - len(voiced)
    assert gap > 0 and gap % 320 == 0 and src.stats()["silence_samples"] == gap
    assert abs(src.now_s() - frames[-1].end / SAMPLE_RATE) < 0.6  # positions track the wall clock
    await src.close()


async def test_participant_is_chosen_by_name() -> None:
    room = FakeRoom.create()
    room.add_speaker("alice", signal(2.0), speed=2.0)
    bob_pcm = signal(0.3, offset=123)
    src = DailySource(make_settings(room, source__daily__participant="bob"), Metrics(), daily_module=FAKE)
    await src.start()
    await asyncio.sleep(0.1)
    assert src.participant_id is None  # alice is present but not wanted
    bob = room.add_speaker("bob", np.zeros(0, dtype=np.int16), speed=2.0)
    await wait_for(lambda: src.participant_id is not None)
    bob.feed(bob_pcm)
    frames = await collect(src, lambda fs: sum(len(f.samples) for f in fs) >= len(bob_pcm))
    assert src.participant_id == bob.id
    assert np.array_equal(np.concatenate([f.samples for f in frames])[:len(bob_pcm)], bob_pcm)
    assert src.stats()["foreign_blocks"] == 0  # alice's audio was never even subscribed
    await src.close()


async def test_rides_on_the_sinks_room_and_leaves_with_the_last_user() -> None:
    room = FakeRoom.create()
    room.add_replica(PERSONA)
    settings = make_settings(room, source__spec="daily", sink__spec="daily", sink__daily__module=FAKE)
    # The wiring, not a process-wide registry, tells the source which room to listen in.
    relay = build_relay(settings)
    sink, src = relay.sink, relay.source
    assert isinstance(sink, DailySink) and isinstance(src, DailySource)
    assert src.room_from() is None  # the sink has not joined yet
    await sink.start()
    assert src.room_from() is sink.connection
    await src.start()
    assert len(room.clients()) == 1
    pcm = signal(0.2)
    alice = room.add_speaker("alice", np.zeros(0, dtype=np.int16), speed=0)
    await wait_for(lambda: src.participant_id is not None)
    alice.feed(pcm)
    frames = await collect(src, lambda fs: sum(len(f.samples) for f in fs) >= len(pcm))
    assert np.array_equal(np.concatenate([f.samples for f in frames]), pcm)
    await src.close()
    assert len(room.clients()) == 1  # the sink still uses the room
    await sink.close()
    assert room.clients() == []


async def test_with_several_sinks_the_source_still_listens_in_the_rooms_sink(tmp_path: Any) -> None:
    """sink.also wraps the Daily sink in a FanoutSink: the source must still ride on its room."""
    room = FakeRoom.create()
    settings = make_settings(room, source__spec="daily", sink__spec="daily", sink__daily__module=FAKE,
                             sink__also=[f"jsonl:{tmp_path / 'record.jsonl'}"])
    relay = build_relay(settings)
    await relay.sink.start()
    assert relay.source.room_from() is not None and len(room.clients()) == 1
    await relay.source.start()
    assert len(room.clients()) == 1  # no second join
    await relay.source.close()
    await relay.sink.close()
    assert room.clients() == []


async def test_conversation_end_ends_frames_and_missing_url_is_a_clear_error() -> None:
    room = FakeRoom.create()
    src = DailySource(make_settings(room), Metrics(), daily_module=FAKE)
    await src.start()
    room.add_speaker("alice", signal(5.0), speed=1.0)
    t0 = time.monotonic()

    async def end_soon() -> None:
        await asyncio.sleep(0.2)
        room.end_conversation()

    ender = asyncio.ensure_future(end_soon())
    frames = await collect(src, lambda fs: False, timeout=3)
    await ender
    assert frames and time.monotonic() - t0 < 2
    await src.close()
    with pytest.raises(SourceError, match="conversation_url"):
        await DailySource(make_settings(None), daily_module=FAKE).start()
