"""The documentation shows what the program really does: README's JSONL example is what the README's command
writes, README's configuration-error line is the real one, docs/control-api.md's `/readyz` body is the real
body, docs/tavus.md's sample outputs are what the commands print (against the fake Tavus), and
`models list` suggests an install command that works without echo-relay on PyPI.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline import cli
from pipeline.asr import models
from pipeline.testing.fake_tavus import FakeTavusServer
from tests.conftest import logging_restored

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
CONTROL_API = (REPO / "docs" / "control-api.md").read_text(encoding="utf-8")
TAVUS = (REPO / "docs" / "tavus.md").read_text(encoding="utf-8")
TIMEOUT_S = 120.0


def echo_relay() -> list[str]:
    script = Path(sys.executable).parent / "echo-relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def env(**extra: str) -> dict[str, str]:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    e.pop("ECHO_RELAY_CONFIG", None)
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def block_after(text: str, marker: str, lang: str) -> str:
    """The first ```lang fenced block after `marker` in `text`."""
    start = text.index(marker)
    m = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, start)
    assert m, (marker, lang)
    return m.group(1)


def test_readme_jsonl_example_and_readyz_body_are_what_the_program_does(tmp_path: Path) -> None:
    """README's command (`echo-relay run --sink jsonl:out.jsonl`, the bundled sample) writes the records README
    shows: as many, with the same keys and texts; while it runs, `/readyz` answers the body docs/control-api.md
    shows (same checks)."""
    shown = [json.loads(line) for line in block_after(README, "## Sinks and the JSONL record", "jsonl").splitlines()]
    assert "echo-relay run --sink jsonl:out.jsonl" in README
    port = free_port()
    proc = subprocess.Popen([*echo_relay(), "run", "--sink", "jsonl:out.jsonl", "--control-port", str(port)],
                            cwd=tmp_path, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready: dict[str, Any] | None = None
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while ready is None and proc.poll() is None:
            assert time.monotonic() < deadline
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
                if r.status_code == 200:
                    ready = r.json()
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 0, err
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(written) == len(shown) == 3
    for got, doc in zip(written, shown, strict=True):
        assert set(got) == set(doc) and set(got["message"]["properties"]) == set(doc["message"]["properties"])
        assert (got["seq"], got["utterance_id"], got["text"]) == (doc["seq"], doc["utterance_id"], doc["text"])
        assert abs(got["audio_end_s"] - doc["audio_end_s"]) < 0.5

    assert ready is not None, f"/readyz never answered 200 during the run:\n{err}"
    doc_body = block_after(CONTROL_API, "## `GET /healthz` and `GET /readyz`", "sh")
    bodies = [json.loads(line.removeprefix("# ")) for line in doc_body.splitlines() if line.startswith("# {")]
    assert bodies[0] == ready, (bodies[0], ready)
    assert all(set(b["checks"]) == set(ready["checks"]) and b["ready"] is False for b in bodies[1:]), bodies


def test_readme_configuration_error_line_is_the_real_one(tmp_path: Path) -> None:
    m = re.search(r"`(echo-relay: configuration error: vad\.hangover_ms: [^`]+)`", README)
    assert m, "README shows a configuration error for vad.hangover_ms"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("vad:\n  hangover_ms: soon\n", encoding="utf-8")
    r = subprocess.run([*echo_relay(), "config", "check", "-c", str(cfg)], env=env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == m.group(1), r.stderr


def test_tavus_sample_outputs_are_what_the_commands_print() -> None:
    """docs/tavus.md's commands, run against the fake Tavus with the ids the page uses for the replica: what
    they print is the page's sample output, the created ids in place of the page's."""
    key = "tvs-docs-KEY-0123456789"
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", TAVUS, re.S) if "echo-relay tavus" in b]
    assert len(blocks) == 2
    with FakeTavusServer(api_key=key, replicas=("r79e1c033f",)) as fake:
        ids: dict[str, str] = {}
        for block in blocks:
            lines = block.splitlines()
            command = lines[0].replace(".venv/bin/echo-relay", "").split()
            expected = "\n".join(line.removeprefix("# ") for line in lines[1:] if line.startswith("# "))
            for doc_id, real in ids.items():
                command = [real if part == doc_id else part for part in command]
            r = subprocess.run([*echo_relay(), *command], env=env(TAVUS_API_URL=fake.url, TAVUS_API_KEY=key),
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            got = r.stdout.rstrip("\n")
            for pid in fake.personas:
                ids.setdefault("p1234abcd", pid)
            for cid in fake.conversations:
                ids.setdefault("c123", cid)
            for doc_id, real in ids.items():
                got = got.replace(real, doc_id)
            assert got == expected, f"docs/tavus.md shows:\n{expected}\nthe command prints:\n{got}"


def test_models_list_without_models_says_how_to_install_from_a_checkout(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str],
                                                                         tmp_path: Path) -> None:
    monkeypatch.setattr(models, "list_models", lambda *a, **k: [])
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("logging:\n  level: warning\n", encoding="utf-8")
    with logging_restored():  # cli.main sets the process's logging up, as the command does
        assert cli.main(["models", "list", "-c", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "pip install '.[models]'" in out and "echo-relay[models]" not in out, out
    assert "echo-relay models pull NAME" in out
