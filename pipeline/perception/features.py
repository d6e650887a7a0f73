"""Pure DSP over one utterance's 16 kHz mono int16 audio: level, pitch, pauses. No state, no I/O.

The built-in analyzers (pipeline/perception/builtins.py) are thin wrappers over these functions, so each
figure can be unit-tested on arrays. Every function takes the audio and returns plain Python numbers
(JSON-serialisable), never NumPy scalars.

Pitch is YIN (de Cheveigné and Kawahara, 2002): per frame, the cumulative-mean-normalised difference
function; the first lag whose value dips under `YIN_THRESHOLD` is the period. Noise (a whisper, a hiss)
has no such dip, so whispered speech comes out unvoiced. The difference function is computed for all
frames at once with FFT cross-correlation, at 8 kHz (voice f0 is under 500 Hz): about 10 ms for 10 s of audio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from pipeline.dsp import SILENCE_DBFS, dbfs, int16_to_float, resample, rms
from pipeline.frames import SAMPLE_RATE

CLIP_LEVEL = 32767 - 1  # an int16 sample at or beyond this magnitude is clipped

# Frame grid shared by pitch and pauses: 10 ms hops.
HOP_S = 0.010
PITCH_RATE = 8000  # pitch runs on the audio resampled to this rate (a quarter of the FFT work of 16 kHz)
# YIN: a 24 ms integration window (more than one period of the lowest f0); lags for 65-500 Hz (low male
# voices to children's and a raised voice).
YIN_WINDOW = 192
F0_MIN_HZ = 65.0
F0_MAX_HZ = 500.0
YIN_THRESHOLD = 0.15  # the paper's range is 0.1-0.2: lower rejects more breathy voice as unvoiced
YIN_BLOCK_FRAMES = 256  # frames per FFT block (2.56 s of audio)
VOICED_FLOOR_DB = 35.0  # frames this far below the utterance's loudest are silence, never voiced
MIN_VOICED_FRAMES = 5  # fewer voiced frames than this (50 ms): no pitch figures at all
CONTOUR_S = 0.5  # the final contour is the slope over the last half second of voiced frames
CONTOUR_SEMITONES_PER_S = 4.0  # |slope| under this is "flat"; a statement's final fall is ~5-20 st/s

PAUSE_FRAME_S = 0.020  # pauses are found on 20 ms frames
MIN_PAUSE_S = 0.2  # a gap shorter than this is articulation (stops, closures), not a pause
PAUSE_BELOW_DB = 20.0  # frames this far below the utterance's speech level (90th percentile) are pause


@dataclass(frozen=True, slots=True)
class Loudness:
    rms_dbfs: float  # RMS level of the whole audio
    peak_dbfs: float  # highest sample magnitude
    clipped_samples: int  # samples at full scale
    clipped_ratio: float  # clipped_samples / samples

    def as_dict(self) -> dict[str, float | int | bool]:
        return {"rms_dbfs": round(self.rms_dbfs, 2), "peak_dbfs": round(self.peak_dbfs, 2),
                "clipped_samples": self.clipped_samples, "clipped_ratio": round(self.clipped_ratio, 5),
                "clipping": self.clipped_samples > 0}


def loudness(audio: npt.NDArray[np.int16]) -> Loudness:
    if len(audio) == 0:
        return Loudness(SILENCE_DBFS, SILENCE_DBFS, 0, 0.0)
    ints = np.abs(np.asarray(audio, dtype=np.int32))
    clipped = int(np.count_nonzero(ints >= CLIP_LEVEL))
    return Loudness(dbfs(rms(audio)), dbfs(rms(ints.max(keepdims=True))), clipped, clipped / len(audio))


def frame_levels_db(audio: npt.NDArray[np.int16], frame: int, hop: int) -> npt.NDArray[np.float64]:
    """RMS level (dBFS) of each frame of `frame` samples every `hop` samples (the last partial frame dropped)."""
    x = int16_to_float(audio)
    if len(x) < frame:
        return np.zeros(0)
    frames = np.lib.stride_tricks.sliding_window_view(x, frame)[::hop]
    rms = np.sqrt(np.mean(frames * frames, axis=1))
    return np.asarray(20.0 * np.log10(np.maximum(rms, 10 ** (SILENCE_DBFS / 20))), dtype=np.float64)


# ----------------------------------------------------------------------------------------- pitch
@dataclass(frozen=True, slots=True)
class PitchTrack:
    """f0 per 10 ms frame (Hz; NaN = unvoiced) and each frame's centre time in seconds from audio[0]."""

    f0_hz: npt.NDArray[np.float64]
    times_s: npt.NDArray[np.float64]

    @property
    def voiced(self) -> npt.NDArray[np.bool_]:
        return np.asarray(~np.isnan(self.f0_hz))


def pitch_track(audio: npt.NDArray[np.int16], sample_rate: int = SAMPLE_RATE) -> PitchTrack:
    """YIN f0 every HOP_S; frames quieter than VOICED_FLOOR_DB under the loudest frame are unvoiced."""
    x = int16_to_float(resample(audio, sample_rate, PITCH_RATE) if sample_rate != PITCH_RATE else audio)
    hop = round(HOP_S * PITCH_RATE)
    tau_max = math.ceil(PITCH_RATE / F0_MIN_HZ)
    length = YIN_WINDOW + tau_max
    if len(x) < length:
        return PitchTrack(np.zeros(0), np.zeros(0))
    frames = np.lib.stride_tricks.sliding_window_view(x, length)[::hop]
    head = frames[:, :YIN_WINDOW]
    levels = 10.0 * np.log10(np.maximum(np.einsum("ij,ij->i", head, head) / YIN_WINDOW, 1e-12))  # dBFS
    loud = levels >= levels.max() - VOICED_FLOOR_DB
    # In blocks of frames: the FFT work is the same, the memory stays a few MB whatever the utterance's length.
    f0 = np.concatenate([_yin(frames[i:i + YIN_BLOCK_FRAMES], loud[i:i + YIN_BLOCK_FRAMES])
                         for i in range(0, len(frames), YIN_BLOCK_FRAMES)])
    times = (np.arange(len(frames)) * hop + YIN_WINDOW / 2) / PITCH_RATE
    return PitchTrack(f0, times)


def _yin(frames: npt.NDArray[np.float32], loud: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """f0 (Hz, NaN = unvoiced) of each frame of YIN_WINDOW + tau_max samples at PITCH_RATE."""
    tau_min = math.floor(PITCH_RATE / F0_MAX_HZ)
    tau_max = frames.shape[1] - YIN_WINDOW
    n_fft = 1 << (frames.shape[1] + YIN_WINDOW - 1).bit_length()
    # c[t, tau] = sum_{j < W} x[j] x[j + tau]: cross-correlation of the first W samples with the frame.
    spec_full = np.fft.rfft(frames, n_fft)
    spec_head = np.fft.rfft(frames[:, :YIN_WINDOW], n_fft)
    corr = np.fft.irfft(spec_full * np.conj(spec_head), n_fft)[:, : tau_max + 1]
    squares = np.cumsum(np.pad(frames * frames, ((0, 0), (1, 0))), axis=1)
    energy_head = squares[:, YIN_WINDOW]  # sum_{j < W} x[j]^2
    lags = np.arange(tau_max + 1)
    energy_lag = squares[:, lags + YIN_WINDOW] - squares[:, lags]  # sum_{tau <= j < tau + W} x[j]^2
    diff = np.maximum(energy_head[:, None] + energy_lag - 2.0 * corr, 0.0)
    # Cumulative-mean normalisation: d'(tau) = d(tau) * tau / sum_{k=1..tau} d(k); d'(0) = 1.
    cum = np.cumsum(diff[:, 1:], axis=1)
    cmnd = np.ones_like(diff)
    cmnd[:, 1:] = diff[:, 1:] * lags[1:] / np.maximum(cum, 1e-12)

    f0 = np.full(len(frames), np.nan)
    window = cmnd[:, tau_min:]
    below = window < YIN_THRESHOLD
    for t in np.flatnonzero(below.any(axis=1) & loud):
        i = int(np.argmax(below[t]))
        while i + 1 < window.shape[1] and window[t, i + 1] < window[t, i]:  # down to the dip's minimum
            i += 1
        if i == window.shape[1] - 1:  # still falling at the longest lag: low rumble or hum, not a voice
            continue
        tau = float(i + tau_min)
        if i > 0:  # parabolic interpolation between lags
            a, b, c = window[t, i - 1], window[t, i], window[t, i + 1]
            denom = a - 2 * b + c
            if denom > 0:
                tau += 0.5 * (a - c) / denom
        f0[t] = PITCH_RATE / tau
    return f0


def semitones(hz: npt.NDArray[np.float64], ref_hz: float) -> npt.NDArray[np.float64]:
    return np.asarray(12.0 * np.log2(hz / ref_hz), dtype=np.float64)


def final_slope(track: PitchTrack) -> float | None:
    """Slope (semitones per second) of a line through the voiced frames of the last CONTOUR_S of voicing."""
    voiced = track.voiced
    if int(voiced.sum()) < MIN_VOICED_FRAMES:
        return None
    t = track.times_s[voiced]
    hz = track.f0_hz[voiced]
    tail = t >= t[-1] - CONTOUR_S
    if int(tail.sum()) < MIN_VOICED_FRAMES:
        return None
    st = semitones(hz[tail], float(np.median(hz)))
    slope = float(np.polyfit(t[tail], st, 1)[0])
    return slope


def contour(slope: float | None) -> str | None:
    if slope is None:
        return None
    if slope <= -CONTOUR_SEMITONES_PER_S:
        return "falling"
    if slope >= CONTOUR_SEMITONES_PER_S:
        return "rising"
    return "flat"


# ---------------------------------------------------------------------------------------- pauses
@dataclass(frozen=True, slots=True)
class Pause:
    start_s: float  # seconds from audio[0]
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def pauses(audio: npt.NDArray[np.int16], speech_start_s: float, speech_end_s: float,
           sample_rate: int = SAMPLE_RATE, min_pause_s: float = MIN_PAUSE_S) -> list[Pause]:
    """Silent stretches of at least `min_pause_s` strictly inside [speech_start_s, speech_end_s] (seconds from
    audio[0]): 20 ms frames more than PAUSE_BELOW_DB under the speech level (the 90th percentile frame)."""
    frame = round(PAUSE_FRAME_S * sample_rate)
    first = max(0, round(speech_start_s * sample_rate))
    last = min(len(audio), round(speech_end_s * sample_rate))
    levels = frame_levels_db(audio[first:last], frame, frame)
    if len(levels) < 3:
        return []
    quiet = levels < np.percentile(levels, 90) - PAUSE_BELOW_DB
    found: list[Pause] = []
    i = 0
    while i < len(quiet):
        if not quiet[i]:
            i += 1
            continue
        j = i
        while j < len(quiet) and quiet[j]:
            j += 1
        # Only between speech: a quiet run touching either end is the VAD's margin, not a pause.
        if i > 0 and j < len(quiet) and (j - i) * PAUSE_FRAME_S >= min_pause_s - 1e-9:
            found.append(Pause(speech_start_s + i * PAUSE_FRAME_S, speech_start_s + j * PAUSE_FRAME_S))
        i = j
    return found
