"""The local control API: FastAPI served by uvicorn inside the relay's own event loop.

`start_control_server(handle, metrics, settings)` binds the socket itself (so a taken port becomes a
one-line `ControlServerError` instead of uvicorn's `sys.exit`), runs `uvicorn.Server.serve()` as a
task of the current loop, with uvicorn's signal handling disabled (the relay owns SIGINT/SIGTERM),
and returns once the server is listening. `ControlServer.stop()` shuts it down gracefully.

Every request first goes through `_Guard` (pure ASGI): the Host header (DNS rebinding), the Origin
(cross-site pages), per-client rate limit (token bucket), bearer token, the Content-Type of POSTs
(bodies a browser may send from any page without asking), the number of requests in progress, and
the body size limit (Content-Length and the bytes actually received). Below it, each connection is a
`_GuardedH11Protocol`: the request head must arrive within control.header_timeout_s, and at
control.max_connections the longest-idle connection makes room for a new one. Endpoints and limits
are documented in docs/control-api.md and in the OpenAPI schema (/openapi.json, /docs).

The live page (GET /, pipeline/control/page/index.html) follows the relay on GET /events, the relay's
event stream (pipeline/events.py) as Server-Sent Events. A stream is one long request: it holds one of
the requests-in-progress slots (at most `max_event_streams` of them) and, having a request in progress,
is never closed by the header timeout or to make room. Nothing the page or /docs load comes from
outside the server: Swagger UI is served from pipeline/control/page/static/swagger-ui/.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import math
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import h11
import numpy as np
import uvicorn
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.config import Settings
from pipeline.control.api import QueueFull, RelayHandle
from pipeline.control.models import (
    DEFAULT_SAMPLE_RATE,
    EchoRequest,
    ErrorResponse,
    FieldErrorItem,
    HealthResponse,
    InterruptResponse,
    ReadyResponse,
    SendResponse,
)
from pipeline.events import MAX_SUBSCRIBERS, Event, Subscription, TooManySubscribers
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

# The text format produced by prometheus_client.generate_latest (Metrics.render).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# /healthz has no token, rate limit, Host or Origin check and needs no request slot: liveness probes
# (which may send any Host, e.g. the pod IP or a service name) must always get through, and it
# answers nothing but "ok" and changes nothing, so a hostile page learns nothing it could not by timing.
OPEN_PATHS = frozenset({"/healthz"})
KNOWN_PATHS = frozenset({"/send_text_message", "/interrupt", "/status", "/healthz", "/readyz", "/metrics",
                         "/openapi.json", "/docs", "/docs/oauth2-redirect", "/", "/events", "/static"})
# The live page and its static files need no token (they hold no data, and a browser cannot send a header
# when it opens a page); they still get the Host, Origin and rate checks. The page asks for the token.
PAGE_PATH = "/"
STATIC_PREFIX = "/static/"
EVENTS_PATH = "/events"
EVENTS_TOKEN_PARAM = "token"  # GET /events?token=...: EventSource (the page) cannot send Authorization
PAGE_DIR = Path(__file__).resolve().parent / "page"
STATIC_DIR = PAGE_DIR / "static"
SWAGGER_JS = "/static/swagger-ui/swagger-ui-bundle.js"
SWAGGER_CSS = "/static/swagger-ui/swagger-ui.css"
FAVICON = "/static/favicon.svg"
SSE_KEEPALIVE_S = 15.0  # a comment line after this long without an event (proxies, dead-peer detection)
SSE_RETRY_MS = 2000  # EventSource reconnects this long after a stream ends
# The pages may load, run and connect to nothing but this server (inline script and style are theirs).
PAGE_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
PAGE_HEADERS = {"Content-Security-Policy": PAGE_CSP, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
SHUTDOWN_GRACE_S = 2  # in-flight requests get this long on stop()
# Connections of control.max_connections kept for /healthz: the other endpoints together may have at
# most max_connections - this many requests in progress, so some connection is always idle and can
# be closed to let a probe in (_ConnectionLimits).
HEALTH_RESERVED_CONNECTIONS = 8
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (h11's default, stated): 400 while arriving, else 431
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "[::1]"})  # Host names always accepted
ANY_HOST = "*"  # in control.allowed_hosts: accept any Host header
# Content types a page on any site may POST without a CORS preflight (the Fetch standard's
# "CORS-safelisted" types: HTML forms and text/plain). Named in the 415 message.
BROWSER_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data", "text/plain")
CORS_MAX_AGE_S = 600  # browsers may cache an answered preflight this long
CONNECTION_ENDPOINT = "connection"  # control_requests label for connections closed before a request
OVERLOAD_LOG_EVERY_S = 10.0  # at most one warning per this about closed or refused connections
MAX_SHOWN_CHARS = 80  # a refused header value is quoted in the error up to this many characters
MAX_TRACKED_CLIENTS = 4096  # rate-limit buckets kept before idle ones are pruned
# A refused body up to this many times control.max_body_bytes is read and dropped before the 413 is
# sent, so the client reads the answer instead of a connection reset; larger ones are cut off.
DRAIN_FACTOR = 4
DRAIN_TIMEOUT_S = 2.0  # longest wait for the rest of a refused body
BODY_TIMEOUT_S = 30.0  # a request body must arrive within this (else 408)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ControlServerError(Exception):
    """The control API cannot be served (port in use, public bind without a token). One line."""


# ------------------------------------------------------------------------------------ errors
class FieldError(Exception):
    """A bad request about one field: answered as `ErrorResponse` with `status_code`."""

    def __init__(self, field: str, message: str, *, status_code: int = 422,
                 type_: str = "value_error") -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status_code, self.type = field, message, status_code, type_


def error_body(error: str, field: str | None = None,
               items: list[dict[str, str]] | None = None) -> dict[str, Any]:
    errors = [FieldErrorItem(**item) for item in items or []]
    return ErrorResponse(error=error, field=field, errors=errors).model_dump()


def json_bytes(data: Any) -> bytes:
    """UTF-8 JSON that cannot fail to encode: a lone surrogate that came in with the request (an unknown
    key "\\ud800" is named in its error) is written as its \\u escape, which is what it was in the
    request, instead of turning the answer into a 500."""
    return json.dumps(data, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8", "backslashreplace")


class _JSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json_bytes(content)


def error_response(status_code: int, error: str, field: str | None = None,
                   items: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    if field is not None and not items:  # `errors` always lists the problem `field` names
        items = [{"field": field, "message": error.removeprefix(f"{field}: "),
                  "type": HTTPStatus(status_code).name.lower()}]
    return _JSONResponse(error_body(error, field, items), status_code=status_code, headers=headers)


def _shown(value: bytes | str) -> str:
    """A header value quoted in an error message, cut to MAX_SHOWN_CHARS."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return repr(text if len(text) <= MAX_SHOWN_CHARS else text[:MAX_SHOWN_CHARS] + "...")


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def _validation_items(exc: RequestValidationError, request: Request) -> tuple[int, list[dict[str, str]]]:
    """pydantic/FastAPI errors -> (status, [{field, message, type}]): 400 malformed JSON, 415 not JSON."""
    items: list[dict[str, str]] = []
    status = 422
    content_type = request.headers.get("content-type", "")
    for err in exc.errors():
        etype = str(err.get("type", "value_error"))
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if etype == "json_invalid":
            status = 400
            pos = loc[1] if len(loc) > 1 else "?"
            detail = (err.get("ctx") or {}).get("error", "")
            message = f"invalid JSON at position {pos}: {detail}".rstrip(": ")
            items.append({"field": "body", "message": message, "type": etype})
            continue
        field = _field_of(loc)
        if field == "body" and etype == "missing":
            msg = "a JSON object is required"
        elif field == "body" and isinstance(err.get("input"), bytes | bytearray):
            status = 415
            etype = "unsupported_media_type"
            msg = f"send JSON with Content-Type: application/json (got {content_type or 'no Content-Type'!r})"
        elif etype == "extra_forbidden":
            msg = "unknown field"
        elif etype.startswith("value_error") and msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif field == "event_type" and etype == "literal_error":
            msg += " (POST /interrupt sends conversation.interrupt)"
        items.append({"field": field, "message": msg, "type": etype})
    if not items:
        items.append({"field": "body", "message": "invalid request", "type": "value_error"})
    return status, items


# ------------------------------------------------------------------------------- rate limit
class RateLimiter:
    """Token bucket per client: `rate` tokens per second, capacity `burst` (2x rate by default)."""

    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(1.0, 2.0 * rate))
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, last refill time)

    def take(self, client: str) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until a token is available."""
        now = self._clock()
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._store(client, tokens - 1.0, now)
            return 0.0
        self._store(client, tokens, now)
        return (1.0 - tokens) / self.rate

    def _store(self, client: str, tokens: float, now: float) -> None:
        if client not in self._buckets and len(self._buckets) >= MAX_TRACKED_CLIENTS:
            full_after = self.burst / self.rate  # a bucket idle this long is full again: forget it
            for key in [k for k, (_, t) in self._buckets.items() if now - t >= full_after]:
                del self._buckets[key]
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:  # still full: forget the oldest
                oldest = min(self._buckets, key=lambda k: self._buckets[k][1])
                del self._buckets[oldest]
        self._buckets[client] = (tokens, now)


# ------------------------------------------------------------------------------ host, origin
# A Host header value: a name, a dotted IPv4 address or a bracketed IPv6 address, then an optional port.
_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[^:\[\]]*)(?::(?P<port>[0-9]{1,5}))?")
# Host names as pipeline/config.py (ControlSettings.allowed_hosts) accepts them: RFC 1123 labels, plus
# "_" (Docker and Compose service names have them).
_HOST_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*")
_ORIGIN = re.compile(r"(?P<scheme>https?)://(?P<hostport>[^/?#]+)")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_PORT = 65535
_MAX_HOST_NAME_CHARS = 253


def host_and_port(value: str) -> tuple[str, int | None] | None:
    """A Host header value (or a configured name) -> (normalized host, port or None); None if invalid.

    Names are compared in lower case; IPv6 addresses in brackets and compressed form ("[::1]"). A
    trailing dot, user info, a path or an empty port are invalid: browsers never send them.
    """
    m = _HOST_PORT.fullmatch(value.strip().lower())
    if m is None:
        return None
    port = int(m["port"]) if m["port"] is not None else None
    if port is not None and port > _MAX_PORT:
        return None
    host = m["host"]
    if host.startswith("["):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]", port
        except ValueError:
            return None
    if len(host) > _MAX_HOST_NAME_CHARS or not _HOST_NAME.fullmatch(host):
        return None
    return host, port


def address_names(address: str) -> set[str]:
    """How a Host header names a socket address: "10.0.0.5", "[fe80::1]" (IPv4-mapped IPv6 both ways)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        parsed = host_and_port(address)
        return {parsed[0]} if parsed else set()
    if isinstance(ip, ipaddress.IPv6Address):
        names = {f"[{ip.compressed}]"}
        if ip.ipv4_mapped is not None:
            names.add(str(ip.ipv4_mapped))
        return names
    return {str(ip)}


def origin_key(value: str) -> tuple[str, str, int] | None:
    """An Origin header value (or a control.cors_origins entry) -> (scheme, host, port); None if invalid
    (including "null", which sandboxed frames and file: pages send)."""
    m = _ORIGIN.fullmatch(value.strip().lower())
    if m is None:
        return None
    parsed = host_and_port(m["hostport"])
    if parsed is None:
        return None
    host, port = parsed
    scheme = m["scheme"]
    return scheme, host, port if port is not None else _DEFAULT_PORTS[scheme]


def origin_text(key: tuple[str, str, int]) -> str:
    """The Origin a browser sends for `key` (the default port left out), as CORSMiddleware compares it."""
    scheme, host, port = key
    return f"{scheme}://{host}" if port == _DEFAULT_PORTS[scheme] else f"{scheme}://{host}:{port}"


def media_type(value: bytes) -> str:
    """The essence of a Content-Type ("text/plain; charset=utf-8" -> "text/plain"), as browsers parse it."""
    return value.split(b";", 1)[0].strip().lower().decode("latin-1")


def is_json_type(essence: str) -> bool:
    """application/json or application/*+json: what FastAPI parses as JSON, and never CORS-safelisted."""
    return essence == "application/json" or (essence.startswith("application/") and essence.endswith("+json"))


@dataclass(frozen=True)
class BrowserPolicy:
    """Which Host and Origin headers the API answers (docs/control-api.md, "Browsers and DNS rebinding").

    `host_names`: normalized Host names accepted (loopback names, the bound address, control.allowed_hosts);
    the address a request came in on is accepted too (a wildcard bind reached by its IP, e.g. a k8s probe
    of the pod IP). `cors_origins`: (scheme, host, port) of control.cors_origins.
    """

    any_host: bool
    host_names: frozenset[str]
    cors_origins: frozenset[tuple[str, str, int]]

    @classmethod
    def from_settings(cls, bind_host: str, allowed_hosts: list[str], cors_origins: list[str]) -> BrowserPolicy:
        names = set(LOOPBACK_HOSTS)
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(bind_host.strip("[]")).is_unspecified:
                bind_host = ""  # 0.0.0.0 / ::: the address each request came in on is checked instead
        if bind_host:
            names |= address_names(bind_host.strip("[]"))
        for entry in allowed_hosts:
            parsed = host_and_port(entry) if entry != ANY_HOST else None
            if parsed is not None:
                names.add(parsed[0])
        origins = {key for key in map(origin_key, cors_origins) if key is not None}
        return cls(ANY_HOST in allowed_hosts, frozenset(names), frozenset(origins))

    def host_refusal(self, scope: Scope) -> Response | None:
        """421 unless the request has one Host header naming this server."""
        values = _header_values(scope, b"host")
        if self.any_host and len(values) <= 1:
            return None
        if len(values) != 1:
            problem = "missing" if not values else f"sent {len(values)} times"
            return error_response(421, f"Host: {problem}; send the one Host this server is reached by",
                                  field="Host")
        parsed = host_and_port(values[0].decode("latin-1"))
        if parsed is not None:
            server = scope.get("server")
            if parsed[0] in self.host_names or (server and parsed[0] in address_names(str(server[0]))):
                return None
        return error_response(
            421, f"Host: {_shown(values[0])} is not a name of this server (a web page reached through its own "
                 "DNS name is refused: DNS rebinding guard); add the name to control.allowed_hosts",
            field="Host")

    def origin_refusal(self, scope: Scope) -> Response | None:
        """403 for a request from a page that is neither served by the API itself nor in control.cors_origins."""
        values = _header_values(scope, b"origin")
        if not values:
            if scope.get("method") == "POST":
                site = b"".join(_header_values(scope, b"sec-fetch-site")).lower()
                if site in (b"cross-site", b"same-site"):  # a browser that left Origin out
                    return error_response(
                        403, f"Sec-Fetch-Site: {_shown(site)} without an Origin: cross-site requests are refused",
                        field="Sec-Fetch-Site")
            return None
        key = origin_key(values[0].decode("latin-1")) if len(values) == 1 else None
        if key is not None and (key in self.cors_origins or self._same_origin(key, scope)):
            return None
        return error_response(
            403, f"Origin: {_shown(values[-1])} may not use the control API (cross-site request guard): only "
                 "pages it serves itself and control.cors_origins may", field="Origin")

    @staticmethod
    def _same_origin(key: tuple[str, str, int], scope: Scope) -> bool:
        scheme, host, port = key
        hosts = _header_values(scope, b"host")
        parsed = host_and_port(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
        if parsed is None or scheme != scope.get("scheme", "http"):
            return False
        return (host, port) == (parsed[0], parsed[1] if parsed[1] is not None else _DEFAULT_PORTS[scheme])

    def is_preflight(self, scope: Scope) -> bool:
        """A CORS preflight from an allowed origin: answered by CORSMiddleware, without a token (browsers
        send none on a preflight)."""
        return (bool(self.cors_origins) and scope.get("method") == "OPTIONS"
                and bool(_header_values(scope, b"access-control-request-method")))


def _header_values(scope: Scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope.get("headers") or [] if key == name]


# ------------------------------------------------------------------------------------- guard
class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class _Guard:
    """Pure ASGI middleware: Host -> Origin -> rate limit -> bearer token -> Content-Type of POSTs ->
    requests in progress -> body size limit (buffered, then replayed). /healthz skips all but the body."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, limiter: RateLimiter,
                 metrics: Metrics, browser: BrowserPolicy, max_in_flight: int) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.max_body_bytes = max_body_bytes
        self.limiter = limiter
        self.metrics = metrics
        self.browser = browser
        self.max_in_flight = max_in_flight
        self.in_flight = 0  # admitted requests other than /healthz, until their response is sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status_seen: list[int] = []

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_seen.append(int(message["status"]))
            await send(message)

        try:
            await self._handle(scope, receive, send_tracked, path)
        except Exception:
            # Starlette re-raises an error after its 500 handler answered (and logged it): the
            # client has its response, so keep the connection and uvicorn's duplicate traceback out.
            if not status_seen:
                raise
        finally:
            self._count(path, status_seen[0] if status_seen else 0)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        try:
            declared = self._content_length(scope)
        except ValueError:
            await error_response(400, "Content-Length: not a number", field="Content-Length",
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        head_bytes = len(scope.get("raw_path") or b"") + sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or [])
        if head_bytes > MAX_HEAD_BYTES:  # h11 only limits a head still arriving; one read may bring more
            await self._refuse(scope, receive, send, declared, error_response(
                431, f"headers: request line and headers are {head_bytes} bytes, over {MAX_HEAD_BYTES}",
                field="headers", headers={"Connection": "close"}), budget=0)
            return
        if path in OPEN_PATHS:
            await self._admitted(scope, receive, send, declared)
            return
        refusal = self.browser.host_refusal(scope) or self.browser.origin_refusal(scope)
        if refusal is not None:
            await self._refuse(scope, receive, send, declared, refusal)
            return
        client = scope.get("client")
        wait = self.limiter.take(client[0] if client else "unknown")
        if wait > 0:
            retry = max(1, math.ceil(wait))
            await self._refuse(scope, receive, send, declared, error_response(
                429, f"rate limit exceeded (control.rate_limit_per_s = {self.limiter.rate:g}); "
                     f"retry after {retry} s", headers={"Retry-After": str(retry)}))
            return
        if (self.token is not None and not is_tokenless(path) and not self.browser.is_preflight(scope)
                and not self._authorized(scope, path)):
            also = f", or ?{EVENTS_TOKEN_PARAM}=<token> in the URL" if path == EVENTS_PATH else ""
            await self._refuse(scope, receive, send, declared, error_response(
                401, f"missing or invalid bearer token (send Authorization: Bearer <token>{also})",
                field="Authorization", headers={"WWW-Authenticate": 'Bearer realm="echo-relay"'}))
            return
        if scope.get("method") == "POST" and (refusal := self._content_type_refusal(scope, declared)):
            await self._refuse(scope, receive, send, declared, refusal)
            return
        if self.in_flight >= self.max_in_flight:
            # No draining (budget 0): a slot held for the drain is what this limit protects.
            await self._refuse(scope, receive, send, declared, error_response(
                503, f"server busy: {self.in_flight} requests in progress (control.max_connections - "
                     f"{HEALTH_RESERVED_CONNECTIONS} kept for /healthz); retry later",
                headers={"Retry-After": "1", "Connection": "close"}), budget=0)
            return
        self.in_flight += 1
        try:
            await self._admitted(scope, receive, send, declared)
        finally:
            self.in_flight -= 1

    def _content_type_refusal(self, scope: Scope, declared: int | None) -> Response | None:
        """415 for a POST whose body a page on any site could have sent: a form or text/plain body, or a
        body without a Content-Type. No body and no Content-Type is fine (`curl -X POST .../interrupt`)."""
        values = _header_values(scope, b"content-type")
        if not values:  # a chunked body is checked once read (_admitted)
            return _unsupported("missing on a request with a body") if (declared or 0) > 0 else None
        for value in values:
            if not is_json_type(media_type(value)):
                return _unsupported(f"{_shown(value)} is not accepted")
        return None

    async def _admitted(self, scope: Scope, receive: Receive, send: Send, declared: int | None) -> None:
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse(scope, receive, send, declared, self._too_large(declared),
                               budget=self.max_body_bytes * DRAIN_FACTOR)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), BODY_TIMEOUT_S)
        except _BodyTooLarge:
            await self._refuse(scope, receive, send, None, self._too_large(None),
                               budget=self.max_body_bytes * DRAIN_FACTOR)
            return
        except _Disconnected:
            return
        except TimeoutError:
            await error_response(408, f"body: not received within {BODY_TIMEOUT_S} s", field="body",
                                 headers={"Connection": "close"})(scope, receive, send)
            return
        if body and scope.get("method") == "POST" and not _header_values(scope, b"content-type"):
            await _unsupported("missing on a request with a body")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                return int(value)
        return None

    def _authorized(self, scope: Scope, path: str) -> bool:
        """The bearer token in Authorization, or (GET /events only) in the `token` query parameter.
        Compared in constant time; never logged, never echoed."""
        assert self.token is not None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    if hmac.compare_digest(credentials.strip(), self.token):
                        return True
                    break
        if path == EVENTS_PATH:
            candidate = _query_token(scope)
            return candidate is not None and hmac.compare_digest(candidate, self.token)
        return False

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, declared: int | None,
                      response: Response, budget: int | None = None) -> None:
        """Answer without passing the request on. The unread body (up to `budget` bytes, by default
        control.max_body_bytes) is read and dropped first: closing a connection with unread data
        resets it, and the client would see the reset instead of our answer."""
        budget = self.max_body_bytes if budget is None else budget
        if declared is None or declared <= budget:
            with contextlib.suppress(TimeoutError, _Disconnected):
                await asyncio.wait_for(self._discard(receive, budget), DRAIN_TIMEOUT_S)
        await response(scope, receive, send)

    @staticmethod
    async def _discard(receive: Receive, budget: int) -> None:
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                raise _Disconnected
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    def _too_large(self, declared: int | None) -> Response:
        got = f" ({declared} bytes)" if declared is not None else ""
        return error_response(413, f"request body too large{got}: the limit is control.max_body_bytes = "
                                   f"{self.max_body_bytes} bytes", field="body",
                              headers={"Connection": "close"})

    def _count(self, path: str, status: int) -> None:
        endpoint = "/static" if path.startswith(STATIC_PREFIX) else path
        count_request(self.metrics, endpoint if endpoint in KNOWN_PATHS else "other", str(status))


def is_tokenless(path: str) -> bool:
    """The live page and its static files: no data in them, and a browser opening a page sends no header."""
    return path == PAGE_PATH or path.startswith(STATIC_PREFIX)


def _query_token(scope: Scope) -> bytes | None:
    """The one `token` query parameter, percent-decoded to the bytes the client meant; None if absent or
    given more than once."""
    query = (scope.get("query_string") or b"").decode("latin-1")
    values = [v for k, v in parse_qsl(query, keep_blank_values=True, encoding="latin-1")
              if k == EVENTS_TOKEN_PARAM]
    return values[0].encode("latin-1") if len(values) == 1 else None


def count_request(metrics: Metrics, endpoint: str, status: str) -> None:
    counter = getattr(metrics, "control_requests", None)  # optional: see docs/control-api.md
    if counter is not None:
        with contextlib.suppress(Exception):
            counter.labels(endpoint=endpoint, status=status).inc()


def _unsupported(problem: str) -> Response:
    return error_response(
        415, f"Content-Type: {problem}: send JSON with Content-Type: application/json (a web page on any site "
             f"may post {', '.join(BROWSER_FORM_TYPES)} or an untyped body, so they are refused)",
        field="Content-Type")


# --------------------------------------------------------------------------------------- app
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _finite(data: Any) -> Any:
    """NaN/inf (e.g. the dBFS of digital silence) are not JSON: they become null."""
    if isinstance(data, float | np.floating):
        return float(data) if math.isfinite(data) else None
    if isinstance(data, dict):
        return {str(k): _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple | set | frozenset):
        return [_finite(v) for v in data]
    return data


def _json(data: Any, status_code: int = 200) -> Response:
    body = json.dumps(_finite(data), default=_json_default, ensure_ascii=False).encode("utf-8", "backslashreplace")
    return Response(body, status_code=status_code, media_type="application/json")


# ------------------------------------------------------------------------------ event stream
def max_event_streams(max_connections: int) -> int:
    """GET /events streams served at once: MAX_SUBSCRIBERS, and at most half the requests-in-progress
    slots, so streams alone can never make every other request wait for a slot (503)."""
    return max(1, min(MAX_SUBSCRIBERS, (max_connections - HEALTH_RESERVED_CONNECTIONS) // 2))


def sse_frame(event: Event) -> bytes:
    """One Server-Sent Event: `id: <seq>`, `event: <kind>`, `data: <one line of JSON>`, blank line."""
    try:
        data = event.json()
    except (TypeError, ValueError):  # something not JSON-able nested in a field: still one event
        data = json.dumps(_finite(event.as_dict()), default=_json_default, ensure_ascii=False)
    kind = "".join(ch for ch in event.kind if ch not in "\r\n")
    return f"id: {event.seq}\nevent: {kind}\ndata: {data}\n\n".encode("utf-8", "backslashreplace")


class EventStreamResponse(Response):
    """text/event-stream from one Subscription until the client goes away or the subscription is closed
    (ControlServer.stop). Pure ASGI: it watches for the client's disconnect itself, whatever the Starlette
    version, and closes the subscription on every way out."""

    media_type = "text/event-stream"

    def __init__(self, sub: Subscription, on_close: Callable[[Subscription], None]) -> None:
        # Response.__init__ is not called: it would add `content-length: 0`.
        self.status_code = 200
        self.background = None
        self.sub, self._on_close = sub, on_close
        self.init_headers({"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.ensure_future(self._stream(send))
        gone = asyncio.ensure_future(self._disconnected(receive))
        try:
            done, _ = await asyncio.wait({stream, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.sub.close()
            self._on_close(self.sub)
            for task in (stream, gone):
                task.cancel()
            await asyncio.gather(stream, gone, return_exceptions=True)
        if stream in done and not stream.cancelled():
            error = stream.exception()
            if error is not None and not isinstance(error, OSError):  # a send after the client left: OSError
                raise error

    @staticmethod
    async def _disconnected(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def _stream(self, send: Send) -> None:
        sub = self.sub
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": f"retry: {SSE_RETRY_MS}\n: connected\n\n".encode(),
                    "more_body": True})
        while True:
            event = await sub.get(timeout=SSE_KEEPALIVE_S)
            if event is None:
                if sub.closed:
                    break
                await send({"type": "http.response.body", "body": b": keep-alive\n\n", "more_body": True})
                continue
            body = b"".join(sse_frame(e) for e in (event, *sub.pending()))  # what piled up: one write
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _read_page(name: str) -> bytes:
    try:
        return (PAGE_DIR / name).read_bytes()
    except OSError as exc:  # a broken install: the API still works, the page says what is missing
        log.warning("control API: live page %s missing (%s); reinstall echo-relay", name, exc.strerror)
        return (f"<!doctype html><title>echo-relay</title><p>The live page is not installed ({name} is missing "
                "from pipeline/control/page/): reinstall echo-relay.</p>").encode()


def decode_pcm(audio: str, sample_rate: int, max_audio_s: float) -> np.ndarray:
    """Base64 of raw s16le mono PCM -> int16 array. Raises FieldError naming properties.audio."""
    field = "properties.audio"
    compact = "".join(audio.split())  # `base64` wraps lines at 76 characters
    if not compact:
        raise FieldError(field, 'required when modality is "audio" (base64 of s16le mono PCM)',
                         type_="missing")
    approx_s = len(compact) * 3 / 4 / 2 / sample_rate
    if approx_s > max_audio_s + 1.0:
        raise FieldError(field, f"audio is about {approx_s:.1f} s long, over control.max_audio_s "
                                f"({max_audio_s:g} s)", type_="too_long")
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64", type_="base64_invalid") from None
    if not raw:
        raise FieldError(field, "empty audio", type_="empty")
    if raw[:4] == b"RIFF" and raw[8:12] == b"WAVE":
        raise FieldError(field, "looks like a WAV file: send raw s16le mono PCM without a header",
                         type_="pcm_invalid")
    if len(raw) % 2:
        raise FieldError(field, f"{len(raw)} bytes: 16-bit PCM needs an even number of bytes",
                         type_="pcm_invalid")
    duration = len(raw) / 2 / sample_rate
    if duration > max_audio_s:
        raise FieldError(field, f"audio is {duration:.1f} s long, over control.max_audio_s "
                                f"({max_audio_s:g} s)", type_="too_long")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing/wrong bearer token (when control.token is set)."},
    403: {"model": ErrorResponse, "description": "Origin (or Sec-Fetch-Site) of a page on another site; see "
                                                 "control.cors_origins."},
    421: {"model": ErrorResponse, "description": "Host header is not a name of this server (DNS rebinding "
                                                 "guard); see control.allowed_hosts."},
    429: {"model": ErrorResponse, "description": "Rate limit exceeded (per client IP); see Retry-After."},
    503: {"model": ErrorResponse, "description": "Too many requests in progress (control.max_connections), or "
                                                 "the relay's delivery queue is full; see Retry-After."},
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON."},
    413: {"model": ErrorResponse, "description": "Body over control.max_body_bytes."},
    415: {"model": ErrorResponse, "description": "A body that is not JSON, or has no Content-Type (it must be "
                                                 "application/json)."},
    422: {"model": ErrorResponse, "description": "A field is missing or invalid (also: text over "
                                                 "control.max_text_chars, strings with lone surrogates or "
                                                 "control characters); `field` names it."},
}


def create_app(handle: RelayHandle, metrics: Metrics, settings: Settings) -> FastAPI:
    """The FastAPI application (without the guard; `start_control_server` adds it)."""
    ctl = settings.control
    app = FastAPI(
        title="echo-relay control API",
        version="1",
        description="Local control API of echo-relay. `POST /send_text_message` accepts the body of Tavus's "
                    "echo-mode quickstart. With control.token set, every endpoint but /healthz, the live page "
                    "(/) and its /static/ files needs `Authorization: Bearer <token>` (GET /events also takes "
                    "it as `?token=`).",
        docs_url=None,  # served below with local Swagger UI files: the default loads them from a CDN
        redoc_url=None,  # ReDoc would come from a CDN too: not served
    )
    streams: set[Subscription] = set()  # open GET /events streams (ControlServer.stop closes them)
    app.state.event_streams = streams
    stream_limit = max_event_streams(ctl.max_connections)
    page_html = _read_page("index.html")

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
        status, items = _validation_items(exc, request)
        first = items[0]
        return error_response(status, f"{first['field']}: {first['message']}", first["field"], items)

    @app.exception_handler(FieldError)
    async def _on_field_error(request: Request, exc: FieldError) -> Response:
        return error_response(exc.status_code, str(exc), exc.field,
                              [{"field": exc.field, "message": exc.message, "type": exc.type}])

    @app.exception_handler(QueueFull)
    async def _on_queue_full(request: Request, exc: QueueFull) -> Response:
        log.warning("control API: %s; request refused with 503", exc)
        return error_response(503, f"relay busy: {exc}; retry later", headers={"Retry-After": "1"})

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> Response:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8, or nested too deep)
            message = "cannot be decoded as JSON (send UTF-8 encoded JSON nested at most a few hundred levels)"
            return error_response(400, f"body: {message}", "body",
                                  [{"field": "body", "message": message, "type": "json_invalid"}], headers)
        return error_response(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(Exception)
    async def _on_error(request: Request, exc: Exception) -> Response:
        log.error("control API: unexpected error on %s %s: %s: %s", request.method, request.url.path,
                  type(exc).__name__, exc, exc_info=exc)
        return error_response(500, "internal error (see the relay's log)")

    @app.post("/send_text_message", response_model=SendResponse, responses={**_ERRORS, **_BODY_ERRORS},
              summary="Make the persona speak text or audio (Tavus echo quickstart body)")
    async def send_text_message(body: EchoRequest) -> SendResponse:
        """Queue a `conversation.echo` for the room.

        modality "text": the text goes through the transform chain (unless
        transform.through_control_api is false) and is split under the message size limit.
        modality "audio": base64 s16le mono PCM at sample_rate, resampled to sink.audio_sample_rate
        and cut into chunks under the message size limit, closed by a silent done=true chunk.
        """
        p = body.properties
        done = True if p.done is None else p.done
        through_transforms = settings.transform.through_control_api
        if p.modality == "text":
            if p.text is None:
                raise FieldError("properties.text", 'required when modality is "text"', type_="missing")
            limit, setting = ctl.max_text_chars, "control.max_text_chars"
            # Text the transform chain would drop as too long (pipeline/transform/chain.py) is refused here
            # instead, naming that setting: a 200 followed by a drop would be a silent loss to the caller.
            chain_limit = getattr(settings.transform, "max_text_chars", None)
            if through_transforms and isinstance(chain_limit, int) and chain_limit < limit:
                limit, setting = chain_limit, "transform.max_text_chars"
            if len(p.text) > limit:
                raise FieldError("properties.text", f"{len(p.text)} characters, over {setting} ({limit})",
                                 type_="too_long")
            if not p.text.strip():
                raise FieldError("properties.text", "must not be blank")
            ids = await handle.submit_text(p.text, inference_id=p.inference_id, done=done,
                                           through_transforms=through_transforms)
        else:
            if p.audio is None:
                raise FieldError("properties.audio", 'required when modality is "audio" (base64 of s16le '
                                                     "mono PCM)", type_="missing")
            rate = p.sample_rate or DEFAULT_SAMPLE_RATE
            pcm = decode_pcm(p.audio, rate, ctl.max_audio_s)
            ids = await handle.submit_audio(pcm, rate, inference_id=p.inference_id, done=done)
        ids = [str(i) for i in ids]
        message = "queued for delivery" if ids else "dropped by the transform chain (nothing sent)"
        log.debug("control API: %s echo %s (%s)", p.modality, ids, message)
        return SendResponse(message=message, modality=p.modality, inference_ids=ids)

    @app.post("/interrupt", response_model=InterruptResponse,
              responses={**_ERRORS, 415: _BODY_ERRORS[415], 413: _BODY_ERRORS[413]},
              summary="Stop the persona mid-speech (conversation.interrupt)")
    async def interrupt() -> InterruptResponse:
        """Send `conversation.interrupt` to the room right away (not queued behind pending echoes).
        Echoes queued or in progress are dropped first: they would start the replica again.

        No body is needed. A body, if any, is ignored but must be sent as application/json: a form or
        text/plain POST (which any web page can send) gets 415."""
        outcome = await handle.interrupt()
        return InterruptResponse(sent=outcome.sent, dropped_echoes=outcome.dropped, detail=outcome.detail)

    @app.get("/status", responses=_ERRORS, summary="Relay state",
             response_description="Room state, conversation id, model, queue depths, counters, recent "
                                  "utterances (free-form JSON object from the relay)")
    async def status() -> Response:
        return _json(handle.status())

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness (no token needed)")
    async def healthz() -> HealthResponse:
        """200 whenever the relay's event loop is running (this endpoint is served by it)."""
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse,
             responses={**_ERRORS, 503: {"model": ReadyResponse, "description": "Not ready: see `checks`."}},
             summary="Readiness: model loaded and sink ready")
    async def readyz() -> Response:
        checks = {str(k): bool(v) for k, v in handle.readiness().items()}
        ready = all(checks.values())
        return _json(ReadyResponse(ready=ready, checks=checks).model_dump(), 200 if ready else 503)

    @app.get("/metrics", responses={**_ERRORS, 200: {"content": {PROMETHEUS_CONTENT_TYPE: {}},
                                                     "description": "Prometheus text exposition format"}},
             response_class=Response, summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get(EVENTS_PATH, response_class=Response, summary="Live event stream (Server-Sent Events)",
             responses={**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                         "description": "`id: <seq>`, `event: <kind>`, `data: <JSON>` per event; "
                                                        "a `: keep-alive` comment after 15 s without one"},
                        503: {"model": ErrorResponse, "description": "Too many event streams (or requests) "
                                                                     "already open; see Retry-After."}})
    async def event_stream(
        partial: bool = Query(False, description="Also make interim decodes while the person speaks (`partial` "
                                                 "events). They share the ASR's thread with the decodes that end "
                                                 "an utterance, so they add latency; the live page asks for them."),
        token: str | None = Query(None, description="The control token, for clients that cannot send "
                                                    "Authorization (a browser's EventSource). URL-encode it."),
    ) -> Response:
        """What the relay hears, decides and sends, as it happens (pipeline/events.py; docs/control-api.md
        "GET /events" lists every kind and field). Events are not replayed: a client that reconnects
        (EventSource does, with Last-Event-ID) gets those from then on, and one that reads too slowly
        loses the oldest (a gap in `seq`). With control.token set, send it as `Authorization: Bearer`
        or, from a browser's EventSource, as `?token=<token>`."""
        del token  # checked by _Guard, in constant time, before this runs
        if len(streams) >= stream_limit:
            return error_response(503, f"too many event streams: {len(streams)} open (at most {stream_limit} "
                                       "with this control.max_connections); retry later",
                                  headers={"Retry-After": "5"})
        try:
            sub = handle.events.subscribe(partial=partial)
        except TooManySubscribers as exc:
            return error_response(503, f"{exc}; retry later", headers={"Retry-After": "5"})
        streams.add(sub)
        return EventStreamResponse(sub, streams.discard)

    @app.get(PAGE_PATH, response_class=HTMLResponse, summary="Live view (HTML page; no token needed)",
             responses={k: v for k, v in _ERRORS.items() if k != 401})
    async def live_page() -> Response:
        """A self-contained page following GET /events: transcript, input level, latency, queues, drops,
        room state and an Interrupt button. With control.token set, open it as `/#token=<token>` (the
        fragment never leaves the browser) or type the token into the page."""
        return Response(page_html, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> Response:
        page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI",
                                   swagger_js_url=SWAGGER_JS, swagger_css_url=SWAGGER_CSS,
                                   swagger_favicon_url=FAVICON, oauth2_redirect_url="/docs/oauth2-redirect")
        page.headers.update(PAGE_HEADERS)
        return page

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> Response:
        return get_swagger_ui_oauth2_redirect_html()

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
    return app


# ------------------------------------------------------------------------------------ server
class _EmbeddedServer(uvicorn.Server):
    """uvicorn.Server that leaves signal handling to the relay.

    uvicorn >= 0.29 wraps serve() in `capture_signals()`, which replaces the SIGINT/SIGTERM handlers
    (also those set with loop.add_signal_handler) and re-raises captured signals on exit; older
    versions call `install_signal_handlers()`. Both are disabled here.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    def install_signal_handlers(self) -> None:
        return None


class _ConnectionLimits:
    """The open connections of one server, control.max_connections and control.header_timeout_s.

    At the limit a new connection closes the longest-idle one (no request in progress: idle keep-alive,
    or a request head still arriving): idle or half-open sockets can then never lock a probe out, and a
    client whose idle connection was closed simply opens another. Requests in progress are bounded by
    _Guard (max_connections - HEALTH_RESERVED_CONNECTIONS), so an idle one normally exists; if none does,
    the new connection gets 503 and is closed. Every close or refusal is counted in control_requests
    (endpoint "connection") and logged at most once per OVERLOAD_LOG_EVERY_S.
    """

    def __init__(self, max_connections: int, header_timeout_s: float, metrics: Metrics) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.metrics = metrics
        self.open: dict[_GuardedH11Protocol, None] = {}  # insertion-ordered set
        self.closed: dict[str, int] = {}  # why -> connections closed or refused, for the log line
        self._logged_at = -math.inf

    def admit(self, conn: _GuardedH11Protocol) -> bool:
        if len(self.open) >= self.max_connections:
            idle = [c for c in self.open if not c.busy]
            if not idle:
                self.note("503", "refused: every connection has a request in progress")
                return False
            victim = min(idle, key=lambda c: c.idle_since)
            del self.open[victim]
            self.note("evicted", "closed the longest-idle connection to make room")
            victim.close_quietly()
        self.open[conn] = None
        return True

    def release(self, conn: _GuardedH11Protocol) -> None:
        self.open.pop(conn, None)

    def note(self, status: str, what: str) -> None:
        count_request(self.metrics, CONNECTION_ENDPOINT, status)
        self.closed[status] = self.closed.get(status, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= OVERLOAD_LOG_EVERY_S:
            self._logged_at = now
            log.warning("control API: %s (control.max_connections = %d, control.header_timeout_s = %g); "
                        "so far: %s", what, self.max_connections, self.header_timeout_s,
                        ", ".join(f"{k} {v}" for k, v in sorted(self.closed.items())))
        else:
            log.debug("control API connection: %s", what)


def _raw_error(status: int, error: str, field: str | None, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response, for connections that never reached h11's request cycle."""
    body = json_bytes(error_body(error, field, [{"field": field, "message": error.removeprefix(f"{field}: "),
                                                 "type": HTTPStatus(status).name.lower()}] if field else None))
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a request-head deadline and a place in _ConnectionLimits.

    uvicorn's keep-alive timer (control.keep_alive_s) only runs after a response and stops at the first
    byte of the next request, and h11 has no header timeout: a fresh connection that sends nothing, or a
    request head sent a byte at a time, stayed open forever. Here the whole request line and headers must
    arrive within control.header_timeout_s of the connection's start or of its previous response (bytes
    arriving do not extend it); else the connection gets 408 (if part of a head came) and is closed.
    """

    limits: _ConnectionLimits  # set per server by _protocol_class()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        if not self.limits.admit(self):
            transport.write(_raw_error(
                503, f"server busy: control.max_connections ({self.limits.max_connections}) connections all "
                     "have a request in progress; retry later", None, {"retry-after": "1"}))
            transport.close()
            return
        self._arm_head_timer()

    @property
    def busy(self) -> bool:
        """A request head arrived and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.busy:
            self._cancel_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        if not self.busy and not self.transport.is_closing():
            self.idle_since = time.monotonic()
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self.limits.release(self)
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed, or a head over MAX_HEAD_BYTES): JSON like every other error."""
        count_request(self.limits.metrics, CONNECTION_ENDPOINT, "400")
        error = (f"request: {msg.rstrip('.').lower()} (malformed, or request line and headers over "
                 f"{MAX_HEAD_BYTES} bytes)")
        self.transport.write(_raw_error(400, error, "request"))
        self.transport.close()

    def close_quietly(self) -> None:
        """Close an idle connection (limits.admit made room); a partly received head is dropped."""
        self._cancel_head_timer()
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._on_head_timeout)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)  # None before connection_made ran
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _on_head_timeout(self) -> None:
        self._head_timer = None
        if self.busy or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request head is waiting in h11's buffer
            self.limits.note("408", "closed a connection whose request head did not arrive in time")
            self.transport.write(_raw_error(
                408, f"request: request line and headers not received within control.header_timeout_s "
                     f"({self.limits.header_timeout_s:g} s)", "request"))
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def _protocol_class(limits: _ConnectionLimits) -> type[_GuardedH11Protocol]:
    """A protocol class bound to one server's limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"limits": limits})


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind(host: str, port: int) -> socket.socket:
    where = _hostport(host, port)
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ControlServerError(f"cannot listen on {where}: {exc.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does; not SO_REUSEPORT
        sock.bind(addr)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        reason = "address in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ControlServerError(f"cannot listen on {where}: {reason}") from None
    return sock


class ControlServer:
    """A running control API. `port` is the actual port (also when 0 was asked)."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], app: FastAPI, host: str,
                 port: int) -> None:
        self._server, self._task, self.app = server, task, app
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{_hostport(self.host, self.port)}"

    @property
    def page_url(self) -> str:
        """The live page; a wildcard bind (0.0.0.0, ::) is reached on loopback."""
        host = self.host
        with contextlib.suppress(ValueError):
            ip = ipaddress.ip_address(host.strip("[]"))
            if ip.is_unspecified:
                host = "::1" if ip.version == 6 else "127.0.0.1"
        return f"http://{_hostport(host, self.port)}/"

    @property
    def running(self) -> bool:
        return not self._task.done()

    async def stop(self, timeout_s: float = SHUTDOWN_GRACE_S + 3.0) -> None:
        """Stop accepting connections, let in-flight requests finish (SHUTDOWN_GRACE_S), close."""
        if self._task.done():
            return
        for sub in list(getattr(self.app.state, "event_streams", ())):
            sub.close()  # each GET /events stream ends its response: nothing holds the graceful shutdown
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)
        except TimeoutError:
            log.warning("control API did not stop within %.1fs; cancelling it", timeout_s)
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        except Exception as exc:  # the server task failed: already logged by its done callback
            log.debug("control API task ended with %s", exc)
        log.info("control API stopped")


def _on_task_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("control API server failed: %s", task.exception())


async def start_control_server(handle: RelayHandle, metrics: Metrics, settings: Settings) -> ControlServer:
    """Serve the control API in the current event loop; return once it is listening.

    Raises ControlServerError (one line) when the port cannot be bound or a non-loopback host has
    no control.token.
    """
    ctl = settings.control
    token = ctl.token.get_secret_value() if ctl.token is not None else None
    if not is_loopback(ctl.host) and not token:
        raise ControlServerError(f"refusing to serve the control API on {ctl.host} without control.token")
    app = create_app(handle, metrics, settings)
    browser = BrowserPolicy.from_settings(ctl.host, ctl.allowed_hosts, ctl.cors_origins)
    inner: ASGIApp = app
    if browser.cors_origins:  # CORS stays closed unless control.cors_origins names pages
        inner = CORSMiddleware(app, allow_origins=sorted(origin_text(o) for o in browser.cors_origins),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                               max_age=CORS_MAX_AGE_S)
    guarded = _Guard(inner, token=token, max_body_bytes=ctl.max_body_bytes,
                     limiter=RateLimiter(ctl.rate_limit_per_s), metrics=metrics, browser=browser,
                     max_in_flight=ctl.max_connections - HEALTH_RESERVED_CONNECTIONS)
    limits = _ConnectionLimits(ctl.max_connections, ctl.header_timeout_s, metrics)
    sock = _bind(ctl.host, ctl.port)
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        guarded, host=ctl.host, port=port, http=_protocol_class(limits), ws="none", lifespan="off",
        log_config=None, access_log=False, proxy_headers=False, server_header=False,
        timeout_keep_alive=ctl.keep_alive_s, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    server = _EmbeddedServer(config)
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]), name="control-api")
    task.add_done_callback(_on_task_done)
    while not server.started:
        if task.done():
            sock.close()
            exc = None if task.cancelled() else task.exception()
            raise ControlServerError(f"cannot listen on {_hostport(ctl.host, port)}: "
                                     f"{exc or 'the server stopped during start-up'}")
        await asyncio.sleep(0.005)
    control = ControlServer(server, task, app, ctl.host, port)
    log.info("control API on %s%s; live view: %s", control.url, " (bearer token required)" if token else "",
             control.page_url)
    return control
