"""Console sink: one readable line per message on stdout."""

from __future__ import annotations

import sys
from typing import TextIO

from pipeline.sink.base import Outgoing, Sink


class ConsoleSink(Sink):
    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream or sys.stdout

    async def send(self, out: Outgoing) -> None:
        if out.event == "interrupt":
            line = f"[{out.emitted_at_s:7.2f}s] ⏹ interrupt"
        else:
            props = out.message.get("properties", {})
            body = out.text if props.get("modality") == "text" else f"<audio {len(props.get('audio', ''))} b64 chars>"
            lag = out.emitted_at_s - out.audio_end_s
            line = (f"[{out.audio_start_s:7.2f}s → {out.audio_end_s:7.2f}s, +{lag:.2f}s] {body}")
        self._stream.write(line + "\n")
        self._stream.flush()
