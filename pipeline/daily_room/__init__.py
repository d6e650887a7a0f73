"""Daily room plumbing shared by the Daily sink and the Daily source.

Threading rule (daily-python 0.36 API reference): daily-python runs every completion and event on
its own native thread with the GIL held. Here those callbacks only copy their arguments onto the asyncio loop
with `loop.call_soon_threadsafe`; they never block, never wait, and never call a CallClient method.
Everything else (state, parsing, subscribers) happens on the loop.

    SDK thread: EventHandler (sdk.py) ──hand_over──▶ RoomConnection (connection.py) ──loop──▶ RoomTracker (tracker.py)
                completions ───────────────────────▶   join / send / capture / leave          call state, participants,
                                                                                              replica, network, events
                                                                                              ──▶ subscribers, waiters

- `sdk`: which daily module (daily-python or a stand-in), `Daily.init()` once per process, the EventHandler;
- `events`: Tavus app-messages parsed into `RoomEvent`s, network statuses, participant names (pure);
- `tracker`: `RoomTracker`, what is known of the room (the replica is the participant whose `info.userName`
  equals the persona name), `RoomState`, the `RoomPhase` lifecycle, subscribers and waiting;
- `connection`: `RoomConnection`, one CallClient: `await join()`, `await send() -> None | error string`,
  `capture_audio/video()`, `await close()` (reference-counted: leave -> wait for the completion -> release,
  off the loop); its `tracker` holds the room.
"""

from pipeline.daily_room.connection import RoomConnection, redact_url
from pipeline.daily_room.events import (
    KNOWN_EVENT_KINDS,
    OTHER_EVENT,
    ROOM_EVENT_TYPES,
    RoomEvent,
    parse_app_message,
    parse_network_status,
    participant_name,
    room_event_label,
)
from pipeline.daily_room.sdk import (
    CALL_CLIENT_METHODS_USED,
    DAILY_MODULE_ENV,
    DEFAULT_DAILY_MODULE,
    EVENT_HANDLERS_USED,
    FAKE_DAILY_MODULE,
    InvalidAppMessage,
    RoomError,
    deinit_daily,
    ensure_daily_initialized,
    get_daily_module,
    resolve_daily_module,
)
from pipeline.daily_room.tracker import RoomPhase, RoomState, RoomTracker, Subscriber

__all__ = ["CALL_CLIENT_METHODS_USED", "DAILY_MODULE_ENV", "DEFAULT_DAILY_MODULE", "EVENT_HANDLERS_USED",
           "FAKE_DAILY_MODULE", "KNOWN_EVENT_KINDS", "OTHER_EVENT", "ROOM_EVENT_TYPES", "InvalidAppMessage",
           "RoomConnection", "RoomError", "RoomEvent", "RoomPhase", "RoomState", "RoomTracker", "Subscriber",
           "deinit_daily", "ensure_daily_initialized", "get_daily_module", "parse_app_message",
           "parse_network_status", "participant_name", "redact_url", "resolve_daily_module", "room_event_label"]
