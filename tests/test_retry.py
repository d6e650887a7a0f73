"""The shared retry policy (pipeline/retry.py): Retry-After parsing and the backoff delays."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from pipeline.retry import RETRY_AFTER_MAX_S, RetryPolicy, parse_retry_after, retry_after


def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("1.5") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("  ") is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("nan") is None
    http_date = format_datetime(now + timedelta(seconds=42), usegmt=True)
    assert parse_retry_after(http_date, now=now.timestamp()) == pytest.approx(42.0)
    assert parse_retry_after(format_datetime(now - timedelta(seconds=42), usegmt=True),
                             now=now.timestamp()) == 0.0


@pytest.mark.parametrize(("status", "expected"), [(429, 7.0), (503, 7.0), (500, None), (200, None)])
def test_retry_after_is_read_on_429_and_503_only(status: int, expected: float | None) -> None:
    assert retry_after(httpx.Response(status, headers={"Retry-After": "7"})) == expected
    assert retry_after(httpx.Response(status)) is None


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    policy = RetryPolicy(retries=6, base_s=0.1, max_s=0.5)
    rng = random.Random(7)
    for attempt in range(6):
        ceiling = min(0.5, 0.1 * 2 ** attempt)
        draws = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in draws)
        assert max(draws) > 0.8 * ceiling and min(draws) < 0.2 * ceiling  # spread over the whole range


def test_retry_after_wins_and_is_capped() -> None:
    policy = RetryPolicy(retries=3, base_s=0.1, max_s=0.5, retry_after_max_s=4.0)
    assert policy.delay(0, retry_after=2.5) == 2.5  # no jitter: the server said when
    assert policy.delay(2, retry_after=3600.0) == 4.0
    assert RetryPolicy(retries=1, base_s=0.1, max_s=1.0).delay(0, 1e6) == RETRY_AFTER_MAX_S


def test_negative_values_are_refused() -> None:
    with pytest.raises(ValueError, match="retries"):
        RetryPolicy(retries=-1, base_s=0.1, max_s=1.0)
    with pytest.raises(ValueError, match="delays"):
        RetryPolicy(retries=1, base_s=-0.1, max_s=1.0)
