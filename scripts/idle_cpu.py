#!/usr/bin/env python
"""CPU of `echo-relay run` during silence, for several configurations side by side (bench.py's method:
process CPU seconds over --seconds of digital silence, or of white noise at --noise-dbfs, after 10 s of
start-up).

    .venv/bin/python scripts/idle_cpu.py                                   # the default config
    .venv/bin/python scripts/idle_cpu.py --repeat 2 "source.idle_block_ms=0,source.block_ms=20" \
        "source.idle_block_ms=0" "source.idle_block_ms=64" ""

Each argument is one configuration: comma-separated dotted overrides ("" = the defaults). Runs are
interleaved (A B C, A B C, ...) so a change in the machine's load hits every configuration alike.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import cpu_during_silence  # the benchmark's own measurement


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=[""], help="comma-separated dotted overrides per configuration")
    ap.add_argument("--seconds", type=float, default=20.0, help="silence measured per run")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration")
    ap.add_argument("--noise-dbfs", type=float, help="white noise at this level instead of digital silence")
    args = ap.parse_args()
    results: dict[str, list[float]] = {c: [] for c in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeat):
            for config in args.configs:
                overrides = [kv for kv in config.split(",") if kv]
                pct = cpu_during_silence(overrides, Path(tmp), seconds=args.seconds, noise_dbfs=args.noise_dbfs)
                results[config].append(pct)
                print(f"{config or 'defaults'}: {pct:.2f} %", file=sys.stderr)
    print("| configuration | CPU in silence (% of one core), each run |\n|---|---|")
    for config, values in results.items():
        print(f"| {config or 'defaults'} | {', '.join(f'{v:.2f}' for v in values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
