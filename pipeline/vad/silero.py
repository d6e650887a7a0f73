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

ONNX Runtime runs with one intra-op and one inter-op thread, as faster-whisper's own `SileroVADModel`
does (faster_whisper/vad.py in faster-whisper 1.2): a pool has little to split in one 512-sample frame
(~60 µs on one thread, BENCHMARKS.md item 6), and its threads would compete with Whisper for the cores.
"""

from __future__ import annotations

import functools
import importlib.util
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


class SileroVad(VadEngine):
    """Speech probability per 512-sample frame; recurrent state kept across calls until `reset()`, or
    until `state_reset_ms` of frames in a row score below `state_reset_below` while quieter than
    `state_reset_max_dbfs`, and every `state_reset_ms` after that while they do (0 = never)."""

    name = "silero"
    frame_samples = FRAME_SAMPLES

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, model_path: str | Path | None = None, *,
                 state_reset_ms: int = DEFAULT_STATE_RESET_MS,
                 state_reset_below: float = DEFAULT_STATE_RESET_BELOW,
                 state_reset_max_dbfs: float = DEFAULT_STATE_RESET_MAX_DBFS) -> None:
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"silero threshold must be between 0 and 1 (got {threshold!r})")
        self.threshold = threshold
        self.model_path = Path(model_path) if model_path is not None else bundled_model_path()
        self._session: Any = _session(str(self.model_path.resolve()))
        # One preallocated input row: [64 samples of context | 512 new samples], float32 in [-1, 1).
        self._input = np.zeros((1, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        self._h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(STATE_SHAPE, dtype=np.float32)
        self.state_reset_frames = -(-ms_to_samples(state_reset_ms) // FRAME_SAMPLES)  # rounded up
        self.state_reset_below = state_reset_below
        self.state_reset_max_dbfs = state_reset_max_dbfs
        self.state_resets = 0  # resets after long non-speech
        self._quiet_frames = 0  # frames in a row below state_reset_below

    def speech_prob(self, frame: Pcm) -> float:
        if len(frame) != FRAME_SAMPLES:
            raise ValueError(f"silero VAD expects {FRAME_SAMPLES} samples per frame, got {len(frame)}")
        x = self._input
        x[0, :CONTEXT_SAMPLES] = x[0, -CONTEXT_SAMPLES:]  # context = tail of the previous frame
        np.multiply(frame, 1.0 / 32768.0, out=x[0, CONTEXT_SAMPLES:], casting="unsafe")
        out, self._h, self._c = self._session.run(None, {"input": x, "h": self._h, "c": self._c})
        prob = float(out.reshape(-1)[0])
        if prob >= self.state_reset_below or self._level_dbfs() >= self.state_reset_max_dbfs:
            self._quiet_frames = 0
        else:
            self._quiet_frames += 1
            if self.state_reset_frames and self._quiet_frames % self.state_reset_frames == 0:
                self.state_resets += 1  # every state_reset_ms of the stretch: what follows starts fresh
                self._clear()
        return prob

    def _level_dbfs(self) -> float:
        """Level of the frame just classified (dBFS; digital silence is SILENCE_DBFS, not -inf)."""
        return rms_dbfs(self._input[0, CONTEXT_SAMPLES:])

    def reset(self) -> None:
        self._quiet_frames = 0
        self._clear()

    def _clear(self) -> None:
        self._input.fill(0.0)
        self._h = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._c = np.zeros(STATE_SHAPE, dtype=np.float32)

    def describe(self) -> str:
        reset = (f"state reset after {self.state_reset_frames * FRAME_SAMPLES * 1000 // SAMPLE_RATE} ms below "
                 f"{self.state_reset_below:g}") if self.state_reset_frames else "no state reset"
        return f"silero v6 (threshold {self.threshold:g}, 32 ms frames, 1 thread, {reset})"

    def __repr__(self) -> str:
        return f"SileroVad(threshold={self.threshold!r})"
