"""Prometheus metrics of one app, in its own CollectorRegistry (several apps in one process never clash).

Three sources: the request middleware (server/telemetry.py) reports each inference request; the engine reports
loads, evictions and batches as an `EngineObserver`; gauges (loaded adapters, queue depth, merged adapter) are
read from the engine at scrape time. Adapter labels are bounded by the adapters alive: a request for a name the
registry does not know is counted under `UNKNOWN_LABEL`, one for the base model under `BASE_LABEL`; a deleted
adapter's series leave with it (`forget`), and whatever is reported of it afterwards (a request that was in flight,
the eviction of its slot) counts under `UNKNOWN_LABEL`. Every per-request mixture counts under `MIXTURE_LABEL`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import Engine
from .types import MIXTURE_PREFIX

BASE_LABEL = "__base__"
UNKNOWN_LABEL = "__unknown__"
MIXTURE_LABEL = "__mixture__"  # every per-request mixture (its name holds weights: unbounded as a label)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self, engine: Callable[[], Engine | None], alive: Callable[[str], bool] = lambda _name: True):
        self._alive = alive  # whether an adapter is in the store: only then may its name label series
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraswap_requests", "Inference requests by adapter and HTTP status.", ["adapter", "status"], registry=r
        )
        self.latency = Histogram(
            "loraswap_request_duration_seconds",
            "Inference request latency, to the last byte of a streamed answer.",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "loraswap_rejected_requests", "Inference requests refused by admission control (429).", ["adapter"],
            registry=r,
        )
        self.tokens_in = Counter("loraswap_input_tokens", "Prompt tokens read.", ["adapter"], registry=r)
        self.tokens_out = Counter("loraswap_output_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.load_seconds = Histogram(
            "loraswap_adapter_load_seconds",
            "Time to read, check and install an adapter into a slot.",
            ["adapter"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.evictions = Counter(
            "loraswap_adapter_evictions", "Adapters evicted from memory to make room.", ["adapter"], registry=r
        )
        self.batch_size = Histogram(
            "loraswap_batch_size", "Rows in each forward (classification, prefill or decode step).", buckets=BATCH_BUCKETS, registry=r
        )
        r.register(_EngineGauges(engine))

    def _label(self, adapter: str) -> str:
        if adapter in (BASE_LABEL, UNKNOWN_LABEL, MIXTURE_LABEL) or adapter.startswith(MIXTURE_PREFIX):
            return slot_label(adapter)
        return adapter if self._alive(adapter) else UNKNOWN_LABEL

    def forget(self, adapter: str) -> None:
        """A deleted adapter's series leave /metrics."""
        for metric in (self.requests, self.latency, self.rejected, self.tokens_in, self.tokens_out,
                       self.load_seconds, self.evictions):
            metric.remove_by_labels({"adapter": adapter})

    def observe_request(self, adapter: str, status: int, seconds: float, tokens_in: int, tokens_out: int) -> None:
        adapter = self._label(adapter)
        self.requests.labels(adapter, str(status)).inc()
        if status == 429:
            self.rejected.labels(adapter).inc()
        self.latency.labels(adapter).observe(seconds)
        self.tokens_in.labels(adapter).inc(tokens_in)
        self.tokens_out.labels(adapter).inc(tokens_out)

    # EngineObserver
    def adapter_loaded(self, name: str, seconds: float) -> None:
        self.load_seconds.labels(self._label(name)).observe(seconds)

    def adapter_evicted(self, name: str) -> None:
        self.evictions.labels(self._label(name)).inc()

    def batch_ran(self, rows: int) -> None:
        self.batch_size.observe(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def slot_label(name: str) -> str:
    """The metric label of what a slot holds: an adapter's name, or MIXTURE_LABEL for any mixture."""
    return MIXTURE_LABEL if name.startswith(MIXTURE_PREFIX) else name


class _EngineGauges(Collector):
    """Engine state read at scrape time; absent while the base model loads."""

    def __init__(self, engine: Callable[[], Engine | None]):
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        engine = self._engine()
        if engine is None:
            return
        yield GaugeMetricFamily("loraswap_loaded_adapters", "Adapters and mixtures in memory.",
                                value=len(engine.loaded()))
        kinds = GaugeMetricFamily("loraswap_loaded_adapters_by_kind",
                                  "Slots in memory by what they hold: lora, dora or mixture.", labels=["kind"])
        loaded = engine.loaded_kinds()
        for kind in ("lora", "dora", "mixture"):
            kinds.add_metric([kind], loaded[kind])
        yield kinds
        yield GaugeMetricFamily(
            "loraswap_queue_depth", "Requests waiting for the engine thread.", value=engine.queue_depth
        )
        admission = engine.admission
        yield GaugeMetricFamily(
            "loraswap_admitted_rows", "Rows of admitted requests (queued or decoding).", value=admission.rows
        )
        yield GaugeMetricFamily(
            "loraswap_admitted_tokens", "Tokens admitted requests may hold (prompts plus max_new_tokens).",
            value=admission.tokens,
        )
        yield GaugeMetricFamily(
            "loraswap_decoding_rows", "Generation rows in the decode batch now.", value=engine.runner.decoding
        )
        merged = GaugeMetricFamily(
            "loraswap_merged_adapter", "1 for the adapter merged into the base weights, if any.", labels=["adapter"]
        )
        if engine.merged_adapter is not None:
            merged.add_metric([slot_label(engine.merged_adapter)], 1)
        yield merged
