"""Prometheus metrics of one relay: every counter the stages move lives here, in one registry.

Each relay owns a `Metrics` (its own CollectorRegistry), so tests can run several relays in one
process and read exact values. Stages receive the `Metrics` object and never create metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

# ASR batch sizes (pipeline/asr/scheduler.py: asr.batch.max_size is at most 64).
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Latency buckets (seconds) chosen around the targets: p50 <= 0.5 s, p95 <= 0.8 s end-of-speech to echo.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


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
        self.audio_overflows = Counter(p + "audio_overflows", "input overflows reported by the device", registry=r)
        self.audio_reopens = Counter(p + "audio_reopens", "times the input device was reopened", registry=r)
        self.speculative = Counter(p + "speculative_decodes", "speculative decodes, by outcome", ["outcome"],
                                   registry=r)
        self.stage_latency = Histogram(p + "stage_latency_seconds", "time spent per stage", ["stage"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_sent = Histogram(p + "end_of_speech_to_sent_seconds",
                                     "VAD speech end to message handed to the sink", buckets=LATENCY_BUCKETS,
                                     registry=r)
        self.queue_depth = Gauge(p + "queue_depth", "items waiting, by queue", ["queue"], registry=r)
        self.input_level = Gauge(p + "audio_input_dbfs", "input level of the last block (dBFS)", registry=r)
        self.control_requests = Counter(p + "control_requests", "control API requests by endpoint and status",
                                        ["endpoint", "status"], registry=r)
        self.events_dropped = Counter(p + "events_dropped", "event-stream events a slow subscriber lost "
                                      "(its buffer was full; the relay never waits)", registry=r)
        self.partial_decodes = Counter(p + "partial_decodes", "interim decodes for watchers (event stream)",
                                       registry=r)
        self.model_loaded = Gauge(p + "model_loaded", "1 once the ASR model is loaded and warm", registry=r)

        self.asr = AsrSchedulingMetrics(r)  # `run`: this relay's own scheduler

    def drop(self, stage: str, reason: str) -> None:
        self.dropped.labels(stage=stage, reason=reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

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
        self.asr = AsrSchedulingMetrics(r)
        own = {family.name for family in r.collect()}
        r.register(RelaysCollector(relays, exclude=own))

    def render(self) -> bytes:
        return generate_latest(self.registry)

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


ControlMetrics = Metrics | ServeMetrics  # what the control API counts its requests in (`run`, `serve`)
