"""ASR stage: one utterance's audio in, a `Transcript` out.

`make_asr_engine(settings.asr, metrics)` builds the engine named by ``asr.engine``:

- ``faster-whisper`` (default): `pipeline.asr.whisper.FasterWhisperEngine`, local CTranslate2
  Whisper, model resolved by `pipeline.asr.models`;
- ``openai-http``: `pipeline.asr.openai_http.OpenAIHttpEngine`, an OpenAI-compatible
  ``/v1/audio/transcriptions`` server;
- an entry point in the ``echo_relay.asr`` group, or a dotted path ``package.module:Class``.

User engines: the named object is called as ``factory(settings)`` with the `AsrSettings`
section (or ``factory(settings, metrics=metrics)`` when it accepts a ``metrics`` keyword) and
must return an `AsrEngine` (subclass `AsrEngine`, or `SyncAsrEngine` for CPU-bound code that
should run in its own thread). Its ``transcribe(audio, meta)`` receives 16 kHz mono int16 audio
and returns a `Transcript`; ``load()`` runs once before the first utterance.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from pipeline.asr.base import AsrEngine, AsrError, SyncAsrEngine
from pipeline.config import AsrSettings
from pipeline.plugins import ASR_GROUP, PluginError, resolve

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

__all__ = ["AsrEngine", "AsrError", "SyncAsrEngine", "make_asr_engine"]


def _faster_whisper(settings: AsrSettings, metrics: Metrics | None = None) -> AsrEngine:
    from pipeline.asr.whisper import FasterWhisperEngine  # imports faster-whisper only when used

    return FasterWhisperEngine(settings, metrics)


def _openai_http(settings: AsrSettings, metrics: Metrics | None = None) -> AsrEngine:
    from pipeline.asr.openai_http import OpenAIHttpEngine

    return OpenAIHttpEngine(settings, metrics)


BUILTIN_ENGINES = {"faster-whisper": _faster_whisper, "openai-http": _openai_http}


def _accepts_metrics(factory: Any) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return "metrics" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def make_asr_engine(settings: AsrSettings, metrics: Metrics | None = None) -> AsrEngine:
    """Build the engine named by `settings.engine` (see the module docstring for the convention).

    Raises `PluginError` when the name cannot be resolved or the object is not an ASR engine.
    """
    factory = resolve(settings.engine, BUILTIN_ENGINES, ASR_GROUP)
    if factory in BUILTIN_ENGINES.values():
        engine = factory(settings, metrics)
    else:
        if not callable(factory):
            raise PluginError(f"asr.engine {settings.engine!r} is not a class or factory: {factory!r}")
        engine = factory(settings, metrics=metrics) if _accepts_metrics(factory) else factory(settings)
    if not isinstance(engine, AsrEngine) and not callable(getattr(engine, "transcribe", None)):
        raise PluginError(f"asr.engine {settings.engine!r} returned {type(engine).__name__}, "
                          f"which has no transcribe(audio, meta) method")
    return engine
