"""Pure DSP helpers: channel mix-down, sample format conversion, resampling, levels, reblocking."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dsp import (
    SILENCE_DBFS,
    NoiseFloor,
    Reblocker,
    StreamResampler,
    dbfs,
    float_to_int16,
    int16_to_float,
    reblock,
    resample,
    rms,
    rms_dbfs,
    to_mono,
)


def sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spec)])


# ------------------------------------------------------------------------------------ to_mono
def test_to_mono_passes_1d_through():
    x = np.arange(5, dtype=np.int16)
    assert to_mono(x) is x


def test_to_mono_averages_channels_int16():
    x = np.array([[100, 200], [-32768, -32768], [32767, 32767], [1, 2]], dtype=np.int16)
    y = to_mono(x)
    assert y.dtype == np.int16 and y.shape == (4,)
    assert y.tolist() == [150, -32768, 32767, 2]  # 1.5 rounds to even


def test_to_mono_single_column_and_float():
    assert to_mono(np.array([[1], [2]], dtype=np.int16)).tolist() == [1, 2]
    y = to_mono(np.array([[0.5, -0.5], [1.0, 0.0]], dtype=np.float64))
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [0.0, 0.5])


def test_to_mono_rejects_3d():
    with pytest.raises(ValueError):
        to_mono(np.zeros((2, 2, 2)))


# ---------------------------------------------------------------------------------- int/float
def test_int16_float_roundtrip_is_exact():
    x = np.arange(-32768, 32768, dtype=np.int16)
    f = int16_to_float(x)
    assert f.dtype == np.float32
    assert f.min() == -1.0 and f.max() < 1.0
    np.testing.assert_array_equal(float_to_int16(f), x)


def test_float_to_int16_clips_and_handles_nan():
    y = float_to_int16(np.array([2.0, -2.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 0.25]))
    assert y.dtype == np.int16
    assert y.tolist() == [32767, -32768, 32767, -32768, 0, 32767, -32768, 8192]


# ----------------------------------------------------------------------------------- resample
@pytest.mark.parametrize("from_rate", [8000, 22050, 44100, 48000])
def test_resample_float_keeps_length_pitch_and_level(from_rate):
    x = sine(440.0, from_rate, 1.0)
    y = resample(x, from_rate, 16000)
    assert y.dtype == np.float32
    assert abs(len(y) - 16000) <= 1
    assert abs(peak_hz(y, 16000) - 440.0) < 2.0
    assert abs(rms_dbfs(y) - rms_dbfs(x)) < 0.1


def test_resample_int16_in_int16_out():
    x = float_to_int16(sine(1000.0, 48000, 0.5, amp=0.9))
    y = resample(x, 48000, 16000)
    assert y.dtype == np.int16 and len(y) == 8000
    assert abs(rms_dbfs(y) - rms_dbfs(x)) < 0.1


def test_resample_removes_content_above_nyquist():
    x = sine(10_000.0, 48000, 1.0)  # above 8 kHz: must not alias into the 16 kHz output
    y = resample(x, 48000, 16000)
    assert rms_dbfs(y[100:-100]) < rms_dbfs(x) - 60


def test_resample_same_rate_copies_and_multichannel():
    x = np.ones((100, 2), dtype=np.int16)
    y = resample(x, 16000, 16000)
    assert y is not x and np.array_equal(x, y)
    z = resample(np.zeros((4800, 2), dtype=np.float32), 48000, 16000)
    assert z.shape == (1600, 2)
    assert len(resample(np.zeros(0, dtype=np.int16), 48000, 16000)) == 0
    with pytest.raises(ValueError):
        resample(x, 0, 16000)


# ----------------------------------------------------------------------------- StreamResampler
@pytest.mark.parametrize("dtype", [np.float32, np.int16])
@pytest.mark.parametrize("from_rate", [44100, 48000])
def test_stream_resampler_chunked_matches_one_shot(dtype, from_rate):
    rng = np.random.default_rng(7)
    x = sine(440.0, from_rate, 2.0) + sine(3000.0, from_rate, 2.0, amp=0.2)
    if dtype == np.int16:
        x = float_to_int16(x)
    r = StreamResampler(from_rate, 16000, dtype=dtype)
    out, i = [], 0
    while i < len(x):  # random chunk sizes, including 1-sample chunks
        n = int(rng.integers(1, 3000))
        out.append(r.process(x[i:i + n]))
        i += n
    out.append(r.flush())
    chunked = np.concatenate(out)
    one = resample(x, from_rate, 16000)
    assert chunked.dtype == np.dtype(dtype)
    assert len(chunked) == len(one)
    assert r.samples_in == len(x) and r.samples_out == len(chunked)
    err = np.abs(chunked.astype(np.float64) - one.astype(np.float64))
    tol = 2 if dtype == np.int16 else 1e-4  # int16: rounding only
    assert err.max() <= tol


def test_stream_resampler_has_no_boundary_clicks():
    """A chunked sine must stay a clean sine: no jumps at chunk boundaries."""
    x = sine(200.0, 48000, 1.0)
    r = StreamResampler(48000, 16000, dtype=np.float32)
    y = np.concatenate([r.process(x[i:i + 960]) for i in range(0, len(x), 960)] + [r.flush()])
    d = np.abs(np.diff(y[200:-200]))
    # max step of a 200 Hz 0.5-amplitude sine at 16 kHz is 0.5 * 2*pi*200/16000 ~= 0.039
    assert d.max() < 0.045


def test_stream_resampler_passthrough_and_stereo():
    r = StreamResampler(16000, 16000)
    assert r.passthrough
    x = np.arange(10, dtype=np.int16)
    y = r.process(x)
    assert np.array_equal(x, y) and y is not x
    s = StreamResampler(48000, 16000, channels=2)
    a = s.process(np.zeros((4800, 2), dtype=np.int16))
    b = s.flush()
    assert a.shape[1:] == (2,) and len(a) + len(b) == 1600
    s.reset()
    assert s.samples_in == 0
    with pytest.raises(ValueError):
        StreamResampler(48000, 16000, dtype=np.float64)


# ------------------------------------------------------------------------------------ rms_dbfs
def test_rms_dbfs_levels():
    assert rms_dbfs(np.zeros(100, dtype=np.int16)) == SILENCE_DBFS
    assert rms_dbfs(np.zeros(0, dtype=np.int16)) == SILENCE_DBFS
    assert rms_dbfs(np.array([1], dtype=np.int16)) > SILENCE_DBFS  # 1 LSB is about -90 dBFS
    full = float_to_int16(sine(1000.0, 16000, 1.0, amp=1.0))
    assert rms_dbfs(full) == pytest.approx(-3.01, abs=0.05)
    assert rms_dbfs(np.full(10, -32768, dtype=np.int16)) == pytest.approx(0.0, abs=1e-9)
    assert rms_dbfs(sine(1000.0, 16000, 1.0, amp=0.1)) == pytest.approx(-23.01, abs=0.05)
    assert rms_dbfs(np.array([np.nan])) == SILENCE_DBFS


def test_rms_and_dbfs_are_the_two_steps_of_rms_dbfs():
    """The segmenter keeps each frame's RMS and its level: the same scale and silence value."""
    half = np.full(64, 16384, dtype=np.int16)
    assert rms(half) == 0.5 and rms(half.astype(np.float32) / 32768) == 0.5
    assert dbfs(rms(half)) == rms_dbfs(half) == pytest.approx(-6.02, abs=0.01)
    assert rms(np.zeros(0, dtype=np.int16)) == 0.0
    assert dbfs(0.0) == dbfs(float("nan")) == dbfs(1e-9) == SILENCE_DBFS


# ------------------------------------------------------------------------------------ reblock
@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 900), max_size=40), block=st.integers(1, 500),
       start=st.integers(0, 10**6))
def test_reblocker_fixed_blocks_contiguous_positions(sizes, block, start):
    rng = np.random.default_rng(len(sizes))
    data = rng.integers(-32768, 32767, sum(sizes), dtype=np.int16)
    r = Reblocker(block, start)
    frames, i = [], 0
    for n in sizes:
        frames += r.push(data[i:i + n])
        i += n
    assert all(len(f.samples) == block for f in frames)
    assert r.pending == len(data) % block
    tail = r.flush()
    if tail is not None:
        frames.append(tail)
        assert 0 < len(tail.samples) < block
    assert r.flush() is None
    pos = start
    for f in frames:
        assert f.start == pos and f.samples.dtype == np.int16
        pos = f.end
    assert pos == start + len(data) == r.position
    out = np.concatenate([f.samples for f in frames]) if frames else np.zeros(0, np.int16)
    assert np.array_equal(out, data)


def test_reblocker_frames_do_not_alias_input():
    buf = np.arange(320, dtype=np.int16)
    r = Reblocker(160)
    frames = r.push(buf)
    buf[:] = 0  # a device reusing its buffer must not change frames already handed out
    assert frames[1].samples[0] == 160
    with pytest.raises(ValueError):
        Reblocker(0)


def test_reblock_function():
    frames = list(reblock(np.arange(50, dtype=np.int16), 20, start=100))
    assert [(f.start, len(f.samples)) for f in frames] == [(100, 20), (120, 20), (140, 10)]


# ---------------------------------------------------------------------------------- noise floor
def test_noise_floor_follows_a_quieter_frame_at_once_and_a_louder_background_after_its_window():
    nf = NoiseFloor(window_s=1.0, min_dbfs=-90.0)
    levels = [-60.0] * 10 + [-20.0] * 40  # 0.1 s frames: quiet room, then a loud new background
    floors = [nf.update(x, 0.1) for x in levels]
    assert floors[9] == -60.0
    assert all(f == -60.0 for f in floors[10:19])  # the quiet minimum is still inside the 1 s window
    assert floors[-1] == -20.0  # ... and the new background is the floor once the window has passed
    assert nf.update(-70.0, 0.1) == -70.0  # a quieter frame lowers it at once


def test_noise_floor_ignores_speech_bursts_and_never_goes_below_its_minimum():
    nf = NoiseFloor(window_s=3.0, min_dbfs=-90.0)
    speech = [-55.0, -25.0, -22.0, -30.0, -24.0] * 10  # words with short pauses at the room's level
    assert max(nf.update(x, 0.1) for x in speech) == -55.0
    assert NoiseFloor(min_dbfs=-90.0).update(-120.0, 0.032) == -90.0  # digital silence
