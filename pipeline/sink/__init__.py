"""Sinks: where outgoing protocol messages go (`console`, `jsonl:PATH`, `daily`), and `sink.also`:
secondary sinks that get a copy of what the primary sent (pipeline/sink/fanout.py)."""

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
    """The sink of `sink.spec`; with `sink.also`, a FanoutSink delivering to it and copying what it
    sent to each of those (console or jsonl: one room per relay)."""
    primary = _make_one(settings.sink.spec, settings, metrics)
    if not settings.sink.also:
        return primary
    from pipeline.sink.fanout import FanoutSink
    secondaries = []
    for i, spec in enumerate(settings.sink.also):
        if parse_sink_spec(spec)[0] == "daily":  # config validation refuses it; settings built otherwise
            raise SinkError(f"sink.also[{i}]: 'daily' cannot be a secondary sink (one room per relay; "
                            "make it sink.spec)")
        secondaries.append(_make_one(spec, settings, metrics))
    return FanoutSink(primary, secondaries, metrics=metrics)


def _make_one(spec: str, settings: Settings, metrics: Metrics) -> Sink:
    kind, arg = parse_sink_spec(spec)
    if kind == "console":
        from pipeline.sink.console import ConsoleSink
        return ConsoleSink()
    if kind == "jsonl":
        from pipeline.sink.jsonl import JsonlSink
        assert arg is not None
        return JsonlSink(arg)
    from pipeline.sink.daily import DailySink  # imports daily-python only when used
    return DailySink(settings, metrics)
