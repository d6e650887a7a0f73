"""What stands between the network and the control API's endpoints (docs/control-api.md, "Browsers,
DNS rebinding and connection floods").

- `Guard` (pure ASGI, every request): the Host header (DNS rebinding), the Origin (cross-site pages),
  per-client rate limit (`RateLimiter`, a token bucket), bearer token, the Content-Type of POSTs (bodies
  a browser may send from any page without asking), the number of requests in progress, and the body
  size limit (Content-Length and the bytes actually received).
- `GuardedH11Protocol` (every connection, below uvicorn's HTTP handling): the request head must arrive
  within control.header_timeout_s, and at control.max_connections the longest-idle connection makes
  room for a new one (`ConnectionLimits`), so /healthz always gets in.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

import h11
from fastapi.responses import Response
from uvicorn.protocols.http.h11_impl import H11Protocol

from pipeline.control.errors import error_body, error_response, json_bytes, shown
from pipeline.metrics import ControlMetrics

log = logging.getLogger(__name__)

# /healthz has no token, rate limit, Host or Origin check and needs no request slot: liveness probes
# (which may send any Host, e.g. the pod IP or a service name) must always get through, and it
# answers nothing but "ok" and changes nothing, so a hostile page learns nothing it could not by timing.
OPEN_PATHS = frozenset({"/healthz"})
RELAY_PREFIX = "/v1/relays"  # `serve`: /v1/relays/{id}/... are one relay's endpoints
_RELAY_PATH = re.compile(r"^/v1/relays/[^/]+(/[^/]*)?$")
KNOWN_PATHS = frozenset({"/send_text_message", "/interrupt", "/status", "/healthz", "/readyz", "/metrics",
                         "/openapi.json", "/docs", "/docs/oauth2-redirect", "/", "/events", "/static",
                         RELAY_PREFIX, RELAY_PREFIX + "/{id}",
                         *(RELAY_PREFIX + "/{id}" + p for p in ("/send_text_message", "/interrupt", "/status",
                                                                "/events"))})
# The live page and its static files need no token (they hold no data, and a browser cannot send a header
# when it opens a page); they still get the Host, Origin and rate checks. The page asks for the token.
PAGE_PATH = "/"
STATIC_PREFIX = "/static/"
EVENTS_PATH = "/events"
EVENTS_TOKEN_PARAM = "token"  # GET /events?token=...: EventSource (the page) cannot send Authorization


# Connections of control.max_connections kept for /healthz: the other endpoints together may have at
# most max_connections - this many requests in progress, so some connection is always idle and can
# be closed to let a probe in (ConnectionLimits).
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
            421, f"Host: {shown(values[0])} is not a name of this server (a web page reached through its own "
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
                        403, f"Sec-Fetch-Site: {shown(site)} without an Origin: cross-site requests are refused",
                        field="Sec-Fetch-Site")
            return None
        key = origin_key(values[0].decode("latin-1")) if len(values) == 1 else None
        if key is not None and (key in self.cors_origins or self._same_origin(key, scope)):
            return None
        return error_response(
            403, f"Origin: {shown(values[-1])} may not use the control API (cross-site request guard): only "
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


class Guard:
    """Pure ASGI middleware: Host -> Origin -> rate limit -> bearer token -> Content-Type of POSTs ->
    requests in progress -> body size limit (buffered, then replayed). /healthz skips all but the body."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, limiter: RateLimiter,
                 metrics: ControlMetrics, browser: BrowserPolicy, max_in_flight: int) -> None:
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
        head_bytes = request_head_bytes(scope)
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
            also = f", or ?{EVENTS_TOKEN_PARAM}=<token> in the URL" if is_events_path(path) else ""
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
                return _unsupported(f"{shown(value)} is not accepted")
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
        if is_events_path(path):
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
        endpoint = endpoint_of(path)
        count_request(self.metrics, endpoint if endpoint in KNOWN_PATHS else "other", str(status))


def request_head_bytes(scope: Scope) -> int:
    """The size of the request line and headers as they came in: `METHOD SP target SP HTTP/x.y CRLF`, where
    the target is the path *with* its query string (a 100 KB query was served when only the path counted,
    issue 27), each `name: value CRLF`, and the blank line."""
    query = scope.get("query_string") or b""
    target = len(scope.get("raw_path") or scope.get("path", "").encode("utf-8")) + (1 + len(query) if query else 0)
    line = len(str(scope.get("method", ""))) + 1 + target + 1 + len(f"HTTP/{scope.get('http_version', '1.1')}") + 2
    return line + sum(len(k) + len(v) + 4 for k, v in scope.get("headers") or []) + 2


def endpoint_of(path: str) -> str:
    """A request path as a bounded metric label: relay ids become {id}, static files /static."""
    if path.startswith(STATIC_PREFIX):
        return "/static"
    match = _RELAY_PATH.match(path)
    return f"{RELAY_PREFIX}/{{id}}{match.group(1) or ''}" if match else path


def is_events_path(path: str) -> bool:
    """GET /events (`run`) or GET /v1/relays/{id}/events (`serve`): these also take ?token=."""
    return endpoint_of(path) in (EVENTS_PATH, f"{RELAY_PREFIX}/{{id}}{EVENTS_PATH}")


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


def count_request(metrics: ControlMetrics, endpoint: str, status: str) -> None:
    counter = getattr(metrics, "control_requests", None)  # optional: see docs/control-api.md
    if counter is not None:
        with contextlib.suppress(Exception):
            counter.labels(endpoint=endpoint, status=status).inc()


def _unsupported(problem: str) -> Response:
    return error_response(
        415, f"Content-Type: {problem}: send JSON with Content-Type: application/json (a web page on any site "
             f"may post {', '.join(BROWSER_FORM_TYPES)} or an untyped body, so they are refused)",
        field="Content-Type")


class ConnectionLimits:
    """The open connections of one server, control.max_connections and control.header_timeout_s.

    At the limit a new connection closes the longest-idle one (no request in progress: idle keep-alive,
    or a request head still arriving): idle or half-open sockets can then never lock a probe out, and a
    client whose idle connection was closed simply opens another. Requests in progress are bounded by
    Guard (max_connections - HEALTH_RESERVED_CONNECTIONS), so an idle one normally exists; if none does,
    the new connection gets 503 and is closed. Every close or refusal is counted in control_requests
    (endpoint "connection") and logged at most once per OVERLOAD_LOG_EVERY_S.
    """

    def __init__(self, max_connections: int, header_timeout_s: float, metrics: ControlMetrics) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.metrics = metrics
        self.open: dict[GuardedH11Protocol, None] = {}  # insertion-ordered set
        self.closed: dict[str, int] = {}  # why -> connections closed or refused, for the log line
        self._logged_at = -math.inf

    def admit(self, conn: GuardedH11Protocol) -> bool:
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

    def release(self, conn: GuardedH11Protocol) -> None:
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


def raw_error(status: int, error: str, field: str | None, headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 error response, for connections that never reached h11's request cycle."""
    body = json_bytes(error_body(error, field, [{"field": field, "message": error.removeprefix(f"{field}: "),
                                                 "type": HTTPStatus(status).name.lower()}] if field else None))
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", "content-type: application/json",
             f"content-length: {len(body)}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a request-head deadline and a place in ConnectionLimits.

    uvicorn's keep-alive timer (control.keep_alive_s) only runs after a response and stops at the first
    byte of the next request, and h11 has no header timeout: a fresh connection that sends nothing, or a
    request head sent a byte at a time, stayed open forever. Here the whole request line and headers must
    arrive within control.header_timeout_s of the connection's start or of its previous response (bytes
    arriving do not extend it); else the connection gets 408 (if part of a head came) and is closed.
    """

    limits: ConnectionLimits  # set per server by protocol_class()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.idle_since = time.monotonic()
        self._head_timer: asyncio.TimerHandle | None = None
        if not self.limits.admit(self):
            transport.write(raw_error(
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
        self.transport.write(raw_error(400, error, "request"))
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
            self.transport.write(raw_error(
                408, f"request: request line and headers not received within control.header_timeout_s "
                     f"({self.limits.header_timeout_s:g} s)", "request"))
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def protocol_class(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class bound to one server's limits (uvicorn instantiates it per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"limits": limits})
