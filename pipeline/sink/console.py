"""Console sink: one readable line per echo on stdout (an audio echo's chunks make one line, printed
when its closing done=true chunk goes out), with the end-of-speech latency when the source is paced.

Standard output can be closed (`>&-`), a pipe whose reader has gone (`| head -1`), a full disk or a
hung-up terminal. Each message that cannot be printed raises SinkError, which the relay's delivery
accounts as undeliverable with its text (pipeline/delivery.py); the OS error is logged once per outage.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from pipeline.sink.base import Outgoing, Sink, SinkError

log = logging.getLogger(__name__)

STDOUT_CLOSED = "standard output is closed"


class ConsoleSink(Sink):
    name = "console"

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        # sys.stdout is None when the process started with its stdout closed.
        self._stream: TextIO | None = stream or sys.stdout
        self._failing: str | None = None  # the reason of the current outage (logged once)
        self._audio: dict[str, tuple[int, int]] = {}  # inference_id -> (chunks, PCM bytes) of an open audio echo

    async def start(self) -> None:
        if self._stream is None:  # reported now rather than at the first message
            self._report(STDOUT_CLOSED)

    async def send(self, out: Outgoing) -> None:
        if out.event == "interrupt":
            line = f"[{out.emitted_at_s:7.2f}s] ⏹ interrupt"
        else:
            props = out.message.get("properties", {})
            if props.get("modality") == "audio":
                body = self._audio_summary(props)
                if body is None:
                    return  # a chunk of an audio echo still going out: one line when it closes
            else:
                body = out.text
            lag = "" if out.latency_s is None else f", +{out.latency_s:.2f}s"
            line = f"[{out.audio_start_s:7.2f}s → {out.audio_end_s:7.2f}s{lag}] {body}"
        if self._stream is None:
            raise SinkError(self._report(STDOUT_CLOSED))
        try:
            try:
                self._stream.write(line + "\n")
            except UnicodeEncodeError:  # e.g. PYTHONIOENCODING=ascii: print it escaped rather than lose it
                encoding = getattr(self._stream, "encoding", None) or "ascii"
                self._stream.write((line + "\n").encode(encoding, "backslashreplace").decode(encoding))
            self._stream.flush()
        except (OSError, ValueError) as exc:  # ValueError: the stream object was closed
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SinkError(self._report(f"standard output not written: {why}")) from None
        if self._failing is not None:
            log.warning("standard output is written again (the messages in between are undeliverable, "
                        "logged above)")
            self._failing = None

    def _audio_summary(self, props: dict[str, object]) -> str | None:
        """Count an audio chunk; the summary line once its echo is closed (done=true), else None."""
        key = str(props.get("inference_id"))
        chunks, raw = self._audio.pop(key, (0, 0))
        chunks, raw = chunks + 1, raw + len(str(props.get("audio", ""))) * 3 // 4
        if props.get("done") is not True:
            self._audio[key] = (chunks, raw)
            return None
        rate = props.get("sample_rate")
        seconds = raw / 2 / rate if isinstance(rate, int) and rate > 0 else 0.0
        return f"<audio {seconds:.2f} s in {chunks} message(s)>"

    def _report(self, reason: str) -> str:
        """Log `reason` once per outage; return it as the reason of each undeliverable message."""
        if self._failing != reason:
            log.error("the console sink cannot print: %s; messages are undeliverable until it can (each is "
                      "logged with its text)", reason)
            self._failing = reason
        return reason
