"""TavusClient against the fake Tavus server (a real HTTP server on 127.0.0.1)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest
from pydantic import SecretStr

from pipeline.tavus import (
    TavusAuthError,
    TavusClient,
    TavusConnectionError,
    TavusError,
    TavusNotFound,
    TavusRateLimited,
    TavusServerError,
    TavusTimeout,
)
from pipeline.tavus.client import normalize_api_url
from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer

KEY = "tvs-SECRET-key-5f1c0e9d7a"


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeTavusServer]:
    with FakeTavusServer(api_key=KEY) as server:
        yield server


@pytest.fixture
def fake(_server: FakeTavusServer) -> Iterator[FakeTavusServer]:
    _server.reset()
    saved = {k: getattr(_server, k) for k in
             ("persona_get_shape", "end_ended", "unknown_id_status", "require_replica", "replicas")}
    yield _server
    for k, v in saved.items():
        setattr(_server, k, v)
    _server.reset()


def make_client(url: str, key: str | SecretStr = KEY, **kw: object) -> TavusClient:
    opts: dict[str, object] = {"timeout_s": 2.0, "retries": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05}
    opts.update(kw)
    return TavusClient(url, key, **opts)  # type: ignore[arg-type]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


# ------------------------------------------------------------------------------------ personas
async def test_persona_crud_and_request_shape(fake: FakeTavusServer) -> None:
    async with make_client(fake.url) as tavus:
        created = await tavus.create_persona("Echo Bot")
        pid = created["persona_id"]
        assert set(created) == {"persona_id", "persona_name", "created_at"}
        assert created["persona_name"] == "Echo Bot"

        req = fake.requests[-1]
        assert (req.method, req.path) == ("POST", "/v2/personas")
        assert req.json == {"persona_name": "Echo Bot", "pipeline_mode": "echo"}  # None fields omitted
        assert req.api_key_ok and req.headers["x-api-key"] == "***"
        assert req.headers["content-type"] == "application/json"
        assert req.headers["accept"] == "application/json"

        got = await tavus.get_persona(pid)
        assert got["persona_id"] == pid and got["pipeline_mode"] == "echo"
        assert got == fake.personas[pid]

        await tavus.create_persona("Second", default_replica_id=FAKE_REPLICA_ID, layers={"stt": {}},
                                   context="ctx")
        assert fake.requests[-1].json == {"persona_name": "Second", "pipeline_mode": "echo",
                                          "default_replica_id": FAKE_REPLICA_ID, "layers": {"stt": {}},
                                          "context": "ctx"}

        listed = await tavus.list_personas(limit=1, page=2)
        assert fake.requests[-1].query == {"limit": "1", "page": "2"}
        assert listed["total_count"] == 2 and [p["persona_id"] for p in listed["data"]] == [pid]

        await tavus.delete_persona(pid)
        assert pid not in fake.personas
        with pytest.raises(TavusNotFound) as info:
            await tavus.get_persona(pid)
        assert info.value.status == 404 and info.value.message == "Invalid persona_id"


async def test_get_persona_accepts_spec_wrapped_shape(fake: FakeTavusServer) -> None:
    fake.persona_get_shape = "wrapped"
    async with make_client(fake.url) as tavus:
        pid = (await tavus.create_persona("Wrapped"))["persona_id"]
        got = await tavus.get_persona(pid)
    assert got["persona_id"] == pid and got["persona_name"] == "Wrapped" and "data" not in got


async def test_persona_validation_errors(fake: FakeTavusServer) -> None:
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusError) as info:
            await tavus.create_persona("X", default_replica_id="r-nope")
        assert (info.value.status, info.value.message) == (400, "Invalid replica_uuid")
        with pytest.raises(TavusError) as info:
            await tavus.create_persona("Full", pipeline_mode="full")
        assert info.value.status == 400 and "system_prompt" in info.value.message
    assert fake.count("POST /v2/personas") == 2  # 400 is never retried


@pytest.mark.parametrize("suffix", ["", "/", "/v2", "/v2/"])
async def test_base_url_forms(fake: FakeTavusServer, suffix: str) -> None:
    async with make_client(fake.url + suffix) as tavus:
        await tavus.list_personas()
    assert fake.requests[-1].path == "/v2/personas"


def test_normalize_api_url() -> None:
    assert normalize_api_url("https://tavusapi.com/") == "https://tavusapi.com"
    assert normalize_api_url(" https://tavusapi.com/v2/ ") == "https://tavusapi.com"
    with pytest.raises(ValueError):
        normalize_api_url("tavusapi.com")


# ------------------------------------------------------------------------------- conversations
async def test_conversation_lifecycle(fake: FakeTavusServer) -> None:
    persona = fake.add_persona("Echo")
    async with make_client(fake.url) as tavus:
        conv = await tavus.create_conversation(
            persona["persona_id"], replica_id=FAKE_REPLICA_ID, conversation_name="trial",
            require_auth=True, properties={"max_call_duration": 60, "participant_left_timeout": None})
        sent = fake.requests[-1]
        assert (sent.method, sent.path) == ("POST", "/v2/conversations")
        assert sent.json == {"persona_id": persona["persona_id"], "replica_id": FAKE_REPLICA_ID,
                             "conversation_name": "trial", "require_auth": True,
                             "properties": {"max_call_duration": 60}}
        cid = conv["conversation_id"]
        assert conv["status"] == "active"
        assert conv["conversation_url"] == f"https://tavus.daily.co/{cid}"
        assert conv["meeting_token"] and conv["persona_id"] == persona["persona_id"]
        assert {"conversation_name", "replica_id", "created_at", "callback_url"} <= set(conv)

        got = await tavus.get_conversation(cid)
        assert got["status"] == "active" and "events" not in got and "meeting_token" not in got
        assert "verbose" not in fake.requests[-1].query
        verbose = await tavus.get_conversation(cid, verbose=True)
        assert fake.requests[-1].query == {"verbose": "true"} and verbose["events"] == []

        other = await tavus.create_conversation(persona["persona_id"], replica_id=FAKE_REPLICA_ID,
                                                test_mode=True)
        assert other["status"] == "ended" and "meeting_token" not in other
        assert fake.requests[-1].json == {"persona_id": persona["persona_id"], "replica_id": FAKE_REPLICA_ID,
                                          "test_mode": True}

        active = await tavus.list_conversations(status="active")
        assert [c["conversation_id"] for c in active["data"]] == [cid]
        assert fake.requests[-1].query == {"status": "active"}
        assert (await tavus.list_conversations())["total_count"] == 2

        assert await tavus.end_conversation(cid) is True
        assert fake.conversation(cid)["status"] == "ended"
        assert fake.conversation(cid)["ended_by"] == "api"
        assert (await tavus.get_conversation(cid))["status"] == "ended"

        # Ending again is not an error: the fake answers 400, the client checks the status.
        assert await tavus.end_conversation(cid) is False
        assert fake.end_calls(cid) == 2

        await tavus.delete_conversation(cid)
        assert fake.requests[-1].method == "DELETE"
        assert cid not in fake.conversations and fake.conversation(cid)["deleted"] is True
        with pytest.raises(TavusNotFound):
            await tavus.get_conversation(cid)


async def test_end_conversation_when_api_answers_200_again(fake: FakeTavusServer) -> None:
    fake.end_ended = "ok"
    conv = fake.add_conversation(fake.add_persona()["persona_id"], replica_id=FAKE_REPLICA_ID)
    async with make_client(fake.url) as tavus:
        assert await tavus.end_conversation(conv["conversation_id"]) is True
        assert await tavus.end_conversation(conv["conversation_id"]) is True
    assert fake.end_calls(conv["conversation_id"]) == 2


async def test_end_conversation_error_on_active_conversation_is_raised(fake: FakeTavusServer) -> None:
    conv = fake.add_conversation(fake.add_persona()["persona_id"], replica_id=FAKE_REPLICA_ID)
    cid = conv["conversation_id"]
    fake.inject(f"POST /v2/conversations/{cid}/end", status=400, body={"error": "Cannot end right now"})
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusError) as info:
            await tavus.end_conversation(cid)
    assert (info.value.status, info.value.message) == (400, "Cannot end right now")
    assert fake.conversation(cid)["status"] == "active"


async def test_end_unknown_conversation_raises_not_found(fake: FakeTavusServer) -> None:
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusNotFound):
            await tavus.end_conversation("c-unknown")


async def test_conversation_create_errors(fake: FakeTavusServer) -> None:
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusError) as info:
            await tavus.create_conversation("p-does-not-exist", replica_id=FAKE_REPLICA_ID)
        assert type(info.value) is TavusError
        assert (info.value.status, info.value.message) == (400, "Invalid persona_id")
        assert str(info.value) == "HTTP 400: Invalid persona_id"
        pid = fake.add_persona()["persona_id"]
        with pytest.raises(TavusError, match="replica_id is required"):
            await tavus.create_conversation(pid)
        with pytest.raises(TavusError, match="max_call_duration must be an integer"):
            await tavus.create_conversation(pid, replica_id=FAKE_REPLICA_ID,
                                            properties={"max_call_duration": "long"})
    assert fake.count("POST /v2/conversations") == 3  # no retry on 400
    assert fake.conversations == {}


async def test_unknown_id_answered_400_like_the_docs(fake: FakeTavusServer) -> None:
    fake.unknown_id_status = 400
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusError) as info:
            await tavus.get_conversation("c-nope")
    assert (info.value.status, info.value.message) == (400, "Invalid conversation_id")
    assert fake.count() == 1


# ------------------------------------------------------------------------------------- errors
async def test_bad_key_is_401_auth_error_not_retried(fake: FakeTavusServer) -> None:
    async with make_client(fake.url, key="wrong-key") as tavus:
        with pytest.raises(TavusAuthError) as info:
            await tavus.list_personas()
    assert (info.value.status, info.value.message) == (401, "Invalid access token")
    assert fake.count() == 1 and not fake.requests[0].api_key_ok


async def test_404_not_retried(fake: FakeTavusServer) -> None:
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusNotFound) as info:
            await tavus.get_conversation("c-missing")
    assert info.value.status == 404 and info.value.message == "Invalid conversation_id"
    assert fake.count("GET /v2/conversations/c-missing") == 1


@pytest.mark.parametrize(("body", "expected"), [
    ({"error": "from error"}, "from error"),
    ({"message": "from message"}, "from message"),
    ("plain text problem", "plain text problem"),
    ({"detail": "from detail"}, "from detail"),
])
async def test_error_message_sources(fake: FakeTavusServer, body: object, expected: str) -> None:
    fake.inject("GET /v2/personas", status=402, body=body)
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusError) as info:
            await tavus.list_personas()
    assert (info.value.status, info.value.message) == (402, expected)


async def test_403_is_auth_error(fake: FakeTavusServer) -> None:
    fake.inject("GET /v2/personas", status=403, body={"message": "Forbidden"})
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusAuthError):
            await tavus.list_personas()


# ------------------------------------------------------------------------------------ retries
async def test_429_retry_after_seconds_is_honoured(fake: FakeTavusServer) -> None:
    fake.inject("GET /v2/personas", status=429, body={"message": "Too many requests"}, retry_after=1)
    async with make_client(fake.url) as tavus:
        started = time.monotonic()
        page = await tavus.list_personas()
        waited = time.monotonic() - started
    assert page == {"data": [], "total_count": 0}
    assert fake.count("GET /v2/personas") == 2
    assert 0.9 <= waited < 3.0
    first, second = fake.requests
    assert second.at - first.at >= 0.9


async def test_429_retry_after_http_date_and_cap(fake: FakeTavusServer) -> None:
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    fake.inject("GET /v2/personas", status=429, retry_after=when)
    fake.inject("GET /v2/personas", status=429, retry_after=3600)
    async with make_client(fake.url, sleep=record, retry_after_max_s=30.0) as tavus:
        await tavus.list_personas()
    assert fake.count() == 3
    assert 17 <= slept[0] <= 20.5  # HTTP-date, 1 s resolution
    assert slept[1] == 30.0  # capped


async def test_429_forever_raises_rate_limited(fake: FakeTavusServer) -> None:
    fake.inject("GET /v2/personas", status=429, retry_after="0", times=None)
    async with make_client(fake.url, retries=2) as tavus:
        with pytest.raises(TavusRateLimited) as info:
            await tavus.list_personas()
    assert info.value.status == 429 and info.value.retry_after == 0.0
    assert fake.count() == 3


async def test_500_twice_then_success(fake: FakeTavusServer) -> None:
    fault = fake.inject("POST /v2/personas", status=500, times=2)
    async with make_client(fake.url) as tavus:
        created = await tavus.create_persona("Retry")
    assert created["persona_name"] == "Retry"
    assert fault.hits == 2 and fake.count("POST /v2/personas") == 3
    assert len(fake.personas) == 1


async def test_500_forever_raises_server_error(fake: FakeTavusServer) -> None:
    fake.inject(r"/v2/conversations/.*", status=502, body={"error": "bad gateway"}, times=None)
    async with make_client(fake.url, retries=2) as tavus:
        with pytest.raises(TavusServerError) as info:
            await tavus.get_conversation("c1")
    assert (info.value.status, info.value.message) == (502, "bad gateway")
    assert fake.count() == 3


async def test_backoff_delays_are_jittered_and_bounded(fake: FakeTavusServer) -> None:
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    fake.inject("GET /v2/personas", status=503, times=4)
    async with make_client(fake.url, retries=4, sleep=record, backoff_base_s=0.1, backoff_max_s=0.3) as tavus:
        await tavus.list_personas()
    assert len(slept) == 4
    for attempt, delay in enumerate(slept):
        assert 0.0 <= delay <= min(0.3, 0.1 * 2 ** attempt)


async def test_slow_reply_times_out_and_is_retried(fake: FakeTavusServer) -> None:
    fake.inject("GET /v2/personas", delay_s=1.0)
    async with make_client(fake.url, timeout_s=0.2) as tavus:
        page = await tavus.list_personas()
    assert page["total_count"] == 0
    assert fake.count("GET /v2/personas") == 2


async def test_slow_reply_forever_raises_timeout(fake: FakeTavusServer) -> None:
    fake.inject("GET /v2/personas", delay_s=1.0, times=None)
    async with make_client(fake.url, timeout_s=0.15, retries=1) as tavus:
        with pytest.raises(TavusTimeout) as info:
            await tavus.list_personas()
    assert isinstance(info.value, TavusConnectionError) and info.value.status is None
    assert fake.count() == 2


async def test_create_conversation_read_timeout_is_not_retried(fake: FakeTavusServer) -> None:
    # The request reached Tavus: a retry could create a second, billed conversation.
    pid = fake.add_persona()["persona_id"]
    fake.inject("POST /v2/conversations", delay_s=1.0)
    async with make_client(fake.url, timeout_s=0.2) as tavus:
        with pytest.raises(TavusTimeout):
            await tavus.create_conversation(pid, replica_id=FAKE_REPLICA_ID)
    assert fake.count("POST /v2/conversations") == 1


async def test_create_conversation_503_is_retried(fake: FakeTavusServer) -> None:
    pid = fake.add_persona()["persona_id"]
    fake.inject("POST /v2/conversations", status=503)
    async with make_client(fake.url) as tavus:
        conv = await tavus.create_conversation(pid, replica_id=FAKE_REPLICA_ID)
    assert conv["status"] == "active"
    assert fake.count("POST /v2/conversations") == 2 and len(fake.conversations) == 1


async def test_connection_refused_is_retried_then_raises() -> None:
    slept: list[float] = []

    async def record(delay: float) -> None:
        slept.append(delay)

    url = f"http://127.0.0.1:{free_port()}"
    async with make_client(url, retries=2, sleep=record) as tavus:
        with pytest.raises(TavusConnectionError) as info:
            await tavus.create_conversation("p1")
    assert len(slept) == 2
    assert info.value.status is None and "cannot reach Tavus" in info.value.message


async def test_no_retry_on_400(fake: FakeTavusServer) -> None:
    fake.inject("GET /v2/personas", status=400, body={"error": "Invalid limit"}, times=None)
    async with make_client(fake.url) as tavus:
        with pytest.raises(TavusError):
            await tavus.list_personas()
    assert fake.count() == 1


# --------------------------------------------------------------------------------- robustness
async def test_mock_transport_bare_list_and_empty_bodies() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["x-api-key"] == KEY
        if request.url.path == "/v2/conversations":
            return httpx.Response(200, json=[{"conversation_id": "c1"}])
        return httpx.Response(200, content=b"")

    async with TavusClient("https://example.test", KEY, transport=httpx.MockTransport(handler)) as tavus:
        assert await tavus.list_conversations() == {"data": [{"conversation_id": "c1"}], "total_count": 1}
        assert await tavus.end_conversation("c1") is True


def test_empty_key_rejected() -> None:
    with pytest.raises(ValueError, match="TAVUS_API_KEY"):
        TavusClient("https://tavusapi.com", "  ")
    with pytest.raises(ValueError):
        TavusClient("https://tavusapi.com", SecretStr(""))


# ------------------------------------------------------------------------------ secret hygiene
async def test_api_key_never_in_logs_errors_or_repr(fake: FakeTavusServer,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)  # root: httpx, httpcore and ours
    caplog.set_level(logging.DEBUG, logger="httpx")  # whatever set-up an earlier test in this process left
    errors: list[TavusError] = []
    pid = fake.add_persona()["persona_id"]
    # An error body that echoes the key back must not carry it into our messages.
    fake.inject("GET /v2/personas", status=400, body={"error": f"bad key {KEY} used"})
    fake.inject("POST /v2/conversations", status=500, times=1)
    fake.inject("GET /v2/conversations", status=429, retry_after="0")
    fake.inject(r"/v2/conversations/c-slow", delay_s=1.0, times=None)
    tavus = make_client(fake.url, SecretStr(KEY), timeout_s=0.2, retries=1)
    async with tavus:
        for call in (tavus.list_personas(), tavus.get_persona("p-none"), tavus.get_conversation("c-slow")):
            try:
                await call
            except TavusError as exc:
                errors.append(exc)
        conv = await tavus.create_conversation(pid, replica_id=FAKE_REPLICA_ID)
        await tavus.list_conversations()
        await tavus.end_conversation(conv["conversation_id"])
        await tavus.end_conversation(conv["conversation_id"])
    async with make_client(fake.url, key=KEY + "x", retries=0) as bad:
        try:
            await bad.list_personas()
        except TavusError as exc:
            errors.append(exc)
    async with make_client(f"http://127.0.0.1:{free_port()}", retries=0) as down:
        try:
            await down.list_personas()
        except TavusError as exc:
            errors.append(exc)

    assert len(errors) == 5
    assert errors[0].message == "bad key *** used" and KEY not in str(errors[0].body)
    loggers = {r.name for r in caplog.records}
    assert {"httpx", "pipeline.tavus.client"} <= loggers and any(n.startswith("httpcore") for n in loggers)
    everything = [caplog.text, repr(tavus), str(vars(tavus))]
    for error in errors:
        everything += [str(error), repr(error), repr(error.args), str(error.body), str(error.__cause__),
                       str(error.__context__)]
    for record in caplog.records:
        everything += [record.getMessage(), repr(record.args), str(record.__dict__)]
    for text in everything:
        assert KEY not in text
    assert "api_key=***" in repr(tavus)
    assert all(r.headers.get("x-api-key") in ("***", None) for r in fake.requests)
