"""`echo-relay serve`: many relays in one process, one ASR engine (one model in memory).

    POST /v1/relays ─▶ RelayPool.create ─▶ ManagedRelay ─▶ its task: Relay.start(), Relay.run()
                                              │
                      every relay has its own source, VAD state, endpointing, transform chain, sink,
                      delivery ledger, event stream and metrics (labelled with its id on /metrics);
                      all decode through one AsrScheduler (pipeline/asr/scheduler.py), batched.

A relay's lifecycle is one `RelayPhase`::

    STARTING ──▶ RUNNING ──▶ DRAINING ──▶ ENDED      (the source ended, the conversation ended, DELETE)
        │           │            │
        └───────────┴────────────┴──────▶ FAILED     (could not start, or failed while running)

One relay's failure stays its own: its task catches everything, records why, and releases what it
opened; the other relays and the scheduler go on. Ended and failed relays stay listed for
`serve.keep_ended_s` (their final state and ledger), and no longer count against `serve.max_relays`.

Configuration: each relay's settings are the process's configuration (file, environment) with the
request's `source`, `sink`, Tavus shortcut and `config` overrides applied, validated like a config
file. What a request may change is narrower than what a config file may say (`request_problem`):
a config file is the operator's, a request is any API client's. The sections shared by the whole
process (`SHARED_SECTIONS`) are not per relay; code is loaded only from the config file (per relay,
transform steps and VAD engines are built-in ones, and not `webhook`, which calls out); files are
named only under `serve.file_roots`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import logging
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.asr import make_asr_engine
from pipeline.asr.base import AsrEngine
from pipeline.asr.scheduler import AsrScheduler
from pipeline.config import PATH_OPTION, ConfigError, EnvUse, Settings, dotted, validate_tree
from pipeline.control.api import AtCapacity, RelayRequest, RelayRequestError
from pipeline.logs import bind_log_context, log_context
from pipeline.metrics import Metrics, ServeMetrics
from pipeline.perception.builtins import AUDIO_BUILTINS, VIDEO_BUILTINS
from pipeline.relay import Relay
from pipeline.sink import SinkError
from pipeline.source.base import SourceError
from pipeline.specs import SpecError, parse_sink_spec, parse_source_spec
from pipeline.transform import BUILTINS as TRANSFORM_BUILTINS
from pipeline.vad import BUILTIN_ENGINES as VAD_BUILTINS
from pipeline.wiring import PREFLIGHT_SERVE, build_relay, check_stages, register_settings_secrets

log = logging.getLogger(__name__)

# One per process: the model and its scheduling, the control API, serve itself, logging.
SHARED_SECTIONS = ("asr", "control", "serve", "logging")
DELETE_GRACE_S = 5.0  # DELETE waits the relay's drain deadline plus this for it to finish
# Built-in transform steps a request may use: `webhook` sends the text to a URL the request would choose, and
# a `regex_replace` pattern can take exponential time on the event loop that every relay shares.
REQUEST_STEPS = frozenset(TRANSFORM_BUILTINS) - {"webhook", "regex_replace"}
# Keys only the config file may set, and why.
FILE_ONLY_KEYS = {("tavus", "api_url"): "it would receive the process's Tavus API key",
                  ("sink", "daily", "module"): "it names a module to import"}
# Request fields that set a configuration key (their errors name the field, not the key).
FIELD_KEYS = {"source.spec": "source", "sink.spec": "sink", "tavus.conversation_url": "conversation_url",
              "tavus.persona_id": "persona_id"}


class RelayPhase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    ENDED = "ended"
    FAILED = "failed"

    @property
    def active(self) -> bool:
        return self in (RelayPhase.STARTING, RelayPhase.RUNNING, RelayPhase.DRAINING)

    @property
    def takes_messages(self) -> bool:
        """Messages and interrupts are served until the relay drains (a draining relay delivers what it has)."""
        return self in (RelayPhase.STARTING, RelayPhase.RUNNING)


@dataclass(eq=False)
class ManagedRelay:
    id: str
    relay: Relay
    created_at: str
    phase: RelayPhase = RelayPhase.STARTING
    error: str | None = None
    ended_at: float | None = None  # time.monotonic() when it ended or failed
    task: asyncio.Task[None] | None = None

    def finish(self, phase: RelayPhase, error: str | None = None) -> None:
        self.phase, self.error, self.ended_at = phase, error, time.monotonic()

    def describe(self, *, detail: bool = False) -> dict[str, Any]:
        relay = self.relay
        out: dict[str, Any] = {
            "id": self.id, "phase": self.phase.value, "error": self.error, "created_at": self.created_at,
            "source": relay.settings.source.spec, "sink": relay.settings.sink.spec,
            "conversation_id": relay.sink.conversation_id, "ledger": relay.ledger.as_dict(),
            "latency": relay.delivery.latency_summary(),
        }
        if detail:
            out["room"] = relay.sink.room.as_dict()
            out["ended"] = relay.ended
            out["status"] = relay.status()
        return out


def merge_overrides(tree: dict[str, Any], overrides: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> None:
    """Apply `overrides` to `tree` in place: nested mappings merge section by section, a dotted key
    ("vad.threshold") is a path, anything else replaces the value."""
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise RelayRequestError(f"config{'.' if prefix else ''}{dotted(prefix)}", f"{key!r} is not a key name")
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise RelayRequestError(f"config.{dotted((*prefix, *parents))}", "is not a section")
            node = child
        if isinstance(value, Mapping) and isinstance(node.get(last), dict):
            merge_overrides(node[last], value, (*prefix, *parents, last))
        else:
            node[last] = copy.deepcopy(dict(value)) if isinstance(value, Mapping) else copy.deepcopy(value)


def _override_keys(overrides: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys: list[str] = []
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        keys += _override_keys(value, path + ".") if isinstance(value, Mapping) else [path]
    return keys


def _paths(settings: Settings) -> Iterator[tuple[str, str]]:
    """(key, path) of every file a relay's settings name: its source, outputs and step files."""
    try:
        kind, arg = parse_source_spec(settings.source.spec)
        if kind == "file":
            yield "source.spec", str(arg)
        for key, spec in [("sink.spec", settings.sink.spec),
                          *((f"sink.also[{i}]", spec) for i, spec in enumerate(settings.sink.also))]:
            sink_kind, sink_arg = parse_sink_spec(spec)
            if sink_kind == "jsonl" and sink_arg:
                yield key, sink_arg
    except SpecError:  # validated already; nothing to add
        return
    for i, step in enumerate(settings.transform.steps):
        for option, value in step.options.items():
            if PATH_OPTION.search(option) and isinstance(value, str):
                yield f"transform.steps[{i}].{option}", value


def _value(settings: Settings, path: tuple[str, ...]) -> Any:
    node: Any = settings
    for part in path:
        node = getattr(node, part)
    return node


def request_problem(base: Settings, relay: Settings) -> tuple[str, str] | None:
    """(key, why) when a relay's settings take from a request what only the config file may say (see the
    module docstring); None when they do not. Compared with the process's settings, so what the config
    file itself says is never refused."""
    if relay.transform.steps != base.transform.steps:
        for i, step in enumerate(relay.transform.steps):
            if step.step not in REQUEST_STEPS:
                return (f"transform.steps[{i}].step", f"{step.step!r} cannot be set per relay: steps are built-in "
                        f"({', '.join(sorted(REQUEST_STEPS))}); others load code or call out, so they come from the "
                        "config file")
    if relay.perception != base.perception:  # analyzers by dotted path or entry point load code
        p = relay.perception
        for key, analyzers, builtins in (("perception.analyzers", p.analyzers, AUDIO_BUILTINS),
                                         ("perception.video.analyzers", p.video.analyzers, VIDEO_BUILTINS)):
            for i, a in enumerate(analyzers):
                if a.analyzer not in builtins:
                    return (f"{key}[{i}].analyzer", f"{a.analyzer!r} cannot be set per relay: analyzers are built-in "
                            f"({', '.join(sorted(builtins))}); others load code, so they come from the config file")
    if relay.vad.engine != base.vad.engine and relay.vad.engine not in VAD_BUILTINS:
        return "vad.engine", (f"{relay.vad.engine!r} cannot be set per relay: built-in engines only "
                              f"({', '.join(VAD_BUILTINS)})")
    for keypath, why in FILE_ONLY_KEYS.items():
        if _value(relay, keypath) != _value(base, keypath):
            return ".".join(keypath), f"cannot be set per relay: {why}"
    roots = [Path(r).resolve() for r in base.serve.file_roots]
    base_paths = dict(_paths(base))
    for key, path in _paths(relay):
        if base_paths.get(key) == path:
            continue
        resolved = Path(path).expanduser().resolve()
        if not any(resolved.is_relative_to(root) for root in roots):
            where = (f"under serve.file_roots ({', '.join(map(str, roots))})" if roots
                     else "set serve.file_roots to allow files through the API")
            return key, f"{path} is not a file this API may name: {where}"
    return None


class RelayPool:
    """The relays of one `serve` process, their shared ASR scheduler and admission control."""

    def __init__(self, settings: Settings, tree: Mapping[str, Any], used: EnvUse | None = None, *,
                 engine: AsrEngine | None = None) -> None:
        self.settings = settings
        self._tree = copy.deepcopy(dict(tree))
        self._used = used or EnvUse()
        self._relays: dict[str, ManagedRelay] = {}
        self.metrics = ServeMetrics(self.relay_metrics)
        self.engine = engine or make_asr_engine(settings.asr, None)
        self.scheduler = AsrScheduler(self.engine, settings.asr.batch, self.metrics.asr)
        self.accepting = True  # False once the process is shutting down
        self._publish()

    # ----------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load the model once (AsrError when it cannot be)."""
        await self.scheduler.load()
        self.metrics.model_loaded.set(1)
        self.metrics.process.describe_asr(self.scheduler.name, self.scheduler.model_name)

    async def close(self) -> None:
        """Stop accepting, drain every relay (each within its own sink.drain_timeout_s), close the engine."""
        self.accepting = False
        for m in self._relays.values():
            self._stop(m)
        tasks = [m.task for m in self._relays.values() if m.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.scheduler.close()
        self._publish()

    def readiness(self) -> dict[str, bool]:
        return {"model_loaded": self.scheduler.loaded, **self.scheduler.readiness(), "accepting": self.accepting,
                "capacity": self.active < self.settings.serve.max_relays}

    @property
    def active(self) -> int:
        return sum(m.phase.active for m in self._relays.values())

    def relay_metrics(self) -> dict[str, Metrics]:
        return {rid: m.relay.metrics for rid, m in list(self._relays.items())}

    def owned_conversations(self) -> list[tuple[str, Any]]:
        """(relay id, sink) of every relay whose sink created a Tavus conversation (second signal: end them)."""
        return [(rid, m.relay.sink) for rid, m in self._relays.items() if m.relay.sink.owned_conversation()]

    # ------------------------------------------------------------------------------- requests
    def settings_for(self, request: RelayRequest) -> Settings:
        """This relay's settings: the process's configuration with the request applied."""
        if request.conversation_url and request.persona_id:
            raise RelayRequestError("persona_id", "give conversation_url (join a conversation) or persona_id "
                                                  "(create one), not both")
        tree = copy.deepcopy(self._tree)
        shared = [k for k in _override_keys(request.config) if k.split(".")[0] in SHARED_SECTIONS]
        if shared:
            raise RelayRequestError(f"config.{shared[0]}", f"the {shared[0].split('.')[0]} section is shared by "
                                                           "every relay of the process; set it in the config file")
        merge_overrides(tree, request.config)
        tavus_shortcut = bool(request.conversation_url or request.persona_id)
        source = request.source or ("daily" if tavus_shortcut else None)
        sink = request.sink or ("daily" if tavus_shortcut else None)
        for key, value in (("source.spec", source), ("sink.spec", sink),
                           ("tavus.conversation_url", request.conversation_url),
                           ("tavus.persona_id", request.persona_id)):
            if value is not None:
                merge_overrides(tree, {key: value})
        try:
            settings = validate_tree(tree, self._used)
        except ConfigError as exc:
            first = exc.problems[0]
            raise RelayRequestError(self._field(first.key, request), first.message) from None
        problem = request_problem(self.settings, settings)
        if problem is not None:
            raise RelayRequestError(self._field(problem[0], request), problem[1])
        return settings

    @staticmethod
    def _field(key: str | None, request: RelayRequest) -> str:
        if key in FIELD_KEYS and getattr(request, FIELD_KEYS[key]) is not None:
            return FIELD_KEYS[key]
        return f"config.{key}" if key else "config"

    async def create(self, request: RelayRequest) -> ManagedRelay:
        """Build and start a relay (it runs in its own task). Raises RelayRequestError (4xx) or AtCapacity."""
        self.prune()
        if not self.accepting:
            self.metrics.relays_refused.labels(reason="shutting_down").inc()
            raise RelayRequestError(None, "shutting down: not accepting relays", status=503)
        if self.active >= self.settings.serve.max_relays:
            self.metrics.relays_refused.labels(reason="capacity").inc()
            raise AtCapacity(self.active, self.settings.serve.max_relays)
        try:
            relay_id, relay = self._build(request)
        except RelayRequestError:
            self.metrics.relays_refused.labels(reason="invalid").inc()
            raise
        managed = ManagedRelay(relay_id, relay, datetime.now(UTC).isoformat(timespec="seconds"))
        self._relays[relay_id] = managed
        managed.task = asyncio.get_running_loop().create_task(self._run(managed), name=f"relay-{relay_id}")
        self._publish()
        with log_context(relay_id=relay_id):
            log.info("relay %s created: %s -> %s", relay_id, relay.settings.source.spec, relay.settings.sink.spec)
        return managed

    def _build(self, request: RelayRequest) -> tuple[str, Relay]:
        """The relay's stages, checked as `run` checks them before it starts (nothing is opened yet)."""
        settings = self.settings_for(request)
        register_settings_secrets(settings)  # a request's own Tavus key or token is scrubbed from logs too
        problems = check_stages(settings, checks=PREFLIGHT_SERVE)
        if problems:
            raise RelayRequestError(self._field(problems[0].key, request), problems[0].message)
        relay_id = uuid.uuid4().hex[:12]
        client = self.scheduler.client(relay_id)
        try:
            return relay_id, build_relay(settings, metrics=Metrics(), asr=client)
        except ConfigError as exc:
            problem = RelayRequestError(self._field(exc.key, request), exc.message)
        except SourceError as exc:
            problem = RelayRequestError(self._field("source.spec", request), str(exc))
        except SinkError as exc:
            problem = RelayRequestError(self._field("sink.spec", request), str(exc))
        except BaseException:
            self.scheduler.detach(relay_id)
            raise
        self.scheduler.detach(relay_id)
        raise problem

    def get(self, relay_id: str) -> ManagedRelay:
        managed = self._relays.get(relay_id)
        if managed is None:
            raise RelayRequestError("relay_id", f"no relay {relay_id!r} (GET /v1/relays lists them)", status=404)
        return managed

    def list(self) -> list[ManagedRelay]:
        self.prune()
        return list(self._relays.values())

    async def delete(self, relay_id: str) -> dict[str, Any]:
        """Stop the relay (capture ends, pending echoes are delivered until its drain deadline, it leaves
        the room and ends a conversation it created) and forget it; returns its final state."""
        managed = self.get(relay_id)
        self._stop(managed)
        if managed.task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(managed.task),
                                       managed.relay.settings.sink.drain_timeout_s + DELETE_GRACE_S)
        final = managed.describe()
        if managed.task is None or managed.task.done():
            self._relays.pop(relay_id, None)
        self._publish()
        log.info("relay %s deleted: %s", relay_id, final["ledger"])
        return final

    def prune(self) -> None:
        """Forget ended and failed relays older than serve.keep_ended_s."""
        horizon = time.monotonic() - self.settings.serve.keep_ended_s
        for rid, m in list(self._relays.items()):
            if m.ended_at is not None and m.ended_at <= horizon:
                del self._relays[rid]
        self._publish()

    # -------------------------------------------------------------------------------- running
    def _stop(self, managed: ManagedRelay) -> None:
        if managed.phase.active:
            managed.phase = RelayPhase.DRAINING
            managed.relay.stop()

    async def _run(self, managed: ManagedRelay) -> None:
        """One relay's whole life; whatever happens here stays here."""
        bind_log_context(relay_id=managed.id)  # this task's records, and those of every task the relay starts
        relay = managed.relay
        try:
            try:
                await relay.start()
            except Exception as exc:  # Tavus refused, the room could not be joined, the output is unwritable
                log.error("relay %s could not start: %s", managed.id, exc)
                await relay.abandon()
                managed.finish(RelayPhase.FAILED, f"could not start: {exc}")
                return
            if managed.phase is RelayPhase.STARTING:
                managed.phase = RelayPhase.RUNNING
            self._publish()
            await relay.run()
        except Exception as exc:
            log.error("relay %s failed: %s: %s", managed.id, type(exc).__name__, exc,
                      exc_info=not isinstance(exc, SourceError | SinkError))
            managed.finish(RelayPhase.FAILED, f"{type(exc).__name__}: {exc}")
        else:
            ledger = relay.ledger
            if relay.failed:
                managed.finish(RelayPhase.FAILED, relay.failed)
            elif ledger.undeliverable:
                managed.finish(RelayPhase.FAILED, f"{ledger.undeliverable} message(s) could not be delivered")
            else:
                managed.finish(RelayPhase.ENDED, None)
            log.info("relay %s %s: %d utterance(s), %d delivered, %d dropped, %d undeliverable; unheard %d "
                     "region(s), %.1f s", managed.id, managed.phase.value, ledger.closed, ledger.delivered,
                     sum(ledger.dropped.values()), ledger.undeliverable, ledger.unheard, ledger.unheard_s)
        finally:
            if managed.phase.active:  # cancelled
                managed.finish(RelayPhase.FAILED, "cancelled")
            self._publish()

    def _publish(self) -> None:
        counts = {p: 0 for p in RelayPhase}
        for m in self._relays.values():
            counts[m.phase] += 1
        for phase, n in counts.items():
            self.metrics.relays.labels(phase=phase.value).set(n)
