"""GET /metrics: the engine's counters, gauges and latency histograms (`EngineMetrics.snapshot()`) as
Prometheus text, through a prometheus_client collector read at each scrape. Every name starts with
`codellama_rt_`."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PREFIX = "codellama_rt"
# snapshot counter -> help (Prometheus adds _total to each counter's name)
COUNTERS = {
    "requests": "Requests submitted to the engine",
    "rejected": "Requests refused because the queue was full (HTTP 429)",
    "failed": "Requests that ended with an error",
    "cancelled": "Requests cancelled before they finished (e.g. the client went away)",
    "prompt_tokens": "Prompt tokens of admitted requests",
    "prefilled_tokens": "Prompt tokens computed by prefill",
    "prefix_reused_tokens": "Prompt tokens whose K/V were reused from the cache instead of prefilled",
    "generated_tokens": "Tokens generated",
    "decode_steps": "Batched decode steps run",
    "verify_steps": "Speculative verify passes run (in place of decode steps)",
    "speculative_proposed_tokens": "Ids proposed to verify passes (prompt lookup or the draft model)",
    "speculative_accepted_tokens": "Proposed ids accepted (over verify_steps: the mean acceptance length)",
}
GAUGES = {
    "waiting": ("requests_waiting", "Requests queued for a slot (queue depth)"),
    "running": ("requests_running", "Slots running a request"),
    "slots": ("slots", "KV cache slots (the most requests decoding at once)"),
}
HISTOGRAMS = {
    "ttft": ("time_to_first_token_seconds", "Submission to first generated token"),
    "token_latency": ("time_per_output_token_seconds", "Time between consecutive generated tokens"),
}


class EngineCollector:
    """A prometheus_client collector over one engine's `metrics.snapshot()`."""

    def __init__(self, metrics):
        self.metrics = metrics

    def collect(self):
        snap = self.metrics.snapshot()
        for name, doc in COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=snap[name])
        finished = CounterMetricFamily(f"{PREFIX}_finished", "Requests finished, by finish reason",
                                       labels=["reason"])
        for reason, n in sorted(snap["finished"].items()):
            finished.add_metric([reason], n)
        yield finished
        for key, (name, doc) in GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=snap[key])
        for key, (name, doc) in HISTOGRAMS.items():
            h = snap[key]
            buckets = [("+Inf" if le == float("inf") else repr(float(le)), n) for le, n in h["buckets"]]
            yield HistogramMetricFamily(f"{PREFIX}_{name}", doc, buckets=buckets, sum_value=h["sum"])


def registry(metrics) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding the engine's collector."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(metrics))
    return reg


def render(reg: CollectorRegistry) -> bytes:
    return generate_latest(reg)
