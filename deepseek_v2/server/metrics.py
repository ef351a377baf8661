"""Prometheus metrics through prometheus-client, as vLLM exposes them: vLLM's names (`vllm:` becomes
`deepseek_v2:`), each with a `model_name` label. Engine gauges and counters are read from the engine's
statistics when scraped; latency histograms, finish reasons, HTTP responses and per-API-key usage are
counted by the server. Each server has its own registry. docs/grafana-dashboard.json charts them.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..outputs import RequestOutput

PREFIX = "deepseek_v2:"
# The text format every Prometheus server reads; the "_created" series would only double the output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
prometheus_client.disable_created_metrics()
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)

# (stats key, name, kind, help) of what the engine reports; counters get "_total" appended
ENGINE_SERIES = [
    ("num_running", "num_requests_running", "gauge", "Sequences in the running batch."),
    ("num_waiting", "num_requests_waiting", "gauge", "Sequences waiting to be scheduled."),
    ("cache_usage", "kv_cache_usage_perc", "gauge", "Fraction of latent-cache blocks in use (1 = full)."),
    ("num_free_blocks", "kv_cache_free_blocks", "gauge", "Free latent-cache blocks."),
    ("num_blocks", "kv_cache_total_blocks", "gauge", "Latent-cache blocks in all."),
    ("prompt_tokens", "prompt_tokens", "counter", "Prompt tokens admitted (times n)."),
    ("generation_tokens", "generation_tokens", "counter", "Tokens generated."),
    ("prefix_cache_queries", "prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    ("num_preemptions", "num_preemptions", "counter", "Sequences preempted for lack of cache."),
    ("steps_launched_ahead", "steps_launched_ahead", "counter",
     "Steps launched before the tokens of the step before reached the host (asynchronous scheduling)."),
    ("steps_launched_ahead_with_prompts", "steps_launched_ahead_with_prompts", "counter",
     "Of the steps launched ahead, those that admitted prompts beside the decodes."),
]


class _EngineCollector:
    """The engine's statistics of the scrape in progress, as Prometheus families."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self.stats: dict = {}

    def collect(self):
        s = self.stats
        for key, name, kind, help_text in ENGINE_SERIES:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                PREFIX + name, help_text, labels=["model_name"])
            family.add_metric([self.model_name], s.get(key, 0))
            yield family
        queries, hits = s.get("prefix_cache_queries", 0), s.get("prefix_cache_hits", 0)
        rate = GaugeMetricFamily(PREFIX + "prefix_cache_hit_rate",
                                 "prefix_cache_hits_total / prefix_cache_queries_total.", labels=["model_name"])
        rate.add_metric([self.model_name], hits / queries if queries else 0.0)
        yield rate


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self.engine = _EngineCollector(model_name)
        self.registry.register(self.engine)
        model = ["model_name"]

        def histogram(name, help_text, buckets):
            return Histogram(PREFIX + name, help_text, model, buckets=buckets, registry=self.registry)

        self.ttft = histogram("time_to_first_token_seconds", "Time from arrival to the first generated token.",
                              TTFT_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Mean time per generated token after the first, one observation per request.",
                              TPOT_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Time from arrival to the last token.", E2E_BUCKETS)
        for h in (self.ttft, self.tpot, self.e2e):
            h.labels(model_name)  # the series exist (at zero) from the first scrape, as dashboards expect
        self.finished = Counter(PREFIX + "request_success", "Finished sequences by finish reason (abort: did not "
                                "finish).", [*model, "finished_reason"], registry=self.registry)
        self.http = Counter(PREFIX + "http_requests", "HTTP responses by API key name, route and status code.",
                            [*model, "api_key", "handler", "status"], registry=self.registry)
        self.key_prompt = Counter(PREFIX + "api_key_prompt_tokens", "Prompt tokens billed per API key.",
                                  [*model, "api_key"], registry=self.registry)
        self.key_completion = Counter(PREFIX + "api_key_completion_tokens", "Completion tokens billed per API key.",
                                      [*model, "api_key"], registry=self.registry)

    def observe_request(self, out: RequestOutput) -> None:
        """Latencies of a finished engine request (one per prompt; a sample's tokens count once each)."""
        m = out.metrics
        for o in out.outputs:
            self.finished.labels(self.model_name, o.finish_reason or "abort").inc()
        if m is None or m.first_token_time is None:
            return
        self.ttft.labels(self.model_name).observe(m.first_token_time - m.arrival_time)
        n = max(len(o.token_ids) for o in out.outputs)
        if n > 1 and m.last_token_time is not None:
            self.tpot.labels(self.model_name).observe((m.last_token_time - m.first_token_time) / (n - 1))
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.labels(self.model_name).observe(end - m.arrival_time)

    def observe_usage(self, key_name: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.key_prompt.labels(self.model_name, key_name).inc(prompt_tokens)
        self.key_completion.labels(self.model_name, key_name).inc(completion_tokens)

    def observe_aborted(self, num_seqs: int) -> None:
        """Sequences that ended without finishing: the client went away, the server shut down or
        their step failed."""
        self.finished.labels(self.model_name, "abort").inc(num_seqs)

    def observe_http(self, key_name: str, handler: str, status: int) -> None:
        self.http.labels(self.model_name, key_name, handler, str(status)).inc()

    def render(self, stats: dict) -> str:
        """The text exposition of every series, with the engine's `stats` of this scrape."""
        self.engine.stats = stats
        return generate_latest(self.registry).decode()
