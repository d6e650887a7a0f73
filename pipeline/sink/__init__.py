"""Sinks: where outgoing protocol messages go (`console`, `jsonl:PATH`, `daily`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline import specs
from pipeline.sink.base import Outgoing, RoomState, Sink, SinkError

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.metrics import Metrics

__all__ = ["Outgoing", "RoomState", "Sink", "SinkError", "make_sink", "parse_sink_spec"]


def parse_sink_spec(spec: str) -> tuple[str, str | None]:
    """`pipeline.specs.parse_sink_spec` (see there), raising SinkError as `make_sink` does."""
    try:
        return specs.parse_sink_spec(spec)
    except specs.SpecError as exc:
        raise SinkError(str(exc)) from None


def make_sink(settings: Settings, metrics: Metrics) -> Sink:
    kind, arg = parse_sink_spec(settings.sink.spec)
    if kind == "console":
        from pipeline.sink.console import ConsoleSink
        return ConsoleSink()
    if kind == "jsonl":
        from pipeline.sink.jsonl import JsonlSink
        assert arg is not None
        return JsonlSink(arg)
    from pipeline.sink.daily import DailySink  # imports daily-python only when used
    return DailySink(settings, metrics)
