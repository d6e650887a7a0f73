"""Small, pure audio helpers over numpy arrays (no I/O, no global state; `wav_bytes` returns bytes).

Conventions:
- int16 PCM <-> float32 in [-1, 1) uses the 32768 scale, so `int16_to_float` then `float_to_int16`
  round-trips exactly; floats outside [-1, 1] are clipped, never wrapped.
- Multi-channel audio is shaped (n_samples, n_channels), as sounddevice and soundfile deliver it.
- Resampling is soxr ("HQ" quality). `resample` is one-shot; `StreamResampler` keeps the filter
  state between chunks so chunked device audio has no clicks at chunk boundaries.
"""

from __future__ import annotations

import io
import math
import wave
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt
import soxr

from pipeline.frames import SAMPLE_RATE, AudioFrame, Pcm

Int16Array = npt.NDArray[np.int16]
FloatArray = npt.NDArray[np.float32]

SILENCE_DBFS = -120.0  # rms_dbfs of digital silence (and of anything quieter)
_INT16_SCALE = 32768.0


def to_mono(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """(n,) -> unchanged; (n, ch) -> (n,) channel mean. int16 stays int16 (rounded), floats -> float32."""
    a = np.asarray(x)
    if a.ndim == 1:
        return a
    if a.ndim != 2:
        raise ValueError(f"expected (n,) or (n, channels) audio, got shape {a.shape}")
    if a.shape[1] == 1:
        return a[:, 0]
    mean = a.mean(axis=1, dtype=np.float64)
    if a.dtype == np.int16:
        # The mean of int16 values is always inside the int16 range: no clipping needed.
        return np.rint(mean).astype(np.int16)
    return mean.astype(np.float32)


def int16_to_float(x: npt.NDArray[np.int16]) -> FloatArray:
    """int16 PCM -> float32 in [-1, 1)."""
    return (np.asarray(x, dtype=np.float32) / np.float32(_INT16_SCALE)).astype(np.float32, copy=False)


def float_to_int16(x: npt.NDArray[Any]) -> Int16Array:
    """float audio (nominally [-1, 1]) -> int16 PCM, rounded and clipped to [-32768, 32767]. NaN -> 0."""
    a = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint(a * _INT16_SCALE), -32768, 32767).astype(np.int16)


def resample(x: npt.NDArray[Any], from_rate: int, to_rate: int, quality: str = "HQ") -> npt.NDArray[Any]:
    """One-shot resampling of a whole signal, (n,) or (n, ch).

    int16 in -> int16 out (soxr clips); any float in -> float32 out. Equal rates return a copy.
    """
    a = np.asarray(x)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if a.dtype != np.int16:
        a = a.astype(np.float32, copy=False)
    if from_rate == to_rate:
        return a.copy()
    if a.shape[0] == 0:
        return a.copy()
    return np.asarray(soxr.resample(np.ascontiguousarray(a), from_rate, to_rate, quality=quality))


class StreamResampler:
    """Resample a stream arriving in chunks of any size (device callbacks) without boundary clicks.

    Wraps `soxr.ResampleStream`, which keeps the filter state between calls. Output sizes vary per
    chunk (the filter has a delay, ~1-2 ms at HQ); `flush()` returns the tail held back by the delay.
    Input is (n,) or (n, channels) of `dtype` (int16 or float32); output has the same dtype.
    Equal rates are a pass-through (copies, so callers may keep the result).
    """

    def __init__(self, from_rate: int, to_rate: int, channels: int = 1, dtype: Any = np.int16,
                 quality: str = "HQ") -> None:
        if from_rate <= 0 or to_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
        self.from_rate = int(from_rate)
        self.to_rate = int(to_rate)
        self.channels = int(channels)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.int16), np.dtype(np.float32)):
            raise ValueError(f"StreamResampler supports int16 and float32, not {self.dtype}")
        self.samples_in = 0
        self.samples_out = 0
        self._stream: Any = None
        if self.from_rate != self.to_rate:
            self._stream = soxr.ResampleStream(self.from_rate, self.to_rate, self.channels,
                                               dtype=self.dtype.name, quality=quality)

    @property
    def passthrough(self) -> bool:
        return self._stream is None

    def process(self, chunk: npt.NDArray[Any], last: bool = False) -> npt.NDArray[Any]:
        a = np.ascontiguousarray(np.asarray(chunk, dtype=self.dtype))
        self.samples_in += a.shape[0]
        out = a.copy() if self._stream is None else np.asarray(self._stream.resample_chunk(a, last=last))
        self.samples_out += out.shape[0]
        return out

    def flush(self) -> npt.NDArray[Any]:
        """End of stream: the samples still held in the filter. The resampler can then be `reset()`."""
        shape = (0,) if self.channels == 1 else (0, self.channels)
        return self.process(np.zeros(shape, dtype=self.dtype), last=True)

    def reset(self) -> None:
        if self._stream is not None:
            self._stream.clear()
        self.samples_in = 0
        self.samples_out = 0


def rms(x: npt.NDArray[Any]) -> float:
    """RMS as a fraction of full scale: int16 is scaled by 32768, floats are taken as [-1, 1].
    Empty input gives 0.0."""
    a = np.asarray(x)
    if a.size == 0:
        return 0.0
    # One float32 dot product: it runs twice per 32 ms VAD frame (Silero's state-reset level and the
    # segmenter's energy), so np.mean's generic path cost 0.3 % of a core in silence.
    f = a.astype(np.float32, copy=False).ravel()
    value = math.sqrt(float(np.dot(f, f)) / a.size)
    return value / _INT16_SCALE if a.dtype.kind in "iu" else value  # dtype.kind: cheaper than issubdtype


def dbfs(rms: float) -> float:
    """An RMS fraction of full scale (see `rms`) in dBFS. Zero, NaN, inf and anything below
    `SILENCE_DBFS` give `SILENCE_DBFS` (-120.0) instead of -inf, so the value is always usable in
    arithmetic and metrics."""
    if not math.isfinite(rms) or rms <= 0.0:
        return SILENCE_DBFS
    return max(SILENCE_DBFS, 20.0 * math.log10(rms))


def rms_dbfs(x: npt.NDArray[Any]) -> float:
    """RMS level in dBFS (a full-scale square wave is 0 dBFS, a full-scale sine about -3 dBFS).

    int16 is scaled by 32768, floats are taken as [-1, 1]. Empty input and digital silence give
    `SILENCE_DBFS` (-120.0), see `dbfs`.
    """
    return dbfs(rms(x))


class NoiseFloor:
    """Running noise floor of a stream of frame levels (dBFS): the quietest frame of the last
    `window_s` (minimum statistics in their simplest form). Speech has pauses within that window, so it
    does not lift the floor; a lasting new background becomes the floor once the window has passed.
    Never below `min_dbfs`: digital silence would otherwise make every later frame look loud."""

    def __init__(self, window_s: float = 3.0, min_dbfs: float = -90.0) -> None:
        self.window_s = window_s
        self.min_dbfs = min_dbfs
        self._t = 0.0  # stream time of the next frame, s
        self._mins: deque[tuple[float, float]] = deque()  # (time, level), levels increasing: window minima

    def update(self, frame_dbfs: float, frame_s: float) -> float:
        """Add one frame of `frame_s` seconds; returns the floor including it."""
        x = max(frame_dbfs, self.min_dbfs)
        while self._mins and self._mins[-1][1] >= x:
            self._mins.pop()
        self._mins.append((self._t, x))
        self._t += frame_s
        while self._mins[0][0] <= self._t - self.window_s - 1e-9:
            self._mins.popleft()
        return self._mins[0][1]


class Reblocker:
    """Accumulate chunks of any size and cut them into fixed-size `AudioFrame`s with stream positions.

    Positions count the samples pushed: the first frame starts at `start`, each next one where the
    previous ended. Samples that do not fill a block wait for the next `push`; `flush()` returns
    them as one shorter final frame (no padding: the stream length stays exact).
    """

    def __init__(self, block: int, start: int = 0) -> None:
        if block <= 0:
            raise ValueError(f"block size must be positive, got {block}")
        self.block = int(block)
        self.position = int(start)  # stream position of the next frame's first sample
        self._pending: Int16Array = np.zeros(0, dtype=np.int16)

    @property
    def pending(self) -> int:
        """Samples waiting for a full block."""
        return len(self._pending)

    def push(self, chunk: npt.NDArray[Any]) -> list[AudioFrame]:
        a = np.asarray(chunk, dtype=np.int16).reshape(-1)
        if len(a) == 0:
            return []
        buf = np.concatenate((self._pending, a)) if len(self._pending) else a
        n_full = len(buf) // self.block
        frames: list[AudioFrame] = []
        for i in range(n_full):
            # Copies, so a frame never aliases the caller's buffer (device buffers get reused).
            frames.append(AudioFrame(buf[i * self.block:(i + 1) * self.block].copy(), self.position))
            self.position += self.block
        self._pending = buf[n_full * self.block:].copy()
        return frames

    def flush(self) -> AudioFrame | None:
        if len(self._pending) == 0:
            return None
        frame = AudioFrame(self._pending, self.position)
        self.position += len(self._pending)
        self._pending = np.zeros(0, dtype=np.int16)
        return frame


def reblock(x: npt.NDArray[Any], block: int, start: int = 0) -> Iterator[AudioFrame]:
    """Cut a whole signal into `block`-sample frames from position `start`; the last may be shorter."""
    r = Reblocker(block, start)
    yield from r.push(x)
    tail = r.flush()
    if tail is not None:
        yield tail


# ----------------------------------------------------------------------- speech bounds (ground truth)
ENVELOPE_WIN, ENVELOPE_HOP = 800, 160  # 50 ms windows every 10 ms, at 16 kHz


def envelope_db(audio: npt.NDArray[np.int16]) -> npt.NDArray[np.float64]:
    """Short-time energy in dBFS: 50 ms windows every 10 ms (window i is centred at `window_center(i)`)."""
    x = audio.astype(np.float64)
    n = max(0, (len(x) - ENVELOPE_WIN) // ENVELOPE_HOP + 1)
    c = np.concatenate([[0.0], np.cumsum(x * x)])
    idx = np.arange(n) * ENVELOPE_HOP
    out: npt.NDArray[np.float64] = 10 * np.log10((c[idx + ENVELOPE_WIN] - c[idx]) / ENVELOPE_WIN / 32768**2 + 1e-12)
    return out


def window_center(i: int) -> int:
    return i * ENVELOPE_HOP + ENVELOPE_WIN // 2


def speech_bounds(audio: npt.NDArray[np.int16], core_db: float = 12.0, low_db: float = 6.0,
                  rate: int = 16_000) -> tuple[float, float]:
    """A clip's true speech bounds (s) from its own energy envelope, independent of any VAD.

    The classic two-threshold endpoint rule: the loud core is within `core_db` of the clip's speech
    level (95th percentile), extended outwards while the level stays `low_db` above its noise floor
    (10th percentile). A single "x dB below the peak" rule counts the noisy lead-in of some clips
    (e.g. 2830-3980-0043, 2078-142845-0041) as speech. Used by the tests and scripts/bench.py.
    """
    db = envelope_db(audio)
    if len(db) == 0:
        return 0.0, len(audio) / rate
    floor, level = np.percentile(db, [10, 95])
    core = np.flatnonzero(db >= level - core_db)
    i, j = int(core[0]), int(core[-1])
    while i > 0 and db[i - 1] >= floor + low_db:
        i -= 1
    while j < len(db) - 1 and db[j + 1] >= floor + low_db:
        j += 1
    return window_center(i) / rate, window_center(j) / rate


def wav_bytes(audio: Pcm, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono WAV of int16 (or float in [-1, 1]) samples, written with the stdlib `wave`."""
    a = np.asarray(audio)
    if not np.issubdtype(a.dtype, np.integer):
        a = np.clip(a.astype(np.float32) * 32768.0, -32768, 32767)
    pcm = a.astype("<i2", copy=False)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()
