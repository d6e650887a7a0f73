"""`echo-relay` command line.

Every command reports mistakes as one line on stderr and a documented exit status (see EXIT_* in
pipeline.app); tracebacks are reserved for bugs (and `--log-level debug`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from pipeline import __version__
from pipeline.config import (
    ConfigError,
    Settings,
    default_config_path,
    load_settings,
    load_tree,
    redacted_dump,
    secret_values,
    validate_sections,
    validate_tree,
)
from pipeline.logs import redact, register_secret, setup_logging
from pipeline.loop import run as run_guarded
from pipeline.signals import release_early
from pipeline.specs import path_problem

EPILOG = """\
exit status:
  0  success              3  audio input problem (missing/corrupt file, no device)
  1  runtime failure (incl. any message undeliverable, or the ASR failed on every utterance)
                          4  ASR model missing or corrupt, ASR server unreachable
  2  configuration/usage  5  control API cannot listen
  6  Tavus/Daily refused at start (key rejected, invalid room URL, join failed)
  7  output cannot be written at start (jsonl path: read-only, not a directory, ...)
  130 second Ctrl-C, SIGTERM or SIGHUP (the first one drains and exits 0 or 1)

environment:
  ECHO_RELAY_CONFIG   config file used when --config is not given (else ./config.yaml if present)
  TAVUS_API_KEY       Tavus API key (never put it in the config file)
  TAVUS_API_URL       Tavus API base URL (default https://tavusapi.com)
  ECHO_RELAY_TOKEN    control.token, the control API's bearer token (also with no config file)
  OPENAI_API_KEY      asr.openai_http.api_key (also with no config file)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse exits 2 on usage errors too, with one line
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", type=Path,
                   help="YAML configuration (default: $ECHO_RELAY_CONFIG, else ./config.yaml, else built-in defaults)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override logging.level")
    p.add_argument("--log-format", choices=["text", "json"],
                   help="override logging.format: json = one object per line on stderr (time, level, logger, message, "
                        "relay_id, utterance_id, conversation_id)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(prog="echo-relay", formatter_class=fmt, epilog=EPILOG, description=(
        "Relay what a person says to a Tavus persona in echo mode:\n"
        "microphone or file -> VAD -> local Whisper -> transform chain -> conversation.echo."))
    parser.add_argument("--version", action="version", version=f"echo-relay {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser("run", formatter_class=fmt, epilog=EPILOG, help="run the relay", description=(
        "Run the relay. With no options it plays the bundled sample (JFK, 1961) through the whole\n"
        "pipeline to the console. Options override the config file.\n\n"
        "examples:\n"
        "  echo-relay run --source mic --sink daily\n"
        "  echo-relay run --source file:talk.flac --sink jsonl:out.jsonl --speed 0"))
    _add_config_arg(run)
    run.add_argument("--source", metavar="SPEC", help="mic[:DEVICE] | file:PATH | daily")
    run.add_argument("--sink", metavar="SPEC", help="console | jsonl:PATH | daily")
    run.add_argument("--also", action="append", metavar="SPEC",
                     help="also copy what the sink sent to console | jsonl:PATH (repeatable; replaces sink.also)")
    run.add_argument("--speed", type=float, metavar="X",
                     help="file sources: 1 = real time (default), 2 = twice as fast, 0 = as fast as possible")
    run.add_argument("--loop", action="store_true", default=None, help="file sources: start again at the end")
    run.add_argument("--model", metavar="NAME", help="ASR model name or CTranslate2 directory (asr.model)")
    run.add_argument("--no-control", action="store_true", help="do not serve the local control API")
    run.add_argument("--control-port", type=int, metavar="PORT", help="control API port (control.port; 0 = any)")
    run.add_argument("--mode", choices=["text", "audio"], help="relay recognised text, or the voice itself")
    run.add_argument("--view", action=argparse.BooleanOptionalAction, default=None,
                     help="live terminal view (level, speech, room, utterances, ledger); default: on when stdout "
                          "is a terminal and no console sink prints there")

    srv = sub.add_parser("serve", formatter_class=fmt, epilog=EPILOG, help="serve many relays from one process",
                         description=(
        "Serve many relays from one process with one ASR model: POST /v1/relays on the control API\n"
        "starts one (a source and a sink, or a Tavus conversation); docs/control-api.md describes the API.\n\n"
        "examples:\n"
        "  echo-relay serve --control-port 8000\n"
        "  curl -X POST localhost:8000/v1/relays -H 'Content-Type: application/json' \\\n"
        "       -d '{\"conversation_url\": \"https://tavus.daily.co/c123\"}'"))
    _add_config_arg(srv)
    srv.add_argument("--control-port", type=int, metavar="PORT", help="control API port (control.port; 0 = any)")
    srv.add_argument("--max-relays", type=int, metavar="N", help="relays at once (serve.max_relays)")
    srv.add_argument("--model", metavar="NAME", help="ASR model name or CTranslate2 directory (asr.model)")

    tr = sub.add_parser("transcribe", formatter_class=fmt, help="transcribe files with the relay's VAD and ASR",
                        description="Run files through the same VAD and ASR as `run` (as fast as possible,\n"
                                    "no transforms) and print the text.")
    _add_config_arg(tr)
    tr.add_argument("files", nargs="+", type=Path, metavar="FILE", help="wav, flac, mp3, ogg, ... any rate")
    tr.add_argument("--json", action="store_true", help="one JSON object per file, with utterance timings")
    tr.add_argument("--model", metavar="NAME", help="ASR model name or CTranslate2 directory")

    dev = sub.add_parser("devices", help="list audio input devices", description="List audio input devices.")
    dev.add_argument("--json", action="store_true")

    cfg = sub.add_parser("config", help="validate and show configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    check = cfg_sub.add_parser("check", help="validate; print the effective config with secrets redacted",
                               description="Validate the configuration and print the effective settings\n"
                                           "(file + environment + defaults) with secrets shown as ***.",
                               formatter_class=fmt)
    _add_config_arg(check)

    models = sub.add_parser("models", help="list or download Whisper models")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", parser_class=_Parser)
    ml = models_sub.add_parser("list", help="models available locally (store, HF cache, bundled)")
    _add_config_arg(ml)
    mp = models_sub.add_parser("pull", help="download a model into the model store (needs the internet)")
    _add_config_arg(mp)
    mp.add_argument("name", help="tiny.en, base.en, small.en, distil-large-v3, ...")

    from pipeline.tavus.cli import add_tavus_parser
    _add_config_arg(add_tavus_parser(sub))
    return parser


def _start_logging(args: argparse.Namespace, settings: Settings) -> None:
    # Before anything is logged: every value the environment filled in and every key or token is
    # scrubbed from all output (pipeline/logs.py).
    for secret in secret_values(settings):
        register_secret(secret)
    level = getattr(args, "log_level", None) or settings.logging.level
    setup_logging(level, getattr(args, "log_format", None) or settings.logging.format)


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Settings:
    path = getattr(args, "config", None) or default_config_path()
    settings = load_settings(path, overrides)
    _start_logging(args, settings)
    return settings


def _fail(message: str, status: int) -> int:
    print(f"echo-relay: {redact(message)}", file=sys.stderr)
    return status


def _cmd_run(args: argparse.Namespace) -> int:
    from pipeline.app import StartupError, run_daemon
    overrides: dict[str, Any] = {
        "source.spec": args.source, "sink.spec": args.sink, "source.file.speed": args.speed,
        "source.file.loop": args.loop, "asr.model": args.model, "control.port": args.control_port,
        "sink.mode": args.mode, "control.enabled": False if args.no_control else None,
        "sink.also": args.also,
    }
    settings = _settings(args, overrides)
    from pipeline.view import want_view
    view = want_view(args.view, settings)
    try:
        return run_guarded(run_daemon(settings, view=view))
    except StartupError as exc:
        return _fail(str(exc), exc.status)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.app import StartupError, run_serve
    overrides = {"control.port": args.control_port, "serve.max_relays": args.max_relays, "asr.model": args.model}
    tree, used = load_tree(getattr(args, "config", None) or default_config_path(), overrides)
    settings = validate_tree(tree, used)
    _start_logging(args, settings)
    try:
        return run_guarded(run_serve(settings, tree, used))
    except StartupError as exc:
        return _fail(str(exc), exc.status)


def _cmd_transcribe(args: argparse.Namespace) -> int:
    from pipeline.app import EXIT_INPUT, EXIT_MODEL, transcribe_files
    from pipeline.asr.base import AsrError
    from pipeline.plugins import PluginError
    from pipeline.source.base import SourceError
    from pipeline.wiring import check_stages
    settings = _settings(args, {"asr.model": args.model})
    problems = check_stages(settings, checks=("asr", "vad"))
    for i, path in enumerate(args.files):  # before the model loads: no file can have such a name
        problem = path_problem(str(path))
        if problem is not None:
            problems.append(ConfigError(f"the path {problem}", f"files[{i}]"))
    if problems:
        raise ConfigError.combine(problems)
    try:
        results = asyncio.run(transcribe_files(args.files, settings))
    except PluginError as exc:  # the ASR engine's factory returned something else than an engine
        raise ConfigError(str(exc), "asr.engine") from None
    except SourceError as exc:
        return _fail(str(exc), EXIT_INPUT)
    except AsrError as exc:
        return _fail(str(exc), EXIT_MODEL)
    for r in results:
        if args.json:
            print(json.dumps({"file": r.path, "text": r.text, "duration_s": round(r.duration_s, 3),
                              "decode_s": round(r.decode_s, 3), "utterances": r.utterances}, ensure_ascii=False))
        elif len(results) > 1:
            print(f"{r.path}: {r.text}")
        else:
            print(r.text)
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from pipeline.app import EXIT_INPUT
    from pipeline.source.base import SourceError
    from pipeline.source.mic import format_input_devices, list_input_devices
    try:
        devices = list_input_devices()
    except SourceError as exc:
        return _fail(str(exc), EXIT_INPUT)
    print(json.dumps(devices, indent=2) if args.json else format_input_devices(devices))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    if args.config_command != "check":
        build_parser().parse_args(["config", "--help"])
        return 2
    from pipeline.wiring import check_stages
    # Everything `run` checks before it opens a device or loads a model, every problem at once: the
    # sections that validate are checked further even when others did not (pipeline/wiring.py check_stages).
    tree, used = load_tree(getattr(args, "config", None) or default_config_path())
    problems: list[ConfigError] = []
    try:
        settings = validate_tree(tree, used)
        invalid: frozenset[str] = frozenset()
    except ConfigError as exc:
        problems += exc.problems
        settings, invalid = validate_sections(tree, used)
    _start_logging(args, settings)
    problems += check_stages(settings, skip_sections=invalid)
    if problems:
        raise ConfigError.combine(problems)
    print(yaml.safe_dump(redacted_dump(settings), sort_keys=False, allow_unicode=True), end="")
    print("# configuration OK", file=sys.stderr)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from pipeline.app import EXIT_MODEL
    from pipeline.asr.base import AsrError
    from pipeline.asr.models import BUNDLED_HINT, list_models, pull_model
    settings = _settings(args)
    if args.models_command == "list":
        rows = list_models(settings.asr.models_dir)
        if not rows:
            print(f"No models found. The offline tiny.en: {BUNDLED_HINT}; or `echo-relay models pull NAME` "
                  "downloads one.")
        for row in rows:
            if row.get("error"):
                print(f"{row['name']:<24} {'broken':<9} {'':>10}  {row['error']}")
                continue
            origin = f"  (from {row['origin']})" if row.get("source") == "packaged" else ""
            print(f"{row['name']:<24} {row['source']:<9} {row.get('size', '')!s:>10}  {row['path']}{origin}")
        return 0
    if args.models_command == "pull":
        try:
            path = pull_model(args.name, settings.asr.models_dir)
        except AsrError as exc:
            return _fail(str(exc), EXIT_MODEL)
        print(path)
        return 0
    build_parser().parse_args(["models", "--help"])
    return 2


def _cmd_tavus(args: argparse.Namespace) -> int:
    from pipeline.tavus.cli import run_tavus
    return run_tavus(args, _settings(args))


DAEMONS = frozenset({"run", "serve"})  # commands that drain on a stop signal (pipeline/app.py)
COMMANDS = {"run": _cmd_run, "serve": _cmd_serve, "transcribe": _cmd_transcribe, "devices": _cmd_devices,
            "config": _cmd_config, "models": _cmd_models, "tavus": _cmd_tavus}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command not in DAEMONS:  # their stop signals act as usual again (pipeline/signals.py)
        release_early()
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:  # one line per problem, each naming its key
        for problem in exc.problems:
            _fail(f"configuration error: {problem.line}", 2)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line, the traceback only at debug level
        logging.getLogger(__name__).debug("unexpected error", exc_info=True)
        return _fail(f"unexpected error: {type(exc).__name__}: {exc} (rerun with --log-level debug)", 1)


if __name__ == "__main__":
    raise SystemExit(main())
