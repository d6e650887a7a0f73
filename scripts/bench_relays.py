"""`scripts/bench.py --relays N[,N...]`: many relays in one `echo-relay serve` against separate `run` processes.

Every relay replays the same clean stream (bench.py's clips joined by silence) in real time, from a
file source into its own JSONL sink, exactly as a user's relays would run:

- serve: one `echo-relay serve` process; the relays are created with POST /v1/relays. Batch sizes
  come from its /metrics (echo_relay_asr_batch_size).
- processes: N `echo-relay run` processes, one relay each (the way to run N relays before `serve`).

Two start patterns: synchronised (every relay starts at once, so every utterance of every relay ends
at the same moment: the worst case) and staggered (each relay starts at a random offset in
[0, --stagger-s), seed 0). Per relay, latency and WER are measured as in bench.py (bench_measure.py `analyse`): the
last echo of a clip minus the clip's true speech end, on the relay's own stream clock. CPU is the
processes' CPU time over the wall time of the run (100 % = one core); peak RSS is the serve
process's VmHWM, or the sum of every run process's VmHWM.
"""

from __future__ import annotations

import json
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_measure
import hard_audio

START_TIMEOUT_S = 120.0
POLL_S = 0.5


@dataclass
class RelaysRun:
    system: str  # "serve" | "processes"
    mode: str  # "sync" | "staggered"
    n: int
    results: list[Any] = field(default_factory=list)  # bench_measure.Result per relay
    failed: int = 0
    cpu_pct: float = 0.0
    peak_rss_mb: float = 0.0
    batches: int = 0
    batch_mean: float = 0.0
    batch_hist: dict[str, float] = field(default_factory=dict)

    @property
    def latencies(self) -> list[float]:
        return [x for r in self.results for x in r.latencies]

    def worst_p95(self) -> float:
        return max((pct(r.latencies, 95) for r in self.results if r.latencies), default=float("nan"))

    def wers(self) -> list[float]:
        return [statistics.mean(r.wers) for r in self.results if r.wers]


def pct(values: list[float], q: float) -> float:
    """hard_audio's nearest-rank percentile, NaN for no values (a run whose relays all failed)."""
    return hard_audio.pct(values, q) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")


def offsets_for(n: int, mode: str, stagger_s: float) -> list[float]:
    if mode == "sync":
        return [0.0] * n
    rng = random.Random(0)
    return sorted(rng.uniform(0.0, stagger_s) for _ in range(n))


def cpu_seconds(pid: int) -> float:
    import psutil
    try:
        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


def run_serve(stream: Path, n: int, mode: str, work: Path, overrides: list[str], stagger_s: float
              ) -> tuple[list[list[dict[str, Any]]], RelaysRun]:
    port = free_port()
    tag = f"serve-{mode}-{n}"
    cfg = work / f"{tag}.yaml"
    bench_measure.write_overrides(cfg, [f"control.port={port}", f"serve.max_relays={max(n, 1)}",
                                "control.rate_limit_per_s=1000", f"serve.file_roots=[{json.dumps(str(work))}]",
                                *overrides])
    log = work / f"{tag}.log"
    base = f"http://127.0.0.1:{port}"
    run = RelaysRun("serve", mode, n)
    with log.open("w") as lf:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--config", str(cfg)],
                                cwd=bench_measure.REPO, stdout=lf, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited {proc.returncode}; see {log}")
                try:
                    if http("GET", base + "/readyz")[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"serve not ready after {START_TIMEOUT_S} s; see {log}")
                time.sleep(0.2)
            outs = [work / f"{tag}-{i}.jsonl" for i in range(n)]
            for o in outs:
                o.unlink(missing_ok=True)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            ids: list[str] = []
            for i, offset in enumerate(offsets_for(n, mode, stagger_s)):
                time.sleep(max(0.0, t0 + offset - time.monotonic()))
                status, body = http("POST", base + "/v1/relays", {"source": f"file:{stream}",
                                                                  "sink": f"jsonl:{outs[i]}"})
                if status != 201:
                    raise RuntimeError(f"POST /v1/relays: {status} {body}")
                ids.append(body["id"])
            while True:
                run.peak_rss_mb = max(run.peak_rss_mb, bench_measure.read_hwm(proc.pid))
                status, body = http("GET", base + "/v1/relays")
                phases = [r["phase"] for r in body["relays"]]
                if all(p in ("ended", "failed") for p in phases):
                    run.failed = phases.count("failed")
                    break
                time.sleep(POLL_S)
            run.cpu_pct = 100.0 * (cpu_seconds(proc.pid) - cpu0) / (time.monotonic() - t0)
            run.peak_rss_mb = max(run.peak_rss_mb, bench_measure.read_hwm(proc.pid))
            metrics = http("GET", base + "/metrics")[1]
            run.batches, run.batch_mean, run.batch_hist = batch_stats(str(metrics))
        finally:
            proc.terminate()
            proc.wait(60)
    return [read_jsonl(o) for o in outs], run


def batch_stats(metrics: str) -> tuple[int, float, dict[str, float]]:
    count = total = 0.0
    buckets: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("echo_relay_asr_batch_size_count"):
            count = float(line.split()[-1])
        elif line.startswith("echo_relay_asr_batch_size_sum"):
            total = float(line.split()[-1])
        elif line.startswith("echo_relay_asr_batch_size_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = float(line.split()[-1])
    return int(count), (total / count if count else 0.0), buckets


def run_processes(stream: Path, n: int, mode: str, work: Path, overrides: list[str], stagger_s: float
                  ) -> tuple[list[list[dict[str, Any]]], RelaysRun]:
    tag = f"procs-{mode}-{n}"
    cfg = work / f"{tag}.yaml"
    bench_measure.write_overrides(cfg, overrides)
    run = RelaysRun("processes", mode, n)
    outs = [work / f"{tag}-{i}.jsonl" for i in range(n)]
    procs: list[subprocess.Popen[bytes]] = []
    peaks = [0.0] * n
    cpu = [0.0] * n
    t0 = time.monotonic()
    logs = [(work / f"{tag}-{i}.log").open("w") for i in range(n)]
    try:
        for i, offset in enumerate(offsets_for(n, mode, stagger_s)):
            time.sleep(max(0.0, t0 + offset - time.monotonic()))
            outs[i].unlink(missing_ok=True)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline", "run", "--config", str(cfg), "--source", f"file:{stream}",
                 "--sink", f"jsonl:{outs[i]}", "--no-control", "--no-view"], cwd=bench_measure.REPO,
                stdout=logs[i], stderr=subprocess.STDOUT))
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() is None:
                    peaks[i] = max(peaks[i], bench_measure.read_hwm(p.pid))
                    cpu[i] = max(cpu[i], cpu_seconds(p.pid))
            time.sleep(POLL_S)
    finally:
        for f in logs:
            f.close()
    run.failed = sum(p.returncode != 0 for p in procs)
    run.cpu_pct = 100.0 * sum(cpu) / (time.monotonic() - t0)
    run.peak_rss_mb = sum(peaks)
    return [read_jsonl(o) for o in outs], run


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def bench_relays(clips: list[Any], stream: Path, work: Path, norm: Any, ns: list[int], modes: list[str],
                 process_ns: list[int], stagger_s: float, overrides: list[str]) -> list[RelaysRun]:
    runs: list[RelaysRun] = []
    for mode in modes:
        for n in ns:
            for system in ("serve", "processes"):
                if system == "processes" and n not in process_ns:
                    continue
                print(f"relays: {system} {mode} N={n} ...", file=sys.stderr)
                runner = run_serve if system == "serve" else run_processes
                records, run = runner(stream, n, mode, work, overrides, stagger_s)
                run.results = [bench_measure.analyse(f"{system}-{mode}-{n}-{i}", clips, recs, norm)
                               for i, recs in enumerate(records)]
                runs.append(run)
                print(row(run), file=sys.stderr)
    return runs


HEAD = ("| start | N | system | p50 (all relays) | p95 (all relays) | p95, worst relay | WER per relay (mean, "
        "min-max) | missing clips | CPU (100 % = 1 core) | peak RSS, all | ASR batch size (mean; calls) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|")


def row(run: RelaysRun) -> str:
    lat = run.latencies
    wers = run.wers()
    missing = sum(r.missing for r in run.results)
    wer_text = (f"{100 * statistics.mean(wers):.1f} % ({100 * min(wers):.1f}-{100 * max(wers):.1f})"
                if wers else "-")
    batch = f"{run.batch_mean:.2f}; {run.batches}" if run.system == "serve" else "-"
    failed = f" ({run.failed} failed)" if run.failed else ""
    return (f"| {run.mode} | {run.n} | {run.system}{failed} | {pct(lat, 50):.2f} s | {pct(lat, 95):.2f} s | "
            f"{run.worst_p95():.2f} s | {wer_text} | {missing} | {run.cpu_pct:.0f} % | {run.peak_rss_mb:.0f} MB | "
            f"{batch} |")


def report(runs: list[RelaysRun], n_clips: int, stream_s: float, stagger_s: float) -> str:
    lines = [f"Every relay replays the clean stream ({n_clips} LibriSpeech clips, {stream_s:.0f} s) in real time; "
             f"staggered starts are uniform in [0, {stagger_s:g} s), seed 0.", "", HEAD]
    lines += [row(r) for r in runs]
    return "\n".join(lines)
