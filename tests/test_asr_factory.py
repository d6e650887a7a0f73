"""make_asr_engine: built-in names, dotted paths and entry points for user engines."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import numpy as np
import pytest

import pipeline.plugins
from pipeline.asr import AsrEngine, make_asr_engine
from pipeline.asr.openai_http import OpenAIHttpEngine
from pipeline.config import AsrSettings
from pipeline.frames import Pcm, Transcript, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.plugins import ASR_GROUP, PluginError


class EchoEngine(AsrEngine):
    """A user engine: constructed with the AsrSettings section only."""

    name = "echo-test"

    def __init__(self, settings: AsrSettings) -> None:
        self.settings = settings

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        return Transcript(text=f"{len(audio)} samples")


class MeteredEngine(EchoEngine):
    """A user engine that also wants the relay's metrics."""

    def __init__(self, settings: AsrSettings, metrics: Metrics | None = None) -> None:
        super().__init__(settings)
        self.metrics = metrics


def not_an_engine(settings: AsrSettings) -> object:
    return object()


def test_builtin_faster_whisper_is_lazy_and_configured() -> None:
    from pipeline.asr.whisper import FasterWhisperEngine

    metrics = Metrics()
    engine = make_asr_engine(AsrSettings(), metrics)
    assert isinstance(engine, FasterWhisperEngine)
    assert engine.metrics is metrics and not engine.loaded  # nothing loaded until load()
    assert engine.model_name == "tiny.en"


def test_builtin_openai_http() -> None:
    engine = make_asr_engine(AsrSettings(engine="openai-http"), Metrics())
    assert isinstance(engine, OpenAIHttpEngine)


async def test_user_engine_by_dotted_path() -> None:
    settings = AsrSettings(engine=f"{__name__}:EchoEngine")
    engine = make_asr_engine(settings, Metrics())
    assert isinstance(engine, EchoEngine) and engine.settings is settings
    meta = UtteranceMeta(utterance_id="u", audio_start_s=0.0, audio_end_s=0.1)
    assert (await engine.transcribe(np.zeros(1600, np.int16), meta)).text == "1600 samples"


def test_user_engine_gets_metrics_when_it_asks() -> None:
    metrics = Metrics()
    engine = make_asr_engine(AsrSettings(engine=f"{__name__}:MeteredEngine"), metrics)
    assert isinstance(engine, MeteredEngine) and engine.metrics is metrics


def test_user_engine_by_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint(name="my-asr", value=f"{__name__}:EchoEngine", group=ASR_GROUP)

    def fake_entry_points(group: str | None = None, **_: Any) -> list[EntryPoint]:
        return [ep] if group == ASR_GROUP else []

    monkeypatch.setattr(pipeline.plugins, "entry_points", fake_entry_points)
    assert isinstance(make_asr_engine(AsrSettings(engine="my-asr")), EchoEngine)


def test_unknown_and_invalid_engines() -> None:
    with pytest.raises(PluginError, match="unknown name 'whisperx'"):
        make_asr_engine(AsrSettings(engine="whisperx"))
    with pytest.raises(PluginError, match="no transcribe"):
        make_asr_engine(AsrSettings(engine=f"{__name__}:not_an_engine"))
    with pytest.raises(PluginError, match="cannot import module"):
        make_asr_engine(AsrSettings(engine="no_such_module_xyz:Engine"))
