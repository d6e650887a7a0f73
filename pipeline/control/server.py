"""The local control API: FastAPI served by uvicorn inside the relay's own event loop.

`start_control_server(handle, metrics, settings)` binds the socket itself (so a taken port becomes a
one-line `ControlServerError` instead of uvicorn's `sys.exit`), runs `uvicorn.Server.serve()` as a
task of the current loop, with uvicorn's signal handling disabled (the relay owns SIGINT/SIGTERM),
and returns once the server is listening. `ControlServer.stop()` shuts it down gracefully.

Every request first goes through the guard (pipeline/control/guard.py: Host, Origin, rate limit, token,
Content-Type, requests in progress, body size), and every connection through its h11 protocol (head
timeout, connection limit); refusals share one error body (pipeline/control/errors.py). Endpoints and
limits are documented in docs/control-api.md and in the OpenAPI schema (/openapi.json, /docs).

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
import ipaddress
import json
import logging
import math
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi import Path as FastApiPath
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.staticfiles import StaticFiles

from pipeline.config import Settings
from pipeline.control.api import QueueFull, RelayHandle, RelayPoolHandle, RelayRequest, RelayRequestError
from pipeline.control.descriptors import ACCEPT_BACKLOG, DescriptorLimitError, GuardedListener, fit_connections
from pipeline.control.errors import FieldError, error_response, validation_items
from pipeline.control.guard import (
    CORS_MAX_AGE_S,
    EVENTS_PATH,
    HEALTH_RESERVED_CONNECTIONS,
    MAX_HEAD_BYTES,
    PAGE_PATH,
    ASGIApp,
    BrowserPolicy,
    ConnectionLimits,
    Guard,
    RateLimiter,
    Receive,
    Scope,
    Send,
    origin_text,
    protocol_class,
)
from pipeline.control.models import (
    DEFAULT_SAMPLE_RATE,
    CreateRelayRequest,
    EchoRequest,
    ErrorResponse,
    HealthResponse,
    InterruptResponse,
    ReadyResponse,
    RelayCreated,
    RelayInfo,
    RelayList,
    SendResponse,
)
from pipeline.events import MAX_SUBSCRIBERS, Event, Subscription, TooManySubscribers
from pipeline.metrics import ControlMetrics, Metrics

log = logging.getLogger(__name__)

# The text format produced by prometheus_client.generate_latest (Metrics.render).
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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
CAPACITY_RETRY_S = 5  # Retry-After of a 503 at capacity (serve)


class ControlServerError(Exception):
    """The control API cannot be served (port in use, public bind without a token). One line."""


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


RelayDependency = Callable[..., RelayHandle]


def _new_app(settings: Settings, description: str) -> FastAPI:
    """A FastAPI application with the control API's error handling (every error is an ErrorResponse)."""
    app = FastAPI(
        title="echo-relay control API",
        version="1",
        description=description,
        docs_url=None,  # served below with local Swagger UI files: the default loads them from a CDN
        redoc_url=None,  # ReDoc would come from a CDN too: not served
    )
    streams: set[Subscription] = set()  # open event streams (ControlServer.stop closes them)
    app.state.event_streams = streams

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> Response:
        status, items = validation_items(exc, request)
        first = items[0]
        return error_response(status, f"{first['field']}: {first['message']}", first["field"], items)

    @app.exception_handler(FieldError)
    async def _on_field_error(request: Request, exc: FieldError) -> Response:
        return error_response(exc.status_code, str(exc), exc.field,
                              [{"field": exc.field, "message": exc.message, "type": exc.type}])

    @app.exception_handler(RelayRequestError)
    async def _on_relay_request(request: Request, exc: RelayRequestError) -> Response:
        headers = {"Retry-After": str(CAPACITY_RETRY_S)} if exc.status == 503 else None
        items = [{"field": exc.field, "message": exc.message, "type": "value_error"}] if exc.field else []
        return error_response(exc.status, str(exc), exc.field, items, headers)

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

    return app


def _relay_routes(app: FastAPI, settings: Settings, handle_of: RelayDependency, live_handle_of: RelayDependency
                  ) -> APIRouter:
    """The endpoints of one relay: at the root for `run`, under /v1/relays/{relay_id} for `serve`.
    `handle_of` finds the relay; `live_handle_of` also requires that it still takes messages."""
    ctl = settings.control
    router = APIRouter()
    any_relay, live_relay = Depends(handle_of), Depends(live_handle_of)  # FastAPI dependencies (defaults below)
    streams: set[Subscription] = app.state.event_streams
    stream_limit = max_event_streams(ctl.max_connections)

    @router.post("/send_text_message", response_model=SendResponse, responses={**_ERRORS, **_BODY_ERRORS},
                 summary="Make the persona speak text or audio (Tavus echo quickstart body)")
    async def send_text_message(body: EchoRequest, handle: Any = live_relay) -> SendResponse:
        """Queue a `conversation.echo` for the room.

        modality "text": the text goes through the transform chain (unless
        transform.through_control_api is false) and is split under the message size limit.
        modality "audio": base64 s16le mono PCM at sample_rate, resampled to sink.audio_sample_rate
        and cut into chunks under the message size limit, closed by a silent done=true chunk.
        """
        relay_settings: Settings = getattr(handle, "settings", settings)  # serve: the relay's own overrides
        p = body.properties
        done = True if p.done is None else p.done
        through_transforms = relay_settings.transform.through_control_api
        if p.modality == "text":
            if p.text is None:
                raise FieldError("properties.text", 'required when modality is "text"', type_="missing")
            limit, setting = ctl.max_text_chars, "control.max_text_chars"
            # Text the transform chain would drop as too long (pipeline/transform/chain.py) is refused here
            # instead, naming that setting: a 200 followed by a drop would be a silent loss to the caller.
            chain_limit = getattr(relay_settings.transform, "max_text_chars", None)
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

    @router.post("/interrupt", response_model=InterruptResponse,
                 responses={**_ERRORS, 415: _BODY_ERRORS[415], 413: _BODY_ERRORS[413]},
                 summary="Stop the persona mid-speech (conversation.interrupt)")
    async def interrupt(handle: Any = live_relay) -> InterruptResponse:
        """Send `conversation.interrupt` to the room right away (not queued behind pending echoes).
        Echoes queued or in progress are dropped first: they would start the replica again.

        No body is needed. A body, if any, is ignored but must be sent as application/json: a form or
        text/plain POST (which any web page can send) gets 415."""
        outcome = await handle.interrupt()
        return InterruptResponse(sent=outcome.sent, dropped_echoes=outcome.dropped, detail=outcome.detail)

    @router.get("/status", responses=_ERRORS, summary="Relay state",
                response_description="Room state, conversation id, model, queue depths, counters, latency, "
                                     "recent utterances (free-form JSON object from the relay)")
    async def status(handle: Any = any_relay) -> Response:
        return _json(handle.status())

    @router.get(EVENTS_PATH, response_class=Response, summary="Live event stream (Server-Sent Events)",
                responses={**_ERRORS, 200: {"content": {"text/event-stream": {}},
                                            "description": "`id: <seq>`, `event: <kind>`, `data: <JSON>` per event; "
                                                           "a `: keep-alive` comment after 15 s without one"},
                           503: {"model": ErrorResponse, "description": "Too many event streams (or requests) "
                                                                        "already open; see Retry-After."}})
    async def event_stream(
        handle: Any = any_relay,
        partial: bool = Query(False, description="Also make interim decodes while the person speaks (`partial` "
                                                 "events). They share the ASR engine and the CPU with the decodes "
                                                 "that end an utterance, so they add latency; the live page asks for "
                                                 "them."),
        token: str | None = Query(None, description="The control token, for clients that cannot send "
                                                    "Authorization (a browser's EventSource). URL-encode it."),
    ) -> Response:
        """What the relay hears, decides and sends, as it happens (pipeline/events.py; docs/control-api.md
        "GET /events" lists every kind and field). Events are not replayed: a client that reconnects
        (EventSource does, with Last-Event-ID) gets those from then on, and one that reads too slowly
        loses the oldest (a gap in `seq`). With control.token set, send it as `Authorization: Bearer`
        or, from a browser's EventSource, as `?token=<token>`."""
        del token  # checked by Guard, in constant time, before this runs
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

    return router


def _process_routes(app: FastAPI, readiness: Callable[[], Mapping[str, bool]], render: Callable[[], bytes],
                    *, page: bool) -> None:
    """Liveness, readiness, metrics, the documentation and (for `run`) the live page."""

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness (no token needed)")
    async def healthz() -> HealthResponse:
        """200 whenever the process's event loop is running (this endpoint is served by it)."""
        return HealthResponse()

    @app.get("/readyz", response_model=ReadyResponse,
             responses={**_ERRORS, 503: {"model": ReadyResponse, "description": "Not ready: see `checks`."}},
             summary="Readiness: every check true")
    async def readyz() -> Response:
        checks = {str(k): bool(v) for k, v in readiness().items()}
        ready = all(checks.values())
        return _json(ReadyResponse(ready=ready, checks=checks).model_dump(), 200 if ready else 503)

    @app.get("/metrics", responses={**_ERRORS, 200: {"content": {PROMETHEUS_CONTENT_TYPE: {}},
                                                     "description": "Prometheus text exposition format"}},
             response_class=Response, summary="Prometheus metrics")
    async def prometheus_metrics() -> Response:
        return Response(render(), media_type=PROMETHEUS_CONTENT_TYPE)

    if page:
        page_html = _read_page("index.html")

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


def create_app(handle: RelayHandle, metrics: Metrics, settings: Settings) -> FastAPI:
    """`run`'s application: one relay (without the guard; `start_control_server` adds it)."""
    app = _new_app(settings, "Local control API of echo-relay. `POST /send_text_message` accepts the body of Tavus's "
                             "echo-mode quickstart. With control.token set, every endpoint but /healthz, the live "
                             "page (/) and its /static/ files needs `Authorization: Bearer <token>` (GET /events also "
                             "takes it as `?token=`).")

    def the_relay() -> RelayHandle:
        return handle

    app.include_router(_relay_routes(app, settings, the_relay, the_relay))
    _process_routes(app, handle.readiness, metrics.render, page=True)
    return app


def create_serve_app(pool: RelayPoolHandle, settings: Settings) -> FastAPI:
    """`serve`'s application: relays created, listed and deleted under /v1/relays, each with the
    endpoints of `run` under /v1/relays/{relay_id}/."""
    app = _new_app(settings, "Control API of `echo-relay serve`: many relays in one process, one ASR model. "
                             "`POST /v1/relays` starts a relay (a source and a sink, or a Tavus conversation); "
                             "each relay has the endpoints of `echo-relay run` under /v1/relays/{relay_id}/. "
                             "With control.token set, every endpoint but /healthz needs `Authorization: Bearer "
                             "<token>`.")
    relay_id_param = FastApiPath(description="The relay's id (from POST /v1/relays).", max_length=64)

    def relay_of(relay_id: str = relay_id_param) -> RelayHandle:
        return pool.get(relay_id).relay

    def live_relay_of(relay_id: str = relay_id_param) -> RelayHandle:
        managed = pool.get(relay_id)
        if not managed.phase.takes_messages:
            raise FieldError("relay_id", f"relay {relay_id} is {managed.phase.value}: it takes no more messages",
                             status_code=409, type_="relay_" + managed.phase.value)
        return managed.relay

    @app.post("/v1/relays", status_code=201, response_model=RelayCreated, tags=["relays"],
              responses={**_ERRORS, **_BODY_ERRORS, 503: {"model": ErrorResponse, "description": (
                  "At capacity (serve.max_relays relays running; /readyz is 503 too) or shutting down: send the "
                  "conversation to another instance. See Retry-After.")}},
              summary="Start a relay")
    async def create_relay(body: CreateRelayRequest) -> RelayCreated:
        """Start a relay with its own source, sink and configuration overrides, or a Tavus shortcut
        (`conversation_url` joins a conversation, `persona_id` creates one). The relay starts in the
        background: it is `starting` until its sink is ready (a Daily room joined), then `running`;
        GET /v1/relays/{relay_id} follows it, and says why when it `failed`."""
        managed = await pool.create(RelayRequest(source=body.source, sink=body.sink, config=body.config,
                                                 conversation_url=body.conversation_url,
                                                 persona_id=body.persona_id))
        return RelayCreated(id=managed.id, phase=managed.phase.value)

    @app.get("/v1/relays", response_model=RelayList, responses=_ERRORS, tags=["relays"], summary="List relays")
    async def list_relays() -> RelayList:
        """Every relay: running ones, and ended or failed ones for serve.keep_ended_s."""
        relays = [RelayInfo.model_validate(m.describe()) for m in pool.list()]
        return RelayList(relays=relays, active=pool.active, max_relays=settings.serve.max_relays)

    @app.get("/v1/relays/{relay_id}", responses=_ERRORS, tags=["relays"], summary="One relay",
             response_description="RelayInfo fields, plus room, ended and the relay's full status")
    async def get_relay(relay_id: str = relay_id_param) -> Response:
        return _json(pool.get(relay_id).describe(detail=True))

    @app.delete("/v1/relays/{relay_id}", response_model=RelayInfo, responses=_ERRORS, tags=["relays"],
                summary="Stop a relay and return its final state")
    async def delete_relay(relay_id: str = relay_id_param) -> RelayInfo:
        """Capture stops; what the person already said is delivered (until the relay's
        sink.drain_timeout_s); the relay leaves its room, ends a conversation it created, and is
        forgotten. The answer is its final state and ledger."""
        return RelayInfo.model_validate(await pool.delete(relay_id))

    app.include_router(_relay_routes(app, settings, relay_of, live_relay_of), prefix="/v1/relays/{relay_id}",
                       tags=["one relay"])
    _process_routes(app, pool.readiness, pool.metrics.render, page=False)
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


async def start_control_server(handle: RelayHandle | None, metrics: ControlMetrics, settings: Settings, *,
                               app: FastAPI | None = None) -> ControlServer:
    """Serve the control API in the current event loop (`run`'s for `handle`, or `app`); return once it
    is listening.

    Raises ControlServerError (one line) when the port cannot be bound or a non-loopback host has
    no control.token.
    """
    ctl = settings.control
    token = ctl.token.get_secret_value() if ctl.token is not None else None
    if not is_loopback(ctl.host) and not token:
        raise ControlServerError(f"refusing to serve the control API on {ctl.host} without control.token")
    if app is None:
        assert handle is not None and isinstance(metrics, Metrics)
        app = create_app(handle, metrics, settings)
    browser = BrowserPolicy.from_settings(ctl.host, ctl.allowed_hosts, ctl.cors_origins)
    inner: ASGIApp = app
    if browser.cors_origins:  # CORS stays closed unless control.cors_origins names pages
        inner = CORSMiddleware(app, allow_origins=sorted(origin_text(o) for o in browser.cors_origins),
                               allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"],
                               max_age=CORS_MAX_AGE_S)
    guarded = Guard(inner, token=token, max_body_bytes=ctl.max_body_bytes,
                     limiter=RateLimiter(ctl.rate_limit_per_s), metrics=metrics, browser=browser,
                     max_in_flight=ctl.max_connections - HEALTH_RESERVED_CONNECTIONS)
    try:  # issue 27: the connections must fit under the open-file limit (pipeline/control/descriptors.py)
        max_connections = fit_connections(ctl.max_connections).max_connections
    except DescriptorLimitError as too_few:
        raise ControlServerError(str(too_few)) from None
    guarded.max_in_flight = max_connections - HEALTH_RESERVED_CONNECTIONS
    limits = ConnectionLimits(max_connections, ctl.header_timeout_s, metrics)
    sock = GuardedListener.wrap(_bind(ctl.host, ctl.port), metrics)
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        guarded, host=ctl.host, port=port, http=protocol_class(limits), ws="none", lifespan="off",
        log_config=None, access_log=False, proxy_headers=False, server_header=False,
        timeout_keep_alive=ctl.keep_alive_s, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, backlog=ACCEPT_BACKLOG,
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
