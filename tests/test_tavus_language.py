"""Tavus is told the conversation's language: a conversation the relay creates (the Daily sink, through the fake
Tavus and fake Daily) carries `properties.language` (shared/reference B.4: a full name, or `multilingual`), and
`echo-relay tavus conversations create` sends the same."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import clip

from pipeline.config import load_settings
from pipeline.language import LanguageState
from pipeline.metrics import Metrics
from pipeline.sink.daily import DailySink
from pipeline.testing.fake_daily import FakeRoom
from pipeline.testing.fake_tavus import FAKE_REPLICA_ID, FakeTavusServer

API_KEY = "lang-fake-tavus-key-31f9"
PERSONA = "Language Echo Persona"


@pytest.fixture(scope="module")
def tavus() -> Iterator[FakeTavusServer]:
    with FakeTavusServer(api_key=API_KEY) as server:
        yield server


def provisioned_language(tavus: FakeTavusServer, **overrides: Any) -> Any:
    """Start and close the real Daily sink; the language of the conversation it created (the fake's record)."""
    tavus.reset()
    FakeRoom.set_autocreate(lambda room: room.add_replica(PERSONA, delay_s=0.0))
    settings = load_settings(None, {
        "sink.spec": "daily", "sink.daily.module": "pipeline.testing.fake_daily", "sink.daily.join_timeout_s": 10.0,
        "tavus.api_url": tavus.url, "tavus.api_key": API_KEY, "tavus.replica_id": FAKE_REPLICA_ID,
        "tavus.persona_name": PERSONA, "tavus.retries": 0, "asr.download": False, **overrides}, env={})

    async def go() -> None:
        sink = DailySink(settings, Metrics())
        await sink.start()
        await sink.close(0.0)

    asyncio.run(go())
    (conversation,) = tavus.conversations.values()
    assert conversation["ended_at"] is not None  # the sink ended what it created
    return conversation["request"]["properties"].get("language")


@pytest.mark.parametrize(("overrides", "language"), [
    ({}, "english"),  # the default: asr.language en
    ({"asr.model": "base", "asr.language": "es"}, "spanish"),
    ({"asr.model": "base", "asr.language": "auto"}, "multilingual"),
    ({"asr.model": "base", "asr.language": "auto", "asr.languages": ["pt"]}, "portuguese"),
    ({"asr.model": "base", "asr.language": "auto", "asr.task": "translate"}, "english"),
    ({"asr.model": "base", "asr.language": "es",
      "transform.steps": [{"step": "webhook", "url": "http://127.0.0.1:9/", "output_language": "de"}]}, "german"),
    ({"asr.model": "base", "asr.language": "auto", "tavus.language": "french"}, "french"),
])
def test_a_created_conversation_gets_properties_language(tavus: FakeTavusServer, clean_fake_daily: None,
                                                         overrides: dict[str, Any], language: str) -> None:
    assert provisioned_language(tavus, **overrides) == language


def test_the_fake_tavus_refuses_a_code_where_a_name_belongs(tavus: FakeTavusServer, clean_fake_daily: None) -> None:
    from pipeline.sink.base import SinkError

    with pytest.raises(SinkError, match="Invalid language 'es'"):
        provisioned_language(tavus, **{"tavus.language": "es"})


def test_tavus_cli_create_sends_the_configured_language(tavus: FakeTavusServer,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.tavus.cli import main

    settings = load_settings(None, {"tavus.api_url": tavus.url, "tavus.api_key": API_KEY, "asr.model": "base",
                                    "asr.language": "ja"}, env={})
    for argv, expected in ((["--language", "multilingual"], "multilingual"), ([], "japanese")):
        tavus.reset()
        pid = tavus.add_persona("Echo")["persona_id"]
        code = main(["tavus", "conversations", "create", "--persona", pid, "--replica", FAKE_REPLICA_ID, *argv],
                    settings=settings)
        capsys.readouterr()
        assert code == 0
        (conversation,) = tavus.conversations.values()
        assert conversation["request"]["properties"]["language"] == expected


def test_tavus_cli_create_says_english_for_an_english_only_model(tavus: FakeTavusServer,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """No model is loaded by `echo-relay tavus`: a `*.en` name says English-only; a multilingual one stays auto."""
    from pipeline.tavus.cli import main

    for model, expected in (("tiny.en", "english"), ("Systran/faster-whisper-small.en", "english"),
                            ("base", "multilingual")):
        settings = load_settings(None, {"tavus.api_url": tavus.url, "tavus.api_key": API_KEY, "asr.model": model,
                                        "asr.language": "auto"}, env={})
        tavus.reset()
        pid = tavus.add_persona("Echo")["persona_id"]
        code = main(["tavus", "conversations", "create", "--persona", pid, "--replica", FAKE_REPLICA_ID],
                    settings=settings)
        capsys.readouterr()
        assert code == 0
        (conversation,) = tavus.conversations.values()
        assert conversation["request"]["properties"]["language"] == expected, model


@pytest.mark.parametrize("asr_language", ["auto", "de"])
def test_an_english_only_model_relays_english_and_tavus_is_told_english(
        tavus: FakeTavusServer, clean_fake_daily: None, asr_language: str) -> None:
    """tiny.en (the default model) can write English only: with asr.language auto the conversation used to stay
    "detecting" for ever (its decodes carry no detection) and Tavus was told `multilingual`; with a code it
    cannot write, the utterances said that language while the words were English."""
    from pipeline.wiring import build_relay

    tavus.reset()
    FakeRoom.set_autocreate(lambda room: room.add_replica(PERSONA, delay_s=0.0))
    settings = load_settings(None, {
        "source.spec": f"file:{clip('deepspeech-examples/2830-3980-0043.wav')}", "source.file.speed": 4.0,
        "sink.spec": "daily", "sink.daily.module": "pipeline.testing.fake_daily", "sink.daily.join_timeout_s": 10.0,
        "tavus.api_url": tavus.url, "tavus.api_key": API_KEY, "tavus.replica_id": FAKE_REPLICA_ID,
        "tavus.persona_name": PERSONA, "tavus.retries": 0, "asr.download": False, "asr.language": asr_language,
        "control.enabled": False}, env={})
    relay = build_relay(settings, metrics=Metrics())
    assert relay.language.language == (None if asr_language == "auto" else "de")

    async def go() -> None:
        await relay.start()
        await relay.run()

    asyncio.run(go())
    (conversation,) = tavus.conversations.values()
    assert conversation["request"]["properties"]["language"] == "english"
    assert relay.ledger.delivered >= 1
    assert relay.delivery.language_status()["code"] == "en" and relay.language.locked
    assert relay.language.state is LanguageState.FIXED
