"""Follow a running relay's event stream (GET /events, Server-Sent Events) from a benchmark, in a thread.

The JSONL sink records echoes only; what the relay decides about a conversation (the `language` event when its
language locks or switches: pipeline/events.py, docs/control-api.md "Event stream") is on the event stream. A
benchmark starts `echo-relay run --control-port PORT` and an EventCollector on that port before the run: the
collector connects as soon as the control API is up (it starts before the model is loaded, so before any audio
is heard) and keeps the events of the kinds asked for until the relay exits and the stream ends.

Listening costs the relay ~11 small JSON events a second (input level, stats): the latency benchmarks of the clean
stream do not listen.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

CONNECT_RETRY_S = 0.1  # while the relay's control API is not up yet


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now (the relay binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse_sse(lines: list[str]) -> tuple[str, dict[str, Any]] | None:
    """(kind, data) of one Server-Sent Event's lines (`event:` and `data:`), None for a comment or retry."""
    kind, data = "", []
    for line in lines:
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)
    if not kind or not data:
        return None
    return kind, json.loads("\n".join(data))


class EventCollector:
    """Events of `kinds` from http://127.0.0.1:PORT/events, in the order the relay sent them."""

    def __init__(self, port: int, kinds: tuple[str, ...]) -> None:
        self.url = f"http://127.0.0.1:{port}/events"
        self.kinds = kinds
        self.events: list[dict[str, Any]] = []
        self.connected = False
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="event-collector", daemon=True)

    def start(self) -> EventCollector:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> list[dict[str, Any]]:
        """Stop (the relay has exited, so its stream has ended or never started) and return the events."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.events

    def _run(self) -> None:
        import httpx

        while not self._stop.is_set():
            try:
                with httpx.stream("GET", self.url, timeout=httpx.Timeout(5.0, read=None)) as resp:
                    resp.raise_for_status()
                    self.connected = True
                    self._read(resp.iter_lines())
                return  # the stream ended: the relay stopped its API
            except httpx.TransportError:
                if self.connected:  # the relay went away mid-stream: what came is kept
                    return
                time.sleep(CONNECT_RETRY_S)
            except httpx.HTTPStatusError as exc:
                self.error = f"GET /events: {exc.response.status_code}"
                return

    def _read(self, lines: Any) -> None:
        block: list[str] = []
        for line in lines:
            if self._stop.is_set():
                return
            if line:
                block.append(line)
                continue
            event = parse_sse(block)
            block = []
            if event is not None and event[0] in self.kinds:
                self.events.append({"kind": event[0], **event[1]})
