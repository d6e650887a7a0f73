"""Audio sources (stage "source"): microphone, file, Daily room. All yield 16 kHz mono int16 frames.

`make_source(settings, metrics)` builds the source named by `settings.source.spec`:
`mic`, `mic:DEVICE` (index or name substring), `file:PATH`, or `daily`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

SPEC_HELP = "expected mic[:DEVICE], file:PATH or daily"


def parse_source_spec(spec: str) -> tuple[str, str | int | None]:
    """`'mic'` -> ('mic', None); `'mic:2'` -> ('mic', 2); `'mic:USB'` -> ('mic', 'USB');
    `'file:a.wav'` -> ('file', 'a.wav'); `'daily'` -> ('daily', None). Otherwise SourceError.

    Only the first colon separates kind from argument, so paths and device names may contain colons.
    """
    text = (spec or "").strip()
    kind, sep, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind == "mic":
        if not sep:
            return "mic", None
        dev = arg.strip()
        if not dev:
            raise SourceError(f"source spec '{spec}': give a device index or name after 'mic:' "
                              "(or just 'mic')")
        return "mic", int(dev) if dev.isdigit() else dev
    if kind == "file" and sep:
        if not arg.strip():
            raise SourceError(f"source spec '{spec}': give a path after 'file:'")
        return "file", arg
    if kind == "daily" and not sep:
        return "daily", None
    raise SourceError(f"unknown source spec '{spec}': {SPEC_HELP}")


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
