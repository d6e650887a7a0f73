"""A control API in its own process with a given open-file limit, for tests/test_machinery_hostile.py.

    python tests/fd_server.py SOFT HARD MAX_CONNECTIONS

Sets RLIMIT_NOFILE to (SOFT, HARD), starts the control API on 127.0.0.1 (any free port), prints one JSON line
(`port`, the `max_connections` in effect, the limit after start) and then obeys lines on stdin, answering each
with one line: `hog` takes every descriptor it may open, and keeps taking those freed later, until `free`
closes them again; `count` gives the connections answered 503 for want of descriptors; `quit` (or EOF)
stops the server and exits. Logs go to stderr. A refused start prints `{"error": ...}` and exits 5.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys
import time
from typing import Any

from pipeline.config import Settings
from pipeline.control.server import ControlServerError, start_control_server
from pipeline.events import EventBus
from pipeline.metrics import Metrics


class IdleHandle:
    """The relay behind the API: only /healthz, /readyz and /status are asked of it here."""

    def __init__(self) -> None:
        self.events = EventBus(Metrics(), time.monotonic)

    def readiness(self) -> dict[str, bool]:
        return {"running": True}

    def status(self) -> dict[str, Any]:
        return {}


async def main(soft: int, hard: int, max_connections: int) -> int:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    settings = Settings.model_validate({"control": {"port": 0, "max_connections": max_connections,
                                                    "rate_limit_per_s": 100_000, "header_timeout_s": 300}})
    metrics = Metrics()
    try:
        server = await start_control_server(IdleHandle(), metrics, settings)
    except ControlServerError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return 5
    limits: Any = server._server.config.http  # the protocol class, bound to the server's ConnectionLimits
    print(json.dumps({"port": server.port, "max_connections": limits.limits.max_connections,
                      "soft_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]}), flush=True)
    loop = asyncio.get_running_loop()
    hogged: list[int] = []
    hog: asyncio.Task[None] | None = None

    def grab() -> None:
        try:
            while True:
                hogged.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass

    async def keep_grabbing() -> None:  # descriptors the server frees later (connections closing) are taken too
        while True:
            grab()
            await asyncio.sleep(0.01)

    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "hog":
            grab()
            hog = asyncio.create_task(keep_grabbing())
            answer: dict[str, Any] = {"hogged": len(hogged)}
        elif line == "free":
            if hog is not None:
                hog.cancel()
            for fd in hogged:
                os.close(fd)
            answer = {"freed": len(hogged)}
            hogged.clear()
        elif line == "count":
            answer = {"no_fds": metrics.value("echo_relay_control_requests_total",
                                              {"endpoint": "connection", "status": "no_fds"})}
        else:
            break
        print(json.dumps(answer), flush=True)
    await server.stop()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    raise SystemExit(asyncio.run(main(*map(int, sys.argv[1:4]))))
