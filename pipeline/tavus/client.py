"""Async client for the Tavus REST API v2 (personas and conversations).

Endpoints, bodies and error shapes follow Tavus's API v2 reference (https://docs.tavus.io/api-reference);
docs/tavus.md shows how echo-relay uses them. Summary of the behaviour:

- Auth is the `x-api-key` header, added per request by a small `httpx.Auth` (so the key is not in
  the client's default headers), with `Content-Type: application/json`.
- Retries: connection errors, timeouts, 429 and 5xx are retried by the shared policy of
  pipeline/retry.py: exponential backoff and full jitter
  (`delay = uniform(0, min(backoff_max_s, backoff_base_s * 2**attempt))`); a `Retry-After` header
  (seconds or HTTP-date) on 429/503 is honoured instead, capped at `retry_after_max_s`.
  Other 4xx answers are never retried.
- Creating a persona or a conversation is not idempotent: if the request may already have reached
  Tavus (a read timeout, a connection dropped after sending) it is NOT retried, because a retry
  could create a second, billed conversation. Such failures raise `TavusConnectionError` /
  `TavusTimeout` at once. Failures before sending (connect errors), 429 and 5xx are retried for
  every call.
- Errors are typed (`TavusError` and subclasses); the message comes from Tavus's `{"error": ...}`
  or `{"message": ...}` body, else the response text.
- The API key never appears in logs, exception messages or reprs: the client logs method, path and
  status only; any echo of the key in an error body is replaced by `***`; `repr()` shows
  `api_key=***`. (httpx itself logs the URL and status at INFO and httpcore logs connection events
  and *response* headers at DEBUG, never request headers.)

Choices where Tavus's reference is silent or differs from what was observed:

- `GET /v2/personas/{id}`: the spec wraps the object in `{"data": [...]}`, a real response was
  flat. Both are accepted; the flat object is returned (same for conversations, for safety).
- `POST /v2/conversations/{id}/end` on an already-ended conversation is undocumented. Any 2xx is
  success. On a 400/409/410/422 answer the client reads the conversation: if its status is
  `ended`, `end_conversation` returns False ("was already ended") instead of raising. A 2xx body
  may be empty or JSON; it is ignored.
- Unknown ids may be answered 404 or 400 `{"error": "Invalid conversation_id"}` (the documented
  400): 404 raises `TavusNotFound`, 400 raises `TavusError(400, ...)`.
- Lists may be `{"data": [...], "total_count": N}` (documented) or a bare list (normalised).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from pydantic import SecretStr

from pipeline import __version__
from pipeline.retry import RETRY_AFTER_MAX_S, RetryPolicy, retry_after

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://tavusapi.com"
_MAX_MESSAGE_CHARS = 300


# ----------------------------------------------------------------------------------------- errors
class TavusError(Exception):
    """An error answered by (or on the way to) the Tavus API.

    `status` is the HTTP status (None when no response was received), `message` Tavus's own text.
    `body` is the parsed error body when there was one.
    """

    def __init__(self, status: int | None, message: str, *, body: Any = None) -> None:
        self.status = status
        self.message = message
        self.body = body
        super().__init__(f"HTTP {status}: {message}" if status is not None else message)


class TavusAuthError(TavusError):
    """401 (bad or missing key: Tavus answers `{"message": "Invalid access token"}`) or 403."""


class TavusNotFound(TavusError):
    """404: unknown persona or conversation."""


class TavusRateLimited(TavusError):
    """429 after all retries. `retry_after` is the last `Retry-After` in seconds (None if absent)."""

    def __init__(self, status: int | None, message: str, *, body: Any = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, message, body=body)
        self.retry_after = retry_after


class TavusServerError(TavusError):
    """5xx after all retries."""


class TavusConnectionError(TavusError):
    """No HTTP answer: DNS, refused or dropped connection, TLS, protocol error (status is None)."""

    def __init__(self, message: str) -> None:
        super().__init__(None, message)


class TavusTimeout(TavusConnectionError):
    """No answer within the timeout."""


# ------------------------------------------------------------------------------------- helpers
def normalize_api_url(api_url: str) -> str:
    """`https://tavusapi.com`, `https://tavusapi.com/` and `https://tavusapi.com/v2/` are all accepted."""
    url = (api_url or "").strip().rstrip("/")
    if url.endswith("/v2"):
        url = url[: -len("/v2")]
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"Tavus API URL must start with http:// or https:// (got {api_url!r})")
    return url


def _path_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{what} must be a non-empty string")
    return quote(value.strip(), safe="")


def _drop_none(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v is not None}


class _ApiKeyAuth(httpx.Auth):
    """Adds `x-api-key` to each request; its repr never shows the key."""

    def __init__(self, key: SecretStr) -> None:
        self._key = key

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["x-api-key"] = self._key.get_secret_value()
        yield request

    def __repr__(self) -> str:
        return "_ApiKeyAuth(api_key=***)"


Sleep = Callable[[float], Awaitable[None]]


# -------------------------------------------------------------------------------------- client
class TavusClient:
    """Tavus REST v2 client. Use as `async with TavusClient(url, key) as tavus: ...` (or call `aclose`).

    `retries` is the number of retries after the first attempt (0 = try once). `transport` is handed
    to httpx (tests can pass an `httpx.MockTransport`). `sleep` replaces `asyncio.sleep` between
    retries (tests can record the delays).
    """

    def __init__(self, api_url: str, api_key: str | SecretStr, timeout_s: float = 15.0, retries: int = 3,
                 transport: httpx.AsyncBaseTransport | None = None, *, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 8.0, retry_after_max_s: float = RETRY_AFTER_MAX_S,
                 sleep: Sleep | None = None) -> None:
        key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key or "")
        if not key.get_secret_value().strip():
            raise ValueError("Tavus API key is empty (set TAVUS_API_KEY)")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.api_url = normalize_api_url(api_url)
        self._key = SecretStr(key.get_secret_value().strip())
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.retry = RetryPolicy(self.retries, float(backoff_base_s), float(backoff_max_s),
                                 float(retry_after_max_s))  # ValueError on a negative count or delay
        self._sleep: Sleep = sleep or asyncio.sleep
        self._random = random.Random()
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            auth=_ApiKeyAuth(self._key),
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     "User-Agent": f"echo-relay/{__version__}"},
            timeout=httpx.Timeout(self.timeout_s),
            transport=transport,
            follow_redirects=False,
        )

    @classmethod
    def from_settings(cls, tavus: Any, **kwargs: Any) -> TavusClient:
        """Build from `pipeline.config.TavusSettings` (api_url, api_key, timeout_s, retries)."""
        if tavus.api_key is None:
            raise ValueError("Tavus API key is not set (set TAVUS_API_KEY)")
        return cls(tavus.api_url, tavus.api_key, timeout_s=tavus.timeout_s, retries=tavus.retries, **kwargs)

    def __repr__(self) -> str:
        return (f"TavusClient(api_url={self.api_url!r}, api_key=***, timeout_s={self.timeout_s}, "
                f"retries={self.retries})")

    async def __aenter__(self) -> TavusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------------------ personas
    async def create_persona(self, persona_name: str, pipeline_mode: str = "echo",
                             system_prompt: str | None = None, default_replica_id: str | None = None,
                             layers: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """POST /v2/personas. Returns Tavus's answer (`persona_id`, `persona_name`, `created_at`)."""
        body = _drop_none({"persona_name": persona_name, "pipeline_mode": pipeline_mode,
                           "system_prompt": system_prompt, "default_replica_id": default_replica_id,
                           "layers": layers, **extra})
        data = await self._json("POST", "/v2/personas", json_body=body, idempotent=False)
        return _unwrap_one(data, "persona_id", "", "created persona")

    async def get_persona(self, persona_id: str) -> dict[str, Any]:
        """GET /v2/personas/{id} as a flat object (a `{"data": [obj]}` answer is unwrapped)."""
        data = await self._json("GET", f"/v2/personas/{_path_id(persona_id, 'persona_id')}")
        return _unwrap_one(data, "persona_id", persona_id, "persona")

    async def list_personas(self, limit: int | None = None, page: int | None = None,
                            persona_type: str | None = None) -> dict[str, Any]:
        """GET /v2/personas: `{"data": [...], "total_count": N}`."""
        params = _drop_none({"limit": limit, "page": page, "persona_type": persona_type})
        return _as_list_page(await self._json("GET", "/v2/personas", params=params))

    async def delete_persona(self, persona_id: str) -> None:
        """DELETE /v2/personas/{id} (Tavus answers 204)."""
        await self._request("DELETE", f"/v2/personas/{_path_id(persona_id, 'persona_id')}")

    # ------------------------------------------------------------------------- conversations
    async def create_conversation(self, persona_id: str, replica_id: str | None = None,
                                  conversation_name: str | None = None, callback_url: str | None = None,
                                  test_mode: bool | None = None, require_auth: bool | None = None,
                                  properties: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """POST /v2/conversations. Fields left as None are not sent (nor None entries of `properties`).

        Returns `conversation_id`, `conversation_url`, `status`, ... and `meeting_token` with
        `require_auth`.
        """
        props = _drop_none(properties or {})
        body = _drop_none({"persona_id": persona_id, "replica_id": replica_id,
                           "conversation_name": conversation_name, "callback_url": callback_url,
                           "test_mode": test_mode, "require_auth": require_auth,
                           "properties": props or None, **extra})
        data = await self._json("POST", "/v2/conversations", json_body=body, idempotent=False)
        return _unwrap_one(data, "conversation_id", "", "created conversation")

    async def get_conversation(self, conversation_id: str, verbose: bool = False) -> dict[str, Any]:
        """GET /v2/conversations/{id} (`verbose=True` adds the event data)."""
        params = {"verbose": "true"} if verbose else None
        data = await self._json("GET", f"/v2/conversations/{_path_id(conversation_id, 'conversation_id')}",
                                params=params)
        return _unwrap_one(data, "conversation_id", conversation_id, "conversation")

    async def list_conversations(self, limit: int | None = None, page: int | None = None,
                                 status: str | None = None) -> dict[str, Any]:
        """GET /v2/conversations: `{"data": [...], "total_count": N}`; status is active|ended."""
        params = _drop_none({"limit": limit, "page": page, "status": status})
        return _as_list_page(await self._json("GET", "/v2/conversations", params=params))

    async def end_conversation(self, conversation_id: str) -> bool:
        """POST /v2/conversations/{id}/end. Idempotent.

        Returns True when the call succeeded, False when Tavus refused because the conversation had
        already ended (checked by reading it back). Other errors raise.
        """
        cid = _path_id(conversation_id, "conversation_id")
        try:
            await self._request("POST", f"/v2/conversations/{cid}/end")
            return True
        except TavusError as exc:
            if exc.status not in (400, 409, 410, 422):
                raise
            try:
                conv = await self.get_conversation(conversation_id)
            except TavusError:
                raise exc from None
            if str(conv.get("status", "")).lower() == "ended":
                log.info("Tavus conversation %s was already ended (%s)", conversation_id, exc.message)
                return False
            raise

    async def delete_conversation(self, conversation_id: str) -> None:
        """DELETE /v2/conversations/{id} (Tavus answers 204)."""
        await self._request("DELETE", f"/v2/conversations/{_path_id(conversation_id, 'conversation_id')}")

    # ------------------------------------------------------------------------------ plumbing
    async def _json(self, method: str, path: str, *, json_body: Any = None,
                    params: Mapping[str, Any] | None = None, idempotent: bool = True) -> Any:
        resp = await self._request(method, path, json_body=json_body, params=params, idempotent=idempotent)
        if not resp.content.strip():
            return {}
        try:
            return resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TavusError(resp.status_code,
                             f"unexpected non-JSON answer to {method} {path}: "
                             f"{self._redact(resp.text)[:_MAX_MESSAGE_CHARS]}") from None

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       params: Mapping[str, Any] | None = None, idempotent: bool = True) -> httpx.Response:
        attempt = 0
        while True:
            started = time.monotonic()
            hint: float | None = None
            try:
                resp = await self._http.request(method, path, json=json_body, params=params)
            except httpx.TimeoutException as exc:
                # Connect/pool timeouts happen before the request is sent: always safe to retry.
                sent = not isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout))
                err: TavusError = TavusTimeout(
                    f"no answer from Tavus within {self.timeout_s:g} s ({type(exc).__name__}) "
                    f"for {method} {path}")
                retryable = idempotent or not sent
            except httpx.RequestError as exc:  # connect/read/write/protocol errors, bad URL, ...
                err = TavusConnectionError(
                    f"cannot reach Tavus at {self.api_url} for {method} {path}: "
                    f"{type(exc).__name__}: {self._redact(str(exc)) or 'connection failed'}")
                retryable = isinstance(exc, httpx.TransportError) and not isinstance(
                    exc, httpx.UnsupportedProtocol) and (idempotent or isinstance(exc, httpx.ConnectError))
            else:
                elapsed_ms = (time.monotonic() - started) * 1000
                log.debug("Tavus %s %s -> %d (%.0f ms)", method, path, resp.status_code, elapsed_ms)
                if resp.status_code < 400:
                    return resp
                err = self._error_from(resp)
                retryable = resp.status_code == 429 or resp.status_code >= 500
                hint = retry_after(resp)
            if not retryable or attempt >= self.retries:
                raise err
            delay = self.retry.delay(attempt, hint, self._random)
            attempt += 1
            log.warning("Tavus %s %s failed (%s); retry %d/%d in %.2f s",
                        method, path, err, attempt, self.retries, delay)
            await self._sleep(delay)

    def _redact(self, text: str) -> str:
        key = self._key.get_secret_value()
        return text.replace(key, "***") if key and text else text

    def _error_from(self, resp: httpx.Response) -> TavusError:
        status = resp.status_code
        body: Any = None
        message = ""
        try:
            body = resp.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        if isinstance(body, dict):
            for field in ("error", "message", "detail"):
                value = body.get(field)
                if isinstance(value, dict):
                    value = value.get("message") or value.get("error") or json.dumps(value)
                if value not in (None, ""):
                    message = value if isinstance(value, str) else json.dumps(value)
                    break
        if not message:
            message = resp.text.strip() or resp.reason_phrase or "error"
        message = self._redact(message)
        if len(message) > _MAX_MESSAGE_CHARS:
            message = message[:_MAX_MESSAGE_CHARS] + "..."
        if isinstance(body, (dict, list)):
            body = json.loads(self._redact(json.dumps(body)))
        if status in (401, 403):
            return TavusAuthError(status, message, body=body)
        if status == 404:
            return TavusNotFound(status, message, body=body)
        if status == 429:
            return TavusRateLimited(status, message, body=body,
                                    retry_after=retry_after(resp))
        if status >= 500:
            return TavusServerError(status, message, body=body)
        return TavusError(status, message, body=body)


def _unwrap_one(data: Any, id_field: str, wanted: str, what: str) -> dict[str, Any]:
    """Flat object, or the spec's `{"data": [obj]}` / `{"data": obj}` wrapping."""
    label = f"{what} {wanted}".strip()
    if isinstance(data, dict) and id_field not in data and "data" in data:
        inner = data["data"]
        if isinstance(inner, dict):
            return inner
        if isinstance(inner, list):
            items = [x for x in inner if isinstance(x, dict)]
            for item in items:
                if item.get(id_field) == wanted:
                    return item
            if items:
                return items[0]
            raise TavusNotFound(None, f"{label} not found (empty data)", body=data)
    if isinstance(data, dict):
        return dict(data)
    raise TavusError(None, f"unexpected answer for {label}: {type(data).__name__}")


def _as_list_page(data: Any) -> dict[str, Any]:
    if isinstance(data, list):
        return {"data": data, "total_count": len(data)}
    if isinstance(data, dict):
        page: dict[str, Any] = dict(data)
        if not isinstance(page.get("data"), list):
            page["data"] = []
        return page
    raise TavusError(None, f"unexpected list answer: {type(data).__name__}")

