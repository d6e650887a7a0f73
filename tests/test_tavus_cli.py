"""`echo-relay tavus ...` end to end against the fake Tavus server."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pipeline.config import load_settings
from pipeline.tavus.cli import add_tavus_parser, main, run_tavus
from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer

KEY = "tvs-cli-SECRET-93b1c2"


@pytest.fixture(scope="module")
def _server() -> Iterator[FakeTavusServer]:
    with FakeTavusServer(api_key=KEY) as server:
        yield server


@pytest.fixture
def fake(_server: FakeTavusServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTavusServer]:
    _server.reset()
    monkeypatch.setenv("TAVUS_API_URL", _server.url)
    monkeypatch.setenv("TAVUS_API_KEY", KEY)
    yield _server
    _server.reset()


def run(capsys: pytest.CaptureFixture[str], *argv: str, settings: Any = None) -> tuple[int, str, str]:
    code = main(["tavus", *argv], settings=settings)
    out, err = capsys.readouterr()
    assert KEY not in out and KEY not in err
    return code, out, err


def direct_get(server: FakeTavusServer, path: str, **params: str) -> Any:
    """What Tavus (the fake) answers, fetched without our client."""
    resp = httpx.get(server.url + path, headers={"x-api-key": KEY}, params=params)
    resp.raise_for_status()
    return resp.json()


# ------------------------------------------------------------------------------------ personas
def test_personas_create_list_get_delete(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "personas", "create", "--name", "Echo Bot", "--replica", FAKE_REPLICA_ID)
    assert code == 0 and err == ""
    (pid,) = fake.personas
    assert out.strip() == f"Created persona {pid} (name 'Echo Bot', pipeline_mode echo)"
    assert fake.requests[-1].json == {"persona_name": "Echo Bot", "pipeline_mode": "echo",
                                      "default_replica_id": FAKE_REPLICA_ID}
    assert fake.requests[-1].api_key_ok

    code, out, _ = run(capsys, "personas", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["persona_id", "persona_name", "pipeline_mode",
                                              "default_replica_id", "created_at"]
    assert pid in lines[1] and "Echo Bot" in lines[1] and lines[-1] == "(1 persona)"

    code, out, _ = run(capsys, "personas", "get", pid)
    assert code == 0
    fields = dict(line.split(None, 1) for line in out.splitlines() if len(line.split(None, 1)) == 2)
    assert fields["persona_id"] == pid and fields["pipeline_mode"] == "echo"

    code, out, _ = run(capsys, "personas", "delete", pid)
    assert (code, out.strip()) == (0, f"Deleted persona {pid}") and fake.personas == {}


def test_personas_create_defaults_to_config_name(fake: FakeTavusServer,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(capsys, "personas", "create")
    assert code == 0
    assert fake.requests[-1].json == {"persona_name": "echo-relay", "pipeline_mode": "echo"}


def test_personas_json_equals_server_json(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "personas", "create", "--name", "J", "--json")
    assert code == 0
    created = json.loads(out)
    pid = created["persona_id"]
    assert created == {k: fake.personas[pid][k] for k in ("persona_id", "persona_name", "created_at")}
    fake.add_persona("Other")

    code, out, _ = run(capsys, "personas", "list", "--json")
    assert code == 0 and json.loads(out) == direct_get(fake, "/v2/personas")
    code, out, _ = run(capsys, "personas", "list", "--limit", "1", "--page", "2", "--json")
    assert json.loads(out) == direct_get(fake, "/v2/personas", limit="1", page="2")
    code, out, _ = run(capsys, "personas", "get", pid, "--json")
    assert code == 0 and json.loads(out) == direct_get(fake, f"/v2/personas/{pid}")
    code, out, _ = run(capsys, "personas", "delete", pid, "--json")
    assert code == 0 and json.loads(out) == {"persona_id": pid, "deleted": True}


# ------------------------------------------------------------------------------- conversations
def test_conversations_full_cycle(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str]) -> None:
    pid = fake.add_persona("Echo")["persona_id"]
    code, out, err = run(capsys, "conversations", "create", "--persona", pid, "--replica", FAKE_REPLICA_ID,
                         "--name", "demo", "--require-auth", "--callback-url", "https://example.test/hook",
                         "--max-call-duration", "120")
    assert code == 0 and err == ""
    (cid,) = fake.conversations
    assert fake.requests[-1].json == {
        "persona_id": pid, "replica_id": FAKE_REPLICA_ID, "conversation_name": "demo",
        "callback_url": "https://example.test/hook", "require_auth": True,
        "properties": {"max_call_duration": 120, "language": "english"}}  # asr.language en (the default)
    assert out.splitlines()[0] == f"Created conversation {cid} (active)"
    assert f"conversation_url: https://tavus.daily.co/{cid}" in out
    assert f"meeting_token: {fake.conversation(cid)['meeting_token']}" in out
    assert f"echo-relay tavus conversations end {cid}" in out

    code, out, _ = run(capsys, "conversations", "list", "--status", "active")
    assert code == 0 and cid in out and out.splitlines()[-1] == "(1 conversation)"
    assert fake.requests[-1].query == {"status": "active"}

    code, out, _ = run(capsys, "conversations", "get", cid)
    assert code == 0 and "status" in out and "active" in out

    code, out, _ = run(capsys, "conversations", "end", cid)
    assert (code, out.strip()) == (0, f"Ended conversation {cid}")
    assert fake.conversation(cid)["status"] == "ended"
    code, out, _ = run(capsys, "conversations", "end", cid)
    assert (code, out.strip()) == (0, f"Conversation {cid} had already ended")

    code, out, _ = run(capsys, "conversations", "list", "--status", "active")
    assert code == 0 and cid not in out and out.splitlines()[-1] == "(0 conversations)"

    code, out, _ = run(capsys, "conversations", "delete", cid)
    assert (code, out.strip()) == (0, f"Deleted conversation {cid}")
    assert fake.conversation(cid)["deleted"] is True


def test_conversations_json_equals_server_json(fake: FakeTavusServer,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    pid = fake.add_persona("Echo", default_replica_id=FAKE_REPLICA_ID)["persona_id"]
    code, out, _ = run(capsys, "conversations", "create", "--persona", pid, "--test-mode", "--json")
    assert code == 0
    created = json.loads(out)
    cid = created["conversation_id"]
    assert created["status"] == "ended" and created["replica_id"] == FAKE_REPLICA_ID
    assert fake.requests[-1].json == {"persona_id": pid, "conversation_name": "echo-relay", "test_mode": True,
                                      "properties": {"language": "english"}}

    code, out, _ = run(capsys, "conversations", "list", "--json")
    assert code == 0 and json.loads(out) == direct_get(fake, "/v2/conversations")
    code, out, _ = run(capsys, "conversations", "list", "--status", "ended", "--json")
    assert json.loads(out) == direct_get(fake, "/v2/conversations", status="ended")
    code, out, _ = run(capsys, "conversations", "get", cid, "--verbose", "--json")
    assert code == 0 and json.loads(out) == direct_get(fake, f"/v2/conversations/{cid}", verbose="true")
    assert json.loads(out)["events"][0]["event_type"] == "system.shutdown"
    code, out, _ = run(capsys, "conversations", "end", cid, "--json")
    assert json.loads(out) == {"conversation_id": cid, "status": "ended", "already_ended": True}
    code, out, _ = run(capsys, "conversations", "delete", cid, "--json")
    assert json.loads(out) == {"conversation_id": cid, "deleted": True}


def test_conversation_defaults_come_from_config(fake: FakeTavusServer,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    pid = fake.add_persona("Echo")["persona_id"]
    settings = load_settings(None, overrides={
        "tavus.persona_id": pid, "tavus.replica_id": FAKE_REPLICA_ID, "tavus.conversation_name": "cfg",
        "tavus.max_call_duration": 300, "tavus.participant_left_timeout": 5})
    code, _, _ = run(capsys, "conversations", "create", settings=settings)
    assert code == 0
    assert fake.requests[-1].json == {
        "persona_id": pid, "replica_id": FAKE_REPLICA_ID, "conversation_name": "cfg",
        "properties": {"max_call_duration": 300, "participant_left_timeout": 5, "language": "english"}}


def test_conversation_create_without_persona(fake: FakeTavusServer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "conversations", "create")
    assert code == 2 and err.startswith("No persona: pass --persona ID") and fake.count() == 0


# ------------------------------------------------------------------------------------- errors
def test_missing_key_exit_2(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TAVUS_API_KEY")
    code, out, err = run(capsys, "personas", "list")
    assert code == 2 and out == ""
    assert err.startswith("TAVUS_API_KEY is not set") and len(err.strip().splitlines()) == 1
    assert fake.count() == 0


def test_rejected_key_exit_1(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAVUS_API_KEY", "not-the-key")
    code, out, err = run(capsys, "conversations", "list")
    assert (code, out) == (1, "")
    assert err == "Tavus rejected the API key (401): Invalid access token\n"
    assert fake.count() == 1


def test_api_errors_one_line_exit_1(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "conversations", "get", "c-nope")
    assert (code, out, err) == (1, "", "Tavus API error 404: Invalid conversation_id\n")
    code, _, err = run(capsys, "conversations", "create", "--persona", "p-nope", "--replica", FAKE_REPLICA_ID)
    assert (code, err) == (1, "Tavus API error 400: Invalid persona_id\n")
    fake.inject("GET /v2/personas", status=503, body={"error": "maintenance"}, times=None)
    settings = load_settings(None, overrides={"tavus.retries": 0})
    code, _, err = run(capsys, "personas", "list", settings=settings)
    assert (code, err) == (1, "Tavus API error 503: maintenance\n")


def test_connection_error_exit_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    monkeypatch.setenv("TAVUS_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("TAVUS_API_KEY", KEY)
    settings = load_settings(None, overrides={"tavus.retries": 0})
    code, out, err = run(capsys, "personas", "list", settings=settings)
    assert (code, out) == (1, "")
    assert err.startswith("Cannot reach Tavus: cannot reach Tavus at http://127.0.0.1:")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_help_texts(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["tavus", "--help"], ["tavus", "personas", "--help"],
                 ["tavus", "conversations", "create", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert "TAVUS_API_KEY" in out and "--test-mode" in out and "--max-call-duration S" in out
    assert "echo-mode persona" in out


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["tavus", "conversations", "list", "--status", "paused"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        main(["tavus", "conversations", "create", "--max-call-duration", "0"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_add_tavus_parser_in_a_host_cli(fake: FakeTavusServer, capsys: pytest.CaptureFixture[str]) -> None:
    """How the main CLI hooks it in: its own parser, then run_tavus(args, settings)."""
    parser = argparse.ArgumentParser(prog="echo-relay")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run")
    add_tavus_parser(sub)
    args = parser.parse_args(["tavus", "personas", "list", "--json"])
    assert (args.command, args.tavus_resource, args.tavus_action, args.json) == (
        "tavus", "personas", "list", True)
    assert run_tavus(args, load_settings(None)) == 0
    assert json.loads(capsys.readouterr().out) == {"data": [], "total_count": 0}
