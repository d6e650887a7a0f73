"""End to end: `echo-relay run` (a subprocess) driven through its control API.

A looped file of digital silence keeps the relay running without any speech; the control API
queues a text echo (Tavus's quickstart body), an audio echo and an interrupt; the jsonl sink shows
exactly what would have been sent to the room; SIGTERM ends the run with status 0.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline import protocol
from pipeline.dsp import wav_bytes

READY_TIMEOUT_S = 60.0
DELIVERY_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 30.0
QUICKSTART = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "...",
              "properties": {"modality": "text", "text": "Hello", "done": "true"}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_silence(path: Path, seconds: float = 2.0, rate: int = 16000) -> None:
    path.write_bytes(wav_bytes(np.zeros(int(seconds * rate), np.int16), rate))


def tone_b64(seconds: float = 1.0, rate: int = 16000, hz: float = 440.0) -> str:
    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype("<i2")
    return base64.b64encode(pcm.tobytes()).decode("ascii")


def read_records(path: Path) -> list[dict[str, Any]]:
    """The complete records of a JSONL file the relay is still writing: a read may catch a long record (an
    audio echo) half written, so the text after the last newline is not a record yet."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.strip()]


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return float(sample.value)
    return 0.0


@pytest.mark.slow
def test_run_driven_through_the_control_api(tmp_path: Path) -> None:
    silence = tmp_path / "silence.wav"
    write_silence(silence)
    out = tmp_path / "out.jsonl"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("ECHO_RELAY_CONFIG", None)
    stderr_path = tmp_path / "stderr.log"
    cmd = [sys.executable, "-m", "pipeline", "run", "--source", f"file:{silence}", "--loop",
           "--sink", f"jsonl:{out}", "--control-port", str(port)]
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    def logs() -> str:
        return stderr_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    try:
        client = httpx.Client(base_url=base, timeout=10)
        # 1. ready: model loaded, sink open
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"echo-relay exited with {proc.returncode}:\n{logs()}"
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"/readyz never returned 200:\n{logs()}"
            time.sleep(0.2)
        assert client.get("/healthz").json() == {"status": "ok"}

        # 1b. hostile input is refused at the door and never reaches the room (issue 11): a lone surrogate
        # (it was accepted, then failed in delivery with a traceback and exit 1), a rebound DNS name, a form
        # post from any web page, a text over control.max_text_chars.
        surrogate = '{"properties": {"modality": "text", "text": "x \\ud800", "done": true}}'
        r = client.post("/send_text_message", content=surrogate, headers={"Content-Type": "application/json"})
        assert (r.status_code, r.json()["field"]) == (422, "properties.text"), r.text
        r = client.post("/send_text_message", json=QUICKSTART, headers={"Host": "attacker.example"})
        assert (r.status_code, r.json()["field"]) == (421, "Host"), r.text
        r = client.post("/interrupt", content=b"x=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert (r.status_code, r.json()["field"]) == (415, "Content-Type"), r.text
        r = client.post("/send_text_message", json={"properties": {"modality": "text", "text": "x" * 990_000}})
        assert (r.status_code, r.json()["field"]) == (422, "properties.text"), r.text
        assert read_records(out) == []

        # 2. the quickstart body, an audio echo, an interrupt
        r = client.post("/send_text_message", json=QUICKSTART)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "success"
        [text_id] = r.json()["inference_ids"]
        audio = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "...",
                 "properties": {"modality": "audio", "audio": tone_b64(), "sample_rate": 16000, "done": True}}
        r = client.post("/send_text_message", json=audio)
        assert r.status_code == 200, r.text
        [audio_id] = r.json()["inference_ids"]

        # 3. what reached the sink
        def delivered(records: list[dict[str, Any]]) -> bool:
            audio_done = any(rec["message"].get("properties", {}).get("inference_id") == audio_id
                             and rec["message"]["properties"].get("done") is True for rec in records)
            return audio_done and any(rec["message"].get("properties", {}).get("text") == "Hello" for rec in records)

        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        while not delivered(records := read_records(out)):
            assert proc.poll() is None, f"echo-relay exited with {proc.returncode}:\n{logs()}"
            assert time.monotonic() < deadline, f"not delivered: {records!r}\n{logs()}"
            time.sleep(0.1)
        # Nothing is pending any more, so the interrupt drops nothing (an interrupt drops what has not
        # gone out: tests/test_delivery.py).
        r = client.post("/interrupt")
        assert r.status_code == 200, r.text
        assert r.json() == {"status": "success", "sent": True, "dropped_echoes": 0,
                            "detail": "interrupt sent (POST /interrupt)"}
        records = read_records(out)

        [text_rec] = [rec for rec in records if rec["event"] == "echo"
                      and rec["message"]["properties"]["modality"] == "text"]
        msg = text_rec["message"]
        assert msg["message_type"] == "conversation" and msg["event_type"] == "conversation.echo"
        assert msg["properties"]["text"] == "Hello"
        assert msg["properties"]["done"] is True
        assert msg["properties"]["inference_id"] == text_id
        assert text_rec["text"] == "Hello"

        chunks = [rec["message"] for rec in records if rec["event"] == "echo"
                  and rec["message"]["properties"]["modality"] == "audio"]
        assert len(chunks) > 2
        assert {c["properties"]["inference_id"] for c in chunks} == {audio_id}
        assert all(protocol.serialized_size(c) <= protocol.DEFAULT_MAX_MESSAGE_BYTES for c in chunks)
        assert [c["properties"]["done"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
        rates = {c["properties"]["sample_rate"] for c in chunks}
        assert len(rates) == 1
        [rate] = rates
        samples = sum(len(base64.b64decode(c["properties"]["audio"])) // 2 for c in chunks[:-1])
        assert abs(samples - rate) <= rate * 0.01, (samples, rate)  # 1 s of audio, resampled

        [interrupt] = [rec for rec in records if rec["event"] == "interrupt"]
        assert interrupt["message"]["event_type"] == "conversation.interrupt"
        seqs = [rec["seq"] for rec in records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

        # 4. counters moved
        text = client.get("/metrics").text
        assert metric(text, "echo_relay_echoes_sent_total", {"source": "api"}) >= 2
        assert metric(text, "echo_relay_interrupts_sent_total") >= 1
        status = client.get("/status")
        assert status.status_code == 200 and isinstance(status.json(), dict)
        client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"echo-relay did not exit within {EXIT_TIMEOUT_S}s of SIGTERM:\n"
                                 f"{logs()}") from None
    assert rc == 0, f"exit status {rc}:\n{logs()}"
    assert "Traceback" not in logs()
    # the control API is gone with the relay
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)
