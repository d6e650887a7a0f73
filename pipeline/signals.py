"""The daemon's stop signals, and what happens to them before its handlers are installed (issue 27).

`run` and `serve` install their drain handlers on the event loop (pipeline/app.py), after the configuration
is read and the stages are built: a SIGTERM during the imports before that (~0.3 s, more while the ASR
libraries load) took the default action, exit 143, instead of the documented drain and exit 0.
`install_early()` is the first thing the `echo-relay` executable and `python -m pipeline` do
(pipeline/entry.py): until the daemon takes over, a first signal is remembered (`take_early()` hands it to
the daemon, which stops at once and exits 0: nothing was captured yet) and a second one exits at once with
130, as a second signal always does. Commands that are not daemons give the signals back
(`release_early()`): their default actions apply, and one that came early is delivered again.

What remains is the interpreter's own start-up before the entry point's first line (tens of milliseconds,
measured in docs/reliability.md): a signal then still takes the default action.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

# Each stops the relay gracefully (drain, exit 0/1); a second one exits at once. SIGHUP too: a closed
# terminal or systemd's hangup must not lose the utterance in progress (reloading config is not supported).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_INTERRUPTED = 130  # second signal: exit at once (pipeline/app.py)

_pending: list[int] = []  # signals received before the daemon's handlers
_installed = False


def _remember(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)
    if len(_pending) > 1:  # a second signal before the daemon even started: exit at once, as documented
        os._exit(EXIT_INTERRUPTED)


def install_early() -> None:
    """Remember stop signals until the daemon installs its handlers (see the module docstring)."""
    global _installed
    for sig in STOP_SIGNALS:
        signal.signal(sig, _remember)
    _installed = True


def take_early() -> list[str]:
    """The names of the stop signals that came before the daemon's handlers (each handed over once)."""
    names = [signal.Signals(s).name for s in _pending]
    _pending.clear()
    return names


def release_early() -> None:
    """Back to the default actions (SIGINT: KeyboardInterrupt) for a command that is not a daemon; a signal
    that came early is delivered again, so it takes effect as if no handler had been there."""
    global _installed
    if not _installed:
        return
    _installed = False
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    for signum in take_early_numbers():
        signal.raise_signal(signum)


def take_early_numbers() -> list[int]:
    numbers = list(_pending)
    _pending.clear()
    return numbers
