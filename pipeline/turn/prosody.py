"""Audio cues of a turn's end, measured on the speech just before a pause: pure functions over arrays.

What a speaker does at the end of a turn and less at a breath between clauses (measured on the shared
clips by scripts/pause_dataset.py, docs/turn-end.md):
- the pitch falls into the pause and ends low in the speaker's range (final lowering);
- the last syllables are drawn out (phrase-final lengthening): the last voiced stretch is long;
- the voice fades into the pause rather than stopping.

Everything is computed on the last `WINDOW_S` of speech before the pause (a few ms of numpy), with the
pitch tracker the perception stage uses (pipeline/perception/features.py). A figure that cannot be had
(too little voicing: a whisper, a short utterance) is None, and the rule does without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pipeline.frames import SAMPLE_RATE, Pcm
from pipeline.perception import features

WINDOW_S = 3.0  # speech analysed before the pause: enough for the speaker's range, a bounded cost
FINAL_S = 0.2  # "the end" of the speech: its last 200 ms (final pitch level, energy decay)
MIN_VOICED_RUN_FRAMES = 3  # voiced stretches shorter than 30 ms are tracker blips, not syllables
SPEECH_LEVEL_PERCENTILE = 90  # the speech level the final level is compared with (as features.pauses does)


@dataclass(frozen=True, slots=True)
class Prosody:
    final_slope_st_per_s: float | None  # pitch slope over the last half second of voicing (features.final_slope)
    final_pitch_st: float | None  # pitch of the last voiced 200 ms, semitones above the window's median (< 0: low)
    lengthening: float | None  # last voiced stretch / median voiced stretch in the window (> 1: drawn out)
    final_level_db: float | None  # level of the last 200 ms of speech under the window's speech level (dB, <= 0)
    decay_db_per_s: float | None  # slope of the level over the last 200 ms of speech (< 0: fading)

    def as_dict(self) -> dict[str, float | None]:
        return {k: None if v is None else round(float(v), 3) for k, v in asdict(self).items()}


NO_PROSODY = Prosody(None, None, None, None, None)


def prosody(audio: Pcm, speech_end: int) -> Prosody:
    """The cues of the speech in `audio` before sample `speech_end` (where the pause starts)."""
    end = max(0, min(len(audio), speech_end))
    start = max(0, end - round(WINDOW_S * SAMPLE_RATE))
    speech = audio[start:end]
    if len(speech) < round(2 * FINAL_S * SAMPLE_RATE):
        return NO_PROSODY
    level, decay = _energy(speech)
    slope, final_st, lengthening = _pitch(speech)
    return Prosody(slope, final_st, lengthening, level, decay)


def _energy(speech: Pcm) -> tuple[float | None, float | None]:
    hop = round(features.HOP_S * SAMPLE_RATE)
    levels = features.frame_levels_db(speech, 2 * hop, hop)
    tail = round(FINAL_S / features.HOP_S)
    if len(levels) < 2 * tail:
        return None, None
    ref = float(np.percentile(levels, SPEECH_LEVEL_PERCENTILE))
    last = levels[-tail:]
    slope = float(np.polyfit(np.arange(tail) * features.HOP_S, last, 1)[0])
    return min(0.0, float(np.mean(last)) - ref), slope


def _pitch(speech: Pcm) -> tuple[float | None, float | None, float | None]:
    track = features.pitch_track(speech)
    voiced = track.voiced
    if int(voiced.sum()) < features.MIN_VOICED_FRAMES:
        return None, None, None
    slope = features.final_slope(track)
    f0 = track.f0_hz[voiced]
    t = track.times_s[voiced]
    final = f0[t >= t[-1] - FINAL_S]
    final_st = float(features.semitones(np.array([np.median(final)]), float(np.median(f0)))[0])
    runs = _voiced_runs(voiced)
    lengthening = runs[-1] / float(np.median(runs)) if len(runs) >= 2 else None
    return slope, final_st, lengthening


def _voiced_runs(voiced: np.ndarray) -> list[int]:
    """Lengths (frames) of the voiced stretches, oldest first, blips under MIN_VOICED_RUN_FRAMES left out."""
    padded = np.concatenate([[False], voiced, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    lengths = edges[1::2] - edges[::2]
    return [int(n) for n in lengths if n >= MIN_VOICED_RUN_FRAMES]
