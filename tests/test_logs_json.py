"""JSON logs (`--log-format json`, `logging.format: json`): every stderr line is one JSON object with the fields
a log shipper indexes (time, level, logger, message, relay_id, utterance_id, conversation_id), filled from
the context the record was logged in: an utterance's records carry its id, a `serve` relay's its relay id.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.logs import CONTEXT_FIELDS, bind_log_context, log_context, setup_logging
from tests.conftest import logging_restored, wait_until_ready

TESTS = Path(__file__).resolve().parent
CLIP = TESTS / "data" / "speech" / "deepspeech-examples" / "2830-3980-0043.wav"  # "Experience proves this."
FIELDS = {"time", "level", "logger", "message", *CONTEXT_FIELDS}
TIMEOUT_S = 90.0


def echo_relay() -> list[str]:
    script = Path(sys.executable).parent / "echo-relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def env() -> dict[str, str]:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ECHO_RELAY_CONFIG", None)
    return e


def parse_lines(text: str) -> list[dict[str, Any]]:
    """Every line of `text` as a JSON record with exactly the expected fields (and `exception` when one was logged)."""
    records = []
    for line in text.splitlines():
        record = json.loads(line)  # a line that is not JSON fails here, naming it
        assert set(record) - {"exception"} == FIELDS, line
        stamp = datetime.datetime.fromisoformat(record["time"])
        assert stamp.utcoffset() == datetime.timedelta(0), line
        assert abs(time.time() - stamp.timestamp()) < 3600, line
        assert record["level"] in ("debug", "info", "warning", "error", "critical"), line
        records.append(record)
    return records


@pytest.fixture
def json_stderr() -> Iterator[io.StringIO]:
    """setup_logging(json) writing into a buffer; the previous logging set-up is put back afterwards."""
    buf = io.StringIO()
    with logging_restored():
        stderr = sys.stderr
        sys.stderr = buf
        try:
            setup_logging("debug", "json")
        finally:
            sys.stderr = stderr
        yield buf


async def test_context_follows_tasks_and_extra_wins(json_stderr: io.StringIO) -> None:
    log = logging.getLogger("pipeline.test")

    async def relay(rid: str) -> None:
        bind_log_context(relay_id=rid)
        await asyncio.sleep(0)
        with log_context(utterance_id=f"{rid}-u1"):
            log.info("decoding")
        log.info("idle")

    await asyncio.gather(relay("r1"), relay("r2"))
    log.info("process", extra={"conversation_id": "c9"})
    with pytest.raises(ValueError, match="relay"):
        log_context(relay=1).__enter__()  # type: ignore[arg-type]
    recs = parse_lines(json_stderr.getvalue())
    got = [(r["message"], r["relay_id"], r["utterance_id"], r["conversation_id"]) for r in recs]
    assert sorted(got[:4]) == [("decoding", "r1", "r1-u1", None), ("decoding", "r2", "r2-u1", None),
                               ("idle", "r1", None, None), ("idle", "r2", None, None)]
    assert got[4] == ("process", None, None, "c9")  # the relays' context stayed in their tasks


def test_exception_is_scrubbed_and_kept(json_stderr: io.StringIO) -> None:
    from pipeline.logs import register_secret
    register_secret("sekrit-token-123")
    try:
        raise RuntimeError("failed with sekrit-token-123")
    except RuntimeError:
        logging.getLogger("pipeline.test").exception("boom")
    [rec] = parse_lines(json_stderr.getvalue())
    assert "RuntimeError: failed with ***" in rec["exception"] and "sekrit" not in json_stderr.getvalue()


def test_run_with_log_format_json_writes_only_json_lines(tmp_path: Path) -> None:
    """`echo-relay run --log-format json` on a clip: every stderr line parses, with every field; the record
    about the utterance (a blocklist step drops it) carries its utterance id."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("transform:\n  steps:\n    - step: blocklist\n      words: [experience]\n      mode: drop\n",
                   encoding="utf-8")
    r = subprocess.run([*echo_relay(), "run", "-c", str(cfg), "--source", f"file:{CLIP}", "--speed", "0",
                        "--sink", f"jsonl:{tmp_path / 'out.jsonl'}", "--no-control", "--log-format", "json"],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    recs = parse_lines(r.stderr)
    assert any(x["logger"] == "pipeline.app" and x["message"].startswith("done: 1 utterance") for x in recs), recs
    [dropped] = [x for x in recs if "dropped by transform step blocklist" in x["message"]]
    assert dropped["utterance_id"] == "u1" and dropped["level"] == "info", dropped
    assert all(x["relay_id"] is None for x in recs)  # `run` has one relay and no relay id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_relay_lines_carry_the_relay_id(tmp_path: Path) -> None:
    """`serve` with `logging.format: json` in its config: a relay's records (its source opening, its end)
    carry its relay id; the process's own records none."""
    port = free_port()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"serve:\n  file_roots: [{json.dumps(str(CLIP.parent))}, {json.dumps(str(tmp_path))}]\n"
                   "source:\n  file:\n    speed: 4\nlogging:\n  format: json\n", encoding="utf-8")
    err = tmp_path / "stderr.log"
    with err.open("wb") as fh:
        proc = subprocess.Popen([*echo_relay(), "serve", "-c", str(cfg), "--control-port", str(port)], cwd=tmp_path,
                                env=env(), stdout=subprocess.DEVNULL, stderr=fh)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            wait_until_ready(client, proc, err, TIMEOUT_S)
            deadline = time.monotonic() + TIMEOUT_S
            ids = []
            for i in range(2):
                body = {"source": f"file:{CLIP}", "sink": f"jsonl:{tmp_path / f'{i}.jsonl'}"}
                r = client.post("/v1/relays", json=body)
                assert r.status_code == 201, r.text
                ids.append(r.json()["id"])
            while not all(client.get(f"/v1/relays/{rid}").json()["phase"] in ("ended", "failed") for rid in ids):
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, err.read_text()
    recs = parse_lines(err.read_text(encoding="utf-8"))
    for rid in ids:
        ended = [x for x in recs if x["message"].startswith(f"relay {rid} ended")]
        assert [x["relay_id"] for x in ended] == [rid], recs
        opened = [x for x in recs if x["logger"] == "pipeline.source.file" and x["relay_id"] == rid]
        assert len(opened) == 1 and str(CLIP) in opened[0]["message"], recs
    ready = [x for x in recs if x["logger"] == "pipeline.control.server"]
    assert ready and all(x["relay_id"] is None for x in ready), recs
