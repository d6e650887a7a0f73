"""Silero VAD v6 engine: the ONNX model that faster-whisper ships, run frame by frame.

The model takes 512 new samples (32 ms at 16 kHz) preceded by the last 64 samples of the previous
frame (its "context"), plus the LSTM state `h`, `c`, and returns a speech probability and the new
state. This is exactly what `faster_whisper.vad.SileroVADModel` does for a whole file at once; here
the context and state are carried from one call to the next so it works on a live stream.

State hygiene: the carried state drifts. After noise and 2.5 s of digital silence, a quiet speaker
(mfa_internalsil at -25 dB) scored above 0.5 on 62 frames with the carried state and 89 with a fresh
one (tests/test_vad_hearing.py). Resetting often is worse: inside a hesitant speaker's pauses it
costs the next phrase its context (26-30 frames with resets after 0.3-1 s of non-speech; jfk's "ask
not" is missed with a reset in the pause before it). So the state is reset when a non-speech
stretch has lasted `state_reset_ms` (2 s: 87 frames), longer than the pauses inside speech, and again
every `state_reset_ms` while it lasts, as pipecat does: the state drifts in long silence or noise too
(the quiet speaker after 30 s of digital silence: 67 frames carried, 26 with one reset at 2 s, 86
with a reset every 2 s; speech at 5 dB SNR after 20 s of its noise: 1531 of a fresh state's 1639
frames over 8 mixes with one reset, 1597 with periodic resets).
Only quiet non-speech counts (frames below `state_reset_max_dbfs`): a loud background the state has
adapted to stays adapted. A fresh state hears the singing in background music as speech (mix_01's
music tail: 250 frames over 0.5 with resets there, 2 without), which the relay then echoed as lyrics.
The price: speech in loud noise after a long stretch of that noise keeps the adapted state (86 % of a
fresh state's frames over 0.5 across 12 mixes at 5 dB SNR, against 98 % with resets in the noise).
A state adapted to loud audio is stale once that audio stops. After a loud speaker (-18 dBFS) it heard a
speaker 27 dB quieter, 0.3 / 1 s later over -65 dBFS room noise, on 64.5 / 76.8 % of a fresh state's frames
over 0.5 (2 loud x 4 quiet clips); after 4 s of loud noise (6 noises at -15/-25 dBFS, then 4 clips at
-40/-30 dBFS) on 93.0 %; and in mix_04, whose music stops half a second before the speaker goes on, it
scored "need have" under 0.2. Resetting there costs the next phrase its context as above (jfk), so a second,
fresh state listens instead: once 256 ms of frames are `relisten_drop_db` (20 dB) below the running power of
the loud audio before them, it runs beside the carried one for 2 s, the probability is the larger of the two,
and when it hears speech (>= threshold) that the carried one does not, it takes over. With it: 99.7 / 97.7 %
and 99.6 %; mix_04's speech passes 0.5 at 4.26 s instead of 4.90 s; jfk and five other clips with pauses lose
no frame; mix_01's and mix_02's music and the noises alone gain none (four frame alignments). A rest in music
is shorter than 256 ms: a fresh state started after a one-frame drop inside mix_01's music heard its singing
(153 frames over 0.5 against 15).

ONNX Runtime runs with one intra-op and one inter-op thread, as faster-whisper's own `SileroVADModel`
does (faster_whisper/vad.py in faster-whisper 1.2): a pool has little to split in one 512-sample frame
(~60 µs on one thread, BENCHMARKS.md item 6), and its threads would compete with Whisper for the cores.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dsp import rms_dbfs
from pipeline.frames import SAMPLE_RATE, Pcm, ms_to_samples
from pipeline.vad.base import VadEngine

DEFAULT_THRESHOLD = 0.5  # faster-whisper's and Silero's default
DEFAULT_STATE_RESET_MS = 2000  # matches VadSettings.state_reset_ms
DEFAULT_STATE_RESET_BELOW = 0.2  # matches VadSettings.state_reset_below
DEFAULT_STATE_RESET_MAX_DBFS = -40.0  # matches VadSettings.state_reset_max_dbfs
DEFAULT_RELISTEN_DROP_DB = 20.0  # matches VadSettings.relisten_drop_db
LOUD_MIN_FRAMES = 8  # 256 ms of loud audio (>= state_reset_max_dbfs) before a drop below it counts
LOUD_SMOOTHING = 1 / 16  # the loud audio's running power follows ~0.5 s of frames
DROP_FRAMES = 8  # 256 ms below it: the loud audio has stopped (a rest in music is shorter, mix_01)
LISTEN_FRAMES = 62  # ~2 s: how long a fresh state listens beside the carried one after a drop
MODEL_FILE = "silero_vad_v6.onnx"
FRAME_SAMPLES = 512  # the v5/v6 model's window at 16 kHz
CONTEXT_SAMPLES = 64  # samples of the previous window prepended to each input
STATE_SHAPE = (1, 1, 128)


def bundled_model_path() -> Path:
    """Path of the Silero ONNX model inside the installed faster-whisper package."""
    # find_spec locates the package without importing it (faster_whisper imports CTranslate2).
    spec = importlib.util.find_spec("faster_whisper")
    if spec is None or not spec.submodule_search_locations:  # pragma: no cover - a hard dependency
        raise RuntimeError("the silero VAD needs faster-whisper, which ships its ONNX model")
    path = Path(next(iter(spec.submodule_search_locations))) / "assets" / MODEL_FILE
    if not path.is_file():
        raise RuntimeError(f"the silero VAD model is missing from faster-whisper: {path} does not exist")
    return path


@functools.cache
def _session(model_path: str) -> Any:
    """One ONNX Runtime session per model file for the whole process: the model is stateless (the
    recurrent state and context are inputs and outputs, kept by each `SileroVad`), and a session
    costs memory for every relay of `echo-relay serve`."""
    import onnxruntime  # imported here so `import pipeline.vad` stays cheap

    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"], sess_options=opts)


class _State:
    """One recurrent state of the model: LSTM `h`, `c` and the input row [64 samples of context | 512 new
    samples] (float32 in [-1, 1), preallocated)."""

    __slots__ = ("c", "h", "input")

    def __init__(self) -> None:
        self.input = np.zeros((1, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        self.h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.c = np.zeros(STATE_SHAPE, dtype=np.float32)

    def run(self, session: Any, frame: Pcm) -> float:
        x = self.input
        x[0, :CONTEXT_SAMPLES] = x[0, -CONTEXT_SAMPLES:]  # context = tail of the previous frame
        np.multiply(frame, 1.0 / 32768.0, out=x[0, CONTEXT_SAMPLES:], casting="unsafe")
        out, self.h, self.c = session.run(None, {"input": x, "h": self.h, "c": self.c})
        return float(out.reshape(-1)[0])


class SileroVad(VadEngine):
    """Speech probability per 512-sample frame; recurrent state kept across calls until `reset()`, or
    until `state_reset_ms` of frames in a row score below `state_reset_below` while quieter than
    `state_reset_max_dbfs`, and every `state_reset_ms` after that while they do (0 = never). When
    frames fall `relisten_drop_db` below the loud audio before them, a fresh state listens beside the
    carried one and takes over if it hears speech the carried one misses (0 = never)."""

    name = "silero"
    frame_samples = FRAME_SAMPLES

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, model_path: str | Path | None = None, *,
                 state_reset_ms: int = DEFAULT_STATE_RESET_MS,
                 state_reset_below: float = DEFAULT_STATE_RESET_BELOW,
                 state_reset_max_dbfs: float = DEFAULT_STATE_RESET_MAX_DBFS,
                 relisten_drop_db: float = DEFAULT_RELISTEN_DROP_DB) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"silero threshold must be between 0 and 1 (got {threshold!r})")
        self.threshold = threshold
        self.model_path = Path(model_path) if model_path is not None else bundled_model_path()
        self._session: Any = _session(str(self.model_path.resolve()))
        self._state = _State()
        self.state_reset_frames = -(-ms_to_samples(state_reset_ms) // FRAME_SAMPLES)  # rounded up
        self.state_reset_below = state_reset_below
        self.state_reset_max_dbfs = state_reset_max_dbfs
        self.relisten_drop_db = relisten_drop_db
        self.state_resets = 0  # resets after long quiet non-speech
        self.takeovers = 0  # fresh states that heard speech the carried one missed
        self._quiet_frames = 0  # frames in a row below state_reset_below, quieter than state_reset_max_dbfs
        self._listener: _State | None = None  # the fresh state listening beside the carried one
        self._listen_left = 0  # ... for this many more frames
        self._loud_power = 0.0  # running mean power of the loud frames in a row (full scale = 1)
        self._loud_frames = 0  # ... and how many it holds
        self._dropped = 0  # frames in a row relisten_drop_db below it

    def speech_prob(self, frame: Pcm) -> float:
        if len(frame) != FRAME_SAMPLES:
            raise ValueError(f"silero VAD expects {FRAME_SAMPLES} samples per frame, got {len(frame)}")
        level = rms_dbfs(frame)
        prob = self._state.run(self._session, frame)
        if self._listener is not None:
            fresh = self._listener.run(self._session, frame)
            self._listen_left -= 1
            if fresh >= self.threshold > prob:  # the carried state misses speech a fresh one hears
                self._state, self.takeovers = self._listener, self.takeovers + 1
                self._listener = None
            elif self._listen_left <= 0:
                self._listener = None
            prob = max(prob, fresh)
        self._watch_drop(level)
        if prob >= self.state_reset_below or level >= self.state_reset_max_dbfs:
            self._quiet_frames = 0
        else:
            self._quiet_frames += 1
            if self.state_reset_frames and self._quiet_frames % self.state_reset_frames == 0:
                self.state_resets += 1  # every state_reset_ms of the stretch: what follows starts fresh
                self._clear()
        return prob

    def _watch_drop(self, level: float) -> None:
        """Start a fresh listener once DROP_FRAMES frames in a row are `relisten_drop_db` below the running
        power of the loud audio before them."""
        if not self.relisten_drop_db:
            return
        if (self._loud_frames >= LOUD_MIN_FRAMES
                and level <= 10.0 * math.log10(self._loud_power) - self.relisten_drop_db):
            self._dropped += 1
            if self._dropped >= DROP_FRAMES:
                self._listener, self._listen_left = _State(), LISTEN_FRAMES
                self._loud_power, self._loud_frames, self._dropped = 0.0, 0, 0
            return
        self._dropped = 0
        if level >= self.state_reset_max_dbfs:
            power = 10.0 ** (level / 10.0)
            self._loud_power = power if not self._loud_frames else (
                self._loud_power + LOUD_SMOOTHING * (power - self._loud_power))
            self._loud_frames += 1

    def reset(self) -> None:
        self._quiet_frames = 0
        self._loud_power, self._loud_frames, self._dropped = 0.0, 0, 0
        self._clear()

    def _clear(self) -> None:
        self._state, self._listener = _State(), None

    def describe(self) -> str:
        reset = (f"state reset after {self.state_reset_frames * FRAME_SAMPLES * 1000 // SAMPLE_RATE} ms below "
                 f"{self.state_reset_below:g}") if self.state_reset_frames else "no state reset"
        if self.relisten_drop_db:
            reset += f", a fresh state listening after a {self.relisten_drop_db:g} dB drop"
        return f"silero v6 (threshold {self.threshold:g}, 32 ms frames, 1 thread, {reset})"

    def __repr__(self) -> str:
        return f"SileroVad(threshold={self.threshold!r})"
