"""/metrics follows Prometheus's conventions, checked on the real output of a running relay (`echo-relay run`)
and of `echo-relay serve` with two relays: `promtool check metrics` (Debian's prometheus package, installed by
scripts/install.sh --dev) finds no problem, the process series appear exactly once, no `_created` samples,
`echo_relay_build_info`, known label sets present at 0 from the start, and every metric the Grafana dashboard
(deploy/grafana/echo-relay.json) queries exists.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.daily_room import ROOM_EVENT_TYPES
from pipeline.metrics import DROP_REASONS, Metrics

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
CLIP = TESTS / "data" / "speech" / "deepspeech-examples" / "2830-3980-0043.wav"  # "Experience proves this."
DASHBOARD = REPO / "deploy" / "grafana" / "echo-relay.json"
START_TIMEOUT_S = 90.0
EXIT_TIMEOUT_S = 30.0
LOOP_SILENCE_S = 8
# Families prometheus_client's process, platform and GC collectors give (pipeline/metrics.py ProcessSeries).
PROCESS_FAMILIES = ("process_resident_memory_bytes", "process_cpu_seconds", "process_start_time_seconds",
                    "process_open_fds", "python_info", "python_gc_objects_collected")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_relay() -> list[str]:
    script = Path(sys.executable).parent / "echo-relay"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pipeline"]


def promtool_check(text: str) -> tuple[int, str]:
    """`promtool check metrics` on `text`: (exit status, what it printed). Missing promtool fails the test:
    scripts/install.sh --dev installs it (Debian's prometheus package)."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: scripts/install.sh --dev installs it (apt-get install prometheus)"
    r = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


class Process:
    """An echo-relay subprocess with a control API on 127.0.0.1."""

    def __init__(self, args: list[str], tmp: Path) -> None:
        self.port = free_port()
        self.err = tmp / "stderr.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("ECHO_RELAY_CONFIG", None)
        with self.err.open("wb") as fh:
            self.proc = subprocess.Popen([*echo_relay(), *args, "--control-port", str(self.port)], cwd=tmp, env=env,
                                         stdout=subprocess.DEVNULL, stderr=fh)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def logs(self) -> str:
        return self.err.read_text(encoding="utf-8", errors="replace")[-4000:]

    def wait(self, what: str, ok: Callable[[], bool], timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"echo-relay exited ({self.proc.returncode}):\n{self.logs()}"
            try:
                if ok():
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"{what} within {timeout} s:\n{self.logs()}"
            time.sleep(0.2)

    def metrics(self) -> str:
        r = self.client.get("/metrics")
        assert r.status_code == 200, r.text
        return r.text

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"no exit within {EXIT_TIMEOUT_S} s of SIGTERM:\n{self.logs()}") from None
        assert rc == 0, f"exit status {rc}:\n{self.logs()}"


def value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()))


def sample_names(text: str) -> set[str]:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.fixture(scope="module")
def run_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """/metrics of `echo-relay run` relaying a looped clip, once it has delivered an echo."""
    tmp = tmp_path_factory.mktemp("run")
    track = tmp / "track.wav"  # the clip, then silence: one utterance per loop, however slow a shared CPU is
    with wave.open(str(CLIP), "rb") as w:
        params, frames = w.getparams(), w.readframes(w.getnframes())
    with wave.open(str(track), "wb") as w:
        w.setparams(params)
        w.writeframes(frames + bytes(params.sampwidth * params.nchannels * params.framerate * LOOP_SILENCE_S))
    relay = Process(["run", "--source", f"file:{track}", "--loop", "--sink", f"jsonl:{tmp / 'out.jsonl'}"], tmp)
    try:
        relay.wait("an echo delivered",
                   lambda: value(relay.metrics(), "echo_relay_echoes_sent_total", {"source": "speech"}) >= 1)
        yield relay.metrics()
    finally:
        relay.stop()


@pytest.fixture(scope="module")
def serve_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    """/metrics of `echo-relay serve` after two relays each relayed the clip; and their ids."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tmp / "cfg.yaml"
    cfg.write_text(f"serve:\n  file_roots: [{json.dumps(str(CLIP.parent))}, {json.dumps(str(tmp))}]\n"
                   "source:\n  file:\n    speed: 4\n", encoding="utf-8")
    serve = Process(["serve", "-c", str(cfg)], tmp)
    try:
        serve.wait("/readyz 200", lambda: serve.client.get("/readyz").status_code == 200)
        ids = []
        for i in range(2):  # the first with a secondary sink (echo_relay_secondary_failures_total{sink})
            also = {"config": {"sink": {"also": [f"jsonl:{tmp / 'copy.jsonl'}"]}}} if i == 0 else {}
            r = serve.client.post("/v1/relays", json={"source": f"file:{CLIP}", "sink": f"jsonl:{tmp / f'{i}.jsonl'}",
                                                      **also})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        serve.wait("both relays ended", lambda: all(
            serve.client.get(f"/v1/relays/{rid}").json()["phase"] in ("ended", "failed") for rid in ids))
        yield serve.metrics(), ids
    finally:
        serve.stop()


def assert_conventions(text: str) -> None:
    rc, out = promtool_check(text)
    assert rc == 0 and out.strip() == "", out
    assert "_created" not in text  # no creation-time samples, as gauges or otherwise
    for family in PROCESS_FAMILIES:  # the process's series once, never per relay
        assert text.count(f"# TYPE {family}") == 1, family
    [build] = [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == "echo_relay_build_info"]
    assert build.value == 1 and build.labels["version"] and build.labels["python_version"]
    assert build.labels["asr_engine"] == "faster-whisper" and "tiny" in build.labels["asr_model"], build.labels
    assert value(text, "process_resident_memory_bytes") > 10e6
    assert "echo_relay_audio_input_dbfs" not in text


def test_run_metrics_pass_promtool_and_conventions(run_metrics: str) -> None:
    text = run_metrics
    assert_conventions(text)
    names = sample_names(text)
    assert "relay=" not in text  # `run` has one relay: no relay label
    # known label sets from the start: every drop reason at 0 (or counted)
    drops = {(s.labels["stage"], s.labels["reason"]) for f in text_string_to_metric_families(text)
             for s in f.samples if s.name == "echo_relay_dropped_total"}
    assert {(stage, r) for stage, reasons in DROP_REASONS.items() for r in reasons} <= drops
    assert {("transform", "dropped_by:filler_words"), ("transform_step", "timeout:whitespace")} <= drops, drops
    assert value(text, "echo_relay_dropped_total", {"stage": "asr", "reason": "phantom"}) == 0
    room = {s.labels["event_type"] for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "echo_relay_room_events_total"}
    assert room == {*ROOM_EVENT_TYPES, "other"}
    for reason in ("silence", "sentence_end", "max_length", "end_of_stream"):
        assert f'echo_relay_utterances_total{{reason="{reason}"}}' in text
    assert 'echo_relay_echoes_sent_total{source="api"} 0.0' in text
    # the transform steps are timed under their own names; the chain as the transform stage
    assert value(text, "echo_relay_transform_step_latency_seconds_count", {"step": "filler_words"}) >= 1
    assert value(text, "echo_relay_stage_latency_seconds_count", {"stage": "transform"}) >= 1
    # the input level is a 0..1 ratio of full scale
    assert "echo_relay_audio_input_level_ratio" in names
    assert 0 <= value(text, "echo_relay_audio_input_level_ratio") <= 1


def test_serve_metrics_pass_promtool_and_show_the_process_once(serve_metrics: tuple[str, list[str]]) -> None:
    text, ids = serve_metrics
    assert_conventions(text)
    relays = {s.labels.get("relay") for f in text_string_to_metric_families(text) for s in f.samples}
    assert set(ids) <= relays
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("process_", "python_")) or family.name == "echo_relay_build_info":
            assert all("relay" not in s.labels for s in family.samples), family.name
    for rid in ids:  # each relay's label sets from the start
        assert value(text, "echo_relay_dropped_total", {"relay": rid, "stage": "vad", "reason": "too_short"}) >= 0
        assert f'echo_relay_dropped_total{{reason="too_short",relay="{rid}",stage="vad"}}' in text
    assert value(text, "echo_relay_relays", {"phase": "ended"}) == 2
    assert 'echo_relay_asr_requests_total{kind="interim",outcome="failed"} 0.0' in text


def dashboard_metrics() -> set[str]:
    """Every metric name the dashboard's queries (panels and template variables) use."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    assert len(exprs) >= 20
    names = set()
    for expr in exprs:
        names |= set(re.findall(r"\b(?:echo_relay|process|python)_[a-z0-9_]+\b", expr))
    return names


def test_every_metric_the_dashboard_queries_exists(serve_metrics: tuple[str, list[str]]) -> None:
    text, _ = serve_metrics
    names = dashboard_metrics()
    missing = names - sample_names(text)
    assert not missing, f"the dashboard queries metrics /metrics does not have: {sorted(missing)}"
    # what the issue asks the dashboard to show
    for wanted in ("echo_relay_end_of_speech_to_sent_seconds_bucket", "echo_relay_echoes_sent_total",
                   "echo_relay_dropped_total", "echo_relay_unheard_speech_seconds_total", "echo_relay_relays",
                   "echo_relay_asr_batch_size_bucket", "echo_relay_asr_wait_seconds_bucket",
                   "process_resident_memory_bytes", "process_cpu_seconds_total"):
        assert wanted in names, wanted


def test_render_leaves_out_created_samples_without_global_state() -> None:
    """A library user's own prometheus_client metrics keep their `_created` samples: only what
    Metrics.render() shows leaves them out."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    m = Metrics()
    m.utterances.labels(reason="silence").inc()
    assert b"_created" not in m.render()
    own = CollectorRegistry()
    Counter("users_counter", "a library user's counter", registry=own).inc()
    assert b"users_counter_created" in generate_latest(own)
