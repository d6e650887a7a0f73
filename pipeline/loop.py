"""The daemon's event loop, which user code cannot stop (issue 27).

Transform steps, analyzers and engines loaded by name run on the relay's own loop. One async step calling
`asyncio.get_running_loop().stop()` ended `run` (exit 1, "unexpected error"), and asyncio's shutdown
cancelled the message in hand, which was then recorded as "not delivered within the shutdown drain time".
`run(main)` runs the daemon on a `RelayEventLoop`:

- `stop()` called by anything but asyncio's own `run_until_complete` is ignored, with a warning naming the
  file and line that called it (the loop is only stopped by the daemon's shutdown, which ends `main`);
- SystemExit or KeyboardInterrupt raised in a task or callback other than `main` (a step's own background
  task calling `sys.exit()`) is logged and the loop carries on: asyncio would otherwise end the loop
  with it. In `main` itself, or once `main` is done, they end the run as usual. The daemon's signals come
  through `loop.add_signal_handler` and never raise KeyboardInterrupt.

What no loop can contain is listed in docs/reliability.md ("User code that stops the machinery"): a
thread calling `os._exit()`, a signal the process cannot catch (SIGKILL), a step blocking the loop itself.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections import deque
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

STOPPED_EARLY = "Event loop stopped before Future completed."  # asyncio's RuntimeError text (3.7 .. 3.13)
SEEN_EXCEPTIONS = 16  # contained exceptions remembered, see RelayEventLoop._seen
_OWN_STOP = "_run_until_complete_cb"  # asyncio.base_events: stops the loop once the awaited future is done


class RelayEventLoop(asyncio.SelectorEventLoop):
    """A selector loop whose stop() only its own run_until_complete may call (see the module docstring).
    `contained` counts what was contained: foreign stop() calls and base exceptions out of other tasks."""

    def __init__(self) -> None:
        super().__init__()
        self.contained = 0
        # Base exceptions contained so far (the last few): the task that raised one still holds it, and
        # asyncio would report it again, with a traceback, as "Task exception was never retrieved".
        self._seen: deque[BaseException] = deque(maxlen=SEEN_EXCEPTIONS)

    def stop(self) -> None:
        caller = sys._getframe(1)
        if caller.f_code.co_name == _OWN_STOP:
            super().stop()
            return
        self.contained += 1
        where = (f"{caller.f_code.co_filename}:{caller.f_lineno} in {caller.f_code.co_name}"
                 if caller.f_code.co_filename != asyncio.events.__file__ else "a callback (call_soon, call_later)")
        log.warning("user code tried to stop the event loop (%s); ignored: the relay stops only on its own "
                    "shutdown (a signal, the end of the source)", where)

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if any(context.get("exception") is seen for seen in self._seen):
            log.debug("%s (contained above)", context.get("message"))
            return
        super().call_exception_handler(context)

    def run_until_complete(self, future: Any) -> Any:
        main = asyncio.ensure_future(future, loop=self)
        while True:
            try:
                return super().run_until_complete(main)
            except (SystemExit, KeyboardInterrupt) as exc:
                if main.done():
                    raise
                self.contained += 1
                self._seen.append(exc)
                log.error("%s raised outside the relay's own code (a step's or plug-in's task or callback); "
                          "ignored: the relay carries on", type(exc).__name__ if not str(exc)
                          else f"{type(exc).__name__}({exc})")
            except RuntimeError as exc:  # a stop() that got past RelayEventLoop.stop (a subclass's super call)
                if main.done() or str(exc) != STOPPED_EARLY:
                    raise
                self.contained += 1
                log.warning("the event loop was stopped before the relay finished; resumed")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on a RelayEventLoop."""
    with asyncio.Runner(loop_factory=RelayEventLoop) as runner:
        return runner.run(main)
