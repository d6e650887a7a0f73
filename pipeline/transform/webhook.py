"""`webhook` transform step: let an HTTP service rewrite (or drop) each utterance.

The step POSTs one JSON object per utterance:

    {"text": "...", "utterance_id": "...", "audio_start_s": 1.2, "audio_end_s": 3.4,
     "asr_text": "...", "confidence": 0.93, "language": "en"}

`text` is what the previous steps produced, `asr_text` what the ASR heard. The reply decides:

- `200` JSON `{"text": "new text"}` (or a bare JSON string) -> that text;
- `200` JSON `{"text": null}` or `{"drop": true}` -> the utterance is dropped;
- `200` with a `text/plain` body -> the body (surrounding whitespace stripped) is the text;
- `204 No Content` -> the text goes on unchanged (an observer that only records utterances);
- any other status, an unreadable reply, a reply over `max_reply_bytes`, a connection error -> the
  step raises, so the chain applies the step's `on_error` policy (`pass` by default).

Hostile or broken services (issue 11: one 50 MB reply became 13,427 echoes) are bounded three ways:

- the reply is streamed and never read past `max_reply_bytes` (default `MAX_REPLY_BYTES`, 64 KB;
  decoded bytes, and the step asks for an uncompressed reply so a small compressed body cannot
  expand past it in one piece); a larger declared `Content-Length` is refused before reading;
- the step's `timeout_s` (chain-level, pipeline/transform/chain.py) bounds the whole call, and
  `request_timeout_s` bounds the whole exchange (connect, send, read) as a backstop: httpx's own
  timeouts are per operation, so a reply trickling in a byte at a time never trips them;
- the text is then bounded by the chain (`transform.max_text_chars`, reason `too_long`).

Credentials: `url` may carry user info (sent as `Authorization: Basic`) or `headers` an `Authorization`,
never both (refused at config check: httpx would send the URL's and drop the header without a word).

One `httpx.AsyncClient` per step is created on first use and reused (keep-alive); the chain's
`aclose()` closes it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from pipeline.frames import UtteranceMeta
from pipeline.transform.base import OptionError

MAX_REPLY_BYTES = 65_536  # default of the max_reply_bytes option (64 KB)
MAX_REPLY_BYTES_LIMIT = 16 * 1024 * 1024  # the option's largest accepted value
ERROR_BODY_BYTES = 1024  # read of a non-2xx reply, for its error message
ERROR_SNIPPET_CHARS = 200  # of that body in the message


class WebhookError(RuntimeError):
    """The webhook answered with something the step cannot use (status, content type, JSON shape)."""


def _safe_url(url: str) -> str:
    """The URL for messages: without user info and query string (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_has_userinfo(url: str) -> bool:
    """True when `url` carries credentials (`scheme://user[:password]@host`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.username is not None or parts.password is not None


class WebhookStep:
    """POST each utterance to `url`; the reply is the new text (see the module docstring).

    Options: `url` (required), `headers` (e.g. `{Authorization: "Bearer ${HOOK_TOKEN}"}`; values
    are never logged), `request_timeout_s` (backstop for the whole exchange, default 30),
    `max_reply_bytes` (largest reply body read, default 65536), `verify` (TLS certificate
    verification, default true).
    """

    def __init__(self, url: str, headers: Mapping[str, Any] | None = None, request_timeout_s: float = 30.0,
                 verify: bool = True, max_reply_bytes: int = MAX_REPLY_BYTES) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise OptionError("url", f"url must be an http:// or https:// URL (got {url!r})")
        if headers is not None and not isinstance(headers, Mapping):
            raise OptionError("headers", "headers must be a mapping of header name to value")
        if url_has_userinfo(url) and any(str(k).strip().lower() == "authorization" for k in headers or {}):
            # httpx turns user info into `Authorization: Basic`, silently replacing the configured header
            # (issue 27): refused, so the request never carries a credential the operator did not mean.
            raise OptionError("url", "url has user info (user:password@) and headers has Authorization: two "
                                     "credentials for one request, and the URL's would replace the header; "
                                     "keep one of them")
        if not isinstance(request_timeout_s, int | float) or request_timeout_s <= 0:
            raise OptionError("request_timeout_s", "request_timeout_s must be a number > 0")
        if (isinstance(max_reply_bytes, bool) or not isinstance(max_reply_bytes, int)
                or not 1 <= max_reply_bytes <= MAX_REPLY_BYTES_LIMIT):
            raise OptionError("max_reply_bytes", f"max_reply_bytes must be an integer from 1 to "
                                                 f"{MAX_REPLY_BYTES_LIMIT} (got {max_reply_bytes!r})")
        self.url = url
        self.max_reply_bytes = max_reply_bytes
        self._headers = {str(k): str(v) for k, v in (headers or {}).items()}
        if not any(k.lower() == "accept-encoding" for k in self._headers):
            self._headers["Accept-Encoding"] = "identity"  # see the module docstring
        self._timeout = float(request_timeout_s)
        self._verify = bool(verify)
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:  # never shows the headers (they may hold a token)
        return f"WebhookStep(url={_safe_url(self.url)!r})"

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None or self._client.is_closed:
            self._client = httpx.AsyncClient(headers=self._headers, timeout=self._timeout,
                                             verify=self._verify, follow_redirects=False)
        return self._client

    @staticmethod
    def payload(text: str, meta: UtteranceMeta) -> dict[str, Any]:
        return {
            "text": text,
            "utterance_id": meta.utterance_id,
            "audio_start_s": meta.audio_start_s,
            "audio_end_s": meta.audio_end_s,
            "asr_text": meta.asr_text,
            "confidence": meta.confidence,
            "language": meta.language,
        }

    async def __call__(self, text: str, meta: UtteranceMeta) -> str | None:
        where = _safe_url(self.url)
        try:
            async with (asyncio.timeout(self._timeout),
                        self.client.stream("POST", self.url, json=self.payload(text, meta)) as response):
                body = await self._read_body(response, where)
        except (TimeoutError, httpx.TimeoutException):
            raise WebhookError(f"webhook {where} timed out after {self._timeout:g} s "
                               "(request_timeout_s)") from None
        except httpx.HTTPError as exc:  # connect refused, reset mid-reply, protocol violation, ...
            raise WebhookError(f"webhook {where} request failed: {type(exc).__name__}: {exc}") from None
        return self.parse_reply(response, text, body)

    async def _read_body(self, response: httpx.Response, where: str) -> bytes:
        """The reply body, read no further than needed: nothing for 204, `ERROR_BODY_BYTES` of a
        failure status (for its message), at most `max_reply_bytes` of a success (more is an error)."""
        if response.status_code == 204:
            return b""
        ok = 200 <= response.status_code < 300
        limit = self.max_reply_bytes if ok else ERROR_BODY_BYTES
        declared = response.headers.get("content-length", "")
        if ok and declared.isdigit() and int(declared) > limit:
            raise WebhookError(f"webhook {where} announced a {int(declared)}-byte reply, over max_reply_bytes "
                               f"({limit}); not read")
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            size += len(chunk)
            if size > limit:
                if not ok:  # enough for the message
                    chunks.append(chunk[:limit - size + len(chunk)])
                    break
                raise WebhookError(f"webhook {where} sent a reply over max_reply_bytes ({limit} bytes); "
                                   "stopped reading it")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse_reply(self, response: httpx.Response, text: str, body: bytes | None = None) -> str | None:
        """The step's result from a reply; `body` is its (bounded) body, default `response.content`."""
        where = _safe_url(self.url)
        if response.status_code == 204:
            return text
        if body is None:
            body = response.content
        decoded = body.decode(response.encoding or "utf-8", errors="replace")
        if not 200 <= response.status_code < 300:
            snippet = decoded[:ERROR_SNIPPET_CHARS].strip()
            raise WebhookError(f"webhook {where} answered {response.status_code} {response.reason_phrase}"
                               + (f": {snippet}" if snippet else ""))
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            try:
                data = json.loads(body)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, deep nesting
                raise WebhookError(f"webhook {where} sent invalid JSON: {type(exc).__name__}: "
                                   f"{str(exc)[:ERROR_SNIPPET_CHARS]}") from None
            return self._from_json(data, where)
        if ctype.startswith("text/") or not ctype:
            return decoded.strip()
        raise WebhookError(f"webhook {where} answered with content type {ctype!r}; "
                           "expected application/json or text/plain")

    @staticmethod
    def _from_json(data: Any, where: str) -> str | None:
        if isinstance(data, str):
            return data
        if not isinstance(data, dict):
            raise WebhookError(f"webhook {where} sent JSON {type(data).__name__}; expected an object "
                               '{"text": ...} or {"drop": true}')
        if data.get("drop") is True:
            return None
        if "text" not in data:
            raise WebhookError(f"webhook {where} sent a JSON object without 'text' or 'drop': "
                               f"keys {sorted(data)}")
        value = data["text"]
        if value is None or isinstance(value, str):
            return value
        raise WebhookError(f"webhook {where} sent 'text' of type {type(value).__name__}; "
                           "expected string or null")

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()
