"""Hostile and unlucky input to the control API (issue 11), against the real server on 127.0.0.1.

One class per section, several cases each (hypothesis where a class of inputs fits):
- DNS rebinding: a Host header that is not a name of this server gets 421 (control.allowed_hosts);
- cross-site requests: bodies any web page can POST without a CORS preflight get 415, a foreign Origin
  403 (control.cors_origins opens CORS for named pages);
- resource exhaustion: idle and half-open connections never lock out /healthz (control.max_connections,
  control.header_timeout_s, control.keep_alive_s), requests in progress are capped;
- text limits: properties.text over control.max_text_chars gets 422;
- text that cannot be encoded: strings with lone surrogates get 422 naming the field.
Every refused request is checked to have reached nothing: the handle records every call.

The server runs on its own event loop in a background thread (the product runs it in the relay's
loop) so that hypothesis can drive plain synchronous tests; raw sockets speak HTTP where a client
library would refuse to send the input (duplicate headers, half-sent heads).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings, TransformSettings
from pipeline.control.api import InterruptOutcome
from pipeline.control.guard import HEALTH_RESERVED_CONNECTIONS, MAX_HEAD_BYTES
from pipeline.control.server import ControlServer, start_control_server
from pipeline.events import EventBus
from pipeline.metrics import Metrics

HOSTILE = settings(max_examples=60, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
JSON = {"Content-Type": "application/json"}
QUICKSTART = {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "...",
              "properties": {"modality": "text", "text": "Hello", "done": "true"}}
QUICKSTART_BYTES = json.dumps(QUICKSTART).encode()
DEFAULT_MAX_TEXT_CHARS = 10_000  # control.max_text_chars in docs/control-api.md
DEFAULT_MAX_CONNECTIONS = 64  # control.max_connections in docs/control-api.md
WAIT_S = 10.0  # longest wait for the server to do something it must do (a generous bound, not a measurement)
SHORT_TIMEOUT_S = 0.5  # header/keep-alive timeouts configured for the tests that wait them out
# Endpoints a hostile page would aim at: reading transcripts, making the persona speak, interrupting.
TARGETS: list[tuple[str, str]] = [("GET", "/status"), ("GET", "/metrics"), ("GET", "/readyz"),
                                  ("GET", "/openapi.json"), ("POST", "/send_text_message"), ("POST", "/interrupt")]


# ------------------------------------------------------------------------------------ harness
class RecordingHandle:
    """A RelayHandle that records every call: a refused request must leave it untouched."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.events = EventBus(Metrics(), time.monotonic)  # GET /events

    async def submit_text(self, text: str, *, inference_id: str | None = None, done: bool = True,
                          through_transforms: bool = True) -> list[str]:
        self.calls.append(("text", {"text": text, "inference_id": inference_id}))
        return [inference_id or f"id-{len(self.calls)}"]

    async def submit_audio(self, pcm: Any, sample_rate: int, *, inference_id: str | None = None,
                           done: bool = True) -> list[str]:
        self.calls.append(("audio", {"samples": len(pcm), "inference_id": inference_id}))
        return [inference_id or f"id-{len(self.calls)}"]

    async def interrupt(self) -> InterruptOutcome:
        self.calls.append(("interrupt", {}))
        return InterruptOutcome(True, 0, "interrupt sent")

    def status(self) -> dict[str, Any]:
        return {"conversation_id": "c-secret", "recent": [{"text": "the user's private transcript"}]}

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": True, "sink_ready": True}


@dataclass
class Served:
    server: ControlServer
    handle: RecordingHandle
    metrics: Metrics
    client: httpx.Client
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.server.port

    def counted(self, endpoint: str, status: str) -> float:
        return self.metrics.value("echo_relay_control_requests_total", {"endpoint": endpoint, "status": status})


@contextlib.contextmanager
def serve(**control: Any) -> Iterator[Served]:
    """The control API on 127.0.0.1 (free port) with a RecordingHandle, on a background event loop."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="hostile-loop", daemon=True)
    thread.start()
    handle, metrics = RecordingHandle(), Metrics()
    transform = control.pop("transform", {})
    cfg = Settings.model_validate({"control": {"host": "127.0.0.1", "port": 0, "rate_limit_per_s": 1e5,
                                               **control}, "transform": transform})
    server = asyncio.run_coroutine_threadsafe(start_control_server(handle, metrics, cfg), loop).result(WAIT_S)
    client = httpx.Client(base_url=server.url, timeout=WAIT_S)
    try:
        yield Served(server, handle, metrics, client, loop)
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(WAIT_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT_S)
        loop.close()


@pytest.fixture(scope="module")
def shared() -> Iterator[Served]:
    """The default configuration (only the rate limit raised), for the generated cases."""
    with serve() as s:
        yield s


def request(s: Served, method: str, path: str, headers: dict[str, str] | None = None,
            body: Any = QUICKSTART) -> httpx.Response:
    if method == "POST":
        return s.client.request(method, path, content=json.dumps(body).encode(), headers={**JSON, **(headers or {})})
    return s.client.request(method, path, headers=headers)


def assert_refused(r: httpx.Response, status: int, field_name: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    data = r.json()
    assert data["status"] == "error"
    assert data["field"] == field_name
    assert data["error"].startswith(f"{field_name}: ")
    assert data["errors"] and data["errors"][0]["field"] == field_name
    assert "private transcript" not in r.text and "c-secret" not in r.text
    return data


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def read_response(sock: socket.socket) -> RawResponse | None:
    """One HTTP response from `sock` (None if the server closed without sending anything)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            if not data:
                return None
            raise AssertionError(f"connection closed mid-response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return RawResponse(int(lines[0].split()[1]), headers, body[:length])


def raw(port: int, data: bytes) -> RawResponse:
    """Send `data` (a whole request) on a new connection and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(data)
        response = read_response(sock)
    assert response is not None, "the server closed the connection without answering"
    return response


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed `sock` (EOF or reset), reading and discarding any answer; False if
    it is still open after WAIT_S."""
    sock.settimeout(WAIT_S)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------- DNS rebinding
def own_name(host: str) -> bool:
    """Independent oracle: the Host values the default configuration must accept on 127.0.0.1."""
    m = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(?::([0-9]{1,5}))?", host.lower())
    if m is None or (m[2] is not None and int(m[2]) > 65535):
        return False
    name = m[1]
    if name.startswith("["):
        try:
            return ipaddress.IPv6Address(name[1:-1]) == ipaddress.IPv6Address("::1")
        except ValueError:
            return False
    return name in ("localhost", "127.0.0.1")


label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
domains = st.lists(label, min_size=1, max_size=4).map(".".join)
ports = st.integers(min_value=0, max_value=70000).map(lambda p: f":{p}") | st.just("")
hostile_hosts = st.one_of(
    st.tuples(domains, ports).map("".join),
    st.sampled_from(["attacker.example", "localhost.attacker.example", "127.0.0.1.nip.io", "localhost.",
                     "127.0.0.2", "0.0.0.0", "127.1", "2130706433", "[::2]", "[::ffff:127.0.0.1]", "::1", "[::1",
                     "localhost:", ":8000", "localhost:99999", "localhost:80:80", "user@localhost",
                     "localhost/status", "local host", "", "LOCALHOST.", "xn--lcalhost-9za"]),
    st.tuples(st.sampled_from(["localhost", "127.0.0.1", "[::1]"]), st.sampled_from([".", "x", "-", "_", ".evil"]),
              ports).map("".join),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40),
)


@HOSTILE
@given(host=hostile_hosts, target=st.sampled_from(TARGETS))
def test_foreign_host_is_421_and_reaches_nothing(shared: Served, host: str, target: tuple[str, str]) -> None:
    """A page on attacker.example whose name was rebound to 127.0.0.1 sends Host: attacker.example."""
    assume(not own_name(host))
    before = list(shared.handle.calls)
    r = request(shared, *target, headers={"Host": host})
    data = assert_refused(r, 421, "Host")
    assert "control.allowed_hosts" in data["error"]
    assert shared.handle.calls == before


def test_missing_duplicate_and_non_ascii_host_are_refused(shared: Served) -> None:
    """What no client library would send, over a raw socket: still refused, never passed on."""
    shared.handle.calls.clear()
    for head in (b"GET /status HTTP/1.0\r\n\r\n",
                 b"GET /status HTTP/1.1\r\nHost: localhost\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
                 b"GET /status HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                 "GET /status HTTP/1.1\r\nHost: lócalhost\r\nConnection: close\r\n\r\n".encode("latin-1"),
                 b"POST /interrupt HTTP/1.0\r\nContent-Length: 0\r\n\r\n"):
        r = raw(shared.port, head)
        assert r.status in (400, 421), (head, r)  # 400: h11 itself refused the request
        assert r.json()["status"] == "error" and r.json()["field"] in ("Host", "request")
        assert b"private transcript" not in r.body
    assert shared.handle.calls == []


@pytest.mark.parametrize("host", ["localhost", "LocalHost:8000", "127.0.0.1", "127.0.0.1:{port}", "[::1]",
                                  "[::1]:{port}", "[0:0:0:0:0:0:0:1]:80", "localhost:65535"])
def test_own_names_are_answered(shared: Served, host: str) -> None:
    shared.handle.calls.clear()
    host = host.format(port=shared.port)
    assert request(shared, "GET", "/status", {"Host": host}).status_code == 200
    r = request(shared, "POST", "/send_text_message", {"Host": host})
    assert r.status_code == 200, r.text
    assert shared.handle.calls == [("text", {"text": "Hello", "inference_id": None})]


@HOSTILE
@given(host=hostile_hosts)
def test_healthz_answers_any_host(shared: Served, host: str) -> None:
    """Liveness probes may send any Host (pod IP, service name); /healthz reveals nothing but "ok"."""
    r = shared.client.get("/healthz", headers={"Host": host})
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_allowed_hosts_setting() -> None:
    with serve(allowed_hosts=["relay.example", "10.1.2.3", "::5", "My_Service"]) as s:
        for host in ("relay.example", "RELAY.example:8000", "10.1.2.3:80", "[::5]", "[0::5]:1", "my_service:8000",
                     "localhost", f"127.0.0.1:{s.port}"):
            assert request(s, "GET", "/status", {"Host": host}).status_code == 200, host
        for host in ("sub.relay.example", "relay.example.attacker.example", "relay.example.", "10.1.2.4",
                     "[::6]", "attacker.example"):
            assert_refused(request(s, "POST", "/interrupt", {"Host": host}), 421, "Host")
        assert s.handle.calls == []
    with serve(allowed_hosts=["*"]) as s:
        for host in ("attacker.example", "anything:1", "[::2]"):
            assert request(s, "POST", "/send_text_message", {"Host": host}).status_code == 200, host
        assert len(s.handle.calls) == 3


def test_wildcard_bind_accepts_the_address_the_request_came_in_on() -> None:
    """Bound to 0.0.0.0 (a pod), a probe or client addressing the pod IP sends that IP as Host. Linux routes
    all of 127/8 to loopback, so 127.0.0.3 stands in for the pod IP here."""
    token = {"Authorization": "Bearer pod-token-value"}
    with serve(host="0.0.0.0", token="pod-token-value") as s, \
            httpx.Client(base_url=f"http://127.0.0.3:{s.port}", headers=token) as pod:
        assert pod.get("/status").status_code == 200  # Host: 127.0.0.3:PORT
        assert pod.get("/status", headers={"Host": "127.0.0.3"}).status_code == 200
        assert_refused(pod.get("/status", headers={"Host": "127.0.0.4"}), 421, "Host")
        assert_refused(pod.get("/status", headers={"Host": "pod.attacker.example"}), 421, "Host")
    with serve(host="127.0.0.2") as s, httpx.Client(base_url=f"http://127.0.0.2:{s.port}") as bound:
        assert bound.get("/status").status_code == 200
        assert bound.get("/status", headers={"Host": "127.0.0.2"}).status_code == 200


# ------------------------------------------------------------------------ cross-site requests
SAFELISTED = ["application/x-www-form-urlencoded", "multipart/form-data", "text/plain"]


def random_case(text: str, flips: list[bool]) -> str:
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips + [False] * len(text), strict=False))


browser_types = st.builds(
    lambda essence, flips, params: random_case(essence, flips) + params,
    st.sampled_from(SAFELISTED), st.lists(st.booleans(), max_size=40),
    st.sampled_from(["", "; charset=utf-8", ";charset=UTF-8", "; boundary=----x", " ; application/json",
                     "; type=application/json"]))
other_types = st.sampled_from(["text/html", "application/xml", "application/octet-stream", "text/json",
                               "application/jsonp", "json", "application", "*/*", "application/json-patch",
                               "text/plain, application/json", "application/x-json"])


@HOSTILE
@given(content_type=browser_types | other_types, path=st.sampled_from(["/send_text_message", "/interrupt"]),
       empty=st.booleans())
def test_bodies_a_web_page_can_post_are_415(shared: Served, content_type: str, path: str, empty: bool) -> None:
    """An HTML form or fetch() without preflight can POST these; the body is valid JSON to prove the
    refusal is about the type. An empty form (`<form method=post>` without fields) counts too."""
    before = list(shared.handle.calls)
    body = b"" if empty else QUICKSTART_BYTES
    r = shared.client.post(path, content=body, headers={"Content-Type": content_type})
    data = assert_refused(r, 415, "Content-Type")
    assert "application/json" in data["error"]
    assert shared.handle.calls == before


@HOSTILE
@given(body=st.binary(min_size=1, max_size=200) | st.just(QUICKSTART_BYTES),
       path=st.sampled_from(["/send_text_message", "/interrupt"]), chunked=st.booleans())
def test_untyped_body_is_415(shared: Served, body: bytes, path: str, chunked: bool) -> None:
    """fetch() with a Blob or ArrayBuffer body sends no Content-Type and needs no preflight."""
    before = list(shared.handle.calls)
    content: Any = iter([body]) if chunked else body
    r = shared.client.post(path, content=content)
    assert "content-type" not in r.request.headers
    assert_refused(r, 415, "Content-Type")
    assert shared.handle.calls == before


@pytest.mark.parametrize("content_type", ["application/json", "application/json; charset=utf-8",
                                          "Application/JSON", "application/problem+json"])
def test_json_bodies_are_accepted(shared: Served, content_type: str) -> None:
    shared.handle.calls.clear()
    r = shared.client.post("/send_text_message", content=QUICKSTART_BYTES, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    r = shared.client.post("/interrupt", content=b'{"ignored": true}', headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    assert [k for k, _ in shared.handle.calls] == ["text", "interrupt"]


def test_interrupt_without_body_needs_no_content_type(shared: Served) -> None:
    shared.handle.calls.clear()
    assert shared.client.post("/interrupt").status_code == 200  # curl -X POST .../interrupt
    r = raw(shared.port, b"POST /interrupt HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert r.status == 200, r
    assert [k for k, _ in shared.handle.calls] == ["interrupt", "interrupt"]


origins = st.one_of(
    st.tuples(st.sampled_from(["http://", "https://"]), domains, ports).map("".join),
    st.sampled_from(["null", "http://attacker.example", "https://127.0.0.1", "http://localhost", "file://",
                     "http://127.0.0.1", "http://[::1]", "chrome-extension://abcdef", "*", ""]),
    st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=30),
)


@HOSTILE
@given(origin=origins, target=st.sampled_from(TARGETS))
def test_foreign_origin_is_403_and_reaches_nothing(shared: Served, origin: str, target: tuple[str, str]) -> None:
    """Browsers send Origin on cross-site POSTs and CORS reads; only the API's own pages may call it."""
    assume(origin != shared.server.url)
    before = list(shared.handle.calls)
    data = assert_refused(request(shared, *target, headers={"Origin": origin}), 403, "Origin")
    assert "control.cors_origins" in data["error"]
    assert shared.handle.calls == before


def test_near_miss_origins_are_403(shared: Served) -> None:
    """Same host, other port or scheme; another name of this server; a path: all cross-origin."""
    shared.handle.calls.clear()
    port = shared.port
    for origin in (f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}", f"http://localhost:{port}",
                   f"http://127.0.0.1:{port}/", f"http://127.0.0.1:{port}/docs", f"http://[::1]:{port}"):
        assert_refused(request(shared, "POST", "/send_text_message", {"Origin": origin}), 403, "Origin")
    r = raw(port, f"POST /interrupt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1:{port}\r\n"
                  f"Origin: http://attacker.example\r\nConnection: close\r\n\r\n".encode())
    assert r.status == 403 and r.json()["field"] == "Origin"
    assert shared.handle.calls == []


def test_pages_served_by_the_api_itself_may_call_it(shared: Served) -> None:
    """/docs ("Try it out") posts from the API's own origin."""
    shared.handle.calls.clear()
    same = {"Origin": shared.server.url}
    assert request(shared, "POST", "/send_text_message", same).status_code == 200
    assert request(shared, "GET", "/status", same).status_code == 200
    localhost = {"Host": f"localhost:{shared.port}", "Origin": f"http://LOCALHOST:{shared.port}"}
    assert request(shared, "POST", "/interrupt", localhost).status_code == 200
    assert [k for k, _ in shared.handle.calls] == ["text", "interrupt"]


@pytest.mark.parametrize(("site", "status"), [("cross-site", 403), ("same-site", 403), ("same-origin", 200),
                                               ("none", 200)])
def test_cross_site_post_without_origin_is_403(shared: Served, site: str, status: int) -> None:
    shared.handle.calls.clear()
    r = request(shared, "POST", "/send_text_message", {"Sec-Fetch-Site": site})
    if status == 403:
        assert_refused(r, 403, "Sec-Fetch-Site")
        assert shared.handle.calls == []
    else:
        assert r.status_code == 200, r.text
        assert len(shared.handle.calls) == 1


def test_cors_is_closed_by_default(shared: Served) -> None:
    preflight = {"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    r = shared.client.options("/send_text_message", headers=preflight)
    assert_refused(r, 403, "Origin")
    assert "access-control-allow-origin" not in r.headers
    r = request(shared, "GET", "/status", {"Origin": shared.server.url})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_origins_setting_opens_cors_for_those_pages_only() -> None:
    token = "cors-token-value"
    with serve(cors_origins=["http://LocalHost:3000", "https://app.example:443"], token=token) as s:
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"}
        for origin in ("http://localhost:3000", "https://app.example"):
            r = s.client.options("/send_text_message", headers={**preflight, "Origin": origin})
            assert r.status_code == 200, r.text  # no token on a preflight: browsers send none
            assert r.headers["access-control-allow-origin"] == origin
            assert "POST" in r.headers["access-control-allow-methods"]
        for origin in ("http://localhost:3001", "http://app.example", "null"):
            r = s.client.options("/send_text_message", headers={**preflight, "Origin": origin})
            assert_refused(r, 403, "Origin")
            assert "access-control-allow-origin" not in r.headers
        page = {"Origin": "http://localhost:3000"}
        assert request(s, "POST", "/send_text_message", page).status_code == 401  # the token still applies
        r = request(s, "POST", "/send_text_message", {**page, "Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
        # A form post from an allowed page is still refused: CORS opens reads and JSON, not forms.
        r = s.client.post("/interrupt", content=b"a=1", headers={**page, "Authorization": f"Bearer {token}",
                                                                 "Content-Type": "application/x-www-form-urlencoded"})
        assert_refused(r, 415, "Content-Type")
        assert [k for k, _ in s.handle.calls] == ["text"]


# ---------------------------------------------------------------------- resource exhaustion
def open_sockets(port: int, n: int, first_bytes: list[bytes]) -> list[socket.socket]:
    socks = []
    for i in range(n):
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
        if first_bytes[i % len(first_bytes)]:
            sock.sendall(first_bytes[i % len(first_bytes)])
        socks.append(sock)
    return socks


HALF_OPEN = [b"",  # connected, nothing sent
             b"G",  # one byte of a request line
             b"GET /status HTTP/1.1\r\n",  # a request line
             b"POST /send_text_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"]  # no end


def test_idle_and_half_open_connections_never_lock_out_probes() -> None:
    """Three times control.max_connections idle or half-open sockets (the header timeout is long, so
    only making room can let the probe in): /healthz and the API still answer at once."""
    with serve(header_timeout_s=300) as s:
        socks = open_sockets(s.port, 3 * DEFAULT_MAX_CONNECTIONS, HALF_OPEN)
        try:
            deadline = time.monotonic() + WAIT_S  # until the server has taken them all in
            while s.counted("connection", "evicted") < 2 * DEFAULT_MAX_CONNECTIONS:
                assert time.monotonic() < deadline, s.counted("connection", "evicted")
                time.sleep(0.02)
            assert s.client.get("/healthz").json() == {"status": "ok"}
            assert s.client.get("/status").status_code == 200
            assert s.client.post("/send_text_message", json=QUICKSTART).status_code == 200
            # the oldest ones were closed to make room; what was half-sent never reached the relay
            assert all(closed_by_server(sock) for sock in socks[:DEFAULT_MAX_CONNECTIONS])
            assert s.handle.calls == [("text", {"text": "Hello", "inference_id": None})]
        finally:
            for sock in socks:
                sock.close()


LONG_HALF_HEAD = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 8000  # under MAX_HEAD_BYTES


@pytest.mark.parametrize("partial", [*HALF_OPEN[1:], LONG_HALF_HEAD])
def test_half_sent_head_is_408_after_the_header_timeout(partial: bytes) -> None:
    with serve(header_timeout_s=SHORT_TIMEOUT_S) as s, \
            socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as sock:
        sock.sendall(partial)
        r = read_response(sock)
        assert r is not None and r.status == 408, r
        assert r.json()["field"] == "request" and "control.header_timeout_s" in r.json()["error"]
        assert closed_by_server(sock)
        assert s.counted("connection", "408") == 1
        assert s.handle.calls == []
        assert s.client.get("/status").status_code == 200


def test_a_head_sent_byte_by_byte_does_not_extend_the_deadline() -> None:
    """Slowloris: a byte every 50 ms forever. Bytes arriving do not restart the header timeout."""
    head = b"POST /send_text_message HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"a" * 4000
    with serve(header_timeout_s=SHORT_TIMEOUT_S) as s, \
            socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as sock:
        sent = 0
        while sent < len(head):  # ~200 s if the server never gave up
            sock.sendall(head[sent:sent + 1])
            sent += 1
            answered, _, _ = select.select([sock], [], [], 0.05)  # the pause between bytes
            if answered:
                break
        assert sent < len(head), "the server kept reading a head sent a byte at a time"
        r = read_response(sock)
        assert r is not None and r.status == 408
        assert s.handle.calls == []


def test_silent_and_idle_keep_alive_connections_are_closed() -> None:
    with serve(header_timeout_s=SHORT_TIMEOUT_S, keep_alive_s=1) as s:
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as silent:
            assert read_response(silent) is None  # closed without a word: nothing was asked
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as kept:
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            r = read_response(kept)
            assert r is not None and r.status == 200
            assert read_response(kept) is None  # then closed after control.keep_alive_s
        assert s.counted("connection", "408") == 0


def test_requests_in_progress_are_capped_and_probes_still_answer() -> None:
    """Slow bodies hold requests open (up to the 30 s body timeout): at most max_connections - 8 of them;
    the next request gets 503 at once and /healthz still answers."""
    max_connections = 16
    in_flight = max_connections - HEALTH_RESERVED_CONNECTIONS
    head = (f"POST /send_text_message HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(QUICKSTART_BYTES)}\r\n\r\n").encode()
    with serve(max_connections=max_connections) as s:
        slow = open_sockets(s.port, in_flight, [head + QUICKSTART_BYTES[:10]])
        try:
            deadline = time.monotonic() + WAIT_S
            while (r := request(s, "GET", "/status")).status_code == 200:  # until all slow ones are admitted
                assert time.monotonic() < deadline, "slow requests were never admitted"
                time.sleep(0.02)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert "control.max_connections" in r.json()["error"]
            refused = s.client.post("/send_text_message", json=QUICKSTART)
            assert refused.status_code == 503
            assert s.client.get("/healthz").status_code == 200
            for sock in slow:  # the slow bodies complete: each is served
                sock.sendall(QUICKSTART_BYTES[10:])
                answer = read_response(sock)
                assert answer is not None and answer.status == 200, answer
            assert request(s, "GET", "/status").status_code == 200
            assert len(s.handle.calls) == in_flight
        finally:
            for sock in slow:
                sock.close()


@pytest.mark.parametrize("path", ["/status", "/healthz", "/send_text_message"])
def test_oversized_request_head_is_refused(path: str) -> None:
    """Over MAX_HEAD_BYTES: 400 from h11 while the head is still arriving, 431 when it came in one read."""
    big = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ".encode() + b"a" * MAX_HEAD_BYTES
    with serve() as s:
        r = raw(s.port, big + b"\r\n\r\n")
        assert r.status == 431 and r.json()["field"] == "headers", r
        with socket.create_connection(("127.0.0.1", s.port), timeout=WAIT_S) as sock:
            sock.sendall(big)  # no end of head yet: h11 holds it as incomplete
            answer = read_response(sock)
        assert answer is not None and answer.status == 400 and answer.json()["field"] == "request", answer
        assert s.counted("connection", "400") == 1
        assert s.client.get("/healthz").status_code == 200
        assert s.handle.calls == []


# ------------------------------------------------------------------------------ text limits
PIECES = ["x", "um ", "So, um, ", "é", "😀", "漢字。", "a" * 50, " uh-huh", "e\u0301"]


@HOSTILE
@given(n=st.integers(min_value=DEFAULT_MAX_TEXT_CHARS - 3, max_value=DEFAULT_MAX_TEXT_CHARS + 300)
       | st.integers(min_value=1, max_value=100), piece=st.sampled_from(PIECES))
def test_text_is_bounded_by_max_text_chars(shared: Served, n: int, piece: str) -> None:
    text = (piece * (n // len(piece) + 1))[:n]
    assume(text.strip())
    before = list(shared.handle.calls)
    r = shared.client.post("/send_text_message", json={"properties": {"modality": "text", "text": text}})
    if n <= DEFAULT_MAX_TEXT_CHARS:
        assert r.status_code == 200, r.text
        assert shared.handle.calls[len(before):] == [("text", {"text": text, "inference_id": None})]
    else:
        data = assert_refused(r, 422, "properties.text")
        assert f"{n} characters" in data["error"] and "control.max_text_chars (10000)" in data["error"]
        assert shared.handle.calls == before


def test_text_from_the_issue_is_refused_without_blocking(shared: Served) -> None:
    """990 KB without spaces (or of fillers) blocked the loop for 3.3 s; it is now refused at the door."""
    before = list(shared.handle.calls)
    for text in ("x" * 990_000, "um " * 330_000):
        r = shared.client.post("/send_text_message", json={"properties": {"modality": "text", "text": text}})
        assert_refused(r, 422, "properties.text")
    assert shared.handle.calls == before
    assert shared.client.get("/healthz").status_code == 200


def test_text_the_chain_would_drop_as_too_long_is_refused_at_the_door() -> None:
    """transform.max_text_chars (the chain's own bound, pipeline/transform/chain.py) below
    control.max_text_chars: the door refuses what the chain would drop, naming that setting."""
    if "max_text_chars" not in TransformSettings.model_fields:
        pytest.skip("no transform.max_text_chars in this tree")
    with serve(transform={"max_text_chars": 30}) as s:
        r = s.client.post("/send_text_message", json={"properties": {"modality": "text", "text": "a" * 31}})
        assert "transform.max_text_chars (30)" in assert_refused(r, 422, "properties.text")["error"]
        assert s.client.post("/send_text_message", json={"properties": {"modality": "text", "text": "a" * 30}}
                             ).status_code == 200
    with serve(transform={"max_text_chars": 30, "through_control_api": False}) as s:  # the chain is not run
        r = s.client.post("/send_text_message", json={"properties": {"modality": "text", "text": "a" * 31}})
        assert r.status_code == 200, r.text


def test_max_text_chars_setting() -> None:
    with serve(max_text_chars=50) as s:
        ok = s.client.post("/send_text_message", json={"properties": {"modality": "text", "text": "é" * 50}})
        assert ok.status_code == 200, ok.text
        r = s.client.post("/send_text_message", json={"properties": {"modality": "text", "text": "é" * 51}})
        assert "control.max_text_chars (50)" in assert_refused(r, 422, "properties.text")["error"]
        assert s.handle.calls == [("text", {"text": "é" * 50, "inference_id": None})]


# -------------------------------------------------------------------- text that cannot be encoded
lone_surrogates = st.integers(min_value=0xD800, max_value=0xDFFF).map(chr)
plain_text = st.text(max_size=20)  # hypothesis never generates surrogates unless asked


@st.composite
def with_surrogates(draw: st.DrawFn, max_size: int = 20) -> str:
    """Text holding 1-3 lone surrogates (never two in a row, which JSON would join into one character)."""
    parts = [draw(st.text(max_size=max_size))]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        parts += [draw(lone_surrogates), draw(st.text(min_size=1, max_size=max_size))]
    return "".join(parts)


def echo(text: str = "Hello", **props: Any) -> dict[str, Any]:
    return {"message_type": "conversation", "event_type": "conversation.echo",
            "properties": {"modality": "text", "text": text, **props}}


@HOSTILE
@given(value=with_surrogates(), where=st.sampled_from(["properties.text", "properties.inference_id",
                                                       "conversation_id", "properties.audio"]))
def test_lone_surrogates_are_422_naming_the_field(shared: Served, value: str, where: str) -> None:
    """A JSON \\ud800 escape arrives as a lone surrogate: accepted, it failed in delivery (exit 1)."""
    if where == "properties.text":
        body = echo(value)
    elif where == "properties.inference_id":
        body = echo(inference_id=value)
    elif where == "properties.audio":
        body = {"properties": {"modality": "audio", "audio": value}}
    else:
        body = {**echo(), "conversation_id": value}
    raw_body = json.dumps(body)  # ensure_ascii: a lone surrogate becomes its \\udxxx escape
    assert "\\ud" in raw_body
    before = list(shared.handle.calls)
    r = shared.client.post("/send_text_message", content=raw_body, headers=JSON)
    data = assert_refused(r, 422, where)
    if where != "properties.audio":  # audio: a non-base64 character is found first, also a 422 naming it
        assert "cannot be encoded as UTF-8" in data["error"] and "lone surrogate" in data["error"]
    assert shared.handle.calls == before


@HOSTILE
@given(key=with_surrogates(max_size=5), done=with_surrogates(max_size=5))
def test_surrogates_elsewhere_are_422_never_500(shared: Served, key: str, done: str) -> None:
    """An unknown key or a `done` string with a lone surrogate: named in the error, which still encodes."""
    before = list(shared.handle.calls)
    body = echo()
    body["properties"][key] = 1
    r = shared.client.post("/send_text_message", content=json.dumps(body), headers=JSON)
    assert r.status_code == 422 and r.json()["field"].startswith("properties")
    r = shared.client.post("/send_text_message", content=json.dumps(echo(done=done)), headers=JSON)
    assert_refused(r, 422, "properties.done")
    assert shared.handle.calls == before


controls = st.sampled_from([chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]])


@HOSTILE
@given(prefix=st.text(alphabet=st.characters(categories=["L", "N", "Zs"]), max_size=20), control=controls,
       suffix=st.text(alphabet=st.characters(categories=["L", "N", "Zs"]), min_size=1, max_size=20),
       where=st.sampled_from(["properties.text", "properties.inference_id"]))
def test_control_characters_are_422_naming_the_field(shared: Served, prefix: str, control: str, suffix: str,
                                                     where: str) -> None:
    """NUL, ESC, C1 controls (mojibake): never speech; the transform chain would drop them (bad_text)."""
    value = prefix + control + suffix
    body = echo(value) if where == "properties.text" else echo(inference_id=value)
    before = list(shared.handle.calls)
    data = assert_refused(shared.client.post("/send_text_message", json=body), 422, where)
    assert f"control character U+{ord(control):04X} at character {len(prefix)}" in data["error"]
    assert shared.handle.calls == before


def test_tab_and_line_breaks_are_text(shared: Served) -> None:
    shared.handle.calls.clear()
    r = shared.client.post("/send_text_message", json=echo("one\ttwo\r\nthree\nfour"))
    assert r.status_code == 200, r.text
    assert shared.handle.calls == [("text", {"text": "one\ttwo\r\nthree\nfour", "inference_id": None})]


def test_surrogate_pairs_are_text(shared: Served) -> None:
    """A correct \\ud83d\\ude00 pair is one character (😀) and is accepted."""
    shared.handle.calls.clear()
    raw_body = '{"properties": {"modality": "text", "text": "hi \\ud83d\\ude00", "inference_id": "\\ud83d\\ude00"}}'
    r = shared.client.post("/send_text_message", content=raw_body, headers=JSON)
    assert r.status_code == 200, r.text
    assert r.json()["inference_ids"] == ["😀"]
    assert shared.handle.calls == [("text", {"text": "hi 😀", "inference_id": "😀"})]


def test_audio_still_accepted(shared: Served) -> None:
    """The surrogate check runs on every string, audio included: valid base64 PCM passes."""
    shared.handle.calls.clear()
    body = {"properties": {"modality": "audio", "audio": base64.b64encode(bytes(320)).decode()}}
    assert shared.client.post("/send_text_message", json=body).status_code == 200
    assert shared.handle.calls == [("audio", {"samples": 160, "inference_id": None})]


# ------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize(("key", "value"), [
    ("max_text_chars", 0), ("max_text_chars", 20_001), ("max_connections", 8), ("header_timeout_s", 0),
    ("keep_alive_s", 0), ("allowed_hosts", ["http://relay.example/"]), ("allowed_hosts", ["relay.example:8000"]),
    ("cors_origins", ["http://localhost:3000/"]), ("cors_origins", ["*"]),
])
def test_bad_control_settings_exit_2_naming_the_key(tmp_path: Path, key: str, value: Any) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(json.dumps({"control": {key: value}}), encoding="utf-8")  # JSON is YAML
    proc = subprocess.run([sys.executable, "-m", "pipeline", "config", "check", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert f"control.{key}" in proc.stderr
    assert "Traceback" not in proc.stderr
