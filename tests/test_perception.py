"""Perception (issue 15): analyzers beside the ASR on each utterance, and on the speaker's camera.

- The DSP under the built-ins on synthetic signals whose answer is known (a 150 Hz sawtooth, a rising sweep,
  a tone with a gap), then the built-ins on the shared real clips (the whisper clip is quieter and unvoiced,
  the read clips are voiced at speaking pitch, the clip with internal silences has its pauses).
- The stage on its own: outcomes, the budget, late results, errors and their policies.
- The relay end to end on real speech (real tiny.en, file source, JSONL sink, the real control server): a user
  analyzer by dotted path sees exactly the utterance's audio, its result reaches a transform, the JSONL
  record and /status; a slow analyzer is cut at its timeout while the echo goes out; a raising one is counted.
- Video through the Daily stand-in: a speaker's synthetic camera reaches `frame_stats`, whose result joins the
  next utterance.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import tomllib
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import pipeline.plugins
from pipeline.config import ConfigError, PerceptionAnalyzer, PerceptionSettings, Settings, load_settings
from pipeline.control.server import start_control_server
from pipeline.dsp import wav_bytes
from pipeline.events import EventBus
from pipeline.frames import SAMPLE_RATE, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.perception import builtins, features
from pipeline.perception.base import VideoFrame
from pipeline.perception.calls import MAX_RESULT_BYTES, judge
from pipeline.perception.stage import build_perception as _build_perception
from pipeline.plugins import PERCEPTION_GROUP
from pipeline.relay import Relay
from pipeline.source.file import decode_file
from pipeline.testing.fake_daily import FakeRoom
from pipeline.wiring import build_relay, check_stages
from tests import perception_analyzers
from tests.conftest import REPO, clip, reference, wer

SR = SAMPLE_RATE
EXAMPLE = REPO / "examples" / "perception" / "echo_relay_energy"
READ_CLIPS = ["clapclap/librispeech_dev_clean/174-168635-0007.flac", "deepspeech-examples/2830-3980-0043.wav",
              "mfa/61-70968-0000.flac", "whisper.cpp/jfk.wav"]
WHISPER_CLIP = "mfa/whisper.flac"
PAUSES_CLIP = "mfa/mfa_internalsil.flac"
RUN_TIMEOUT_S = 90.0  # against hangs only


def whole(audio: np.ndarray, uid: str = "u1", **fields: Any) -> UtteranceMeta:
    """Meta of an utterance that is the whole array (speech from the first sample to the last)."""
    return UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=len(audio) / SR, **fields)


def tone(hz: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return (np.sin(2 * np.pi * hz * t) * amplitude * 32767).astype(np.int16)


def sawtooth(hz: float, seconds: float, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    return ((2 * ((t * hz) % 1) - 1) * amplitude * 32767).astype(np.int16)


def glide(f0: float, f1: float, seconds: float) -> np.ndarray:
    """A sawtooth whose pitch moves exponentially from f0 to f1 (a straight line in semitones)."""
    n = int(seconds * SR)
    hz = f0 * (f1 / f0) ** (np.arange(n) / n)
    phase = np.cumsum(hz) / SR
    return ((2 * (phase % 1) - 1) * 0.3 * 32767).astype(np.int16)


# ------------------------------------------------------------------------------------------ DSP
@pytest.mark.parametrize("hz", [90.0, 150.0, 220.0, 330.0])
def test_pitch_of_a_periodic_voice_like_signal(hz: float) -> None:
    track = features.pitch_track(sawtooth(hz, 1.0))
    assert track.voiced.mean() > 0.9
    assert abs(float(np.nanmedian(track.f0_hz)) - hz) < hz * 0.01


def test_noise_and_silence_have_no_pitch() -> None:
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(SR * 2) * 3000).astype(np.int16)
    assert features.pitch_track(noise).voiced.mean() < 0.02
    assert not features.pitch_track(np.zeros(SR, np.int16)).voiced.any()


@pytest.mark.parametrize(("f0", "f1", "contour"), [(120.0, 220.0, "rising"), (220.0, 120.0, "falling"),
                                                   (150.0, 152.0, "flat")])
def test_final_contour_follows_the_last_half_second(f0: float, f1: float, contour: str) -> None:
    result = builtins.pitch(glide(f0, f1, 1.5), whole(glide(f0, f1, 1.5)))
    assert result is not None and result["final_contour"] == contour, result
    expected = 12 * math.log2(f1 / f0) / 1.5  # semitones per second of the glide
    assert abs(result["final_slope_st_per_s"] - expected) < max(1.0, abs(expected) * 0.15), result


def test_loudness_levels_and_clipping() -> None:
    quiet = builtins.loudness(tone(440, 1.0, 0.1), whole(tone(440, 1.0, 0.1)))
    assert quiet is not None and abs(quiet["rms_dbfs"] - (20 * math.log10(0.1) - 3.01)) < 0.1
    assert quiet["clipping"] is False and quiet["clipped_samples"] == 0
    square = np.where(tone(200, 0.5) >= 0, 32767, -32768).astype(np.int16)
    loud = builtins.loudness(square, whole(square))
    assert loud is not None and loud["clipping"] is True and loud["clipped_ratio"] > 0.99 and loud["peak_dbfs"] > -0.01


def test_pauses_inside_speech_are_found_with_their_times() -> None:
    gap = np.zeros(int(0.5 * SR), np.int16)
    audio = np.concatenate([sawtooth(150, 0.8), gap, sawtooth(150, 0.6), np.zeros(int(0.1 * SR), np.int16),
                            sawtooth(150, 0.5)])
    meta = UtteranceMeta(utterance_id="u", audio_start_s=10.0, audio_end_s=10.0 + len(audio) / SR,
                         audio_offset_s=10.0)
    result = builtins.pauses()(audio, meta)
    assert result is not None and result["count"] == 1, result  # the 0.1 s gap is articulation, not a pause
    pause = result["pauses"][0]
    assert abs(pause["start_s"] - 10.8) <= 0.02 and abs(pause["duration_s"] - 0.5) <= 0.04, pause
    assert builtins.pauses(min_pause_ms=50)(audio, meta)["count"] == 2  # type: ignore[index]


def test_speaking_rate_and_language_read_the_asr_result() -> None:
    meta = UtteranceMeta(utterance_id="u", audio_start_s=1.0, audio_end_s=3.0, asr_text="one two three four five",
                         language="de", language_probability=0.91)
    assert builtins.speaking_rate(np.zeros(0, np.int16), meta) == {"words": 5, "speech_s": 2.0, "words_per_second": 2.5}
    assert builtins.language(np.zeros(0, np.int16), meta) == {"language": "de", "probability": 0.91, "detected": True,
                                                              "locked": False}
    meta.language_locked = True
    assert builtins.language(np.zeros(0, np.int16), meta)["locked"] is True  # type: ignore[index]
    meta.asr_text, meta.language_probability = "", None
    assert builtins.speaking_rate(np.zeros(0, np.int16), meta) is None
    assert builtins.language(np.zeros(0, np.int16), meta)["detected"] is False  # type: ignore[index]


# ------------------------------------------------------------------------------- real clips
def test_whisper_is_quieter_than_read_speech_and_unvoiced() -> None:
    whisper = decode_file(clip(WHISPER_CLIP))
    w_level = builtins.loudness(whisper, whole(whisper))
    w_pitch = builtins.pitch(whisper, whole(whisper))
    assert w_level is not None and w_pitch is not None
    assert w_pitch["voiced_ratio"] < 0.02 and w_pitch["median_hz"] is None and w_pitch["final_contour"] is None
    for name in READ_CLIPS:
        audio = decode_file(clip(name))
        level, pitch = builtins.loudness(audio, whole(audio)), builtins.pitch(audio, whole(audio))
        assert level is not None and pitch is not None
        assert level["rms_dbfs"] > w_level["rms_dbfs"] + 10, (name, level, w_level)
        assert pitch["voiced_ratio"] > 0.1, (name, pitch)
        assert 70 <= pitch["median_hz"] <= 300 and pitch["low_hz"] <= pitch["median_hz"] <= pitch["high_hz"], pitch


def test_pauses_of_clips_with_known_silences() -> None:
    """mfa_internalsil is "Montreal forced aligner" said with hesitations: words stretched and cut by silences of
    about a second; jfk.wav pauses for over a second after "And so, my fellow Americans," (about 2.1 s in)."""
    audio = decode_file(clip(PAUSES_CLIP))
    result = builtins.pauses()(audio, whole(audio))
    assert result is not None and result["count"] >= 3 and result["longest_s"] >= 1.0, result
    assert all(p["start_s"] > 0 and p["start_s"] + p["duration_s"] < len(audio) / SR for p in result["pauses"])
    assert result["total_s"] == pytest.approx(sum(p["duration_s"] for p in result["pauses"]), abs=0.002)
    jfk = decode_file(clip("whisper.cpp/jfk.wav"))
    jfk_pauses = builtins.pauses()(jfk, whole(jfk))
    assert jfk_pauses is not None
    assert any(1.9 <= p["start_s"] <= 2.4 and p["duration_s"] >= 0.8 for p in jfk_pauses["pauses"]), jfk_pauses


# ------------------------------------------------------------------------------------ stage
def build(*analyzers: dict[str, Any], budget_ms: int = 50) -> tuple[Any, Metrics, list[Any]]:
    metrics = Metrics()
    settings = PerceptionSettings(analyzers=[PerceptionAnalyzer(**a) for a in analyzers], budget_ms=budget_ms)
    perception = _build_perception(settings, metrics, clock=time.monotonic)
    bus = EventBus(metrics, time.monotonic)
    sub = bus.subscribe()
    perception.bind_events(bus)
    return perception, metrics, [sub]


def calls(metrics: Metrics, analyzer: str, outcome: str) -> float:
    return metrics.value("echo_relay_perception_calls_total", {"analyzer": analyzer, "outcome": outcome})


async def test_results_are_filed_by_name_and_after_asr_ones_see_the_transcript() -> None:
    perception, metrics, _ = build({"analyzer": "loudness"}, {"analyzer": "tests.perception_analyzers:words_seen"},
                                   {"analyzer": "tests.perception_analyzers:Recorder", "name": "recorder",
                                    "label": "x"})
    audio = sawtooth(150, 1.0)
    meta = whole(audio)
    run = perception.start(audio, meta)
    meta.asr_text = "hello there"  # the delivery fills the ASR result in before collect()
    assert await run.collect() is None
    assert set(meta.perception) == {"loudness", "words_seen", "recorder"}
    assert meta.perception["words_seen"] == {"asr_text": "hello there"}
    assert meta.perception["recorder"]["samples"] == SR and meta.perception["recorder"]["label"] == "x"
    assert calls(metrics, "loudness", "ok") == 1 and calls(metrics, "recorder", "ok") == 1


async def test_a_late_analyzer_is_not_waited_for_and_its_result_comes_as_an_event() -> None:
    perception, metrics, (sub,) = build({"analyzer": "tests.perception_analyzers:slowish"}, {"analyzer": "loudness"},
                                        budget_ms=50)
    audio = sawtooth(150, 0.5)
    meta = whole(audio)
    t0 = time.monotonic()
    assert await perception.start(audio, meta).collect() is None
    waited = time.monotonic() - t0
    assert waited < 0.3, waited  # the analyzer takes 0.4 s; the budget is 50 ms
    assert "slowish" not in meta.perception and "loudness" in meta.perception
    first = await sub.get(1.0)
    assert first is not None and first.kind == "perception" and first.data["late"] == ["slowish"]
    late = await sub.get(2.0)
    assert late is not None and late.data["results"] == {"slowish": {"slowish": True}} and late.data["late"] == [
        "slowish"]
    assert calls(metrics, "slowish", "late") == 1 and calls(metrics, "slowish", "ok") == 0


async def test_a_delivery_cancelled_while_it_waits_still_accounts_the_calls() -> None:
    """The drain deadline cancels the delivery task inside collect(): the item's abandon() then counts what the
    calls bring (`unused`), so no call goes unaccounted."""
    perception, metrics, _ = build({"analyzer": "tests.perception_analyzers:slowish"}, budget_ms=5000)
    audio = sawtooth(150, 0.5)
    run = perception.start(audio, whole(audio))
    waiting = asyncio.ensure_future(run.collect())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    run.abandon()
    await perception.aclose()
    assert calls(metrics, "slowish", "unused") == 1 and calls(metrics, "slowish", "ok") == 0


@pytest.mark.parametrize(("path", "outcome"), [("boom", "error"), ("not_a_dict", "bad_type"),
                                               ("not_json", "bad_value"), ("slow", "timeout")])
async def test_a_failing_analyzer_is_counted_and_its_policy_decides(path: str, outcome: str) -> None:
    spec = {"analyzer": f"tests.perception_analyzers:{path}", "timeout_s": 0.3}
    passing, metrics, _ = build(spec, {"analyzer": "loudness"}, budget_ms=1000)
    audio = sawtooth(150, 0.5)
    meta = whole(audio)
    assert await passing.start(audio, meta).collect() is None  # pass: the echo goes on without it
    assert set(meta.perception) == {"loudness"} and calls(metrics, path, outcome) == 1
    dropping, metrics, _ = build({**spec, "on_error": "drop"})
    verdict = await dropping.start(audio, whole(audio)).collect()
    assert verdict is not None and verdict.label == f"{outcome}:{path}" and calls(metrics, path, outcome) == 1


def test_judge_keeps_a_json_copy_and_bounds_the_size() -> None:
    value = {"a": [1, 2], "b": {"c": "x"}}
    verdict = judge(value)
    assert verdict.outcome == "ok" and verdict.result == value and verdict.result is not value
    assert judge({"x": "y" * MAX_RESULT_BYTES}).outcome == "bad_value"
    assert judge({"x": object()}).outcome == "bad_value"
    assert judge(None).outcome == "none" and judge("text").outcome == "bad_type"


# ------------------------------------------------------------------------------------ config
@pytest.mark.parametrize(("perception", "key"), [
    ({"analyzers": [{"analyzer": "nope"}]}, "perception.analyzers[0].analyzer"),
    ({"analyzers": [{"analyzer": "loudness"}, {"analyzer": "pauses", "min_pause_ms": -1}]},
     "perception.analyzers[1].min_pause_ms"),
    ({"analyzers": [{"analyzer": "pauses", "window": 3}]}, "perception.analyzers[0].window"),
    ({"video": {"analyzers": [{"analyzer": "frame_stats"}]}}, "perception.video.analyzers"),
])
def test_config_check_names_the_key(perception: dict[str, Any], key: str) -> None:
    settings = load_settings(None, {"perception": perception}, env={})
    problems = check_stages(settings)
    assert [p.key for p in problems] == [key], [str(p) for p in problems]


def test_config_refuses_two_analyzers_with_one_name_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(None, {"perception": {"analyzers": [{"analyzer": "loudness"}, {"analyzer": "x.y:loudness"}]}},
                      env={})
    assert exc.value.key == "perception.analyzers" and "named 'loudness'" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_settings(None, {"perception": {"analyzers": [{"analyzer": "loudness", "name": "a b"}]}}, env={})
    assert exc.value.key == "perception.analyzers[0].name"


def test_cli_config_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    import subprocess

    cfg = tmp_path / "c.yaml"
    cfg.write_text("perception:\n  analyzers:\n    - analyzer: pitch\n      bogus: 1\n")
    done = subprocess.run([sys.executable, "-m", "pipeline", "run", "--config", str(cfg)], capture_output=True,
                          text=True, timeout=120, cwd=REPO)
    assert done.returncode == 2 and "perception.analyzers[0].bogus" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------- plug-ins
@pytest.fixture
def energy_entry_point(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make `energy` discoverable as if `pip install examples/perception/echo_relay_energy` had run: the entry
    point is read from the example's own pyproject.toml."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text(encoding="utf-8"))
    eps = [EntryPoint(name=n, value=v, group=PERCEPTION_GROUP)
           for n, v in project["project"]["entry-points"][PERCEPTION_GROUP].items()]
    real = pipeline.plugins.entry_points
    monkeypatch.setattr(pipeline.plugins, "entry_points",
                        lambda **kw: eps if kw.get("group") == PERCEPTION_GROUP else real(**kw))
    yield
    sys.modules.pop("echo_relay_energy", None)


async def test_example_package_by_entry_point(energy_entry_point: None) -> None:
    perception, _metrics, _ = build({"analyzer": "energy", "frame_ms": 20})
    audio = np.concatenate([np.zeros(SR // 2, np.int16), sawtooth(150, 0.5)])
    meta = whole(audio)
    assert await perception.start(audio, meta).collect() is None
    result = meta.perception["energy"]
    assert result["frames"] == 50 and abs(result["active_ratio"] - 0.5) <= 0.05, result


# ------------------------------------------------------------------------------ end to end
def stream_file(tmp_path: Path, names: list[str], gap_s: float = 1.5) -> tuple[Path, np.ndarray]:
    gap = np.zeros(int(gap_s * SR), np.int16)
    parts = [gap]
    for name in names:
        parts += [decode_file(clip(name)), gap]
    audio = np.concatenate(parts)
    path = tmp_path / "stream.wav"
    path.write_bytes(wav_bytes(audio, SR))
    return path, audio


def relay_settings(path: Path, out: Path, **overrides: Any) -> Settings:
    base = {"source.spec": f"file:{path}", "sink.spec": f"jsonl:{out}", "control.enabled": False,
            "asr.download": False, "control.port": 0}
    return load_settings(None, {**base, **overrides}, env={})


async def run_relay(settings: Settings) -> Relay:
    relay = build_relay(settings)
    await relay.start()
    await asyncio.wait_for(relay.run(), RUN_TIMEOUT_S)
    return relay


def echo_records(path: Path) -> list[dict[str, Any]]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "echo"]


async def test_user_analyzer_sees_the_utterance_audio_and_its_result_goes_everywhere(tmp_path: Path) -> None:
    names = ["deepspeech-examples/4507-16021-0012.wav", "deepspeech-examples/8455-210777-0068.wav"]
    path, stream = stream_file(tmp_path, names)
    out = tmp_path / "out.jsonl"
    perception_analyzers.SEEN.clear()
    settings = relay_settings(path, out, **{
        "source.file.speed": 0,
        "perception.analyzers": [{"analyzer": "tests.perception_analyzers:Recorder", "name": "recorder"},
                                 {"analyzer": "loudness"}, {"analyzer": "speaking_rate"}],
        "transform.steps": [{"step": "tests.perception_analyzers:tag_with_samples"}]})
    relay = build_relay(settings)
    await relay.start()
    server = await start_control_server(relay, relay.metrics, settings)
    try:
        await asyncio.wait_for(relay.run(), RUN_TIMEOUT_S)
        async with httpx.AsyncClient(base_url=server.url) as client:
            status = (await client.get("/status")).json()
    finally:
        await server.stop()
    records = echo_records(out)
    assert len(records) == len(names), records
    for rec, name in zip(records, names, strict=True):
        # The run whose result was attached (analyzers also start on a pause's snapshot, beside its speculative
        # decode; a run the speech went on after is not used).
        used = [s for s in perception_analyzers.SEEN if s[0] == rec["utterance_id"]
                and len(s[1]) == rec["perception"]["recorder"]["samples"]]
        assert len(used) >= 1, [(s[0], len(s[1])) for s in perception_analyzers.SEEN]
        _, audio, offset, start, end, _ = used[-1]
        first = round(offset * SR)
        # Exactly the stream's samples from the utterance's first (pre-roll) sample on, speech bounds inside.
        assert np.array_equal(audio, stream[first:first + len(audio)])
        assert offset <= start < end <= offset + len(audio) / SR
        perception = rec["perception"]
        assert perception["recorder"]["samples"] == len(audio) and perception["recorder"]["peak"] == int(
            np.abs(audio.astype(np.int32)).max())
        assert rec["text"].startswith(f"[{len(audio)}] "), rec["text"]  # the transform used the result
        assert wer(reference(name), rec["asr_text"]) <= 0.25
        assert perception["speaking_rate"]["words"] == len(rec["asr_text"].split())
        assert -40 < perception["loudness"]["rms_dbfs"] < 0
    by_id = {r["utterance_id"]: r for r in status["recent"]}
    for rec in records:
        assert by_id[rec["utterance_id"]]["perception"] == rec["perception"]
    analyzers = {a["name"]: a for a in status["perception"]["analyzers"]}
    outcomes = analyzers["recorder"]["outcomes"]
    assert outcomes["ok"] == 2 and set(outcomes) <= {"ok", "unused"}, outcomes  # every call accounted
    assert sum(outcomes.values()) == len(perception_analyzers.SEEN)
    assert analyzers["speaking_rate"]["after_asr"] is True and analyzers["speaking_rate"]["outcomes"] == {"ok": 2}


async def test_slow_analyzer_is_cut_at_its_timeout_while_the_echo_goes_out(tmp_path: Path) -> None:
    """The analyzer sleeps 3 s; its timeout is 1 s and the budget 50 ms: the echo goes out as without it
    (well before the analyzer could have answered), the call is counted `timeout`, a raising analyzer
    beside it is counted `error`, and every utterance is delivered."""
    path, _ = stream_file(tmp_path, ["deepspeech-examples/2830-3980-0043.wav"], gap_s=1.0)
    out = tmp_path / "out.jsonl"
    settings = relay_settings(path, out, **{
        "perception.analyzers": [{"analyzer": "tests.perception_analyzers:slow", "timeout_s": 1.0},
                                 {"analyzer": "tests.perception_analyzers:boom"}, {"analyzer": "pitch"}]})
    relay = await run_relay(settings)
    records = echo_records(out)
    assert len(records) == 1 and relay.ledger.delivered == 1 and relay.ledger.closed == 1
    latency = records[0]["emitted_at_s"] - records[0]["audio_end_s"]
    assert latency < 2.0, latency  # the analyzer alone would have taken 3 s from the utterance's close
    assert set(records[0]["perception"]) == {"pitch"}
    m = relay.metrics
    assert calls(m, "slow", "timeout") == 1 and calls(m, "slow", "late") == 0 and calls(m, "slow", "ok") == 0
    assert calls(m, "boom", "error") == 1 and calls(m, "pitch", "ok") == 1


# ------------------------------------------------------------------------------------ video
def frame_of(i: int) -> np.ndarray:
    """A 64x48 RGBA frame whose grey level steps up with i; every 10th frame is white."""
    level = 255 if i % 10 == 9 else 40 + (i % 10) * 10
    rgba = np.full((48, 64, 4), level, dtype=np.uint8)
    rgba[:, :, 3] = 255
    return rgba


def test_frame_stats_of_known_frames() -> None:
    stats = builtins.frame_stats(step=1)
    grey = frame_of(0)
    first = stats(VideoFrame(grey, "RGBA", "p", 0.0, 0))
    assert first == {"width": 64, "height": 48, "brightness": round(40 / 255, 4), "contrast": 0.0, "motion": None}
    bgra = np.ascontiguousarray(frame_of(9)[:, :, [2, 1, 0, 3]])
    second = stats(VideoFrame(bgra, "BGRA", "p", 0.1, 1))
    assert second is not None and second["brightness"] == 1.0 and second["motion"] == round(1 - 40 / 255, 4)


async def test_video_analyzer_receives_frames_from_the_stand_in_room(clean_fake_daily: None, tmp_path: Path) -> None:
    """A speaker in the fake Daily room shows a synthetic camera at 20 fps while speaking a clip; the relay
    (source daily) takes 5 frames a second to `frame_stats`: the frames arrive, the others are not taken, and
    the latest result joins the utterance's JSONL record."""
    room = FakeRoom.create(url="https://fake.daily.co/perception")
    name = "deepspeech-examples/4507-16021-0012.wav"
    pcm = np.concatenate([np.zeros(SR, np.int16), decode_file(clip(name)), np.zeros(2 * SR, np.int16)])
    out = tmp_path / "out.jsonl"
    settings = load_settings(None, {
        "source.spec": "daily", "sink.spec": f"jsonl:{out}", "control.enabled": False, "asr.download": False,
        "tavus.conversation_url": room.url, "sink.daily.module": "pipeline.testing.fake_daily",
        "perception.video.fps": 5, "perception.video.analyzers": [{"analyzer": "frame_stats", "step": 2}],
        "perception.analyzers": [{"analyzer": "loudness"}]}, env={})
    relay = build_relay(settings)
    await relay.start()
    sub = relay.events.subscribe()
    speaker = room.add_speaker("alice", pcm)
    speaker.show(frame_of, fps=20)
    task = asyncio.ensure_future(relay.run())
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not echo_records(out) if out.exists() else True:
            assert time.monotonic() < deadline, "no echo"
            await asyncio.sleep(0.05)
    finally:
        relay.stop()
        await asyncio.wait_for(task, RUN_TIMEOUT_S)
    video_events = [e for e in sub.pending() if e.kind == "video"]
    assert len(video_events) >= 3, video_events
    for e in video_events:
        r = e.data["results"]["frame_stats"]
        assert r["width"] == 64 and r["height"] == 48 and r["contrast"] == 0.0
        level = round(r["brightness"] * 255)
        assert level == 255 or (40 <= level <= 130 and (level - 40) % 10 == 0), r
    status = relay.perception.video.status()  # type: ignore[union-attr]
    assert status["frames"]["analyzed"] >= 3
    # 20 frames a second are shown, 5 taken: most are never copied off the SDK thread.
    assert status["frames"]["analyzed"] + status["frames"]["skipped"] < speaker.frames_shown / 2
    rec = echo_records(out)[0]
    assert wer(reference(name), rec["asr_text"]) <= 0.25
    attached = rec["perception"]["frame_stats"]
    assert attached["width"] == 64 and 0 <= attached["frame_at_s"] <= rec["emitted_at_s"]
    assert "loudness" in rec["perception"]


# ------------------------------------------------------------------------------------ README
def test_readme_perception_example_is_the_tested_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's example step is examples/perception/questions.py's, and it does what the README says on
    what the `pitch` analyzer reports: a rising end becomes a question, a falling one stays a statement."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Perception", 1)[1].split("\n## ", 1)[0]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    source = (REPO / "examples" / "perception" / "questions.py").read_text(encoding="utf-8")
    body = snippet.split("\n", 1)[1]  # without its "# questions.py" comment line
    assert body.strip().replace("(text, meta)", "(text: str, meta: Any) -> str") in source
    monkeypatch.syspath_prepend(str(REPO / "examples" / "perception"))
    settings = load_settings(None, {"transform.steps": [{"step": "questions:by_intonation"}]}, env={})
    from pipeline.transform import build_chain

    chain = build_chain(settings.transform)
    for f0, f1, expected in ((120.0, 220.0, "You said that?"), (220.0, 120.0, "You said that.")):
        audio = glide(f0, f1, 1.5)
        meta = whole(audio)
        meta.perception["pitch"] = builtins.pitch(audio, meta)
        outcome = asyncio.run(chain.run("You said that.", meta))
        assert outcome.text == expected, (f0, f1, meta.perception)
    sys.modules.pop("questions", None)
