"""The local control API: FastAPI served by uvicorn inside the relay's own event loop.

`start_control_server(handle, metrics, settings)` binds the socket itself (so a taken port becomes a
one-line `ControlServerError` instead of uvicorn's `sys.exit`), runs `uvicorn.Server.serve()` as a
task of the current loop, with uvicorn's signal handling disabled (the relay owns SIGINT/SIGTERM),
and returns once the server is listening. `ControlServer.stop()` shuts it down gracefully.

Every request first goes through `_Guard` (pure ASGI): per-client rate limit (token bucket),
bearer token, and the body size limit (Content-Length and the bytes actually received). Endpoints
are documented in docs/control-api.md and in the OpenAPI schema (/openapi.json, /docs).
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
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

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
from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

# The text format produced by prometheus_client.generate_latest (Metrics.render).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPEN_PATHS = frozenset({"/healthz"})  # no token, no rate limit: liveness probes must always get through
KNOWN_PATHS = frozenset({"/send_text_message", "/interrupt", "/status", "/healthz", "/readyz", "/metrics",
                         "/openapi.json", "/docs", "/docs/oauth2-redirect"})
SHUTDOWN_GRACE_S = 2  # in-flight requests get this long on stop()
MAX_CONCURRENT_CONNECTIONS = 128  # beyond this uvicorn answers 503 at once
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


def error_response(status_code: int, error: str, field: str | None = None,
                   items: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(error, field, items), status_code=status_code, headers=headers)


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


# ------------------------------------------------------------------------------------- guard
class _BodyTooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class _Guard:
    """Pure ASGI middleware: rate limit -> bearer token -> body size limit (buffered, then replayed)."""

    def __init__(self, app: ASGIApp, *, token: str | None, max_body_bytes: int, limiter: RateLimiter,
                 metrics: Metrics) -> None:
        self.app = app
        self.token = token.encode("utf-8") if token else None
        self.max_body_bytes = max_body_bytes
        self.limiter = limiter
        self.metrics = metrics

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
        if path not in OPEN_PATHS:
            client = scope.get("client")
            wait = self.limiter.take(client[0] if client else "unknown")
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await self._refuse(scope, receive, send, declared, error_response(
                    429, f"rate limit exceeded (control.rate_limit_per_s = {self.limiter.rate:g}); "
                         f"retry after {retry} s", headers={"Retry-After": str(retry)}))
                return
            if self.token is not None and not self._authorized(scope):
                await self._refuse(scope, receive, send, declared, error_response(
                    401, "missing or invalid bearer token (send Authorization: Bearer <token>)",
                    field="Authorization", headers={"WWW-Authenticate": 'Bearer realm="echo-relay"'}))
                return
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

    def _authorized(self, scope: Scope) -> bool:
        assert self.token is not None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                scheme, _, credentials = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(credentials.strip(), self.token)
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
        counter = getattr(self.metrics, "control_requests", None)  # optional: see docs/control-api.md
        if counter is not None:
            with contextlib.suppress(Exception):
                counter.labels(endpoint=path if path in KNOWN_PATHS else "other", status=str(status)).inc()


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
    body = json.dumps(_finite(data), default=_json_default, ensure_ascii=False).encode("utf-8")
    return Response(body, status_code=status_code, media_type="application/json")


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
    429: {"model": ErrorResponse, "description": "Rate limit exceeded (per client IP); see Retry-After."},
}
_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON."},
    413: {"model": ErrorResponse, "description": "Body over control.max_body_bytes."},
    415: {"model": ErrorResponse, "description": "Body is not JSON (Content-Type must be application/json)."},
    422: {"model": ErrorResponse, "description": "A field is missing or invalid; `field` names it."},
    503: {"model": ErrorResponse, "description": "The relay's delivery queue is full; retry later."},
}


def create_app(handle: RelayHandle, metrics: Metrics, settings: Settings) -> FastAPI:
    """The FastAPI application (without the guard; `start_control_server` adds it)."""
    ctl = settings.control
    app = FastAPI(
        title="echo-relay control API",
        version="1",
        description="Local control API of echo-relay. `POST /send_text_message` accepts the body of Tavus's "
                    "echo-mode quickstart. With control.token set, every endpoint but /healthz needs "
                    "`Authorization: Bearer <token>`.",
    )

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
        if exc.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            message = "cannot be decoded as JSON (send UTF-8 encoded JSON)"
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
        if p.modality == "text":
            if p.text is None:
                raise FieldError("properties.text", 'required when modality is "text"', type_="missing")
            if not p.text.strip():
                raise FieldError("properties.text", "must not be blank")
            ids = await handle.submit_text(p.text, inference_id=p.inference_id, done=done,
                                           through_transforms=settings.transform.through_control_api)
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

    @app.post("/interrupt", response_model=InterruptResponse, responses=_ERRORS,
              summary="Stop the persona mid-speech (conversation.interrupt)")
    async def interrupt() -> InterruptResponse:
        """Send `conversation.interrupt` to the room right away (not queued behind pending echoes).
        Echoes queued or in progress are dropped first: they would start the replica again."""
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
    def running(self) -> bool:
        return not self._task.done()

    async def stop(self, timeout_s: float = SHUTDOWN_GRACE_S + 3.0) -> None:
        """Stop accepting connections, let in-flight requests finish (SHUTDOWN_GRACE_S), close."""
        if self._task.done():
            return
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
    guarded = _Guard(app, token=token, max_body_bytes=ctl.max_body_bytes,
                     limiter=RateLimiter(ctl.rate_limit_per_s), metrics=metrics)
    sock = _bind(ctl.host, ctl.port)
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        guarded, host=ctl.host, port=port, http="h11", ws="none", lifespan="off",
        log_config=None, access_log=False, proxy_headers=False, server_header=False,
        limit_concurrency=MAX_CONCURRENT_CONNECTIONS, timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
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
    log.info("control API on %s%s", control.url, " (bearer token required)" if token else "")
    return control
