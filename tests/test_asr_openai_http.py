"""OpenAIHttpEngine against a real HTTP server on 127.0.0.1 (tests/fake_openai_server.py) that checks
the multipart WAV: requests, start probe, readiness that follows the server, retries and Retry-After."""

from __future__ import annotations

import asyncio
import io
import math
import socket
import time
import wave
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from asr_fixtures import load_clip
from fake_openai_server import TRANSLATIONS, FakeTranscriptionServer, Reply

from pipeline.asr.base import AsrError
from pipeline.asr.openai_http import AsrRequestError, OpenAIHttpEngine, probe_url
from pipeline.config import AsrSettings
from pipeline.dsp import wav_bytes
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics


@pytest.fixture
def server() -> Iterator[FakeTranscriptionServer]:
    with FakeTranscriptionServer() as s:
        yield s


def _settings(url: str, deadline_s: float = 10.0, **http: Any) -> AsrSettings:
    return AsrSettings.model_validate({
        "engine": "openai-http", "language": "en", "initial_prompt": "Tavus echo relay.", "deadline_s": deadline_s,
        "openai_http": {"url": url, "timeout_s": 2.0, "retries": 2, "probe_interval_s": 0.1, **http}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(pred: Any, timeout_s: float = 5.0) -> float:
    """Seconds until `pred()` held (fails the test past `timeout_s`)."""
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout_s, "condition not reached"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def _meta(uid: str = "utt-1") -> UtteranceMeta:
    return UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=2.0)


@pytest.fixture
def speech() -> np.ndarray:
    return load_clip("deepspeech-examples/2830-3980-0043.wav")


# ------------------------------------------------------------------------------------ happy path
async def test_posts_a_valid_wav_and_reads_text(server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    server.default_text = "  Experience proves this.  "
    engine = OpenAIHttpEngine(_settings(server.url, api_key="sk-test", model="whisper-large"))
    await engine.load()
    try:
        tr = await engine.transcribe(speech, _meta())
    finally:
        await engine.close()
    assert tr.text == "Experience proves this."
    assert tr.confidence == 1.0 and tr.dropped_reason is None and tr.final_punct_prob is None
    assert tr.decode_s > 0
    (req,) = server.requests
    assert req["auth"] == "Bearer sk-test"
    assert req["fields"] == {"model": "whisper-large", "response_format": "json", "language": "en",
                             "prompt": "Tavus echo relay."}
    assert req["filename"] == "utt-1.wav" and req["file_type"] == "audio/wav"
    wav = req["wav"]
    assert (wav["channels"], wav["width"], wav["rate"], wav["frames"]) == (1, 2, 16000, len(speech))
    assert np.array_equal(wav["samples"], speech)


async def test_an_utterances_committed_beginning_follows_the_initial_prompt(server: FakeTranscriptionServer,
                                                                          speech: np.ndarray) -> None:
    """A decode after an utterance's committed beginning (pipeline/speculation.py) sends that text as the
    preceding text, after asr.initial_prompt; a decode without one sends the initial prompt alone."""
    engine = OpenAIHttpEngine(_settings(server.url))
    meta = _meta("utt-2")
    meta.context = "And so, my fellow Americans,"
    try:
        await engine.transcribe(speech, meta)
        await engine.transcribe(speech, _meta("utt-3"))
    finally:
        await engine.close()
    assert [r["fields"]["prompt"] for r in server.requests] == [
        "Tavus echo relay. And so, my fellow Americans,", "Tavus echo relay."]


async def test_no_authorization_header_without_key(server: FakeTranscriptionServer,
                                                   speech: np.ndarray) -> None:
    engine = OpenAIHttpEngine(AsrSettings.model_validate(
        {"language": None, "openai_http": {"url": server.url}}))
    tr = await engine.transcribe(speech, _meta())  # works without an explicit load()
    await engine.close()
    assert tr.text == "Hello world."
    assert server.requests[0]["auth"] is None
    assert "language" not in server.requests[0]["fields"] and "prompt" not in server.requests[0]["fields"]


def test_wav_bytes_is_16k_mono_16bit() -> None:
    pcm = (np.sin(np.arange(1600) / 10) * 10000).astype(np.int16)
    with wave.open(io.BytesIO(wav_bytes(pcm)), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (1, 2, 16000, 1600)
        assert np.array_equal(np.frombuffer(w.readframes(1600), "<i2"), pcm)
    as_float = wav_bytes(pcm.astype(np.float32) / 32768)
    with wave.open(io.BytesIO(as_float), "rb") as w:
        assert np.abs(np.frombuffer(w.readframes(1600), "<i2").astype(int) - pcm).max() <= 1


# --------------------------------------------------------------------------------- failures
async def test_500_then_200_is_retried(server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    server.script = [(500, {"error": {"message": "model is warming up"}}, 0.0)]
    engine = OpenAIHttpEngine(_settings(server.url))
    tr = await engine.transcribe(speech, _meta())
    await engine.close()
    assert tr.text == "Hello world."
    assert len(server.requests) == 2


async def test_400_fails_at_once_with_the_server_message(server: FakeTranscriptionServer,
                                                         speech: np.ndarray) -> None:
    error = {"error": {"message": "Unsupported language 'xx'", "type": "invalid_request_error"}}
    server.script = [(400, error, 0.0)]
    engine = OpenAIHttpEngine(_settings(server.url))
    with pytest.raises(AsrRequestError) as exc:
        await engine.transcribe(speech, _meta())
    await engine.close()
    assert exc.value.status == 400
    assert "Unsupported language 'xx'" in str(exc.value)
    assert len(server.requests) == 1


async def test_persistent_503_gives_up_after_the_retries(server: FakeTranscriptionServer,
                                                         speech: np.ndarray) -> None:
    server.script = [(503, b"upstream overloaded", 0.0)] * 5
    engine = OpenAIHttpEngine(_settings(server.url, retries=1))
    with pytest.raises(AsrRequestError) as exc:
        await engine.transcribe(speech, _meta())
    await engine.close()
    assert exc.value.status == 503 and "upstream overloaded" in str(exc.value)
    assert len(server.requests) == 2


async def test_timeout_is_retried(server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    server.script = [(200, {"text": "too late"}, 0.8)]
    engine = OpenAIHttpEngine(_settings(server.url, timeout_s=0.3))
    tr = await engine.transcribe(speech, _meta())
    await engine.close()
    assert tr.text == "Hello world."
    assert len(server.requests) == 2


async def test_connection_refused_waits_for_the_server_until_the_deadline(speech: np.ndarray) -> None:
    """Nothing listens: the request waits for the server (probing it, not re-posting) and fails at
    asr.deadline_s with a message naming the URL."""
    url = f"http://127.0.0.1:{free_port()}/v1/audio/transcriptions"
    engine = OpenAIHttpEngine(_settings(url, deadline_s=0.6, retries=1))
    t0 = time.monotonic()
    with pytest.raises(AsrRequestError, match="cannot be reached") as exc:
        await engine.transcribe(speech, _meta())
    waited = time.monotonic() - t0
    assert engine.readiness() == {"asr_server": False}
    await engine.close()
    assert url in str(exc.value) and "asr.deadline_s (0.6 s)" in str(exc.value)
    assert 0.55 <= waited < 3


def test_probe_url_is_the_models_list_of_the_same_api() -> None:
    assert probe_url("http://gpu:8000/v1/audio/transcriptions") == "http://gpu:8000/v1/models"
    assert probe_url("https://api.example/openai/v1/audio/transcriptions/") == "https://api.example/openai/v1/models"
    assert probe_url("http://127.0.0.1:8080/inference") == "http://127.0.0.1:8080/inference"  # whisper.cpp's own


# --------------------------------------------------------------------------- start and readiness
async def test_start_probes_the_server_and_sends_no_audio(server: FakeTranscriptionServer) -> None:
    engine = OpenAIHttpEngine(_settings(server.url, api_key="sk-test"))
    assert engine.readiness() == {"asr_server": False}  # not checked yet
    await engine.load()
    assert engine.readiness() == {"asr_server": True}
    await engine.close()
    assert [(p["path"], p["auth"]) for p in server.probes] == [("/v1/models", "Bearer sk-test")]
    assert server.requests == []


async def test_start_succeeds_on_any_answer_such_as_404(server: FakeTranscriptionServer) -> None:
    """whisper.cpp's server has no /v1/models: its 404 still says that it is there."""
    engine = OpenAIHttpEngine(_settings(server.base + "/inference"))
    await engine.load()
    await engine.close()
    assert engine.readiness() == {"asr_server": True}
    assert [p["path"] for p in server.probes] == ["/inference"]


async def test_start_fails_naming_the_url_when_the_server_is_down() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1/audio/transcriptions"
    engine = OpenAIHttpEngine(_settings(url, retries=1))
    with pytest.raises(AsrError) as exc:
        await engine.load()
    await engine.close()
    message = str(exc.value)
    assert message.startswith(f"ASR server {url} cannot be reached (ConnectError")
    assert "2 attempt(s)" in message and "asr.openai_http.url" in message
    assert engine.readiness() == {"asr_server": False}


async def test_start_with_a_wrong_key_is_a_key_error(server: FakeTranscriptionServer) -> None:
    server.required_key = "sk-right"
    engine = OpenAIHttpEngine(_settings(server.url, api_key="sk-wrong"))
    with pytest.raises(AsrRequestError) as exc:
        await engine.load()
    await engine.close()
    assert exc.value.status == 401
    assert "refused the API key" in str(exc.value) and "Incorrect API key provided" in str(exc.value)
    assert "asr.openai_http.api_key" in str(exc.value) and "sk-wrong" not in str(exc.value)
    assert len(server.probes) == 1  # a wrong key is not retried


async def test_readiness_follows_the_server_down_and_back(speech: np.ndarray) -> None:
    """Idle (no request), the periodic probe sees the server go and come back; an utterance sent while it is
    down fails at its deadline; the next one, once it is back, is transcribed."""
    with FakeTranscriptionServer() as srv:
        engine = OpenAIHttpEngine(_settings(srv.url, deadline_s=0.5))
        await engine.load()
        srv.stop()
        down_after = await wait_until(lambda: engine.readiness() == {"asr_server": False})
        assert down_after < 2  # probe_interval_s is 0.1
        with pytest.raises(AsrRequestError, match="cannot be reached"):
            await engine.transcribe(speech, _meta("u1"))
        srv.start()
        await wait_until(lambda: engine.readiness() == {"asr_server": True})
        tr = await engine.transcribe(speech, _meta("u2"))
        await engine.close()
    assert tr.text == "Hello world."
    assert [r["filename"] for r in srv.requests] == ["u2.wav"]  # u1 never reached it


async def test_a_request_waits_for_a_server_that_comes_back_within_the_deadline(speech: np.ndarray) -> None:
    """No speech lost to a short outage: the utterance is posted once the server answers again."""
    with FakeTranscriptionServer() as srv:
        engine = OpenAIHttpEngine(_settings(srv.url, deadline_s=5.0))
        await engine.load()
        srv.stop()
        pending = asyncio.ensure_future(engine.transcribe(speech, _meta("u1")))
        await wait_until(lambda: engine.readiness() == {"asr_server": False})
        await asyncio.sleep(0.3)
        assert not pending.done()
        srv.start()
        tr = await asyncio.wait_for(pending, 5)
        await engine.close()
    assert tr.text == "Hello world."
    assert [r["filename"] for r in srv.requests] == ["u1.wav"]


# ------------------------------------------------------------------------------------ Retry-After
async def test_429_waits_the_retry_after_seconds(server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    server.script = [Reply(429, {"error": {"message": "Rate limit reached"}}, headers={"Retry-After": "1"})]
    engine = OpenAIHttpEngine(_settings(server.url))
    tr = await engine.transcribe(speech, _meta())
    await engine.close()
    assert tr.text == "Hello world."
    first, second = server.requests
    gap = second["t"] - first["t"]  # as the server saw them
    assert 0.95 <= gap < 2.0, gap  # not the 0.2 s backoff ceiling


async def test_503_retry_after_as_an_http_date(server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    from email.utils import formatdate
    server.script = [Reply(503, {"error": {"message": "loading"}}, headers={"Retry-After": formatdate(
        time.time() + 2, usegmt=True)})]
    engine = OpenAIHttpEngine(_settings(server.url))
    await engine.transcribe(speech, _meta())
    await engine.close()
    gap = server.requests[1]["t"] - server.requests[0]["t"]
    assert 0.9 <= gap < 3.0, gap  # whole seconds in an HTTP-date: 1-2 s from now


async def test_retry_after_past_the_deadline_fails_at_once(server: FakeTranscriptionServer,
                                                           speech: np.ndarray) -> None:
    """Waiting 30 s for a result that is dropped after asr.deadline_s would only load the server again."""
    server.script = [Reply(429, {"error": {"message": "Rate limit reached"}}, headers={"Retry-After": "30"})]
    engine = OpenAIHttpEngine(_settings(server.url, deadline_s=2.0))
    t0 = time.monotonic()
    with pytest.raises(AsrRequestError) as exc:
        await engine.transcribe(speech, _meta())
    await engine.close()
    assert time.monotonic() - t0 < 1.0
    assert exc.value.status == 429 and "Rate limit reached" in str(exc.value)
    assert "past asr.deadline_s (2 s)" in str(exc.value)
    assert len(server.requests) == 1


async def test_body_without_text_is_an_error(server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    server.script = [(200, {"result": "hello"}, 0.0)]
    engine = OpenAIHttpEngine(_settings(server.url))
    with pytest.raises(AsrRequestError, match="without a 'text' field"):
        await engine.transcribe(speech, _meta())
    await engine.close()


# ------------------------------------------------------------------------------------ gating
async def test_verbose_json_segments_give_confidence_and_gate(server: FakeTranscriptionServer,
                                                              speech: np.ndarray) -> None:
    server.script = [
        (200, {"text": "Experience proves this.", "language": "english",
               "segments": [{"text": "Experience proves this.", "avg_logprob": -0.2, "no_speech_prob": 0.01,
                             "compression_ratio": 0.9}]}, 0.0),
        (200, {"text": "I'm going to do that.",
               "segments": [{"text": "I'm going to do that.", "avg_logprob": -1.4,
                             "no_speech_prob": 0.95}]}, 0.0),
    ]
    metrics = Metrics()
    engine = OpenAIHttpEngine(_settings(server.url), metrics)
    tr = await engine.transcribe(speech, _meta())
    assert tr.text == "Experience proves this."
    assert tr.confidence == pytest.approx(math.exp(-0.2))
    assert tr.language == "en"  # OpenAI names the language ("english"): the relay carries codes
    tr = await engine.transcribe(speech, _meta())
    await engine.close()
    assert tr.text == "" and tr.dropped_reason == "no_speech"
    # The verdict is the typed field; the relay's delivery counts the drops it accounts.
    assert metrics.value("echo_relay_dropped_total", {"stage": "asr", "reason": "no_speech"}) == 0


async def test_phantom_and_empty_text_are_dropped(server: FakeTranscriptionServer) -> None:
    quiet = (np.random.default_rng(3).standard_normal(32000) * 32768 * 10 ** (-55 / 20)).astype(np.int16)
    server.script = [(200, {"text": "Thank you."}, 0.0), (200, {"text": "  "}, 0.0),
                     (200, {"text": "Thank you."}, 0.0)]
    metrics = Metrics()
    engine = OpenAIHttpEngine(_settings(server.url), metrics)
    assert (await engine.transcribe(quiet, _meta())).dropped_reason == "phantom"
    assert (await engine.transcribe(quiet, _meta())).dropped_reason == "empty"
    loud = load_clip("deepspeech-examples/2830-3980-0043.wav")
    kept = await engine.transcribe(loud, _meta())  # said at speech level: kept
    await engine.close()
    assert kept.text == "Thank you." and kept.dropped_reason is None
    assert metrics.value("echo_relay_dropped_total", {"stage": "asr", "reason": "phantom"}) == 0


async def test_the_conversations_language_is_sent_and_translate_posts_to_translations(
        server: FakeTranscriptionServer, speech: np.ndarray) -> None:
    """asr.language auto: nothing before the lock (the server detects: its language and probability are the
    tracker's evidence), the conversation's language after it; asr.task translate posts to /audio/translations
    beside the configured /audio/transcriptions, with no language field, and the text is English."""
    server.script = [(200, {"text": "Hola.", "language": "spanish", "language_probability": 0.93}, 0.0),
                     (200, {"text": "Hola."}, 0.0), (200, {"text": "Hello."}, 0.0)]
    auto = AsrSettings.model_validate({"engine": "openai-http", "language": "auto", "model": "base",
                                       "openai_http": {"url": server.url}})
    engine = OpenAIHttpEngine(auto)
    first = await engine.transcribe(speech, _meta())
    locked = await engine.transcribe(speech, UtteranceMeta("utt-2", 0.0, 2.0, language="es"))
    await engine.close()
    assert "language" not in server.requests[0]["fields"] and server.requests[1]["fields"]["language"] == "es"
    assert (first.language, first.detected) == ("es", ("es", 0.93))
    assert (locked.language, locked.detected) == ("es", None)  # sent, so not detected: no evidence

    engine = OpenAIHttpEngine(auto.model_copy(update={"task": "translate"}))
    tr = await engine.transcribe(speech, UtteranceMeta("utt-3", 0.0, 2.0, language="es"))
    await engine.close()
    assert server.requests[-1]["path"] == TRANSLATIONS and "language" not in server.requests[-1]["fields"]
    assert (tr.text, tr.language, tr.language_probability) == ("Hello.", "en", None)
