"""The composition root: a relay's stages built from settings, and the checks made before they are.

`run` (pipeline/app.py) and every relay of `serve` (pipeline/serve.py) are built here, so both make the same
checks and wire the same stages; neither borrows from the other. `config check` runs `check_stages` alone.

    settings ──▶ check_stages (nothing opened or loaded; every problem names its key)
             ──▶ build_relay: transform chain, VAD, source, sink, ASR engine, perception ──▶ Relay (not started)
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.asr import BUILTIN_ENGINES as ASR_BUILTINS
from pipeline.asr import make_asr_engine
from pipeline.asr.base import AsrEngine, AsrError
from pipeline.config import ConfigError, Settings, secret_values
from pipeline.logs import register_secret
from pipeline.metrics import Metrics
from pipeline.perception.stage import build_perception, perception_problems
from pipeline.plugins import ASR_GROUP, TRANSFORM_GROUP, VAD_GROUP, PluginError, resolve
from pipeline.relay import Relay
from pipeline.sink import Sink, make_sink
from pipeline.source import make_source
from pipeline.specs import parse_sink_spec, parse_source_spec
from pipeline.transform import BUILTINS as TRANSFORM_BUILTINS
from pipeline.transform import build_chain
from pipeline.transform.chain import instantiate_step
from pipeline.vad import BUILTIN_ENGINES as VAD_BUILTINS
from pipeline.vad import make_vad_stage

if TYPE_CHECKING:
    from pipeline.sink.daily import DailySink


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
# A relay of `serve`, before it is built: run's checks but the ASR (the process loaded it once), and the chain
# and the files too, so that a request's mistake is a 422 naming its field rather than a relay that fails.
PREFLIGHT_SERVE = tuple(c for c in (*PREFLIGHT_RUN, "transform", "source_file", "sink_file") if c != "asr")
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


def _room_sink(sink: Sink) -> DailySink | None:
    """The sink's Daily room, when it has one (with sink.also the room is the fan-out's primary)."""
    if sink.name != "daily":
        return None
    from pipeline.sink.daily import DailySink
    from pipeline.sink.fanout import FanoutSink
    room_sink = sink.primary if isinstance(sink, FanoutSink) else sink
    return room_sink if isinstance(room_sink, DailySink) else None


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
    room_sink = _room_sink(sink)
    if source.name == "daily" and room_sink is not None:  # listen in the sink's room, do not join twice
        from pipeline.source.daily import DailySource
        if isinstance(source, DailySource):
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
    if room_sink is not None:  # Tavus is told the language an English-only model writes (read after its load)
        engine = asr
        room_sink.model_language = lambda: engine.only_language
    perception = build_perception(settings.perception, metrics, source.now_s)
    if perception.video is not None and not source.has_video:
        raise ConfigError(f"video analyzers need a source with a camera (daily); source {source.name!r} has none",
                          "perception.video.analyzers")
    return Relay(settings, source=source, sink=sink, asr=asr, vad=vad, chain=chain, metrics=metrics,
                 perception=perception)
