"""Logging set-up: human-readable or JSON lines on stderr, with secrets scrubbed from every record.

Scrubbed: every registered secret (`register_secret`: the Tavus key, tokens, and every value the
configuration filled from the environment, see pipeline/config.py `secret_values`) and, in every URL,
its user info and query values.

JSON lines (`logging.format: json`, `--log-format json`) carry what a log shipper indexes: `time`
(ISO 8601, UTC), `level`, `logger`, `message`, and `relay_id`, `utterance_id`, `conversation_id`
(null when not known). Those three come from the context the record is logged in (`log_context`,
`bind_log_context`: contextvars, so each asyncio task of each relay of `serve` carries its own), or
from `extra={"relay_id": ...}` on the call.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

_SECRETS: set[str] = set()
MIN_SECRET_LEN = 6  # shorter values would scrub ordinary words
REDACTED = "***"

# A URL in running text: scheme://authority[path][?query][#fragment], up to whitespace or a quote.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")


# Fields every JSON record carries from its context (null when not known).
CONTEXT_FIELDS = ("relay_id", "utterance_id", "conversation_id")
_context: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("echo_relay_log_context",
                                                                                    default=None)


def current_log_context() -> dict[str, str]:
    """The fields records logged here carry (see `log_context`)."""
    return dict(_context.get() or {})


def _merged(fields: Mapping[str, str | None]) -> dict[str, str]:
    unknown = set(fields) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log context field(s) {sorted(unknown)}; known: {CONTEXT_FIELDS}")
    return {**current_log_context(), **{k: v for k, v in fields.items() if v is not None}}


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """Records logged inside the block (and in tasks it starts) carry these fields; None leaves one as it is."""
    token = _context.set(_merged(fields))
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: str | None) -> None:
    """Add fields to the current context for good: the rest of this asyncio task and the tasks it starts
    later (e.g. a relay's conversation id, once its sink has one)."""
    _context.set(_merged(fields))


def register_secret(value: str | None) -> None:
    """Never print this value: every log record containing it shows '***' instead."""
    if value and len(value) >= MIN_SECRET_LEN:
        _SECRETS.add(value)


def _redact_url(url: str) -> str:
    scheme, _, rest = url.partition("://")
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    end = min(ends, default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:  # user:password@host: the user name can be the token (https://TOKEN@host)
        authority = REDACTED + "@" + authority.rsplit("@", 1)[1]
    q = tail.find("?")
    if q >= 0:  # query values carry tokens (Daily's ?t=, signed URLs): keep the names only
        f = tail.find("#", q)
        query = tail[q + 1:f] if f >= 0 else tail[q + 1:]
        query = "&".join(f"{item.split('=', 1)[0]}={REDACTED}" if "=" in item else item
                         for item in query.split("&"))
        tail = tail[:q + 1] + query + (tail[f:] if f >= 0 else "")
    return f"{scheme}://{authority}{tail}"


def redact_urls(text: str) -> str:
    """Every URL in `text` with its user info and query values replaced by ***."""
    if "://" not in text:
        return text
    return _URL.sub(lambda m: _redact_url(m.group(0)), text)


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    """`text` with every secret (registered ones by default) replaced by ***; longest first, so a
    secret containing another is replaced whole."""
    for s in sorted(secrets if secrets is not None else _SECRETS, key=len, reverse=True):
        if s:
            text = text.replace(s, REDACTED)
    return text


def redact(text: str, secrets: Iterable[str] | None = None) -> str:
    """`scrub` plus URL credentials: what every printed message goes through."""
    return redact_urls(scrub(text, secrets))


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed call (args not matching msg): the handler reports it itself
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            clean = redact(text)
            if clean != text:
                record.exc_text, record.exc_info = clean, None
        return True


class _ContextFilter(logging.Filter):
    """Copies the log context (`log_context`) onto each record, unless the call passed the field in `extra`."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_log_context()
        for name in CONTEXT_FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, context.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, relay_id, utterance_id, conversation_id
    and, when there is one, exception (the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        context = current_log_context()
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            data[name] = value if value is not None else context.get(name)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # scrubbed by _ScrubFilter
            data["exception"] = record.exc_text
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ScrubFilter())
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # Every module logs to getLogger(__name__), so the package logger sets the relay's level; third-party
    # loggers stay at the root's WARNING.
    logging.getLogger("pipeline").setLevel(level.upper())
    # httpx logs every request line at INFO; keep it at WARNING so logs stay about the relay.
    logging.getLogger("httpx").setLevel(logging.WARNING)


_LEVEL_STYLES = {logging.WARNING: "yellow", logging.ERROR: "red", logging.CRITICAL: "bold red"}


class _ConsoleHandler(logging.Handler):
    """Prints each formatted record through a rich Console: above its live display while one is shown."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), style=_LEVEL_STYLES.get(record.levelno, ""), markup=False,
                               highlight=False, emoji=False, soft_wrap=True)
        except Exception:
            self.handleError(record)


def log_to_console(console: Console) -> Callable[[], None]:
    """Until the returned function is called, print log records through `console` instead of on stderr
    (the terminal view of `run --view`: lines written beside its live display would tear it). Same
    format, filters (scrubbing) and levels as the handler `setup_logging` installed."""
    root = logging.getLogger()
    previous = list(root.handlers)
    handler = _ConsoleHandler(console)
    if previous:
        handler.setFormatter(previous[0].formatter)
        handler.filters = list(previous[0].filters)
    else:
        handler.addFilter(_ScrubFilter())
    for h in previous:
        root.removeHandler(h)
    root.addHandler(handler)

    def restore() -> None:
        root.removeHandler(handler)
        for h in previous:
            root.addHandler(h)

    return restore
