"""The control API against a fake RelayHandle, over real HTTP (uvicorn on 127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.control import guard as control_guard
from pipeline.control.api import InterruptOutcome, QueueFull
from pipeline.control.guard import RateLimiter
from pipeline.control.server import ControlServer, ControlServerError, start_control_server
from pipeline.events import EventBus
from pipeline.metrics import Metrics

QUICKSTART = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "...",
              "properties": {"modality": "text", "text": "Hello", "done": "true"}}
# The body of the curl in Tavus's echo-mode quickstart page, field for field.
TAVUS_DOC_BODY = {"message_type": "conversation", "event_type": "conversation.echo",
                  "conversation_id": "<conversation-id>",
                  "properties": {"modality": "text", "text": "Hello there!", "audio": "base64-encoded-audio",
                                 "sample_rate": 24000, "inference_id": "inference-id-123", "done": "true"}}
TOKEN = "s3cret-token-value"
JSON = {"Content-Type": "application/json"}


class FakeHandle:
    """Records every call; can raise QueueFull or an unexpected error; readiness is mutable."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.events = EventBus(Metrics(), time.monotonic)  # GET /events
        self.queue_full = False
        self.boom = False
        self.ready = {"model_loaded": True, "sink_ready": True}
        self.n = 0

    def _check(self) -> None:
        if self.queue_full:
            raise QueueFull("delivery queue full (64 waiting)")
        if self.boom:
            raise RuntimeError("bug in the relay")

    async def submit_text(self, text: str, *, inference_id: str | None = None, done: bool = True,
                          through_transforms: bool = True) -> list[str]:
        self.calls.append(("text", {"text": text, "inference_id": inference_id, "done": done,
                                    "through_transforms": through_transforms}))
        self._check()
        self.n += 1
        return [inference_id or f"gen-{self.n}"]

    async def submit_audio(self, pcm: Any, sample_rate: int, *, inference_id: str | None = None,
                           done: bool = True) -> list[str]:
        self.calls.append(("audio", {"pcm": pcm, "sample_rate": sample_rate, "inference_id": inference_id,
                                     "done": done}))
        self._check()
        self.n += 1
        return [inference_id or f"gen-{self.n}"]

    async def interrupt(self) -> InterruptOutcome:
        self.calls.append(("interrupt", {}))
        self._check()
        return InterruptOutcome(True, 2, "interrupt sent; 2 pending echo(es) dropped")

    def status(self) -> dict[str, Any]:
        return {"conversation_id": "c1", "queues": {"delivery": np.int64(3)}, "ratio": np.float32(0.5),
                "level_dbfs": float("-inf"), "ids": ("a",)}

    def readiness(self) -> dict[str, bool]:
        return dict(self.ready)


class Served:
    def __init__(self, server: ControlServer, handle: FakeHandle, metrics: Metrics,
                 client: httpx.AsyncClient) -> None:
        self.server, self.handle, self.metrics, self.client = server, handle, metrics, client


Starter = Callable[..., Awaitable[Served]]


def make_settings(**control: Any) -> Settings:
    transform = {"through_control_api": control.pop("through_control_api", True)}
    return Settings.model_validate({"control": {"host": "127.0.0.1", "port": 0, **control},
                                    "transform": transform})


@pytest.fixture
async def start() -> AsyncIterator[Starter]:
    started: list[Served] = []

    async def _start(**control: Any) -> Served:
        handle, metrics = FakeHandle(), Metrics()
        server = await start_control_server(handle, metrics, make_settings(**control))
        client = httpx.AsyncClient(base_url=server.url, timeout=10)
        served = Served(server, handle, metrics, client)
        started.append(served)
        return served

    yield _start
    for s in started:
        await s.client.aclose()
        await s.server.stop()


@pytest.fixture
async def srv(start: Starter) -> Served:
    return await start()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_server() -> AsyncIterator[Served]:
    """One server for the many table-driven cases (start/stop costs ~0.2 s); calls reset per test."""
    handle, metrics = FakeHandle(), Metrics()
    server = await start_control_server(handle, metrics, make_settings(max_audio_s=2.0))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        yield Served(server, handle, metrics, client)
    await server.stop()


@pytest.fixture
def shared(shared_server: Served) -> Served:
    shared_server.handle.calls.clear()
    return shared_server


def pcm_b64(samples: np.ndarray) -> str:
    return base64.b64encode(samples.astype("<i2").tobytes()).decode("ascii")


def audio_body(audio: Any, **props: Any) -> dict[str, Any]:
    return {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "c1",
            "properties": {"modality": "audio", "audio": audio, **props}}


def text_body(**props: Any) -> dict[str, Any]:
    return {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "c1",
            "properties": {"modality": "text", **props}}


# ------------------------------------------------------------------------------------ start/stop
async def test_port_zero_gives_actual_port_and_url(srv: Served) -> None:
    assert srv.server.port > 0
    assert srv.server.url == f"http://127.0.0.1:{srv.server.port}"
    assert (await srv.client.get("/healthz")).json() == {"status": "ok"}


async def test_start_logs_the_url(start: Starter, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pipeline.control.server")
    s = await start()
    assert f"control API on http://127.0.0.1:{s.server.port}" in caplog.text


async def test_port_in_use_is_a_one_line_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ControlServerError) as err:
            await start_control_server(FakeHandle(), Metrics(), make_settings(port=port))
    assert str(err.value) == f"cannot listen on 127.0.0.1:{port}: address in use"


async def test_refuses_public_bind_without_token() -> None:
    with pytest.raises(ControlServerError) as err:
        await start_control_server(FakeHandle(), Metrics(), make_settings(host="0.0.0.0"))
    assert str(err.value) == "refusing to serve the control API on 0.0.0.0 without control.token"
    assert "\n" not in str(err.value)


async def test_public_bind_with_token_is_allowed(start: Starter) -> None:
    s = await start(host="0.0.0.0", token=TOKEN)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{s.server.port}") as c:
        assert (await c.get("/status")).status_code == 401
        assert (await c.get("/status", headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200


async def test_relay_signal_handlers_are_kept() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = await start_control_server(FakeHandle(), Metrics(), make_settings())
    try:
        await asyncio.sleep(0.05)
        assert {sig: signal.getsignal(sig) for sig in before} == before
    finally:
        await server.stop()
    assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_stop_frees_the_port_and_is_idempotent() -> None:
    server = await start_control_server(FakeHandle(), Metrics(), make_settings())
    port = server.port
    await server.stop()
    await server.stop()
    assert not server.running
    again = await start_control_server(FakeHandle(), Metrics(), make_settings(port=port))
    await again.stop()


# ----------------------------------------------------------------------------- send_text_message
async def test_quickstart_body_exactly(srv: Served) -> None:
    r = await srv.client.post("/send_text_message", json=QUICKSTART)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "success", "message": "queued for delivery", "modality": "text",
                        "inference_ids": ["gen-1"]}
    assert srv.handle.calls == [("text", {"text": "Hello", "inference_id": None, "done": True,
                                          "through_transforms": True})]


async def test_quickstart_curl_body_from_tavus_docs(srv: Served) -> None:
    """The doc's text example carries a (non-base64) `audio` and a sample_rate: both ignored for text."""
    r = await srv.client.post("/send_text_message", json=TAVUS_DOC_BODY)
    assert r.status_code == 200, r.text
    assert r.json()["inference_ids"] == ["inference-id-123"]
    assert srv.handle.calls == [("text", {"text": "Hello there!", "inference_id": "inference-id-123",
                                          "done": True, "through_transforms": True})]


async def test_quickstart_raw_bytes_as_curl_sends_them(srv: Served) -> None:
    raw = ('{"message_type":"conversation","event_type":"conversation.echo","conversation_id":"...",'
           '"properties":{"modality":"text","text":"Hello","done":"true"}}')
    r = await srv.client.post("/send_text_message", content=raw, headers=JSON)
    assert r.status_code == 200, r.text
    assert srv.handle.calls[0][1]["done"] is True


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("done", "expected"), [
    ("true", True), ("false", False), (True, True), (False, False), ("False", False), (" TRUE ", True),
    (None, True), ("<absent>", True),
])
async def test_done_boolean_or_string(shared: Served, done: Any, expected: bool) -> None:
    props: dict[str, Any] = {"text": "Hi"} if done == "<absent>" else {"text": "Hi", "done": done}
    r = await shared.client.post("/send_text_message", json=text_body(**props))
    assert r.status_code == 200, r.text
    assert shared.handle.calls[0][1]["done"] is expected


async def test_through_transforms_follows_config(start: Starter) -> None:
    s = await start(through_control_api=False)
    assert (await s.client.post("/send_text_message", json=QUICKSTART)).status_code == 200
    assert s.handle.calls[0][1]["through_transforms"] is False


async def test_envelope_fields_default_and_extra_envelope_fields_are_ignored(srv: Served) -> None:
    r = await srv.client.post("/send_text_message",
                              json={"properties": {"modality": "text", "text": "Hi"}, "seq": 3,
                                    "timestamp": 1.5})
    assert r.status_code == 200, r.text
    assert srv.handle.calls[0][0] == "text"


async def test_text_dropped_by_transform_returns_empty_ids(srv: Served) -> None:
    async def dropped(text: str, **kw: Any) -> list[str]:
        return []
    srv.handle.submit_text = dropped  # type: ignore[method-assign]
    r = await srv.client.post("/send_text_message", json=QUICKSTART)
    assert r.status_code == 200
    assert r.json()["inference_ids"] == []
    assert "dropped" in r.json()["message"]


async def test_audio_body(srv: Served) -> None:
    t = np.arange(16000) / 16000
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    body = audio_body(pcm_b64(tone), sample_rate=16000, inference_id="utt-7", done=False)
    r = await srv.client.post("/send_text_message", json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "success", "message": "queued for delivery", "modality": "audio",
                        "inference_ids": ["utt-7"]}
    [(kind, call)] = srv.handle.calls
    assert kind == "audio"
    assert call["sample_rate"] == 16000 and call["inference_id"] == "utt-7" and call["done"] is False
    assert call["pcm"].dtype == np.int16
    np.testing.assert_array_equal(call["pcm"], tone)


async def test_audio_defaults_and_wrapped_base64(srv: Served) -> None:
    pcm = np.array([0, 1, -1, 32767, -32768, 1234], dtype=np.int16)
    wrapped = "\n".join(pcm_b64(pcm)[i:i + 4] for i in range(0, 16, 4))  # like `base64` output
    r = await srv.client.post("/send_text_message", json=audio_body(wrapped, text="ignored"))
    assert r.status_code == 200, r.text
    call = srv.handle.calls[0][1]
    assert call["sample_rate"] == 16000 and call["done"] is True
    np.testing.assert_array_equal(call["pcm"], pcm)


async def test_audio_at_the_max_duration_is_accepted(start: Starter) -> None:
    s = await start(max_audio_s=1.0)
    body = audio_body(pcm_b64(np.zeros(8000, np.int16)), sample_rate=8000)
    assert (await s.client.post("/send_text_message", json=body)).status_code == 200


SILENCE_B64 = pcm_b64(np.zeros(160, np.int16))
WAV_B64 = base64.b64encode(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(28)).decode()

BAD_BODIES: list[tuple[str, Any, int, str]] = [
    # (case, JSON body or raw bytes, status, field)
    ("malformed JSON", b'{"message_type": "conversation", "properties": {', 400, "body"),
    ("empty body", b"", 422, "body"),
    ("JSON array", [1, 2], 422, "body"),
    ("JSON string", "hello", 422, "body"),
    ("no properties", {"message_type": "conversation", "event_type": "conversation.echo"}, 422, "properties"),
    ("properties not an object", {"properties": "text"}, 422, "properties"),
    ("no modality", {"properties": {"text": "Hi"}}, 422, "properties.modality"),
    ("unknown modality", {"properties": {"modality": "video", "text": "Hi"}}, 422, "properties.modality"),
    ("modality wrong type", {"properties": {"modality": 1, "text": "Hi"}}, 422, "properties.modality"),
    ("missing text", text_body(), 422, "properties.text"),
    ("null text", text_body(text=None), 422, "properties.text"),
    ("blank text", text_body(text="   "), 422, "properties.text"),
    ("text wrong type", text_body(text=42), 422, "properties.text"),
    ("text as list", text_body(text=["Hi"]), 422, "properties.text"),
    ("done not a boolean", text_body(text="Hi", done="yes"), 422, "properties.done"),
    ("done as number", text_body(text="Hi", done=1), 422, "properties.done"),
    ("other event type", {**QUICKSTART, "event_type": "conversation.respond"}, 422, "event_type"),
    ("interrupt event type", {**QUICKSTART, "event_type": "conversation.interrupt"}, 422, "event_type"),
    ("other message type", {**QUICKSTART, "message_type": "system"}, 422, "message_type"),
    ("conversation_id wrong type", {**QUICKSTART, "conversation_id": 7}, 422, "conversation_id"),
    ("unknown property", text_body(text="Hi", txt="typo"), 422, "properties.txt"),
    ("empty inference_id", text_body(text="Hi", inference_id=""), 422, "properties.inference_id"),
    ("huge inference_id", text_body(text="Hi", inference_id="x" * 500), 422, "properties.inference_id"),
    ("inference_id wrong type", text_body(text="Hi", inference_id=5), 422, "properties.inference_id"),
    ("missing audio", {"properties": {"modality": "audio", "sample_rate": 16000}}, 422, "properties.audio"),
    ("empty audio", audio_body(""), 422, "properties.audio"),
    ("audio not base64", audio_body("base64-encoded-audio"), 422, "properties.audio"),
    ("audio bad padding", audio_body("AAA"), 422, "properties.audio"),
    ("audio odd byte count", audio_body(base64.b64encode(b"\x00\x01\x02").decode()), 422, "properties.audio"),
    ("audio is a WAV file", audio_body(WAV_B64), 422, "properties.audio"),
    ("audio wrong type", audio_body(123), 422, "properties.audio"),
    ("audio too long", audio_body(pcm_b64(np.zeros(8000 * 3, np.int16)), sample_rate=8000), 422,
     "properties.audio"),
    ("sample rate too low", audio_body(SILENCE_B64, sample_rate=100), 422, "properties.sample_rate"),
    ("sample rate too high", audio_body(SILENCE_B64, sample_rate=192000), 422, "properties.sample_rate"),
    ("sample rate as string", audio_body(SILENCE_B64, sample_rate="16000"), 422, "properties.sample_rate"),
    ("sample rate as float", audio_body(SILENCE_B64, sample_rate=16000.5), 422, "properties.sample_rate"),
    ("sample rate as bool", audio_body(SILENCE_B64, sample_rate=True), 422, "properties.sample_rate"),
]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize(("case", "body", "status", "field"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
async def test_bad_input_is_4xx_naming_the_field_and_nothing_is_sent(
        shared: Served, case: str, body: Any, status: int, field: str) -> None:
    s = shared
    if isinstance(body, bytes):
        r = await s.client.post("/send_text_message", content=body, headers=JSON)
    else:
        r = await s.client.post("/send_text_message", json=body)
    assert r.status_code == status, r.text
    data = r.json()
    assert data["status"] == "error"
    assert data["field"] == field
    assert data["error"].startswith(f"{field}: ")
    assert data["errors"] and data["errors"][0]["field"] == field
    assert s.handle.calls == []
    assert (await s.client.get("/healthz")).status_code == 200


async def test_form_encoded_body_is_415(srv: Served) -> None:
    """`curl -d` without -H sends application/x-www-form-urlencoded."""
    r = await srv.client.post("/send_text_message", content=json.dumps(QUICKSTART),
                              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert "application/json" in r.json()["error"]
    assert srv.handle.calls == []


async def test_body_over_limit_by_content_length_is_413(start: Starter) -> None:
    s = await start(max_body_bytes=2048)
    body = text_body(text="x" * 5000)
    r = await s.client.post("/send_text_message", json=body)
    assert r.status_code == 413
    assert "control.max_body_bytes" in r.json()["error"] and r.json()["field"] == "body"
    assert s.handle.calls == []
    assert (await s.client.post("/send_text_message", json=QUICKSTART)).status_code == 200


async def test_streamed_body_over_limit_is_413(start: Starter) -> None:
    """No Content-Length (chunked transfer): the bytes actually received are counted."""
    s = await start(max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"properties": {"modality": "text", "text": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}}'

    r = await s.client.post("/send_text_message", content=chunks(), headers=JSON)
    assert r.status_code == 413
    assert "Content-Length" not in r.request.headers
    assert s.handle.calls == []

    async def small() -> AsyncIterator[bytes]:
        yield json.dumps(QUICKSTART).encode()

    r = await s.client.post("/send_text_message", content=small(), headers=JSON)
    assert r.status_code == 200, r.text


async def test_invalid_content_length_is_400(srv: Served) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.port)
    writer.write(b"POST /send_text_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"400"
    assert srv.handle.calls == []


async def test_slow_body_is_408(srv: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_guard, "BODY_TIMEOUT_S", 0.3)
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.server.port)
    writer.write(b"POST /send_text_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"properties\"")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.split()[1] == b"408"
    assert srv.handle.calls == []
    assert (await srv.client.get("/healthz")).status_code == 200


async def test_client_gone_mid_body(srv: Served) -> None:
    _, writer = await asyncio.open_connection("127.0.0.1", srv.server.port)
    writer.write(b"POST /send_text_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"properties\"")
    await writer.drain()
    writer.close()
    await asyncio.sleep(0.1)
    assert srv.handle.calls == []
    assert (await srv.client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("body", [QUICKSTART, audio_body(SILENCE_B64)])
async def test_queue_full_is_503(srv: Served, body: dict[str, Any]) -> None:
    srv.handle.queue_full = True
    r = await srv.client.post("/send_text_message", json=body)
    assert r.status_code == 503
    assert r.json()["status"] == "error" and "queue full" in r.json()["error"]
    assert r.headers["Retry-After"] == "1"
    assert (await srv.client.get("/healthz")).status_code == 200


async def test_unexpected_error_is_a_generic_500(srv: Served, caplog: pytest.LogCaptureFixture) -> None:
    srv.handle.boom = True
    r = await srv.client.post("/send_text_message", json=QUICKSTART)
    assert r.status_code == 500
    assert r.json()["error"] == "internal error (see the relay's log)"
    assert "bug in the relay" not in r.text
    assert "bug in the relay" in caplog.text
    srv.handle.boom = False
    assert (await srv.client.post("/send_text_message", json=QUICKSTART)).status_code == 200


# -------------------------------------------------------------------------- the other endpoints
async def test_interrupt(srv: Served) -> None:
    r = await srv.client.post("/interrupt")
    assert r.status_code == 200
    assert r.json() == {"status": "success", "sent": True, "dropped_echoes": 2,
                        "detail": "interrupt sent; 2 pending echo(es) dropped"}
    assert srv.handle.calls == [("interrupt", {})]


async def test_status_is_json(srv: Served) -> None:
    r = await srv.client.get("/status")
    assert r.status_code == 200
    assert r.json() == {"conversation_id": "c1", "queues": {"delivery": 3}, "ratio": 0.5, "level_dbfs": None,
                        "ids": ["a"]}


async def test_readyz_follows_readiness(srv: Served) -> None:
    r = await srv.client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "checks": {"model_loaded": True, "sink_ready": True}}
    srv.handle.ready["sink_ready"] = False
    r = await srv.client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"ready": False, "checks": {"model_loaded": True, "sink_ready": False}}
    assert (await srv.client.get("/healthz")).status_code == 200


async def test_metrics_is_prometheus_text(srv: Served) -> None:
    srv.metrics.echoes_sent.labels(source="api").inc(2)
    r = await srv.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    assert "echo_relay_echoes_sent" in families and "echo_relay_interrupts_sent" in families
    sent = {s.labels["source"]: s.value for s in families["echo_relay_echoes_sent"].samples
            if s.name.endswith("_total")}
    assert sent == {"api": 2, "speech": 0}  # every source's series from the start


async def test_unknown_path_and_method(srv: Served) -> None:
    r = await srv.client.get("/nope")
    assert r.status_code == 404 and r.json()["status"] == "error"
    r = await srv.client.get("/send_text_message")
    assert r.status_code == 405 and r.json()["status"] == "error"


async def test_openapi_documents_every_field(srv: Served) -> None:
    r = await srv.client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    for path, method in [("/send_text_message", "post"), ("/interrupt", "post"), ("/status", "get"),
                         ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get")]:
        assert method in spec["paths"][path], path
    schemas = spec["components"]["schemas"]
    for name in ("EchoRequest", "EchoProperties", "SendResponse", "ErrorResponse", "ReadyResponse"):
        for field, prop in schemas[name]["properties"].items():
            assert prop.get("description"), f"{name}.{field} has no description"
    assert set(schemas["EchoProperties"]["properties"]) == {"modality", "text", "audio", "sample_rate",
                                                             "inference_id", "done"}
    assert (await srv.client.get("/docs")).status_code == 200


# ------------------------------------------------------------------------------------ security
async def test_token_required_except_healthz(start: Starter) -> None:
    s = await start(token=TOKEN)
    c = s.client
    good = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
        for method, path in (("POST", "/send_text_message"), ("POST", "/interrupt"), ("GET", "/status"),
                             ("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/openapi.json"),
                             ("GET", "/docs")):
            r = await c.request(method, path, headers=headers, json=QUICKSTART if method == "POST" else None)
            assert r.status_code == 401, (headers, path)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["status"] == "error"
    # A refused upload is read and dropped first, so the client gets the 401 rather than a reset.
    big = audio_body(pcm_b64(np.zeros(200_000, np.int16)))
    r = await c.post("/send_text_message", json=big)
    assert r.status_code == 401
    assert s.handle.calls == []
    assert (await c.get("/healthz")).status_code == 200
    assert (await c.post("/send_text_message", json=QUICKSTART, headers=good)).status_code == 200
    assert (await c.post("/send_text_message", json=QUICKSTART,
                         headers={"Authorization": f"bearer {TOKEN}"})).status_code == 200
    assert (await c.post("/interrupt", headers=good)).status_code == 200
    for path in ("/status", "/readyz", "/metrics", "/openapi.json"):
        assert (await c.get(path, headers=good)).status_code == 200, path
    assert [k for k, _ in s.handle.calls] == ["text", "text", "interrupt"]


async def test_rate_limit_per_client(start: Starter) -> None:
    s = await start(rate_limit_per_s=1.0)  # burst 2
    codes = [(await s.client.get("/status")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = await s.client.post("/send_text_message", json=QUICKSTART)
    assert r.status_code == 429
    assert int(r.headers["Retry-After"]) >= 1
    assert "rate limit" in r.json()["error"]
    assert s.handle.calls == []
    assert (await s.client.get("/healthz")).status_code == 200  # liveness is never limited
    # Another client address has its own bucket (the whole 127/8 is loopback on Linux).
    transport = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=s.server.url, transport=transport) as other:
        assert (await other.get("/status")).status_code == 200


def test_token_bucket() -> None:
    now = [0.0]
    rl = RateLimiter(2.0, clock=lambda: now[0])  # burst 4
    assert [rl.take("a") for _ in range(4)] == [0.0] * 4
    assert rl.take("a") == pytest.approx(0.5)
    assert rl.take("b") == 0.0
    now[0] = 0.5
    assert rl.take("a") == 0.0
    assert rl.take("a") > 0
    now[0] = 100.0
    assert [rl.take("a") for _ in range(4)] == [0.0] * 4  # refills up to the burst, not beyond
    assert rl.take("a") > 0
