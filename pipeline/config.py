"""Typed configuration: `config.yaml` -> `Settings`.

- Every key has a named default documented next to it (and in config.yaml).
- `${VAR}` and `${VAR:-default}` are filled from the environment before validation, so secrets
  live in the environment, never in the file.
- Unknown keys are rejected (`extra="forbid"`), and every mistake becomes a `ConfigError` whose
  message names the key path and what was expected; the CLI turns it into exit status 2. Every
  problem of a file is reported at once (`ConfigError.problems`).
- Hostile files fail fast (issue 11): the YAML loader bounds the file size, the nesting depth, the
  number of aliases and what they expand to, refuses self-referencing aliases and duplicate keys,
  and a file that is not UTF-8 is a config error naming the file.
- Every number has a documented range (`_num`), floats must be finite, and a YAML boolean is never
  taken for a number (`control.port: true` is not port 1).
- Values filled from the environment and values of secret-bearing keys (tokens, API keys,
  Authorization headers, URL credentials) are never echoed: see `secret_values` and `redacted_dump`.
"""

from __future__ import annotations

import functools
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipeline.langcodes import NAMES, check_code
from pipeline.logs import MIN_SECRET_LEN, REDACTED, redact
from pipeline.specs import SpecError, parse_sink_spec, parse_source_spec, path_problem

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_SAMPLE = PACKAGE_DIR / "assets" / "jfk.wav"  # bundled real speech, see pipeline/assets/README.md
CONFIG_ENV = "ECHO_RELAY_CONFIG"

# Loader limits (docs/reliability.md, "Hostile and unlucky input"). The shipped config.yaml is 10 KB
# and 5 levels deep (transform.steps[i].rules[j].pattern is the deepest documented key, 6).
MAX_CONFIG_BYTES = 1_000_000  # larger files are refused unread (a 50 MB file, /dev/zero)
MAX_YAML_DEPTH = 32  # nesting levels, counted with aliases expanded
MAX_YAML_ALIASES = 64  # `*name` references in one file
MAX_YAML_NODES = 10_000  # values (keys count too) with aliases expanded; config.yaml has ~300, billion laughs 10**9
MAX_ECHOED_CHARS = 60  # an offending value is quoted in an error up to this many characters

# Upper bounds shared by several settings (each field's description states its range).
MAX_TIMEOUT_S = 600.0  # network and per-call timeouts: 10 minutes
MAX_WAIT_S = 3600.0  # waits for a room, a replica, a drain: 1 hour
MAX_RETRIES = 10  # retry counts (with backoff, more never helps)
MAX_SHORT_MS = 10_000  # durations of speech/silence that shape one utterance
MIN_DBFS = -120.0  # below 16-bit silence (-96 dBFS): any lower threshold can never apply
MIN_LOGPROB = -100.0  # Whisper average log-probabilities; -100 means "never"
MIN_AUDIO_RATE = 8_000  # audio echo rates, as pipeline/control/models.py accepts them
MAX_AUDIO_RATE = 48_000
MAX_DEVICE_RATE = 192_000  # the highest rate sound cards offer
MAX_APP_MESSAGE_BYTES = 4096  # Daily's documented app-message limit (pipeline/protocol.py)
MAX_CPU_THREADS = 128  # CTranslate2 threads; 1000000 crashed the process (issue 11)
MAX_FILE_SPEED = 1000.0  # file sources: times real time
MAX_QUEUE_ITEMS = 100_000  # delivery queue and microphone blocks (500 blocks = 10 s)
MAX_TAVUS_S = 86_400  # Tavus conversation timeouts, seconds: one day

# Settings whose default comes from the environment, written as config.yaml shows them. The one source of
# these defaults: `load_tree` fills every key of this table that the configuration leaves out, with no file
# at all as with a file (issue 27: with no config file, ECHO_RELAY_TOKEN was never read and the API answered
# without a token); tests/test_env_hostile.py checks config.yaml against it, key by key.
ENV_DEFAULTS: dict[str, str] = {
    "asr.openai_http.api_key": "${OPENAI_API_KEY:-}",
    "tavus.api_url": "${TAVUS_API_URL:-https://tavusapi.com}",
    "tavus.api_key": "${TAVUS_API_KEY:-}",
    "control.token": "${ECHO_RELAY_TOKEN:-}",
}


class ConfigError(Exception):
    """A configuration mistake. `key` is the dotted path of the offending key (or None).

    `problems` lists every mistake found: this one alone, or, for a combined error (`combine`), each
    of them; `str()` is then one line per problem.
    """

    def __init__(self, message: str, key: str | None = None, *, problems: Sequence[ConfigError] = ()) -> None:
        self.message = message
        self.key = key
        self.problems: list[ConfigError] = list(problems) or [self]
        super().__init__("\n".join(p.line for p in self.problems) if problems else self.line)

    @property
    def line(self) -> str:
        """This problem alone, as `key: message`, on one line: control characters (a newline in a key,
        a terminal escape sequence in a value) are shown escaped."""
        text = f"{self.key}: {self.message}" if self.key else self.message
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

    @classmethod
    def combine(cls, problems: Sequence[ConfigError]) -> ConfigError:
        """One error carrying every problem of `problems` (flattened, in order)."""
        flat = [q for p in problems for q in p.problems]
        if not flat:
            raise ValueError("no problems to combine")
        if len(flat) == 1:
            return flat[0]
        return cls(flat[0].message, flat[0].key, problems=flat)

    def redacted(self, secrets: set[str] | frozenset[str]) -> ConfigError:
        """The same problems with every secret value and URL credential replaced by ***."""
        fixed = [ConfigError(redact(p.message, secrets), p.key) for p in self.problems]
        return ConfigError.combine(fixed)


def _checked_spec(parse: Callable[[str], object], spec: str) -> str:
    """Validate a source/sink spec with the grammar the stage uses, as a pydantic error naming the key."""
    try:
        parse(spec)
    except SpecError as exc:
        raise ValueError(str(exc)) from None
    return spec


def _usable_path(value: str) -> str:
    """A setting naming a file or directory: refused before any call into the OS when no file could have
    that name (a NUL byte, a lone surrogate, too long: pipeline/specs.py `path_problem`)."""
    problem = path_problem(value)
    if problem is not None:
        raise ValueError(f"the path {problem}")
    return value


def _has_userinfo(url: str) -> bool:
    """True when `url` carries credentials (`scheme://user[:password]@host`)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.username is not None or parts.password is not None


def _bound(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None, description: str = "") -> Any:
    """A numeric setting: `Field` with its bounds, and the range appended to the description so that
    /openapi.json, `--help`-style docs and error messages state it ("range 0 <= x <= 1000")."""
    low = f"{_bound(ge)} <= " if ge is not None else f"{_bound(gt)} < " if gt is not None else ""
    high = f" <= {_bound(le)}" if le is not None else f" < {_bound(lt)}" if lt is not None else ""
    text = f"range {low}x{high}"
    return Field(default, ge=ge, gt=gt, le=le, lt=lt,
                 description=f"{description} ({text})" if description else text)


def _is_numeric(annotation: Any) -> bool:
    """int/float, or a union/Literal containing one (bool is an int subclass and never counts)."""
    if annotation in (int, float):
        return True
    origin = get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, int | float) and not isinstance(a, bool) for a in get_args(annotation))
    if origin in (Union, types.UnionType):
        return any(_is_numeric(a) for a in get_args(annotation))
    return False


@functools.cache
def _numeric_fields(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for name, f in model.model_fields.items() if _is_numeric(f.annotation))


def _refuse_bool(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    # pydantic's lax mode reads True as 1 (`control.port: true` was port 1, issue 11), and YAML 1.1
    # reads yes/no/on/off as booleans. Strings stay accepted: `${PORT}` fills in text.
    if isinstance(value, bool) and info.field_name in _numeric_fields(model):
        raise ValueError("expected a number, not a boolean (YAML reads true/false/yes/no/on/off as booleans)")
    return value


class _Section(BaseModel):
    # allow_inf_nan=False: `.inf` or `nan` is never a usable setting (`source.file.speed: .inf` wrote
    # Infinity into the JSONL, issue 11).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_bool(cls, value, info)


# --------------------------------------------------------------------------------------- source
class FileSourceSettings(_Section):
    speed: float = _num(1.0, ge=0.0, le=MAX_FILE_SPEED,
                        description="1 = real time; 2 = twice as fast; 0 = as fast as possible")
    loop: bool = Field(False, description="start again at the end of the file instead of exiting")


class MicSourceSettings(_Section):
    device: str | int | None = Field(None, description="input device name (substring) or index (>= 0); "
                                                       "null = system default")
    sample_rate: int | None = _num(None, ge=MIN_AUDIO_RATE, le=MAX_DEVICE_RATE,
                                   description="device rate; null = 16000 if supported, else the device default")
    channels: int = _num(1, ge=1, le=8, description="channels opened on the device; mixed down to mono")
    queue_blocks: int = _num(500, ge=10, le=MAX_QUEUE_ITEMS,
                             description="blocks buffered between the capture thread and the loop")
    reopen_backoff_min_s: float = _num(0.5, gt=0, le=MAX_TIMEOUT_S, description="first wait before reopening a "
                                                                                "lost device")
    reopen_backoff_max_s: float = _num(10.0, gt=0, le=MAX_TIMEOUT_S, description="longest wait between reopen "
                                                                                 "attempts")
    stall_timeout_s: float = _num(2.0, gt=0, le=MAX_TIMEOUT_S, description="no audio for this long = device lost")

    @field_validator("device")
    @classmethod
    def _device_index(cls, v: str | int | None) -> str | int | None:
        if isinstance(v, int) and v < 0:
            raise ValueError("a device index is 0 or more (see `echo-relay devices`)")
        return v

    @model_validator(mode="after")
    def _backoff_ordered(self) -> MicSourceSettings:
        if self.reopen_backoff_min_s > self.reopen_backoff_max_s:
            raise ValueError("source.mic.reopen_backoff_min_s must not exceed source.mic.reopen_backoff_max_s")
        return self


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
    block_ms: int = _num(32, ge=10, le=100, description="audio block size handed to the VAD, ms")
    # While no utterance is open, blocks are handed over this many ms at a time: a third of the
    # wakeups in silence (CPU). Speech onset is then seen up to this much later, which pre-roll
    # covers; the end of speech, which sets the echo latency, is always seen block by block.
    idle_block_ms: int = _num(96, ge=0, le=100, description="block size while nobody speaks, ms; 0 = block_ms")
    file: FileSourceSettings = FileSourceSettings()
    mic: MicSourceSettings = MicSourceSettings()
    daily: DailySourceSettings = DailySourceSettings()


# ------------------------------------------------------------------------------------------ vad
class VadSettings(_Section):
    engine: str = Field("silero", description="silero | webrtc | entry point | package.module:Class")
    aggressiveness: int = _num(3, ge=0, le=3, description="webrtcvad mode, 0 (lenient) .. 3 (strict)")
    frame_ms: Literal[10, 20, 30] = Field(30, description="webrtcvad frame size: 10, 20 or 30 (Silero always "
                                                          "uses 32 ms)")
    threshold: float = _num(0.5, gt=0, lt=1, description="Silero speech probability threshold")
    neg_threshold: float | None = _num(None, gt=0, lt=1, description="speech continues while the probability "
                                       "stays at or above this; null = threshold - 0.15 (Silero's rule)")
    weak_prob: float | None = _num(0.1, gt=0, lt=1, description="speech also continues at this probability "
                                   "when the frame is weak_snr_db above the noise floor (whispers); null = off")
    weak_snr_db: float = _num(15.0, gt=0, le=-MIN_DBFS, description="see weak_prob")
    weak_max_peak: float = _num(0.7, gt=0, le=1, description="... only for speech whose probability never reached "
                                "this (clear speech ends where the VAD says)")
    weak_start_ms: int = _num(250, ge=0, le=MAX_SHORT_MS, description="speech with no frame at threshold opens an "
                              "utterance after this much active (neg_threshold or weak) audio")
    pre_roll_ms: int = _num(300, ge=0, le=2000, description="audio kept before speech onset so first words survive")
    start_ms: int = _num(90, ge=0, le=1000, description="speech needed to open an utterance")
    hangover_ms: int = _num(700, ge=30, le=5000, description="silence that always closes an utterance")
    min_utterance_ms: int = _num(200, ge=0, le=MAX_SHORT_MS, description="shorter speech is ignored (clicks, "
                                                                         "breaths)")
    max_utterance_s: float = _num(20.0, gt=1, le=30, description="longer speech is split at the quietest recent "
                                                                 "point")
    split_search_s: float = _num(3.0, gt=0, le=30, description="how far back to look for the quietest point when "
                                                               "splitting")
    speech_pad_ms: int = _num(150, ge=0, le=1000, description="silence kept after speech end in the utterance audio")
    # Silero's LSTM state drifts: after noise or long digital silence it scores a quiet speaker far lower
    # than a fresh state does. Resetting inside short pauses costs the next phrase its context (jfk's
    # "ask not"), so the state is reset each time non-speech has lasted this long (pipeline/vad/silero.py).
    state_reset_ms: int = _num(2000, ge=0, le=int(MAX_WAIT_S * 1000),
                               description="Silero: reset its state every this much non-speech; 0 = never")
    state_reset_below: float = _num(0.2, gt=0, lt=1, description="... where non-speech is a probability below this")
    state_reset_max_dbfs: float = _num(-40.0, ge=MIN_DBFS, le=0, description="... in a frame quieter than this (a "
                                       "loud background such as music stays adapted: a fresh state hears singing "
                                       "as speech)")
    relisten_drop_db: float = _num(20.0, ge=0, le=-MIN_DBFS, description="Silero: when 256 ms of frames fall this "
                                   "far below the loud audio before them (a loud speaker or background stopped), "
                                   "a fresh state listens beside the carried one for 2 s and takes over if it hears "
                                   "speech the carried one misses; 0 = never")
    unheard_threshold: float = _num(0.35, gt=0, lt=1, description="speech-like frames (probability >= this) that "
                                    "never become part of an utterance are counted as unheard speech")
    unheard_min_ms: int = _num(150, ge=0, le=MAX_SHORT_MS, description="shorter speech-like runs are not counted as "
                                                                       "unheard")


class EndpointSettings(_Section):
    """Adaptive endpointing (pipeline/endpoint.py): decode speculatively at a short pause, then finish
    after a silence that depends on how sure Whisper is that the sentence ended."""

    enabled: bool = Field(True, description="false = plain segmentation: decode once after the full hangover")
    speculative_ms: int = _num(150, ge=30, le=2000, description="pause before a speculative decode starts")
    confident_prob: float = _num(0.95, ge=0, le=1, description="final . ? ! at least this probable ...")
    confident_pause_ms: int = _num(150, ge=0, le=MAX_SHORT_MS, description="... finishes the utterance after this "
                                                                           "much silence")
    likely_prob: float = _num(0.5, ge=0, le=1, description="final . ? ! at least this probable ...")
    likely_pause_ms: int = _num(600, ge=0, le=MAX_SHORT_MS, description="... finishes it after this much; else "
                                                                        "vad.hangover_ms")
    # The turn-end rule (pipeline/turn/rule.py), fitted on the pauses of the shared clips by scripts/turn_fit.py
    # (docs/turn-end.md): logit = bias + w_punct * p(final . ? !) + w_lengthening * (last voiced stretch / median)
    # + w_energy_decay * (level slope into the pause, dB/s). At or over turn_prob the pause finishes after
    # turn_pause_ms; below it, or when a signal is missing, the graded policy above decides.
    turn_rule: bool = Field(True, description="false = the graded policy alone (confident/likely tiers)")
    turn_prob: float = _num(0.75, ge=0, le=1, description="combined turn-end probability at least this ...")
    turn_pause_ms: int = _num(250, ge=0, le=MAX_SHORT_MS, description="... finishes the utterance after this much "
                                                                      "silence")
    turn_bias: float = _num(-1.557, ge=-100, le=100, description="the rule's intercept (logit)")
    turn_w_punct: float = _num(2.611, ge=-100, le=100, description="weight of Whisper's final . ? ! probability "
                                                                    "(0 when the text does not end a sentence)")
    turn_w_lengthening: float = _num(-1.131, ge=-100, le=100, description="weight of the last voiced stretch over "
                                                                          "the median one")
    turn_w_energy_decay: float = _num(-0.01073, ge=-100, le=100, description="weight of the level's slope over "
                                                                              "the last 200 ms of speech, dB/s")
    commit_min_ms: int = _num(8000, ge=0, le=30_000, description="speech resumed after a pause whose decode "
                              "covers at least this much new audio: that decode becomes the utterance's committed "
                              "beginning, and later decodes start after it (0 = off)")

    @model_validator(mode="after")
    def _ordered(self) -> EndpointSettings:
        if self.likely_prob > self.confident_prob:
            raise ValueError("endpoint.likely_prob must not exceed endpoint.confident_prob")
        return self


# ------------------------------------------------------------------------------------------ asr
# Whisper's phantom lines in other languages (trained on subtitled video, it ends silence and noise with the
# subtitles' closing lines, and writes a subtitle's sound caption as words: Dutch "MUZIEK.", Russian "ПЕЧАЛЬНАЯ
# МУЗЫКА"), by Whisper language code. Dropped on near-silence only (gate.phantom_max_dbfs), like
# the English list: a speaker may really say "thank you for watching". All apply whatever the conversation's
# language: on noise the language detector is least reliable (noise comes out as Japanese or Korean credits).
PHANTOM_PHRASES_BY_LANGUAGE: dict[str, list[str]] = {
    "de": ["vielen dank fürs zuschauen", "danke fürs zuschauen", "bis zum nächsten mal", "tschüss", "musik",
           "ruhige musik"],
    "es": ["gracias por ver", "gracias por ver el video", "gracias", "suscríbete al canal", "hasta la próxima",
           "música", "música suave"],
    "fr": ["merci d'avoir regardé", "merci d'avoir regardé cette vidéo", "merci", "au revoir", "musique",
           "musique douce"],
    "it": ["grazie per la visione", "grazie a tutti", "grazie", "musica"],
    "pt": ["obrigado por assistir", "obrigado", "obrigada", "música"],
    "nl": ["bedankt voor het kijken", "dank je wel", "bedankt", "muziek"],
    "pl": ["dziękuję za uwagę", "dziękuję", "muzyka", "spokojna muzyka"],
    "ru": ["продолжение следует", "спасибо за просмотр", "спасибо", "подписывайтесь на канал", "музыка",
           "печальная музыка", "спокойная музыка"],
    "ja": ["ご視聴ありがとうございました", "ありがとうございました", "チャンネル登録よろしくお願いします", "音楽"],
    "ko": ["시청해주셔서 감사합니다", "시청해 주셔서 감사합니다", "감사합니다", "구독과 좋아요 부탁드립니다", "음악"],
    "zh": ["谢谢观看", "謝謝觀看", "谢谢大家", "谢谢", "請訂閱", "请订阅", "音乐"],
    "hi": ["धन्यवाद"],
    "ar": ["شكرا", "شكرا لكم", "اشتركوا في القناة"],
}
# Subtitle credits and channel promotions, which are never speech to relay: dropped at any level. Regular
# expressions matched against the whole of one sentence after normalization (NFKC, case folded, punctuation and
# symbols as spaces, whitespace collapsed: "Sous-titres réalisés par la communauté d'Amara.org" is matched as
# "sous titres réalisés par la communauté d amara org"). Bounded (.{1,60}) so that they never swallow speech.
PHANTOM_PATTERNS: list[str] = [
    r".{0,80}amara ?org.{0,80}",  # the Amara.org community credit, in every language
    r"(?:subtitles|captions|subtitled|captioned|transcription|transcribed) by .{1,60}",
    r"untertitel(?:ung)?(?: im auftrag)? (?:des|der|von|durch) .{1,60}",  # Untertitel im Auftrag des ZDF ...
    r"sous titr(?:es|age)(?: (?:réalisés|faits|créés|fournis))?(?: par| pour)? .{1,60}",  # Sous-titrage ST' 501
    r"subt[ií]tulos? (?:realizados |creados |hechos )?(?:por|de) .{1,60}",
    r"sottotitoli (?:creati|realizzati|a cura|e revisione)(?: .{1,60})?",
    r"legendas? (?:pela|por|feitas por|criadas por) .{1,60}",
    r"ondertitel(?:s|ing)? (?:ingediend door|gemaakt door|verzorgd door|door) .{1,60}",
    r"napisy (?:stworzone|wykonane|przygotowane|przez) .{1,60}",
    r"субтитры (?:сделал|делал|создавал|создал|подготовил|подогнал|от) .{1,60}",
    r"редактор субтитров.{0,60}",
    r"字幕由.{1,40}提供",  # 字幕由Amara.org社区提供, 字幕由 XX 字幕组提供
    r"(?:中文)?字幕(?:志愿者|志願者|制作|製作|翻译|翻譯|校对|校對).{0,40}",
    r".{0,40}(?:明镜|明鏡)(?:与|與)点点栏目.{0,20}",  # 请不吝点赞 订阅 转发 打赏支持明镜与点点栏目
]


class GateSettings(_Section):
    no_speech_prob: float = _num(0.6, ge=0, le=1, description="drop when no_speech_prob is above this ...")
    no_speech_logprob: float = _num(-0.8, ge=MIN_LOGPROB, le=0, description="... and avg_logprob is below this "
                                                                            "(Whisper's own rule)")
    min_avg_logprob: float = _num(-1.5, ge=MIN_LOGPROB, le=0, description="drop when avg_logprob is below this, "
                                                                          "whatever no_speech_prob")
    max_compression_ratio: float = _num(2.4, gt=0, le=100, description="drop repetitive loops (zlib ratio above "
                                                                       "this)")
    phantom_max_dbfs: float = _num(-40.0, ge=MIN_DBFS, le=0, description="phantom phrases are dropped when the "
                                                                         "audio is quieter")
    phantom_phrases: list[str] = Field(default_factory=lambda: [
        "thank you", "thanks for watching", "thank you for watching", "thanks for listening",
        "please subscribe", "subscribe to my channel", "you", "bye", "so", "okay",
        "subtitles by the amara.org community", "[music]", "[blank_audio]",
    ], description="known Whisper hallucinations on near-silence (compared after normalization)")
    phantom_phrases_by_language: dict[str, list[str]] = Field(
        default_factory=lambda: {k: list(v) for k, v in PHANTOM_PHRASES_BY_LANGUAGE.items()},
        description="the same in other languages, by language code (all apply, whatever the language)")
    phantom_patterns: list[str] = Field(default_factory=lambda: list(PHANTOM_PATTERNS),
                                        description="regular expressions for subtitle credits, dropped at any level "
                                                    "(each matched against a whole sentence, normalized)")

    @field_validator("phantom_patterns")
    @classmethod
    def _patterns_compile(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from exc
        return v


class OpenAIHttpSettings(_Section):
    url: str = Field("http://127.0.0.1:8080/v1/audio/transcriptions", description="OpenAI-compatible endpoint")
    api_key: SecretStr | None = Field(None, description="sent as Authorization: Bearer")
    model: str = Field("whisper-1", description="model field of the request")
    timeout_s: float = _num(15.0, gt=0, le=MAX_TIMEOUT_S, description="per-request timeout")
    retries: int = _num(2, ge=0, le=MAX_RETRIES, description="retries on timeouts, 408, 429 and 5xx (backoff with "
                                                              "jitter, or the server's Retry-After), within "
                                                              "asr.deadline_s")
    probe_interval_s: float = _num(2.0, gt=0, le=MAX_TIMEOUT_S, description="the server is checked when no request "
                                                                            "got an answer for this long (/readyz "
                                                                            "check asr_server)")
    speculative: bool = Field(False, description="also send speculative decodes (in pauses, endpoint.*) and interim "
                                                 "ones (event-stream watchers): earlier replies, but more than one "
                                                 "request per utterance")

    @field_validator("api_key")
    @classmethod
    def _one_credential(cls, v: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # httpx turns URL user info into `Authorization: Basic`, replacing the Bearer key (issue 27).
        if v is not None and _has_userinfo(str(info.data.get("url", ""))):
            raise ValueError("set while asr.openai_http.url has user info (user:password@): two credentials for "
                             "one request, and the URL's would replace the key; keep one")
        return v


class LanguageDetectSettings(_Section):
    """`asr.language: auto`: when a conversation's language locks and when it switches (pipeline/language.py).
    The first second of speech is a poor witness (Whisper base on the shared multilingual clips: 0.3-0.6 for a
    wrong language is common on 1 s, the right one gets 0.9-1.0 on whole 4-14 s utterances), hence whole
    utterances, seconds of speech and a probability bound."""

    lock_speech_s: float = _num(2.0, gt=0, le=60, description="seconds of confident speech in one language (one "
                                                              "utterance, or several added up) that lock it")
    lock_probability: float = _num(0.75, ge=0, le=1, description="an utterance counts towards the lock when its "
                                                                 "language is detected at least this probable")
    switch_speech_s: float = _num(2.0, gt=0, le=60, description="after the lock, an utterance is evidence of "
                                                                "another language when it has this much speech ...")
    switch_probability: float = _num(0.9, ge=0, le=1, description="... and that language is detected at least "
                                                                  "this probable (it is then decoded in it)")
    switch_utterances: int = _num(2, ge=1, le=20, description="consecutive evidence utterances in one other "
                                                              "language that switch the conversation to it")


class AsrBatchSettings(_Section):
    """Shared ASR scheduling (pipeline/asr/scheduler.py): `serve`'s relays, and `run`'s own decodes."""

    max_size: int = _num(8, ge=1, le=64, description="utterances decoded together at most")
    max_wait_ms: int = _num(1000, ge=0, le=MAX_SHORT_MS, description="a request waiting this long goes first, "
                                                                       "whatever its kind (final, speculative, "
                                                                       "interim)")
    gather_ms: int = _num(10, ge=0, le=1000, description="with several relays, an idle engine waits this long "
                                                          "for utterances that end together")
    workers: int = _num(2, ge=1, le=16, description="decode batches run at once (CTranslate2 workers of the one "
                                                    "model): a short decode need not wait for a long one")
    round_window_s: int = _num(80, ge=30, le=1920, description="seconds of Whisper windows one decode round may "
                                                               "encode (8 x 10 s, 2 x 30 s): bounds how long a round "
                                                               "holds the others up")


class AsrSettings(_Section):
    engine: str = Field("faster-whisper", description="faster-whisper | openai-http | entry point | dotted path")
    model: str = Field("tiny.en", description="model name (tiny.en, base.en, small.en, distil-...) or CTranslate2 dir")
    models_dir: str = Field("models", description="local model store, searched first, downloads go here")

    @field_validator("model", "models_dir")
    @classmethod
    def _nameable(cls, v: str) -> str:  # a model name may be a directory (pipeline/asr/models.py)
        return _usable_path(v)
    download: bool = Field(True, description="allow downloading a missing model from the Hugging Face hub")
    device: str = Field("cpu", description="cpu | cuda | auto")
    compute_type: str = Field("int8", description="int8 | int8_float16 | float16 | float32 | default")
    cpu_threads: int = _num(2, ge=0, le=MAX_CPU_THREADS, description="CTranslate2 intra-op threads (0 = library "
                                                                     "default)")
    beam_size: int = _num(1, ge=1, le=10, description="1 = greedy (fastest); 5 = faster-whisper's default")
    language: str | None = Field("en", description="language code (en, es, de, ...); auto (or null) = detect from "
                                                   "the first confident speech and lock it per conversation")
    languages: list[str] | None = Field(None, min_length=1, max_length=len(NAMES),
                                        description="auto only: the languages detection may choose from "
                                                    "(e.g. [en, es]); null = any the model knows")
    task: Literal["transcribe", "translate"] = Field("transcribe", description="translate = Whisper's any "
                                                                               "language -> English")
    detect: LanguageDetectSettings = LanguageDetectSettings()
    initial_prompt: str | None = Field(None, description="text that primes vocabulary and style")
    hotwords: str | None = Field(None, description="words to bias decoding towards")
    short_window: bool = Field(True, description="encode max(10 s, utterance + 1 s) instead of always 30 s")
    second_pass: bool = Field(True, description="decode again, with timestamps, an utterance whose decode leaves "
                                                "part of the VAD's speech out (pipeline/asr/coverage.py); what "
                                                "stays out is counted either way")
    deadline_s: float = _num(10.0, gt=0, le=MAX_TIMEOUT_S, description="per-utterance ASR deadline; past it the "
                                                                       "utterance is dropped")
    gate: GateSettings = GateSettings()
    openai_http: OpenAIHttpSettings = OpenAIHttpSettings()
    batch: AsrBatchSettings = AsrBatchSettings()

    @field_validator("language", mode="before")
    @classmethod
    def _language_code(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("auto", "")):
            return None
        return check_code(v) if isinstance(v, str) else v

    @field_validator("languages", mode="before")
    @classmethod
    def _language_codes(cls, v: Any) -> Any:
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return list(dict.fromkeys(check_code(x) for x in v))
        return v

    @model_validator(mode="after")
    def _language_combinations(self) -> AsrSettings:
        if self.languages is not None and self.language is not None and self.language not in self.languages:
            raise ValueError(f"asr.language {self.language!r} is not in asr.languages {self.languages}")
        if self.engine == "openai-http" and self.languages is not None and self.language is None:
            raise ValueError("asr.languages needs asr.engine faster-whisper: an openai-http server's detection "
                             "cannot be restricted (set asr.language to one code instead)")
        if self.task == "translate" and self.model.removesuffix("/").endswith(".en"):
            raise ValueError(f"asr.task translate needs a multilingual model (e.g. asr.model: base), not "
                             f"{self.model!r} (English-only)")
        if (self.engine == "openai-http" and self.task == "translate"
                and not self.openai_http.url.rstrip("/").endswith("/audio/transcriptions")):
            raise ValueError("asr.task translate with openai-http needs asr.openai_http.url ending in "
                             "/audio/transcriptions (the relay posts to /audio/translations beside it)")
        return self


# ------------------------------------------------------------------------------------ transform
class _PluginItem(BaseModel):
    """A list item naming a plug-in (a transform step, an analyzer): keys other than the declared ones are
    the plug-in's own options, passed to its factory as kwargs."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_bool(cls, value, info)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _option_paths(self) -> _PluginItem:
        for option, value in self.options.items():  # words_file, ... (PATH_OPTION): opened by the plug-in
            if isinstance(option, str) and PATH_OPTION.search(option) and isinstance(value, str):
                problem = path_problem(value)
                if problem is not None:
                    raise ValueError(f"{option}: the path {problem}")
        return self


class TransformStep(_PluginItem):
    """One step of the chain."""

    step: str = Field(description="built-in name, entry point, or package.module:callable")
    timeout_s: float = _num(2.0, gt=0, le=MAX_TIMEOUT_S, description="per-call timeout")
    on_error: Literal["pass", "drop"] = Field("pass", description="on exception/timeout: pass the input on, or drop")
    output_language: str | None = Field(None, description="the language the step writes (a code: a translation "
                                                          "step); later steps, the JSONL record and Tavus's "
                                                          "properties.language follow it; null = unchanged")

    @field_validator("output_language", mode="before")
    @classmethod
    def _output_code(cls, v: Any) -> Any:
        return check_code(v) if isinstance(v, str) else v


class TransformSettings(_Section):
    @property
    def output_language(self) -> str | None:
        """The language the chain writes: the last step's declared `output_language` (None: the ASR's)."""
        return next((s.output_language for s in reversed(self.steps) if s.output_language), None)

    through_control_api: bool = Field(True, description="run text from POST /send_text_message through the chain")
    steps: list[TransformStep] = Field(default_factory=lambda: [
        TransformStep(step="filler_words"), TransformStep(step="whitespace")])
    # One webhook reply of 50 MB became 13,427 echoes (issue 11): the chain bounds every text it hands
    # on (pipeline/transform/chain.py). 10000 characters is about 3 minutes of speech. At most 20000, like
    # control.max_text_chars: the built-in steps run on the event loop and filler_words takes ~0.2 s on
    # 20000 characters of fillers (6 s on 100000).
    max_text_chars: int = Field(10_000, ge=1, le=20_000,
                                description="longest text the chain accepts or a step may return; longer = "
                                            "the step's on_error (reason too_long)")


# ----------------------------------------------------------------------------------- perception
MAX_ANALYZERS = 32  # per list: each runs on every utterance (or frame)
MAX_VIDEO_FPS = 30.0


class PerceptionAnalyzer(_PluginItem):
    """One analyzer (pipeline/perception/)."""

    analyzer: str = Field(description="built-in name, entry point (echo_relay.perception), or package.module:callable")
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                             description="key of its results; default: the built-in name or the dotted path's last "
                                         "part")
    timeout_s: float = _num(1.0, gt=0, le=MAX_TIMEOUT_S, description="per-call timeout; a call still running "
                                                                     "then is cut (outcome timeout)")
    on_error: Literal["pass", "drop"] = Field("pass", description="on exception/timeout/bad result: echo without "
                                                                  "its result (pass), or drop the utterance")

    @property
    def key(self) -> str:
        """The name its results are filed under: `name`, else the built-in name or the path's last part."""
        return self.name or re.split(r"[:.]", self.analyzer)[-1]


def _unique_keys(analyzers: list[PerceptionAnalyzer]) -> list[PerceptionAnalyzer]:
    seen: set[str] = set()
    for a in analyzers:
        if a.key in seen:
            raise ValueError(f"two analyzers are named {a.key!r}; give one of them another `name:`")
        seen.add(a.key)
    return analyzers


class VideoPerceptionSettings(_Section):
    """Camera frames of the user participant (source `daily` only) for video analyzers."""

    fps: float = _num(1.0, gt=0, le=MAX_VIDEO_FPS, description="frames per second handed to the analyzers; "
                                                               "the camera's other frames are not copied")
    color_format: Literal["RGBA", "BGRA", "ARGB", "ABGR"] = Field("RGBA", description="channel order of "
                                                                                      "VideoFrame.pixels")
    analyzers: list[PerceptionAnalyzer] = Field(default_factory=list, max_length=MAX_ANALYZERS)

    @field_validator("analyzers")
    @classmethod
    def _unique(cls, v: list[PerceptionAnalyzer]) -> list[PerceptionAnalyzer]:
        return _unique_keys(v)


class PerceptionSettings(_Section):
    """Analyzers beside the ASR (pipeline/perception/, docs/perception.md)."""

    analyzers: list[PerceptionAnalyzer] = Field(default_factory=list, max_length=MAX_ANALYZERS)
    # Analyzers start when the utterance closes, beside the ASR (~0.1-0.3 s on tiny.en): DSP-sized ones are
    # done before the transcript. This is the most the echo waits for them after the transcript is ready.
    budget_ms: int = _num(50, ge=0, le=10_000, description="the echo waits at most this long after the ASR "
                                                           "for analyzers still running (on_error: drop ones "
                                                           "are waited for up to their timeout_s)")
    video: VideoPerceptionSettings = VideoPerceptionSettings()

    @field_validator("analyzers")
    @classmethod
    def _unique(cls, v: list[PerceptionAnalyzer]) -> list[PerceptionAnalyzer]:
        return _unique_keys(v)


# ----------------------------------------------------------------------------------------- sink
class DailySinkSettings(_Section):
    module: str = Field("daily", description="daily-python ('daily') or a stand-in such as pipeline.testing.fake_daily")
    user_name: str = Field("echo-relay", description="our participant name in the room")
    replica_name: str | None = Field(None, description="user name identifying the replica; null = the persona's")
    join_timeout_s: float = _num(30.0, gt=0, le=MAX_TIMEOUT_S, description="wait for the join completion")
    replica_timeout_s: float = _num(60.0, gt=0, le=MAX_WAIT_S, description="wait for the replica to be in the room")
    send_deadline_s: float = _num(15.0, gt=0, le=MAX_WAIT_S, description="retry a failed send until this deadline, "
                                                                         "then give up")
    retry_initial_s: float = _num(0.2, gt=0, le=MAX_TIMEOUT_S, description="first wait before retrying a send")
    retry_max_s: float = _num(2.0, gt=0, le=MAX_TIMEOUT_S, description="longest wait between retries")
    end_conversation_on_exit: bool = Field(True, description="end the Tavus conversation if we created it")


class SinkSettings(_Section):
    spec: str = Field("console", description="console | jsonl:PATH | daily")

    @field_validator("spec")
    @classmethod
    def _known_spec(cls, v: str) -> str:
        return _checked_spec(parse_sink_spec, v)
    also: list[str] = Field(default_factory=list,
                            description="secondary sinks (console | jsonl:PATH) that get a copy of each message "
                                        "the sink above sent, never blocking or failing it (pipeline/sink/fanout.py)")

    @field_validator("also")
    @classmethod
    def _secondary_specs(cls, specs: list[str], info: ValidationInfo) -> list[str]:
        def target(kind: str, arg: str | None) -> tuple[str, str | None]:  # two jsonl specs, one file?
            return kind, os.path.normpath(os.path.abspath(arg)) if arg is not None else None

        primary = info.data.get("spec")  # absent when sink.spec itself is invalid (reported for it)
        seen = {target(*parse_sink_spec(primary)): "sink.spec"} if isinstance(primary, str) else {}
        for i, spec in enumerate(specs):
            try:
                kind, arg = parse_sink_spec(spec)
            except SpecError as exc:
                raise ValueError(f"[{i}] {exc}") from None
            if kind == "daily":
                raise ValueError(f"[{i}] 'daily' cannot be a secondary sink: one room per relay (make it "
                                 "sink.spec; sink.also takes console and jsonl:PATH)")
            key = target(kind, arg)
            if key in seen:
                raise ValueError(f"[{i}] {spec!r} is already {seen[key]}: each sink once")
            seen[key] = f"sink.also[{i}]"
        return specs
    max_message_bytes: int = _num(MAX_APP_MESSAGE_BYTES, ge=512, le=MAX_APP_MESSAGE_BYTES,
                                  description="serialized size limit per app-message (Daily's limit)")
    queue_size: int = _num(64, ge=1, le=MAX_QUEUE_ITEMS, description="messages waiting for the sink; when full "
                                                                     "the relay waits")
    drain_timeout_s: float = _num(10.0, gt=0, le=MAX_WAIT_S, description="on shutdown, time allowed to deliver "
                                                                         "what is queued")
    audio_sample_rate: int = _num(24000, ge=MIN_AUDIO_RATE, le=MAX_AUDIO_RATE,
                                  description="rate of audio echo (Tavus recommends 24000)")
    mode: Literal["text", "audio"] = Field("text", description="relay recognised text, or the user's own voice")
    # Relaying the speaker's words, the replica is always a line behind the speaker: interrupting it
    # whenever they talk would cut every line (off). A transform that answers the speaker wants the
    # reply cut when they talk over it (speech_start, or min_speech to ignore coughs and "mm-hm").
    barge_in: Literal["off", "speech_start", "min_speech"] = Field(
        "off", description="send conversation.interrupt when the user talks over the replica: off for a relay, "
                           "speech_start / min_speech when a transform answers the speaker")
    barge_in_min_ms: int = _num(300, ge=0, le=MAX_SHORT_MS, description="speech needed before interrupting, for "
                                                                         "min_speech")
    daily: DailySinkSettings = DailySinkSettings()


# ---------------------------------------------------------------------------------------- tavus
class TavusSettings(_Section):
    api_url: str = Field("https://tavusapi.com", description="base URL (TAVUS_API_URL overrides)")
    api_key: SecretStr | None = Field(None, description="x-api-key; use ${TAVUS_API_KEY}, never a literal")

    @field_validator("api_url")
    @classmethod
    def _no_userinfo(cls, v: str) -> str:
        if _has_userinfo(v):  # the client authenticates with x-api-key; httpx would drop the user info unsent
            raise ValueError("user info (user:password@) in the Tavus URL is never sent: the key goes in "
                             "tavus.api_key (${TAVUS_API_KEY}); remove it from the URL")
        return v
    timeout_s: float = _num(15.0, gt=0, le=MAX_TIMEOUT_S, description="per-request timeout")
    retries: int = _num(3, ge=0, le=MAX_RETRIES, description="retries on connection errors, 429 and 5xx")
    persona_id: str | None = Field(None, description="echo persona to reuse; null = create one")
    persona_name: str = Field("echo-relay", description="name of a created persona; identifies the replica")
    replica_id: str | None = Field(None, description="replica (face) for new conversations")
    conversation_url: str | None = Field(None, description="join this room instead of creating a conversation")
    conversation_id: str | None = Field(None, description="id of that conversation")
    meeting_token: SecretStr | None = Field(None, description="token for a private room")
    conversation_name: str = Field("echo-relay")
    test_mode: bool = Field(False, description="Tavus test mode: no replica joins, nothing billed")
    max_call_duration: int | None = _num(None, ge=1, le=MAX_TAVUS_S, description="seconds; null = Tavus's default")
    participant_left_timeout: int | None = _num(None, ge=0, le=MAX_TAVUS_S,
                                                description="seconds; null = Tavus's default")
    participant_absent_timeout: int | None = _num(None, ge=0, le=MAX_TAVUS_S,
                                                  description="seconds; null = Tavus's default")
    language: str | None = Field(None, description="properties.language of a conversation the relay creates "
                                                   "(a full name, e.g. spanish, or multilingual); null = from "
                                                   "asr: the configured language's name, multilingual for "
                                                   "auto, english for asr.task translate")


# -------------------------------------------------------------------------------------- control
class ControlSettings(_Section):
    enabled: bool = Field(True, description="serve the local control API")
    host: str = Field("127.0.0.1", description="bind address; anything but loopback needs a token")
    port: int = Field(8000, ge=0, le=65535, description="0 = pick a free port")
    token: SecretStr | None = Field(None, description="Bearer token; required off loopback")
    # Upper bounds: the body is buffered in memory, and 10 minutes of 48 kHz audio in base64 is ~77 MB.
    max_body_bytes: int = Field(1_000_000, ge=1024, le=100_000_000,
                                description="largest request body, bytes (1024..100000000)")
    max_audio_s: float = Field(60.0, gt=0, le=600, description="longest audio accepted by /send_text_message, "
                                                               "seconds (0..600)")
    rate_limit_per_s: float = Field(50.0, gt=0, le=100_000, description="requests per second per client "
                                                                       "(token bucket; 0..100000)")
    # The hostile-input limits of docs/control-api.md ("Browsers, DNS rebinding and connection floods").
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host header names accepted besides localhost, 127.0.0.1, [::1] and the address the "
                    "request came in on (DNS rebinding guard); any port; '*' accepts any Host")
    cors_origins: list[str] = Field(
        default_factory=list,
        description="browser origins (scheme://host[:port]) allowed to call the API; CORS is answered "
                    "for them only. Empty: only pages served by the API itself (/docs)")
    # 20,000 is the ceiling because the built-in filler_words step runs on the event loop and grows
    # quadratically on filler-dense text (~0.2 s at 20,000 characters, 6 s at 100,000).
    max_text_chars: int = Field(10_000, ge=1, le=20_000,
                                description="longest properties.text accepted by /send_text_message, in characters")
    max_connections: int = Field(64, ge=16, le=10_000,
                                 description="open connections; at the limit the longest-idle one is closed "
                                             "for a new one, and 8 are kept for /healthz")
    header_timeout_s: float = Field(10.0, gt=0, le=300,
                                    description="a request line and headers must arrive within this, counted "
                                                "from the connection's start or its previous response")
    keep_alive_s: int = Field(5, ge=1, le=300, description="an idle connection is closed after this, seconds")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, hosts: list[str]) -> list[str]:
        import ipaddress  # here rather than at the top: only this class needs it

        # An RFC 1123 host name (plus "_", as in Compose service names) or a dotted IPv4 address, as
        # pipeline/control/guard.py parses Host headers; IPv6 is checked with ipaddress.
        host_name = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
        out = []
        for i, raw in enumerate(hosts):
            host = raw.strip().lower()
            inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
            if host == "*" or (len(host) <= 253 and re.fullmatch(host_name, host)):
                out.append(host)
                continue
            try:
                out.append(f"[{ipaddress.IPv6Address(inner).compressed}]")
            except ValueError:
                raise ValueError(f"[{i}] {raw!r} is not a host name or IP address (no scheme, port or path; "
                                 "'*' accepts any Host)") from None
        return out

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        # What browsers send in Origin: scheme, host name or [IPv6], and a port only when not the default.
        origin_syntax = r"https?://(?:\[[0-9a-f:.]+\]|[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?)(?::[0-9]{1,5})?"
        out = []
        for i, raw in enumerate(origins):
            origin = raw.strip().lower()
            if not re.fullmatch(origin_syntax, origin):
                raise ValueError(f"[{i}] {raw!r} is not an origin: write scheme://host[:port] (http or https), "
                                 "without a path or a trailing slash")
            out.append(origin)
        return out


class ServeSettings(_Section):
    """`echo-relay serve` (pipeline/serve.py): many relays in one process."""

    max_relays: int = _num(16, ge=1, le=1000, description="relays at once; at capacity POST /v1/relays and "
                                                           "/readyz answer 503")
    keep_ended_s: float = _num(300.0, ge=0, le=MAX_WAIT_S, description="an ended relay stays listed (state, "
                                                                       "ledger) this long")
    file_roots: list[str] = Field(default_factory=list, description="directories under which POST /v1/relays may "
                                                                    "name files (file: sources, jsonl: sinks, step "
                                                                    "files); empty = no file paths through the API")

    @field_validator("file_roots")
    @classmethod
    def _nameable(cls, roots: list[str]) -> list[str]:
        for i, root in enumerate(roots):
            problem = path_problem(root)
            if problem is not None:
                raise ValueError(f"[{i}] the path {problem}")
        return roots


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Settings(_Section):
    source: SourceSettings = SourceSettings()
    vad: VadSettings = VadSettings()
    endpoint: EndpointSettings = EndpointSettings()
    asr: AsrSettings = AsrSettings()
    transform: TransformSettings = TransformSettings()
    perception: PerceptionSettings = PerceptionSettings()
    sink: SinkSettings = SinkSettings()
    tavus: TavusSettings = TavusSettings()
    control: ControlSettings = ControlSettings()
    serve: ServeSettings = ServeSettings()
    logging: LoggingSettings = LoggingSettings()
    # Set by `validate_tree` (pipeline/config.py, loading): the key paths the environment filled in
    # and the strings never to print; `redacted_dump` and `secret_values` use them.
    _env_paths: frozenset[tuple[Any, ...]] = PrivateAttr(default_factory=frozenset)
    _secrets: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @model_validator(mode="after")
    def _check_vad_timing(self) -> Settings:
        if self.endpoint.enabled and self.endpoint.speculative_ms >= self.vad.hangover_ms:
            raise ValueError("endpoint.speculative_ms must be shorter than vad.hangover_ms")
        return self


# -------------------------------------------------------------------------------------- loading
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")

KeyPath = tuple[Any, ...]  # a config key as its parts: ("transform", "steps", 0, "words_file")

# Keys whose values are secrets wherever they appear (a step's options too): tokens, API keys,
# passwords, and the HTTP headers that carry credentials (Authorization, X-Api-Key, Cookie, ...).
_SECRET_KEY = re.compile(r"(?:^|[_-])(?:token|secret|password|passwd|key|apikey|authorization|cookie|"
                         r"credentials?)$", re.IGNORECASE)
# Transform step options holding paths (`words_file`, and by the same convention `file`, `path`,
# `dir`, `*_path`, `*_dir`): relative ones are resolved against the config file like source.spec.
PATH_OPTION = re.compile(r"(?:^|_)(?:file|path|dir)$")
# A literal that looks like a credential (16+ characters of token alphabet, letters and digits):
# never quoted in an error, even under an ordinary key (a token pasted into the wrong key).
_TOKEN_SHAPED = re.compile(r"(?=[^\s]*[0-9])(?=[^\s]*[A-Za-z])[A-Za-z0-9_.+=~-]{16,}")


_AUTH_SCHEMES = frozenset({"bearer", "basic", "digest", "token"})  # "Bearer <token>": only the token is secret


def is_secret_key(key: Any) -> bool:
    """True for key names that hold credentials (api_key, token, Authorization, X-Api-Key, Cookie, ...)."""
    return isinstance(key, str) and _SECRET_KEY.search(key) is not None


@dataclass
class EnvUse:
    """What the environment filled in: the key paths of those values, and the values themselves."""

    paths: set[KeyPath] = field(default_factory=set)
    values: set[str] = field(default_factory=set)


def dotted(path: KeyPath) -> str:
    """("transform", "steps", 0, "url") -> "transform.steps[0].url"; an odd key (not a plain name,
    e.g. "a.b", "", null) is quoted: `vad['a.b']`."""
    parts: list[str] = []
    for p in path:
        if isinstance(p, int) and not isinstance(p, bool):
            parts.append(f"[{p}]")
        elif isinstance(p, str) and re.fullmatch(r"[A-Za-z0-9_-]+", p):
            parts.append(("." if parts else "") + p)
        else:
            parts.append(f"[{p!r}]")
    return "".join(parts)


def expand_env(value: Any, env: Mapping[str, str], path: str = "", used: EnvUse | None = None) -> Any:
    """Fill `${VAR}` / `${VAR:-default}` in every string of a parsed YAML tree; `used` records where
    the environment supplied a value (those values are then redacted everywhere)."""
    return _expand(value, env, tuple(path.split(".")) if path else (), used if used is not None else EnvUse())


def _expand(value: Any, env: Mapping[str, str], at: KeyPath, used: EnvUse) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, env, (*at, k), used) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, env, (*at, i), used) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value
    from_env = False

    def fill(m: re.Match[str]) -> str:
        nonlocal from_env
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            from_env = True
            used.values.add(env[name])
            return env[name]
        if default is not None:
            return default
        raise ConfigError(f"environment variable {name} is not set (write ${{{name}:-default}} for a default)",
                          dotted(at) or None)

    filled = _VAR.sub(fill, value)
    if from_env:
        used.paths.add(at)
    # A reference to an empty variable with an empty default means "not set".
    return None if filled == "" and _VAR.search(value) else filled


# ------------------------------------------------------------------------------------ the YAML loader
try:  # libyaml scans and parses in C; PyYAML's pure-Python scanner took 50 s on a 1 MB flow list
    from yaml._yaml import CParser as _EventParser
except ImportError:  # a PyYAML built without libyaml  # pragma: no cover
    class _EventParser(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser):  # type: ignore[no-redef]
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)


class _ConfigLoader(yaml.composer.Composer, _EventParser, yaml.constructor.SafeConstructor,
                    yaml.resolver.Resolver):
    """A safe loader (events from libyaml, nodes composed here in Python) that refuses, while
    composing, nesting deeper than MAX_YAML_DEPTH (the composer recurses: deep nesting was a
    RecursionError), more than MAX_YAML_ALIASES aliases, and an alias inside the value it names (a
    self-reference: expanding it never ends)."""

    def __init__(self, text: str, name: str) -> None:
        _EventParser.__init__(self, text)
        yaml.composer.Composer.__init__(self)
        yaml.constructor.SafeConstructor.__init__(self)
        yaml.resolver.Resolver.__init__(self)
        self.name = name
        self._depth = 0
        self._aliases = 0
        self._nodes = 0
        self._open_anchors: set[str] = set()

    def _refuse(self, what: str, mark: Any) -> ConfigError:
        return ConfigError(f"{self.name} line {mark.line + 1}: {what}")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if event is None:  # pragma: no cover - the composer only asks for a node when one follows
            return super().compose_node(parent, index)
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_YAML_ALIASES:
                raise self._refuse(f"more than {MAX_YAML_ALIASES} aliases (*name); a configuration needs few, "
                                   "and an alias bomb expands to gigabytes", event.start_mark)
            if event.anchor in self._open_anchors:
                raise self._refuse(f"alias *{event.anchor} is inside the value &{event.anchor} it names "
                                   "(a value cannot contain itself)", event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        self._nodes += 1
        anchor = getattr(event, "anchor", None)
        try:
            if self._nodes > MAX_YAML_NODES:  # checked while composing: 10**5 nodes took seconds in Python
                raise self._refuse(f"more than {MAX_YAML_NODES} values; a configuration has a few hundred",
                                   event.start_mark)
            if self._depth > MAX_YAML_DEPTH:
                raise self._refuse(f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark)
            if anchor is not None:
                self._open_anchors.add(anchor)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1
            if anchor is not None:
                self._open_anchors.discard(anchor)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _key_value(loader: _ConfigLoader, node: Any) -> Any:
    """A mapping key as YAML reads it (so `1` and `0x1` are the same key); None for `<<` merges."""
    if node.tag == _MERGE_TAG or not isinstance(node, yaml.ScalarNode):
        return None
    try:
        value = loader.construct_object(node, deep=True)
        hash(value)
    except Exception:  # an odd key: the constructor reports it below
        return (node.tag, node.value)
    return value


def _check_graph(loader: _ConfigLoader, root: Any) -> list[ConfigError]:
    """Walk the composed document once per node: refuse more than MAX_YAML_NODES values or more than
    MAX_YAML_DEPTH levels once aliases are expanded (a billion-laughs file is refused after ~10**5
    steps instead of building 10**9 values), and return every duplicate key, naming it and its lines."""
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (values, height), aliases expanded
    duplicates: list[tuple[int, ConfigError]] = []  # (line, problem): reported in file order

    def walk(node: Any, depth: int, at: KeyPath) -> tuple[int, int]:
        known = memo.get(id(node))
        if known is not None:
            if depth + known[1] - 1 > MAX_YAML_DEPTH:
                raise loader._refuse(f"nested more than {MAX_YAML_DEPTH} levels deep once aliases are expanded",
                                     node.start_mark)
            return known
        if depth > MAX_YAML_DEPTH:
            raise loader._refuse(f"nested more than {MAX_YAML_DEPTH} levels deep once aliases are expanded",
                                 node.start_mark)
        children: list[tuple[Any, KeyPath]] = []
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                key = _key_value(loader, key_node)
                line = key_node.start_mark.line + 1
                if key is not None and key in first:
                    duplicates.append((line, ConfigError(
                        f"duplicate key at line {line} of {loader.name} (first at line {first[key]}); YAML "
                        "would keep only the last one: remove one", dotted((*at, key)))))
                elif key is not None:
                    first[key] = line
                children += [(key_node, at), (value_node, (*at, key))]
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, (*at, i)) for i, item in enumerate(node.value)]
        size, height = 1, 1
        for child, child_at in children:
            child_size, child_height = walk(child, depth + 1, child_at)
            size += child_size
            height = max(height, child_height + 1)
            if size > MAX_YAML_NODES:
                raise loader._refuse(f"more than {MAX_YAML_NODES} values (aliases expanded); a configuration has "
                                     "a few hundred", node.start_mark)
        memo[id(node)] = (size, height)
        return size, height

    walk(root, 1, ())
    return [problem for _, problem in sorted(duplicates, key=lambda d: d[0])]


def parse_yaml(text: str, name: str = "<config>") -> Any:
    """Parse one YAML document with the limits above; every problem is a ConfigError naming `name`."""
    loader: _ConfigLoader | None = None
    try:
        loader = _ConfigLoader(text, name)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _check_graph(loader, node)
        if duplicates:
            raise ConfigError.combine(duplicates)
        return loader.construct_document(node)
    except ConfigError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(exc.problem or exc.context or type(exc).__name__).split())
        raise ConfigError(f"{name} is not valid YAML{where}: {what}") from None
    except yaml.YAMLError as exc:  # ReaderError (a control character, ...): its text spans lines
        position = getattr(exc, "position", None)
        where = ""
        if isinstance(position, int):
            line = text.count("\n", 0, position) + 1
            where = f" at line {line}, column {position - (text.rfind(chr(10), 0, position) + 1) + 1}"
        reason = getattr(exc, "reason", None) or str(exc)
        character = getattr(exc, "character", None)
        what = f"{reason}: {character!r}" if character is not None else reason
        raise ConfigError(f"{name} is not valid YAML{where}: {' '.join(str(what).split())}") from None
    except Exception as exc:
        # PyYAML's safe constructor converting a scalar: a 5000-digit integer (ValueError), a timestamp
        # like 2024-13-45, an empty `!!int` (IndexError).
        what = " ".join(str(exc).split(";")[0].split())[:MAX_ECHOED_CHARS * 2]
        raise ConfigError(f"{name} has a value YAML cannot convert: {type(exc).__name__}: {what}") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_config_file(path: Path) -> Any:
    """Read and parse a config file: at most MAX_CONFIG_BYTES, UTF-8 (a BOM is allowed)."""
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)  # bounded: a huge file or /dev/zero is never read whole
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES} bytes (configurations are a "
                          "few KB); is it the right file?")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}, "
                          f"column {column}); save it as UTF-8") from None
    return parse_yaml(text, str(path))


# ----------------------------------------------------------------------------------- validation
def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):  # list[TransformStep], X | None
        model = _model_of(arg)
        if model is not None:
            return model
    return None


def _key_path(loc: tuple[Any, ...]) -> tuple[KeyPath, bool]:
    """The config key of a pydantic error location, and whether pydantic's union-member tags
    ('str', 'int', ...) were cut off its end."""
    model: type[BaseModel] | None = Settings
    out: list[Any] = []
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out.append(part)
        elif model is not None and part in model.model_fields:
            out.append(part)
            model = _model_of(model.model_fields[part].annotation)
        elif model is not None:  # an unknown key
            out.append(part)
            model = None
        else:
            return tuple(out), i < len(loc)
    return tuple(out), False


def _echo(value: Any, path: KeyPath, env_paths: set[KeyPath] | frozenset[KeyPath]) -> str:
    """How an offending value is quoted in an error: never a secret (see the module docstring)."""
    if path in env_paths:
        return "*** from the environment"
    if any(is_secret_key(p) for p in path):
        return "***"
    if isinstance(value, dict | list | tuple | set):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    if isinstance(value, str) and _TOKEN_SHAPED.search(value):
        return "*** (it looks like a credential)"
    try:
        text = repr(value)
    except ValueError:  # an integer too long to print
        return "a number too long to show"
    return text if len(text) <= MAX_ECHOED_CHARS else text[:MAX_ECHOED_CHARS] + "..."


def _problems(exc: ValidationError, env_paths: set[KeyPath] | frozenset[KeyPath],
              secrets: set[str] | frozenset[str]) -> list[ConfigError]:
    """One problem per key: pydantic reports a union field once per member type."""
    found: dict[str | None, list[str]] = {}
    union_keys: set[str | None] = set()
    for err in exc.errors():
        path, cut = _key_path(tuple(err["loc"]))
        key = dotted(path) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] != "missing" and "input" in err and not (isinstance(err["input"], str)
                                                                    and repr(err["input"]) in msg):
            msg = f"{msg} (got {_echo(err['input'], path, env_paths)})"
        if cut and key in union_keys:
            found[key][0] = found[key][0].split(" (got ")[0] + " or " + \
                msg.removeprefix("Input should be ")
            continue
        if cut:
            union_keys.add(key)
        found.setdefault(key, []).append(msg)
    return [ConfigError(redact(m, secrets), key) for key, msgs in found.items() for m in msgs]


def _secret_strings(tree: Any, used: EnvUse) -> set[str]:
    """Every string that must never be printed: values from the environment, values under secret
    keys (and each word of them: "Bearer abc..." -> "abc..."), URL user info and query values."""
    out = {v for v in used.values if len(v) >= MIN_SECRET_LEN}

    def add(text: str) -> None:
        for piece in (text, *text.split()):
            if len(piece) >= MIN_SECRET_LEN and piece.lower() not in _AUTH_SCHEMES:
                out.add(piece)

    def walk(node: Any, secret: bool) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, secret or is_secret_key(k))
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v, secret)
        elif isinstance(node, SecretStr):
            add(node.get_secret_value())
        elif isinstance(node, str):
            if secret:
                add(node)
            for url in re.findall(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+", node):
                authority = re.split(r"[/?#]", url.split("://", 1)[1], maxsplit=1)[0]
                if "@" in authority:
                    userinfo = authority.rsplit("@", 1)[0]
                    for piece in (userinfo, *userinfo.split(":", 1)):
                        add(piece)
                query = url.split("?", 1)[1].split("#", 1)[0] if "?" in url else ""
                for item in query.split("&"):
                    if "=" in item:
                        add(item.split("=", 1)[1])

    walk(tree, False)
    return out


def _remember(settings: Settings, used: EnvUse, secrets: set[str]) -> Settings:
    settings._env_paths = frozenset(used.paths)
    settings._secrets = frozenset(secrets)
    return settings


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError("is not a section", p)
    node[last] = value


def _resolve_relative_paths(tree: dict[str, Any], base: Path) -> None:
    """Paths written in a config file are relative to that file, not to the working directory:
    source.spec file:PATH, sink.spec and sink.also jsonl:PATH, serve.file_roots, asr.models_dir, asr.model
    when it is a path, and transform step and analyzer options named like paths (words_file, ...). Values that
    do not parse are left for validation to report."""

    def rebase(text: str) -> str:
        if not text.strip() or path_problem(text):
            return text  # "file:" stays invalid instead of becoming the config's directory; a NUL is reported
        try:
            path = Path(text).expanduser()
        except RuntimeError:  # "~nobody/x": no such home directory; the stage reports the path as written
            path = Path(text)
        return str(path if path.is_absolute() else base / path)

    source = tree.get("source")
    if isinstance(source, dict) and isinstance(source.get("spec"), str):
        try:
            kind, arg = parse_source_spec(source["spec"])
        except SpecError:
            pass
        else:
            if kind == "file" and isinstance(arg, str) and arg.strip():
                source["spec"] = "file:" + rebase(arg)
    def rebase_sink(spec: Any) -> Any:
        try:
            kind, arg = parse_sink_spec(spec) if isinstance(spec, str) else ("", None)
        except SpecError:
            return spec
        return "jsonl:" + rebase(arg) if kind == "jsonl" and arg and arg.strip() else spec

    sink = tree.get("sink")
    if isinstance(sink, dict):
        if "spec" in sink:
            sink["spec"] = rebase_sink(sink["spec"])
        if isinstance(sink.get("also"), list):  # secondary sinks (pipeline/sink/fanout.py)
            sink["also"] = [rebase_sink(spec) for spec in sink["also"]]
    serve = tree.get("serve")
    if isinstance(serve, dict) and isinstance(serve.get("file_roots"), list):
        serve["file_roots"] = [rebase(r) if isinstance(r, str) else r for r in serve["file_roots"]]
    asr = tree.get("asr")
    if isinstance(asr, dict):
        if isinstance(asr.get("models_dir"), str):
            asr["models_dir"] = rebase(asr["models_dir"])
        model = asr.get("model")
        # pipeline/asr/models.py resolve_model: "./x", "../x", "~/x" and "a/b/c" are directories ("org/name"
        # is a Hugging Face repo id); so is a name that is a directory next to the config file.
        if isinstance(model, str) and model.strip() and (model.startswith(("./", "../", ".\\", "..\\", "~"))
                                                         or model.count("/") > 1
                                                         or (not path_problem(model) and (base / model).is_dir())):
            asr["model"] = rebase(model)
    transform = tree.get("transform")
    perception = tree.get("perception")
    video = perception.get("video") if isinstance(perception, dict) else None
    plugins = [section.get(key) for section, key in ((transform, "steps"), (perception, "analyzers"),
                                                     (video, "analyzers")) if isinstance(section, dict)]
    for items in plugins:  # transform steps and analyzers: options named like paths (words_file, ...)
        for item in items if isinstance(items, list) else []:
            if isinstance(item, dict):
                for option, value in item.items():
                    if isinstance(option, str) and PATH_OPTION.search(option) and isinstance(value, str):
                        item[option] = rebase(value)


def load_tree(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
              env: Mapping[str, str] | None = None) -> tuple[dict[str, Any], EnvUse]:
    """Read YAML (or nothing), fill env refs, resolve the file's relative paths, apply dotted CLI
    overrides (relative to the working directory) and the environment conveniences: the raw tree
    to validate, and what the environment filled in."""
    env = os.environ if env is None else env
    used = EnvUse()
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_config_file(p)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p} must be a mapping of sections (source, vad, asr, ...)")
        tree = _expand(loaded, env, (), used)
        _resolve_relative_paths(tree, p.resolve().parent)
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    _fill_env_defaults(tree, env, used)
    # Environment conveniences documented in the README.
    tavus = tree.setdefault("tavus", {}) if isinstance(tree.get("tavus", {}), dict) else None
    if tavus is not None:
        if env.get("TAVUS_API_KEY") and not tavus.get("api_key"):
            tavus["api_key"] = env["TAVUS_API_KEY"]
            used.values.add(env["TAVUS_API_KEY"])
        if env.get("TAVUS_API_URL") and not (overrides or {}).get("tavus.api_url"):
            tavus["api_url"] = env["TAVUS_API_URL"]
    return tree, used


def _fill_env_defaults(tree: dict[str, Any], env: Mapping[str, str], used: EnvUse) -> None:
    """Each ENV_DEFAULTS key the tree leaves out gets its `${VAR:-default}` filled from `env` (a key the
    configuration sets, even to null, is left alone). A section that is not a mapping is left for
    validation to report."""
    for key, reference in ENV_DEFAULTS.items():
        *parents, last = key.split(".")
        node: Any = tree
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last in node:
            continue
        value = _expand(reference, env, tuple(key.split(".")), used)
        if value is not None:
            node[last] = value


def validate_tree(tree: dict[str, Any], used: EnvUse | None = None) -> Settings:
    """Validate a raw tree; a ConfigError lists every problem, with no secret in its text."""
    used = used if used is not None else EnvUse()
    secrets = _secret_strings(tree, used)
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError.combine(_problems(exc, used.paths, secrets)) from None
    return _remember(settings, used, secrets)


def validate_sections(tree: dict[str, Any], used: EnvUse | None = None) -> tuple[Settings, frozenset[str]]:
    """For `config check` after `validate_tree` failed, so that the other checks still run: Settings
    whose sections keep every key that validates (an invalid key falls back to its default), and
    the names of the sections that could not be built even so (their stages are not checked)."""
    used = used if used is not None else EnvUse()
    good: dict[str, Any] = {}
    bad: set[str] = set()
    for name, info in Settings.model_fields.items():
        model = _model_of(info.annotation)
        raw = tree.get(name)
        if model is None or not isinstance(raw, dict):
            if name in tree:
                bad.add(name)
            continue
        try:
            good[name] = model.model_validate(raw)
            continue
        except ValidationError as exc:
            failing = {err["loc"][0] for err in exc.errors() if err["loc"]}
        try:
            good[name] = model.model_validate({k: v for k, v in raw.items() if k not in failing})
        except ValidationError:
            bad.add(name)
    return _remember(Settings.model_construct(**good), used, _secret_strings(tree, used)), frozenset(bad)


def load_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Read YAML (or nothing), fill env refs, apply dotted CLI overrides, validate."""
    return validate_tree(*load_tree(path, overrides, env))


def default_config_path() -> Path | None:
    """$ECHO_RELAY_CONFIG, else ./config.yaml if present, else none (built-in defaults)."""
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    p = Path("config.yaml")
    return p if p.exists() else None


def secret_values(settings: Settings) -> frozenset[str]:
    """Every string of `settings` that must never be printed (register them with
    pipeline.logs.register_secret): what the environment filled in, secret keys' values, URL
    credentials."""
    return settings._secrets | _secret_strings(settings.model_dump(), EnvUse())


def redacted_dump(settings: Settings) -> dict[str, Any]:
    """The effective configuration as plain data: '***' for secret keys' values and for every value
    the environment filled in (null stays null), and URLs without their credentials."""
    data: dict[str, Any] = settings.model_dump(mode="json")
    secrets = secret_values(settings)
    env_paths = settings._env_paths

    def walk(node: Any, at: KeyPath, secret: bool) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, (*at, k), secret or is_secret_key(k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, (*at, i), secret) for i, v in enumerate(node)]
        if node is None:
            return None
        if secret or at in env_paths:
            return REDACTED
        return redact(node, secrets) if isinstance(node, str) else node

    result: dict[str, Any] = walk(data, (), False)
    return result
