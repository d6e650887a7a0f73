"""`webhook` transform step: let an HTTP service rewrite (or drop) each utterance.

The step POSTs one JSON object per utterance:

    {"text": "...", "utterance_id": "...", "audio_start_s": 1.2, "audio_end_s": 3.4,
     "asr_text": "...", "confidence": 0.93, "language": "en"}

`text` is what the previous steps produced, `asr_text` what the ASR heard. The reply decides:

- `200` JSON `{"text": "new text"}` (or a bare JSON string) -> that text;
- `200` JSON `{"text": null}` or `{"drop": true}` -> the utterance is dropped;
- `200` with a `text/plain` body -> the body (surrounding whitespace stripped) is the text;
- `204 No Content` -> the text goes on unchanged (an observer that only records utterances);
- any other status, an unreadable reply, a connection error -> the step raises, so the chain applies
  the step's `on_error` policy (`pass` by default). The step's `timeout_s` (chain-level) bounds the
  whole request; `request_timeout_s` is only a backstop for the HTTP client itself.

One `httpx.AsyncClient` per step is created on first use and reused (keep-alive); the chain's
`aclose()` closes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from pipeline.frames import UtteranceMeta
from pipeline.transform.base import OptionError


class WebhookError(RuntimeError):
    """The webhook answered with something the step cannot use (status, content type, JSON shape)."""


def _safe_url(url: str) -> str:
    """The URL for messages: without user info and query string (they may carry credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class WebhookStep:
    """POST each utterance to `url`; the reply is the new text (see the module docstring).

    Options: `url` (required), `headers` (e.g. `{Authorization: "Bearer ${HOOK_TOKEN}"}`; values
    are never logged), `request_timeout_s` (HTTP client backstop, default 30), `verify` (TLS
    certificate verification, default true).
    """

    def __init__(self, url: str, headers: Mapping[str, Any] | None = None, request_timeout_s: float = 30.0,
                 verify: bool = True) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise OptionError("url", f"url must be an http:// or https:// URL (got {url!r})")
        if headers is not None and not isinstance(headers, Mapping):
            raise OptionError("headers", "headers must be a mapping of header name to value")
        if not isinstance(request_timeout_s, int | float) or request_timeout_s <= 0:
            raise OptionError("request_timeout_s", "request_timeout_s must be a number > 0")
        self.url = url
        self._headers = {str(k): str(v) for k, v in (headers or {}).items()}
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
        try:
            response = await self.client.post(self.url, json=self.payload(text, meta))
        except httpx.TimeoutException:
            raise WebhookError(f"webhook {_safe_url(self.url)} timed out after {self._timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise WebhookError(f"webhook {_safe_url(self.url)} unreachable: "
                               f"{type(exc).__name__}: {exc}") from None
        return self.parse_reply(response, text)

    def parse_reply(self, response: httpx.Response, text: str) -> str | None:
        where = _safe_url(self.url)
        if response.status_code == 204:
            return text
        if not 200 <= response.status_code < 300:
            snippet = response.text[:200].strip()
            raise WebhookError(f"webhook {where} answered {response.status_code} {response.reason_phrase}"
                               + (f": {snippet}" if snippet else ""))
        ctype = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json" or ctype.endswith("+json"):
            try:
                data = response.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise WebhookError(f"webhook {where} sent invalid JSON: {exc}") from None
            return self._from_json(data, where)
        if ctype.startswith("text/") or not ctype:
            return response.text.strip()
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
