"""Smart Turn v3.2 (pipecat's audio end-of-turn model, BSD-2), run on the audio up to a pause, for
scripts/pause_dataset.py. The relay does not use it (docs/turn-end.md says why).

The model ships inside the pipecat-ai 1.14 wheel (`pip install 'echo-relay[turn]'`, or
`scripts/install.sh --turn`, which installs that one wheel without its dependencies). Nothing is
downloaded: when the package is not installed, `load_smart_turn()` is None and the dataset's Smart Turn
columns are null.

The file is found through the installed distribution's file list (`importlib.metadata`), not by
importing `pipecat`: importing it logs a banner through loguru and, on Python 3.11, replaces
`asyncio.wait_for` process-wide (pipecat/__init__.py), which the relay must not have done to it.

Input (as pipecat's `LocalSmartTurnAnalyzerV3._predict_endpoint`): the last 8 s of 16 kHz audio, zero-padded
at the front, normalised to zero mean and unit variance, as Whisper log-mel features (80 x 800); output:
the probability that the turn is complete. The features are faster-whisper's extractor (the same
Slaney mel filters, Hann window, log10 clamp and scaling as the Whisper extractor pipecat vendors).
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.dsp import int16_to_float
from pipeline.frames import SAMPLE_RATE, Pcm

log = logging.getLogger(__name__)

DISTRIBUTION = "pipecat-ai"
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
WINDOW_S = 8  # the model's input: the last 8 s
N_MELS = 80
NORM_EPS = 1e-7  # the variance floor of the waveform normalisation (transformers' WhisperFeatureExtractor)


def model_path() -> Path | None:
    """The bundled Smart Turn v3.2 file of the installed pipecat-ai, or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(MODEL_FILE)))
    return path if path.is_file() else None


class SmartTurn:
    """One ONNX session on one thread; `probability()` is thread-safe (called from an executor)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort
        from faster_whisper.feature_extractor import FeatureExtractor

        so = ort.SessionOptions()
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.intra_op_num_threads = threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        self._features = FeatureExtractor(feature_size=N_MELS, chunk_length=WINDOW_S)
        self._lock = threading.Lock()
        self.path = path

    def features(self, audio: Pcm) -> np.ndarray:
        """(1, 80, 800) float32 log-mel features of the last 8 s of `audio` (16 kHz int16)."""
        n = WINDOW_S * SAMPLE_RATE
        x = int16_to_float(audio[-n:])
        x = np.pad(x, (n - len(x), 0)) if len(x) < n else x
        x = (x - x.mean()) / np.sqrt(x.var() + NORM_EPS)
        mel = self._features(x, padding=0)
        return np.asarray(mel, dtype=np.float32)[None, :, : WINDOW_S * SAMPLE_RATE // 160]

    def probability(self, audio: Pcm) -> float:
        """The model's probability that the turn is complete after `audio`."""
        feats = self.features(audio)
        with self._lock:
            out: Any = self._session.run(None, {"input_features": feats})
        return float(np.asarray(out[0]).reshape(-1)[0])


_loaded: dict[Path, SmartTurn] = {}
_load_lock = threading.Lock()


def load_smart_turn() -> SmartTurn | None:
    """The shared Smart Turn model (loaded once per process), or None when pipecat-ai is not installed."""
    path = model_path()
    if path is None:
        return None
    with _load_lock:
        if path not in _loaded:
            _loaded[path] = SmartTurn(path)
            log.info("Smart Turn v3.2 loaded from %s", path)
        return _loaded[path]
