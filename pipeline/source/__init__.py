"""Audio sources (stage "source"): microphone, file, Daily room. All yield 16 kHz mono int16 frames.

`make_source(settings, metrics)` builds the source named by `settings.source.spec`:
`mic`, `mic:DEVICE` (index or name substring), `file:PATH`, or `daily`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pipeline import specs
from pipeline.source.base import Source, SourceError
from pipeline.source.file import FileSource, decode_file
from pipeline.source.mic import (
    MicSource,
    describe_input_devices,
    format_input_devices,
    list_input_devices,
)

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.metrics import Metrics

__all__ = [
    "FileSource",
    "MicSource",
    "Source",
    "SourceError",
    "decode_file",
    "describe_input_devices",
    "format_input_devices",
    "list_input_devices",
    "make_source",
    "parse_source_spec",
]

def parse_source_spec(spec: str) -> tuple[str, str | int | None]:
    """`pipeline.specs.parse_source_spec` (see there), raising SourceError as `make_source` does."""
    try:
        return specs.parse_source_spec(spec)
    except specs.SpecError as exc:
        raise SourceError(str(exc)) from None


def make_source(settings: Settings, metrics: Metrics | None = None) -> Source:
    """Build the source for `settings.source.spec`. Raises SourceError for a bad spec, a missing file,
    or a Daily source that is not available."""
    kind, arg = parse_source_spec(settings.source.spec)
    if kind == "file":
        return FileSource(str(arg), settings.source)
    if kind == "mic":
        return MicSource(settings.source, metrics, device=arg)
    # daily: written separately, imported lazily (it needs daily-python)
    try:
        module: Any = importlib.import_module("pipeline.source.daily")
    except ModuleNotFoundError as e:
        if e.name == "pipeline.source.daily":
            raise SourceError("the daily source is not available in this build (pipeline.source.daily "
                              "is missing)") from None
        if e.name and e.name.split(".")[0] == "daily":
            raise SourceError("the daily source needs daily-python: pip install 'daily-python>=0.36,<0.37'"
                              ) from None
        raise
    source: Source = module.DailySource(settings, metrics)
    return source
