"""Run the daemon: `run` and `serve` (signals, control API, exit statuses); `transcribe`.

The stages are built by the composition root, pipeline/wiring.py (`build_relay`, `check_stages`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.asr import make_asr_engine
from pipeline.asr.base import AsrError
from pipeline.config import ConfigError, EnvUse, Settings, TavusSettings
from pipeline.frames import UtteranceMeta
from pipeline.metrics import Metrics
from pipeline.plugins import PluginError
from pipeline.relay import Relay
from pipeline.serve import RelayPool
from pipeline.signals import EXIT_INTERRUPTED, STOP_SIGNALS, take_early
from pipeline.sink import Sink, SinkError
from pipeline.sink.base import SinkOutputError
from pipeline.source.base import SourceError
from pipeline.source.file import decode_file
from pipeline.vad import VadStage, make_vad_stage
from pipeline.wiring import PREFLIGHT_RUN, build_relay, check_stages, register_settings_secrets

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
# Ledger drop reasons of speech the ASR never recognised (pipeline/delivery.py): counted apart in the run's
# summary, and a run where every utterance ended so exits 1.
ASR_FAILURES = ("asr_error", "asr_deadline")
END_ON_EXIT_S = 3.0  # second Ctrl-C: time allowed to end the Tavus conversation this process created


class StartupError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


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
    for name in take_early():  # came while starting up (pipeline/signals.py)
        on_signal(name)
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
    for name in take_early():  # came while starting up (pipeline/signals.py)
        on_signal(name)
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
