"""Typed configuration: `config.yaml` -> `Settings`.

- Every key has a named default documented next to it (and in config.yaml).
- `${VAR}` and `${VAR:-default}` are filled from the environment before validation, so secrets
  live in the environment, never in the file.
- Unknown keys are rejected (`extra="forbid"`), and every mistake becomes a `ConfigError` whose
  message names the key path and what was expected; the CLI turns it into exit status 2.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from pipeline.specs import SpecError, parse_sink_spec, parse_source_spec

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_SAMPLE = PACKAGE_DIR / "assets" / "jfk.wav"  # bundled real speech, see pipeline/assets/README.md
CONFIG_ENV = "ECHO_RELAY_CONFIG"


class ConfigError(Exception):
    """A configuration mistake. `key` is the dotted path of the offending key (or None)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key


def _checked_spec(parse: Callable[[str], object], spec: str) -> str:
    """Validate a source/sink spec with the grammar the stage uses, as a pydantic error naming the key."""
    try:
        parse(spec)
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    return spec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------- source
class FileSourceSettings(_Section):
    speed: float = Field(1.0, ge=0.0, description="1 = real time; 2 = twice as fast; 0 = as fast as possible")
    loop: bool = Field(False, description="start again at the end of the file instead of exiting")


class MicSourceSettings(_Section):
    device: str | int | None = Field(None, description="input device name (substring) or index; null = system default")
    sample_rate: int | None = Field(None, description="device rate; null = 16000 if supported, else the device default")
    channels: int = Field(1, ge=1, le=8, description="channels opened on the device; mixed down to mono")
    queue_blocks: int = Field(500, ge=10, description="blocks buffered between the capture thread and the loop")
    reopen_backoff_min_s: float = Field(0.5, gt=0, description="first wait before reopening a lost device")
    reopen_backoff_max_s: float = Field(10.0, gt=0, description="longest wait between reopen attempts")
    stall_timeout_s: float = Field(2.0, gt=0, description="no audio for this long = device lost")


class DailySourceSettings(_Section):
    participant: str | None = Field(None, description="user name or id to transcribe; null = first non-replica")


class SourceSettings(_Section):
    spec: str = Field("file:" + str(DEFAULT_SAMPLE), description="mic[:DEVICE] | file:PATH | daily")

    @field_validator("spec")
    @classmethod
    def _known_spec(cls, v: str) -> str:
        return _checked_spec(parse_source_spec, v)

    # 32 ms = one Silero frame: each wakeup carries exactly one VAD frame (20 ms blocks woke the loop
    # 50 times a second and left a frame waiting 8 ms on average for the block that completes it).
    block_ms: int = Field(32, ge=10, le=100, description="audio block size handed to the VAD, ms")
    # While no utterance is open, blocks are handed over this many ms at a time: a third of the
    # wakeups in silence (CPU). Speech onset is then seen up to this much later, which pre-roll
    # covers; the end of speech, which sets the echo latency, is always seen block by block.
    idle_block_ms: int = Field(96, ge=0, le=100, description="block size while nobody speaks, ms; 0 = block_ms")
    file: FileSourceSettings = FileSourceSettings()
    mic: MicSourceSettings = MicSourceSettings()
    daily: DailySourceSettings = DailySourceSettings()


# ------------------------------------------------------------------------------------------ vad
class VadSettings(_Section):
    engine: str = Field("silero", description="silero | webrtc | entry point | package.module:Class")
    aggressiveness: int = Field(3, ge=0, le=3, description="webrtcvad mode, 0 (lenient) .. 3 (strict)")
    frame_ms: Literal[10, 20, 30] = Field(30, description="webrtcvad frame size (Silero always uses 32 ms)")
    threshold: float = Field(0.5, gt=0, lt=1, description="Silero speech probability threshold")
    neg_threshold: float | None = Field(None, gt=0, lt=1, description="speech continues while the probability "
                                        "stays at or above this; null = threshold - 0.15 (Silero's rule)")
    weak_prob: float | None = Field(0.1, gt=0, lt=1, description="speech also continues at this probability "
                                    "when the frame is weak_snr_db above the noise floor (whispers); null = off")
    weak_snr_db: float = Field(15.0, gt=0, description="see weak_prob")
    weak_max_peak: float = Field(0.7, gt=0, le=1, description="... only for speech whose probability never reached "
                                 "this (clear speech ends where the VAD says)")
    weak_start_ms: int = Field(250, ge=0, description="speech with no frame at threshold opens an utterance "
                                                      "after this much active (neg_threshold or weak) audio")
    pre_roll_ms: int = Field(300, ge=0, le=2000, description="audio kept before speech onset so first words survive")
    start_ms: int = Field(90, ge=0, le=1000, description="speech needed to open an utterance")
    hangover_ms: int = Field(700, ge=30, le=5000, description="silence that always closes an utterance")
    min_utterance_ms: int = Field(200, ge=0, description="shorter speech is ignored (clicks, breaths)")
    max_utterance_s: float = Field(20.0, gt=1, le=30, description="longer speech is split at the quietest recent point")
    split_search_s: float = Field(3.0, gt=0, description="how far back to look for the quietest point when splitting")
    speech_pad_ms: int = Field(150, ge=0, le=1000, description="silence kept after speech end in the utterance audio")
    # Silero's LSTM state drifts: after noise or long digital silence it scores a quiet speaker far lower
    # than a fresh state does. Resetting inside short pauses costs the next phrase its context (jfk's
    # "ask not"), so the state is reset each time non-speech has lasted this long (pipeline/vad/silero.py).
    state_reset_ms: int = Field(2000, ge=0, description="Silero: reset its state every this much non-speech; 0 = never")
    state_reset_below: float = Field(0.2, gt=0, lt=1, description="... where non-speech is a probability below this")
    state_reset_max_dbfs: float = Field(-40.0, le=0, description="... in a frame quieter than this (a loud background "
                                        "such as music stays adapted: a fresh state hears singing as speech)")
    unheard_threshold: float = Field(0.35, gt=0, lt=1, description="speech-like frames (probability >= this) that "
                                     "never become part of an utterance are counted as unheard speech")
    unheard_min_ms: int = Field(150, ge=0, description="shorter speech-like runs are not counted as unheard")


class EndpointSettings(_Section):
    """Adaptive endpointing (pipeline/endpoint.py): decode speculatively at a short pause, then finish
    after a silence that depends on how sure Whisper is that the sentence ended."""

    enabled: bool = Field(True, description="false = plain segmentation: decode once after the full hangover")
    speculative_ms: int = Field(150, ge=30, le=2000, description="pause before a speculative decode starts")
    confident_prob: float = Field(0.95, ge=0, le=1, description="final . ? ! at least this probable ...")
    confident_pause_ms: int = Field(150, ge=0, description="... finishes the utterance after this much silence")
    likely_prob: float = Field(0.5, ge=0, le=1, description="final . ? ! at least this probable ...")
    likely_pause_ms: int = Field(600, ge=0, description="... finishes it after this much; else vad.hangover_ms")

    @model_validator(mode="after")
    def _ordered(self) -> EndpointSettings:
        if self.likely_prob > self.confident_prob:
            raise ValueError("endpoint.likely_prob must not exceed endpoint.confident_prob")
        return self


# ------------------------------------------------------------------------------------------ asr
class GateSettings(_Section):
    no_speech_prob: float = Field(0.6, ge=0, le=1, description="drop when no_speech_prob is above this ...")
    no_speech_logprob: float = Field(-0.8, description="... and avg_logprob is below this (Whisper's own rule)")
    min_avg_logprob: float = Field(-1.5, description="drop when avg_logprob is below this, whatever no_speech_prob")
    max_compression_ratio: float = Field(2.4, gt=0, description="drop repetitive loops (zlib ratio above this)")
    phantom_max_dbfs: float = Field(-40.0, description="phantom phrases are dropped when the audio is quieter")
    phantom_phrases: list[str] = Field(default_factory=lambda: [
        "thank you", "thanks for watching", "thank you for watching", "thanks for listening",
        "please subscribe", "subscribe to my channel", "you", "bye", "so", "okay",
        "subtitles by the amara.org community", "[music]", "[blank_audio]",
    ], description="known Whisper hallucinations on near-silence (compared after normalization)")


class OpenAIHttpSettings(_Section):
    url: str = Field("http://127.0.0.1:8080/v1/audio/transcriptions", description="OpenAI-compatible endpoint")
    api_key: SecretStr | None = Field(None, description="sent as Authorization: Bearer")
    model: str = Field("whisper-1", description="model field of the request")
    timeout_s: float = Field(15.0, gt=0)
    retries: int = Field(2, ge=0, description="retries on connection errors and 5xx")


class AsrSettings(_Section):
    engine: str = Field("faster-whisper", description="faster-whisper | openai-http | entry point | dotted path")
    model: str = Field("tiny.en", description="model name (tiny.en, base.en, small.en, distil-...) or CTranslate2 dir")
    models_dir: str = Field("models", description="local model store, searched first, downloads go here")
    download: bool = Field(True, description="allow downloading a missing model from the Hugging Face hub")
    device: str = Field("cpu", description="cpu | cuda | auto")
    compute_type: str = Field("int8", description="int8 | int8_float16 | float16 | float32 | default")
    cpu_threads: int = Field(2, ge=0, description="CTranslate2 intra-op threads (0 = library default)")
    beam_size: int = Field(1, ge=1, le=10, description="1 = greedy (fastest); 5 = faster-whisper's default")
    language: str | None = Field("en", description="language code; null = detect")
    initial_prompt: str | None = Field(None, description="text that primes vocabulary and style")
    hotwords: str | None = Field(None, description="words to bias decoding towards")
    short_window: bool = Field(True, description="encode max(10 s, utterance + 1 s) instead of always 30 s")
    deadline_s: float = Field(10.0, gt=0, description="per-utterance ASR deadline; past it the utterance is dropped")
    gate: GateSettings = GateSettings()
    openai_http: OpenAIHttpSettings = OpenAIHttpSettings()


# ------------------------------------------------------------------------------------ transform
class TransformStep(BaseModel):
    """One step of the chain. Keys other than these are passed to the step's factory as kwargs."""

    model_config = ConfigDict(extra="allow")
    step: str = Field(description="built-in name, entry point, or package.module:callable")
    timeout_s: float = Field(2.0, gt=0, description="per-call timeout")
    on_error: Literal["pass", "drop"] = Field("pass", description="on exception/timeout: pass the input on, or drop")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class TransformSettings(_Section):
    through_control_api: bool = Field(True, description="run text from POST /send_text_message through the chain")
    steps: list[TransformStep] = Field(default_factory=lambda: [
        TransformStep(step="filler_words"), TransformStep(step="whitespace")])


# ----------------------------------------------------------------------------------------- sink
class DailySinkSettings(_Section):
    module: str = Field("daily", description="daily-python ('daily') or a stand-in such as pipeline.testing.fake_daily")
    user_name: str = Field("echo-relay", description="our participant name in the room")
    replica_name: str | None = Field(None, description="user name identifying the replica; null = the persona's")
    join_timeout_s: float = Field(30.0, gt=0, description="wait for the join completion")
    replica_timeout_s: float = Field(60.0, gt=0, description="wait for the replica to be in the room")
    send_deadline_s: float = Field(15.0, gt=0, description="retry a failed send until this deadline, then give up")
    retry_initial_s: float = Field(0.2, gt=0)
    retry_max_s: float = Field(2.0, gt=0)
    end_conversation_on_exit: bool = Field(True, description="end the Tavus conversation if we created it")


class SinkSettings(_Section):
    spec: str = Field("console", description="console | jsonl:PATH | daily")

    @field_validator("spec")
    @classmethod
    def _known_spec(cls, v: str) -> str:
        return _checked_spec(parse_sink_spec, v)
    max_message_bytes: int = Field(4096, ge=512, description="serialized size limit per app-message")
    queue_size: int = Field(64, ge=1, description="messages waiting for the sink; when full the relay waits")
    drain_timeout_s: float = Field(10.0, gt=0, description="on shutdown, time allowed to deliver what is queued")
    audio_sample_rate: int = Field(24000, description="rate of audio echo (Tavus recommends 24000)")
    mode: Literal["text", "audio"] = Field("text", description="relay recognised text, or the user's own voice")
    # Relaying the speaker's words, the replica is always a line behind the speaker: interrupting it
    # whenever they talk would cut every line (off). A transform that answers the speaker wants the
    # reply cut when they talk over it (speech_start, or min_speech to ignore coughs and "mm-hm").
    barge_in: Literal["off", "speech_start", "min_speech"] = Field(
        "off", description="send conversation.interrupt when the user talks over the replica: off for a relay, "
                           "speech_start / min_speech when a transform answers the speaker")
    barge_in_min_ms: int = Field(300, ge=0, description="speech needed before interrupting, for min_speech")
    daily: DailySinkSettings = DailySinkSettings()


# ---------------------------------------------------------------------------------------- tavus
class TavusSettings(_Section):
    api_url: str = Field("https://tavusapi.com", description="base URL (TAVUS_API_URL overrides)")
    api_key: SecretStr | None = Field(None, description="x-api-key; use ${TAVUS_API_KEY}, never a literal")
    timeout_s: float = Field(15.0, gt=0)
    retries: int = Field(3, ge=0, description="retries on connection errors, 429 and 5xx")
    persona_id: str | None = Field(None, description="echo persona to reuse; null = create one")
    persona_name: str = Field("echo-relay", description="name of a created persona; identifies the replica")
    replica_id: str | None = Field(None, description="replica (face) for new conversations")
    conversation_url: str | None = Field(None, description="join this room instead of creating a conversation")
    conversation_id: str | None = Field(None, description="id of that conversation")
    meeting_token: SecretStr | None = Field(None, description="token for a private room")
    conversation_name: str = Field("echo-relay")
    test_mode: bool = Field(False, description="Tavus test mode: no replica joins, nothing billed")
    max_call_duration: int | None = Field(None, ge=1)
    participant_left_timeout: int | None = Field(None, ge=0)
    participant_absent_timeout: int | None = Field(None, ge=0)


# -------------------------------------------------------------------------------------- control
class ControlSettings(_Section):
    enabled: bool = Field(True, description="serve the local control API")
    host: str = Field("127.0.0.1", description="bind address; anything but loopback needs a token")
    port: int = Field(8000, ge=0, le=65535, description="0 = pick a free port")
    token: SecretStr | None = Field(None, description="Bearer token; required off loopback")
    max_body_bytes: int = Field(1_000_000, ge=1024)
    max_audio_s: float = Field(60.0, gt=0, description="longest audio accepted by /send_text_message")
    rate_limit_per_s: float = Field(50.0, gt=0, description="requests per second per client (token bucket)")


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Settings(_Section):
    source: SourceSettings = SourceSettings()
    vad: VadSettings = VadSettings()
    endpoint: EndpointSettings = EndpointSettings()
    asr: AsrSettings = AsrSettings()
    transform: TransformSettings = TransformSettings()
    sink: SinkSettings = SinkSettings()
    tavus: TavusSettings = TavusSettings()
    control: ControlSettings = ControlSettings()
    logging: LoggingSettings = LoggingSettings()

    @model_validator(mode="after")
    def _check_vad_timing(self) -> Settings:
        if self.endpoint.enabled and self.endpoint.speculative_ms >= self.vad.hangover_ms:
            raise ValueError("endpoint.speculative_ms must be shorter than vad.hangover_ms")
        return self


# -------------------------------------------------------------------------------------- loading
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def expand_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Fill `${VAR}` / `${VAR:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def fill(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set (write ${{{name}:-default}} for a default)",
                          path)

    filled = _VAR.sub(fill, value)
    # A reference to an empty variable with an empty default means "not set".
    return None if filled == "" and _VAR.search(value) else filled


def _key_of(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def validation_to_config_error(exc: ValidationError) -> ConfigError:
    err = exc.errors()[0]
    key = _key_of(tuple(err["loc"])) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] not in ("missing",):
        msg = f"{msg} (got {err['input']!r})"
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    return ConfigError(msg + more, key)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError("is not a section", p)
    node[last] = value


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> None:
    """Paths written in a config file are relative to that file, not to the working directory."""
    source = tree.get("source")
    if isinstance(source, dict) and isinstance(source.get("spec"), str) and source["spec"].startswith("file:"):
        path = Path(source["spec"][5:]).expanduser()
        if not path.is_absolute():
            source["spec"] = "file:" + str(base / path)
    asr = tree.get("asr")
    if isinstance(asr, dict) and isinstance(asr.get("models_dir"), str):
        models = Path(asr["models_dir"]).expanduser()
        if not models.is_absolute():
            asr["models_dir"] = str(base / models)


def load_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Read YAML (or nothing), fill env refs, apply dotted CLI overrides, validate."""
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"{p} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must be a mapping of sections (source, vad, asr, ...)")
        tree = expand_env(loaded, env)
        _resolve_relative_paths(tree, p.resolve().parent)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, dotted, value)
    # Environment conveniences documented in the README.
    tavus = tree.setdefault("tavus", {}) if isinstance(tree.get("tavus", {}), dict) else None
    if tavus is not None:
        if env.get("TAVUS_API_KEY") and not tavus.get("api_key"):
            tavus["api_key"] = env["TAVUS_API_KEY"]
        if env.get("TAVUS_API_URL") and not (overrides or {}).get("tavus.api_url"):
            tavus["api_url"] = env["TAVUS_API_URL"]
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise validation_to_config_error(exc) from None


def default_config_path() -> Path | None:
    """$ECHO_RELAY_CONFIG, else ./config.yaml if present, else none (built-in defaults)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    p = Path("config.yaml")
    return p if p.exists() else None


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data, secrets shown as '***' (or null when unset)."""
    data: dict[str, Any] = settings.model_dump(mode="json")

    def walk(model: BaseModel, node: dict[str, Any]) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, SecretStr):
                node[name] = "***"
            elif isinstance(value, BaseModel) and isinstance(node.get(name), dict):
                walk(value, node[name])
    walk(settings, data)
    return data


