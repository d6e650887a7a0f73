"""A local fake of the Tavus REST API v2: a real HTTP server (FastAPI + uvicorn) on 127.0.0.1.

It implements what echo-relay uses, as Tavus's API v2 reference (https://docs.tavus.io/api-reference)
documents it:

    POST   /v2/personas                 create (200: persona_id, persona_name, created_at)
    GET    /v2/personas                 list  ({"data": [...], "total_count": N}; limit, page, persona_type)
    GET    /v2/personas/{id}            one persona (flat object; `persona_get_shape="wrapped"` gives
                                        the spec's {"data": [obj]})
    DELETE /v2/personas/{id}            204
    POST   /v2/conversations            create (200: conversation_id, conversation_name,
                                        conversation_url, status, callback_url, persona_id,
                                        replica_id, created_at, meeting_token with require_auth)
    GET    /v2/conversations            list  (limit, page, status=active|ended)
    GET    /v2/conversations/{id}       one conversation (`?verbose=true` adds `events`)
    POST   /v2/conversations/{id}/end   200 with an empty body; the conversation becomes `ended`
    DELETE /v2/conversations/{id}       204

Auth: every request needs `x-api-key` equal to the server's key, else 401
`{"message": "Invalid access token"}` (the documented body). Bad bodies get 400 `{"error": ...}`
(documented shape), e.g. "Invalid persona_id" for an unknown persona on conversation create and
"Invalid replica_uuid" for an unknown replica. Unknown ids get `unknown_id_status` (404 by default;
400 is the documented alternative) with `{"error": "Invalid conversation_id"}` / `"Invalid persona_id"`.
Wording not found in the docs (marked "invented" below) is this fake's own.

Undocumented behaviour, configurable so tests can cover either answer:
- `end_ended="error"` (default): ending an already-ended conversation answers 400
  `{"error": "Conversation has already ended"}` (invented wording); `"ok"` answers 200 again.
- `require_replica=True`: a conversation needs `replica_id` or a persona with `default_replica_id`
  (400 otherwise, invented wording). `replicas=None` accepts any replica id.
- Conversation URLs are `{room_base_url}/{conversation_id}` (`https://tavus.daily.co/c123...`), so
  a fake Daily can treat the last path segment as the room name.

Test API (thread-safe; the server runs in a background thread with its own event loop):

    with FakeTavusServer(api_key="test") as server:          # or server.start() / server.stop()
        server.url                                            # "http://127.0.0.1:<port>"
        server.inject("POST /v2/conversations", status=503, retry_after=1, times=2)
        server.inject(r"/v2/personas/.*", delay_s=2.0)        # slow answer, then normal handling
        server.requests                                       # [RecordedRequest(method, path, ...)]
        server.count("POST /v2/conversations")                # requests seen by an endpoint
        server.conversation(cid)["status"] == "ended"         # ended by the client?
        server.end_calls(cid)                                 # how many POST .../end it received

Faults match a path regex (full match), optionally preceded by a method ("GET /v2/personas/.*"),
are tried in the order injected, and each is used `times` times (None = forever). A fault with a
status answers it (body defaults to a Tavus-shaped error); a fault with only `delay_s` delays the
request and then handles it normally. Recorded headers carry `x-api-key: ***` (the key is never
stored); `api_key_ok` says whether it matched.

Manual trials:

    python -m pipeline.testing.fake_tavus --port 8765 --api-key test
    TAVUS_API_URL=http://127.0.0.1:8765 TAVUS_API_KEY=test echo-relay tavus personas list
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import re
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pipeline.langcodes import MULTILINGUAL, NAMES

FAKE_REPLICA_ID = "r0fake0000a1"
"""A replica id the fake knows by default (pass `replicas=` to change the set)."""

_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
_PERSONA_FIELDS: dict[str, type | tuple[type, ...]] = {
    "persona_name": str, "pipeline_mode": str, "system_prompt": str, "context": str,
    "default_replica_id": str, "document_ids": list, "document_tags": list, "layers": dict,
}
_CONVERSATION_FIELDS: dict[str, type | tuple[type, ...]] = {
    "persona_id": str, "replica_id": str, "audio_only": bool, "callback_url": str,
    "conversation_name": str, "conversational_context": str, "custom_greeting": str,
    "memory_stores": list, "document_ids": list, "document_retrieval_strategy": str,
    "document_tags": list, "test_mode": bool, "require_auth": bool, "max_participants": int,
    "properties": dict,
}
_PROPERTY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "max_call_duration": int, "participant_left_timeout": int, "participant_absent_timeout": int,
    "enable_recording": bool, "enable_closed_captions": bool, "apply_greenscreen": bool,
    "language": str, "recording_s3_bucket_name": str, "recording_s3_bucket_region": str,
    "aws_assume_role_arn": str,
}


# properties.language values (shared/reference B.4: a language's full name, or `multilingual`). Tavus names
# about thirty; the fake accepts the English names of Whisper's languages (pipeline/langcodes.py).
TAVUS_LANGUAGES = frozenset({*NAMES.values(), MULTILINGUAL})


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class RecordedRequest:
    """One request as the fake received it (the API key replaced by `***`)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    body_text: str
    api_key_ok: bool
    at: float = field(default_factory=time.monotonic)


@dataclass
class Fault:
    """An injected answer (see `FakeTavusServer.inject`). `hits` counts the times it was used."""

    method: str | None
    pattern: re.Pattern[str]
    status: int | None
    body: Any
    retry_after: float | str | None
    delay_s: float
    remaining: int | None
    headers: dict[str, str]
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        return self.pattern.fullmatch(path) is not None


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class FakeTavusServer:
    """The fake Tavus API in a background thread. See the module docstring."""

    def __init__(self, api_key: str = "test", *, host: str = "127.0.0.1", port: int = 0,
                 replicas: list[str] | tuple[str, ...] | None = (FAKE_REPLICA_ID,),
                 require_replica: bool = True,
                 persona_get_shape: Literal["flat", "wrapped"] = "flat",
                 end_ended: Literal["error", "ok"] = "error",
                 unknown_id_status: int = 404,
                 room_base_url: str = "https://tavus.daily.co") -> None:
        self.api_key = api_key
        self.host = host
        self._port = port
        self.replicas = None if replicas is None else set(replicas)
        self.require_replica = require_replica
        self.persona_get_shape = persona_get_shape
        self.end_ended = end_ended
        self.unknown_id_status = unknown_id_status
        self.room_base_url = room_base_url.rstrip("/")
        self._lock = threading.RLock()
        self._personas: dict[str, dict[str, Any]] = {}
        self._conversations: dict[str, dict[str, Any]] = {}
        self._deleted_conversations: dict[str, dict[str, Any]] = {}
        self._end_calls: Counter[str] = Counter()
        self._requests: list[RecordedRequest] = []
        self._faults: list[Fault] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("FakeTavusServer is not started")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL to use as TAVUS_API_URL (no trailing slash)."""
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> FakeTavusServer:
        if self._thread is not None:
            raise RuntimeError("FakeTavusServer already started")
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listening socket says so, and without it every answer waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._port))
        sock.listen(128)
        self._socket = sock
        config = uvicorn.Config(self.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", loop="asyncio", http="h11",
                                timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"fake-tavus:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("FakeTavusServer failed to start")
            if time.monotonic() > deadline:
                raise RuntimeError("FakeTavusServer did not start in time")
            time.sleep(0.005)
        return self

    def _run(self) -> None:
        assert self._server is not None and self._socket is not None

        async def serve() -> None:
            self._loop = asyncio.get_running_loop()
            self._stopping = asyncio.Event()
            assert self._server is not None and self._socket is not None
            await self._server.serve(sockets=[self._socket])

        asyncio.run(serve())

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._server is None or self._thread is None:
            return
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)  # wake delayed handlers
        self._server.should_exit = True
        self._thread.join(timeout_s)
        if self._socket is not None:
            self._socket.close()
        self._thread = None
        self._server = None

    def __enter__(self) -> FakeTavusServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget personas, conversations, recorded requests and faults (keeps the server running)."""
        with self._lock:
            self._personas.clear()
            self._conversations.clear()
            self._deleted_conversations.clear()
            self._end_calls.clear()
            self._requests.clear()
            self._faults.clear()

    # -------------------------------------------------------------------------- test helpers
    def inject(self, match: str, *, method: str | None = None, status: int | None = None, body: Any = None,
               retry_after: float | str | None = None, delay_s: float = 0.0, times: int | None = 1,
               headers: dict[str, str] | None = None) -> Fault:
        """Answer the next `times` matching requests with `status`/`body` (after `delay_s`).

        `match` is a path regex (full match) optionally preceded by a method: "POST /v2/conversations".
        `status=None` with `delay_s` only slows the request down. `body` may be a dict/list (JSON),
        str or bytes; by default a Tavus-shaped error (`{"message": "Invalid access token"}` for
        401, `{"error": "<reason>"}` otherwise). `retry_after` sets the Retry-After header.
        """
        parts = match.split(None, 1)
        if len(parts) == 2 and parts[0].upper() in _METHODS:
            method, match = parts[0], parts[1]
        fault = Fault(method=method.upper() if method else None, pattern=re.compile(match), status=status,
                      body=body, retry_after=retry_after, delay_s=float(delay_s), remaining=times,
                      headers=dict(headers or {}))
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, match: str | None = None, *, method: str | None = None) -> int:
        """Requests received whose path fully matches `match` (optionally "METHOD /path-regex")."""
        if match is not None:
            parts = match.split(None, 1)
            if len(parts) == 2 and parts[0].upper() in _METHODS:
                method, match = parts[0], parts[1]
        pattern = re.compile(match) if match is not None else None
        return sum(1 for r in self.requests
                   if (method is None or r.method == method.upper())
                   and (pattern is None or pattern.fullmatch(r.path)))

    @property
    def counts(self) -> Counter[str]:
        """Requests per "METHOD /path"."""
        return Counter(f"{r.method} {r.path}" for r in self.requests)

    @property
    def personas(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._personas)

    @property
    def conversations(self) -> dict[str, dict[str, Any]]:
        """Live (not deleted) conversations by id; each records `status`, `ended_at`, `ended_by`."""
        with self._lock:
            return copy.deepcopy(self._conversations)

    @property
    def deleted_conversations(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self._deleted_conversations)

    def conversation(self, conversation_id: str) -> dict[str, Any]:
        """A conversation by id, deleted ones included (`deleted: True`). KeyError if unknown."""
        with self._lock:
            conv = self._conversations.get(conversation_id) or self._deleted_conversations[conversation_id]
            return copy.deepcopy(conv)

    def end_calls(self, conversation_id: str) -> int:
        """How many `POST /v2/conversations/{id}/end` the server received for this id."""
        with self._lock:
            return self._end_calls[conversation_id]

    def add_persona(self, persona_name: str = "echo-relay", **fields: Any) -> dict[str, Any]:
        """Create a persona directly (no HTTP). Returns its full stored object."""
        with self._lock:
            return copy.deepcopy(self._new_persona({"persona_name": persona_name, "pipeline_mode": "echo",
                                                    **fields}))

    def add_conversation(self, persona_id: str, **fields: Any) -> dict[str, Any]:
        """Create a conversation directly (no HTTP, no validation). Returns its stored object."""
        with self._lock:
            return copy.deepcopy(self._new_conversation({"persona_id": persona_id, **fields}))

    def expire_conversation(self, conversation_id: str, reason: str = "max_call_duration reached") -> None:
        """End a conversation server-side, as Tavus does on timeouts."""
        with self._lock:
            self._mark_ended(self._conversations[conversation_id], by="server", reason=reason)

    # -------------------------------------------------------------------------------- model
    def _new_persona(self, body: dict[str, Any]) -> dict[str, Any]:
        pid = "p" + secrets.token_hex(5)
        now = _now_iso()
        persona = {
            "persona_id": pid,
            "persona_name": body.get("persona_name") or "New Persona",
            "pipeline_mode": body.get("pipeline_mode") or "full",
            "system_prompt": body.get("system_prompt"),
            "context": body.get("context"),
            "default_replica_id": body.get("default_replica_id"),
            "document_ids": body.get("document_ids") or [],
            "document_tags": body.get("document_tags") or [],
            "layers": body.get("layers") or {},
            "persona_type": "user",
            "created_at": now,
            "updated_at": now,
        }
        self._personas[pid] = persona
        return persona

    def _new_conversation(self, body: dict[str, Any]) -> dict[str, Any]:
        cid = "c" + secrets.token_hex(6)
        now = _now_iso()
        persona = self._personas.get(body.get("persona_id") or "")
        replica = body.get("replica_id") or (persona or {}).get("default_replica_id")
        test_mode = bool(body.get("test_mode"))
        conv: dict[str, Any] = {
            "conversation_id": cid,
            "conversation_name": body.get("conversation_name") or "New Conversation",
            "conversation_url": f"{self.room_base_url}/{cid}",
            "status": "ended" if test_mode else "active",
            "callback_url": body.get("callback_url"),
            "replica_id": replica,
            "persona_id": body.get("persona_id"),
            "created_at": now,
            "updated_at": now,
            # Fake-only bookkeeping (not in Tavus's answers): see _public_conversation.
            "test_mode": test_mode,
            "require_auth": bool(body.get("require_auth")),
            "properties": dict(body.get("properties") or {}),
            "request": copy.deepcopy(body),
            "ended_at": now if test_mode else None,
            "ended_by": "test_mode" if test_mode else None,
            "shutdown_reason": "test_mode" if test_mode else None,
            "deleted": False,
        }
        if conv["require_auth"]:
            conv["meeting_token"] = "fake-meeting-token-" + secrets.token_urlsafe(16)
        self._conversations[cid] = conv
        return conv

    @staticmethod
    def _mark_ended(conv: dict[str, Any], *, by: str, reason: str) -> None:
        if conv["status"] == "ended":
            return
        conv["status"] = "ended"
        conv["ended_at"] = conv["updated_at"] = _now_iso()
        conv["ended_by"] = by
        conv["shutdown_reason"] = reason

    @staticmethod
    def _public_conversation(conv: dict[str, Any], *, created: bool = False,
                             verbose: bool = False) -> dict[str, Any]:
        keys = ["conversation_id", "conversation_name", "conversation_url", "status", "callback_url",
                "replica_id", "persona_id", "created_at"]
        if not created:
            keys.append("updated_at")
        out = {k: conv.get(k) for k in keys}
        if created and conv.get("meeting_token"):
            out["meeting_token"] = conv["meeting_token"]
        if verbose:
            events: list[dict[str, Any]] = []
            if conv["status"] == "ended":
                events.append({"event_type": "system.shutdown", "message_type": "system",
                               "timestamp": conv.get("ended_at"),
                               "properties": {"shutdown_reason": conv.get("shutdown_reason")}})
            out["events"] = events
        return out

    # ---------------------------------------------------------------------------------- HTTP
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="fake Tavus API", openapi_url=None, docs_url=None, redoc_url=None)
        s = self

        @app.post("/v2/personas")
        async def create_persona(request: Request) -> Response:
            return await s._handle(request, s._create_persona)

        @app.get("/v2/personas")
        async def list_personas(request: Request) -> Response:
            return await s._handle(request, s._list_personas)

        @app.get("/v2/personas/{persona_id}")
        async def get_persona(request: Request, persona_id: str) -> Response:
            return await s._handle(request, s._get_persona, persona_id)

        @app.delete("/v2/personas/{persona_id}")
        async def delete_persona(request: Request, persona_id: str) -> Response:
            return await s._handle(request, s._delete_persona, persona_id)

        @app.post("/v2/conversations")
        async def create_conversation(request: Request) -> Response:
            return await s._handle(request, s._create_conversation)

        @app.get("/v2/conversations")
        async def list_conversations(request: Request) -> Response:
            return await s._handle(request, s._list_conversations)

        @app.get("/v2/conversations/{conversation_id}")
        async def get_conversation(request: Request, conversation_id: str) -> Response:
            return await s._handle(request, s._get_conversation, conversation_id)

        @app.post("/v2/conversations/{conversation_id}/end")
        async def end_conversation(request: Request, conversation_id: str) -> Response:
            return await s._handle(request, s._end_conversation, conversation_id)

        @app.delete("/v2/conversations/{conversation_id}")
        async def delete_conversation(request: Request, conversation_id: str) -> Response:
            return await s._handle(request, s._delete_conversation, conversation_id)

        @app.api_route("/{rest:path}", methods=list(_METHODS))
        async def unknown(request: Request, rest: str) -> Response:
            return await s._handle(request, s._unknown_route)

        return app

    async def _handle(self, request: Request, handler: Any, *args: Any) -> Response:
        raw = await request.body()
        text = raw.decode("utf-8", "replace")
        parsed: Any = None
        bad_json = False
        if raw.strip():
            try:
                parsed = json.loads(text)
            except ValueError:
                bad_json = True
        key = request.headers.get("x-api-key")
        key_ok = key is not None and secrets.compare_digest(key.encode(), self.api_key.encode())
        headers = {k.lower(): ("***" if k.lower() == "x-api-key" else v) for k, v in request.headers.items()}
        method, path = request.method.upper(), request.url.path
        with self._lock:
            self._requests.append(RecordedRequest(method=method, path=path, query=dict(request.query_params),
                                                  headers=headers, json=parsed, body_text=text,
                                                  api_key_ok=key_ok))
            fault = next((f for f in self._faults if f.matches(method, path)), None)
            if fault is not None:
                fault.hits += 1
                if fault.remaining is not None:
                    fault.remaining -= 1
        if fault is not None:
            if fault.delay_s > 0:
                await self._sleep(fault.delay_s)
            if fault.status is not None:
                return self._fault_response(fault)
        if not key_ok:
            return JSONResponse({"message": "Invalid access token"}, status_code=401)
        if bad_json:
            return JSONResponse({"error": "Invalid request body: not valid JSON"}, status_code=400)
        try:
            with self._lock:
                result: Response = handler(request, parsed, *args)
                return result
        except _BadRequest as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def _sleep(self, seconds: float) -> None:
        stopping = self._stopping
        if stopping is None:
            await asyncio.sleep(seconds)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)

    @staticmethod
    def _fault_response(fault: Fault) -> Response:
        status = int(fault.status or 500)
        headers = dict(fault.headers)
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        body = fault.body
        if body is None:
            if status == 401:
                body = {"message": "Invalid access token"}
            else:
                try:
                    body = {"error": HTTPStatus(status).phrase}
                except ValueError:
                    body = {"error": f"status {status}"}
        if isinstance(body, (dict, list)):
            return JSONResponse(body, status_code=status, headers=headers)
        if isinstance(body, str):
            body = body.encode()
        return Response(content=body, status_code=status, headers=headers,
                        media_type=headers.get("Content-Type", "text/plain"))

    # ---------------------------------------------------------------------------- handlers
    def _unknown(self, what: str) -> _BadRequest:
        return _BadRequest(f"Invalid {what}", self.unknown_id_status)

    @staticmethod
    def _check_types(body: dict[str, Any], fields: dict[str, type | tuple[type, ...]],
                     where: str = "") -> None:
        for name, expected in fields.items():
            value = body.get(name)
            if value is None:
                continue
            # bool is an int subclass: reject True for integer fields, accept only real bools for bool.
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise _BadRequest(f"{where}{name} must be an integer")
            if expected is bool and not isinstance(value, bool):
                raise _BadRequest(f"{where}{name} must be a boolean")
            if not isinstance(value, expected):
                kind = getattr(expected, "__name__", str(expected))
                raise _BadRequest(f"{where}{name} must be of type {kind}")

    def _check_replica(self, replica_id: str | None) -> None:
        if replica_id is not None and self.replicas is not None and replica_id not in self.replicas:
            raise _BadRequest("Invalid replica_uuid")

    @staticmethod
    def _page(items: list[dict[str, Any]], query: Any) -> dict[str, Any]:
        try:
            limit = int(query.get("limit", 10))
            page = int(query.get("page", 1))
        except ValueError:
            raise _BadRequest("limit and page must be integers") from None
        if limit < 1 or page < 1:
            raise _BadRequest("limit and page must be positive")
        start = (page - 1) * limit
        return {"data": items[start:start + limit], "total_count": len(items)}

    def _create_persona(self, request: Request, body: Any) -> Response:
        if not isinstance(body, dict):
            raise _BadRequest("Invalid request body: expected a JSON object")
        self._check_types(body, _PERSONA_FIELDS)
        mode = body.get("pipeline_mode") or "full"
        if mode not in ("full", "echo"):
            raise _BadRequest("pipeline_mode must be one of: full, echo")
        if mode != "echo" and not body.get("system_prompt"):
            raise _BadRequest("system_prompt is required unless pipeline_mode is echo")  # invented wording
        self._check_replica(body.get("default_replica_id"))
        persona = self._new_persona(body)
        return JSONResponse({k: persona[k] for k in ("persona_id", "persona_name", "created_at")})

    def _list_personas(self, request: Request, body: Any) -> Response:
        ptype = request.query_params.get("persona_type")
        if ptype not in (None, "user", "system"):
            raise _BadRequest("persona_type must be user or system")
        items = [copy.deepcopy(p) for p in reversed(self._personas.values())
                 if ptype is None or p["persona_type"] == ptype]
        return JSONResponse(self._page(items, request.query_params))

    def _get_persona(self, request: Request, body: Any, persona_id: str) -> Response:
        persona = self._personas.get(persona_id)
        if persona is None:
            raise self._unknown("persona_id")
        if self.persona_get_shape == "wrapped":
            return JSONResponse({"data": [copy.deepcopy(persona)]})
        return JSONResponse(copy.deepcopy(persona))

    def _delete_persona(self, request: Request, body: Any, persona_id: str) -> Response:
        if self._personas.pop(persona_id, None) is None:
            raise self._unknown("persona_id")
        return Response(status_code=204)

    def _create_conversation(self, request: Request, body: Any) -> Response:
        if not isinstance(body, dict):
            raise _BadRequest("Invalid request body: expected a JSON object")
        self._check_types(body, _CONVERSATION_FIELDS)
        self._check_types(body.get("properties") or {}, _PROPERTY_FIELDS, "properties.")
        persona_id = body.get("persona_id")
        persona = None
        if persona_id is not None:
            persona = self._personas.get(persona_id)
            if persona is None:
                raise _BadRequest("Invalid persona_id")
        replica_id = body.get("replica_id")
        self._check_replica(replica_id)
        if self.require_replica and not replica_id and not (persona or {}).get("default_replica_id"):
            raise _BadRequest("replica_id is required when the persona has no default replica")  # invented
        for name in ("max_call_duration",):
            value = (body.get("properties") or {}).get(name)
            if value is not None and value < 1:
                raise _BadRequest(f"properties.{name} must be positive")
        language = (body.get("properties") or {}).get("language")
        if language is not None and language not in TAVUS_LANGUAGES:
            # Invented wording; the reference (B.4) says a full name or `multilingual`: a code such as "es" is
            # refused here so the relay's mapping is checked.
            raise _BadRequest(f"Invalid language {language!r}: expected a full language name or 'multilingual'")
        conv = self._new_conversation(body)
        return JSONResponse(self._public_conversation(conv, created=True))

    def _list_conversations(self, request: Request, body: Any) -> Response:
        status = request.query_params.get("status")
        if status not in (None, "active", "ended"):
            raise _BadRequest("status must be active or ended")
        items = [self._public_conversation(c) for c in reversed(self._conversations.values())
                 if status is None or c["status"] == status]
        return JSONResponse(self._page(items, request.query_params))

    def _get_conversation(self, request: Request, body: Any, conversation_id: str) -> Response:
        conv = self._conversations.get(conversation_id)
        if conv is None:
            raise self._unknown("conversation_id")
        verbose = request.query_params.get("verbose", "").lower() == "true"
        return JSONResponse(self._public_conversation(conv, verbose=verbose))

    def _end_conversation(self, request: Request, body: Any, conversation_id: str) -> Response:
        self._end_calls[conversation_id] += 1
        conv = self._conversations.get(conversation_id)
        if conv is None:
            raise self._unknown("conversation_id")
        if conv["status"] == "ended" and self.end_ended == "error":
            raise _BadRequest("Conversation has already ended")  # invented wording
        self._mark_ended(conv, by="api", reason="ended via API")
        return Response(status_code=200)

    def _delete_conversation(self, request: Request, body: Any, conversation_id: str) -> Response:
        conv = self._conversations.pop(conversation_id, None)
        if conv is None:
            raise self._unknown("conversation_id")
        self._mark_ended(conv, by="delete", reason="deleted via API")
        conv["deleted"] = True
        self._deleted_conversations[conversation_id] = conv
        return Response(status_code=204)

    def _unknown_route(self, request: Request, body: Any) -> Response:
        return JSONResponse({"message": "Not Found"}, status_code=404)


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.testing.fake_tavus",
        description="Run the fake Tavus REST API on this machine for manual trials. Point echo-relay at it "
                    "with TAVUS_API_URL=http://HOST:PORT and TAVUS_API_KEY=KEY.")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8765,
                        help="port, 0 = any free one (default: %(default)s)")
    parser.add_argument("--api-key", default="test",
                        help="the x-api-key clients must send (default: %(default)s)")
    parser.add_argument("--replica", action="append", metavar="ID",
                        help=f"a known replica id (repeatable; default: {FAKE_REPLICA_ID})")
    parser.add_argument("--any-replica", action="store_true", help="accept any replica id")
    parser.add_argument("--no-require-replica", action="store_true",
                        help="allow conversations without replica_id or persona default replica")
    parser.add_argument("--persona-get-shape", choices=["flat", "wrapped"], default="flat",
                        help="GET /v2/personas/{id} answer: flat object or {'data': [obj]} (default: flat)")
    parser.add_argument("--end-ended", choices=["error", "ok"], default="error",
                        help="answer to ending an ended conversation: 400 error or 200 (default: error)")
    parser.add_argument("--unknown-id-status", type=int, choices=[400, 404], default=404,
                        help="status for unknown persona/conversation ids (default: 404)")
    args = parser.parse_args(argv)
    replicas = None if args.any_replica else (args.replica or [FAKE_REPLICA_ID])
    server = FakeTavusServer(api_key=args.api_key, host=args.host, port=args.port, replicas=replicas,
                             require_replica=not args.no_require_replica,
                             persona_get_shape=args.persona_get_shape, end_ended=args.end_ended,
                             unknown_id_status=args.unknown_id_status)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    known = "any" if replicas is None else ", ".join(sorted(replicas))
    print(f"fake Tavus API on {server.url} (x-api-key: {args.api_key}; replicas: {known}). Ctrl-C stops.",
          flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
