"""Reliability: signals in the middle of an utterance of a real-time run (`python -m pipeline run`, a
subprocess: real file source paced at real time, VAD, tiny.en, jsonl sink).

SIGTERM, SIGINT or SIGHUP (a closed terminal, systemd) ~1 s into speech: capture stops, the utterance in
progress is closed and delivered (with the words spoken so far) within sink.drain_timeout_s, and the exit
status is 0. A second SIGINT or SIGHUP during the drain exits at once with status 130.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from faults import load_pcm, words, write_wav

from pipeline.frames import SAMPLE_RATE

REPO = Path(__file__).resolve().parent.parent
CLIP = "mfa/61-70968-0000.flac"  # HE BEGAN A CONFUSED COMPLAINT AGAINST THE WIZARD ... CURTAIN ON THE LEFT
LEAD_S = 0.5
INTO_SPEECH_S = 1.2
READY_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 10.0  # sink.drain_timeout_s default


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("signals") / "speech.wav"
    pcm = load_pcm(CLIP)
    silence = np.zeros(int(LEAD_S * SAMPLE_RATE), np.int16)
    write_wav(path, np.concatenate([silence, pcm, silence, silence]))
    return path


def speech_onset_s(pcm: np.ndarray[Any, Any]) -> float:
    """First 20 ms block clearly above the noise floor."""
    block = SAMPLE_RATE // 50
    for i in range(0, len(pcm) - block, block):
        if np.sqrt(np.mean(pcm[i:i + block].astype(np.float64) ** 2)) > 500:
            return i / SAMPLE_RATE
    return 0.0


def start_relay(tmp_path: Path, source: Path, extra: list[str] | None = None) -> tuple[subprocess.Popen[bytes], Path,
                                                                                            Path]:
    out = tmp_path / "out.jsonl"
    err = tmp_path / "stderr.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop("ECHO_RELAY_CONFIG", None)
    cmd = [sys.executable, "-m", "pipeline", "run", "--source", f"file:{source}", "--sink", f"jsonl:{out}",
           "--no-control", *(extra or [])]
    with err.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=fh)
    return proc, out, err


def wait_for_stream_start(proc: subprocess.Popen[bytes], err: Path) -> float:
    """The relay logs its endpointing policy right before the sink opens and the stream starts."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "endpointing:" not in err.read_text(encoding="utf-8", errors="replace"):
        assert proc.poll() is None, f"exited early ({proc.returncode}):\n{err.read_text()}"
        assert time.monotonic() < deadline, err.read_text()
        time.sleep(0.01)
    return time.monotonic()


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_mid_utterance_delivers_it_and_exits_0(tmp_path: Path, clip_file: Path, sig: signal.Signals) -> None:
    onset = LEAD_S + speech_onset_s(load_pcm(CLIP))
    proc, out, err = start_relay(tmp_path, clip_file)
    try:
        t0 = wait_for_stream_start(proc, err)
        time.sleep(max(0.0, t0 + onset + INTO_SPEECH_S - time.monotonic()))
        assert records(out) == []  # nothing delivered yet: the utterance is still open
        t_sig = time.monotonic()
        proc.send_signal(sig)
        status = proc.wait(timeout=DRAIN_TIMEOUT_S + 20)
        elapsed = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.read_text(encoding="utf-8", errors="replace")
    assert status == 0, log
    assert elapsed < DRAIN_TIMEOUT_S + 5, log  # generous: only proves the drain is bounded
    assert f"{sig.name}: stopping capture, delivering what is pending" in log
    assert "Traceback" not in log
    assert re.search(r"done: 1 utterance\(s\), 1 delivered, 0 dropped\s*, 0 undeliverable", log), log
    recs = [r for r in records(out) if r["event"] == "echo"]
    assert len(recs) == 1, recs
    rec = recs[0]
    said = words(rec["text"])
    assert "began" in said, rec  # the words spoken before the signal ...
    assert "curtain" not in said, rec  # ... and not the ones after it: it was cut mid-utterance
    assert rec["audio_end_s"] <= onset + INTO_SPEECH_S + 0.5
    assert rec["message"]["properties"]["done"] is True


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_second_signal_exits_at_once_with_130(tmp_path: Path, clip_file: Path, sig: signal.Signals) -> None:
    config = tmp_path / "config.yaml"
    # A transform that takes 8 s makes the drain long enough to interrupt it.
    config.write_text("transform:\n  steps:\n    - step: tests.faults:SlowStep\n      seconds: 8\n"
                      "      timeout_s: 9\n", encoding="utf-8")
    onset = LEAD_S + speech_onset_s(load_pcm(CLIP))
    proc, out, err = start_relay(tmp_path, clip_file, ["--config", str(config)])
    try:
        t0 = wait_for_stream_start(proc, err)
        time.sleep(max(0.0, t0 + onset + INTO_SPEECH_S - time.monotonic()))
        proc.send_signal(sig)
        deadline = time.monotonic() + 10
        while f"{sig.name}: stopping capture" not in err.read_text(encoding="utf-8", errors="replace"):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        time.sleep(0.3)
        assert proc.poll() is None  # still draining (the slow transform)
        t_sig = time.monotonic()
        proc.send_signal(sig)
        status = proc.wait(timeout=10)
        elapsed = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err.read_text(encoding="utf-8", errors="replace")
    assert status == 130, log
    assert elapsed < 3.0, log  # at once: not after the 8 s transform
    assert f"{sig.name} again: exiting now" in log
    assert records(out) == []
