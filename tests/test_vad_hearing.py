"""Hearing on real-world audio (issue "hear everything"): VAD state hygiene, noise and music that must stay
silent, and speech the VAD did not open an utterance on counted as unheard, never lost silently.

Real clips from tests/data/speech; Silero, Whisper and the CLI run for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.dsp import rms_dbfs, wav_bytes
from pipeline.source.file import decode_file
from pipeline.vad.silero import FRAME_SAMPLES, SileroVad
from tests.conftest import REPO, SPEECH, normalize
from tests.test_cli import cli

SR = 16_000
NOISE = sorted((SPEECH / "clapclap" / "dcase_noise").glob("*.wav"))
MUSIC_01 = SPEECH / "clapclap/noisy_music/mix_01_1993-147149-0021_-0Gj8-vB1q4.wav"
MUSIC_04 = SPEECH / "clapclap/noisy_music/mix_04_1993-147149-0021_dev_060.wav"
MUSIC_ONLY_FROM_S = 15.0  # its speech ends near 10.5 s; music alone runs on to 120 s


def load(rel: str) -> np.ndarray:
    return decode_file(SPEECH / rel)


def gain(x: np.ndarray, db: float) -> np.ndarray:
    return np.clip(x.astype(np.float32) * 10 ** (db / 20), -32768, 32767).astype(np.int16)


def mix_at_snr(speech: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    n = np.resize(noise, len(speech)).astype(np.float64)
    s_rms = np.sqrt(np.mean(speech.astype(np.float64) ** 2))
    n_rms = np.sqrt(np.mean(n ** 2))
    return np.clip(speech + n * s_rms / (n_rms * 10 ** (snr_db / 20)), -32768, 32767).astype(np.int16)


def frames_over(vad: SileroVad, audio: np.ndarray, threshold: float = 0.5) -> list[bool]:
    return [vad.speech_prob(audio[i:i + FRAME_SAMPLES]) >= threshold
            for i in range(0, len(audio) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]


def drift_stream() -> tuple[np.ndarray, np.ndarray]:
    """Speech under street noise at 0 dB SNR, 2.5 s of digital silence, then a quiet hesitant speaker
    (-25 dB): the issue's drift case, built from shared clips. Returns (stream, the quiet part)."""
    noisy = mix_at_snr(load("clapclap/librispeech_dev_clean/174-168635-0007.flac"),
                       load("clapclap/dcase_noise/dev_011.wav"), 0.0)
    quiet = gain(load("mfa/mfa_internalsil.flac"), -25.0)
    head = np.concatenate([noisy, np.zeros(int(2.5 * SR), np.int16)])
    head = head[: len(head) // FRAME_SAMPLES * FRAME_SAMPLES]  # the quiet part starts on a frame boundary
    return np.concatenate([head, quiet]), quiet


# --------------------------------------------------------------------------------- state hygiene
def test_quiet_speaker_after_noise_and_silence_is_heard_as_by_a_fresh_vad() -> None:
    stream, quiet = drift_stream()
    fresh = sum(frames_over(SileroVad(), quiet))
    head = len(stream) - len(quiet)
    carried = sum(frames_over(SileroVad(state_reset_ms=0), stream)[head // FRAME_SAMPLES:])
    vad = SileroVad()  # the default policy
    hygienic = sum(frames_over(vad, stream)[head // FRAME_SAMPLES:])
    assert carried < 0.75 * fresh, (carried, fresh)  # the drift is real (62 of 89 frames when measured) ...
    assert hygienic >= 0.9 * fresh, (hygienic, fresh)  # ... and the reset policy removes it
    assert vad.state_resets >= 1


@pytest.mark.parametrize("silence_s", [5.0, 30.0])
def test_quiet_speaker_after_long_silence_is_heard_as_by_a_fresh_vad(silence_s: float) -> None:
    """The state drifts in long silence too: one reset when it starts is not enough (30 s: 26 frames with
    one reset at 2 s, 67 carried, 86 with a reset every 2 s, 89 fresh)."""
    noisy, quiet = drift_stream()[0][:10 * SR], gain(load("mfa/mfa_internalsil.flac"), -25.0)
    head = np.concatenate([noisy, np.zeros(int(silence_s * SR), np.int16)])
    stream = np.concatenate([head, quiet])
    fresh = sum(frames_over(SileroVad(), quiet))
    heard = sum(frames_over(SileroVad(), stream)[len(head) // FRAME_SAMPLES:])
    assert heard >= 0.9 * fresh, (heard, fresh)


def test_no_state_reset_inside_the_pauses_of_speech() -> None:
    """jfk pauses up to ~1 s between phrases: a reset there would leave "ask not" to a cold model."""
    jfk = load("whisper.cpp/jfk.wav")
    vad = SileroVad()
    heard = frames_over(vad, jfk)
    carried = frames_over(SileroVad(state_reset_ms=0, relisten_drop_db=0), jfk)
    assert vad.state_resets == 0
    # A fresh listener may start in a pause and take over; the phrases after it are heard as well or better.
    assert sum(heard) >= sum(carried)
    ask_not = slice(int(3.2 * SR) // FRAME_SAMPLES, int(4.4 * SR) // FRAME_SAMPLES)
    assert sum(heard[ask_not]) >= sum(carried[ask_not]) > 0


@pytest.mark.parametrize("offset", [0, 128, 256, 384])
def test_no_state_reset_in_loud_background_music(offset: int) -> None:
    """A fresh state hears the singing in background music as speech (mix_01's tail: 250 frames over 0.5
    with resets there); the state adapted to the loud music keeps it out, so resets wait for quiet, and a
    rest in the music (~150 ms, 20 dB down) is not the end of it, whatever the frame alignment."""
    music = decode_file(MUSIC_01)[int(MUSIC_ONLY_FROM_S * SR) + offset:]
    vad = SileroVad()
    assert sum(frames_over(vad, music)) <= 10
    assert (vad.state_resets, vad.takeovers) == (0, 0)
    reset_anyway = SileroVad(state_reset_max_dbfs=0.0)
    assert sum(frames_over(reset_anyway, music)) >= 100  # what the cap prevents


def at_dbfs(x: np.ndarray, dbfs: float) -> np.ndarray:
    return gain(x, dbfs - rms_dbfs(x))


@pytest.mark.parametrize("noise", NOISE, ids=[n.stem for n in NOISE])
def test_quiet_speaker_right_after_loud_noise_ends_is_heard_as_by_a_fresh_vad(noise: Path) -> None:
    """4 s of loud noise (-15 dBFS) that stops, then at once a quiet speaker (-40 dBFS): the state adapted to
    the noise is stale when it ends (jfk: 125 of a fresh state's 208 frames after dev_003 when carried)."""
    loud = at_dbfs(decode_file(noise)[:4 * SR], -15.0)
    quiet = at_dbfs(load("whisper.cpp/jfk.wav"), -40.0)
    stream = np.concatenate([loud, quiet])
    fresh = sum(frames_over(SileroVad(), quiet))
    vad = SileroVad()
    heard = sum(frames_over(vad, stream)[len(loud) // FRAME_SAMPLES:])
    assert heard >= 0.97 * fresh, (heard, fresh)
    assert vad.takeovers == 1
    if noise.stem == "dev_003":
        carried = sum(frames_over(SileroVad(relisten_drop_db=0), stream)[len(loud) // FRAME_SAMPLES:])
        assert carried < 0.7 * fresh, (carried, fresh)  # the stale state the listener replaces


# ------------------------------------------------------------------------------ no false echoes
# asr overrides for the multilingual base with language auto (the `multilingual` extra, in the dev install).
BASE_AUTO: dict[str, object] = {"model": "base", "language": None, "download": False, "models_dir": "/nonexistent"}


def write_config(tmp_path: Path, asr: dict[str, object] | None = None, **vad: object) -> Path:
    tree = yaml.safe_load((REPO / "config.yaml").read_text())
    tree["asr"]["models_dir"] = str(REPO / "models")
    tree["asr"].update(asr or {})
    tree["vad"].update(vad)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    return path


def run_file(tmp_path: Path, audio: np.ndarray, asr: dict[str, object] | None = None,
             **vad: object) -> tuple[list[dict[str, object]], str]:
    """`echo-relay run` on `audio` with config.yaml (asr and vad keys overridden): its JSONL records and log."""
    wav, out = tmp_path / "in.wav", tmp_path / "out.jsonl"
    wav.write_bytes(wav_bytes(audio, SR))
    proc = cli("run", "--config", str(write_config(tmp_path, asr, **vad)), "--source", f"file:{wav}",
               "--sink", f"jsonl:{out}", "--no-control", "--speed", "0", timeout=600)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    return records, proc.stderr


@pytest.mark.parametrize("asr", [None, BASE_AUTO], ids=["tiny.en", "base-auto-language"])
def test_noise_only_and_music_only_audio_give_no_echo(tmp_path: Path, asr: dict[str, object] | None) -> None:
    gap = np.zeros(SR, np.int16)
    music = decode_file(MUSIC_01)[int(MUSIC_ONLY_FROM_S * SR):]
    parts = [p for n in NOISE for p in (decode_file(n), gap)] + [music]
    assert len(NOISE) == 6
    records, stderr = run_file(tmp_path, np.concatenate(parts), asr)
    assert [r["text"] for r in records] == [], stderr
    assert "done:" in stderr  # the run got to the end (its drops are counted there)


@pytest.mark.parametrize("pause_s", [0.3, 1.0])
def test_quiet_speaker_right_after_a_loud_one_is_heard_as_by_a_fresh_vad(pause_s: float) -> None:
    """A loud speaker (-18 dBFS), a short pause over room noise (-65 dBFS), then a speaker 27 dB quieter: the
    state adapted to the loud voice heard jfk there on 95 / 101 of a fresh state's 205 frames."""
    rng = np.random.default_rng(0)
    loud = at_dbfs(load("clapclap/librispeech_dev_clean/2086-149220-0000.flac"), -18.0)
    room = (rng.standard_normal(int(pause_s * SR)) * 32768 * 10 ** (-65 / 20)).astype(np.int16)
    head = np.concatenate([loud, room])
    head = head[: len(head) // FRAME_SAMPLES * FRAME_SAMPLES]
    fresh = heard = carried = 0
    for clip in ("whisper.cpp/jfk.wav", "mfa/mfa_internalsil.flac"):
        quiet = at_dbfs(load(clip), -45.0)
        stream = np.concatenate([head, quiet])
        fresh += sum(frames_over(SileroVad(), quiet))
        heard += sum(frames_over(SileroVad(), stream)[len(head) // FRAME_SAMPLES:])
        carried += sum(frames_over(SileroVad(relisten_drop_db=0), stream)[len(head) // FRAME_SAMPLES:])
    assert heard >= 0.95 * fresh, (heard, fresh)
    assert carried < 0.85 * fresh, (carried, fresh)  # the stale state this listener replaces


def test_speech_right_after_music_stops_is_echoed(tmp_path: Path) -> None:
    """mix_04: loud music over the first 3.6 s, then the speaker alone at about -45 dBFS. The state adapted to
    the music scored "need have" under 0.2 and the echo began at "no fear"; the offline decode of the clip
    reads "You need have no fear of going home ..."."""
    records, stderr = run_file(tmp_path, decode_file(MUSIC_04))
    said = normalize(" ".join(str(r["asr_text"]) for r in records)).split()
    assert "need" in said and said.index("need") < said.index("fear"), (said, stderr)


# ------------------------------------------------------------------------------- unheard speech
@pytest.mark.parametrize("clip", ["whisper.cpp/jfk.wav", "clapclap/librispeech_dev_clean/2086-149220-0000.flac"])
def test_speech_made_undetectable_is_counted_as_unheard(tmp_path: Path, clip: str) -> None:
    """Speech thresholds no frame reaches (and no weak path): nothing is relayed, and the run says how much speech-like
    audio it did not hear instead of reporting a clean run."""
    audio = load(clip)
    records, stderr = run_file(tmp_path, audio, threshold=0.999, neg_threshold=0.999, weak_prob=None)
    assert records == []
    line = next(x for x in stderr.splitlines() if "unheard speech:" in x)
    regions, seconds = line.split("unheard speech:")[1].replace("region(s),", "").replace("s", "").split()
    assert int(regions) >= 1 and float(seconds) >= 0.5 * (len(audio) / SR - 2.0), line
    assert "WARNING" in line
    # With the normal threshold the same clip is heard and nothing is reported unheard.
    records, stderr = run_file(tmp_path, audio)
    assert records and "unheard speech: 0 region(s), 0.0 s" in stderr


# ------------------------------------------------------------------------------- quiet and whispered
WHISPER_WORDS = ["this", "is", "all", "very"]  # + "whispered" (tiny.en writes "whisper", as offline)


@pytest.mark.parametrize(("name", "make"), [
    ("as recorded", lambda w: w),
    ("10 dB quieter", lambda w: gain(w, -10.0)),
    ("under street noise at 15 dB SNR", lambda w: mix_at_snr(w, load("clapclap/dcase_noise/dev_001.wav"), 15.0)),
    ("after a loud speaker and silence", lambda w: np.concatenate(
        [load("clapclap/librispeech_dev_clean/2428-83705-0024.flac"), np.zeros(2 * SR, np.int16), w])),
])
def test_whispered_speech_is_echoed_with_its_words(tmp_path: Path, name: str, make: object) -> None:
    """mfa/whisper.flac: Silero passes 0.5 on 2 of its 178 frames; offline Whisper reads "This is all very
    whisper(ed)". The relay must echo those words, whatever the level or background."""
    assert callable(make)
    records, stderr = run_file(tmp_path, make(load("mfa/whisper.flac")))
    said = normalize(" ".join(str(r["asr_text"]) for r in records)).split()
    assert all(w in said for w in WHISPER_WORDS), (name, said, stderr)
    assert any(w.startswith("whisper") for w in said), (name, said)
