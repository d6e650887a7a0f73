"""Prometheus metrics of one relay: every counter the stages move lives here, in one registry.

Each relay owns a `Metrics` (its own CollectorRegistry), so tests can run several relays in one
process and read exact values. Stages receive the `Metrics` object and never create metrics.

Conventions (https://prometheus.io/docs/practices/naming/; `promtool check metrics` passes, see
tests/test_metrics_conventions.py):
- base units in the name (`_seconds`, `_ratio` for 0..1 fractions), counters end in `_total`;
- label values come from fixed sets (a remote peer's event types outside the protocol are "other"), and
  the known combinations exist at 0 from the start (`DROP_REASONS`, `init_labels`), so a rate() over
  them works before the first event;
- what /metrics shows (`render`) adds the once-per-process series (`ProcessSeries`: process_*,
  python_info, python_gc_*, echo_relay_build_info) and leaves out prometheus_client's `_created`
  samples: a scrape is the same for library users without touching prometheus_client's global state.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import get_args

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from pipeline import __version__
from pipeline.daily_room import OTHER_EVENT, ROOM_EVENT_TYPES
from pipeline.frames import DecodeKind, EndReason, GateReason
from pipeline.language import ChangeReason

# ASR batch sizes (pipeline/asr/scheduler.py: asr.batch.max_size is at most 64).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Latency buckets (seconds) chosen around the targets: p50 <= 0.5 s, p95 <= 0.8 s end-of-speech to echo.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)

# Every (stage, reason) of echo_relay_dropped_total but the transform chain's (those name a configured
# step: `TransformChain` adds them), each at 0 from the start.
DROP_REASONS: dict[str, tuple[str, ...]] = {
    "source": ("queue_full",),  # pipeline/source/mic.py, daily.py: the capture queue was full
    "vad": ("too_short",),  # pipeline/vad/segmenter.py `Discarded`
    "asr": ("deadline", "error", *get_args(GateReason)),  # pipeline/delivery.py; the hallucination gate
    "delivery": ("unsettled", "interrupted"),  # pipeline/delivery.py (`INTERRUPTED`)
}
STAGES = ("asr", "transform", "sink")  # echo_relay_stage_latency_seconds{stage}
SPECULATIVE_OUTCOMES = ("early", "reused", "committed", "discarded")  # pipeline/speculation.py
TURN_RULES = ("turn", "unfinished", "graded")  # pipeline/turn/rule.py's `Rule`: what decided a pause's wait
ECHO_SOURCES = ("speech", "api")  # pipeline/delivery.py `Origin`
QUEUES = ("source", "delivery")
ASR_OUTCOMES = ("decoded", "failed", "cancelled", "discarded")  # pipeline/asr/scheduler.py
VIDEO_FRAME_OUTCOMES = ("analyzed", "skipped")  # pipeline/perception/video.py
REFUSALS = ("capacity", "invalid", "shutting_down")  # pipeline/serve.py RelayPool.create


def init_labels(metric: MetricWrapperBase, **values: Sequence[str]) -> None:
    """Create `metric`'s child for every combination of the given label values (counters at 0, histograms
    empty), so its series exist before the first event."""
    combos: list[dict[str, str]] = [{}]
    for name, options in values.items():
        combos = [{**c, name: v} for c in combos for v in options]
    for labels in combos:
        metric.labels(**labels)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        p = "echo_relay_"
        self.utterances = Counter(p + "utterances", "utterances closed by the VAD", ["reason"], registry=r)
        self.echoes_sent = Counter(p + "echoes_sent", "conversation.echo messages delivered", ["source"],
                                   registry=r)
        self.interrupts_sent = Counter(p + "interrupts_sent", "conversation.interrupt messages delivered",
                                       registry=r)
        self.dropped = Counter(p + "dropped", "items dropped, by stage and reason", ["stage", "reason"],
                               registry=r)
        self.send_retries = Counter(p + "send_retries", "failed sends that were retried", registry=r)
        self.send_failures = Counter(p + "send_failures", "messages given up on (undeliverable)", registry=r)
        self.secondary_failures = Counter(p + "secondary_failures", "messages a secondary sink (sink.also) did not "
                                          "write: send failed, queue full, could not start, drain time out",
                                          ["sink"], registry=r)
        self.room_events = Counter(p + "room_events", "app-messages received from the room", ["event_type"],
                                   registry=r)
        self.unheard_regions = Counter(p + "unheard_speech_regions", "speech-like audio that never became an "
                                       "utterance (VAD probability >= vad.unheard_threshold)", registry=r)
        self.unheard_seconds = Counter(p + "unheard_speech_seconds", "seconds of speech-like audio in those regions",
                                       registry=r)
        self.uncovered_utterances = Counter(p + "uncovered_speech_utterances", "utterances whose decode left part of "
                                            "their speech out, after the second pass (pipeline/asr/coverage.py)",
                                            registry=r)
        self.uncovered_seconds = Counter(p + "uncovered_speech_seconds", "seconds of speech those decodes left out",
                                         registry=r)
        self.audio_overflows = Counter(p + "audio_overflows", "input overflows reported by the device", registry=r)
        self.audio_reopens = Counter(p + "audio_reopens", "times the input device was reopened", registry=r)
        self.speculative = Counter(p + "speculative_decodes", "speculative decodes, by outcome", ["outcome"],
                                   registry=r)
        self.turn_decisions = Counter(p + "turn_decisions", "pauses judged by the endpointer, by what decided the "
                                      "wait (turn: the turn-end rule; unfinished: a trailing function word; "
                                      "graded: the graded policy)", ["rule"], registry=r)
        self.stage_latency = Histogram(p + "stage_latency_seconds", "time spent per stage and utterance (transform: "
                                       "the whole chain)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.transform_step_latency = Histogram(p + "transform_step_latency_seconds", "time spent per transform "
                                                "step call", ["step"], buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_sent = Histogram(p + "end_of_speech_to_sent_seconds",
                                     "VAD speech end to message handed to the sink", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "items waiting, by queue", ["queue"], registry=r)
        # A ratio, not dBFS: Prometheus names carry base units, and a 0..1 fraction is `_ratio`
        # (dBFS = 20 * log10(ratio); digital silence is 0).
        self.input_level = Gauge(p + "audio_input_level_ratio", "RMS level of the latest input frame as a fraction "
                                 "of full scale (0..1), updated 10 times a second", registry=r)
        self.control_requests = Counter(p + "control_requests", "control API requests by endpoint and status",
                                        ["endpoint", "status"], registry=r)
        self.events_dropped = Counter(p + "events_dropped", "event-stream events a slow subscriber lost "
                                      "(its buffer was full; the relay never waits)", registry=r)
        self.partial_decodes = Counter(p + "partial_decodes", "interim decodes for watchers (event stream)",
                                       registry=r)
        self.model_loaded = Gauge(p + "model_loaded", "1 once the ASR model is loaded and warm", registry=r)

        # pipeline/perception/stage.py: one outcome per analyzer call (`OUTCOMES`, pipeline/perception/calls.py;
        # analyzer = its configured name), and what became of the camera frames the video analyzers were offered.
        self.perception_calls = Counter(p + "perception_calls", "analyzer calls by analyzer and outcome",
                                        ["analyzer", "outcome"], registry=r)
        self.perception_latency = Histogram(p + "perception_latency_seconds", "analyzer call duration (ok, none "
                                            "and late outcomes)", ["analyzer"], buckets=LATENCY_BUCKETS, registry=r)
        self.video_frames = Counter(p + "video_frames", "camera frames handed to the video analyzers (analyzed) or "
                                    "replaced by a newer one while they were busy (skipped)", ["outcome"], registry=r)
        # The conversation's language (pipeline/language.py); `language` label values are Whisper's codes
        # (pipeline/langcodes.py, a fixed set), "unknown" when the engine names none, "other" for another name.
        self.language_changes = Counter(p + "language_changes", "the conversation's language locked or switched",
                                        ["reason"], registry=r)
        self.utterances_by_language = Counter(p + "utterances_by_language", "transcribed utterances by the "
                                              "language of their text", ["language"], registry=r)

        self.asr = AsrSchedulingMetrics(r)  # `run`: this relay's own scheduler
        self.process = ProcessSeries()  # on /metrics only (`render`): under `serve` the process shows it once

        init_labels(self.utterances, reason=get_args(EndReason))
        init_labels(self.echoes_sent, source=ECHO_SOURCES)
        for stage, reasons in DROP_REASONS.items():
            init_labels(self.dropped, stage=[stage], reason=reasons)
        init_labels(self.speculative, outcome=SPECULATIVE_OUTCOMES)
        init_labels(self.turn_decisions, rule=TURN_RULES)
        init_labels(self.stage_latency, stage=STAGES)
        init_labels(self.queue_depth, queue=QUEUES)
        init_labels(self.video_frames, outcome=VIDEO_FRAME_OUTCOMES)
        init_labels(self.room_events, event_type=(*ROOM_EVENT_TYPES, OTHER_EVENT))
        init_labels(self.language_changes, reason=get_args(ChangeReason))

    def drop(self, stage: str, reason: str) -> None:
        self.dropped.labels(stage=stage, reason=reason).inc()

    def render(self) -> bytes:
        """The /metrics text of `run`: this relay's series and the process's."""
        return generate_latest(Exposition(self.registry, self.process))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (e.g. 'echo_relay_dropped_total'); 0 when absent. For tests/status."""
        v = self.registry.get_sample_value(name, labels or {})
        return float(v) if v is not None else 0.0



class AsrSchedulingMetrics:
    """The ASR scheduler's metrics (pipeline/asr/scheduler.py): in a relay's registry under `run`, in the
    process's under `serve`, where one scheduler serves every relay."""

    def __init__(self, registry: CollectorRegistry) -> None:
        p = "echo_relay_"
        self.batch_size = Histogram(p + "asr_batch_size", "utterances decoded together per ASR call",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.wait = Histogram(p + "asr_wait_seconds", "time a decode request waited for the ASR engine, by kind",
                              ["kind"], buckets=LATENCY_BUCKETS, registry=registry)
        self.requests = Counter(p + "asr_requests", "ASR decode requests by kind and outcome (decoded, failed, "
                                "cancelled before decoding, discarded after)", ["kind", "outcome"], registry=registry)
        init_labels(self.wait, kind=get_args(DecodeKind))
        init_labels(self.requests, kind=get_args(DecodeKind), outcome=ASR_OUTCOMES)


class ServeMetrics:
    """`echo-relay serve`'s /metrics: the process's own series (control API, the shared ASR scheduler,
    relays by phase, refusals) and every relay's series with a `relay` label (`RelaysCollector`)."""

    def __init__(self, relays: Callable[[], Mapping[str, Metrics]]) -> None:
        r = self.registry = CollectorRegistry()
        p = "echo_relay_"
        self.control_requests = Counter(p + "control_requests", "control API requests by endpoint and status",
                                        ["endpoint", "status"], registry=r)
        self.model_loaded = Gauge(p + "model_loaded", "1 once the ASR model is loaded and warm", registry=r)
        self.relays = Gauge(p + "relays", "relays by phase", ["phase"], registry=r)
        self.relays_refused = Counter(p + "relays_refused", "POST /v1/relays refused, by reason", ["reason"],
                                      registry=r)
        init_labels(self.relays_refused, reason=REFUSALS)
        self.asr = AsrSchedulingMetrics(r)
        self.process = ProcessSeries()
        own = {family.name for family in r.collect()}
        r.register(RelaysCollector(relays, exclude=own))

    def render(self) -> bytes:
        """The /metrics text of `serve`: the process's series once, every relay's with its `relay` label."""
        return generate_latest(Exposition(self.registry, self.process))

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        v = self.registry.get_sample_value(name, labels or {})
        return float(v) if v is not None else 0.0


class RelaysCollector(Collector):
    """Every relay's registry as one set of metric families, each sample labelled with its relay's id.
    Families the process reports itself (`exclude`: control requests, model state) are left out."""

    def __init__(self, relays: Callable[[], Mapping[str, Metrics]], exclude: Iterable[str] = ()) -> None:
        self._relays = relays
        self._exclude = frozenset(exclude)

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        for relay_id, metrics in self._relays().items():
            for family in metrics.registry.collect():
                if family.name in self._exclude:
                    continue
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                merged.samples.extend(Sample(s.name, {"relay": relay_id, **s.labels}, s.value, s.timestamp,
                                             s.exemplar) for s in family.samples)
        return list(families.values())


class ProcessSeries(Collector):
    """The series a process has once, whatever number of relays it runs: prometheus_client's process
    collector (memory, CPU seconds, start time, open and max fds; Linux), platform collector (python_info),
    GC collector, and `echo_relay_build_info` (1, labelled with the version, the Python version and the
    ASR engine and model, `describe_asr`)."""

    def __init__(self) -> None:
        self.asr_engine = ""
        self.asr_model = ""

    def describe_asr(self, engine: str, model: str) -> None:
        self.asr_engine, self.asr_model = engine, model

    def collect(self) -> Iterable[Metric]:
        # The default registry's instances: each collects afresh on every call, registry or not.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            yield from collector.collect()
        info = GaugeMetricFamily("echo_relay_build_info", "always 1; the labels describe this echo-relay",
                                 labels=["version", "python_version", "asr_engine", "asr_model"])
        info.add_metric([__version__, platform.python_version(), self.asr_engine, self.asr_model], 1)
        yield info


class Exposition(Collector):
    """What /metrics shows: every family of `sources`, without prometheus_client's `_created` samples
    (creation timestamps as separate gauges: noise for dashboards, and the same for library users as
    for the CLI, without `prometheus_client.disable_created_metrics()`, which is process-wide)."""

    def __init__(self, *sources: Collector) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        for source in self._sources:
            for family in source.collect():
                created = family.name + "_created"
                if any(s.name == created for s in family.samples):
                    trimmed = Metric(family.name, family.documentation, family.type, family.unit)
                    trimmed.samples = [s for s in family.samples if s.name != created]
                    family = trimmed
                yield family


ControlMetrics = Metrics | ServeMetrics  # what the control API counts its requests in (`run`, `serve`)
