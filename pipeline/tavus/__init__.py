"""Tavus REST API v2 client (`TavusClient`), conversation provisioning (`provision`,
`end_conversation`) and the `echo-relay tavus ...` commands (`pipeline.tavus.cli`)."""

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
from pipeline.tavus.provision import (
    END_CONVERSATION_TIMEOUT_S,
    Conversation,
    ProvisionError,
    conversation_id_from_url,
    end_command,
    end_conversation,
    provision,
    safe_error,
)

__all__ = [
    "END_CONVERSATION_TIMEOUT_S",
    "Conversation",
    "ProvisionError",
    "TavusAuthError",
    "TavusClient",
    "TavusConnectionError",
    "TavusError",
    "TavusNotFound",
    "TavusRateLimited",
    "TavusServerError",
    "TavusTimeout",
    "conversation_id_from_url",
    "end_command",
    "end_conversation",
    "provision",
    "safe_error",
]
