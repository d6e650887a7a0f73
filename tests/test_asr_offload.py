"""`echo-relay run` with `asr.engine: openai-http` against a transcription server on 127.0.0.1
(tests/fake_openai_server.py), as a user runs it: a server down at start is exit 4 naming the URL;
`/readyz` follows the server while the relay runs and every utterance is accounted; a run where every
decode failed exits 1; `asr.openai_http.speculative` decides whether more than one request per utterance
is sent."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from fake_openai_server import FakeTranscriptionServer, Reply

RUN_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command() -> list[str]:
    script = Path(sys.executable).parent / "echo-relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def write_config(path: Path, url: str, *, control_port: int | None = None, **http: Any) -> Path:
    openai_http = {"url": url, "timeout_s": 5.0, "retries": 1, "probe_interval_s": 0.2, **http}
    config = {"asr": {"engine": "openai-http", "deadline_s": 2.0, "openai_http": openai_http},
              "control": {"enabled": control_port is not None, "port": control_port or 0},
              "logging": {"level": "info"}}
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def env() -> dict[str, str]:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    e.pop("ECHO_RELAY_CONFIG", None)
    return e


def run(tmp_path: Path, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`echo-relay run` on the bundled sample (three utterances), as fast as possible, into a JSONL file."""
    return subprocess.run([*command(), "run", "-c", str(config), "--speed", "0", "--sink",
                           f"jsonl:{tmp_path / 'out.jsonl'}", *args], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S)


def summary(stderr: str) -> dict[str, int]:
    m = re.search(r"done: (\d+) utterance\(s\), (\d+) delivered, (\d+) dropped", stderr)
    assert m, stderr[-3000:]
    return {"closed": int(m.group(1)), "delivered": int(m.group(2)), "dropped": int(m.group(3))}


def test_server_down_at_start_exits_4_naming_the_url(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/audio/transcriptions"
    proc = run(tmp_path, write_config(tmp_path / "cfg.yaml", url))
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert f"ASR server {url} cannot be reached" in proc.stderr
    assert "ASR ready" not in proc.stderr


def test_one_request_per_utterance_unless_speculative(tmp_path: Path) -> None:
    """The bundled sample has pauses inside its utterances: speculative decodes there are extra requests."""
    counts: dict[bool, tuple[int, int]] = {}
    for speculative in (False, True):
        with FakeTranscriptionServer() as srv:
            srv.default_text = "And so my fellow Americans."
            proc = run(tmp_path, write_config(tmp_path / f"cfg-{speculative}.yaml", srv.url, speculative=speculative))
        assert proc.returncode == 0, proc.stderr[-3000:]
        done = summary(proc.stderr)
        assert done["closed"] >= 2 and done["delivered"] == done["closed"], done
        counts[speculative] = (len(srv.requests), done["closed"])  # aborted uploads (discarded decodes) count
        plain = "one request per utterance: asr.openai_http.speculative is off"
        assert (plain in proc.stderr) is not speculative, proc.stderr[-3000:]
    requests, utterances = counts[False]
    assert requests == utterances, counts
    requests_on, utterances_on = counts[True]
    assert requests_on > utterances_on, counts  # the setting is what made the difference


def test_every_utterance_failing_exits_1_and_says_so(tmp_path: Path) -> None:
    with FakeTranscriptionServer() as srv:
        srv.default_reply = Reply(500, {"error": {"message": "CUDA out of memory"}})
        proc = run(tmp_path, write_config(tmp_path / "cfg.yaml", srv.url))
    assert proc.returncode == 1, proc.stderr[-3000:]
    done = summary(proc.stderr)
    assert done["closed"] >= 2 and done["delivered"] == 0 and done["dropped"] == done["closed"], done
    assert f"{done['closed']} of {done['closed']} utterance(s) lost to ASR failures (asr_error: {done['closed']}" \
        in proc.stderr
    assert "run failed: the ASR failed on every utterance" in proc.stderr
    assert "CUDA out of memory" in proc.stderr


def test_readyz_follows_the_server_while_the_relay_runs(tmp_path: Path) -> None:
    """The sample on a loop, control API on. Once echoes flow the server stops: /readyz turns 503 with
    checks.asr_server false, an utterance that closes meanwhile is dropped after asr.deadline_s (counted in
    /status, named in the run's summary); the server comes back: /readyz is 200 again and echoes flow again.
    SIGTERM drains; exit 0 (not every utterance was lost)."""
    port = free_port()
    with FakeTranscriptionServer() as srv:
        config = write_config(tmp_path / "cfg.yaml", srv.url, control_port=port)
        err = tmp_path / "stderr.log"
        with err.open("wb") as fh:
            proc = subprocess.Popen([*command(), "run", "-c", str(config), "--speed", "2", "--loop", "--sink",
                                     f"jsonl:{tmp_path / 'out.jsonl'}"], cwd=tmp_path, env=env(),
                                    stdout=subprocess.DEVNULL, stderr=fh)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                def poll(what: str, check: Any) -> Any:
                    deadline = time.monotonic() + 60
                    while True:
                        assert proc.poll() is None, f"run exited ({proc.returncode}):\n{err.read_text()}"
                        assert time.monotonic() < deadline, (what, err.read_text()[-3000:])
                        try:
                            readyz, status = client.get("/readyz"), client.get("/status")
                        except httpx.TransportError:
                            readyz = status = None
                        if readyz is not None and status is not None:
                            found = check(readyz.status_code, readyz.json()["checks"], status.json()["ledger"])
                            if found:
                                return found
                        time.sleep(0.05)

                poll("ready, echoes flowing", lambda code, checks, ledger: code == 200 and checks["asr_server"]
                     and ledger["delivered"] >= 1)
                srv.stop()
                checks = poll("503 naming the server", lambda code, checks, ledger: code == 503 and checks)
                assert checks["asr_server"] is False and checks["model_loaded"] is True, checks
                lost = poll("an utterance dropped", lambda code, checks, ledger: ledger["dropped"])
                # The engine gives up waiting for the server at asr.deadline_s, as delivery does: either counts it.
                assert set(lost) <= {"asr_error", "asr_deadline"}, lost
                srv.start()
                before = poll("ready again", lambda code, checks, ledger: code == 200 and ledger["delivered"])
                poll("echoes again", lambda code, checks, ledger: ledger["delivered"] > before)
            proc.terminate()
            proc.wait(RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = err.read_text()
    assert proc.returncode == 0, log[-3000:]
    assert "cannot be reached" in log and "answers again after" in log, log[-3000:]
    done = summary(log)
    assert done["dropped"] >= 1 and done["delivered"] + done["dropped"] == done["closed"], done
    assert re.search(rf"{done['dropped']} of {done['closed']} utterance\(s\) lost to ASR failures", log), log[-3000:]


def test_serve_with_no_relay_still_follows_the_server(tmp_path: Path) -> None:
    """`serve` sends no audio until a relay starts: the periodic probe alone keeps /readyz true to the
    server, so an orchestrator sends no conversation to an instance whose recognition is gone."""
    port = free_port()
    with FakeTranscriptionServer() as srv:
        config = write_config(tmp_path / "cfg.yaml", srv.url, control_port=port)
        err = tmp_path / "stderr.log"
        with err.open("wb") as fh:
            proc = subprocess.Popen([*command(), "serve", "-c", str(config)], cwd=tmp_path, env=env(),
                                    stdout=subprocess.DEVNULL, stderr=fh)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
                def wait_for(status: int) -> dict[str, bool]:
                    deadline = time.monotonic() + 60
                    while True:
                        assert proc.poll() is None, f"serve exited ({proc.returncode}):\n{err.read_text()}"
                        assert time.monotonic() < deadline, err.read_text()[-3000:]
                        try:
                            r = client.get("/readyz")
                        except httpx.TransportError:
                            r = None
                        if r is not None and r.status_code == status:
                            return dict(r.json()["checks"])
                        time.sleep(0.05)

                assert wait_for(200)["asr_server"] is True
                srv.stop()
                checks = wait_for(503)
                assert checks == {"model_loaded": True, "asr_server": False, "accepting": True, "capacity": True}
                srv.start()
                assert wait_for(200)["asr_server"] is True
            proc.terminate()
            proc.wait(RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err.read_text()[-3000:]
    assert srv.requests == [] and len(srv.probes) >= 2  # at start, and the one that found it back
