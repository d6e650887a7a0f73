"""The one delivery path (pipeline/delivery.py): one queue, one task, sizes from `protocol`, interrupts
at once and ahead of the queue, every item accounted once with a reason an operator can act on.

The sinks are the recording sink of tests/faults.py and the real Daily sink against the daily-python
stand-in (pipeline/testing/fake_daily.py); nothing here measures speed beyond "at once" bounds that
are an order of magnitude under the timeouts in play."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import pytest
import regex
from faults import RecordingSink

from pipeline import protocol
from pipeline.config import Settings, load_settings
from pipeline.delivery import INTERRUPTED, Delivery, Origin, QueuedEcho
from pipeline.frames import Transcript, Utterance, UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.sink.base import Outgoing, Sink
from pipeline.sink.daily import DailySink
from pipeline.testing.fake_daily import FakeRoom
from pipeline.transform import build_chain

PERSONA = "Echo Persona"
FAKE = "pipeline.testing.fake_daily"


def settings(**overrides: Any) -> Settings:
    return load_settings(None, {"control.enabled": False, **overrides}, env={})


def delivery_for(sink: Sink, s: Settings | None = None) -> tuple[Delivery, Metrics]:
    s = s or settings()
    metrics = Metrics()
    return Delivery(s, sink=sink, chain=build_chain(s.transform, metrics), metrics=metrics,
                    now_s=time.monotonic), metrics


_count = 0


def api_text(text: str, **kw: Any) -> QueuedEcho:
    global _count
    _count += 1
    meta = UtteranceMeta(utterance_id=f"api{_count}", audio_start_s=0.0, audio_end_s=0.0)
    return QueuedEcho(Origin.API, meta, text=text, through_transforms=False, **kw)


async def wait_until(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


class SlowEchoSink(RecordingSink):
    """Echoes take `delay_s`; interrupts are recorded at once (the room takes them at once)."""

    async def send(self, out: Outgoing) -> None:
        if out.event == "interrupt":
            self.sent.append(out)
            return
        await super().send(out)


# ------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("text", ["x" * 5000, "👩‍👩‍👧‍👦" * 300, "今日は晴れです。" * 400])
async def test_long_text_goes_out_in_full_pieces_under_the_limit(text: str) -> None:
    """Before: "x"*5000 went out as 3894, 1 and 1105 characters (pieces sized as if done were true, then
    split again by the sink); a ZWJ sequence lost a lone U+200D into its own echo."""
    sink = RecordingSink()
    delivery, _ = delivery_for(sink)
    task = asyncio.ensure_future(delivery.run())
    delivery.put_nowait(api_text(text, inference_id="i1"))
    await delivery.finish(task)
    pieces = [o.message["properties"]["text"] for o in sink.sent]
    limit = protocol.DEFAULT_MAX_MESSAGE_BYTES - protocol.ENVELOPE_HEADROOM_BYTES
    assert all(protocol.serialized_size(o.message) <= limit for o in sink.sent)
    # As few pieces as the limit allows (no 1-character leftovers), none cut inside a grapheme cluster.
    total = sum(protocol.serialized_size(o.message) for o in sink.sent)
    assert len(pieces) <= total // limit + 1, [len(p) for p in pieces]
    assert "".join(pieces) == text
    clusters = set(regex.findall(r"\X", text))
    assert all(set(regex.findall(r"\X", p)) <= clusters for p in pieces)
    assert [o.message["properties"]["done"] for o in sink.sent] == [False] * (len(pieces) - 1) + [True]
    assert {o.message["properties"]["inference_id"] for o in sink.sent} == {"i1"}
    assert delivery.ledger.delivered == 1 and delivery.ledger.closed == 1


# ------------------------------------------------------------------------------------ interrupts
async def test_interrupt_goes_out_at_once_and_drops_what_has_not_gone_out(
        caplog: pytest.LogCaptureFixture) -> None:
    """Before: POST /interrupt shared the send lock and went out after the echoes queued before it."""
    caplog.set_level(logging.INFO)
    sink = SlowEchoSink(delay_s=2.0)
    delivery, metrics = delivery_for(sink)
    task = asyncio.ensure_future(delivery.run())
    for text in ("first line.", "second line.", "third line."):
        delivery.put_nowait(api_text(text))
    await wait_until(lambda: delivery.sending)  # "first line." is with the (slow) sink
    t0 = time.monotonic()
    outcome = await delivery.interrupt("test")
    assert time.monotonic() - t0 < 0.5  # not after the 2 s echo
    assert outcome.sent and outcome.dropped == 3
    delivery.put_nowait(api_text("after the interrupt."))
    await delivery.finish(task)
    assert [o.event for o in sink.sent] == ["interrupt", "echo"]
    assert sink.sent[1].text == "after the interrupt."
    assert delivery.ledger.as_dict()["dropped"] == {INTERRUPTED: 3}
    assert delivery.ledger.delivered == 1 and delivery.ledger.closed == delivery.ledger.settled == 4
    assert metrics.value("echo_relay_dropped_total", {"stage": "delivery", "reason": INTERRUPTED}) == 3
    assert metrics.value("echo_relay_interrupts_sent_total") == 1
    for text in ("first line.", "second line.", "third line."):  # every loss is logged with its words
        assert f"(interrupted): '{text}'" in caplog.text
    seqs = [o.seq for o in sink.sent]
    assert seqs == sorted(seqs) and len(set(seqs)) == 2


@pytest.fixture
def daily_settings(clean_fake_daily: None) -> Any:
    def make(room: FakeRoom, **overrides: Any) -> Settings:
        return settings(**{"sink.spec": "daily", "sink.daily.module": FAKE, "sink.daily.join_timeout_s": 2.0,
                           "sink.daily.replica_timeout_s": 30.0, "tavus.persona_name": PERSONA,
                           "tavus.conversation_url": room.url, "tavus.conversation_id": room.conversation_id,
                           **overrides})
    return make


async def test_interrupt_without_the_replica_returns_at_once_and_says_why(daily_settings: Any) -> None:
    """Before: with the replica not there yet, POST /interrupt waited up to replica_timeout_s (9 s)."""
    room = FakeRoom.create()
    s = daily_settings(room)
    sink = DailySink(s, Metrics(), daily_module=FAKE)
    await sink.start()
    delivery, _ = delivery_for(sink, s)
    task = asyncio.ensure_future(delivery.run())
    delivery.put_nowait(api_text("waiting for the replica."))
    await wait_until(lambda: delivery.sending)
    t0 = time.monotonic()
    outcome = await delivery.interrupt("test")
    assert time.monotonic() - t0 < 1.0  # replica_timeout_s is 30
    assert not outcome.sent and outcome.dropped == 1
    assert "nothing to interrupt" in outcome.detail and repr(PERSONA) in outcome.detail
    await delivery.finish(task)
    await sink.close()
    assert room.replica_inbox == [] and delivery.ledger.as_dict()["dropped"] == {INTERRUPTED: 1}


# --------------------------------------------------------------------------------- accounting
async def test_a_run_shorter_than_the_replica_wait_names_the_replica(
        daily_settings: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Before: a file source ending before replica_timeout_s gave "undeliverable uN: drain deadline passed"
    without a word about the replica."""
    caplog.set_level(logging.INFO)
    room = FakeRoom.create()
    s = daily_settings(room, **{"sink.drain_timeout_s": 0.5})
    sink = DailySink(s, Metrics(), daily_module=FAKE)
    await sink.start()
    delivery, metrics = delivery_for(sink, s)
    task = asyncio.ensure_future(delivery.run())
    delivery.put_nowait(api_text("nobody to say it."))
    delivery.put_nowait(api_text("nor this."))
    await delivery.finish(task)
    await sink.close()
    assert delivery.ledger.undeliverable == 2 and metrics.value("echo_relay_send_failures_total") == 2
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("undeliverable echo")]
    assert len(lines) == 2
    for line, text in zip(lines, ("nobody to say it.", "nor this."), strict=True):
        assert "sink.drain_timeout_s" in line and f"the replica {PERSONA!r} is not in the Daily room" in line
        assert line.endswith(f"(text: {text!r})")
    assert "withdrawn" not in caplog.text


async def test_asr_drops_are_counted_once_by_delivery() -> None:
    """The engine's verdict is Transcript.dropped_reason; delivery counts the drop it accounts (a
    speculative decode that is thrown away is never counted)."""
    sink = RecordingSink()
    delivery, metrics = delivery_for(sink)
    task = asyncio.ensure_future(delivery.run())
    loop = asyncio.get_running_loop()
    for uid, tr in (("u1", Transcript("", dropped_reason="no_speech")), ("u2", Transcript("Kept."))):
        fut: asyncio.Future[Transcript] = loop.create_future()
        fut.set_result(tr)
        utt = Utterance(uid, np.zeros(16000, np.int16), 0, 0, 16000)
        meta = UtteranceMeta(utterance_id=uid, audio_start_s=0.0, audio_end_s=1.0)
        await delivery.put(QueuedEcho(Origin.SPEECH, meta, utterance=utt, transcript=fut))
    await delivery.finish(task)
    assert delivery.ledger.as_dict()["dropped"] == {"asr:no_speech": 1}
    assert metrics.value("echo_relay_dropped_total", {"stage": "asr", "reason": "no_speech"}) == 1
    assert [o.text for o in sink.sent] == ["Kept."]
