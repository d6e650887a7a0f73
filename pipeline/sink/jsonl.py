"""JSONL sink: one JSON object per outgoing message, flushed per line (fields: README.md, "Sinks and the
JSONL record")."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from pipeline.sink.base import Outgoing, Sink, SinkError


class JsonlSink(Sink):
    name = "jsonl"

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._fh: TextIO | None = None

    async def start(self) -> None:
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # Line-buffered so a reader (the benchmark, tail -f) sees each message as it is emitted.
            self._fh = self.path.open("a", encoding="utf-8", buffering=1)
        except OSError as exc:
            raise SinkError(f"cannot open {self.path} for writing: {exc.strerror}") from None

    async def send(self, out: Outgoing) -> None:
        if self._fh is None:
            await self.start()
        assert self._fh is not None
        self._fh.write(json.dumps(out.record(), ensure_ascii=False) + "\n")
        self._fh.flush()

    async def close(self, drain_timeout_s: float = 10.0) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
