"""Prometheus metrics of one server, in a registry of its own (several apps in one process do not mix).

Request counts, tokens and latencies are labelled by the adapter a request ran (its name, a
composition's NAME:WEIGHT label, or the base's name). Adapter residency and the batching engine's
queue are read from the runtime at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds; decode steps of small models are milliseconds, prefills of long prompts seconds
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


class RuntimeCollector:
    """What the runtime knows, read when Prometheus scrapes: adapter memory, loads, evictions, the engine's queue
    (a model opened with ``batching=False`` has no engine)."""

    def __init__(self, model):
        self.model = model

    def collect(self):
        stats = self.model.stats()
        yield GaugeMetricFamily("edgelora_adapter_resident_bytes", "Bytes of resident adapters and compositions",
                                value=stats["resident_bytes"])
        yield GaugeMetricFamily("edgelora_adapters_resident", "Resident adapters and compositions",
                                value=len(stats["resident"]))
        yield CounterMetricFamily("edgelora_adapter_loads", "Adapter loads (registry misses)", value=stats["misses"])
        yield CounterMetricFamily("edgelora_adapter_hits", "Requests that found their adapter resident",
                                  value=stats["hits"])
        yield CounterMetricFamily("edgelora_adapter_evictions", "Adapters evicted to stay in the memory budget",
                                  value=stats["evictions"])
        engine = self.model.engine
        if engine is not None:
            engine_stats = engine.stats()
            yield GaugeMetricFamily("edgelora_queue_depth", "Requests waiting for a batch row",
                                    value=engine_stats["queue_depth"])
            yield GaugeMetricFamily("edgelora_batch_size", "Rows in the engine's current decode step",
                                    value=engine_stats["batch_size"])
            yield CounterMetricFamily("edgelora_decode_steps", "The engine's decode steps",
                                      value=engine_stats["steps"])
            yield CounterMetricFamily("edgelora_rows_stepped", "Rows over all decode steps (divided by the steps: "
                                      "the mean batch)", value=engine_stats["rows_stepped"])


class Metrics:
    def __init__(self, model):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgelora_requests", "Requests by endpoint, adapter and status",
                                ["endpoint", "adapter", "status"], registry=r)
        self.prompt_tokens = Counter("edgelora_prompt_tokens", "Prompt tokens", ["adapter"], registry=r)
        self.completion_tokens = Counter("edgelora_completion_tokens", "Generated tokens", ["adapter"], registry=r)
        self.ttft = Histogram("edgelora_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["adapter"], buckets=TTFT_BUCKETS, registry=r)
        self.per_token = Histogram("edgelora_time_per_output_token_seconds",
                                   "Mean time per generated token after the first, per request", ["adapter"],
                                   buckets=TOKEN_BUCKETS, registry=r)
        self.in_flight = Gauge("edgelora_requests_in_flight", "Generation and embedding requests being served",
                               registry=r)
        r.register(RuntimeCollector(model))

    def render(self) -> bytes:
        return generate_latest(self.registry)
