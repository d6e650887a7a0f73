"""The command line as users meet it: help, config check, and one-line errors with documented statuses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.dsp import wav_bytes
from tests.conftest import REPO, clip


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("ECHO_RELAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], status: int, *words: str) -> None:
    assert proc.returncode == status, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("echo-relay:")]
    assert len(errors) == 1, proc.stderr
    for w in words:
        assert w in errors[0], errors[0]


@pytest.mark.parametrize("command", [[], ["run"], ["transcribe"], ["config", "check"], ["models", "pull"],
                                     ["tavus", "conversations", "create"], ["devices"]])
def test_help_reads_like_documentation(command: list[str]) -> None:
    proc = cli(*command, "--help")
    assert proc.returncode == 0 and "usage: echo-relay" in proc.stdout
    assert len(proc.stdout.splitlines()) >= 6  # describes options, not just a usage line


def test_run_help_documents_exit_statuses_and_specs() -> None:
    out = cli("run", "--help").stdout
    assert "mic[:DEVICE] | file:PATH | daily" in out and "console | jsonl:PATH | daily" in out
    assert "exit status" in out and "configuration/usage" in out


def test_config_check_prints_effective_config_with_secrets_redacted(tmp_path: Path) -> None:
    proc = cli("config", "check", "--config", str(REPO / "config.yaml"),
               env={"TAVUS_API_KEY": "tvs-very-secret-key", "ECHO_RELAY_TOKEN": "tok-abcdef123"})
    assert proc.returncode == 0, proc.stderr
    assert "tvs-very-secret-key" not in proc.stdout + proc.stderr
    assert "tok-abcdef123" not in proc.stdout + proc.stderr
    assert "api_key: '***'" in proc.stdout and "token: '***'" in proc.stdout
    assert "hangover_ms: 700" in proc.stdout and "engine: silero" in proc.stdout


def test_config_error_names_key_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("vad:\n  hangover_ms: soon\n")
    assert_one_line_error(cli("config", "check", "--config", str(bad)), 2, "vad.hangover_ms", "integer")
    assert_one_line_error(cli("run", "--config", str(bad)), 2, "vad.hangover_ms")
    bad.write_text("sink:\n  sepc: console\n")
    assert_one_line_error(cli("config", "check", "--config", str(bad)), 2, "sink.sepc", "unknown key")


def test_unknown_source_and_sink_specs_exit_2() -> None:
    assert_one_line_error(cli("run", "--no-control", "--source", "tape:deck"), 2, "unknown source spec 'tape:deck'")
    assert_one_line_error(cli("run", "--no-control", "--sink", "kafka:x"), 2, "unknown sink spec 'kafka:x'")


@pytest.mark.parametrize("kind", ["missing", "empty", "corrupt", "directory"])
def test_bad_audio_files_exit_3(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "talk.wav"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + os.urandom(2000))
    elif kind == "directory":
        path.mkdir()
    assert_one_line_error(cli("run", "--no-control", "--source", f"file:{path}"), 3, str(path))
    assert_one_line_error(cli("transcribe", str(path)), 3, str(path))


def test_missing_model_exit_4(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"asr:\n  model: base.en\n  download: false\n  models_dir: {tmp_path}\n")
    proc = cli("transcribe", "--config", str(cfg), str(clip("whisper.cpp/jfk.wav")))
    assert_one_line_error(proc, 4, "base.en", "models pull")


def test_devices_without_hardware_says_so() -> None:
    proc = cli("devices")
    assert proc.returncode in (0, 3)
    assert "No audio input devices" in proc.stdout + proc.stderr or "PortAudio" in proc.stdout + proc.stderr


def test_transcribe_json_has_timings(tmp_path: Path) -> None:
    silent = tmp_path / "silence.wav"
    silent.write_bytes(wav_bytes(np.zeros(32000, np.int16), 16000))
    proc = cli("transcribe", "--json", str(silent))
    assert proc.returncode == 0, proc.stderr
    import json
    record = json.loads(proc.stdout)
    assert record["text"] == "" and record["utterances"] == [] and record["duration_s"] == 2.0
