"""Perception: analyzers beside the ASR on each utterance's audio, and on the user's camera (docs/perception.md).

- `base`: what an analyzer is (`Analyzer`, `VideoAnalyzer`, `VideoFrame`);
- `features`: pure DSP (level, YIN pitch, pauses) the built-ins are made of;
- `builtins`: `loudness`, `pitch`, `pauses`, `speaking_rate`, `language`, and `frame_stats` for video;
- `calls`: one analyzer call (its verdict and accounting) and building configured analyzers;
- `stage`: running them per utterance (timeouts, budget, outcomes); `video`: the camera path, held by the stage.
"""

from pipeline.perception.base import Analyzer, VideoAnalyzer, VideoFrame
from pipeline.perception.stage import Perception, PerceptionDrop, PerceptionRun, build_perception

__all__ = ["Analyzer", "Perception", "PerceptionDrop", "PerceptionRun", "VideoAnalyzer", "VideoFrame",
           "build_perception"]
