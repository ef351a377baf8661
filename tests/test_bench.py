# Run: python -m pytest -q tests/test_bench.py
"""The benchmarks' workload and plumbing (no timing is asserted): the mixed workload's draws
(deterministic, the asked medians, spreads and clips, Poisson arrivals), `bench --workload mixed`
on the shipped model, and `bench-serve` against a real server on the shipped model."""

import json
import math
import statistics
import subprocess
import sys

import pytest

from deepseek_v2 import workload as W
from deepseek_v2.bench_mixed import output_checksum

CLI = [sys.executable, "-m", "deepseek_v2.cli"]


def workload(n=1000, seed=0, **kw) -> W.Workload:
    return W.Workload(n, seed, kw.get("prompt", W.DEFAULTS["prompt"]), kw.get("output", W.DEFAULTS["output"]))


def normal_cdf(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_draws_are_deterministic_for_a_seed():
    a, b, c = workload(200, 3), workload(200, 3), workload(200, 4)
    assert a.requests(1000) == b.requests(1000)
    assert a.arrival_times(5.0) == b.arrival_times(5.0)
    assert a.lengths() != c.lengths() and a.arrival_times(5.0) != c.arrival_times(5.0)
    # each quantity has its own generator: another output distribution leaves the prompts as they were
    other = workload(200, 3, output=W.LogNormal(50, 0.5, 1, 100))
    assert other.lengths()[0] == a.lengths()[0] and other.requests(1000)[5][0] == a.requests(1000)[5][0]


@pytest.mark.parametrize("kind", ["prompt", "output"])
def test_lengths_have_the_asked_median_spread_and_clips(kind):
    d = W.DEFAULTS[kind]
    lengths = workload(100_000).lengths()[0 if kind == "prompt" else 1]
    assert (d.median, d.sigma) == ((200, 1.0) if kind == "prompt" else (150, 1.0))
    assert (d.min, d.max) == ((4, 2048) if kind == "prompt" else (4, 1024))
    assert min(lengths) == d.min and max(lengths) == d.max
    assert abs(statistics.median(lengths) / d.median - 1) < 0.02
    # the spread: the quartiles of a log-normal are median * exp(+-0.6745 sigma)
    q1, _, q3 = statistics.quantiles(lengths, n=4)
    assert abs(math.log(q3 / q1) / (2 * 0.6745) - d.sigma) < 0.03
    # the share clipped at each end is the normal tail beyond the clip (rounding moves it by < half a token)
    for share, expected in ((lengths.count(d.max) / len(lengths), 1 - normal_cdf(math.log(d.max / d.median) / d.sigma)),
                            (lengths.count(d.min) / len(lengths), normal_cdf(math.log((d.min + 0.5) / d.median) / d.sigma))):
        assert abs(share - expected) < 0.002 + 0.1 * expected


def test_prompt_ids_have_the_drawn_lengths_and_fit_the_vocabulary():
    w = workload(300)
    requests = w.requests(vocab_size=50)
    prompt_lens, output_lens = w.lengths()
    assert [len(p) for p, _ in requests] == prompt_lens and [o for _, o in requests] == output_lens
    ids = {t for p, _ in requests for t in p}
    assert ids == set(range(W.FIRST_TOKEN_ID, 50))


def test_arrivals_are_a_poisson_process_scaled_to_the_rate():
    n, rate = 20_000, 8.0
    times = workload(n).arrival_times(rate)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert times[-1] == pytest.approx(n / rate)  # vLLM's scaling: the last arrival at exactly n / rate
    assert statistics.fmean(gaps) == pytest.approx(1 / rate)
    # exponential gaps: the standard deviation equals the mean, and 1 - 1/e of them are below it
    assert statistics.pstdev(gaps) * rate == pytest.approx(1.0, abs=0.03)
    assert sum(g < 1 / rate for g in gaps) / n == pytest.approx(1 - math.exp(-1), abs=0.01)
    assert workload(5).arrival_times(float("inf")) == [0.0] * 5


@pytest.mark.parametrize("make", [
    lambda: W.LogNormal(0, 1, 4, 10), lambda: W.LogNormal(10, -1, 4, 10), lambda: W.LogNormal(10, 1, 11, 10),
    lambda: W.LogNormal(10, 1, 0, 10), lambda: workload(0), lambda: workload(3).arrival_times(0),
])
def test_bad_workloads_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_bench_mixed_engine_settings_and_overrides():
    from deepseek_v2.bench import engine_config
    from deepseek_v2.cli import build_parser

    def config(*flags):
        return engine_config(build_parser("bench").parse_args(["bench", "--workload", "mixed", *flags]))
    c = config()
    # the asked settings; the longest prompt (2,048) plus the longest output (1,024) fits
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == (256, 16384, 3072)
    c = config("--max-num-seqs", "64", "--max-num-batched-tokens", "2048", "--prompt-len-max", "100")
    assert (c.max_num_seqs, c.max_num_batched_tokens, c.max_model_len) == (64, 2048, 1124)
    with pytest.raises(ValueError, match="--max-model-len 1000 is below the 3072"):
        config("--max-model-len", "1000")


# ---- the commands --------------------------------------------------------------------------------
SMALL = ["--num-prompts", "10", "--workload-seed", "5", "--prompt-len-median", "16", "--prompt-len-max", "48",
         "--output-len-median", "6", "--output-len-max", "12"]


def small_workload() -> W.Workload:
    return W.Workload(10, 5, W.LogNormal(16, 1.0, 4, 48), W.LogNormal(6, 1.0, 4, 12))


def run(*args):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)


def test_bench_mixed_reports_every_figure_and_the_greedy_checksum(tmp_path):
    results = []
    for i in range(2):  # the second with asynchronous scheduling: steps launched ahead, prompts in them
        out = tmp_path / f"mixed{i}.json"
        r = run("bench", "--workload", "mixed", "--dtype", "float32", "--max-num-batched-tokens", "256",
                *SMALL, "--json", str(out), *(["--async-scheduling", "on"] if i else []))
        assert r.returncode == 0, r.stderr
        results.append(json.loads(out.read_text()))
    m = results[0]["mixed"]
    prompt_lens, output_lens = small_workload().lengths()
    assert (m["num_requests"], m["prompt_tokens"], m["output_tokens"]) == (10, sum(prompt_lens), sum(output_lens))
    assert m["steps"] == m["prefill_steps"] + m["decode_steps"] and m["prefill_steps"] >= 1
    assert m["decode_steps"] >= max(output_lens) - 1  # the longest request decodes after its prefill
    for key in ("wall_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s"):
        assert m[key] > 0
    for kind in ("prefill", "decode"):
        k = m[kind]
        assert k["seconds"] > 0 and k["runner_seconds"] > 0 and k["ms_per_step"] > 0
        assert k["host_seconds"] == pytest.approx(k["seconds"] - k["runner_seconds"])
    assert m["host_s"] == pytest.approx(m["prefill"]["host_seconds"] + m["decode"]["host_seconds"])
    assert results[0]["engine"]["max_num_seqs"] == 256 and results[0]["engine"]["max_num_batched_tokens"] == 256
    assert "| greedy output checksum | sha256:" in r.stdout and "| time in decode-only steps |" in r.stdout
    # the same seed gives the same greedy outputs; the checksum is that of the offline API's outputs
    assert results[1]["mixed"]["output_checksum"] == m["output_checksum"]
    m1 = results[1]["mixed"]
    assert m1["prefill_steps"] >= 1 and m1["steps"] == m1["prefill_steps"] + m1["decode_steps"]
    from deepseek_v2 import LLM, SamplingParams
    llm = LLM(device="cpu")
    requests = small_workload().requests(llm.engine.model.args.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p, _ in requests],
                        [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in requests],
                        use_tqdm=False)
    assert output_checksum([list(o.outputs[0].token_ids) for o in outs]) == m["output_checksum"]


def test_bench_serve_against_a_real_server(tmp_path):
    from server_process import start_server, stop_server
    proc, url, _ = start_server("--api-key", "bench-key")
    try:
        out = tmp_path / "serve.json"
        r = run("bench-serve", "--url", url, "--api-key", "bench-key", "--request-rate", "20,inf", *SMALL,
                "--json", str(out))
        assert r.returncode == 0, r.stderr
        refused = run("bench-serve", "--url", url, "--api-key", "wrong", *SMALL)
    finally:
        stop_server(proc)
    assert refused.returncode == 1 and "401" in refused.stderr
    result = json.loads(out.read_text())
    prompt_lens, output_lens = small_workload().lengths()
    assert result["workload"] == small_workload().describe() and result["model"] == "deepseek-v2-default"
    assert [run["request_rate"] for run in result["runs"]] == [20.0, "inf"]
    for run_ in result["runs"]:
        assert (run_["completed"], run_["failed"], run_["errors"]) == (10, 0, [""] * 10)
        assert run_["input_lens"] == prompt_lens and run_["output_lens"] == output_lens
        assert run_["output_len_mismatches"] == 0 and 0 <= run_["itl_share_over_30ms"] <= 1
        assert run_["total_input_tokens"] == sum(prompt_lens) and run_["total_output_tokens"] == sum(output_lens)
        assert all(len(itl) + 1 <= n for itl, n in zip(run_["itls"], output_lens))  # a chunk per token at most
        for name in ("ttft", "tpot", "itl", "e2el"):
            assert 0 < run_[f"p50_{name}_ms"] <= run_[f"p90_{name}_ms"] <= run_[f"p99_{name}_ms"]
            assert run_[f"median_{name}_ms"] == pytest.approx(run_[f"p50_{name}_ms"]) and run_[f"mean_{name}_ms"] > 0
        for key in ("duration", "request_throughput", "output_throughput", "total_token_throughput"):
            assert run_[key] > 0
        assert run_["request_throughput"] == pytest.approx(10 / run_["duration"])
        # each request's end to end latency holds its first token and every gap after it
        for ttft, itl, e2e in zip(run_["ttfts"], run_["itls"], run_["latencies"]):
            assert e2e == pytest.approx(ttft + sum(itl))
    assert "Serving Benchmark Result" in r.stdout and "| request rate |" in r.stdout


def test_summary_counts_the_gaps_over_the_itl_bound():
    """The share of inter-token gaps over 30 ms (the online target's bound), over every stream's gaps,
    failed requests left out; percentiles as numpy's default."""
    from deepseek_v2.bench_serve import Result, summarize

    results = [Result(4, True, 4, 0.1, [0.010, 0.031, 0.020], 0.161),
               Result(5, True, 3, 0.2, [0.045, 0.029], 0.274),
               Result(6, False, 0, 0.0, [0.500], 0.0, "refused")]
    s = summarize(results, [4, 3, 3], duration=1.0)
    assert s["itl_share_over_30ms"] == pytest.approx(2 / 5)
    assert s["p50_itl_ms"] == pytest.approx(29.0) and s["p99_itl_ms"] == pytest.approx(31 + 0.96 * 14)
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (2, 1, 7)


def test_event_stream_lines_split_only_where_sse_ends_a_line():
    """A token's text may hold U+2028, U+0085 or U+001C, which JSON leaves raw (the first two) and which
    str.splitlines (httpx's aiter_lines) takes for line ends; the client must cut only at LF, CR LF, CR,
    however the bytes arrive."""
    import asyncio

    from deepseek_v2.bench_serve import sse_lines

    events = [{"choices": [{"text": "a\u2028b\x85c"}]}, {"choices": [{"text": "\u2029é"}]}, {"usage": {"n": 1}}]
    stream = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events) + "data: [DONE]\n\n"
    raw = stream.encode()

    class Response:  # the bytes in pieces of 7, cutting characters and CR LF pairs apart
        async def aiter_bytes(self):
            for i in range(0, len(raw), 7):
                yield raw[i:i + 7]

    async def collect():
        return [line async for line in sse_lines(Response())]

    lines = [line for line in asyncio.run(collect()) if line]
    assert [json.loads(line[len(b"data: "):]) for line in lines[:-1]] == events
    assert lines[-1] == b"data: [DONE]"
