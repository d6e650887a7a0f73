"""OpenAI-compatible HTTP ASR engine (`asr.engine: openai-http`).

Posts each utterance to ``asr.openai_http.url`` (``/v1/audio/transcriptions`` of OpenAI,
faster-whisper-server/speaches, whisper.cpp's server, vLLM, ...) as a 16 kHz mono 16-bit WAV in a
multipart form, with ``model``, ``language``, ``prompt`` (`asr.initial_prompt`) and
``response_format`` fields, and ``Authorization: Bearer`` when an API key is set.

- Connection errors, timeouts and 5xx answers are retried ``openai_http.retries`` times with
  exponential backoff (0.2 s, 0.4 s, ...); a 4xx answer fails at once. Both raise
  `AsrRequestError` carrying the server's own message.
- ``{"text": ...}`` is the result. When the server returns ``verbose_json`` segments
  (``avg_logprob``, ``no_speech_prob``, ``compression_ratio``), confidence and the full
  hallucination gate use them as for faster-whisper; otherwise confidence is 1.0 and only the gate
  rules that need no model statistics apply (empty text, phantom phrases on near-silence, loops).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from pipeline.asr.base import AsrEngine, AsrError
from pipeline.asr.gate import compression_ratio, gate, rms_dbfs
from pipeline.config import AsrSettings
from pipeline.dsp import wav_bytes
from pipeline.frames import Pcm, Transcript, UtteranceMeta

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 2.0


class AsrRequestError(AsrError):
    """A transcription request failed (4xx, or 5xx/connection errors after the retries)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


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
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.http.api_key is not None and self.http.api_key.get_secret_value():
            headers["Authorization"] = f"Bearer {self.http.api_key.get_secret_value()}"
        return headers

    async def load(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.http.timeout_s),
                                             headers=self._headers(), transport=self._transport)
        if self.metrics is not None:
            self.metrics.model_loaded.set(1)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _post(self, wav: bytes, meta: UtteranceMeta) -> dict[str, Any]:
        if self._client is None:
            await self.load()
        assert self._client is not None
        data: dict[str, str] = {"model": self.http.model, "response_format": self.response_format}
        if self.settings.language:
            data["language"] = self.settings.language
        if self.settings.initial_prompt:
            data["prompt"] = self.settings.initial_prompt
        files = {"file": (f"{meta.utterance_id or 'utterance'}.wav", wav, "audio/wav")}
        attempts = self.http.retries + 1
        delay = BACKOFF_INITIAL_S
        last = ""
        status: int | None = None
        for attempt in range(1, attempts + 1):
            try:
                resp = await self._client.post(self.http.url, data=data, files=files)
            except httpx.TransportError as exc:  # connect/read errors and timeouts
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                status = None
            else:
                if resp.status_code < 300:
                    try:
                        body = resp.json()
                    except ValueError:
                        if self.response_format == "text":
                            return {"text": resp.text}
                        raise AsrRequestError(
                            f"ASR server {self.http.url} answered {resp.status_code} with a body that is "
                            f"not JSON: {resp.text[:200]!r}", resp.status_code) from None
                    if not isinstance(body, dict) or not isinstance(body.get("text"), str):
                        raise AsrRequestError(f"ASR server {self.http.url} answered without a 'text' field: "
                                              f"{str(body)[:200]}", resp.status_code)
                    return body
                status = resp.status_code
                last = f"HTTP {resp.status_code}: {_server_message(resp)}"
                if resp.status_code < 500 and resp.status_code not in (408, 429):
                    raise AsrRequestError(f"ASR server {self.http.url} rejected the request ({last})",
                                          resp.status_code)
            if attempt < attempts:
                log.warning("ASR request to %s failed (%s); retry %d/%d in %.1f s", self.http.url, last,
                            attempt, attempts - 1, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
        raise AsrRequestError(f"ASR server {self.http.url} failed after {attempts} attempt(s): {last}",
                              status)

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
        language = body.get("language") if isinstance(body.get("language"), str) else self.settings.language
        return Transcript(
            text="" if reason else text,
            confidence=confidence,
            language=language,
            no_speech_prob=no_speech,
            avg_logprob=avg_logprob,
            final_punct_prob=None,  # the API gives no token probabilities
            decode_s=time.perf_counter() - t0,
            dropped_reason=reason,
            extra=extra,
        )
