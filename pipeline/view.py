"""The terminal view of `echo-relay run` (`--view`): what the relay hears, decides and sends, live.

Three parts, each usable alone:

- `ViewState`: a plain dataclass; `apply(event)` folds one event of the relay's stream
  (pipeline/events.py) into it. No terminal, no clock: unit-testable with scripted events.
- `render(state)`: a rich renderable of the state (a panel: input level, speech, room, the last
  utterances with their outcome and latency, problems, the ledger).
- `TerminalView`: subscribes to `relay.events`, applies what arrives and hands a fresh rendering to
  a `rich.live.Live` at most every REFRESH_S (rendering takes ~0.2 ms). Live writes to the terminal
  from its own thread, 10 times a second, so a slow terminal does not hold up the event loop; the
  relay only fills the view's bounded Subscription. While the view is on, log records print above it
  through its console (`pipeline.logs.log_to_console`), as blocking as they are on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console, Group, RenderableType
from rich.constrain import Constrain
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pipeline.config import ConfigError, Settings
from pipeline.events import Event, Subscription
from pipeline.logs import log_to_console

if TYPE_CHECKING:
    from pipeline.relay import Relay

log = logging.getLogger(__name__)

REFRESH_S = 0.1  # at most 10 redraws a second
RECENT_UTTERANCES = 6  # utterances listed
RECENT_PROBLEMS = 3  # drops / undeliverable echoes listed (they stay after their row scrolls away)
METER_CELLS = 30
METER_FLOOR_DBFS = -60.0  # an empty meter; 0 dBFS fills it
# Columns left free right of the view: the terminal echoes Ctrl-C as "^C" after its bottom line; in the
# last column that would wrap, move the cursor down and leave a torn copy of the top line behind.
ECHO_MARGIN = 2


def want_view(requested: bool | None, settings: Settings, stdout: TextIO | None = None) -> bool:
    """`--view` / `--no-view` / neither (None): on by default when standard output is a terminal and no
    console sink (`sink.spec` or `sink.also`) prints its own lines there: they would tear the view, and
    asking for both is a usage mistake."""
    console_sink = "console" in (settings.sink.spec, *settings.sink.also)
    if requested is None:
        stream = sys.stdout if stdout is None else stdout
        try:
            return not console_sink and stream is not None and stream.isatty()
        except (OSError, ValueError):  # a closed standard output
            return False
    if requested and console_sink:
        raise ConfigError("--view cannot share the terminal with the console sink (it prints each echo on "
                          "standard output): use --sink jsonl:PATH or daily without a console copy, or drop --view",
                          "sink.spec" if settings.sink.spec == "console" else "sink.also")
    return requested


# ------------------------------------------------------------------------------------ state
@dataclass(slots=True)
class UtteranceRow:
    id: str
    start_s: float | None = None
    end_s: float | None = None
    text: str = ""
    final: bool = False  # `text` is the final transcript (after the transforms); else a partial decode
    outcome: str | None = None  # delivered | dropped | undeliverable
    reason: str | None = None
    latency_s: float | None = None  # end of speech -> handed to the sink


@dataclass
class ViewState:
    source: str = ""  # names shown in the title, e.g. "file" and "jsonl"
    sink: str = ""
    recent: int = RECENT_UTTERANCES
    t: float = 0.0  # stream clock of the latest event
    level_dbfs: float | None = None
    speaking: str | None = None  # the open utterance's id
    speaking_since: float | None = None
    room: dict[str, Any] | None = None
    utterances: dict[str, UtteranceRow] = field(default_factory=dict)  # oldest first
    problems: deque[str] = field(default_factory=lambda: deque(maxlen=RECENT_PROBLEMS))
    unheard: int = 0
    unheard_s: float = 0.0
    unheard_why: str = ""
    uncovered: int = 0  # utterances whose decode left speech out (pipeline/asr/coverage.py)
    uncovered_s: float = 0.0
    interrupts: int = 0
    last_interrupt: str = ""
    ledger: dict[str, Any] | None = None
    queues: dict[str, Any] = field(default_factory=dict)
    missed: int = 0  # events the view's subscription lost (it did not keep up)

    def apply(self, event: Event) -> None:
        self.t = max(self.t, event.t)
        handler: Callable[[dict[str, Any]], None] | None = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:  # kinds added later are ignored
            handler(event.data)

    def _row(self, utterance_id: str) -> UtteranceRow:
        row = self.utterances.get(utterance_id)
        if row is None:
            row = self.utterances[utterance_id] = UtteranceRow(utterance_id)
            while len(self.utterances) > self.recent:
                del self.utterances[next(iter(self.utterances))]
        return row

    def _on_level(self, d: dict[str, Any]) -> None:
        self.level_dbfs = d.get("dbfs")

    def _on_speech_started(self, d: dict[str, Any]) -> None:
        uid = d["utterance_id"]
        self.speaking, self.speaking_since = uid, self.t
        self._row(uid).start_s = d.get("at_s")

    def _on_partial(self, d: dict[str, Any]) -> None:
        row = self._row(d["utterance_id"])
        if not row.final:
            row.text = d.get("text", "")

    def _closed(self, utterance_id: str) -> UtteranceRow:
        """The row of an utterance the VAD closed (also when the view missed its speech_ended)."""
        if self.speaking == utterance_id:
            self.speaking = self.speaking_since = None
        return self._row(utterance_id)

    def _on_speech_ended(self, d: dict[str, Any]) -> None:
        row = self._closed(d["utterance_id"])
        row.start_s, row.end_s = d.get("start_s", row.start_s), d.get("end_s")

    def _on_transcript(self, d: dict[str, Any]) -> None:
        row = self._closed(d["utterance_id"])
        row.text, row.final = d.get("text") or d.get("asr_text") or "", True

    def _on_echo(self, d: dict[str, Any]) -> None:
        row = self._closed(d["utterance_id"])
        row.outcome, row.reason, row.latency_s = d.get("outcome"), d.get("reason"), d.get("latency_s")
        if d.get("text"):
            row.text, row.final = d["text"], True
        if row.outcome != "delivered":
            self.problems.append(f"{row.id} {row.outcome}: {row.reason or 'no reason given'}"
                                 + (f" ({_clip(row.text, 60)!r})" if row.text else ""))

    def _on_unheard(self, d: dict[str, Any]) -> None:
        self.unheard += 1
        self.unheard_s += d.get("seconds") or 0.0
        self.unheard_why = d.get("why", "")

    def _on_uncovered(self, d: dict[str, Any]) -> None:
        self.uncovered += 1
        self.uncovered_s += d.get("seconds") or 0.0
        self.problems.append(f"{d.get('utterance_id')} left out {d.get('seconds') or 0.0:.1f} s: {d.get('why', '')}")

    def _on_interrupt(self, d: dict[str, Any]) -> None:
        self.interrupts += 1
        self.last_interrupt = d.get("detail") or ""

    def _on_room(self, d: dict[str, Any]) -> None:
        self.room = d

    def _on_stats(self, d: dict[str, Any]) -> None:
        self.ledger = d.get("ledger")
        self.queues = d.get("queues") or {}
        unheard = (self.ledger or {}).get("unheard") or {}
        if unheard.get("regions", 0) >= self.unheard:  # the ledger counts every region, seen or not
            self.unheard, self.unheard_s = unheard["regions"], unheard.get("seconds", self.unheard_s)


# ----------------------------------------------------------------------------------- render
def render(state: ViewState) -> RenderableType:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("input", _meter(state.level_dbfs))
    grid.add_row("speech", _speech(state))
    grid.add_row("room", _room(state))
    parts: list[RenderableType] = [grid, Text(), _utterances(state), Text()]
    foot = Table.grid(padding=(0, 2))
    foot.add_column(style="bold", no_wrap=True)
    foot.add_column()
    foot.add_row("ledger", _ledger(state))
    unheard = Text(f"{state.unheard} region(s), {state.unheard_s:.1f} s",
                   style="yellow" if state.unheard else "")
    if state.unheard_why:
        unheard.append(f"  last: {state.unheard_why}", style="dim")
    foot.add_row("unheard", unheard)
    if state.uncovered:  # shown once the decoder has left speech out (a row more in the view)
        foot.add_row("left out", Text(f"{state.uncovered} utterance(s), {state.uncovered_s:.1f} s by the decoder",
                                      style="yellow"))
    if state.interrupts:
        foot.add_row("interrupts", f"{state.interrupts}  last: {state.last_interrupt}")
    for i, problem in enumerate(state.problems):
        foot.add_row("problems" if i == 0 else "", Text(problem, style="red" if "undeliverable" in problem
                                                        else "yellow"))
    parts.append(foot)
    title = f"echo-relay  {state.source} → {state.sink}" if state.source else "echo-relay"
    subtitle = f"t {state.t:.1f} s" + (f" · view missed {state.missed} events" if state.missed else "")
    return Panel(Group(*parts), title=title, title_align="left", subtitle=subtitle, subtitle_align="right")


def _meter(dbfs: float | None) -> Text:
    level = METER_FLOOR_DBFS if dbfs is None else max(METER_FLOOR_DBFS, min(0.0, dbfs))
    cells = round(METER_CELLS * (level - METER_FLOOR_DBFS) / -METER_FLOOR_DBFS)
    colour = "red" if level > -3 else "yellow" if level > -12 else "green"
    meter = Text("█" * cells, style=colour)
    meter.append("░" * (METER_CELLS - cells), style="grey39")
    meter.append(f" {'-∞' if dbfs is None else f'{dbfs:.1f}':>6} dBFS")
    return meter


def _speech(state: ViewState) -> Text:
    if state.speaking is None:
        return Text("○ silent", style="dim")
    since = "" if state.speaking_since is None else f" for {max(0.0, state.t - state.speaking_since):.1f} s"
    return Text(f"● speaking ({state.speaking}{since})", style="bold green")


def _room(state: ViewState) -> Text:
    if state.sink != "daily":
        return Text(f"none ({state.sink or 'this'} sink)", style="dim")
    if state.room is None:
        return Text("waiting for the first update", style="dim")
    r = state.room
    text = Text()
    for key, label in (("joined", "joined"), ("replica_present", "replica present"),
                       ("replica_speaking", "replica speaking")):
        text.append(f"{'✓' if r.get(key) else '✗'} {label}  ", style="green" if r.get(key) else "dim")
    network = r.get("network") or "unknown"
    text.append(f"network {network}", style="green" if network in ("good", "connected") else "yellow")
    if r.get("conversation_id"):
        text.append(f"  {r['conversation_id']}", style="dim")
    return text


def _utterances(state: ViewState) -> Table:
    table = Table(expand=True, box=None, padding=(0, 1), show_edge=False, header_style="bold")
    table.add_column("utt", no_wrap=True)
    table.add_column("audio", no_wrap=True)
    table.add_column("text", ratio=1, overflow="fold")
    table.add_column("echo", no_wrap=True)
    if not state.utterances:
        table.add_row("", "", Text("(nothing heard yet)", style="dim"), "")
    for row in state.utterances.values():
        end = "" if row.end_s is None else f"{row.end_s:.2f} s"
        span = "" if row.start_s is None else f"{row.start_s:.2f}–{end}"
        table.add_row(row.id, span, Text(row.text, style="" if row.final else "grey50 italic"), _outcome(state, row))
    return table


def _outcome(state: ViewState, row: UtteranceRow) -> Text:
    latency = "" if row.latency_s is None else f" +{row.latency_s:.2f} s"
    if row.outcome == "delivered":
        return Text(f"✓ delivered{latency}", style="green")
    if row.outcome == "dropped":  # the reason is short (asr:empty, transform:NAME); undeliverable's is not
        return Text(f"✗ dropped {_clip(row.reason or '', 24)}", style="yellow")
    if row.outcome is not None:
        return Text(f"✗ {row.outcome}", style="red")
    if row.id == state.speaking:
        return Text("listening", style="dim")
    return Text("sending…" if row.final else "decoding…", style="dim")


def _ledger(state: ViewState) -> Text:
    g = state.ledger
    if g is None:
        return Text("(first update within a second)", style="dim")
    dropped: dict[str, int] = g.get("dropped") or {}
    text = Text(f"{g.get('closed', 0)} closed · ")
    text.append(f"{g.get('delivered', 0)} delivered", style="green")
    text.append(" · ")
    reasons = ", ".join(f"{k} {v}" for k, v in dropped.items())
    text.append(f"{sum(dropped.values())} dropped" + (f" ({reasons})" if reasons else ""),
                style="yellow" if dropped else "")
    text.append(" · ")
    text.append(f"{g.get('undeliverable', 0)} undeliverable", style="bold red" if g.get("undeliverable") else "")
    text.append(f" · {g.get('in_flight', 0)} in flight · queue {state.queues.get('delivery', 0)}")
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


# ------------------------------------------------------------------------------------- task
class TerminalView:
    """`start()` after the relay started, `await stop()` when its run is over (the final view stays on
    screen, with the final ledger)."""

    def __init__(self, relay: Relay, console: Console | None = None) -> None:
        self.relay = relay
        self.console = console or Console()
        self.state = ViewState(source=relay.source.name, sink=relay.sink.name)
        self._frame: RenderableType = self._render()
        self._live = Live(console=self.console, get_renderable=lambda: self._frame, auto_refresh=True,
                          refresh_per_second=1 / REFRESH_S, redirect_stdout=True, redirect_stderr=True)
        self._sub: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._restore_logging: Callable[[], None] | None = None

    def start(self) -> None:
        self._sub = self.relay.events.subscribe()
        self._live.start()
        if self.console.is_terminal:  # else Live draws once, at stop(): log lines cannot tear it
            self._restore_logging = log_to_console(self.console)
        self._task = asyncio.create_task(self._feed(self._sub), name="terminal-view")

    async def _feed(self, sub: Subscription) -> None:
        try:
            while (event := await sub.get()) is not None:
                self._apply([event, *sub.pending()])
                await asyncio.sleep(REFRESH_S)  # what arrives meanwhile is drawn in one go
        except Exception:  # a bug in the view must not stop the relay
            log.exception("the terminal view failed; the relay goes on without it")
            self.close_now()

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            self.state.apply(event)
        self.state.missed = self._sub.dropped if self._sub is not None else 0
        self._frame = self._render()  # one assignment: Live's thread draws the old or the new frame

    def _render(self) -> RenderableType:
        return Constrain(render(self.state), max(20, self.console.width - ECHO_MARGIN))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._sub is not None and self._live.is_started:
            relay = self.relay  # the run is over: show where everything ended up
            final = Event(0, "stats", self.state.t, {"ledger": relay.ledger.as_dict(),
                                                     "queues": {"delivery": relay.delivery.depth}})
            with contextlib.suppress(Exception):
                self._apply([*self._sub.pending(), final])
        self.close_now()

    def close_now(self) -> None:
        """Stop drawing at once (synchronous: also used right before an immediate exit)."""
        if self._restore_logging is not None:
            self._restore_logging()
            self._restore_logging = None
        if self._live.is_started:
            self._live.stop()
        if self._sub is not None:
            self._sub.close()
