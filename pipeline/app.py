"""Build the stages from settings and run the daemon (signals, control API, exit statuses)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.asr import BUILTIN_ENGINES as ASR_BUILTINS
from pipeline.asr import make_asr_engine
from pipeline.asr.base import AsrEngine, AsrError
from pipeline.config import ConfigError, EnvUse, Settings, TavusSettings, secret_values
from pipeline.frames import UtteranceMeta
from pipeline.logs import register_secret
from pipeline.metrics import Metrics
from pipeline.perception.stage import build_perception, perception_problems
from pipeline.plugins import ASR_GROUP, TRANSFORM_GROUP, VAD_GROUP, PluginError, resolve
from pipeline.relay import Relay
from pipeline.sink import Sink, SinkError, make_sink
from pipeline.sink.base import SinkOutputError
from pipeline.source import make_source
from pipeline.source.base import SourceError
from pipeline.source.file import decode_file
from pipeline.specs import parse_sink_spec, parse_source_spec
from pipeline.transform import BUILTINS as TRANSFORM_BUILTINS
from pipeline.transform import build_chain
from pipeline.transform.chain import instantiate_step
from pipeline.vad import BUILTIN_ENGINES as VAD_BUILTINS
from pipeline.vad import VadStage, make_vad_stage

log = logging.getLogger(__name__)

# Exit statuses (documented in the README and `echo-relay --help`).
EXIT_OK = 0
EXIT_RUNTIME = 1  # the relay failed while running (sink gave up for good, room ended with an error)
EXIT_CONFIG = 2  # configuration or usage mistake (names the key)
EXIT_INPUT = 3  # audio input problem: missing/corrupt/empty file, no device
EXIT_MODEL = 4  # ASR model missing or corrupt, ASR server unreachable at start
EXIT_PORT = 5  # control API cannot listen (port in use, refused public bind)
EXIT_REMOTE = 6  # Tavus/Daily refused at start: key rejected, invalid room URL, join failed
EXIT_OUTPUT = 7  # the local output cannot be written at start (jsonl path unwritable): not Tavus/Daily's doing
EXIT_INTERRUPTED = 130  # second Ctrl-C: exit at once
# Ledger drop reasons of speech the ASR never recognised (pipeline/delivery.py): counted apart in the run's
# summary, and a run where every utterance ended so exits 1.
ASR_FAILURES = ("asr_error", "asr_deadline")
END_ON_EXIT_S = 3.0  # second Ctrl-C: time allowed to end the Tavus conversation this process created
# Each stops the relay gracefully (drain, exit 0/1); a second one exits at once. SIGHUP too: a closed
# terminal or systemd's hangup must not lose the utterance in progress (reloading config is not supported).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StartupError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def register_settings_secrets(settings: Settings) -> None:
    """Scrub from every log record: the keys and tokens, and every value the environment filled in."""
    for secret in secret_values(settings):
        register_secret(secret)


# ------------------------------------------------------------------------------ preflight checks
# What `check_stages` can check. `config check` runs them all; `run` runs PREFLIGHT_RUN first (the
# chain is built by build_relay, and a missing audio file or unwritable output keeps its own exit
# status, 3 or 7, when the stage opens it).
STAGE_CHECKS = ("transform", "perception", "asr", "vad", "source_file", "sink_file", "tavus")
PREFLIGHT_RUN = ("asr", "vad", "tavus")
# The checks that need each section: a section that failed validation is not checked further.
_SECTION_CHECKS = {"transform": ("transform",), "perception": ("perception",), "asr": ("asr",), "vad": ("vad",),
                   "source": ("source_file",),
                   "sink": ("sink_file", "tavus"), "tavus": ("tavus",)}


def _engine_problem(name: str, builtins: Mapping[str, Callable[..., Any]], group: str, key: str
                    ) -> ConfigError | None:
    """Resolve an engine name through the plugin registry without calling it (no model is loaded)."""
    try:
        factory = resolve(name, builtins, group)
    except PluginError as exc:
        return ConfigError(str(exc), key)
    if not callable(factory):
        return ConfigError(f"{name!r} is not a class or factory: {type(factory).__name__}", key)
    return None


def _transform_problems(settings: Settings) -> list[ConfigError]:
    """Build every step as build_relay would (options checked, words_file read, regexes compiled)
    without running it, collecting each step's problem instead of stopping at the first."""
    problems: list[ConfigError] = []
    for i, cfg in enumerate(settings.transform.steps):
        key = f"transform.steps[{i}]"
        try:
            instantiate_step(resolve(cfg.step, TRANSFORM_BUILTINS, TRANSFORM_GROUP), cfg.options, cfg.step, key)
        except PluginError as exc:
            problems.append(ConfigError(str(exc), f"{key}.step"))
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def _path_problems(settings: Settings, checks: Collection[str]) -> list[ConfigError]:
    # As the stages open them (pipeline/source/file.py, pipeline/sink/jsonl.py): no ~ expansion here;
    # paths in a config file were made absolute by pipeline/config.py.
    problems: list[ConfigError] = []
    kind, arg = parse_source_spec(settings.source.spec) if "source_file" in checks else ("", None)
    if kind == "file":
        path = Path(str(arg))
        if not path.exists():
            problems.append(ConfigError(f"audio file {path} does not exist", "source.spec"))
        elif not path.is_file():
            problems.append(ConfigError(f"{path} is not an audio file (a directory?)", "source.spec"))
    outputs = [("sink.spec", settings.sink.spec)]
    outputs += [(f"sink.also[{i}]", spec) for i, spec in enumerate(settings.sink.also)]
    for key, spec in outputs if "sink_file" in checks else []:
        sink_kind, sink_arg = parse_sink_spec(spec)
        if sink_kind != "jsonl" or not sink_arg:
            continue
        out = Path(sink_arg)
        existing = next((p for p in (out, *out.parents) if p.exists()), None)
        if out.is_dir():
            problems.append(ConfigError(f"{out} is a directory; name the JSONL file to write", key))
        elif existing is not None and existing != out and not existing.is_dir():
            problems.append(ConfigError(f"cannot create {out}: {existing} is not a directory", key))
    return problems


def check_stages(settings: Settings, *, checks: Collection[str] = STAGE_CHECKS,
                 skip_sections: Collection[str] = ()) -> list[ConfigError]:
    """Every check `run` makes before it opens a device or loads a model, each problem naming its key
    (`config check` reports them all at once, exit 2): the transform chain is built, not run; the ASR
    and VAD engine names are resolved through the plugin registries, nothing loaded; a file source
    must exist and a jsonl sink be creatable; the daily sink needs a Tavus key or a room.
    `skip_sections`: sections that failed validation, whose checks are left out. No secret is in
    the messages."""
    active = set(checks) - {c for s in skip_sections for c in _SECTION_CHECKS.get(s, ())}
    problems: list[ConfigError] = []
    if "transform" in active:
        problems += _transform_problems(settings)
    if "perception" in active:
        problems += perception_problems(settings.perception, parse_source_spec(settings.source.spec)[0])
    if "asr" in active:
        problems += filter(None, [_engine_problem(settings.asr.engine, ASR_BUILTINS, ASR_GROUP, "asr.engine")])
    if "vad" in active:
        problems += filter(None, [_engine_problem(settings.vad.engine, VAD_BUILTINS, VAD_GROUP, "vad.engine")])
    problems += _path_problems(settings, active)
    t = settings.tavus
    if "tavus" in active and settings.sink.spec == "daily" and t.api_key is None and not t.conversation_url:
        problems.append(ConfigError("the daily sink needs a Tavus API key (environment TAVUS_API_KEY) to create a "
                                    "conversation, or tavus.conversation_url to join an existing one",
                                    "tavus.api_key"))
    if not problems:
        return []
    return ConfigError.combine(problems).redacted(secret_values(settings)).problems


def _user_engine_error(name: str, key: str, exc: Exception) -> ConfigError:
    return ConfigError(f"{name!r} could not be created: {type(exc).__name__}: {exc}", key)


def build_relay(settings: Settings, *, metrics: Metrics | None = None, source: Any = None,
                sink: Sink | None = None, asr: AsrEngine | None = None) -> Relay:
    """Construct every stage (nothing is started). Raises ConfigError/SourceError/SinkError/AsrError."""
    metrics = metrics or Metrics()
    chain = build_chain(settings.transform, metrics)
    try:
        vad = make_vad_stage(settings)
    except ConfigError:
        raise
    except Exception as exc:  # a user's VAD factory failed: its key, exit 2 (built-in failures stay bugs)
        if settings.vad.engine in VAD_BUILTINS:
            raise
        raise _user_engine_error(settings.vad.engine, "vad.engine", exc) from None
    source = source or make_source(settings, metrics)
    sink = sink or make_sink(settings, metrics)
    if source.name == "daily" and sink.name == "daily":  # listen in the sink's room, do not join twice
        from pipeline.sink.daily import DailySink
        from pipeline.sink.fanout import FanoutSink
        from pipeline.source.daily import DailySource
        room_sink = sink.primary if isinstance(sink, FanoutSink) else sink  # sink.also: the room is the primary
        if isinstance(source, DailySource) and isinstance(room_sink, DailySink):
            daily_sink = room_sink
            source.room_from = lambda: daily_sink.connection
    if asr is None:
        try:
            asr = make_asr_engine(settings.asr, metrics)
        except PluginError as exc:  # unknown name, or not an engine: was "unexpected error" exit 1
            raise ConfigError(str(exc), "asr.engine") from None
        except (AsrError, ConfigError):
            raise
        except Exception as exc:
            if settings.asr.engine in ASR_BUILTINS:
                raise
            raise _user_engine_error(settings.asr.engine, "asr.engine", exc) from None
    perception = build_perception(settings.perception, metrics, source.now_s)
    if perception.video is not None and not source.has_video:
        raise ConfigError(f"video analyzers need a source with a camera (daily); source {source.name!r} has none",
                          "perception.video.analyzers")
    return Relay(settings, source=source, sink=sink, asr=asr, vad=vad, chain=chain, metrics=metrics,
                 perception=perception)


async def run_daemon(settings: Settings, relay: Relay | None = None, *, view: bool = False) -> int:
    """`echo-relay run`: start everything, relay until the source ends or a signal, drain, exit.
    `view`: show the live terminal view (pipeline/view.py) while the relay runs."""
    register_settings_secrets(settings)
    problems = check_stages(settings, checks=PREFLIGHT_RUN if relay is None else ("tavus",))
    if problems:  # config mistakes, all of them, before anything is opened or loaded (exit 2)
        raise ConfigError.combine(problems)
    try:
        relay = relay or build_relay(settings)
    except SourceError as exc:
        raise StartupError(str(exc), EXIT_INPUT) from None
    except SinkError as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from None
    loop = asyncio.get_running_loop()
    control = None
    terminal_view = None
    interrupted = 0

    def on_signal(signame: str) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted == 1:
            log.warning("%s: stopping capture, delivering what is pending (again to exit at once)", signame)
            relay.stop()
        else:
            log.warning("%s again: exiting now", signame)
            if terminal_view is not None:
                terminal_view.close_now()  # restores the cursor and the terminal before the immediate exit
            end_owned_conversation(relay.sink, settings.tavus)
            os._exit(EXIT_INTERRUPTED)

    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        try:
            if settings.control.enabled:
                from pipeline.control.server import ControlServerError, start_control_server
                try:
                    control = await start_control_server(relay, relay.metrics, settings)
                except ControlServerError as exc:
                    raise StartupError(str(exc), EXIT_PORT) from None
            await relay.start()
        except AsrError as exc:
            raise StartupError(str(exc), EXIT_MODEL) from None
        except SinkOutputError as exc:  # before SinkError: its subclass
            raise StartupError(str(exc), EXIT_OUTPUT) from None
        except SinkError as exc:
            raise StartupError(str(exc), EXIT_REMOTE) from None
        except SourceError as exc:
            raise StartupError(str(exc), EXIT_INPUT) from None
        if view:
            from pipeline.view import TerminalView
            terminal_view = TerminalView(relay)
            terminal_view.start()
        try:
            await relay.run()
        except SourceError as exc:
            raise StartupError(str(exc), EXIT_INPUT) from None
    finally:
        if terminal_view is not None:  # first: what is logged from here on goes to stderr again
            await terminal_view.stop()
        if control is not None:
            await control.stop()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    ledger = relay.ledger
    reasons = f" {ledger.dropped}" if ledger.dropped else ""  # e.g. {'empty': 1}
    log.info("done: %d utterance(s), %d delivered, %d dropped%s, %d undeliverable", ledger.closed,
             ledger.delivered, sum(ledger.dropped.values()), reasons, ledger.undeliverable)
    if relay.ended and not relay.failed:
        log.info("the conversation ended (%s)%s", relay.ended,
                 "; everything was delivered" if not ledger.undeliverable else "")
    # Audio the VAD scored as speech-like but never opened an utterance on: shown even when nothing was
    # dropped, so an operator sees what was not heard (vad.unheard_threshold).
    log.log(logging.WARNING if ledger.unheard else logging.INFO, "unheard speech: %d region(s), %.1f s",
            ledger.unheard, ledger.unheard_s)
    # Speech inside utterances that the decoder left out (pipeline/asr/coverage.py; each is logged with its reason).
    log.log(logging.WARNING if ledger.uncovered else logging.INFO, "speech left out by the decoder: %d "
            "utterance(s), %.1f s", ledger.uncovered, ledger.uncovered_s)
    asr_lost = sum(ledger.dropped.get(reason, 0) for reason in ASR_FAILURES)
    if asr_lost:  # speech that was never recognised (the engine failed or missed its deadline), not a gate verdict
        log.error("%d of %d utterance(s) lost to ASR failures (%s; the reasons are logged above)", asr_lost,
                  ledger.closed, ", ".join(f"{r}: {ledger.dropped[r]}" for r in ASR_FAILURES if r in ledger.dropped))
    if relay.failed:
        log.error("run failed: %s", relay.failed)
        return EXIT_RUNTIME
    if asr_lost and asr_lost == ledger.closed:  # nothing was recognised at all: not a success
        log.error("run failed: the ASR failed on every utterance (%s %s)", relay.asr.name, relay.asr.model_name)
        return EXIT_RUNTIME
    if ledger.undeliverable:  # something was lost on the way out: the operator must notice
        log.error("%d message(s) could not be delivered (logged above with their text)", ledger.undeliverable)
        return EXIT_RUNTIME
    return EXIT_OK


async def run_serve(settings: Settings, tree: Mapping[str, Any], used: EnvUse | None = None) -> int:
    """`echo-relay serve`: load the model once, serve the control API with /v1/relays, run relays until a
    signal; then refuse new relays (/readyz 503), drain every relay, exit 0. A second signal exits at once
    (130), ending the Tavus conversations the relays created."""
    from pipeline.control.server import ControlServerError, create_serve_app, start_control_server
    from pipeline.serve import RelayPool

    register_settings_secrets(settings)
    if not settings.control.enabled:
        raise ConfigError("serve is driven through the control API: it cannot be disabled", "control.enabled")
    problems = check_stages(settings, checks=("asr",))
    if problems:
        raise ConfigError.combine(problems)
    try:
        pool = RelayPool(settings, tree, used)
    except PluginError as exc:
        raise ConfigError(str(exc), "asr.engine") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signame: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.warning("%s: refusing new relays, draining %d relay(s) (again to exit at once)", signame, pool.active)
            pool.accepting = False
            stop.set()
        else:
            log.warning("%s again: exiting now", signame)
            for _rid, sink in pool.owned_conversations():
                end_owned_conversation(sink, settings.tavus)
            os._exit(EXIT_INTERRUPTED)

    for sig in STOP_SIGNALS:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig.name)
    control = None
    try:
        try:
            await pool.start()
        except AsrError as exc:
            raise StartupError(str(exc), EXIT_MODEL) from None
        try:
            control = await start_control_server(None, pool.metrics, settings,
                                                 app=create_serve_app(pool, settings))
        except ControlServerError as exc:
            raise StartupError(str(exc), EXIT_PORT) from None
        log.info("serve: up to %d relays; POST %s/v1/relays starts one", settings.serve.max_relays, control.url)
        await stop.wait()
        await pool.close()
    finally:
        if control is not None:
            await control.stop()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if pool.accepting:  # start-up failed: nothing ran, but the engine may hold a thread
            await pool.close()
    log.info("serve: stopped; %d batch(es), %d utterance decode(s)", pool.scheduler.batches, pool.scheduler.decoded)
    return EXIT_OK


def end_owned_conversation(sink: Sink, tavus: TavusSettings, timeout_s: float = END_ON_EXIT_S) -> None:
    """Exit at once, but do not leave a conversation this process created running (billed until
    its timeout): end it within `timeout_s` from a helper thread (the event loop is not awaited on),
    else print its id and the command that ends it."""
    cid = sink.owned_conversation()
    if cid is None:
        return
    from pipeline.tavus.provision import end_command, end_conversation
    outcome: list[bool] = []

    def end() -> None:
        outcome.append(asyncio.run(end_conversation(tavus, cid, timeout_s=timeout_s)))

    worker = threading.Thread(target=end, name="end-conversation", daemon=True)
    worker.start()
    worker.join(timeout_s + 0.5)
    if not (outcome and outcome[0]):  # end_conversation logged the success
        log.error("Tavus conversation %s may still be running; end it with: %s", cid, end_command(cid))


# ------------------------------------------------------------------------------ transcribe
@dataclass
class FileTranscript:
    path: str
    text: str
    duration_s: float
    utterances: list[dict[str, Any]]
    decode_s: float


async def transcribe_files(paths: list[Path], settings: Settings) -> list[FileTranscript]:
    """`echo-relay transcribe`: the same VAD and ASR as `run`, as fast as possible, no transforms."""
    metrics = Metrics()
    asr = make_asr_engine(settings.asr, metrics)
    try:
        await asr.load()
    except AsrError:
        await asr.close()
        raise
    results: list[FileTranscript] = []
    try:
        for path in paths:
            audio = await asyncio.to_thread(decode_file, path)
            vad: VadStage = make_vad_stage(settings)
            utterances = vad.segment(audio)
            items: list[dict[str, Any]] = []
            decode_s = 0.0
            for utt in utterances:
                meta = UtteranceMeta(utterance_id=utt.id, audio_start_s=utt.audio_start_s,
                                     audio_end_s=utt.audio_end_s, reason=utt.reason)
                tr = await asr.transcribe(utt.audio, meta)
                decode_s += tr.decode_s
                items.append({"id": utt.id, "start_s": round(utt.audio_start_s, 3),
                              "end_s": round(utt.audio_end_s, 3), "text": tr.text,
                              "dropped": tr.dropped_reason})
            text = " ".join(i["text"] for i in items if i["text"])
            results.append(FileTranscript(str(path), text, len(audio) / 16000, items, decode_s))
    finally:
        await asr.close()
    return results
