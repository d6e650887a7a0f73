"""The daily-python stand-in: its API matches the installed daily-python 0.36 and it behaves like it.

Signatures are read from the real binding at runtime (`inspect.signature` works on its builtins
through `__text_signature__`); the shipped `daily/__init__.pyi` is stale (it still lists
`send_app_message(serialize_none=...)`, which the binding rejects), so it is not the reference.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any

import numpy as np
import pytest

from pipeline import daily_room
from pipeline.testing import fake_daily
from pipeline.testing.fake_daily import FakeRoom

real = pytest.importorskip("daily")


@pytest.fixture(autouse=True)
def _init(clean_fake_daily: None) -> None:
    daily_room.ensure_daily_initialized(fake_daily)  # the guard owns init in this process


def _params(fn: Any) -> list[tuple[str, str, Any]]:
    sig = inspect.signature(fn)
    out = []
    for i, p in enumerate(sig.parameters.values()):
        if i == 0 and p.name in ("self", "$self"):
            continue
        kind = "var" if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) else "named"
        default = p.default
        if default is p.empty:
            default = "<required>"
        elif default is Ellipsis:  # the binding's text signature writes non-literal defaults as "..."
            default = "<any>"
        out.append((p.name, kind, default))
    return out


def _same(fake_params: list[tuple[str, str, Any]], real_params: list[tuple[str, str, Any]]) -> bool:
    if len(fake_params) != len(real_params):
        return False
    for (fn, fk, fd), (rn, rk, rd) in zip(fake_params, real_params, strict=True):
        if fn != rn or fk != rk:
            return False
        if rd != "<any>" and not (fd == rd or (isinstance(fd, fake_daily.LogLevel) and rd == "<any>")):
            return False
    return True


def _public_methods(cls: type) -> dict[str, Any]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and callable(getattr(cls, n))}


# ----------------------------------------------------------------------------------- signatures
def test_call_client_methods_match_real_signatures() -> None:
    fake_methods = _public_methods(fake_daily.CallClient)
    real_methods = _public_methods(real.CallClient)
    for name in daily_room.CALL_CLIENT_METHODS_USED:
        assert name in real_methods, f"daily.CallClient has no {name}: daily_room uses it"
        assert name in fake_methods, f"the fake CallClient lacks {name}"
    mismatches = []
    for name, fn in fake_methods.items():
        assert name in real_methods, f"fake CallClient.{name} does not exist in daily-python"
        if not _same(_params(fn), _params(real_methods[name])):
            mismatches.append((name, _params(fn), _params(real_methods[name])))
    assert not mismatches, mismatches
    assert _params(fake_daily.CallClient.__init__) == [("event_handler", "named", None)]
    assert real.CallClient.__text_signature__ == "(event_handler=None)"


def test_event_handler_methods_match_real() -> None:
    fake_on = {n: f for n, f in _public_methods(fake_daily.EventHandler).items() if n.startswith("on_")}
    real_on = {n: f for n, f in _public_methods(real.EventHandler).items() if n.startswith("on_")}
    assert set(fake_on) == set(real_on), (set(real_on) - set(fake_on), set(fake_on) - set(real_on))
    for name in daily_room.EVENT_HANDLERS_USED:
        assert name in real_on
    for name, fn in fake_on.items():
        assert [p[0] for p in _params(fn)] == [p[0] for p in _params(real_on[name])], name


def test_daily_statics_and_audio_data_match_real() -> None:
    for name, fn in _public_methods(fake_daily.Daily).items():
        assert hasattr(real.Daily, name), name
        assert _same(_params(fn), _params(getattr(real.Daily, name))), (name, _params(fn))
    props = {n for n in dir(real.AudioData) if not n.startswith("_")}
    assert props == {n for n in dir(fake_daily.AudioData) if not n.startswith("_")}
    assert {n for n in dir(real.LogLevel) if n[:1].isupper()} == {m.name for m in fake_daily.LogLevel}


# ----------------------------------------------------------------------------------- behaviour
class Recorder(fake_daily.EventHandler):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, tuple[Any, ...], str]] = []
        self.cond = threading.Condition()

    def _add(self, name: str, *args: Any) -> None:
        with self.cond:
            self.events.append((name, args, threading.current_thread().name))
            self.cond.notify_all()

    def on_error(self, message: str) -> None:
        self._add("on_error", message)

    def on_call_state_updated(self, state: str) -> None:
        self._add("on_call_state_updated", state)

    def on_app_message(self, message: Any, sender: str) -> None:
        self._add("on_app_message", message, sender)

    def on_participant_joined(self, participant: Any) -> None:
        self._add("on_participant_joined", participant)

    def on_network_connection_status_updated(self, status: Any) -> None:
        self._add("on_network_connection_status_updated", status)

    def wait(self, pred: Any, timeout: float = 2.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: pred(self.events), timeout)


def _completion() -> tuple[list[tuple[Any, ...]], threading.Event, Any]:
    got: list[tuple[Any, ...]] = []
    done = threading.Event()

    def cb(*args: Any) -> None:
        got.append((*args, threading.current_thread().name))
        done.set()
    return got, done, cb


def _joined(room: FakeRoom, handler: Any = None) -> tuple[Any, tuple[Any, ...]]:
    """A CallClient that has joined `room` (its join completion came); returns the client and the
    completion's (data, error, thread name)."""
    c = fake_daily.CallClient() if handler is None else fake_daily.CallClient(event_handler=handler)
    got, done, cb = _completion()
    c.join(room.url, completion=cb)
    assert done.wait(2)
    return c, got[0]


def test_send_before_join_fails_on_another_thread() -> None:
    h = Recorder()
    c = fake_daily.CallClient(event_handler=h)
    got, done, cb = _completion()
    c.send_app_message({"a": 1}, completion=cb)
    assert done.wait(2)
    err, thread_name = got[0]
    assert err == "AppMessage(Signalling(ChannelNotOpen))"
    assert thread_name != threading.current_thread().name and thread_name.startswith("Dummy-")
    assert h.wait(lambda ev: any(e[0] == "on_error" for e in ev))
    assert ("on_error", ("Error handling sendAppMessage: AppMessage(Signalling(ChannelNotOpen))",)) in \
        [(e[0], e[1]) for e in h.events]
    c.release()


def test_synchronous_errors_match_the_sdk() -> None:
    c = fake_daily.CallClient()
    with pytest.raises(ValueError, match="invalid app message 'None'"):
        c.send_app_message(None)
    with pytest.raises(ValueError, match="invalid participant ID 'x'"):
        c.send_app_message({}, participant_id="x")
    with pytest.raises(Exception, match="byte array"):
        c.send_app_message(b"..")
    with pytest.raises(TypeError, match="unsupported type object"):
        c.send_app_message({"a": object()})
    with pytest.raises(TypeError):
        c.send_app_message({}, serialize_none=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        fake_daily.CallClient(event_handler=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Recorder.__new__(Recorder, kw=1)  # type: ignore[call-arg]
    c.release()
    with pytest.raises(RuntimeError, match="already been released"):
        c.release()
    with pytest.raises(RuntimeError, match="already been released"):
        c.participants()


def test_second_init_aborts_loudly() -> None:
    with pytest.raises(fake_daily.DailyAbort):
        fake_daily.Daily.init()
    assert not issubclass(fake_daily.DailyAbort, Exception)  # `except Exception` cannot hide it
    daily_room.ensure_daily_initialized(fake_daily)  # the guard does not init again


def test_malformed_url_and_unknown_room() -> None:
    c = fake_daily.CallClient()
    got, done, cb = _completion()
    c.join("not a url", completion=cb)
    assert done.wait(2)
    assert got[0][0] is None and got[0][1].startswith("Failed to parse url: InvalidUrl(")
    got2, done2, cb2 = _completion()
    c.join("https://nowhere.daily.co/none", completion=cb2)
    assert done2.wait(2)
    assert got2[0][0] is None and "RoomLookup" in got2[0][1]
    c.release()


def test_messages_reach_only_present_participants_and_never_the_sender() -> None:
    room = FakeRoom.create()
    h = Recorder()
    c, (data, error, _thread) = _joined(room, h)
    assert error is None
    assert set(data["participants"]) == {"local"}
    sent, sent_done, scb = _completion()
    c.send_app_message({"n": 1}, completion=scb)
    assert sent_done.wait(2) and sent[0][0] is None
    replica = room.add_replica("Persona")
    assert h.wait(lambda ev: any(e[0] == "on_participant_joined" for e in ev))
    joined = next(e for e in h.events if e[0] == "on_participant_joined")
    assert joined[1][0]["info"]["userName"] == "Persona"
    _sent2, sent2_done, scb2 = _completion()
    c.send_app_message({"n": 2}, completion=scb2)
    assert sent2_done.wait(2)
    assert room.wait_for_inbox(1)
    assert room.replica_inbox == [{"n": 2}]  # {"n": 1} went out before the replica was there
    replica.started_speaking("i1")
    assert h.wait(lambda ev: any(e[0] == "on_app_message" for e in ev))
    msg, sender = next(e[1] for e in h.events if e[0] == "on_app_message")
    assert msg["event_type"] == "conversation.replica.started_speaking" and sender == replica.id
    assert all(e[0] != "on_app_message" or e[1][1] != c.participants()["local"]["id"] for e in h.events)
    left, left_done, lcb = _completion()
    c.leave(completion=lcb)
    assert left_done.wait(2) and left[0][0] is None
    c.release()


def test_network_drop_and_injected_failures() -> None:
    room = FakeRoom.create()
    room.add_replica("Persona")
    h = Recorder()
    c, _ = _joined(room, h)
    room.fail_sends(1, error="boom")
    e1, d1, cb1 = _completion()
    c.send_app_message({"n": 1}, completion=cb1)
    assert d1.wait(2) and e1[0][0] == "boom"
    room.drop_network(0.2)
    assert h.wait(lambda ev: any(e[0] == "on_network_connection_status_updated" and e[1][0]["event"] ==
                                 "interrupted" for e in ev))
    e2, d2, cb2 = _completion()
    c.send_app_message({"n": 2}, completion=cb2)
    assert d2.wait(2) and e2[0][0] is not None
    assert h.wait(lambda ev: [e[1][0]["event"] for e in ev if e[0] == "on_network_connection_status_updated"]
                  [-1:] == ["connected"])
    e3, d3, cb3 = _completion()
    c.send_app_message({"n": 3}, completion=cb3)
    assert d3.wait(2) and e3[0][0] is None
    assert room.wait_for_inbox(1) and room.replica_inbox == [{"n": 3}]
    c.release()


def test_end_conversation_removes_everyone() -> None:
    room = FakeRoom.create()
    room.add_replica("Persona")
    h = Recorder()
    c, _ = _joined(room, h)
    room.end_conversation()
    assert h.wait(lambda ev: ("on_call_state_updated", ("left",)) in [(e[0], e[1]) for e in ev])
    c.release()


def test_speaker_audio_reaches_a_renderer_in_callback_interval_blocks() -> None:
    room = FakeRoom.create()
    pcm = (np.arange(16000) % 2000 + 1000).astype(np.int16)  # 1 s
    c, _ = _joined(room)
    blocks: list[Any] = []
    lock = threading.Lock()

    def renderer(pid: str, audio: Any, source: str) -> None:
        with lock:
            blocks.append((pid, audio, source, threading.current_thread().name))

    speaker = room.add_speaker("alice", np.zeros(0, dtype=np.int16), speed=0)
    deadline = time.monotonic() + 2
    while speaker.id not in c.participants() and time.monotonic() < deadline:
        time.sleep(0.01)
    c.set_audio_renderer(speaker.id, renderer, sample_rate=16000, callback_interval_ms=20)
    speaker.feed(pcm)
    assert speaker.wait_played(5)
    deadline = time.monotonic() + 2
    while sum(b[1].num_audio_frames for b in blocks) < 16000 and time.monotonic() < deadline:
        time.sleep(0.01)
    pid, audio, source, thread = blocks[0]
    assert pid == speaker.id and source == "microphone" and thread.startswith("Dummy-")
    fmt = (audio.bits_per_sample, audio.sample_rate, audio.num_channels, audio.num_audio_frames)
    assert fmt == (16, 16000, 1, 320)
    data = np.frombuffer(b"".join(b[1].audio_frames for b in blocks), dtype="<i2")
    assert np.array_equal(data, pcm)
    c.release()
