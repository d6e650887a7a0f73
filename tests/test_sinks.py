"""console and jsonl sinks: the record fields of README "Sinks and the JSONL record", one flushed line per message."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipeline import protocol
from pipeline.sink import SinkError, parse_sink_spec
from pipeline.sink.base import Outgoing
from pipeline.sink.console import ConsoleSink
from pipeline.sink.jsonl import JsonlSink

FIELDS = {"event", "seq", "utterance_id", "audio_start_s", "audio_end_s", "emitted_at_s", "asr_text", "text",
          "message"}


def _echo(seq: int) -> Outgoing:
    msg = protocol.echo_text(f"Hello {seq}.", "c1", f"inf-{seq}")
    return Outgoing("echo", msg, utterance_id=f"u{seq}", audio_start_s=1.0, audio_end_s=2.5, asr_text="hello",
                    text=f"Hello {seq}.", seq=seq, emitted_at_s=2.9)


async def test_jsonl_records(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "out.jsonl"
    sink = JsonlSink(path)
    await sink.start()
    await sink.send(_echo(1))
    # Flushed per line: readable before close.
    first = json.loads(path.read_text().splitlines()[0])
    assert set(first) == FIELDS
    assert first["message"]["properties"]["done"] is True and first["emitted_at_s"] == 2.9
    await sink.send(Outgoing("interrupt", protocol.interrupt("c1"), seq=2, emitted_at_s=3.0))
    await sink.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["event"] for r in lines] == ["echo", "interrupt"] and [r["seq"] for r in lines] == [1, 2]


async def test_jsonl_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(SinkError, match="cannot open"):
        await JsonlSink(tmp_path / "f" / "x.jsonl").start()


async def test_console_line() -> None:
    buf = io.StringIO()
    await ConsoleSink(buf).send(_echo(3))
    assert "Hello 3." in buf.getvalue() and "1.00s" in buf.getvalue() and "+0.40s" in buf.getvalue()


@pytest.mark.parametrize("spec", ["jsonl", "jsonl:", "console:x", "kafka:topic", ""])
def test_bad_sink_specs(spec: str) -> None:
    with pytest.raises(SinkError, match="expected console, jsonl:PATH or daily"):
        parse_sink_spec(spec)
