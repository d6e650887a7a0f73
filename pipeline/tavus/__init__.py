"""Tavus REST API v2 client (`TavusClient`) and the `echo-relay tavus ...` commands (`pipeline.tavus.cli`)."""

from pipeline.tavus.client import (
    TavusAuthError,
    TavusClient,
    TavusConnectionError,
    TavusError,
    TavusNotFound,
    TavusRateLimited,
    TavusServerError,
    TavusTimeout,
)

__all__ = [
    "TavusAuthError",
    "TavusClient",
    "TavusConnectionError",
    "TavusError",
    "TavusNotFound",
    "TavusRateLimited",
    "TavusServerError",
    "TavusTimeout",
]
