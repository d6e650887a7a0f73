"""Reliability/security: the Tavus API key never appears in any output.

A full `echo-relay run --sink daily --log-level debug` (a subprocess: real speech, VAD, tiny.en, the
real Daily sink on the daily-python stand-in with a replica, the Tavus client against the fake Tavus
server) with TAVUS_API_KEY set in the environment creates a persona and a conversation, delivers the
utterance, ends the conversation; then `config check` and `tavus personas list` at debug level. All of
their stdout and stderr is searched for the key (and for its first half, in case of truncation).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer

REPO = Path(__file__).resolve().parent.parent
JFK = REPO / "tests" / "data" / "speech" / "whisper.cpp" / "jfk.wav"
KEY = "tvs-SECRET-0f9e8d7c6b5a4f3e2d1c0b9a"

LAUNCHER = """
import logging, sys
import pipeline.cli
from pipeline.testing.fake_daily import FakeRoom
# Every room the Tavus fake hands out exists in this process's Daily stand-in, with the replica in it.
FakeRoom.set_autocreate(lambda room: room.add_replica("echo-relay", delay_s=0.2))
setup = pipeline.cli.setup_logging
def setup_everything(level, fmt="text"):  # every logger at debug (httpx, pipeline.*, ...), same handler
    setup(level, fmt)
    logging.getLogger().setLevel(logging.DEBUG)
    for name in ("pipeline", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG)
pipeline.cli.setup_logging = setup_everything
sys.exit(pipeline.cli.main(sys.argv[1:]))
"""


def cli(tmp_path: Path, tavus_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "TAVUS_API_KEY": KEY,
           "TAVUS_API_URL": tavus_url}
    env.pop("ECHO_RELAY_CONFIG", None)
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=90)


def test_api_key_never_printed(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("sink:\n  daily:\n    module: pipeline.testing.fake_daily\n    replica_timeout_s: 10\n"
                      f"tavus:\n  replica_id: {FAKE_REPLICA_ID}\n  api_key: ${{TAVUS_API_KEY}}\n"
                      "logging:\n  level: debug\n", encoding="utf-8")
    with FakeTavusServer(api_key=KEY) as tavus:
        run = cli(tmp_path, tavus.url, "run", "--config", str(config), "--source", f"file:{JFK}", "--sink", "daily",
                  "--speed", "0", "--no-control", "--log-level", "debug")
        check = cli(tmp_path, tavus.url, "config", "check", "--config", str(config), "--log-level", "debug")
        listing = cli(tmp_path, tavus.url, "tavus", "--log-level", "debug", "personas", "list")
        requests = tavus.requests
        conversations = tavus.conversations

    assert run.returncode == 0, run.stderr[-3000:]
    assert re.search(r"done: \d+ utterance\(s\), [1-9]\d* delivered", run.stderr), run.stderr[-3000:]
    for logger in ("pipeline.relay", "pipeline.sink.daily", "pipeline.daily_room", "httpcore"):
        assert f"DEBUG   {logger}" in run.stderr or f"INFO    {logger}" in run.stderr, logger  # all on
    assert check.returncode == 0, check.stderr
    assert listing.returncode == 0, listing.stderr
    # The key was used (every request authenticated) ...
    assert requests and all(r.api_key_ok for r in requests)
    assert [c["status"] for c in conversations.values()] == ["ended"]  # ended on exit
    # ... and never shown.
    for proc in (run, check, listing):
        for stream in (proc.stdout, proc.stderr):
            assert KEY not in stream
            assert KEY[: len(KEY) // 2] not in stream
    assert "api_key: '***'" in check.stdout
