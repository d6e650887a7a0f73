"""Build the stages from settings and run the daemon (signals, control API, exit statuses)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.asr import make_asr_engine
from pipeline.asr.base import AsrEngine, AsrError
from pipeline.config import ConfigError, Settings, TavusSettings
from pipeline.frames import UtteranceMeta
from pipeline.logs import register_secret
from pipeline.metrics import Metrics
from pipeline.relay import Relay
from pipeline.sink import Sink, SinkError, make_sink
from pipeline.source import make_source
from pipeline.source.base import SourceError
from pipeline.source.file import decode_file
from pipeline.transform import build_chain
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
EXIT_INTERRUPTED = 130  # second Ctrl-C: exit at once
END_ON_EXIT_S = 3.0  # second Ctrl-C: time allowed to end the Tavus conversation this process created


class StartupError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def register_settings_secrets(settings: Settings) -> None:
    for secret in (settings.tavus.api_key, settings.tavus.meeting_token, settings.control.token,
                   settings.asr.openai_http.api_key):
        if secret is not None:
            register_secret(secret.get_secret_value())


def build_relay(settings: Settings, *, metrics: Metrics | None = None, source: Any = None,
                sink: Sink | None = None, asr: AsrEngine | None = None) -> Relay:
    """Construct every stage (nothing is started). Raises ConfigError/SourceError/SinkError/AsrError."""
    metrics = metrics or Metrics()
    chain = build_chain(settings.transform, metrics)
    vad = make_vad_stage(settings)
    source = source or make_source(settings, metrics)
    sink = sink or make_sink(settings, metrics)
    if source.name == "daily" and sink.name == "daily":  # listen in the sink's room, do not join twice
        from pipeline.sink.daily import DailySink
        from pipeline.source.daily import DailySource
        if isinstance(source, DailySource) and isinstance(sink, DailySink):
            daily_sink = sink
            source.room_from = lambda: daily_sink.connection
    return Relay(settings, source=source, sink=sink, asr=asr or make_asr_engine(settings.asr, metrics), vad=vad,
                 chain=chain, metrics=metrics)


async def run_daemon(settings: Settings, relay: Relay | None = None) -> int:
    """`echo-relay run`: start everything, relay until the source ends or a signal, drain, exit."""
    register_settings_secrets(settings)
    t = settings.tavus
    if settings.sink.spec == "daily" and t.api_key is None and not t.conversation_url:  # a config mistake (2)
        raise ConfigError("the daily sink needs a Tavus API key (environment TAVUS_API_KEY) to create a "
                          "conversation, or tavus.conversation_url to join an existing one", "tavus.api_key")
    try:
        relay = relay or build_relay(settings)
    except SourceError as exc:
        raise StartupError(str(exc), EXIT_INPUT) from None
    except SinkError as exc:
        raise StartupError(str(exc), EXIT_CONFIG) from None
    loop = asyncio.get_running_loop()
    control = None
    interrupted = 0

    def on_signal(signame: str) -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted == 1:
            log.warning("%s: stopping capture, delivering what is pending (again to exit at once)", signame)
            relay.stop()
        else:
            log.warning("%s again: exiting now", signame)
            end_owned_conversation(relay.sink, settings.tavus)
            os._exit(EXIT_INTERRUPTED)

    for sig in (signal.SIGINT, signal.SIGTERM):
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
        except SinkError as exc:
            raise StartupError(str(exc), EXIT_REMOTE) from None
        except SourceError as exc:
            raise StartupError(str(exc), EXIT_INPUT) from None
        try:
            await relay.run()
        except SourceError as exc:
            raise StartupError(str(exc), EXIT_INPUT) from None
    finally:
        if control is not None:
            await control.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
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
    if relay.failed:
        log.error("run failed: %s", relay.failed)
        return EXIT_RUNTIME
    if ledger.undeliverable:  # something was lost on the way out: the operator must notice
        log.error("%d message(s) could not be delivered (logged above with their text)", ledger.undeliverable)
        return EXIT_RUNTIME
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
