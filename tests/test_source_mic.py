"""Microphone source without hardware: an injected fake PortAudio stream drives every path.

The fake calls the callback from its own thread (as PortAudio does), faster than real time, and can
refuse sample rates, fail opens, flag overflows, stop (device unplugged) or stall.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from pipeline.config import SourceSettings
from pipeline.dsp import rms_dbfs
from pipeline.frames import SAMPLE_RATE
from pipeline.metrics import Metrics
from pipeline.source import SourceError
from pipeline.source import mic as mic_mod
from pipeline.source.mic import (
    NO_DEVICES,
    MicSource,
    describe_input_devices,
    format_input_devices,
    list_input_devices,
    resolve_device,
)

BLOCK = 320  # 20 ms at 16 kHz


class FakePortAudioError(Exception):
    pass


@dataclass
class Flags:
    input_overflow: bool = False


class FakeDevice:
    """A scriptable input device. `signal(start, n, rate)` -> float samples for the left channel."""

    def __init__(self, rates=(16000,), fail_opens: int = 0, overflow_blocks=(), interval: float = 0.002,
                 lose_after: dict[int, int] | None = None, stall_after: dict[int, int] | None = None,
                 signal=None, right_gain: float = 1.0) -> None:
        self.rates = set(rates)
        self.fail_opens = fail_opens
        self.overflow_blocks = set(overflow_blocks)
        self.interval = interval
        self.lose_after = lose_after or {}  # stream number -> blocks before it stops (unplugged)
        self.stall_after = stall_after or {}  # stream number -> blocks before callbacks stop
        self.signal = signal
        self.right_gain = right_gain
        self.opens: list[dict[str, Any]] = []
        self.streams: list[FakeStream] = []
        self.blocks: list[np.ndarray] = []  # every block delivered, in order (after mono mix)
        self.counter = 0  # device samples produced
        self.block_index = 0
        self.callback_durations: list[float] = []
        self.lock = threading.Lock()
        self.paused = threading.Event()  # set: no callbacks (the stream stays active)

    def factory(self, *, device, samplerate, channels, dtype, blocksize, callback):
        assert dtype == "int16"
        self.opens.append({"device": device, "samplerate": samplerate, "channels": channels,
                           "blocksize": blocksize})
        if samplerate not in self.rates:
            raise FakePortAudioError("Invalid sample rate [PaErrorCode -9997]")
        if self.fail_opens > 0:
            self.fail_opens -= 1
            raise FakePortAudioError("Device unavailable [PaErrorCode -9985]")
        s = FakeStream(self, len(self.streams), samplerate, channels, blocksize, callback)
        self.streams.append(s)
        return s

    def make_block(self, n: int, channels: int, rate: int) -> np.ndarray:
        with self.lock:
            start = self.counter
            self.counter += n
            idx = self.block_index
            self.block_index += 1
        if self.signal is None:  # a ramp: every sample identifies its place in the device stream
            left = ((start + np.arange(n)) % 20000 - 10000).astype(np.int16)
        else:
            left = np.clip(np.rint(self.signal(start, n, rate) * 32767), -32768, 32767).astype(np.int16)
        cols = [left] + [np.rint(left * self.right_gain).astype(np.int16)] * (channels - 1)
        return np.stack(cols, axis=1), idx


class FakeStream:
    def __init__(self, dev: FakeDevice, number: int, rate: int, channels: int, blocksize: int, callback):
        self.dev, self.number, self.rate, self.channels = dev, number, rate, channels
        self.blocksize, self.callback = blocksize, callback
        self.active = False
        self.closed = False
        self.emitted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.active = True
        self._thread.start()

    def _run(self):
        lose = self.dev.lose_after.get(self.number)
        stall = self.dev.stall_after.get(self.number)
        while not self._stop.is_set():
            if lose is not None and self.emitted >= lose:
                self.active = False  # device unplugged: PortAudio ends the stream
                return
            if (stall is not None and self.emitted >= stall) or self.dev.paused.is_set():
                self._stop.wait(0.01)  # stream "active" but no callbacks any more
                continue
            block, idx = self.dev.make_block(self.blocksize, self.channels, self.rate)
            self.dev.blocks.append(block.copy())
            flags = Flags(input_overflow=idx in self.dev.overflow_blocks)
            t = time.perf_counter()
            self.callback(block, self.blocksize, None, flags)
            self.dev.callback_durations.append(time.perf_counter() - t)
            block[:] = 0  # PortAudio reuses its buffer: the source must have copied it
            self.emitted += 1
            self._stop.wait(self.dev.interval)

    def stop(self):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.active = False

    abort = stop

    def close(self):
        self.stop()
        self.closed = True


def settings(**mic) -> SourceSettings:
    base = {"reopen_backoff_min_s": 0.05, "reopen_backoff_max_s": 0.2, "stall_timeout_s": 0.4}
    base.update(mic)
    return SourceSettings.model_validate({"spec": "mic", "block_ms": 20, "mic": base})


def delivered_audio(dev: FakeDevice) -> np.ndarray:
    return np.concatenate([b[:, 0] for b in dev.blocks])


def assert_contiguous(frames) -> None:
    pos = 0
    for i, f in enumerate(frames):
        assert f.start == pos, f"frame {i}: start {f.start} != {pos}"
        assert f.samples.dtype == np.int16 and f.samples.ndim == 1
        pos = f.end


async def take(src: MicSource, n: int, timeout: float = 10.0) -> tuple[Any, list]:
    """Start frames() and read n frames; returns (generator, frames)."""
    gen = src.frames()
    frames = []
    async with asyncio.timeout(timeout):
        while len(frames) < n:
            frames.append(await anext(gen))
    return gen, frames


async def drain(src: MicSource, gen, frames: list, timeout: float = 10.0) -> list:
    await src.close()
    async with asyncio.timeout(timeout):
        frames += [f async for f in gen]
    return frames


# -------------------------------------------------------------------------------- happy path
async def test_frames_in_order_contiguous_and_complete():
    dev = FakeDevice()
    metrics = Metrics()
    src = MicSource(settings(), metrics, stream_factory=dev.factory)
    gen, frames = await take(src, 60)
    assert src.device_rate == 16000
    frames = await drain(src, gen, frames)
    assert_contiguous(frames)
    assert all(len(f.samples) == BLOCK for f in frames)
    # Everything the device captured before close() came out, unchanged and in order.
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames]), delivered_audio(dev))
    assert dev.opens[0] == {"device": None, "samplerate": 16000, "channels": 1, "blocksize": 320}
    assert dev.streams[0].closed
    assert src.stats()["blocks"] == len(frames)
    assert src.stats()["overflows"] == 0 and src.stats()["reopens"] == 0


async def test_idle_hands_blocks_over_in_batches_and_loses_nothing():
    """set_idle(True): the callback hands over idle_block_ms of blocks at a time (96 ms = 4 blocks of
    20 ms: one loop wakeup instead of four); set_idle(False) goes back to one block per hand-over.
    Blocks still held when the stream closes are delivered too: all audio comes out, in order."""
    dev = FakeDevice()
    src = MicSource(settings(), None, stream_factory=dev.factory)
    batches: list[int] = []
    on_blocks = src._on_blocks

    def recording(cap, batch):
        batches.append(len(batch))
        on_blocks(cap, batch)

    src._on_blocks = recording  # type: ignore[method-assign]
    src.set_idle(True)
    gen, frames = await take(src, 40)
    idle_handovers = len(batches)
    src.set_idle(False)
    async with asyncio.timeout(10):
        while len(batches) < idle_handovers + 30:
            frames.append(await anext(gen))
    src.set_idle(True)  # closing while idle: what the callback holds is not lost
    async with asyncio.timeout(10):
        while len(batches) < idle_handovers + 35:
            frames.append(await anext(gen))
        while dev.streams[0].emitted - sum(batches) not in (1, 2):
            await asyncio.sleep(0.001)
    dev.paused.set()  # at most one more callback can slip in: 1..3 blocks stay held
    await asyncio.sleep(0.05)
    held = dev.streams[0].emitted - sum(batches)
    assert held in (1, 2, 3)
    frames = await drain(src, gen, frames)
    assert batches[-1] == held  # close() handed over what the callback held
    assert_contiguous(frames)
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames]), delivered_audio(dev))
    assert batches[:idle_handovers] == [4] * idle_handovers
    # after set_idle(False): at most one mixed hand-over (what was held plus the new block), then 1s
    assert set(batches[idle_handovers + 1:idle_handovers + 30]) == {1}


async def test_now_s_tracks_positions_and_never_goes_back():
    dev = FakeDevice()
    src = MicSource(settings(), None, stream_factory=dev.factory)
    assert src.now_s() == 0.0
    gen = src.frames()
    last = 0.0
    async for f in gen:
        now = src.now_s()
        assert now >= last
        assert now >= f.end / SAMPLE_RATE  # captured audio is never "in the future"
        last = now
        if f.end >= 40 * BLOCK:
            break
    await src.close()
    await gen.aclose()
    assert src.now_s() >= last


async def test_48k_only_stereo_device_is_resampled_and_mixed():
    tone = lambda start, n, rate: 0.5 * np.sin(2 * np.pi * 440.0 * (start + np.arange(n)) / rate)  # noqa: E731
    dev = FakeDevice(rates=(48000,), signal=tone, right_gain=0.0)
    devices = [{"index": 0, "name": "Fake USB Mic", "max_input_channels": 2, "default_samplerate": 48000.0,
                "default": True}]
    src = MicSource(settings(channels=2), Metrics(), stream_factory=dev.factory,
                    query_devices=lambda: devices)
    gen, frames = await take(src, 100)
    assert src.device_rate == 48000
    frames = await drain(src, gen, frames)
    # 16 kHz refused, then the device default (48 kHz) with 20 ms device blocks
    assert [o["samplerate"] for o in dev.opens] == [16000, 48000]
    assert dev.opens[1] == {"device": 0, "samplerate": 48000, "channels": 2, "blocksize": 960}
    assert_contiguous(frames)
    audio = np.concatenate([f.samples for f in frames])
    produced = dev.counter
    assert abs(len(audio) - produced / 3) <= 2  # resampler tail flushed at close
    seg = audio[2000:-2000].astype(np.float64)
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg))))
    assert abs(np.fft.rfftfreq(len(seg), 1 / SAMPLE_RATE)[np.argmax(spec)] - 440.0) < 3.0
    # L = tone, R = silence: the mono mix is the mean, 6 dB below the tone
    assert rms_dbfs(audio[2000:-2000]) == pytest.approx(rms_dbfs(dev.blocks[5][:, 0]) - 6.02, abs=0.3)


async def test_explicit_sample_rate_is_the_only_one_tried():
    dev = FakeDevice(rates=(44100,))
    src = MicSource(settings(sample_rate=44100), None, stream_factory=dev.factory)
    gen, frames = await take(src, 20)
    frames = await drain(src, gen, frames)
    assert [o["samplerate"] for o in dev.opens] == [44100]
    assert_contiguous(frames)
    assert abs(frames[-1].end - dev.counter * 16000 / 44100) <= 2


async def test_device_selected_by_name_substring():
    devices = [{"index": 0, "name": "Built-in Microphone", "max_input_channels": 1,
                "default_samplerate": 44100.0, "default": True},
               {"index": 3, "name": "USB Audio Device", "max_input_channels": 1,
                "default_samplerate": 16000.0}]
    dev = FakeDevice()
    src = MicSource(settings(), None, stream_factory=dev.factory, device="usb audio",
                    query_devices=lambda: devices)
    gen, frames = await take(src, 3)
    await drain(src, gen, frames)
    assert dev.opens[0]["device"] == 3


# ---------------------------------------------------------------------------- status & drops
async def test_overflow_flags_are_counted():
    dev = FakeDevice(overflow_blocks=(3, 7, 11))
    metrics = Metrics()
    src = MicSource(settings(), metrics, stream_factory=dev.factory)
    gen, frames = await take(src, 30)
    await drain(src, gen, frames)
    assert src.stats()["overflows"] == 3
    assert metrics.value("echo_relay_audio_overflows_total") == 3


async def test_queue_full_drops_oldest_and_counts():
    dev = FakeDevice(interval=0.001)
    metrics = Metrics()
    src = MicSource(settings(queue_blocks=10), metrics, stream_factory=dev.factory)
    gen, frames = await take(src, 1)
    # The consumer stalls while the device keeps producing (the loop itself keeps running).
    async with asyncio.timeout(10):
        while len(dev.blocks) < 80:
            await asyncio.sleep(0.01)
    frames = await drain(src, gen, frames)
    dropped = src.stats()["dropped_queue_full"]
    assert dropped >= 50
    assert metrics.value("echo_relay_dropped_total", {"stage": "source", "reason": "queue_full"}) == dropped
    assert_contiguous(frames)  # positions continue over the dropped audio: no filler, no jump
    # Nothing vanished without being counted, and what was kept is the NEWEST audio.
    assert frames[-1].end + dropped * BLOCK == dev.counter
    np.testing.assert_array_equal(frames[-1].samples, dev.blocks[-1][:, 0])


async def test_callback_never_blocks_even_when_the_loop_is_stuck():
    dev = FakeDevice(interval=0.0005)
    metrics = Metrics()
    src = MicSource(settings(queue_blocks=10), metrics, stream_factory=dev.factory)
    gen, frames = await take(src, 1)
    time.sleep(0.3)  # block the event loop on purpose: callbacks must still return at once
    await asyncio.sleep(0.05)
    frames = await drain(src, gen, frames)
    assert len(dev.callback_durations) > 50
    # The loop was stuck for 0.3 s: a callback waiting on it would take that long.
    assert max(dev.callback_durations) < 0.15
    assert src.stats()["dropped_queue_full"] > 0
    assert_contiguous(frames)


def test_callback_survives_a_closed_loop():
    src = MicSource(settings(), None, stream_factory=FakeDevice().factory)
    loop = asyncio.new_event_loop()
    loop.close()
    cap = mic_mod._Capture(gen=1, rate=16000, channels=1, resampler=None)
    cb = src._make_callback(cap, loop)
    cb(np.zeros((320, 1), dtype=np.int16), 320, None, None)  # must not raise into PortAudio


# ------------------------------------------------------------------------------ device loss
async def test_device_loss_reopens_and_frames_continue():
    dev = FakeDevice(lose_after={0: 25}, fail_opens=0)
    metrics = Metrics()
    src = MicSource(settings(), metrics, stream_factory=dev.factory)
    gen, frames = await take(src, 25)
    dev.fail_opens = 1  # the first reopen attempt fails too (device not back yet)
    last_now = src.now_s()
    async with asyncio.timeout(10):
        while len(frames) < 60:
            frames.append(await anext(gen))
            assert src.now_s() >= last_now
            last_now = src.now_s()
    frames = await drain(src, gen, frames)
    assert_contiguous(frames)
    # All audio from both streams, no filler for the gap
    np.testing.assert_array_equal(np.concatenate([f.samples for f in frames]), delivered_audio(dev))
    stats = src.stats()
    assert stats["device_losses"] == 1 and stats["reopen_failures"] == 1 and stats["reopens"] == 1
    assert metrics.value("echo_relay_audio_reopens_total") == 1
    assert len(dev.streams) == 2 and dev.streams[0].closed


async def test_stalled_device_is_reopened():
    dev = FakeDevice(stall_after={0: 10})
    metrics = Metrics()
    src = MicSource(settings(stall_timeout_s=0.2), metrics, stream_factory=dev.factory)
    gen, frames = await take(src, 30)  # needs the second stream
    frames = await drain(src, gen, frames)
    assert_contiguous(frames)
    assert metrics.value("echo_relay_audio_reopens_total") == 1
    assert len(dev.streams) == 2


async def test_reopen_backoff_grows_and_stops_on_close():
    dev = FakeDevice(lose_after={0: 5})
    src = MicSource(settings(reopen_backoff_min_s=0.02, reopen_backoff_max_s=0.08), None,
                    stream_factory=dev.factory)
    gen, _ = await take(src, 5)
    dev.fail_opens = 10**6  # never comes back
    async with asyncio.timeout(10):
        while src.stats()["reopen_failures"] < 6:
            await asyncio.sleep(0.02)
    waiter = asyncio.create_task(anext(gen, None))  # frames() has not ended: it waits
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await src.close()
    assert await asyncio.wait_for(waiter, 5) is None
    assert src.stats()["reopens"] == 0


# --------------------------------------------------------------------------- first-open errors
async def test_unopenable_device_raises_source_error():
    dev = FakeDevice(rates=(8000,))
    src = MicSource(settings(), None, stream_factory=dev.factory)
    with pytest.raises(SourceError) as e:
        await take(src, 1)
    msg = str(e.value)
    assert "16000 Hz" in msg and "48000 Hz" in msg and "Invalid sample rate" in msg and "\n" not in msg


async def test_unknown_device_name_and_no_devices():
    devices = [{"index": 1, "name": "Built-in Microphone", "max_input_channels": 1,
                "default_samplerate": 48000.0}]
    src = MicSource(settings(), None, stream_factory=FakeDevice().factory, device="webcam",
                    query_devices=lambda: devices)
    with pytest.raises(SourceError, match=r"no audio input device matches 'webcam'.*Built-in Microphone"):
        await take(src, 1)
    src = MicSource(settings(), None, stream_factory=FakeDevice().factory, query_devices=list)
    with pytest.raises(SourceError, match=NO_DEVICES):
        await take(src, 1)


async def test_close_before_frames():
    src = MicSource(settings(), None, stream_factory=FakeDevice().factory)
    await src.close()
    assert [f async for f in src.frames()] == []


# ---------------------------------------------------------------------------------- devices
DEVICES = [
    {"index": 0, "name": "HDA Intel PCH: ALC257 Analog (hw:0,0)", "max_input_channels": 2,
     "default_samplerate": 44100.0, "hostapi": "ALSA", "default": False},
    {"index": 4, "name": "USB Audio Device", "max_input_channels": 1, "default_samplerate": 48000.0,
     "hostapi": "ALSA", "default": True},
    {"index": 5, "name": "USB Audio Device #2", "max_input_channels": 1, "default_samplerate": 48000.0},
]


def test_resolve_device():
    assert resolve_device(None, DEVICES)["index"] == 4  # the system default
    assert resolve_device(0, DEVICES)["index"] == 0
    assert resolve_device("5", DEVICES)["index"] == 5
    assert resolve_device("alc257", DEVICES)["index"] == 0  # case-insensitive substring
    assert resolve_device("usb audio device", DEVICES)["index"] == 4  # exact name wins
    assert resolve_device("#2", DEVICES)["index"] == 5
    with pytest.raises(SourceError, match="index 7"):
        resolve_device(7, DEVICES)
    with pytest.raises(SourceError, match="'bluetooth'"):
        resolve_device("bluetooth", DEVICES)
    with pytest.raises(SourceError, match=NO_DEVICES):
        resolve_device(None, [])


def test_format_input_devices():
    text = format_input_devices(DEVICES)
    assert "USB Audio Device" in text and "48000 Hz" in text and "*  4" in text
    assert format_input_devices([]).startswith("No audio input devices found")


def test_missing_portaudio_gives_a_clear_message(monkeypatch):
    class NoPortAudio:
        def find_spec(self, name, path=None, target=None):
            if name == "sounddevice":
                raise OSError("PortAudio library not found")
            return None

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(sys, "meta_path", [NoPortAudio(), *sys.meta_path])
    with pytest.raises(SourceError, match="libportaudio2"):
        list_input_devices()
    assert "libportaudio2" in describe_input_devices()
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # package not installed at all
    with pytest.raises(SourceError, match="pip install sounddevice"):
        list_input_devices()


def test_real_sounddevice_listing_if_available():
    """On this machine (no audio hardware) the real PortAudio lists no input devices."""
    try:
        devices = list_input_devices()
    except SourceError as e:
        assert "libportaudio2" in str(e)
        return
    text = describe_input_devices()
    if not devices:
        assert text.startswith(NO_DEVICES)
    else:
        assert all({"index", "name", "max_input_channels", "default_samplerate"} <= set(d) for d in devices)


def test_importing_the_mic_module_does_not_import_sounddevice():
    code = ("import sys, pipeline.source, pipeline.source.mic; "
            "assert 'sounddevice' not in sys.modules, 'sounddevice imported eagerly'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
