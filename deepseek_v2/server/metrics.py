"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand: engine gauges
and counters read from the engine's statistics, latency histograms and per-API-key usage counted
by the server. Names follow vLLM's (`vllm:` becomes `deepseek_v2:`), each with a `model_name` label.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from ..outputs import RequestOutput

PREFIX = "deepseek_v2:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str]) -> list[str]:
        out, cumulative = [], 0
        for le, n in zip([*map(str, self.buckets), "+Inf"], self.counts):
            cumulative += n
            out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
        out += [f"{name}_sum{_labels(labels)} {self.sum}", f"{name}_count{_labels(labels)} {self.count}"]
        return out


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.ttft = Histogram(TTFT_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.finished: dict[str, int] = defaultdict(int)  # finish reason -> requests
        self.http: dict[tuple[str, str, int], int] = defaultdict(int)  # (api key name, route, status) -> responses
        self.key_tokens: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key name -> [prompt, generated]

    def observe_request(self, out: RequestOutput) -> None:
        """Latencies of a finished engine request (one per prompt; a sample's tokens count once each)."""
        m = out.metrics
        for o in out.outputs:
            self.finished[o.finish_reason or "abort"] += 1
        if m is None or m.first_token_time is None:
            return
        self.ttft.observe(m.first_token_time - m.arrival_time)
        n = max(len(o.token_ids) for o in out.outputs)
        if n > 1 and m.last_token_time is not None:
            self.tpot.observe((m.last_token_time - m.first_token_time) / (n - 1))
        end = m.finished_time or m.last_token_time
        if end is not None:
            self.e2e.observe(end - m.arrival_time)

    def observe_usage(self, key_name: str, prompt_tokens: int, completion_tokens: int) -> None:
        tokens = self.key_tokens[key_name]
        tokens[0] += prompt_tokens
        tokens[1] += completion_tokens

    def observe_aborted(self, num_seqs: int) -> None:
        """Sequences that ended without finishing: the client went away, the server shut down or
        their step failed."""
        self.finished["abort"] += num_seqs

    def observe_http(self, key_name: str, handler: str, status: int) -> None:
        self.http[(key_name, handler, status)] += 1

    def render(self, stats: dict) -> str:
        model = {"model_name": self.model_name}
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            lines.extend([f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", *samples])

        def one(name: str, kind: str, help_text: str, value) -> None:
            family(name, kind, help_text, [f"{PREFIX}{name}{_labels(model)} {value}"])

        queries, hits = stats.get("prefix_cache_queries", 0), stats.get("prefix_cache_hits", 0)
        one("num_requests_running", "gauge", "Sequences in the running batch.", stats.get("num_running", 0))
        one("num_requests_waiting", "gauge", "Sequences waiting to be scheduled.", stats.get("num_waiting", 0))
        one("kv_cache_usage_perc", "gauge", "Fraction of latent-cache blocks in use (1 = full).",
            stats.get("cache_usage", 0.0))
        one("kv_cache_free_blocks", "gauge", "Free latent-cache blocks.", stats.get("num_free_blocks", 0))
        one("kv_cache_total_blocks", "gauge", "Latent-cache blocks in all.", stats.get("num_blocks", 0))
        one("prompt_tokens_total", "counter", "Prompt tokens admitted (times n).", stats.get("prompt_tokens", 0))
        one("generation_tokens_total", "counter", "Tokens generated.", stats.get("generation_tokens", 0))
        one("prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", queries)
        one("prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", hits)
        one("prefix_cache_hit_rate", "gauge", "prefix_cache_hits_total / prefix_cache_queries_total.",
            hits / queries if queries else 0.0)
        one("num_preemptions_total", "counter", "Sequences preempted for lack of cache.",
            stats.get("num_preemptions", 0))
        family("request_success_total", "counter", "Finished sequences by finish reason (abort: did not finish).",
               [f"{PREFIX}request_success_total{_labels({**model, 'finished_reason': r})} {n}"
                for r, n in sorted(self.finished.items())])
        family("time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token.",
               self.ttft.lines(f"{PREFIX}time_to_first_token_seconds", model))
        family("time_per_output_token_seconds", "histogram",
               "Mean time per generated token after the first, one observation per request.",
               self.tpot.lines(f"{PREFIX}time_per_output_token_seconds", model))
        family("e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.",
               self.e2e.lines(f"{PREFIX}e2e_request_latency_seconds", model))
        family("http_requests_total", "counter", "HTTP responses by API key name, route and status code.",
               [f"{PREFIX}http_requests_total{_labels({**model, 'api_key': k, 'handler': h, 'status': str(s)})} {n}"
                for (k, h, s), n in sorted(self.http.items())])
        for i, (name, help_text) in enumerate((("api_key_prompt_tokens_total", "Prompt tokens billed per API key."),
                                               ("api_key_completion_tokens_total",
                                                "Completion tokens billed per API key."))):
            family(name, "counter", help_text,
                   [f"{PREFIX}{name}{_labels({**model, 'api_key': k})} {v[i]}"
                    for k, v in sorted(self.key_tokens.items())])
        return "\n".join(lines) + "\n"
