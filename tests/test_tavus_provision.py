"""pipeline.tavus.provision against the fake Tavus server (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from pipeline.config import TavusSettings
from pipeline.tavus import (
    Conversation,
    ProvisionError,
    TavusClient,
    conversation_id_from_url,
    end_command,
    end_conversation,
    provision,
    safe_error,
)
from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer

KEY = "tvs-SECRET-key-9a8b7c6d5e"
LOGGER = "pipeline.tavus.provision"


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeTavusServer]:
    with FakeTavusServer(api_key=KEY) as server:
        yield server


@pytest.fixture
def fake(_server: FakeTavusServer) -> Iterator[FakeTavusServer]:
    _server.reset()
    yield _server
    _server.reset()


def settings(fake: FakeTavusServer | None = None, **fields: Any) -> TavusSettings:
    base: dict[str, Any] = {"api_url": fake.url if fake is not None else "http://127.0.0.1:9",
                            "api_key": KEY, "timeout_s": 2.0, "retries": 0}
    base.update(fields)
    return TavusSettings(**base)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# ------------------------------------------------------------------------------- join as given
async def test_join_as_given_without_api_calls(fake: FakeTavusServer) -> None:
    t = settings(fake, conversation_url="https://tavus.daily.co/c0given01?t=secret-in-url",
                 meeting_token="tok-123", persona_name="Given Persona")
    conv = await provision(t)
    assert conv == Conversation(url="https://tavus.daily.co/c0given01?t=secret-in-url", meeting_token="tok-123",
                                conversation_id="c0given01", persona_name="Given Persona", persona_id=None,
                                created=False)
    assert fake.count() == 0  # no persona_id: nothing to ask Tavus
    assert "tok-123" not in repr(conv) and "secret-in-url" not in repr(conv)

    explicit = await provision(settings(None, api_key=None, conversation_url="https://tavus.daily.co/x",
                                        conversation_id="c-explicit"))
    assert explicit.conversation_id == "c-explicit" and explicit.meeting_token is None


async def test_join_as_given_reads_the_persona_name(fake: FakeTavusServer) -> None:
    persona = fake.add_persona("Stored Name")
    t = settings(fake, conversation_url="https://tavus.daily.co/c0given02", persona_id=persona["persona_id"])
    conv = await provision(t)
    assert conv.persona_name == "Stored Name" and conv.persona_id == persona["persona_id"]
    assert not conv.created and fake.count(f"GET /v2/personas/{persona['persona_id']}") == 1
    assert fake.count("POST /v2/.*") == 0

    # A replica_name from the settings names the replica: no lookup needed.
    fake.reset()
    conv = await provision(t, replica_name="Room Name")
    assert conv.persona_name == "Room Name" and fake.count() == 0


async def test_join_as_given_persona_lookup_failure_falls_back(fake: FakeTavusServer,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    t = settings(fake, conversation_url="https://tavus.daily.co/c0given03", persona_id="p-unknown",
                 persona_name="Fallback Name")
    conv = await provision(t)
    assert conv.persona_name == "Fallback Name" and conv.conversation_id == "c0given03"
    [warning] = warnings(caplog)
    assert "could not read persona p-unknown" in warning and "'Fallback Name'" in warning
    assert KEY not in caplog.text


# ------------------------------------------------------------------------------------- create
async def test_create_with_an_existing_persona(fake: FakeTavusServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    persona = fake.add_persona("Echo Face", default_replica_id=FAKE_REPLICA_ID)
    conv = await provision(settings(fake, persona_id=persona["persona_id"]))
    assert conv.created and conv.persona_id == persona["persona_id"] and conv.persona_name == "Echo Face"
    assert conv.conversation_id is not None and conv.meeting_token is None
    stored = fake.conversation(conv.conversation_id)
    assert stored["status"] == "active" and stored["conversation_url"] == conv.url
    assert stored["persona_id"] == persona["persona_id"]
    assert fake.count("POST /v2/personas") == 0
    assert warnings(caplog) == []  # an echo persona
    assert f"created Tavus conversation {conv.conversation_id}" in caplog.text


async def test_create_with_a_non_echo_persona_warns(fake: FakeTavusServer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    persona = fake.add_persona("Full Persona", pipeline_mode="full", system_prompt="hi",
                               default_replica_id=FAKE_REPLICA_ID)
    conv = await provision(settings(fake, persona_id=persona["persona_id"]))
    assert conv.created
    [warning] = warnings(caplog)
    assert "pipeline_mode='full', not 'echo'" in warning and persona["persona_id"] in warning


async def test_create_a_new_echo_persona(fake: FakeTavusServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    conv = await provision(settings(fake, persona_name="New Echo", replica_id=FAKE_REPLICA_ID))
    [(pid, persona)] = fake.personas.items()
    assert persona["persona_name"] == "New Echo" and persona["pipeline_mode"] == "echo"
    assert conv.persona_id == pid and conv.persona_name == "New Echo" and conv.created
    assert fake.conversation(conv.conversation_id or "")["persona_id"] == pid
    assert f"created echo persona {pid} named 'New Echo'" in caplog.text

    # The caller's replica_name still names the replica in the room.
    conv = await provision(settings(fake, persona_id=pid, replica_id=FAKE_REPLICA_ID), replica_name="Other")
    assert conv.persona_name == "Other" and conv.persona_id == pid


async def test_properties_are_passed_through(fake: FakeTavusServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    persona = fake.add_persona("Props")
    conv = await provision(settings(
        fake, persona_id=persona["persona_id"], replica_id=FAKE_REPLICA_ID, conversation_name="my-call",
        max_call_duration=600, participant_left_timeout=10, participant_absent_timeout=30, test_mode=True))
    body = fake.conversation(conv.conversation_id or "")["request"]
    assert body == {"persona_id": persona["persona_id"], "replica_id": FAKE_REPLICA_ID,
                    "conversation_name": "my-call", "test_mode": True,
                    "properties": {"max_call_duration": 600, "participant_left_timeout": 10,
                                   "participant_absent_timeout": 30}}
    assert any("tavus.test_mode is on" in w for w in warnings(caplog))

    # Unset options are not sent at all (Tavus's defaults apply).
    conv = await provision(settings(fake, persona_id=persona["persona_id"], replica_id=FAKE_REPLICA_ID))
    body = fake.conversation(conv.conversation_id or "")["request"]
    assert body == {"persona_id": persona["persona_id"], "replica_id": FAKE_REPLICA_ID,
                    "conversation_name": "echo-relay"}


async def test_client_factory_is_used(fake: FakeTavusServer) -> None:
    calls: list[tuple[Any, ...]] = []

    def factory(api_url: str, api_key: str, **kw: Any) -> TavusClient:
        calls.append((api_url, kw))
        return TavusClient(api_url, api_key, **kw)

    persona = fake.add_persona("Factory", default_replica_id=FAKE_REPLICA_ID)
    t = settings(fake, persona_id=persona["persona_id"], timeout_s=3.0, retries=1)
    conv = await provision(t, client_factory=factory)
    assert calls == [(fake.url, {"timeout_s": 3.0, "retries": 1})]
    assert await end_conversation(t, conv.conversation_id or "", client_factory=factory, timeout_s=2.0)
    assert calls[1] == (fake.url, {"timeout_s": 2.0, "retries": 1})  # per-request timeout fits the budget


# ------------------------------------------------------------------------------------- errors
async def test_missing_api_key() -> None:
    with pytest.raises(ProvisionError) as err:
        await provision(settings(None, api_key=None))
    assert str(err.value) == err.value.message == (
        "the daily sink needs tavus.api_key (env TAVUS_API_KEY) to create a conversation, "
        "or tavus.conversation_url to join an existing one")
    with pytest.raises(ProvisionError, match=r"tavus\.api_key"):
        await provision(settings(None, api_key=""))


async def test_api_errors_never_show_the_key(fake: FakeTavusServer) -> None:
    with pytest.raises(ProvisionError) as err:
        await provision(settings(fake, api_key="wrong-secret-key"))
    assert str(err.value).startswith("Tavus API:") and "401" in str(err.value)
    assert "wrong-secret-key" not in str(err.value)

    # An error body echoing the key is redacted by the client.
    fake.inject("POST /v2/personas", status=400, body={"error": f"bad request with key {KEY}"})
    with pytest.raises(ProvisionError) as err:
        await provision(settings(fake))
    assert str(err.value).startswith("Tavus API:") and "bad request with key ***" in str(err.value)
    assert KEY not in str(err.value)

    with pytest.raises(ProvisionError, match=r"^Tavus API: .*cannot reach Tavus"):
        await provision(settings(None, api_url=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(ProvisionError, match=r"^Tavus API: HTTP 404: Invalid persona_id$"):
        await provision(settings(fake, persona_id="p-missing"))


async def test_answer_without_conversation_url(fake: FakeTavusServer) -> None:
    persona = fake.add_persona("NoUrl", default_replica_id=FAKE_REPLICA_ID)
    fake.inject("POST /v2/conversations", status=200, body={"conversation_id": "c0nourl", "status": "active"})
    with pytest.raises(ProvisionError) as err:
        await provision(settings(fake, persona_id=persona["persona_id"]))
    text = str(err.value)
    assert text.startswith("Tavus API: create conversation answered without conversation_id/conversation_url")
    assert end_command("c0nourl") in text  # the user can end it if it exists

    fake.inject("POST /v2/conversations", status=200, body={"status": "active"})
    with pytest.raises(ProvisionError, match=r"answered without conversation_id/conversation_url$"):
        await provision(settings(fake, persona_id=persona["persona_id"]))


# --------------------------------------------------------------------------------------- end
async def test_end_conversation_ends_it(fake: FakeTavusServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    persona = fake.add_persona("Ender", default_replica_id=FAKE_REPLICA_ID)
    t = settings(fake, persona_id=persona["persona_id"])
    conv = await provision(t)
    cid = conv.conversation_id or ""
    assert await end_conversation(t, cid) is True
    assert fake.conversation(cid)["status"] == "ended" and fake.end_calls(cid) == 1
    assert f"ended Tavus conversation {cid}" in caplog.text
    # Already ended (the fake answers 400, the client reads it back): still True, no warning.
    assert await end_conversation(t, cid) is True
    assert fake.end_calls(cid) == 2 and warnings(caplog) == []


async def test_end_conversation_unreachable_returns_false_in_time(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    # Default retries (3, backoff from 0.5 s) would take longer than the budget: the budget wins.
    t = settings(None, api_url=f"http://127.0.0.1:{free_port()}", retries=3, timeout_s=15.0)
    t0 = time.monotonic()
    assert await end_conversation(t, "c0gone", timeout_s=0.5) is False
    assert time.monotonic() - t0 < 1.5
    [warning] = warnings(caplog)
    assert "could not end Tavus conversation c0gone" in warning
    assert "it ends by itself after participant_left_timeout" in warning
    assert end_command("c0gone") in warning and KEY not in caplog.text


async def test_end_conversation_slow_server_is_bounded(fake: FakeTavusServer,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    persona = fake.add_persona("Slow", default_replica_id=FAKE_REPLICA_ID)
    t = settings(fake, persona_id=persona["persona_id"], timeout_s=15.0)
    conv = await provision(t)
    fake.inject(r"POST /v2/conversations/.*/end", delay_s=3.0)
    t0 = time.monotonic()
    assert await end_conversation(t, conv.conversation_id or "", timeout_s=0.3) is False
    assert time.monotonic() - t0 < 1.3
    [warning] = warnings(caplog)
    assert "participant_left_timeout" in warning and end_command(conv.conversation_id or "") in warning


async def test_end_conversation_without_key_or_id_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert await end_conversation(settings(None, api_key=None), "c0nokey") is False
    assert await end_conversation(settings(None), "") is False
    assert len(warnings(caplog)) == 2 and "no tavus.api_key" in warnings(caplog)[0]


# ----------------------------------------------------------------------------------- helpers
def test_end_command_uses_the_cli() -> None:
    assert end_command("c123abc") == "echo-relay tavus conversations end c123abc"
    assert end_command("c1; rm -rf /") == "echo-relay tavus conversations end 'c1; rm -rf /'"


def test_conversation_id_from_url() -> None:
    assert conversation_id_from_url("https://tavus.daily.co/c123") == "c123"
    assert conversation_id_from_url("https://tavus.daily.co/c123/?t=tok") == "c123"
    assert conversation_id_from_url("https://tavus.daily.co/") is None
    assert conversation_id_from_url("http://[::1") is None  # urlsplit raises ValueError


def test_safe_error() -> None:
    assert safe_error(TimeoutError()) == "TimeoutError"
    assert safe_error(ValueError("x" * 600)) == "x" * 500
