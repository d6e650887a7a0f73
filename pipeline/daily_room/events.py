"""What happens in a Daily room, as data: Tavus app-messages parsed into `RoomEvent`s, network statuses,
participants' names. Pure functions, no SDK and no loop."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

KNOWN_EVENT_KINDS = {
    "conversation.replica.started_speaking": "replica_started_speaking",
    "conversation.replica.stopped_speaking": "replica_stopped_speaking",
    "conversation.user.started_speaking": "user_started_speaking",
    "conversation.user.stopped_speaking": "user_stopped_speaking",
    "conversation.utterance": "utterance",
    "conversation.utterance.streaming": "utterance_streaming",
    "conversation.replica_interrupted": "replica_interrupted",
    "conversation.tool_call": "tool_call",
    "conversation.perception_tool_call": "perception",
    "conversation.perception_analysis": "perception",
    "system.replica_joined": "replica_joined_message",
    "system.shutdown": "shutdown",
    # Messages other participants send (our own kind of traffic): seen, not acted on.
    "conversation.echo": "echo_seen",
    "conversation.interrupt": "interrupt_seen",
    "conversation.respond": "respond_seen",
}
# The event_type label values of echo_relay_room_events_total: the types above and the unified
# speaking events (their role is in the properties); anything else a peer sends is "other", so a peer
# cannot grow the metric's series.
ROOM_EVENT_TYPES = (*KNOWN_EVENT_KINDS, "conversation.started_speaking", "conversation.stopped_speaking")
OTHER_EVENT = "other"


def room_event_label(event_type: str | None) -> str:
    """The event_type label for an app-message's `event_type`: one of ROOM_EVENT_TYPES or "other"."""
    return event_type if event_type in ROOM_EVENT_TYPES else OTHER_EVENT


@dataclass(slots=True)
class RoomEvent:
    """Something that happened in the room, delivered to subscribers on the event loop.

    kind: replica_started_speaking | replica_stopped_speaking | user_started_speaking |
    user_stopped_speaking | utterance | utterance_streaming | replica_interrupted | tool_call |
    perception | shutdown | replica_joined_message | echo_seen | interrupt_seen | respond_seen |
    unknown | invalid (app-messages), and joined | participant_joined | participant_left |
    participant_updated | replica_joined | replica_left | network | call_state | error | ended (room).
    """

    kind: str
    event_type: str | None = None
    inference_id: str | None = None
    role: str | None = None
    text: str | None = None
    seq: int | None = None
    timestamp: float | None = None
    interrupted: bool | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    message: Any = None
    sender: str | None = None
    participant: dict[str, Any] | None = None
    detail: str | None = None
    received_at: float = field(default_factory=time.time)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "at": round(self.received_at, 3)}
        for key in ("event_type", "inference_id", "role", "seq", "interrupted", "detail"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.text is not None:
            out["text"] = self.text[:200]
        return out


def parse_app_message(message: Any, sender: str | None = None) -> RoomEvent:
    """Turn a Tavus app-message (already JSON-decoded) into a RoomEvent; never raises."""
    if not isinstance(message, Mapping):
        return RoomEvent(kind="invalid", message=message, sender=sender,
                         detail=f"app-message is a {type(message).__name__}, not an object")
    event_type = message.get("event_type")
    event_type = event_type if isinstance(event_type, str) else None
    props_raw = message.get("properties")
    props: dict[str, Any] = dict(props_raw) if isinstance(props_raw, Mapping) else {}
    kind = KNOWN_EVENT_KINDS.get(event_type or "", "unknown")
    role = props.get("role") if isinstance(props.get("role"), str) else None
    if event_type in ("conversation.started_speaking", "conversation.stopped_speaking"):
        who = "user" if role == "user" else "replica"  # newer unified form: properties.role
        kind = f"{who}_{event_type.rsplit('.', 1)[1]}"
    if role == "pal":  # Tavus sends PAL turns twice, as "pal" and as legacy "replica" (its Interactions docs)
        role = "replica"
    inference_id = message.get("inference_id") or props.get("inference_id")
    seq = message.get("seq")
    ts = message.get("timestamp")
    interrupted = props.get("interrupted", props.get("is_interrupted"))
    text = props.get("speech", props.get("text"))
    if kind == "shutdown":
        reason = props.get("shutdown_reason") or message.get("shutdown_reason")
        text = str(reason) if reason is not None else None
    return RoomEvent(
        kind=kind, event_type=event_type,
        inference_id=str(inference_id) if inference_id not in (None, "") else None,
        role=role, text=text if isinstance(text, str) else None,
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
        timestamp=float(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else None,
        interrupted=bool(interrupted) if isinstance(interrupted, (bool, str)) and interrupted != "" else None,
        properties=props, message=message, sender=sender)


def parse_network_status(status: Any) -> tuple[str | None, str]:
    """`NetworkConnectionStatus` -> (connection name or None, "connected" | "interrupted" | raw).

    The schema is [unconfirmed]; the binary holds the fields `connection`/`event` and the values
    `connected`/`interrupted`. A bare string is accepted too.
    """
    connection: str | None = None
    event: Any = status
    if isinstance(status, Mapping):
        connection = status.get("connection") or status.get("type")
        event = status.get("event") or status.get("state") or status.get("status")
    text = str(event or "").strip().lower()
    if any(word in text for word in ("interrupt", "disconnect", "reconnecting", "lost", "fail")):
        return (str(connection) if connection else None), "interrupted"
    if "connected" in text:
        return (str(connection) if connection else None), "connected"
    return (str(connection) if connection else None), text or "unknown"


def participant_name(p: Mapping[str, Any] | None) -> str | None:
    if not isinstance(p, Mapping):
        return None
    info = p.get("info")
    name = info.get("userName") if isinstance(info, Mapping) else None
    return name if isinstance(name, str) else None


def is_local(pid: str, p: Mapping[str, Any]) -> bool:
    info = p.get("info")
    return pid == "local" or (isinstance(info, Mapping) and bool(info.get("isLocal")))
