"""Audio-modality echo from the relay: the user's own voice (`--mode audio`) or on a transform's request."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline import protocol
from pipeline.config import load_settings
from pipeline.frames import UtteranceMeta
from pipeline.wiring import build_relay
from tests.conftest import REPO, clip

CLIP = "deepspeech-examples/4507-16021-0012.wav"  # "Why should one halt on the way?" (2.7 s)


def audio_messages(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_audio_utterance(recs: list[dict[str, object]], rate: int = 24_000) -> np.ndarray:
    """One utterance's audio echo: one inference_id, under the size limit, closed by a silent done chunk."""
    props = [r["message"]["properties"] for r in recs]  # type: ignore[index]
    assert all(p["modality"] == "audio" and p["sample_rate"] == rate for p in props)
    assert len({p["inference_id"] for p in props}) == 1
    assert [p["done"] for p in props] == [False] * (len(props) - 1) + [True]
    assert all(protocol.serialized_size(r["message"]) <= 4096 for r in recs)  # type: ignore[arg-type]
    closing = np.frombuffer(base64.b64decode(props[-1]["audio"]), "<i2")
    assert len(closing) and not closing.any()
    return np.concatenate([np.frombuffer(base64.b64decode(p["audio"]), "<i2") for p in props[:-1]])


def test_mode_audio_relays_the_voice_itself(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--no-control", "--speed", "0", "--mode", "audio",
                           "--source", f"file:{clip(CLIP)}", "--sink", f"jsonl:{out}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    recs = audio_messages(out)
    assert len({r["utterance_id"] for r in recs}) == 1
    pcm = check_audio_utterance(recs)
    rec = recs[0]
    # The utterance's audio (pre-roll + speech + pad) at 24 kHz: at least the detected speech, and loud.
    speech_s = float(rec["audio_end_s"]) - float(rec["audio_start_s"])  # type: ignore[arg-type]
    assert speech_s * 24_000 <= len(pcm) <= (speech_s + 1.0) * 24_000
    assert np.sqrt((pcm.astype(np.float64) ** 2).mean()) > 300
    assert "halt" in str(rec["asr_text"]).lower()  # still transcribed, for logs and transforms


def to_audio(text: str, meta: UtteranceMeta) -> str:
    """A transform step asking for the voice instead of the text when the speaker asks a question."""
    if text.rstrip().endswith("?"):
        meta.modality = "audio"
    return text


async def test_a_transform_can_ask_for_audio(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    settings = load_settings(None, {
        "source.spec": f"file:{clip(CLIP)}", "source.file.speed": 0, "sink.spec": f"jsonl:{out}",
        "control.enabled": False, "transform.steps": [{"step": "tests.test_audio_echo:to_audio"}],
    })
    relay = build_relay(settings)
    await relay.start()
    await relay.run()
    assert relay.ledger.delivered == 1 and relay.ledger.closed == 1
    check_audio_utterance(audio_messages(out))
