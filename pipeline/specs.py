"""The `source.spec` and `sink.spec` grammars.

A leaf module (nothing from `pipeline` imported) so that `pipeline.config` can validate specs
without importing the source and sink packages, which import the config themselves.
`pipeline.source` and `pipeline.sink` re-raise `SpecError` as their own SourceError / SinkError.
"""

from __future__ import annotations

import os

SOURCE_SPEC_HELP = "expected mic[:DEVICE], file:PATH or daily"
SINK_SPEC_HELP = "expected console, jsonl:PATH or daily"


# What Linux accepts in one path (PATH_MAX, NAME_MAX in <linux/limits.h>): longer is ENAMETOOLONG.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


class SpecError(ValueError):
    """A source or sink spec that does not parse; the message quotes the spec and the grammar."""


def path_problem(path: str) -> str | None:
    """Why `path` can never name a file, checked before any call into the OS (issue 27: a NUL byte in a
    `file:` spec was `ValueError: embedded null byte` from open(), a 500 through the API); None when it can.

    Refused: a NUL byte, text the file system encoding cannot represent (a lone surrogate from JSON
    `"\\ud800"`; bytes that are not UTF-8 but came from the OS arrive as surrogate escapes, which encode
    back), a path over MAX_PATH_BYTES or a component over MAX_NAME_BYTES bytes. The message never
    contains the offending character itself (it may be unprintable): positions and escapes instead.
    """
    if "\x00" in path:
        return f"contains a NUL byte (\\x00) at character {path.index(chr(0))}: no file name can hold one"
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError as exc:
        return (f"contains {path[exc.start]!a} at character {exc.start}, which cannot be a file name "
                "character (a lone surrogate)")
    if len(raw) > MAX_PATH_BYTES:
        return f"is {len(raw)} bytes long: a path has at most {MAX_PATH_BYTES}"
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > MAX_NAME_BYTES:
        return f"has a {longest}-byte name: a file or directory name has at most {MAX_NAME_BYTES} bytes"
    return None


MAX_SHOWN_CHARS = 80  # a spec is quoted in an error up to this many characters


def shown_spec(spec: str) -> str:
    """A spec as error messages quote it: escaped when it holds unprintable characters, and cut short."""
    cut = spec if len(spec) <= MAX_SHOWN_CHARS else spec[:MAX_SHOWN_CHARS] + "..."
    return f"'{cut}'" if cut.isprintable() else ascii(cut)


def _checked_path(spec: str, path: str) -> str:
    problem = path_problem(path)
    if problem is not None:
        raise SpecError(f"spec {shown_spec(spec)}: the path {problem}")
    return path


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
            raise SpecError(f"source spec {shown_spec(spec)}: give a device index or name after 'mic:' "
                            "(or just 'mic')")
        return "mic", int(dev) if dev.isdigit() else dev
    if kind == "file" and sep:
        if not arg.strip():
            raise SpecError(f"source spec {shown_spec(spec)}: give a path after 'file:'")
        return "file", _checked_path(spec, arg)
    if kind == "daily" and not sep:
        return "daily", None
    raise SpecError(f"unknown source spec {shown_spec(spec)}: {SOURCE_SPEC_HELP}")


def parse_sink_spec(spec: str) -> tuple[str, str | None]:
    """`'console'` -> ('console', None); `'jsonl:out.jsonl'` -> ('jsonl', 'out.jsonl');
    `'daily'` -> ('daily', None). Otherwise SpecError. Unlike source specs, case and spaces matter."""
    kind, sep, arg = spec.partition(":")
    if kind == "console" and not sep:
        return kind, None
    if kind == "jsonl" and arg:
        return kind, _checked_path(spec, arg)
    if kind == "daily" and not sep:
        return kind, None
    raise SpecError(f"unknown sink spec {spec!r}: {SINK_SPEC_HELP}")
