"""The `source.spec` and `sink.spec` grammars.

A leaf module (nothing from `pipeline` imported) so that `pipeline.config` can validate specs
without importing the source and sink packages, which import the config themselves.
`pipeline.source` and `pipeline.sink` re-raise `SpecError` as their own SourceError / SinkError.
"""

from __future__ import annotations

SOURCE_SPEC_HELP = "expected mic[:DEVICE], file:PATH or daily"
SINK_SPEC_HELP = "expected console, jsonl:PATH or daily"


class SpecError(ValueError):
    """A source or sink spec that does not parse; the message quotes the spec and the grammar."""


def parse_source_spec(spec: str) -> tuple[str, str | int | None]:
    """`'mic'` -> ('mic', None); `'mic:2'` -> ('mic', 2); `'mic:USB'` -> ('mic', 'USB');
    `'file:a.wav'` -> ('file', 'a.wav'); `'daily'` -> ('daily', None). Otherwise SpecError.

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
            raise SpecError(f"source spec '{spec}': give a device index or name after 'mic:' "
                            "(or just 'mic')")
        return "mic", int(dev) if dev.isdigit() else dev
    if kind == "file" and sep:
        if not arg.strip():
            raise SpecError(f"source spec '{spec}': give a path after 'file:'")
        return "file", arg
    if kind == "daily" and not sep:
        return "daily", None
    raise SpecError(f"unknown source spec '{spec}': {SOURCE_SPEC_HELP}")


def parse_sink_spec(spec: str) -> tuple[str, str | None]:
    """`'console'` -> ('console', None); `'jsonl:out.jsonl'` -> ('jsonl', 'out.jsonl');
    `'daily'` -> ('daily', None). Otherwise SpecError. Unlike source specs, case and spaces matter."""
    kind, sep, arg = spec.partition(":")
    if kind == "console" and not sep:
        return kind, None
    if kind == "jsonl" and arg:
        return kind, arg
    if kind == "daily" and not sep:
        return kind, None
    raise SpecError(f"unknown sink spec {spec!r}: {SINK_SPEC_HELP}")
