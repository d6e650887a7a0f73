"""Which Tavus conversation echo-relay joins, and ending the one it created.

Moved out of the Daily sink (`pipeline/sink/daily.py`) so the sink is about the room only:

- `provision(tavus)`: `tavus.conversation_url` (+ `conversation_id`, `meeting_token`) is joined as
  given; the persona's name is read from Tavus when `tavus.persona_id` and `tavus.api_key` are set
  (and no `replica_name` overrides it), because the replica joins the room under that name. Otherwise
  a conversation is created through the Tavus REST client (`pipeline/tavus/client.py`), reusing
  `tavus.persona_id` or creating an echo persona named `tavus.persona_name`.
- `end_conversation(tavus, id)`: ends it, bounded by `timeout_s` as a whole (it also runs on a
  second Ctrl-C with a short budget); never raises, warns with the remedy instead.
- `end_command(id)`: the `echo-relay tavus conversations end ID` line (`pipeline/tavus/cli.py`).

Failures surface as `ProvisionError` (a user-facing message, never the API key); the sink turns it
into its SinkError.
"""

from __future__ import annotations

import asyncio
import logging
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pipeline import langcodes
from pipeline.daily_room import redact_url

if TYPE_CHECKING:
    from pipeline.config import AsrSettings, TavusSettings

log = logging.getLogger(__name__)

END_CONVERSATION_TIMEOUT_S = 20.0
"""Default bound for `end_conversation` (the value the Daily sink used)."""

MISSING_KEY_MESSAGE = ("the daily sink needs tavus.api_key (env TAVUS_API_KEY) to create a "
                       "conversation, or tavus.conversation_url to join an existing one")
_SAFE_ERROR_CHARS = 500


class ProvisionError(Exception):
    """No conversation to join. `str(exc)` / `message` is meant for the user as is."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, repr=False)
class Conversation:
    """The conversation to join.

    `persona_name` is the name the replica has in the room (its Daily `userName`): the caller's
    `replica_name` when given, else the persona's name as Tavus reports it, else
    `tavus.persona_name`. `created` is True when this process created the conversation (so it may
    end it on exit).
    """

    url: str
    meeting_token: str | None
    conversation_id: str | None
    persona_name: str
    persona_id: str | None
    created: bool

    def __repr__(self) -> str:
        # The URL may carry a meeting token (`?t=`) and the token is a secret: keep both out of logs.
        token = "***" if self.meeting_token else None
        return (f"Conversation(url={redact_url(self.url)!r}, meeting_token={token!r}, "
                f"conversation_id={self.conversation_id!r}, persona_name={self.persona_name!r}, "
                f"persona_id={self.persona_id!r}, created={self.created!r})")


def conversation_id_from_url(url: str) -> str | None:
    """Tavus rooms are https://tavus.daily.co/<conversation_id>."""
    try:
        path = urlsplit(url).path.strip("/")
    except ValueError:
        return None
    return path.rsplit("/", 1)[-1] or None


def safe_error(exc: BaseException) -> str:
    """An error text for logs that cannot carry the API key (it is never put in messages anyway)."""
    text = str(exc) or type(exc).__name__
    return text[:_SAFE_ERROR_CHARS]


def end_command(conversation_id: str) -> str:
    """The shell command that ends `conversation_id` by hand (`pipeline/tavus/cli.py`, needs TAVUS_API_KEY)."""
    return f"echo-relay tavus conversations end {shlex.quote(conversation_id)}"


def _client(tavus: TavusSettings, api_key: str, client_factory: Callable[..., Any] | None,
            timeout_s: float | None = None) -> Any:
    """A Tavus client (an async context manager); `client_factory` has `TavusClient`'s signature."""
    factory = client_factory
    if factory is None:
        from pipeline.tavus.client import TavusClient
        factory = TavusClient
    return factory(tavus.api_url, api_key, timeout_s=timeout_s or tavus.timeout_s, retries=tavus.retries)


def _api_key(tavus: TavusSettings) -> str | None:
    return tavus.api_key.get_secret_value() if tavus.api_key is not None else None


def conversation_language(tavus: TavusSettings, asr: AsrSettings, written: str | None = None,
                          model_only: str | None = None) -> str:
    """Tavus's `properties.language` for a conversation the relay creates (shared/reference B.4: a full name or
    `multilingual`): `tavus.language` when set, else the language the transform chain writes (`written`: the
    last `transform.steps[i].output_language`), else `english` under asr.task translate (the echoes are
    English), the one language the loaded model writes (`model_only`, AsrEngine.only_language: an English-only
    model, whatever asr.language says), the configured asr.language's name, the one name of a one-language
    asr.languages, or `multilingual` for auto (the lock comes later than the conversation, which cannot be
    changed then)."""
    if tavus.language:
        return tavus.language
    if written is not None:
        return langcodes.name(written)
    if asr.task == "translate":
        return langcodes.name("en")
    if model_only is not None:
        return langcodes.name(model_only)
    if asr.language is not None:
        return langcodes.name(asr.language)
    if asr.languages is not None and len(asr.languages) == 1:
        return langcodes.name(asr.languages[0])
    return langcodes.MULTILINGUAL


async def provision(tavus: TavusSettings, *, replica_name: str | None = None,
                    client_factory: Callable[..., Any] | None = None, language: str | None = None) -> Conversation:
    """Join `tavus.conversation_url` as given, or create a conversation (see the module docstring).

    `replica_name` (`sink.daily.replica_name`) names the replica in the room; when set, the
    persona is not looked up for a given conversation. `language` is the created conversation's
    `properties.language` (`conversation_language`; None: not sent). Raises `ProvisionError`.
    """
    api_key = _api_key(tavus)
    if tavus.conversation_url:
        return await _join_given(tavus, api_key, replica_name, client_factory)
    if not api_key:
        raise ProvisionError(MISSING_KEY_MESSAGE)
    try:
        async with _client(tavus, api_key, client_factory) as client:
            if tavus.persona_id:
                persona = await client.get_persona(tavus.persona_id)
                persona_id = tavus.persona_id
                persona_name = str(persona.get("persona_name") or tavus.persona_name)
                mode = persona.get("pipeline_mode")
                if mode is not None and mode != "echo":
                    log.warning("persona %s has pipeline_mode=%r, not 'echo': echoes may be ignored",
                                persona_id, mode)
            else:
                persona = await client.create_persona(tavus.persona_name, pipeline_mode="echo")
                persona_id = str(persona["persona_id"])
                persona_name = str(persona.get("persona_name") or tavus.persona_name)
                log.info("created echo persona %s named %r (set tavus.persona_id to reuse it)",
                         persona_id, persona_name)
            properties = {k: getattr(tavus, k) for k in
                          ("max_call_duration", "participant_left_timeout", "participant_absent_timeout")
                          if getattr(tavus, k) is not None}
            if language is not None:
                properties["language"] = language
            conversation = await client.create_conversation(
                persona_id, replica_id=tavus.replica_id, conversation_name=tavus.conversation_name,
                test_mode=True if tavus.test_mode else None, properties=properties or None)
    except Exception as exc:
        raise ProvisionError(f"Tavus API: {safe_error(exc)}") from None
    try:
        conversation_id = str(conversation["conversation_id"])
        url = str(conversation["conversation_url"])
    except (KeyError, TypeError):
        message = "Tavus API: create conversation answered without conversation_id/conversation_url"
        known = conversation.get("conversation_id") if isinstance(conversation, dict) else None
        if known:  # it may exist and bill until it times out: say how to end it
            message += f" (if conversation {known} exists, end it with: {end_command(str(known))})"
        raise ProvisionError(message) from None
    token = conversation.get("meeting_token")
    log.info("created Tavus conversation %s (%s)", conversation_id, redact_url(url))
    if tavus.test_mode:
        log.warning("tavus.test_mode is on: the replica does not join, so echoes cannot be delivered")
    return Conversation(url=url, meeting_token=str(token) if token else None,
                        conversation_id=conversation_id, persona_name=replica_name or persona_name,
                        persona_id=persona_id, created=True)


async def _join_given(tavus: TavusSettings, api_key: str | None, replica_name: str | None,
                      client_factory: Callable[..., Any] | None) -> Conversation:
    url = tavus.conversation_url or ""
    conversation_id = tavus.conversation_id or conversation_id_from_url(url)
    token = tavus.meeting_token.get_secret_value() if tavus.meeting_token is not None else None
    persona_name = tavus.persona_name
    if tavus.persona_id and api_key and not replica_name:
        # The replica joins under its persona's name, which may differ from tavus.persona_name.
        try:
            async with _client(tavus, api_key, client_factory) as client:
                persona = await client.get_persona(tavus.persona_id)
            persona_name = str(persona.get("persona_name") or persona_name)
        except Exception as exc:
            log.warning("could not read persona %s (%s); recognising the replica by "
                        "tavus.persona_name=%r", tavus.persona_id, safe_error(exc), persona_name)
    log.info("using the given conversation %s (%s)", conversation_id, redact_url(url))
    return Conversation(url=url, meeting_token=token, conversation_id=conversation_id,
                        persona_name=replica_name or persona_name, persona_id=tavus.persona_id,
                        created=False)


async def end_conversation(tavus: TavusSettings, conversation_id: str, *,
                           client_factory: Callable[..., Any] | None = None,
                           timeout_s: float = END_CONVERSATION_TIMEOUT_S) -> bool:
    """End the conversation; True when it is ended (an already-ended one counts).

    Takes at most about `timeout_s` (connecting, retries and all). On failure it logs a warning
    with the remedy and returns False; it never raises (cancellation of the caller still propagates).
    """
    remedy = (f"it ends by itself after participant_left_timeout, or end it now with: "
              f"{end_command(conversation_id)}" if conversation_id else
              "it ends by itself after participant_left_timeout")
    api_key = _api_key(tavus)
    if not conversation_id or not api_key:
        what = "no conversation_id" if not conversation_id else "no tavus.api_key"
        log.warning("could not end Tavus conversation %s: %s (%s)", conversation_id or "?", what, remedy)
        return False
    try:
        async with asyncio.timeout(timeout_s):
            # The per-request timeout fits the budget, so a slow answer reports itself as such.
            async with _client(tavus, api_key, client_factory,
                               timeout_s=min(tavus.timeout_s, max(timeout_s, 0.001))) as client:
                ended_now = await client.end_conversation(conversation_id)
    except TimeoutError:
        log.warning("could not end Tavus conversation %s: no answer within %g s (%s)",
                    conversation_id, timeout_s, remedy)
        return False
    except Exception as exc:
        log.warning("could not end Tavus conversation %s: %s (%s)", conversation_id, safe_error(exc), remedy)
        return False
    if ended_now is not False:  # False = it had already ended (the client logs that)
        log.info("ended Tavus conversation %s", conversation_id)
    return True
