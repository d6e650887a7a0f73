"""The terminal view of `echo-relay run --view` (pipeline/view.py).

- `ViewState.apply` + `render` on scripted event sequences (rendered to text by a recording Console);
- when the view is on by default, and when asking for it is a mistake;
- `TerminalView` on an event bus: it follows the stream, ends on the final ledger, and log records
  print through its console (not beside it) while it is on;
- a real run in a real terminal: `python -m pipeline run --view` inside tmux on a shared clip, the pane
  captured while the person speaks and after the utterance was delivered.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from faults import load_pcm, reference, words, write_wav
from rich.console import Console

from pipeline.config import ConfigError, load_settings
from pipeline.delivery import Ledger
from pipeline.events import Event, EventBus
from pipeline.frames import SAMPLE_RATE
from pipeline.logs import log_to_console, register_secret, setup_logging
from pipeline.metrics import Metrics
from pipeline.view import METER_CELLS, TerminalView, ViewState, render, want_view
from tests.conftest import logging_restored

REPO = Path(__file__).resolve().parent.parent
CLIP = "mfa/61-70968-0000.flac"  # HE BEGAN A CONFUSED COMPLAINT AGAINST THE WIZARD ... CURTAIN ON THE LEFT
SENTENCE = "He began a confused complaint against the wizard, who had vanished behind the curtain on the left."
LATENCY = re.compile(r"delivered \+\d+\.\d\d s")


def screen_of(state: ViewState, width: int = 100) -> str:
    console = Console(record=True, width=width, file=io.StringIO())
    console.print(render(state))
    return console.export_text()


class Script:
    """Events as the relay emits them: increasing seq, the stream clock advanced by hand."""

    def __init__(self, state: ViewState) -> None:
        self.state, self._seq = state, itertools.count(1)

    def __call__(self, t: float, kind: str, **data: Any) -> None:
        self.state.apply(Event(next(self._seq), kind, t, data))


# --------------------------------------------------------------------------------- state + render
def test_a_scripted_utterance_from_first_level_to_delivered() -> None:
    state = ViewState(source="file", sink="jsonl")
    emit = Script(state)
    screen = screen_of(state)
    assert "echo-relay  file → jsonl" in screen
    assert "(nothing heard yet)" in screen and "○ silent" in screen and "none (jsonl sink)" in screen
    assert "░" * METER_CELLS + "     -∞ dBFS" in screen  # no level yet: an empty meter

    emit(0.1, "level", dbfs=-60.0)
    emit(0.6, "speech_started", utterance_id="u1", at_s=0.45, prob=0.93, continues=None)
    emit(0.7, "level", dbfs=-21.0)
    emit(1.7, "partial", utterance_id="u1", text="He began a confused")
    screen = screen_of(state)
    assert "● speaking (u1 for 1.1 s)" in screen
    assert "█" * 20 + "░" * 10 + "  -21.0 dBFS" in screen  # -21 dBFS fills 39/60 of the meter: 20 cells
    assert "He began a confused" in screen and "listening" in screen
    assert state.utterances["u1"].final is False  # shown greyed

    emit(5.6, "speech_ended", utterance_id="u1", start_s=0.45, end_s=4.9, reason="sentence_end")
    screen = screen_of(state)
    assert "○ silent" in screen and "0.45–4.90 s" in screen and "decoding…" in screen

    emit(5.9, "transcript", utterance_id="u1", asr_text=SENTENCE, text=SENTENCE)
    emit(5.8, "partial", utterance_id="u1", text="He began")  # a late interim decode never replaces the final
    assert state.utterances["u1"].text == SENTENCE and state.utterances["u1"].final
    assert "sending…" in screen_of(state)

    emit(5.95, "echo", utterance_id="u1", outcome="delivered", text=SENTENCE, latency_s=1.05, reason=None)
    emit(6.0, "stats", ledger={"closed": 1, "delivered": 1, "dropped": {}, "undeliverable": 0, "in_flight": 0,
                               "unheard": {"regions": 0, "seconds": 0.0}}, queues={"delivery": 0})
    screen = screen_of(state)
    assert "✓ delivered +1.05 s" in screen
    assert "He began a confused complaint against the wizard" in screen  # wrapped in its column at 100
    assert SENTENCE in screen_of(state, width=200)
    assert "1 closed · 1 delivered · 0 dropped · 0 undeliverable · 0 in flight · queue 0" in screen
    assert "problems" not in screen
    assert "t 6.0 s" in screen  # the stream clock of the latest event


def test_drops_undeliverable_unheard_and_interrupts_are_shown_with_their_reasons() -> None:
    state = ViewState(source="mic", sink="daily")
    emit = Script(state)
    emit(1.0, "speech_started", utterance_id="u1", at_s=0.9, prob=0.8)
    emit(1.4, "speech_ended", utterance_id="u1", start_s=0.9, end_s=1.3, reason="hangover")
    emit(1.6, "echo", utterance_id="u1", outcome="dropped", text="", latency_s=0.3, reason="asr:empty")
    emit(2.0, "unheard", start_s=1.8, end_s=2.0, seconds=0.2, why="no utterance opened, peak VAD probability 0.41")
    emit(3.0, "speech_started", utterance_id="u2", at_s=2.9, prob=0.9)
    emit(4.0, "speech_ended", utterance_id="u2", start_s=2.9, end_s=3.9, reason="hangover")
    emit(4.3, "transcript", utterance_id="u2", asr_text="um hello there", text="hello there")
    emit(9.0, "echo", utterance_id="u2", outcome="undeliverable", text="hello there", latency_s=5.1,
         reason="the room did not take it within 5 s")
    emit(9.1, "interrupt", sent=True, dropped=0, detail="interrupt sent (POST /interrupt)")
    emit(9.2, "stats", ledger={"closed": 2, "delivered": 0, "dropped": {"asr:empty": 1}, "undeliverable": 1,
                               "in_flight": 0, "unheard": {"regions": 1, "seconds": 0.2}}, queues={"delivery": 0})
    screen = screen_of(state, width=110)
    assert "✗ dropped asr:empty" in screen and "✗ undeliverable" in screen
    assert re.search(r"problems +u1 dropped: asr:empty", screen)
    assert "u2 undeliverable: the room did not take it within 5 s ('hello there')" in screen
    assert "1 dropped (asr:empty 1) · 1 undeliverable" in screen
    assert re.search(r"unheard +1 region\(s\), 0\.2 s  last: no utterance opened, peak VAD probability 0\.41", screen)
    assert "interrupts  1  last: interrupt sent (POST /interrupt)" in screen
    assert "○ silent" in screen
    assert "waiting for the first update" in screen  # a daily sink: the room state comes within a second

    emit(9.3, "room", joined=True, replica_present=True, replica_speaking=True, network="good",
         conversation_id="c0ffee")
    assert "✓ joined  ✓ replica present  ✓ replica speaking  network good  c0ffee" in screen_of(state)
    emit(9.4, "room", joined=True, replica_present=False, replica_speaking=False, network="reconnecting",
         conversation_id="c0ffee")
    assert "✓ joined  ✗ replica present  ✗ replica speaking  network reconnecting" in screen_of(state)


def test_the_view_keeps_the_last_utterances_and_the_meter_stays_in_its_bounds() -> None:
    state = ViewState(source="file", sink="jsonl", recent=3)
    emit = Script(state)
    for i in range(1, 6):
        emit(i, "speech_started", utterance_id=f"u{i}", at_s=float(i), prob=0.9)
        emit(i + 0.5, "speech_ended", utterance_id=f"u{i}", start_s=float(i), end_s=i + 0.4, reason="hangover")
        emit(i + 0.7, "transcript", utterance_id=f"u{i}", asr_text=f"utterance number {i}",
             text=f"utterance number {i}")
    assert list(state.utterances) == ["u3", "u4", "u5"]
    screen = screen_of(state)
    assert "utterance number 2" not in screen and "utterance number 5" in screen
    emit(6.0, "level", dbfs=3.0)  # above full scale (a clipped float source): a full meter, not more
    assert "█" * METER_CELLS + "    3.0 dBFS" in screen_of(state)
    emit(6.1, "level", dbfs=-120.0)  # digital silence
    assert "░" * METER_CELLS + " -120.0 dBFS" in screen_of(state)
    emit(6.15, "level", dbfs=None)  # a non-finite level is sent as null
    assert "░" * METER_CELLS + "     -∞ dBFS" in screen_of(state)
    emit(6.2, "a_kind_from_a_later_version", anything=1)  # ignored, the clock still moves
    assert state.t == 6.2


# ------------------------------------------------------------------------------------ when it is on
class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("requested", "sink", "also", "stdout", "expected"), [
    (None, "jsonl:out.jsonl", [], Tty(), True),  # a terminal, a sink that does not print: on
    (None, "daily", [], io.StringIO(), False),  # piped: the plain line format
    (None, "console", [], Tty(), False),  # the console sink prints its lines on stdout itself
    (None, "jsonl:out.jsonl", ["console"], Tty(), False),  # ... as a secondary sink too
    (False, "jsonl:out.jsonl", [], Tty(), False),  # --no-view
    (True, "jsonl:out.jsonl", [], io.StringIO(), True),  # --view when piped: the final view only
])
def test_when_the_view_is_on(requested: bool | None, sink: str, also: list[str], stdout: io.StringIO,
                             expected: bool) -> None:
    settings = load_settings(None, {"sink.spec": sink, "sink.also": also}, env={})
    assert want_view(requested, settings, stdout) is expected


def test_asking_for_the_view_with_a_console_sink_is_a_usage_mistake() -> None:
    with pytest.raises(ConfigError, match="console sink") as err:
        want_view(True, load_settings(None, {"sink.spec": "console"}, env={}), Tty())
    assert err.value.key == "sink.spec"


def test_run_view_with_the_console_sink_exits_2_with_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("ECHO_RELAY_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", "--view", "--sink", "console", "--no-control"],
                          capture_output=True, text=True, env=env, cwd=REPO / "tests", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "--view cannot share the terminal with the console sink" in proc.stderr


# --------------------------------------------------------------------------------------- the task
@pytest.fixture
def stderr_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """`setup_logging` as `echo-relay run` calls it, its stderr a buffer; the logging set-up put back after."""
    buffer = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buffer)
    with logging_restored():
        setup_logging("info", "text")
        yield buffer


def test_log_records_print_through_the_console_while_it_is_on(stderr_logging: io.StringIO) -> None:
    secret = "view-test-secret-0123456789"
    register_secret(secret)
    log = logging.getLogger("pipeline.test_view")
    console = Console(record=True, width=200, file=io.StringIO())
    before = list(logging.getLogger().handlers)
    restore = log_to_console(console)
    log.warning("the room is slow (token %s)", secret)
    log.debug("not at info level")
    restore()
    log.info("back on stderr")
    printed = console.export_text()
    assert re.search(r"^\d\d:\d\d:\d\d WARNING pipeline\.test_view: the room is slow \(token \*\*\*\)$", printed,
                     re.MULTILINE), printed  # the same line format, scrubbed, at the same levels
    assert "not at info level" not in printed and secret not in printed
    assert "back on stderr" in stderr_logging.getvalue() and "the room is slow" not in stderr_logging.getvalue()
    assert logging.getLogger().handlers == before


@pytest.mark.parametrize("terminal", [True, False], ids=["terminal", "piped"])
async def test_the_view_follows_the_bus_and_ends_on_the_final_ledger(stderr_logging: io.StringIO,
                                                                     terminal: bool) -> None:
    clock = [0.0]
    bus = EventBus(Metrics(), lambda: clock[0])
    ledger = Ledger()
    relay: Any = SimpleNamespace(events=bus, ledger=ledger, delivery=SimpleNamespace(depth=0),
                                 source=SimpleNamespace(name="file"), sink=SimpleNamespace(name="jsonl"))
    # In a terminal Live redraws from its thread and log lines print above it; piped (`--view | less`),
    # it draws the final frame only and log lines stay on stderr.
    console = Console(record=True, width=100, file=io.StringIO(), force_terminal=terminal)
    view = TerminalView(relay, console)
    view.start()
    assert bus.listening
    clock[0] = 1.0
    bus.emit("speech_started", utterance_id="u1", at_s=0.8, prob=0.9, continues=None)
    for i in range(30):  # more than one redraw period's worth: drawn together, none lost
        bus.emit("level", dbfs=-40.0 + i * 0.5)
    clock[0] = 3.0
    bus.emit("speech_ended", utterance_id="u1", start_s=0.8, end_s=2.9, reason="hangover")
    bus.emit("transcript", utterance_id="u1", asr_text="experience proves this", text="Experience proves this.")
    bus.emit("echo", utterance_id="u1", outcome="delivered", text="Experience proves this.", latency_s=0.61,
             reason=None)
    logging.getLogger("pipeline.test_view").warning("logged while the view is on")
    deadline = time.monotonic() + 5
    while view.state.utterances.get("u1", None) is None or view.state.utterances["u1"].outcome is None:
        assert time.monotonic() < deadline, view.state
        await asyncio.sleep(0.05)
    assert view.state.level_dbfs == -25.5 and view.state.missed == 0
    ledger.closed = ledger.delivered = 1  # no `stats` event came: stop() shows the ledger as the run ended
    await view.stop()
    screen = console.export_text()
    assert ("logged while the view is on" in screen) is terminal
    assert ("logged while the view is on" in stderr_logging.getvalue()) is not terminal
    if not terminal:
        assert screen.count("╭─ echo-relay  file → jsonl") == 1, screen  # the final frame, once
    assert "Experience proves this." in screen and "✓ delivered +0.61 s" in screen
    assert "1 closed · 1 delivered · 0 dropped" in screen
    assert not bus.listening  # unsubscribed: the relay no longer does interim decodes for it
    logging.getLogger("pipeline.test_view").warning("after the view")
    assert "after the view" in stderr_logging.getvalue()


# ------------------------------------------------------------------------------ a real terminal
class Pane:
    """`python -m pipeline run --view ... ` in a tmux pane of its own server (110x45): `screen()` is what
    the pane shows (with its history), `status` the exit status once the relay has exited."""

    def __init__(self, tmp_path: Path, clip: Path, out: Path) -> None:
        tmux = shutil.which("tmux")
        assert tmux, "this test runs the relay in tmux: apt-get install tmux (scripts/install.sh --dev does)"
        self.tmux, self.status_file = tmux, tmp_path / "status"
        script = tmp_path / "run.sh"
        script.write_text(
            "trap : INT\n"  # Ctrl-C goes to the whole foreground group: the script must outlive it
            f"cd '{tmp_path}'\n"
            f"'{sys.executable}' -m pipeline run --source 'file:{clip}' --sink 'jsonl:{out}' --view --speed 1 "
            "--no-control\n"
            f"echo $? > '{self.status_file}.tmp' && mv '{self.status_file}.tmp' '{self.status_file}'\n"
            "exec sleep 600\n")  # the pane stays for the final capture
        self.env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "LANG": "C.UTF-8",
                    "LC_ALL": "C.UTF-8"}
        for name in ("ECHO_RELAY_CONFIG", "TMUX", "TMUX_PANE", "NO_COLOR"):
            self.env.pop(name, None)
        self.server = ["-L", f"echo-relay-view-{os.getpid()}", "-f", os.devnull]
        self._tmux("new-session", "-d", "-s", "view", "-x", "110", "-y", "45", "sh", str(script))

    def _tmux(self, *args: str) -> str:
        return subprocess.run([self.tmux, "-u", *self.server, *args], capture_output=True, text=True, check=True,
                              env=self.env).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-S", "-", "-t", "view")

    def press(self, key: str) -> None:
        self._tmux("send-keys", "-t", "view", key)

    @property
    def status(self) -> str | None:
        return self.status_file.read_text().strip() if self.status_file.exists() else None

    def wait_for(self, what: str, done: Callable[[str], bool], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            screen = self.screen()
            if done(screen):
                return screen
            assert self.status is None, f"the relay exited ({self.status}) before {what}:\n{screen}"
            assert time.monotonic() < deadline, f"no {what} within {timeout_s} s:\n{screen}"
            time.sleep(0.1)

    def wait_for_exit(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while self.status is None:
            assert time.monotonic() < deadline, f"the relay did not exit within {timeout_s} s:\n{self.screen()}"
            time.sleep(0.1)
        return self.status

    def close(self) -> None:
        socket = subprocess.run([self.tmux, *self.server, "display-message", "-p", "#{socket_path}"], env=self.env,
                                check=False, capture_output=True, text=True).stdout.strip()
        subprocess.run([self.tmux, *self.server, "kill-server"], env=self.env, check=False, capture_output=True)
        if socket:
            Path(socket).unlink(missing_ok=True)


@pytest.fixture
def pane(tmp_path: Path) -> Iterator[Callable[[], Pane]]:
    panes: list[Pane] = []

    def start() -> Pane:
        clip = tmp_path / "speech.wav"
        silence = np.zeros(SAMPLE_RATE // 2, np.int16)
        write_wav(clip, np.concatenate([silence, load_pcm(CLIP), silence, silence]))
        panes.append(Pane(tmp_path, clip, tmp_path / "out.jsonl"))
        return panes[-1]

    yield start
    for p in panes:
        p.close()


def assert_one_view(screen: str) -> None:
    """Redrawn in place: one view on the screen, never a torn copy left behind by a log line."""
    assert screen.count("╭─ echo-relay  file → jsonl") == 1 and screen.count("╰─") == 1, screen


def meter(screen: str) -> str:
    """The level meter's bar (asserted to be there, with its dBFS figure)."""
    found = re.search(r"input\s+([█░]{30}) +(-?\d+\.\d|-∞) dBFS", screen)
    assert found, screen
    return found.group(1)


@pytest.mark.slow
def test_run_view_in_a_real_terminal(tmp_path: Path, pane: Callable[[], Pane]) -> None:
    p = pane()
    speaking = p.wait_for("speech", lambda s: "● speaking" in s, 120)
    (tmp_path / "screen-speaking.txt").write_text(speaking, encoding="utf-8")
    assert "█" in meter(speaking), speaking  # a level while the person speaks

    p.wait_for("delivered echo", lambda s: bool(LATENCY.search(s)), 60)
    status = p.wait_for_exit(60)
    final = p.screen()
    (tmp_path / "screen.txt").write_text(final, encoding="utf-8")
    assert status == "0", final
    assert_one_view(final)
    meter(final)
    assert LATENCY.search(final), final
    key = ["began", "confused", "complaint", "wizard", "vanished", "behind", "curtain", "left"]
    assert set(key) <= set(words(reference(CLIP)))
    assert len(set(words(final)) & set(key)) >= 6, final  # WER-tolerant: most of the sentence's key words
    assert "1 closed · 1 delivered · 0 dropped · 0 undeliverable" in final, final
    assert final.index("done: 1 utterance(s), 1 delivered") > final.index("╰"), final  # stderr again after it
    records = [line for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines() if line]
    assert len(records) == 1 and "wizard" in records[0].lower()


@pytest.mark.slow
def test_ctrl_c_under_the_view_logs_above_it_and_delivers_what_was_said(tmp_path: Path,
                                                                       pane: Callable[[], Pane]) -> None:
    p = pane()
    p.wait_for("speech", lambda s: re.search(r"speaking \(u1 for [1-9]", s) is not None, 120)
    p.press("C-c")  # the terminal echoes ^C after the view's bottom line: it must not tear the view
    status = p.wait_for_exit(60)
    final = p.screen()
    (tmp_path / "screen.txt").write_text(final, encoding="utf-8")
    assert status == "0", final
    assert_one_view(final)
    warning = final.index("SIGINT: stopping capture")
    assert warning < final.index("╭─ echo-relay") < final.index("done: 1 utterance(s), 1 delivered"), final
    assert "✓ delivered" in final and "began" in words(final), final


def test_speech_left_out_by_the_decoder_is_shown_with_its_reason() -> None:
    state = ViewState(source="mic", sink="daily")
    emit = Script(state)
    emit(1.0, "speech_started", utterance_id="u1", at_s=0.9, prob=0.8)
    assert "left out" not in screen_of(state, width=110)  # no row until the decoder leaves speech out
    emit(9.0, "speech_ended", utterance_id="u1", start_s=0.9, end_s=8.9, reason="hangover")
    emit(9.4, "uncovered", utterance_id="u1", start_s=0.9, end_s=8.9, seconds=4.2,
         why="the decode has 31% of the letters expected for 7.8 s of speech")
    screen = screen_of(state, width=110)
    assert re.search(r"left out +1 utterance\(s\), 4\.2 s by the decoder", screen)
    assert "u1 left out 4.2 s: the decode has 31% of the letters expected for 7.8 s of speech" in screen
