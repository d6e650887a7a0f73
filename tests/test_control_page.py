"""The live page (GET /) and the event stream (GET /events) of the control API (issue 12), for real.

- The stream: a real relay (the real VAD and tiny.en) plays a shared clip in real time with the control API
  in its loop, and httpx reads GET /events as a script would: the documented events, in order, with the
  clip's words; the subscription ends when the client goes away.
- The guard on /events: Host, Origin and token rules (Authorization, or ?token= for EventSource), the cap on
  streams, keep-alive comments, and a stream outliving the header and keep-alive timeouts.
- The page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`, driven by
  Selenium) shows the clip's words, a moving level meter and the utterance's latency while the relay plays;
  its screenshot is saved under the test's tmp_path (ECHO_RELAY_UPDATE_SCREENSHOT=1 also copies it to
  docs/live-page.png).
- Offline: Chromium's performance log lists every URL the page and /docs requested: all are the server's.

Without Chromium the browser tests fail and say what to install (scripts/install.sh --dev); they never skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from faults import (
    FaultyAsr,
    RecordingSink,
    padded_clip_file,
    real_engine,
    reference,
    relay_settings,
    word_recall,
)

from pipeline.config import Settings
from pipeline.control import server as control_server
from pipeline.control.api import InterruptOutcome
from pipeline.control.server import ControlServer, max_event_streams, start_control_server
from pipeline.events import MAX_SUBSCRIBERS, Event, EventBus
from pipeline.metrics import Metrics
from pipeline.wiring import build_relay
from tests.conftest import wer

CLIP = "mfa/61-70968-0000.flac"  # one long sentence (~5 s): several interim decodes while it is spoken
TOKEN = "live-page-token-0123"
WAIT_S = 20.0  # longest wait for something that must happen (a generous bound, not a measurement)
RUN_TIMEOUT_S = 60.0
DOCS_SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "live-page.png"
MAX_SCREENSHOT_BYTES = 200_000
INSTALL_HINT = ("run scripts/install.sh --dev (it installs Debian's chromium and chromium-driver with apt-get, "
                "and selenium into .venv)")


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def clip_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return padded_clip_file(tmp_path_factory.mktemp("page"), CLIP)


async def until(predicate: Callable[[], Any], timeout_s: float = WAIT_S, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def relay_with_api(clip: Path, analyzers: tuple[str, ...] = (),
                         **control: Any) -> AsyncIterator[tuple[Any, ControlServer, RecordingSink]]:
    """A relay on `clip` paced in real time (not yet running) with its control API on a free port, and the
    built-in perception `analyzers`."""
    dotted = {f"control__{k}": v for k, v in {"port": 0, **control}.items()}
    settings = relay_settings(f"file:{clip}", source__file__speed=1, **dotted,
                              perception__analyzers=[{"analyzer": a} for a in analyzers])
    metrics = Metrics()
    sink = RecordingSink()
    relay = build_relay(settings, metrics=metrics, sink=sink, asr=FaultyAsr(real_engine(), metrics=metrics))
    await relay.start()
    server = await start_control_server(relay, metrics, settings)
    try:
        yield relay, server, sink
    finally:
        await server.stop()


async def sse_messages(response: httpx.Response) -> AsyncIterator[dict[str, str]]:
    """The messages of a text/event-stream: {field: value} per blank-line-terminated block; a comment line
    comes as {"comment": text}."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields:
                yield fields
                fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def server_log(caplog: pytest.LogCaptureFixture) -> str:
    """What the relay and its server logged (httpx, the test's client, logs the URLs it requested)."""
    return "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))


class PageHandle:
    """A RelayHandle with a real EventBus (the test emits on it) that records interrupts."""

    def __init__(self) -> None:
        self.events = EventBus(Metrics(), time.monotonic)
        self.interrupts = 0

    async def submit_text(self, text: str, **_: Any) -> list[str]:
        return ["x"]

    async def submit_audio(self, pcm: Any, sample_rate: int, **_: Any) -> list[str]:
        return ["x"]

    async def interrupt(self) -> InterruptOutcome:
        self.interrupts += 1
        return InterruptOutcome(True, 0, "interrupt sent")

    def status(self) -> dict[str, Any]:
        return {"room": {"joined": False}, "conversation_id": None, "queues": {"delivery": 0}, "recent": []}

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": True, "sink_ready": True}


@contextlib.asynccontextmanager
async def fake_api(**control: Any) -> AsyncIterator[tuple[PageHandle, ControlServer, httpx.AsyncClient]]:
    handle = PageHandle()
    settings = Settings.model_validate({"control": {"host": "127.0.0.1", "port": 0, "rate_limit_per_s": 1000,
                                                    **control}})
    server = await start_control_server(handle, Metrics(), settings)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:
            yield handle, server, client
    finally:
        await server.stop()


# --------------------------------------------------------------------------- SSE on a real run
async def test_events_stream_a_real_run_in_order(clip_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[dict[str, str]] = []
    answer: list[httpx.Response] = []
    async with relay_with_api(clip_file, token=TOKEN) as (relay, server, sink), \
            httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as client:

        async def read() -> None:  # the token in the query, as the page's EventSource sends it
            async with client.stream("GET", "/events", params={"token": TOKEN, "partial": "1"}) as response:
                answer.append(response)
                async for message in sse_messages(response):
                    messages.append(message)

        reader = asyncio.ensure_future(read())
        await until(lambda: relay.events.listening, what="the stream to subscribe")
        await asyncio.wait_for(relay.run(), RUN_TIMEOUT_S)
        await until(lambda: any(m.get("event") == "echo" for m in messages), what="the echo event")
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        # The client went away: the server closed its subscription.
        await until(lambda: not relay.events.listening, what="the subscription to close")

    response = answer[0]
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-store"
    assert messages[0] == {"comment": "connected"} or messages[0].get("retry") == "2000"
    events = [m for m in messages if "event" in m]
    data = [json.loads(m["data"]) for m in events]
    for m, d in zip(events, data, strict=True):
        assert m["id"] == str(d["seq"]) and m["event"] == d["kind"] and isinstance(d["t"], float | int), m
    seqs = [d["seq"] for d in data]
    assert seqs == sorted(set(seqs))
    kinds = [d["kind"] for d in data]
    assert kinds.count("level") >= 10
    assert "room" in kinds and "stats" in kinds
    stats = data[kinds.index("stats")]
    assert {"ledger", "queues"} <= set(stats) and "delivery" in stats["queues"]
    started, ended = kinds.index("speech_started"), kinds.index("speech_ended")
    transcript, echo = kinds.index("transcript"), kinds.index("echo")
    partials = [i for i, k in enumerate(kinds) if k == "partial"]
    assert partials, kinds
    # Partial text of the utterance arrives while it is spoken, before its final text.
    assert started < partials[0] and partials[-1] < ended < transcript < echo
    uid = data[started]["utterance_id"]
    assert all(data[i]["utterance_id"] == uid for i in (ended, transcript, echo, *partials))
    final = data[transcript]["text"]
    assert wer(reference(CLIP), final) <= 0.25, final
    first_partial = data[partials[0]]["text"].lower().split()
    assert first_partial and first_partial[0].strip(",.") in reference(CLIP).lower().split()
    assert data[echo]["outcome"] == "delivered" and data[echo]["text"] == final
    assert 0 < data[echo]["latency_s"] < 5
    assert [o.text for o in sink.sent] == [final]
    assert TOKEN not in server_log(caplog)  # in the query string, yet never logged


# ------------------------------------------------------------------------------ the guard on /events
async def test_events_take_the_token_as_a_header_or_query_and_keep_the_host_and_origin_rules(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with fake_api(token=TOKEN) as (handle, server, client):
        r = await client.get("/events")
        assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.json()["field"] == "Authorization" and "?token=" in r.json()["error"]
        for query in ({"token": "wrong"}, {"token": TOKEN + "x"}, {"token": ""}, [("token", TOKEN), ("token", TOKEN)]):
            assert (await client.get("/events", params=query)).status_code == 401, query
        # Only /events takes the token from the URL: every other endpoint wants the header.
        assert (await client.get("/status", params={"token": TOKEN})).status_code == 401
        # A name that is not this server's (DNS rebinding), or a page on another site: refused, token or not.
        for headers in ({"Host": "attacker.example"}, {"Host": f"attacker.example:{server.port}"}):
            r = await client.get("/events", params={"token": TOKEN}, headers=headers)
            assert r.status_code == 421 and r.json()["field"] == "Host", headers
        r = await client.get("/events", params={"token": TOKEN}, headers={"Origin": "http://attacker.example"})
        assert r.status_code == 403 and r.json()["field"] == "Origin"
        assert not handle.events.listening
        # The right token, as a header or in the query (the page's EventSource), opens the stream.
        for kwargs in ({"headers": {"Authorization": f"Bearer {TOKEN}"}}, {"params": {"token": TOKEN}},
                       {"params": {"token": TOKEN}, "headers": {"Origin": server.url}}):
            async with client.stream("GET", "/events", **kwargs) as response:
                assert response.status_code == 200, kwargs
                await until(lambda: handle.events.listening)
                assert not handle.events.wants_partial  # interim decodes cost latency: made only when asked
                handle.events.emit("partial", utterance_id="u1", text="héllo\nworld")
                got = [m async for m in _take(sse_messages(response), lambda m: "event" in m)]
                assert got[0]["event"] == "partial" and json.loads(got[0]["data"])["text"] == "héllo\nworld"
            await until(lambda: not handle.events.listening, what="the subscription to close")
        async with client.stream("GET", "/events", params={"token": TOKEN, "partial": "1"}) as response:
            assert response.status_code == 200
            await until(lambda: handle.events.wants_partial, what="a subscription asking for partials")
        r = await client.get("/events", params={"token": TOKEN, "partial": "maybe"})
        assert r.status_code == 422 and r.json()["field"] == "query.partial", r.json()
        # The page and its files need no token: they hold no data, and the page asks for the token.
        r = await client.get("/")
        assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert "new EventSource" in r.text and "/interrupt" in r.text
        assert (await client.get("/static/favicon.svg")).status_code == 200
        assert (await client.get("/", headers={"Host": "attacker.example"})).status_code == 421
        assert (await client.get("/docs")).status_code == 401  # unchanged: the schema wants the token
    assert TOKEN not in server_log(caplog)


async def _take(messages: AsyncIterator[dict[str, str]], wanted: Callable[[dict[str, str]], bool],
                n: int = 1) -> AsyncIterator[dict[str, str]]:
    count = 0
    async for m in messages:
        if wanted(m):
            yield m
            count += 1
            if count >= n:
                return


async def test_a_quiet_stream_gets_keep_alives_and_outlives_the_header_and_idle_timeouts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control_server, "SSE_KEEPALIVE_S", 0.2)
    async with fake_api(header_timeout_s=0.4, keep_alive_s=1) as (handle, _server, client), \
            client.stream("GET", "/events") as response:
        assert response.status_code == 200
        messages = sse_messages(response)
        started = time.monotonic()
        comments = [m async for m in _take(messages, lambda m: m.get("comment") == "keep-alive", n=8)]
        assert len(comments) == 8 and time.monotonic() - started >= 1.4  # past both timeouts
        handle.events.emit("room", joined=True, replica_present=False, replica_speaking=False,
                           network="good", conversation_id="c1")
        got = [m async for m in _take(messages, lambda m: "event" in m)]
        assert got[0]["event"] == "room" and json.loads(got[0]["data"])["conversation_id"] == "c1"


async def test_a_stream_is_never_closed_to_make_room_for_new_connections() -> None:
    """At control.max_connections a new connection closes the longest-idle one: never a stream, which has a
    request in progress however long it has been quiet."""
    async with fake_api(max_connections=16) as (handle, server, client), \
            client.stream("GET", "/events") as response:
        assert response.status_code == 200
        await until(lambda: handle.events.listening)
        idle = []
        for _ in range(24):  # more idle connections than the limit: the oldest are closed in turn
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            idle.append(writer)
        async with httpx.AsyncClient(base_url=server.url, timeout=WAIT_S) as other:
            assert (await other.get("/healthz")).status_code == 200
            evicted = re.search(r'endpoint="connection",status="evicted"\} (\d+)', (await other.get("/metrics")).text)
            assert evicted and int(evicted[1]) >= 8  # idle connections were closed; the stream was not
        handle.events.emit("level", dbfs=-12.5)
        got = [m async for m in _take(sse_messages(response), lambda m: "event" in m)]
        assert json.loads(got[0]["data"])["dbfs"] == -12.5
        for writer in idle:
            writer.close()


async def test_streams_are_capped_and_end_when_the_server_stops() -> None:
    async with fake_api(max_connections=16) as (handle, server, client):
        limit = max_event_streams(16)
        assert limit == 4  # half of the 8 request slots left by control.max_connections 16
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(limit):
                response = await stack.enter_async_context(client.stream("GET", "/events"))
                assert response.status_code == 200
            r = await client.get("/events")
            assert r.status_code == 503 and r.headers["Retry-After"] == "5"
            assert "too many event streams" in r.json()["error"] and r.json()["status"] == "error"
            assert (await client.get("/status")).status_code == 200  # the other requests still get a slot
        await until(lambda: not handle.events.listening, what="the streams to close")
        # The bus's own limit (MAX_SUBSCRIBERS: a terminal view, scripts) is answered the same way.
        subs = [handle.events.subscribe() for _ in range(MAX_SUBSCRIBERS)]
        r = await client.get("/events")
        assert r.status_code == 503 and "subscribers" in r.json()["error"]
        for sub in subs:
            sub.close()
        # An open stream does not hold the server's stop: the stream ends, the client sees the end.
        ended = asyncio.Event()

        async def hold() -> None:
            async with client.stream("GET", "/events") as response:
                async for _ in response.aiter_lines():
                    pass
            ended.set()

        task = asyncio.ensure_future(hold())
        await until(lambda: handle.events.listening)
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 1.5
        await asyncio.wait_for(ended.wait(), WAIT_S)
        await task


async def test_the_log_names_the_live_page(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipeline.control.server")
    async with fake_api() as (_, server, _client):
        assert f"live view: http://127.0.0.1:{server.port}/" in caplog.text
        assert server.page_url == f"http://127.0.0.1:{server.port}/"


# ------------------------------------------------------------------------------------ the browser
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """Headless Chromium through chromedriver, logging every network request (goog:loggingPrefs)."""
    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (Python package)")
    if missing:
        pytest.fail(f"the live-page browser tests need {', '.join(missing)}: {INSTALL_HINT}", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(shutil.which("chromium"))
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--window-size=1200,1000", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = webdriver.ChromeService(executable_path=str(shutil.which("chromedriver")))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as exc:  # e.g. a chromedriver that does not match the browser
        pytest.fail(f"cannot start headless Chromium ({type(exc).__name__}: {str(exc).strip()[:300]}): "
                    f"{INSTALL_HINT}", pytrace=False)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def requested_urls(driver: Any) -> list[str]:
    """Every URL the browser requested since the last call (the performance log is drained)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif message.get("method") == "Network.webSocketCreated":
            urls.append(params["url"])
    return urls


def assert_all_local(urls: list[str], origin: str) -> None:
    """Every URL is the server's. `data:` URLs (Swagger UI's CSS has inline icons) carry their content in
    themselves: Chromium logs them as requests, but nothing is fetched."""
    assert urls, "the performance log recorded no request"
    outside = sorted({u for u in urls if not u.startswith((origin + "/", "data:"))})
    assert not outside, f"requested from outside {origin}: {outside}"


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


PAGE_STATE_JS = """
const row = document.querySelector('#transcript > li');
const q = (sel) => row ? (row.querySelector(sel) || {}).textContent || '' : '';
return {level: document.getElementById('level').dataset.dbfs,
        speaking: document.getElementById('speaking').textContent,
        partial: q('.partial'), final: q('.final'), outcome: q('.outcome'), latency: q('.latency'),
        latency_last: document.getElementById('latency-last').textContent,
        latency_count: document.getElementById('latency-count').textContent,
        hist: [...document.querySelectorAll('#latency-hist .bin')].map(b => b.title),
        queue: document.getElementById('queue-delivery').textContent,
        delivered: document.getElementById('ledger-delivered').textContent,
        conversation: document.getElementById('conversation-id').textContent,
        replica: document.getElementById('replica').textContent,
        conn: document.getElementById('conn').textContent,
        partial_color: row ? getComputedStyle(row.querySelector('.partial')).color : '',
        final_color: row ? getComputedStyle(row.querySelector('.final')).color : '',
        perception: row ? [...row.querySelectorAll('.perception .chip')].map(c => c.textContent) : []};
"""


async def test_the_live_page_follows_a_real_run_in_chromium(clip_file: Path, chromium: Any, tmp_path: Path) -> None:
    driver = chromium
    echoes: list[Event] = []
    async with relay_with_api(clip_file, ("loudness", "pitch"), token=TOKEN) as (relay, server, sink):
        # What a Daily sink would report about its room (RecordingSink has none): shown from `room` events.
        sink.room.joined, sink.room.replica_present, sink.room.network = True, True, "good"
        sink.room.conversation_id = "c0ffee42d00d"
        driver.get_log("performance")  # drained: what follows is this page's
        await asyncio.to_thread(driver.get, f"{server.url}/#token={TOKEN}")
        await until(lambda: relay.events.listening, what="the page's EventSource to subscribe")
        watcher = relay.events.subscribe()  # the test's own view of the run, to compare with the page's
        assert driver.current_url == server.url + "/"  # the token left the address bar (and history)

        run = asyncio.ensure_future(asyncio.wait_for(relay.run(), RUN_TIMEOUT_S))
        samples: list[dict[str, Any]] = []
        while not run.done():
            samples.append(await asyncio.to_thread(driver.execute_script, PAGE_STATE_JS))
            await asyncio.sleep(0.2)
        await run
        echoes = [e for e in watcher.pending() if e.kind == "echo"]
        watcher.close()
        state = await _until_page(driver, lambda s: bool(s["latency"] and s["final"] and s["delivered"] == "1"
                                                         and len(s["perception"]) == 2),
                                  "the final text, its latency, the ledger and the analyzers' results")
        screenshot = tmp_path / "live-page.png"
        await asyncio.to_thread(driver.save_screenshot, str(screenshot))

        # The Interrupt button: POST /interrupt with the token and application/json from the page's origin.
        await asyncio.to_thread(driver.execute_script, "document.getElementById('interrupt').click()")
        result = await _until_page(driver, lambda s: s["interrupt"] not in ("", "interrupting…"), "the interrupt",
                                   js="return {interrupt: document.getElementById('interrupt-result').textContent}")
        assert result["interrupt"] == "interrupt sent"
        assert [o.event for o in sink.sent] == ["echo", "interrupt"]
        urls = requested_urls(driver)
        errors = console_errors(driver)

    # The clip's words, final text in the normal colour, the partial text before it greyed.
    assert wer(reference(CLIP), state["final"]) <= 0.25, state
    assert state["final"] == sink.sent[0].text
    assert state["outcome"] == "delivered"
    # The analyzers' results under the utterance, as the JSONL record has them (perception.analyzers).
    found = sink.sent[0].perception
    assert found is not None and set(found) == {"loudness", "pitch"}
    assert f"loudness: rms_dbfs {found['loudness']['rms_dbfs']:.1f}" in state["perception"][0], state["perception"]
    assert state["perception"][1].startswith("pitch: voiced_ratio "), state["perception"]
    partial_seen = [s for s in samples if s["partial"] and not s["final"]]
    assert partial_seen, [(s["speaking"], s["partial"], s["final"]) for s in samples]
    assert word_recall(reference(CLIP), partial_seen[-1]["partial"]) > 0
    assert partial_seen[-1]["partial_color"] != partial_seen[-1]["final_color"]
    assert any(s["speaking"] == "you: speaking" for s in samples)
    # The level meter moved while the clip played.
    levels = {s["level"] for s in samples if s["level"] not in ("", "-inf")}
    assert len(levels) >= 3, [s["level"] for s in samples]
    # The utterance's latency, as the relay measured it, in its row, the summary and the histogram.
    assert len(echoes) == 1 and echoes[0].data["latency_s"] is not None
    latency = echoes[0].data["latency_s"]
    assert state["latency"] == f"{latency:.2f} s" and state["latency_last"] == f"{latency:.2f} s"
    assert state["latency_count"] == "1" and sum(int(t.rsplit(": ", 1)[1]) for t in state["hist"]) == 1
    # Room and pipeline state from `room` and `stats` events.
    assert state["conversation"] == "c0ffee42d00d" and state["replica"] == "replica: listening"
    assert re.fullmatch(r"\d+", state["queue"]), state["queue"]
    assert not errors, errors
    assert_all_local(urls, server.url)
    assert any(u.startswith(f"{server.url}/events?partial=1&token=") for u in urls)

    png = screenshot.read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) < MAX_SCREENSHOT_BYTES, len(png)
    if os.environ.get("ECHO_RELAY_UPDATE_SCREENSHOT"):
        shutil.copyfile(screenshot, DOCS_SCREENSHOT)


async def _until_page(driver: Any, predicate: Callable[[dict[str, Any]], bool], what: str,
                      js: str = PAGE_STATE_JS) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        state = await asyncio.to_thread(driver.execute_script, js)
        if predicate(state):
            return state
        if time.monotonic() > deadline:
            raise AssertionError(f"the page did not show {what}: {state}")
        await asyncio.sleep(0.1)


async def test_the_page_and_docs_load_nothing_from_outside(chromium: Any) -> None:
    driver = chromium
    async with fake_api() as (handle, server, _client):
        driver.get_log("performance")
        await asyncio.to_thread(driver.get, f"{server.url}/")
        await until(lambda: handle.events.listening, what="the page's EventSource to subscribe")
        handle.events.emit("level", dbfs=-23.5)
        await _until_page(driver, lambda s: s["level"] == "-23.5", "the level event")
        page_urls = requested_urls(driver)
        assert_all_local(page_urls, server.url)
        assert {f"{server.url}/", f"{server.url}/status", f"{server.url}/events?partial=1"} <= set(page_urls)
        assert not console_errors(driver)

        # /docs: Swagger UI from /static/, rendering the whole schema, without the internet.
        await asyncio.to_thread(driver.get, f"{server.url}/docs")
        js = ("return {title: (document.querySelector('.swagger-ui .info .title') || {}).textContent || '',"
              " ops: [...document.querySelectorAll('.swagger-ui .opblock-summary-path')].map(e => e.textContent)}")
        docs = await _until_page(driver, lambda s: len(s["ops"]) >= 8, "Swagger UI's operations", js=js)
        assert docs["title"].startswith("echo-relay control API")
        assert {"/send_text_message", "/interrupt", "/events", "/status"} <= {op.strip() for op in docs["ops"]}
        docs_urls = requested_urls(driver)
        assert_all_local(docs_urls, server.url)
        assert f"{server.url}/static/swagger-ui/swagger-ui-bundle.js" in docs_urls
        assert f"{server.url}/openapi.json" in docs_urls
        assert not console_errors(driver)
