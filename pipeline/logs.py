"""Logging set-up: human-readable or JSON lines on stderr, with secrets scrubbed from every record."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable

_SECRETS: set[str] = set()
MIN_SECRET_LEN = 6  # shorter values would scrub ordinary words


def register_secret(value: str | None) -> None:
    """Never print this value: every log record containing it shows '***' instead."""
    if value and len(value) >= MIN_SECRET_LEN:
        _SECRETS.add(value)


def scrub(text: str, secrets: Iterable[str] | None = None) -> str:
    for s in secrets if secrets is not None else _SECRETS:
        text = text.replace(s, "***")
    return text


class _ScrubFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            msg = scrub(record.getMessage())
            record.msg, record.args = msg, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
                record.exc_info = None
        return True


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"t": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                "msg": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ScrubFilter())
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
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
