"""Property-based fuzz of the control API: random JSON and bytes never produce a 5xx.

The server runs on its own event loop in a background thread (the product runs it in the relay's
loop; here a thread lets hypothesis drive plain synchronous test functions).
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Settings
from pipeline.control.api import InterruptOutcome, QueueFull
from pipeline.control.server import ControlServer, start_control_server
from pipeline.events import EventBus
from pipeline.metrics import Metrics

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BAD_INPUT_STATUSES = {400, 413, 415, 422}
JSON = {"Content-Type": "application/json"}


class RecordingHandle:
    def __init__(self) -> None:
        self.calls = 0
        self.events = EventBus(Metrics(), time.monotonic)  # GET /events
        self.queue_full = False

    async def submit_text(self, text: str, *, inference_id: str | None = None, done: bool = True,
                          through_transforms: bool = True) -> list[str]:
        assert isinstance(text, str) and text.strip() and isinstance(done, bool)
        self.calls += 1
        if self.queue_full:
            raise QueueFull("delivery queue full")
        return [inference_id or "x"]

    async def submit_audio(self, pcm: Any, sample_rate: int, *, inference_id: str | None = None,
                           done: bool = True) -> list[str]:
        assert pcm.dtype.name == "int16" and len(pcm) > 0 and 8000 <= sample_rate <= 48000
        self.calls += 1
        return [inference_id or "x"]

    async def interrupt(self) -> InterruptOutcome:
        self.calls += 1
        return InterruptOutcome(True, 0, "interrupt sent")

    def status(self) -> dict[str, Any]:
        return {"ok": True}

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": True, "sink_ready": True}


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ControlServer, RecordingHandle, httpx.Client]]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-loop", daemon=True)
    thread.start()
    handle = RecordingHandle()
    cfg = Settings.model_validate({"control": {"port": 0, "rate_limit_per_s": 1e5, "max_body_bytes": 4096,
                                               "max_audio_s": 0.05}})
    server = asyncio.run_coroutine_threadsafe(start_control_server(handle, Metrics(), cfg), loop).result(10)
    client = httpx.Client(base_url=server.url, timeout=10)
    try:
        yield server, handle, client
    finally:
        client.close()
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
b64_audio = st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode("ascii"))
prop_values = {
    "modality": st.sampled_from(["text", "audio", "video", "", "TEXT"]) | json_values,
    "text": st.text(max_size=50) | json_values,
    "audio": b64_audio | st.text(max_size=40) | json_values,
    "sample_rate": st.sampled_from([16000, 24000, 8000, 48000, 0, -1, 7999, 48001])
    | st.integers() | json_values,
    "inference_id": st.text(max_size=140) | json_values,
    "done": st.sampled_from([True, False, "true", "false", "True", "yes", "", 1, 0]) | json_values,
}
properties = st.fixed_dictionaries({}, optional=prop_values) | json_values
envelopes = st.fixed_dictionaries({}, optional={
    "message_type": st.sampled_from(["conversation", "system"]) | json_values,
    "event_type": st.sampled_from(["conversation.echo", "conversation.interrupt"]) | json_values,
    "conversation_id": st.text(max_size=20) | json_values,
    "properties": properties,
    "extra": json_values,
})
bodies = envelopes | json_values


def check_answer(r: httpx.Response, handle: RecordingHandle, calls_before: int) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    data = r.json()
    if r.status_code == 200:
        assert data["status"] == "success"
        assert handle.calls == calls_before + 1
    else:
        assert r.status_code in BAD_INPUT_STATUSES, (r.status_code, r.text)
        assert data["status"] == "error" and data["error"] and data["field"]
        assert handle.calls == calls_before, "a rejected request reached the relay"


@FUZZ
@given(body=bodies)
def test_send_text_message_json_never_5xx(served: Any, body: Any) -> None:
    _, handle, client = served
    before = handle.calls
    r = client.post("/send_text_message", content=json.dumps(body), headers=JSON)
    check_answer(r, handle, before)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded",
                                     "application/json; charset=latin-1", "", "application/problem+json"]))
def test_send_text_message_bytes_never_5xx(served: Any, raw: bytes, content_type: str) -> None:
    _, handle, client = served
    before = handle.calls
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/send_text_message", content=raw, headers=headers)
    check_answer(r, handle, before)


# Content types a page on any site can POST without a CORS preflight, in the spellings browsers and
# curl use, and JSON ones (never sendable cross-site without a preflight).
FORM_TYPES = st.sampled_from(["application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                              "text/plain", "Text/Plain; charset=UTF-8", "TEXT/PLAIN;charset=utf-8",
                              "application/x-www-form-urlencoded; charset=utf-8", "text/html", "application/xml"])
JSON_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8", "Application/JSON",
                              "application/problem+json"])


@FUZZ
@given(body=st.none() | json_values.map(json.dumps).map(str.encode) | st.binary(max_size=100),
       content_type=st.none() | FORM_TYPES | JSON_TYPES)
def test_interrupt_body_rule(served: Any, body: bytes | None, content_type: str | None) -> None:
    """Any body is ignored when sent as JSON; no body needs no Content-Type; a form, text/plain or
    untyped body (what any web page can send) is refused with 415 and interrupts nothing."""
    _, handle, client = served
    before = handle.calls
    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/interrupt", content=body, headers=headers)
    json_type = content_type is not None and ("json" in content_type.lower())
    if json_type or (content_type is None and not body):
        assert r.status_code == 200, r.text
        assert handle.calls == before + 1
    else:
        assert r.status_code == 415, r.text
        assert r.json()["field"] == "Content-Type"
        assert r.json()["error"].startswith("Content-Type: ")
        assert handle.calls == before


def test_server_still_healthy_after_fuzzing(served: Any) -> None:
    server, _, client = served
    assert server.running
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
