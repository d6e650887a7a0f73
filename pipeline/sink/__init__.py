"""Sinks: where outgoing protocol messages go (`console`, `jsonl:PATH`, `daily`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.sink.base import Outgoing, RoomState, Sink, SinkError

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.metrics import Metrics

__all__ = ["Outgoing", "RoomState", "Sink", "SinkError", "make_sink", "parse_sink_spec"]


def parse_sink_spec(spec: str) -> tuple[str, str | None]:
    kind, sep, arg = spec.partition(":")
    if kind == "console" and not sep:
        return kind, None
    if kind == "jsonl" and arg:
        return kind, arg
    if kind == "daily" and not sep:
        return kind, None
    raise SinkError(f"unknown sink spec {spec!r}: expected console, jsonl:PATH or daily")


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
