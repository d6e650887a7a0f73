"""console and jsonl sinks: the record fields of README "Sinks and the JSONL record", one flushed line per message."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pytest

from pipeline import protocol
from pipeline.sink import SinkError, parse_sink_spec
from pipeline.sink.base import Outgoing, SinkOutputError
from pipeline.sink.console import ConsoleSink
from pipeline.sink.jsonl import JsonlSink

FIELDS = {"event", "seq", "utterance_id", "audio_start_s", "audio_end_s", "emitted_at_s", "asr_text", "text",
          "language", "language_probability", "message"}


def _echo(seq: int) -> Outgoing:
    msg = protocol.echo_text(f"Hello {seq}.", "c1", f"inf-{seq}")
    return Outgoing("echo", msg, utterance_id=f"u{seq}", audio_start_s=1.0, audio_end_s=2.5, asr_text="hello",
                    text=f"Hello {seq}.", seq=seq, emitted_at_s=2.9, language="de", language_probability=0.97)


async def test_jsonl_records(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "out.jsonl"
    sink = JsonlSink(path)
    await sink.start()
    await sink.send(_echo(1))
    # Flushed per line: readable before close.
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == FIELDS
    assert first["message"]["properties"]["done"] is True and first["emitted_at_s"] == 2.9
    assert (first["language"], first["language_probability"]) == ("de", 0.97)
    await sink.send(Outgoing("interrupt", protocol.interrupt("c1"), seq=2, emitted_at_s=3.0))
    await sink.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["echo", "interrupt"] and [r["seq"] for r in lines] == [1, 2]


async def test_jsonl_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    # An output problem (exit 7, pipeline.app.EXIT_OUTPUT), not a Tavus/Daily refusal.
    with pytest.raises(SinkOutputError, match=r"cannot open .* for writing: Not a directory"):
        await JsonlSink(tmp_path / "f" / "x.jsonl").start()
    with pytest.raises(SinkOutputError, match=r"cannot open .* for writing: embedded null byte"):
        await JsonlSink(tmp_path / "a\0b.jsonl").start()


async def test_jsonl_file_ending_mid_line_gets_new_records_on_their_own_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "out.jsonl"
    whole = json.dumps(_echo(1).record()) + "\n"
    path.write_text(whole + whole[:30], encoding="utf-8")  # an earlier run was killed mid-write
    sink = JsonlSink(path)
    await sink.start()
    await sink.send(_echo(2))
    await sink.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[1] == whole[:30]  # what was there is kept ...
    assert [json.loads(lines[0])["seq"], json.loads(lines[2])["seq"]] == [1, 2]  # ... and not glued to
    assert "does not end with a newline" in caplog.text


async def test_jsonl_close_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class CloseFails(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            return len(data)

        def close(self) -> None:
            super().close()
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    sink = JsonlSink(tmp_path / "x.jsonl", opener=lambda _p: cast(BinaryIO, CloseFails()))
    await sink.start()
    await sink.send(_echo(1))
    await sink.close()  # logged, not raised
    assert "Input/output error" in caplog.text
    await sink.close()  # twice is harmless


async def test_console_line() -> None:
    """The latency is shown when delivery measured one (a paced source); at --speed 0 the gap between the
    stream clock and the end of speech is how far the reader ran ahead, not a latency (+8.79 s before)."""
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    await sink.send(replace(_echo(3), latency_s=0.4))
    await sink.send(_echo(4))  # latency_s None: not a latency
    first, second = buf.getvalue().splitlines()
    assert "Hello 3." in first and "1.00s" in first and "+0.40s" in first
    assert "Hello 4." in second and "+" not in second


async def test_console_prints_one_line_per_audio_echo() -> None:
    """--mode audio sends a 60 ms chunk per message: the console shows the echo once, when it closes."""
    buf = io.StringIO()
    sink = ConsoleSink(buf)
    pcm = np.zeros(24_000, np.int16)  # 1 s at 24 kHz
    for message in protocol.audio_echoes(pcm, 24_000, "c1", "i1"):
        await sink.send(Outgoing("echo", message, utterance_id="u1", audio_start_s=1.0, audio_end_s=2.0,
                                 latency_s=0.5))
    (line,) = buf.getvalue().splitlines()
    chunks = len(protocol.audio_echoes(pcm, 24_000, "c1", "i1"))
    assert f"<audio 1.04 s in {chunks} message(s)>" in line and "+0.50s" in line  # 1 s + 40 ms closing


@pytest.mark.parametrize("spec", ["jsonl", "jsonl:", "console:x", "kafka:topic", ""])
def test_bad_sink_specs(spec: str) -> None:
    with pytest.raises(SinkError, match="expected console, jsonl:PATH or daily"):
        parse_sink_spec(spec)


class _HungUpTerminal(io.StringIO):
    """A terminal that hung up (EIO) until `back` is set."""

    back = False

    def write(self, text: str) -> int:
        if not self.back:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return super().write(text)


async def test_console_that_cannot_print_raises_sink_error_and_reports_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    stream = _HungUpTerminal()
    sink = ConsoleSink(stream)
    for seq in (1, 2, 3):
        with pytest.raises(SinkError, match=r"^standard output not written: Input/output error$"):
            await sink.send(_echo(seq))
    assert caplog.text.count("the console sink cannot print") == 1
    stream.back = True
    await sink.send(_echo(4))
    assert "Hello 4." in stream.getvalue() and "standard output is written again" in caplog.text


async def test_console_closed_stream_and_closed_stdout(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    buf = io.StringIO()
    buf.close()
    with pytest.raises(SinkError, match="standard output not written: I/O operation on closed file"):
        await ConsoleSink(buf).send(_echo(1))
    monkeypatch.setattr(sys, "stdout", None)  # what Python sets when the process started with fd 1 closed
    sink = ConsoleSink()
    await sink.start()  # reported at start, once
    for seq in (1, 2):
        with pytest.raises(SinkError, match=r"^standard output is closed$"):
            await sink.send(_echo(seq))
    assert caplog.text.count("the console sink cannot print: standard output is closed") == 1


async def test_console_that_cannot_encode_prints_escaped() -> None:
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="ascii")  # PYTHONIOENCODING=ascii
    out = _echo(5)
    out.text = "Café ☕"
    await ConsoleSink(stream).send(out)
    assert b"Caf\\xe9 \\u2615" in raw.getvalue()
