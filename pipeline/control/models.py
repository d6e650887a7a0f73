"""Request and response bodies of the control API (pydantic; they are also the OpenAPI schema).

`EchoRequest` accepts the body of Tavus's echo-mode quickstart (`POST /send_text_message` of its
Flask script) as is: the envelope `message_type` / `event_type` / `conversation_id` and
`properties.{modality, text, audio, sample_rate, inference_id, done}`, with `done` a JSON boolean or
the strings "true"/"false" (the quickstart's curl sends `"done": "true"`). The field of the other
modality is ignored (the quickstart's text example also carries `"audio": "base64-encoded-audio"`),
and `null` means "not given" for every optional property (the quickstart's Flask handler forwards
missing properties as `null`).

Checks that depend on `modality` or on the running configuration (text required for "text",
base64 PCM for "audio", `control.max_audio_s`) are made by the endpoint, which reports them with
the same error shape and the field name (see `pipeline.control.server`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from pipeline.protocol import normalize_done

MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 48_000
DEFAULT_SAMPLE_RATE = 16_000  # Tavus's schema default for `sample_rate`
MAX_ID_CHARS = 128  # keeps every outgoing message far below the 4096-byte limit
MAX_CONVERSATION_ID_CHARS = 256  # accepted and ignored (see EchoRequest), but still bounded


def _done(value: Any) -> bool | None:
    if value is None:
        return None
    return normalize_done(value)  # ValueError -> 422 naming properties.done


DoneFlag = Annotated[bool | None, BeforeValidator(_done)]


def _encodable(value: str) -> str:
    """Refuse a string that cannot be encoded as UTF-8: a lone surrogate (JSON allows `"\\ud800"` escapes
    without their pair, and json.loads keeps them). Accepted, it failed later in delivery with a traceback."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        message = (f"cannot be encoded as UTF-8: lone surrogate U+{ord(value[exc.start]):04X} at character "
                   f"{exc.start} (a \\u escape of half a surrogate pair)")
        raise PydanticCustomError("string_unicode", message) from None
    return value


# Control characters (Unicode Cc) other than tab, LF and CR: never speech. The transform chain drops
# text holding them (pipeline/transform/base.py, text_problem), so the door refuses them first.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _no_controls(value: str) -> str:
    bad = _CONTROL.search(value)
    if bad is not None:
        raise PydanticCustomError("string_control", f"control character U+{ord(bad.group()):04X} at character "
                                                    f"{bad.start()} (only tab, LF and CR are allowed)")
    return value


# A JSON string the relay can send on: strict (no numbers as strings) and encodable as UTF-8.
Utf8Str = Annotated[str, Field(strict=True), AfterValidator(_encodable)]
# ... and that the room is sent as words or an id: no control characters either.
SendableStr = Annotated[Utf8Str, AfterValidator(_no_controls)]


class EchoProperties(BaseModel):
    """`properties` of a `conversation.echo` message."""

    model_config = ConfigDict(extra="forbid")

    modality: Literal["text", "audio"] = Field(
        description='"text": the persona says `text` (Tavus TTS). "audio": the persona plays `audio`.')
    text: SendableStr | None = Field(
        default=None,
        description='Words to speak. Required (and not blank) when modality is "text"; ignored otherwise. '
                    "At most control.max_text_chars characters (default 10000), encodable as UTF-8 (no "
                    "lone surrogates), without control characters but tab, LF and CR. A text too long for "
                    "one app-message is split at sentence/word boundaries into several messages under one "
                    "inference_id.",
        examples=["Hello"])
    audio: Utf8Str | None = Field(
        default=None,
        description='Required when modality is "audio"; ignored otherwise. Base64 of raw, headerless '
                    "16-bit little-endian mono PCM (s16le) at `sample_rate` (an even number of bytes; "
                    "whitespace/newlines are ignored). At most control.max_audio_s seconds.")
    sample_rate: Annotated[int, Field(strict=True, ge=MIN_SAMPLE_RATE, le=MAX_SAMPLE_RATE)] | None = Field(
        default=None,
        description=f"Rate of `audio` in Hz ({MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}); default "
                    f"{DEFAULT_SAMPLE_RATE} as in Tavus's schema. The relay resamples to "
                    "sink.audio_sample_rate before sending.",
        examples=[16000, 24000])
    inference_id: Annotated[SendableStr, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = Field(
        default=None,
        description="Groups messages into one utterance (send the same id with done=false, then done=true "
                    "to stream). Default: a new id per request. The ids used are returned.",
        examples=["inference-id-123"])
    done: DoneFlag = Field(
        default=None,
        description='End of the utterance: a JSON boolean or the string "true"/"false" (the quickstart '
                    "sends strings). Default true. With false, audio is sent without the closing "
                    "silent chunk so the caller can continue the same inference_id.",
        json_schema_extra={"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["true", "false"]},
                                     {"type": "null"}]})


class EchoRequest(BaseModel):
    """Body of `POST /send_text_message`: Tavus's `conversation.echo` interaction, as in its quickstart."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "c123456",
         "properties": {"modality": "text", "text": "Hello", "done": "true"}},
        {"message_type": "conversation", "event_type": "conversation.echo", "conversation_id": "c123456",
         "properties": {"modality": "audio", "audio": "AAABAAIA", "sample_rate": 16000,
                        "inference_id": "utt-1", "done": True}},
    ]})

    message_type: Literal["conversation"] = Field(
        default="conversation", description='Envelope: always "conversation" for interactions.')
    event_type: Literal["conversation.echo"] = Field(
        default="conversation.echo",
        description='Envelope: must be "conversation.echo" (POST /interrupt sends conversation.interrupt).')
    conversation_id: Annotated[Utf8Str, Field(max_length=MAX_CONVERSATION_ID_CHARS)] | None = Field(
        default=None,
        description="Accepted for compatibility and ignored: messages always go to the conversation the "
                    "relay is in (its id is in GET /status).")
    properties: EchoProperties = Field(description="The echo payload.")


# ------------------------------------------------------------------------------------ responses
class SendResponse(BaseModel):
    status: Literal["success"] = Field(default="success", description='Always "success" with HTTP 200.')
    message: str = Field(description="What happened: queued for delivery, or dropped by the transform chain.")
    modality: Literal["text", "audio"] = Field(description="The modality that was queued.")
    inference_ids: list[str] = Field(
        description="The inference id(s) the message(s) were queued under; empty when a transform dropped "
                    "the text. Delivery to the room is asynchronous: see GET /status and /metrics.")


class SuccessResponse(BaseModel):
    status: Literal["success"] = Field(default="success", description='Always "success".')


class InterruptResponse(SuccessResponse):
    sent: bool = Field(description="conversation.interrupt went out (false: nothing to interrupt, e.g. the "
                                   "replica is not in the room; `detail` says why).")
    dropped_echoes: int = Field(description="Echoes queued or in progress that the interrupt dropped (they "
                                            "would start the replica again); counted as dropped \"interrupted\".")
    detail: str = Field(description="What happened, in words.")


class FieldErrorItem(BaseModel):
    field: str = Field(description='Dotted path of the offending field, e.g. "properties.text"; "body" for '
                                   "the whole body.")
    message: str = Field(description="What is wrong with it.")
    type: str = Field(description="Machine-readable error kind (pydantic's error type, or ours).")


class ErrorResponse(BaseModel):
    status: Literal["error"] = Field(default="error", description='Always "error".')
    error: str = Field(description='One-line description, naming the field first: "properties.text: ...". '
                                   "(The quickstart's Flask handler also reports errors under `error`.)")
    field: str | None = Field(default=None,
                              description="The first offending field, when the error is about one.")
    errors: list[FieldErrorItem] = Field(default_factory=list, description="Every problem found.")


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field(default="ok",
                                  description="Liveness: the relay's event loop is serving requests.")


class ReadyResponse(BaseModel):
    ready: bool = Field(description="True when every check is true (HTTP 200); otherwise HTTP 503.")
    checks: dict[str, bool] = Field(
        description="The relay's readiness checks, e.g. model_loaded, sink_ready.")


# ------------------------------------------------------------------------------- serve: relays
MAX_SPEC_CHARS = 4096  # a source/sink SPEC: a path or a device name
MAX_URL_CHARS = 2048


class CreateRelayRequest(BaseModel):
    """Body of `POST /v1/relays` (`echo-relay serve`): a relay's source and sink, and configuration
    overrides; or a Tavus shortcut."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"conversation_url": "https://tavus.daily.co/c123456"},
        {"source": "file:/data/talk.flac", "sink": "jsonl:/data/talk.jsonl", "config": {"vad": {"threshold": 0.4}}},
    ]})

    source: Annotated[Utf8Str, Field(min_length=1, max_length=MAX_SPEC_CHARS)] | None = Field(
        default=None, description="SPEC as in `echo-relay run --source`: mic[:DEVICE] | file:PATH | daily. Default: "
                                  "daily with a Tavus shortcut, else the configuration's source.spec.")
    sink: Annotated[Utf8Str, Field(min_length=1, max_length=MAX_SPEC_CHARS)] | None = Field(
        default=None, description="SPEC as in `echo-relay run --sink`: console | jsonl:PATH | daily. Default: daily "
                                  "with a Tavus shortcut, else the configuration's sink.spec.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides of the configuration for this relay: sections as in the config file "
                    '({"vad": {"threshold": 0.4}}) or dotted keys ({"vad.threshold": 0.4}). The asr, control, '
                    "serve and logging sections are shared by the process and cannot be overridden.")
    conversation_url: Annotated[Utf8Str, Field(min_length=1, max_length=MAX_URL_CHARS)] | None = Field(
        default=None, description="Tavus shortcut: join this conversation's Daily room, hear the user and echo "
                                  "into the replica (source and sink default to daily).")
    persona_id: Annotated[Utf8Str, Field(min_length=1, max_length=MAX_ID_CHARS)] | None = Field(
        default=None, description="Tavus shortcut: create a conversation with this echo-mode persona (needs "
                                  "TAVUS_API_KEY), join it as above, and end it when the relay is deleted.")


class RelayCreated(BaseModel):
    id: str = Field(description="The relay's id, for /v1/relays/{id}/...")
    phase: str = Field(description="starting | running | draining | ended | failed")


class LatencySummary(BaseModel):
    count: int = Field(description="Speech messages measured (the last 1000 at most).")
    p50_s: float | None = Field(description="Median end of speech to sent, seconds.")
    p95_s: float | None = Field(description="95th percentile end of speech to sent, seconds.")


class RelayInfo(BaseModel):
    id: str
    phase: str = Field(description="starting | running | draining | ended | failed")
    error: str | None = Field(description="Why it failed (phase failed).")
    created_at: str = Field(description="ISO 8601, UTC.")
    source: str
    sink: str
    conversation_id: str | None
    ledger: dict[str, Any] = Field(description="closed, delivered, dropped (by reason), undeliverable, in_flight, "
                                               "unheard, uncovered; as in GET /status.")
    latency: LatencySummary


class RelayList(BaseModel):
    relays: list[RelayInfo]
    active: int = Field(description="Relays starting, running or draining (counted against serve.max_relays).")
    max_relays: int
