"""OpenAIHttpEngine against a real HTTP server on 127.0.0.1 that checks the multipart WAV."""

from __future__ import annotations

import io
import json
import math
import socket
import threading
import time
import wave
from collections.abc import Iterator
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from asr_fixtures import load_clip

from pipeline.asr.openai_http import AsrRequestError, OpenAIHttpEngine
from pipeline.config import AsrSettings
from pipeline.dsp import wav_bytes
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics


class FakeTranscriptionServer:
    """`POST /v1/audio/transcriptions`: validates the upload like a real server, then answers
    with the next scripted (status, body, delay_s) — or 200 {"text": default_text}."""

    def __init__(self) -> None:
        self.script: list[tuple[int, Any, float]] = []
        self.default_text = "Hello world."
        self.requests: list[dict[str, Any]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, status: int, body: Any) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if not isinstance(body, bytes)
                                 else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                record: dict[str, Any] = {"path": self.path, "auth": self.headers.get("Authorization"),
                                          "fields": {}, "wav": None, "error": None}
                server.requests.append(record)
                if self.path != "/v1/audio/transcriptions":
                    return self._reply(404, {"error": {"message": "not found"}})
                ctype = self.headers.get("Content-Type", "")
                if not ctype.startswith("multipart/form-data"):
                    return self._reply(400, {"error": {"message": "expected multipart/form-data"}})
                msg = BytesParser(policy=policy.default).parsebytes(
                    f"Content-Type: {ctype}\r\n\r\n".encode() + raw)
                for part in msg.iter_parts():
                    name = part.get_param("name", header="content-disposition")
                    payload = part.get_payload(decode=True)
                    assert isinstance(payload, bytes)
                    if name == "file":
                        record["filename"] = part.get_filename()
                        record["file_type"] = part.get_content_type()
                        try:
                            with wave.open(io.BytesIO(payload), "rb") as w:
                                frames = w.getnframes()
                                record["wav"] = {"channels": w.getnchannels(), "width": w.getsampwidth(),
                                                 "rate": w.getframerate(), "frames": frames,
                                                 "samples": np.frombuffer(w.readframes(frames), "<i2")}
                        except (wave.Error, EOFError) as exc:
                            record["error"] = str(exc)
                    else:
                        record["fields"][name] = payload.decode()
                wav_info = record["wav"]
                if wav_info is None:
                    problem = f"no valid WAV in 'file' ({record['error']})"
                    return self._reply(400, {"error": {"message": problem}})
                if (wav_info["channels"], wav_info["width"], wav_info["rate"]) != (1, 2, 16000):
                    return self._reply(400, {"error": {"message": "expected 16 kHz mono 16-bit"}})
                if "model" not in record["fields"]:
                    return self._reply(400, {"error": {"message": "model is required"}})
                status, body, delay = server.script.pop(0) if server.script else (
                    200, {"text": server.default_text}, 0.0)
                if delay:
                    time.sleep(delay)
                return self._reply(status, body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/audio/transcriptions"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self) -> FakeTranscriptionServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[FakeTranscriptionServer]:
    with FakeTranscriptionServer() as s:
        yield s


def _settings(url: str, **http: Any) -> AsrSettings:
    return AsrSettings.model_validate({
        "engine": "openai-http", "language": "en", "initial_prompt": "Tavus echo relay.",
        "openai_http": {"url": url, "timeout_s": 2.0, "retries": 2, **http}})


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


async def test_connection_refused_is_an_asr_error(speech: np.ndarray) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    engine = OpenAIHttpEngine(_settings(f"http://127.0.0.1:{port}/v1/audio/transcriptions", retries=1))
    t0 = time.monotonic()
    with pytest.raises(AsrRequestError, match="failed after 2 attempt"):
        await engine.transcribe(speech, _meta())
    await engine.close()
    assert time.monotonic() - t0 < 3


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
    assert tr.language == "english"
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
