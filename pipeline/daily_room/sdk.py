"""daily-python itself: which module, its process-wide init, and the EventHandler that hands callbacks over.

- `get_daily_module(name)`: "daily" imports daily-python; a dotted path (e.g. "pipeline.testing.fake_daily")
  imports a stand-in with the same API. `resolve_daily_module()` picks the name: explicit argument > env
  `ECHO_RELAY_DAILY_MODULE` > `settings.sink.daily.module` > "daily".
- `ensure_daily_initialized(module)`: `Daily.init()` exactly once per process and module (a second init aborts
  the real process). `Daily.deinit()` runs at interpreter exit when no client is alive (or explicitly via
  `deinit_daily()`), never in between, so any number of sinks/sources may come and go. A connection counts
  its CallClient with `client_created()` / `client_released()`.
- `handler_class(module)`: the EventHandler subclass whose callbacks (on the SDK's thread) only hand their
  arguments to a target (pipeline/daily_room/connection.py puts them on the loop).
"""

from __future__ import annotations

import atexit
import collections
import importlib
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from types import ModuleType
from typing import Any, Protocol

log = logging.getLogger("pipeline.daily_room")  # one logger for the room plumbing, whichever part logs

DAILY_MODULE_ENV = "ECHO_RELAY_DAILY_MODULE"
DEFAULT_DAILY_MODULE = "daily"
FAKE_DAILY_MODULE = "pipeline.testing.fake_daily"

# CallClient methods this package calls; tests check their signatures against daily-python.
CALL_CLIENT_METHODS_USED = ("join", "leave", "release", "send_app_message", "participants", "set_user_name",
                            "update_subscription_profiles", "update_subscriptions", "set_audio_renderer",
                            "set_video_renderer")
EVENT_HANDLERS_USED = ("on_app_message", "on_participant_joined", "on_participant_left",
                       "on_participant_updated", "on_call_state_updated", "on_error",
                       "on_network_connection_status_updated")


class RoomError(Exception):
    """Joining or using the room failed. The message is user-facing (no secrets)."""


class InvalidAppMessage(RoomError):
    """daily-python refused the message synchronously (not JSON-serializable, bad participant id):
    retrying cannot help."""


class EventTarget(Protocol):
    def hand_over(self, name: str, *args: Any) -> None:
        """SDK thread: take the callback `name` ("on_app_message", ...) with its arguments; never block."""
        ...


# ------------------------------------------------------------------------------ module and init
def get_daily_module(name: str | None = None) -> ModuleType:
    """Import the daily module: "daily" (daily-python) or a dotted path of a stand-in."""
    name = (name or DEFAULT_DAILY_MODULE).strip()
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        if name == DEFAULT_DAILY_MODULE:
            raise RoomError("daily-python is not installed (pip install 'daily-python>=0.36,<0.37')") from exc
        raise RoomError(f"cannot import the Daily module {name!r}: {exc}") from exc
    missing = [attr for attr in ("Daily", "CallClient", "EventHandler") if not hasattr(module, attr)]
    if missing:
        raise RoomError(f"module {name!r} is not a daily-python stand-in (missing {', '.join(missing)})")
    return module


def resolve_daily_module(module: ModuleType | str | None = None, settings: Any = None) -> ModuleType:
    """Explicit module/name > env ECHO_RELAY_DAILY_MODULE > settings.sink.daily.module > "daily"."""
    if isinstance(module, ModuleType):
        return module
    name = module or os.environ.get(DAILY_MODULE_ENV) or None
    if name is None and settings is not None:
        daily_settings = getattr(getattr(settings, "sink", None), "daily", None)
        name = getattr(daily_settings, "module", None)
    return get_daily_module(name)


_init_lock = threading.Lock()
_initialized: set[str] = set()
_atexit_registered: set[str] = set()
_live_clients: collections.Counter[str] = collections.Counter()


def ensure_daily_initialized(module: ModuleType) -> None:
    """`Daily.init()` once per process for this module (guarded: a second init aborts the process)."""
    name = module.__name__
    with _init_lock:
        if name in _initialized:
            return
        module.Daily.init()
        _initialized.add(name)
        if name not in _atexit_registered:
            _atexit_registered.add(name)
            atexit.register(_deinit_at_exit, module)
        log.debug("Daily.init() done (%s)", name)


def deinit_daily(module: ModuleType) -> bool:
    """`Daily.deinit()` if initialized and no CallClient of this module is alive. Returns True if done.
    A later `ensure_daily_initialized()` initializes again (allowed after deinit in 0.36)."""
    name = module.__name__
    with _init_lock:
        if name not in _initialized or _live_clients[name] > 0:
            return False
        module.Daily.deinit()
        _initialized.discard(name)
        return True


def _deinit_at_exit(module: ModuleType) -> None:
    try:
        if not deinit_daily(module) and _live_clients[module.__name__] > 0:
            log.debug("Daily.deinit() skipped at exit: %d client(s) still alive",
                      _live_clients[module.__name__])
    except Exception:  # interpreter shutdown: never raise from atexit
        pass


def client_created(module: ModuleType) -> None:
    """A CallClient of `module` exists: `Daily.deinit()` waits until it is released."""
    _live_clients[module.__name__] += 1


def client_released(module: ModuleType) -> None:
    _live_clients[module.__name__] -= 1


def live_clients(module: ModuleType) -> int:
    """CallClients of `module` created and not released yet (by every connection of the process)."""
    return _live_clients[module.__name__]


# --------------------------------------------------------------------------------- the handler
_handler_classes: dict[str, type] = {}


def handler_class(module: ModuleType) -> type:
    """An EventHandler subclass of `module.EventHandler` that hands every callback to its target (held weakly,
    so the SDK's reference never keeps a connection alive): `target.hand_over("on_<event>", *args)`."""
    cls = _handler_classes.get(module.__name__)
    if cls is not None:
        return cls

    base: type = module.EventHandler

    class _RoomEventHandler(base):
        # The SDK's EventHandler.__new__ accepts positional arguments only.
        def __init__(self, target_ref: weakref.ReferenceType[EventTarget]) -> None:
            super().__init__()
            self._target_ref = target_ref

        def _post(self, name: str, *args: Any) -> None:
            target = self._target_ref()
            if target is not None:
                target.hand_over(name, *args)

        def on_app_message(self, message: Any, sender: str) -> None:
            self._post("on_app_message", message, sender)

        def on_participant_joined(self, participant: Mapping[str, Any]) -> None:
            self._post("on_participant_joined", participant)

        def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None:
            self._post("on_participant_left", participant, reason)

        def on_participant_updated(self, participant: Mapping[str, Any]) -> None:
            self._post("on_participant_updated", participant)

        def on_call_state_updated(self, state: str) -> None:
            self._post("on_call_state_updated", state)

        def on_error(self, message: str) -> None:
            self._post("on_error", message)

        def on_network_connection_status_updated(self, status: Mapping[str, Any]) -> None:
            self._post("on_network_status", status)

    _handler_classes[module.__name__] = _RoomEventHandler
    return _RoomEventHandler
