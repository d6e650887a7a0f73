"""OpenAI-compatible HTTP ASR engine (`asr.engine: openai-http`).

Posts each utterance to ``asr.openai_http.url`` (``/v1/audio/transcriptions`` of OpenAI,
faster-whisper-server/speaches, whisper.cpp's server, vLLM, ...) as a 16 kHz mono 16-bit WAV in a
multipart form, with ``model``, ``language``, ``prompt`` (`asr.initial_prompt`, then the
utterance's committed beginning, `UtteranceMeta.context`, as OpenAI's docs describe the prompt: the
preceding text) and ``response_format`` fields, and ``Authorization: Bearer`` when an API key is set.
``language`` is the conversation's (`UtteranceMeta.language`, pipeline/language.py) or ``asr.language``; none
under auto before the lock, so the server detects it. ``asr.task: translate`` posts to the
``/audio/translations`` endpoint beside the configured ``/audio/transcriptions`` one (OpenAI's any language ->
English; it takes no ``language`` field), and the text is English.

- Start (`load`): the server is probed (``GET {base}/models``, see `probe_url`), retried as below.
  Any HTTP answer means it is reachable (whisper.cpp's server answers 404 there); no answer, or a
  gateway's 502/504, means it is not, and start fails with `AsrError` naming the URL (`run` and
  `serve` exit 4); 401/403 means the key is wrong, a clear error too.
- Readiness (`readiness()`, on `/readyz` as ``asr_server``) follows the server: false from the first
  request or probe that cannot reach it, true again at its next answer. After start the server is
  probed whenever no request got an answer for ``openai_http.probe_interval_s`` (so an idle relay,
  or `serve` with no relay, still sees it go away). While it is unreachable a request waits for it
  (no request storm on a server that is down) until ``asr.deadline_s`` from the request's start,
  then fails.
- Timeouts, 408, 429 and 5xx are retried ``openai_http.retries`` times by the shared policy of
  pipeline/retry.py (backoff with full jitter from 0.2 s, or the server's ``Retry-After`` on 429/503),
  never past ``asr.deadline_s``: a result after it would be dropped anyway, and the retry would load
  a server that is already struggling. Other 4xx fail at once. Failures raise `AsrRequestError`
  carrying the server's own message.
- One request per utterance unless ``openai_http.speculative`` (`AsrEngine.speculative`).
- ``{"text": ...}`` is the result. When the server returns ``verbose_json`` segments
  (``avg_logprob``, ``no_speech_prob``, ``compression_ratio``), confidence and the full
  hallucination gate use them as for faster-whisper; otherwise confidence is 1.0 and only the gate
  rules that need no model statistics apply (empty text, phantom phrases on near-silence, loops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from pipeline.asr.base import AsrEngine, AsrError
from pipeline.asr.gate import compression_ratio, gate, rms_dbfs
from pipeline.config import AsrSettings
from pipeline.dsp import wav_bytes
from pipeline.frames import Pcm, Transcript, UtteranceMeta
from pipeline.langcodes import check_code
from pipeline.retry import RetryPolicy, retry_after

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.2  # first retry within 0.2 s (full jitter), ceilings doubling up to BACKOFF_MAX_S
BACKOFF_MAX_S = 2.0
PROBE_TIMEOUT_S = 5.0  # a reachability probe (GET, no decode) needs no longer, whatever timeout_s is
UNREACHABLE_STATUSES = frozenset({502, 504})  # a gateway answered: the server behind it did not
AUTH_STATUSES = frozenset({401, 403})
RETRY_STATUSES = frozenset({408, 429})  # 4xx worth a retry (5xx all are)
TRANSCRIPTIONS_PATH = "/audio/transcriptions"


def probe_url(url: str) -> str:
    """Where to check that the server is up: ``{base}/models`` for an OpenAI-style
    ``{base}/audio/transcriptions`` URL (a cheap GET every compatible server answers, with 200, 401 or
    404), else the URL itself (a GET there is answered 404/405: still an answer)."""
    parts = urlsplit(url)
    if parts.path.rstrip("/").endswith(TRANSCRIPTIONS_PATH):
        base = parts.path.rstrip("/")[: -len(TRANSCRIPTIONS_PATH)]
        return urlunsplit(parts._replace(path=f"{base}/models", query=""))
    return url


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class AsrRequestError(AsrError):
    """A transcription request failed (4xx, or 5xx/connection errors after the retries)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _Unreachable(Exception):
    """No answer from the server (connection refused or timed out, or a gateway's 502/504)."""


def _server_message(resp: httpx.Response) -> str:
    """The error text of an OpenAI-style `{"error": {"message": ...}}` body, or the raw body."""
    try:
        body = resp.json()
    except ValueError:
        text = resp.text.strip()
        return " ".join(text.split())[:300] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message")))
        if isinstance(err, dict):
            err = err.get("message") or err
        if err is not None:
            return " ".join(str(err).split())[:300]
    return " ".join(str(body).split())[:300]


class OpenAIHttpEngine(AsrEngine):
    """Transcribes through an OpenAI-compatible `/v1/audio/transcriptions` endpoint."""

    name = "openai-http"

    def __init__(self, settings: AsrSettings, metrics: Metrics | None = None, *,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.http = settings.openai_http
        self.model_name = self.http.model
        self.response_format: str = str(getattr(self.http, "response_format", "json"))
        self.speculative = self.http.speculative
        self.retry = RetryPolicy(self.http.retries, BACKOFF_BASE_S, BACKOFF_MAX_S)
        self.probe_url = probe_url(self.http.url)
        self.translate = settings.task == "translate"
        # The config refuses translate with a url that does not end in /audio/transcriptions (AsrSettings).
        self.url = (self.http.url.rstrip("/").removesuffix("/transcriptions") + "/translations" if self.translate
                    else self.http.url)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._random = random.Random()
        self._reachable = False  # the last request or probe got an answer
        self._answered_at = 0.0  # time.monotonic() of the last answer
        self._in_flight = 0  # requests waiting for the server's answer: they will tell whether it is there
        self._down_since: float | None = None  # time.monotonic() when it stopped answering, while it does not
        self._up = asyncio.Event()  # set while reachable: requests waiting for the server wait on it
        self._watcher: asyncio.Task[None] | None = None  # probes when requests do not tell (_watch)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.http.api_key is not None and self.http.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.http.api_key.get_secret_value()}"
        return headers

    def _ensure_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.http.timeout_s),
                                             headers=self._headers(), transport=self._transport)
        return self._client

    def readiness(self) -> dict[str, bool]:
        return {"asr_server": self._reachable}

    async def load(self) -> None:
        """Check that the server answers (retried as requests are); AsrError naming the URL when it does not."""
        problem = ""
        for attempt in range(self.retry.retries + 1):
            if attempt:
                await asyncio.sleep(self.retry.delay(attempt - 1, rng=self._random))
            try:
                await self._probe()
            except _Unreachable as exc:
                problem = str(exc)
                continue
            log.info("ASR server %s answers (model %s)", self.http.url, self.http.model)
            if self.metrics is not None:
                self.metrics.model_loaded.set(1)
            self._ensure_watcher()
            return
        raise AsrError(f"ASR server {self.http.url} cannot be reached ({problem}; {self.retry.retries + 1} "
                       f"attempt(s) at {self.probe_url}): start it, or set asr.openai_http.url")

    async def _probe(self) -> None:
        """One GET of `probe_url`. Any answer marks the server reachable; none (or a gateway's 502/504) raises
        `_Unreachable`; 401/403 raises `AsrRequestError` (a wrong key: nothing to wait for)."""
        try:
            resp = await self._ensure_client().get(self.probe_url, timeout=min(self.http.timeout_s, PROBE_TIMEOUT_S))
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _Unreachable(_describe(exc)) from None
        except httpx.TimeoutException:  # connected, but busy: a server that decodes on its event loop is still there
            self._set_up()
            return
        except httpx.TransportError as exc:  # the connection dropped without an answer
            raise _Unreachable(_describe(exc)) from None
        if resp.status_code in UNREACHABLE_STATUSES:
            raise _Unreachable(f"HTTP {resp.status_code}: {_server_message(resp)}")
        self._set_up()
        if resp.status_code in AUTH_STATUSES:
            raise AsrRequestError(f"ASR server {self.http.url} refused the API key (HTTP {resp.status_code} at "
                                  f"{self.probe_url}: {_server_message(resp)}): set asr.openai_http.api_key",
                                  resp.status_code)

    def _set_up(self) -> None:
        if self._down_since is not None:
            log.warning("ASR server %s answers again after %.1f s unreachable", self.http.url,
                        time.monotonic() - self._down_since)
            self._down_since = None
        self._reachable = True
        self._answered_at = time.monotonic()
        self._up.set()

    def _set_down(self, why: str) -> None:
        """A request got no answer: not ready, and probe until the server answers."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.error("ASR server %s cannot be reached (%s): /readyz is 503 until it answers; checking every %g s",
                      self.http.url, why, self.http.probe_interval_s)
        self._reachable = False
        self._up.clear()
        self._ensure_watcher()

    def _ensure_watcher(self) -> None:
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="asr-server-probe")

    async def _watch(self) -> None:
        """Until close: probe the server whenever no request got an answer for probe_interval_s."""
        interval = self.http.probe_interval_s
        while True:
            await asyncio.sleep(max(0.0, self._answered_at + interval - time.monotonic()) if self._reachable
                                else interval)
            if self._reachable and (self._in_flight or time.monotonic() - self._answered_at < interval):
                continue  # requests are being answered, or will be: no need to ask
            try:
                await self._probe()
            except _Unreachable as exc:
                self._set_down(str(exc))
            except AsrRequestError:
                pass  # it answers, refusing the key: the requests fail with that message

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _post(self, wav: bytes, meta: UtteranceMeta) -> dict[str, Any]:
        client = self._ensure_client()
        data: dict[str, str] = {"model": self.http.model, "response_format": self.response_format}
        language = meta.language or self.settings.language
        if language and not self.translate:
            data["language"] = language
        prompt = " ".join(t for t in (self.settings.initial_prompt, meta.context) if t)
        if prompt:
            data["prompt"] = prompt
        files = {"file": (f"{meta.utterance_id or 'utterance'}.wav", wav, "audio/wav")}
        deadline = time.monotonic() + self.settings.deadline_s
        attempt = 0  # retries so far (waiting for an unreachable server is not one)
        while True:
            try:
                resp = await self._send(client, data, files)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # not sent: nothing listens there
                self._set_down(_describe(exc))
                await self._wait_for_server(deadline, _describe(exc))
                continue
            except httpx.TransportError as exc:  # sent, but no answer in time (or the connection dropped)
                last, status, hint = _describe(exc), None, None
            else:
                status, hint = resp.status_code, retry_after(resp)
                last = f"HTTP {status}: {_server_message(resp)}" if status >= 300 else ""
                if status in UNREACHABLE_STATUSES:  # retried as a 5xx: the gateway may answer its /models
                    self._set_down(last)
                else:
                    self._set_up()
                if status < 300:
                    return self._body(resp)
                if status < 500 and status not in RETRY_STATUSES:
                    raise AsrRequestError(f"ASR server {self.http.url} rejected the request ({last})", status)
            if attempt >= self.retry.retries:
                raise AsrRequestError(f"ASR server {self.http.url} failed after {attempt + 1} attempt(s): {last}",
                                      status)
            delay = self.retry.delay(attempt, hint, self._random)
            if time.monotonic() + delay >= deadline:
                raise AsrRequestError(f"ASR server {self.http.url} failed ({last}); a retry in {delay:.1f} s would "
                                      f"be past asr.deadline_s ({self.settings.deadline_s:g} s)", status)
            attempt += 1
            log.warning("ASR request to %s failed (%s); retry %d/%d in %.2f s%s", self.http.url, last, attempt,
                        self.retry.retries, delay, " (its Retry-After)" if hint is not None else "")
            await asyncio.sleep(delay)

    async def _send(self, client: httpx.AsyncClient, data: dict[str, str], files: dict[str, Any]) -> httpx.Response:
        self._in_flight += 1
        try:
            return await client.post(self.url, data=data, files=files)
        finally:
            self._in_flight -= 1

    async def _wait_for_server(self, deadline: float, last: str) -> None:
        """Wait until a probe finds the server again, at most until `deadline`; AsrRequestError after it."""
        remaining = deadline - time.monotonic()
        if remaining > 0:
            try:
                await asyncio.wait_for(self._up.wait(), remaining)
                return
            except TimeoutError:
                pass
        raise AsrRequestError(f"ASR server {self.http.url} cannot be reached ({last}) within asr.deadline_s "
                              f"({self.settings.deadline_s:g} s)")

    def _body(self, resp: httpx.Response) -> dict[str, Any]:
        try:
            body = resp.json()
        except ValueError:
            if self.response_format == "text":
                return {"text": resp.text}
            raise AsrRequestError(f"ASR server {self.http.url} answered {resp.status_code} with a body that is "
                                  f"not JSON: {resp.text[:200]!r}", resp.status_code) from None
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise AsrRequestError(f"ASR server {self.http.url} answered without a 'text' field: "
                                  f"{str(body)[:200]}", resp.status_code)
        return body

    async def transcribe(self, audio: Pcm, meta: UtteranceMeta) -> Transcript:
        t0 = time.perf_counter()
        body = await self._post(wav_bytes(audio), meta)
        text = " ".join(str(body.get("text") or "").split())
        segments = body.get("segments") if isinstance(body.get("segments"), list) else None
        no_speech = avg_logprob = 0.0
        cr = compression_ratio(text)
        confidence = 1.0
        stats = [s for s in segments or [] if isinstance(s, dict) and "avg_logprob" in s]
        if stats:
            avg_logprob = float(np.mean([float(s["avg_logprob"]) for s in stats]))
            no_speech = float(np.mean([float(s.get("no_speech_prob", 0.0)) for s in stats]))
            crs = [float(s["compression_ratio"]) for s in stats if "compression_ratio" in s]
            if crs:
                cr = max(crs)
            confidence = float(min(1.0, math.exp(avg_logprob)))
        reason = gate(text, no_speech_prob=no_speech, avg_logprob=avg_logprob, audio_dbfs=rms_dbfs(audio),
                      settings=self.settings.gate, compression_ratio_value=cr)
        extra: dict[str, Any] = {}
        if reason is not None:
            log.debug("ASR dropped utterance %s (%s): %r", meta.utterance_id, reason, text)
            extra["dropped_text"] = text
        language = _language_code(body.get("language")) or meta.language or self.settings.language
        # The server detected it (no language was sent): its probability, when the answer carries one (not
        # OpenAI's; faster-whisper-based servers may), lets the conversation's language lock (pipeline/language.py).
        prob = body.get("language_probability")
        detected = (language, float(prob)) if (
            language and not (meta.language or self.settings.language) and isinstance(prob, (int, float))
            and not isinstance(prob, bool)) else None
        if self.translate:
            language = "en"
        return Transcript(
            text="" if reason else text,
            confidence=confidence,
            language=language,
            detected=detected,
            no_speech_prob=no_speech,
            avg_logprob=avg_logprob,
            final_punct_prob=None,  # the API gives no token probabilities
            decode_s=time.perf_counter() - t0,
            dropped_reason=reason,
            extra=extra,
        )


def _language_code(value: Any) -> str | None:
    """A server's `language` as a code: OpenAI's verbose_json names it ("english"), others give the code."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        return check_code(value)
    except ValueError:
        return None
