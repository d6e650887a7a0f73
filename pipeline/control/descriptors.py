"""File descriptors for the control API (issue 27: running out of them).

Each connection is one descriptor. When the process reached its descriptor limit (RLIMIT_NOFILE, `ulimit -n`),
asyncio's accept loop logged a traceback per failed `accept()` and rescheduled itself once per attempt
(hundreds of thousands of tracebacks, tens of MB of log in seconds, a core busy) and nobody got an answer,
/healthz included. Two parts here:

- `fit_connections` (at start): control.max_connections must fit under the descriptor limit with what the
  process already holds and `FD_HEADROOM` for the rest of the relay. The soft limit is raised towards the
  hard limit when that is too low; when even the hard limit is too low, max_connections is lowered, with a
  warning naming both, or the server is refused (`DescriptorLimitError`) when fewer than
  MIN_CONNECTIONS would remain. Connections alone then never exhaust descriptors: at max_connections the
  longest-idle one makes room (pipeline/control/guard.py ConnectionLimits), so /healthz gets in.
- `GuardedListener` (every accept): when descriptors run out anyway (something else in the process holds
  them), a reserve descriptor is given up for a moment to accept the waiting connection, answer it 503
  (`Retry-After`) and close it, so clients get an answer instead of a hang and the backlog drains; the
  burst is logged once when it starts, then at most every OVERLOAD_LOG_EVERY_S, and once when it ends,
  each time with its count, and counted in control_requests{endpoint="connection", status="no_fds"}.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from pipeline.control.guard import CONNECTION_ENDPOINT, OVERLOAD_LOG_EVERY_S, count_request, raw_error
from pipeline.metrics import ControlMetrics

try:
    import resource
except ImportError:  # pragma: no cover - not on Windows
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

# Descriptors kept for everything but the control API's connections: the ASR model's files and threads, the
# source, the sinks (a JSONL file, the Daily client's sockets), webhook and Tavus clients, log files. A
# soak run (docs/reliability.md, "Soak": the whole relay with the Daily stand-in) holds 14; 64 leaves room
# for more sinks, steps and `serve`'s several relays.
FD_HEADROOM = 64
# The listen backlog, which is also how many connections asyncio accepts per readiness of the listener (uvicorn's
# default is 2048). New connections make room by closing idle ones (ConnectionLimits), but those close a loop
# iteration later: up to two batches are open beyond control.max_connections, and are budgeted for.
ACCEPT_BACKLOG = 128
MIN_CONNECTIONS = 16  # the lowest control.max_connections accepts (pipeline/config.py)
NO_FDS_STATUS = "no_fds"  # control_requests{endpoint="connection"} label of connections answered 503 for it
# accept() failing for want of resources: descriptors (per process, system-wide) or kernel memory.
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_PAUSE_S = 1.0  # with no reserve descriptor to answer with, accepting pauses this long (asyncio's own)
ASYNCIO_ACCEPT_MESSAGE = "socket.accept() out of system resource"  # asyncio's log line, summarized by us


class DescriptorLimitError(Exception):
    """The descriptor limit leaves room for fewer than MIN_CONNECTIONS connections. One line."""


@dataclass(frozen=True)
class FdBudget:
    """What `fit_connections` found: the connections to allow, and the limit they fit under."""

    max_connections: int
    soft_limit: int | None  # None: unknown (no RLIMIT_NOFILE on this platform) or unlimited
    hard_limit: int | None
    raised: bool  # the soft limit was raised to make room


def open_descriptors() -> int:
    """Descriptors this process holds now (0 when the platform cannot say)."""
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        with contextlib.suppress(OSError):
            return max(0, len(os.listdir(fd_dir)) - 1)  # listdir's own descriptor is in the list
    return 0


def _finite(limit: int) -> int | None:
    return None if resource is None or limit == resource.RLIM_INFINITY or limit < 0 else limit


def fit_connections(max_connections: int, *, in_use: int | None = None) -> FdBudget:
    """Make control.max_connections fit under RLIMIT_NOFILE (see the module docstring).

    Raises DescriptorLimitError when fewer than MIN_CONNECTIONS connections would fit even under the hard limit.
    """
    if resource is None:  # pragma: no cover
        return FdBudget(max_connections, None, None, False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = open_descriptors() if in_use is None else in_use
    overhead = held + FD_HEADROOM + 2 + 2 * ACCEPT_BACKLOG  # 2: the listening socket, GuardedListener's reserve
    needed = overhead + max_connections
    soft_n, hard_n = _finite(soft), _finite(hard)
    raised = False
    if soft_n is not None and soft_n < needed:
        target = needed if hard_n is None else min(needed, hard_n)
        if target > soft_n:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            except (OSError, ValueError) as exc:
                log.debug("cannot raise RLIMIT_NOFILE to %d: %s", target, exc)
            else:
                log.info("control API: raised the open-file limit from %d to %d for control.max_connections = %d",
                         soft_n, target, max_connections)
                soft_n, raised = target, True
    if soft_n is None or soft_n >= needed:
        return FdBudget(max_connections, soft_n, hard_n, raised)
    room = soft_n - overhead
    limit_text = (f"the process may open {soft_n} files (ulimit -n; hard limit "
                  f"{'unlimited' if hard_n is None else hard_n}), holds {held}, and keeps {overhead - held} for the "
                  "relay and connections being accepted")
    if room < MIN_CONNECTIONS:
        raise DescriptorLimitError(f"control API: too few file descriptors: {limit_text}, which leaves {max(room, 0)} "
                                   f"for connections (at least {MIN_CONNECTIONS}); raise `ulimit -n`")
    log.warning("control API: control.max_connections lowered from %d to %d: %s", max_connections, room, limit_text)
    return FdBudget(room, soft_n, hard_n, raised)


class _AsyncioAcceptFilter(logging.Filter):
    """Drops asyncio's traceback per failed accept(): GuardedListener logs the burst with its count instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != ASYNCIO_ACCEPT_MESSAGE


_ASYNCIO_FILTER = _AsyncioAcceptFilter()


class GuardedListener(socket.socket):
    """A listening socket whose accept() survives running out of descriptors (see the module docstring).

    asyncio calls accept() up to 100 times per readiness; BlockingIOError is its "nothing waiting" signal,
    which ends that round without a log line.
    """

    metrics: ControlMetrics | None
    _answer: bytes
    _reserve: int | None  # a descriptor on /dev/null, given up to accept a connection when none is left
    _burst: int  # connections answered 503 or not accepted in the current burst
    _burst_started: float
    _logged_at: float
    _paused_until: float  # accept() raises BlockingIOError until then (asyncio retries after ACCEPT_PAUSE_S)

    @classmethod
    def wrap(cls, sock: socket.socket, metrics: ControlMetrics | None) -> GuardedListener:
        """Take over `sock` (bound, non-blocking)."""
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.setblocking(False)
        listener.metrics = metrics
        listener._answer = raw_error(503, "server busy: out of file descriptors (the open-file limit, ulimit -n, "
                                          "is reached); retry later", None, {"retry-after": "1"})
        listener._reserve = listener._open_reserve()
        listener._burst = 0
        listener._burst_started = 0.0
        listener._logged_at = -math.inf
        listener._paused_until = 0.0
        logging.getLogger("asyncio").addFilter(_ASYNCIO_FILTER)
        return listener

    @staticmethod
    def _open_reserve() -> int | None:
        try:
            return os.open(os.devnull, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None

    def accept(self) -> tuple[socket.socket, Any]:
        if self._paused_until and time.monotonic() < self._paused_until:
            raise BlockingIOError(errno.EAGAIN, "accepting is paused")  # asyncio's retry is already scheduled
        self._paused_until = 0.0
        try:
            conn = super().accept()
        except OSError as exc:
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            return self._out_of_resources(exc)
        if self._burst:
            self._end_burst()
        if self._reserve is None:
            self._reserve = self._open_reserve()
        return conn

    def _out_of_resources(self, exc: OSError) -> tuple[socket.socket, Any]:
        self._count(exc)
        if self._reserve is not None and exc.errno in (errno.EMFILE, errno.ENFILE):
            os.close(self._reserve)
            self._reserve = None
            try:
                conn, _ = super().accept()
            except OSError:
                pass
            else:
                with contextlib.suppress(OSError):
                    conn.setblocking(False)
                    conn.send(self._answer)  # a few hundred bytes: always fits the new socket's buffer
                conn.close()
            self._reserve = self._open_reserve()
            if self._reserve is not None:
                raise BlockingIOError(errno.EAGAIN, "answered 503: out of file descriptors")
        # No descriptor to answer with: let asyncio pause accepting (its ACCEPT_PAUSE_S), once per pause.
        self._paused_until = time.monotonic() + ACCEPT_PAUSE_S
        raise exc

    def _count(self, exc: OSError) -> None:
        now = time.monotonic()
        if not self._burst:
            self._burst_started = now
        self._burst += 1
        if self.metrics is not None:
            count_request(self.metrics, CONNECTION_ENDPOINT, NO_FDS_STATUS)
        if now - self._logged_at >= OVERLOAD_LOG_EVERY_S:
            self._logged_at = now
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0] if resource is not None else None
            log.warning("control API: cannot accept connections: %s (open-file limit %s); new connections are "
                        "answered 503 until descriptors are free: %d so far in this burst", exc.strerror or exc, soft,
                        self._burst)

    def _end_burst(self) -> None:
        log.warning("control API: accepting connections again: %d connection(s) answered 503 or refused for want "
                    "of file descriptors in %.1f s", self._burst, time.monotonic() - self._burst_started)
        self._burst = 0
        self._logged_at = -math.inf

    def close(self) -> None:
        reserve = getattr(self, "_reserve", None)
        if reserve is not None:
            with contextlib.suppress(OSError):
                os.close(reserve)
            self._reserve = None
        super().close()
