"""`webhook` step against a real HTTP server on 127.0.0.1 (no mocks of httpx)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from pipeline.config import ConfigError, TransformSettings, TransformStep
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.transform import WebhookError, WebhookStep, build_chain
from pipeline.transform.base import OptionError

META = UtteranceMeta(utterance_id="utt-42", audio_start_s=3.25, audio_end_s=5.5, asr_text="um hello there",
                     confidence=0.87, language="en")


class HookServer(ThreadingHTTPServer):
    daemon_threads = True
    requests: list[dict[str, Any]]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the slow route's client hangs up on purpose


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so client reuse is observable
    server: HookServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, status: int, body: bytes | str = b"", ctype: str | None = "application/json") -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        body = json.loads(raw)
        self.server.requests.append({"path": self.path, "body": body, "headers": dict(self.headers),
                                     "port": self.client_address[1]})
        text = body["text"]
        route = self.path.split("?")[0]
        if route == "/json":
            self.reply(200, json.dumps({"text": text.upper()}))
        elif route == "/plain":
            self.reply(200, f"plain: {text}\n", "text/plain; charset=utf-8")
        elif route == "/drop":
            self.reply(200, json.dumps({"drop": True}))
        elif route == "/null":
            self.reply(200, json.dumps({"text": None}))
        elif route == "/204":
            self.reply(204, b"", None)
        elif route == "/500":
            self.reply(500, "database exploded", "text/plain")
        elif route == "/slow":
            time.sleep(1.0)
            self.reply(200, json.dumps({"text": "too late"}))
        elif route == "/badjson":
            self.reply(200, "{not json", "application/json")
        elif route == "/nokey":
            self.reply(200, json.dumps({"result": "x"}))
        elif route == "/badtext":
            self.reply(200, json.dumps({"text": 5}))
        elif route == "/binary":
            self.reply(200, b"\x00\x01", "application/octet-stream")
        else:
            self.reply(404, "no such route", "text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[HookServer]:
    srv = HookServer(("127.0.0.1", 0), Handler)
    srv.requests = []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv: HookServer, route: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{route}"


def chain_for(srv: HookServer, route: str, m: Metrics, **step: Any) -> Any:
    step.setdefault("timeout_s", 0.5)
    settings = TransformSettings(steps=[TransformStep(step="webhook", url=url(srv, route), **step)])
    return build_chain(settings, m)


def dropped(m: Metrics, reason: str, stage: str = "transform") -> float:
    return m.value("echo_relay_dropped_total", {"stage": stage, "reason": reason})


async def test_json_reply_and_meta_fields(server: HookServer) -> None:
    server.requests.clear()
    chain = chain_for(server, "/json", Metrics(), headers={"Authorization": "Bearer s3cret", "X-Team": "a"})
    try:
        out = await chain.run("hello there", META)
        assert out.text == "HELLO THERE"
        req = server.requests[-1]
        assert req["body"] == {"text": "hello there", "utterance_id": "utt-42", "audio_start_s": 3.25,
                               "audio_end_s": 5.5, "asr_text": "um hello there", "confidence": 0.87,
                               "language": "en"}
        assert req["headers"]["Authorization"] == "Bearer s3cret" and req["headers"]["X-Team"] == "a"
        assert req["headers"]["Content-Type"] == "application/json"
        # the client is reused: the second request arrives on the same keep-alive connection
        await chain.run("again", META)
        assert server.requests[-1]["port"] == req["port"]
        step = chain.steps[0].fn
        assert isinstance(step, WebhookStep) and "s3cret" not in repr(step)
    finally:
        await chain.aclose()
    assert step._client is None


async def test_plain_text_reply(server: HookServer) -> None:
    async with chain_for(server, "/plain", Metrics()) as chain:
        assert (await chain.run("hi", META)).text == "plain: hi"


@pytest.mark.parametrize("route", ["/drop", "/null"])
async def test_drop_replies(server: HookServer, route: str) -> None:
    m = Metrics()
    async with chain_for(server, route, m) as chain:
        out = await chain.run("hi", META)
    assert out.dropped and out.dropped_by is not None and out.dropped_by.step == "webhook"
    assert dropped(m, "dropped_by:webhook") == 1


async def test_204_keeps_text(server: HookServer) -> None:
    async with chain_for(server, "/204", Metrics()) as chain:
        assert (await chain.run("hi", META)).text == "hi"


@pytest.mark.parametrize("route", ["/500", "/badjson", "/nokey", "/badtext", "/binary", "/missing"])
async def test_bad_replies_follow_error_policy(server: HookServer, route: str) -> None:
    m = Metrics()
    async with chain_for(server, route, m) as passing:
        out = await passing.run("hi", META)
    assert out.text == "hi" and out.timings[0].outcome == "error"
    assert dropped(m, "error:webhook", stage="transform_step") == 1
    async with chain_for(server, route, m, on_error="drop") as dropping:
        out = await dropping.run("hi", META)
    assert out.dropped and out.dropped_by is not None and out.dropped_by.reason == "error"
    assert dropped(m, "error:webhook") == 1


async def test_500_error_message(server: HookServer) -> None:
    step = WebhookStep(url=url(server, "/500?token=abc"))
    try:
        with pytest.raises(WebhookError) as ei:
            await step("hi", META)
    finally:
        await step.aclose()
    msg = str(ei.value)
    assert "500" in msg and "database exploded" in msg and "token=abc" not in msg


@pytest.mark.parametrize("policy", ["pass", "drop"])
async def test_slow_reply_times_out(server: HookServer, policy: str) -> None:
    m = Metrics()
    t0 = time.perf_counter()
    async with chain_for(server, "/slow", m, timeout_s=0.1, on_error=policy) as chain:
        out = await chain.run("hi", META)
    assert time.perf_counter() - t0 < 0.8
    assert out.timings[0].outcome == "timeout"
    if policy == "pass":
        assert out.text == "hi" and dropped(m, "timeout:webhook", stage="transform_step") == 1
    else:
        assert out.dropped and dropped(m, "timeout:webhook") == 1


async def test_http_client_timeout_backstop(server: HookServer) -> None:
    step = WebhookStep(url=url(server, "/slow"), request_timeout_s=0.1)
    try:
        with pytest.raises(WebhookError, match="timed out"):
            await step("hi", META)
    finally:
        await step.aclose()


async def test_unreachable_server_is_an_error() -> None:
    import socket

    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = Metrics()
    settings = TransformSettings(steps=[TransformStep(step="webhook", url=f"http://127.0.0.1:{port}/x")])
    async with build_chain(settings, m) as chain:
        out = await chain.run("hi", META)
    assert out.text == "hi" and out.timings[0].outcome == "error"


def test_option_validation() -> None:
    with pytest.raises(OptionError) as ei:
        WebhookStep(url="ftp://example.com")
    assert ei.value.option == "url"
    with pytest.raises(ConfigError) as ce:
        build_chain(TransformSettings(steps=[TransformStep(step="webhook", url="http://x", headers=["a"])]))
    assert ce.value.key == "transform.steps[0].headers"


def test_reply_parsing_without_network() -> None:
    step = WebhookStep(url="http://127.0.0.1:9/hook")
    req = httpx.Request("POST", step.url)

    def reply(status: int, **kw: Any) -> str | None:
        return step.parse_reply(httpx.Response(status, request=req, **kw), "orig")

    assert reply(200, json={"text": "a", "drop": False}) == "a"
    assert reply(200, json={"text": "a", "drop": True}) is None
    assert reply(200, json="bare string") == "bare string"
    assert reply(200, content=b"  spaced  ", headers={"content-type": "text/plain"}) == "spaced"
    assert reply(200, content=b"no type") == "no type"
    with pytest.raises(WebhookError):
        reply(200, json=[1, 2])
    with pytest.raises(WebhookError):
        reply(302, headers={"location": "/elsewhere"})
