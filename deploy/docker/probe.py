#!/usr/bin/env python3
"""Probe a local `echo-relay serve` from inside its container or pod (installed as `echo-relay-probe`).

    echo-relay-probe /healthz            exit 0 when the path answers 2xx, else 1 (HEALTHCHECK, probes)
    echo-relay-probe /readyz             the same; sends the control token, which /readyz needs
    echo-relay-probe wait-idle --max-s N  until no relay is active (GET /v1/relays), at most N seconds:
                                          a Kubernetes preStop, so conversations end by themselves
                                          before SIGTERM drains what is left

Standard library only: slim images have no curl, and a probe must not import the relay (seconds of
start-up). The server is http://127.0.0.1:$ECHO_RELAY_PORT (default 8000, control.port in
deploy/*/config.yaml); the token is $ECHO_RELAY_TOKEN, the variable those configs read control.token from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request

DEFAULT_PORT = 8000  # control.port in deploy/docker/config.yaml and the Kubernetes ConfigMap
TIMEOUT_S = 3.0  # one request; Docker's and Kubernetes' probe timeouts are set above it
POLL_S = 2.0  # wait-idle: how often the relay list is read


def _get(path: str, timeout_s: float = TIMEOUT_S) -> tuple[int, bytes]:
    port = int(os.environ.get("ECHO_RELAY_PORT", DEFAULT_PORT))
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    token = os.environ.get("ECHO_RELAY_TOKEN", "")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def check(path: str) -> int:
    try:
        status, body = _get(path)
    except OSError as exc:  # refused, timed out: the server is not (yet) there
        print(f"{path}: {exc}", file=sys.stderr)
        return 1
    print(f"{path}: {status} {body.decode('utf-8', 'replace')[:500]}")
    return 0 if 200 <= status < 300 else 1


def wait_idle(max_s: float) -> int:
    """Wait until GET /v1/relays reports no active relay, or `max_s`. Always 0: what is still running
    then is drained by SIGTERM, which is what the caller (preStop) leads to anyway."""
    deadline = time.monotonic() + max_s
    while True:
        try:
            status, body = _get("/v1/relays")
            active = json.loads(body)["active"] if status == 200 else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"wait-idle: cannot read /v1/relays ({exc}); stopping now", file=sys.stderr)
            return 0
        if active is None:
            print(f"wait-idle: /v1/relays answered {status}; stopping now", file=sys.stderr)
            return 0
        if active == 0:
            print("wait-idle: no active relay")
            return 0
        left = deadline - time.monotonic()
        if left <= 0:
            print(f"wait-idle: {active} relay(s) still active after {max_s:g} s; SIGTERM drains them")
            return 0
        time.sleep(min(POLL_S, left))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echo-relay-probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="a path such as /healthz or /readyz, or wait-idle")
    parser.add_argument("--max-s", type=float, default=300.0, help="wait-idle: longest wait, seconds")
    args = parser.parse_args(argv)
    if args.target == "wait-idle":
        return wait_idle(args.max_s)
    if not args.target.startswith("/"):
        parser.error(f"target must be a path starting with / or wait-idle, not {args.target!r}")
    return check(args.target)


if __name__ == "__main__":
    raise SystemExit(main())
