"""The one retry policy of echo-relay's HTTP clients: the Tavus REST client (pipeline/tavus/client.py)
and the OpenAI-compatible ASR engine (pipeline/asr/openai_http.py).

- Exponential backoff with full jitter: before retry `n` (0-based) wait
  ``uniform(0, min(max_s, base_s * 2**n))``. The jitter spreads the retries of many clients (relays
  sharing one ASR server, processes sharing one API key) instead of sending them in step.
- A server's ``Retry-After`` (seconds or an HTTP-date) on 429 and 503 is honoured instead, capped at
  ``retry_after_max_s`` so one bad header cannot park a client for hours.

What is retryable, and when to stop early (a deadline, a request that must not be sent twice), stays
with each client: only the waiting is shared.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass
from datetime import UTC

import httpx

RETRY_AFTER_STATUSES = frozenset({429, 503})  # the answers whose Retry-After header is read
RETRY_AFTER_MAX_S = 30.0  # default cap on a server's Retry-After


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date. None when absent or invalid."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if seconds == seconds else None  # NaN -> None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    ref = time.time() if now is None else now
    return max(0.0, when.timestamp() - ref)


def retry_after(resp: httpx.Response) -> float | None:
    """The server's `Retry-After` in seconds when `resp` is a 429 or 503 that carries one, else None."""
    if resp.status_code not in RETRY_AFTER_STATUSES:
        return None
    return parse_retry_after(resp.headers.get("retry-after"))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`retries` after the first attempt (0 = try once), and how long to wait before each."""

    retries: int
    base_s: float
    max_s: float
    retry_after_max_s: float = RETRY_AFTER_MAX_S

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be >= 0")
        if self.base_s < 0 or self.max_s < 0 or self.retry_after_max_s < 0:
            raise ValueError("retry delays must be >= 0")

    def delay(self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry `attempt` (0-based): the server's `retry_after` (capped) when it gave
        one, else a full-jitter draw under the exponential ceiling."""
        if retry_after is not None:
            return min(retry_after, self.retry_after_max_s)
        ceiling = min(self.max_s, self.base_s * (2 ** attempt))
        return (rng or random).uniform(0.0, max(0.0, ceiling))
