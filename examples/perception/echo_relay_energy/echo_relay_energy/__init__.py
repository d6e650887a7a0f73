"""An example echo-relay analyzer, installed as a package with an entry point (see pyproject.toml).

    perception:
      analyzers:
        - analyzer: energy      # the entry-point name
          frame_ms: 30          # options go to the class's constructor
          threshold_db: -45

Each utterance's result: {"frames": N, "active_ratio": share of frames louder than threshold_db}.
It needs nothing from echo-relay but the call signature `(audio, meta) -> dict | None`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SAMPLE_RATE = 16_000  # echo-relay hands analyzers 16 kHz mono int16


class Energy:
    def __init__(self, frame_ms: int = 30, threshold_db: float = -45.0) -> None:
        if frame_ms <= 0:
            raise ValueError("frame_ms must be > 0")
        self.frame = SAMPLE_RATE * frame_ms // 1000
        self.threshold_db = threshold_db

    def __call__(self, audio: np.ndarray, meta: Any) -> dict[str, Any] | None:
        n = len(audio) // self.frame
        if n == 0:
            return None
        frames = audio[: n * self.frame].astype(np.float64).reshape(n, self.frame) / 32768.0
        level_db = 10 * np.log10((frames ** 2).mean(axis=1) + 1e-12)
        return {"frames": int(n), "active_ratio": round(float((level_db > self.threshold_db).mean()), 3)}
