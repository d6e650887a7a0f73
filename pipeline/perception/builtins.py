"""Built-in analyzers: pure DSP over the utterance (pipeline/perception/features.py), no model downloads.

Every output field, its unit and its meaning are listed in docs/perception.md. Times are stream seconds
(the clock of `meta.audio_start_s`), levels dBFS, pitch Hz or semitones, rates per second.

Audio analyzers work on the speech the VAD found (`meta.audio_start_s` to `meta.audio_end_s`), not on the
pre-roll and hangover around it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pipeline.frames import SAMPLE_RATE, Pcm, UtteranceMeta
from pipeline.perception import features
from pipeline.perception.base import Result, VideoFrame
from pipeline.transform.base import OptionError

MS = 1000.0
ROUND_S = 3  # times to the millisecond
ROUND_HZ = 1


def speech_span(audio: Pcm, meta: UtteranceMeta) -> tuple[float, float]:
    """The VAD's speech bounds as seconds from audio[0] (clamped to the audio)."""
    total = len(audio) / SAMPLE_RATE
    start = min(total, max(0.0, meta.audio_start_s - meta.audio_offset_s))
    end = min(total, max(start, meta.audio_end_s - meta.audio_offset_s))
    return start, end


def speech_audio(audio: Pcm, meta: UtteranceMeta) -> Pcm:
    start, end = speech_span(audio, meta)
    return audio[round(start * SAMPLE_RATE):round(end * SAMPLE_RATE)]


# ------------------------------------------------------------------------------------------ audio
def loudness(audio: Pcm, meta: UtteranceMeta) -> Result:
    """Level of the speech: rms_dbfs, peak_dbfs, clipped_samples, clipped_ratio, clipping."""
    return features.loudness(speech_audio(audio, meta)).as_dict()


def pitch(audio: Pcm, meta: UtteranceMeta) -> Result:
    """Voice pitch (YIN): voiced_ratio, median_hz, low_hz/high_hz (10th/90th percentile), range_semitones,
    final_slope_st_per_s and final_contour (falling / rising / flat; None when too little is voiced)."""
    track = features.pitch_track(speech_audio(audio, meta))
    voiced = track.voiced
    out: dict[str, Any] = {"voiced_ratio": round(float(voiced.mean()), 3) if len(voiced) else 0.0,
                           "median_hz": None, "low_hz": None, "high_hz": None, "range_semitones": None,
                           "final_slope_st_per_s": None, "final_contour": None}
    if int(voiced.sum()) < features.MIN_VOICED_FRAMES:
        return out
    f0 = track.f0_hz[voiced]
    low, median, high = (float(v) for v in np.percentile(f0, [10, 50, 90]))
    slope = features.final_slope(track)
    out.update(median_hz=round(median, ROUND_HZ), low_hz=round(low, ROUND_HZ), high_hz=round(high, ROUND_HZ),
               range_semitones=round(float(12.0 * np.log2(high / low)), 2),
               final_slope_st_per_s=None if slope is None else round(slope, 2),
               final_contour=features.contour(slope))
    return out


class pauses:
    """Silences inside the speech: count, total_s, longest_s and each pause's start_s (stream time) and
    duration_s. Option `min_pause_ms` (default 200): shorter gaps are articulation, not pauses."""

    def __init__(self, min_pause_ms: float = features.MIN_PAUSE_S * MS) -> None:
        if not isinstance(min_pause_ms, (int, float)) or isinstance(min_pause_ms, bool) or min_pause_ms <= 0:
            raise OptionError("min_pause_ms", f"must be a number of milliseconds > 0, got {min_pause_ms!r}")
        self.min_pause_s = float(min_pause_ms) / MS

    def __call__(self, audio: Pcm, meta: UtteranceMeta) -> Result:
        start, end = speech_span(audio, meta)
        found = features.pauses(audio, start, end, min_pause_s=self.min_pause_s)
        origin = meta.audio_offset_s
        return {"count": len(found), "total_s": round(float(sum(p.duration_s for p in found)), ROUND_S),
                "longest_s": round(max((p.duration_s for p in found), default=0.0), ROUND_S),
                "pauses": [{"start_s": round(origin + p.start_s, ROUND_S), "duration_s": round(p.duration_s, ROUND_S)}
                           for p in found]}


def speaking_rate(audio: Pcm, meta: UtteranceMeta) -> Result:
    """Words per second of speech, from the ASR's words and the VAD's speech bounds: words, speech_s,
    words_per_second. None when the ASR heard no words."""
    words = len(meta.asr_text.split())
    seconds = max(0.0, meta.audio_end_s - meta.audio_start_s)
    if words == 0 or seconds <= 0:
        return None
    return {"words": words, "speech_s": round(seconds, ROUND_S), "words_per_second": round(words / seconds, 2)}


speaking_rate.after_asr = True  # type: ignore[attr-defined]


def language(audio: Pcm, meta: UtteranceMeta) -> Result:
    """What the ASR says the language is: language (ISO code), probability (of the detection; None when
    the language was fixed by asr.language or an English-only model), detected (whether Whisper weighed it),
    locked (the conversation's language was locked or fixed: pipeline/language.py)."""
    if meta.language is None:
        return None
    return {"language": meta.language, "probability": meta.language_probability,
            "detected": meta.language_probability is not None, "locked": meta.language_locked}


language.after_asr = True  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------ video
LUMA = (0.2126, 0.7152, 0.0722)  # Rec. 709 weights of R, G, B


class frame_stats:
    """Face-free statistics of a camera frame, to show the video path works: width, height, brightness
    (mean luma, 0-1), contrast (luma standard deviation, 0-1) and motion (mean absolute luma change from
    the previous analysed frame, 0-1; None on the first frame). Frames are downsampled by `step` pixels
    in each direction first (default 4)."""

    def __init__(self, step: int = 4) -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 1:
            raise OptionError("step", f"must be a whole number of pixels >= 1, got {step!r}")
        self.step = step
        self._previous: np.ndarray | None = None

    def __call__(self, frame: VideoFrame) -> Result:
        s = self.step
        luma = sum(w * frame.channel(c)[::s, ::s].astype(np.float32) for c, w in zip("RGB", LUMA, strict=True))
        luma = np.asarray(luma, dtype=np.float32) / 255.0
        previous, self._previous = self._previous, luma
        motion = None
        if previous is not None and previous.shape == luma.shape:
            motion = round(float(np.abs(luma - previous).mean()), 4)
        return {"width": frame.width, "height": frame.height, "brightness": round(float(luma.mean()), 4),
                "contrast": round(float(luma.std()), 4), "motion": motion}


AUDIO_BUILTINS: Mapping[str, Callable[..., Any]] = {
    "loudness": loudness, "pitch": pitch, "pauses": pauses, "speaking_rate": speaking_rate, "language": language,
}
VIDEO_BUILTINS: Mapping[str, Callable[..., Any]] = {"frame_stats": frame_stats}
