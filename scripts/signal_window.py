"""How long after exec a SIGTERM still takes its default action (pipeline/signals.py, docs/reliability.md).

    python scripts/signal_window.py [--tries 5]

Starts `python -m pipeline run --config /nonexistent` (a daemon command that exits 2 at once once it runs) and
sends SIGTERM after a delay: status -15 means the signal came before pipeline/entry.py installed the early
handlers (the default action), 2 means it was caught and the run went on to its configuration error. Prints,
per delay, how many of the tries were each. The window is the interpreter's start-up; it grows with load.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DELAYS_MS = (0, 10, 20, 30, 40, 50, 60, 80, 100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=5)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    print("| delay (ms) | default action (-15) | caught (2) |\n|---|---|---|")
    for delay in DELAYS_MS:
        seen: Counter[int] = Counter()
        for _ in range(args.tries):
            proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", "--config", "/nonexistent"], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(delay / 1000)
            proc.send_signal(signal.SIGTERM)
            seen[proc.wait(60)] += 1
        print(f"| {delay} | {seen[-signal.SIGTERM]} | {seen[2]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
