"""`deepseek-v2 bench-serve`: drive a running server over HTTP as its users would, and measure
what they see, with the definitions of vLLM's `benchmark_serving.py` (`vllm bench serve`).

The requests are workload.py's (log-normal lengths, random token ids), sent to `/v1/completions`
as token-id prompts so the lengths are exact, greedy, with `ignore_eos` and `max_tokens` set so
each generates exactly its drawn length, streamed with the usage chunk at the end. They arrive
as a Poisson process at each `--request-rate` (`inf`: all at once), optionally at most
`--max-concurrency` in flight. Per request, on the client's clock:

- TTFT: from sending the request to the first streamed chunk that carries a choice;
- ITL: the gaps between consecutive such chunks, one value per gap, as vLLM computes it (a chunk
  that carries several tokens counts once; the tokens per chunk are reported beside it);
- TPOT: (E2E - TTFT) / (output tokens - 1), for requests of more than one token;
- E2E: from sending the request to its last such chunk.

Throughputs divide the completed requests and their token counts (from the usage chunk) by the
run's duration, from the first arrival to the last completion.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import workload as W

PERCENTILES = (50, 90, 99)
SLOW_GAP_MS = 30  # the inter-token latency the online target holds p99 to (docs/benchmarks.md)
TIMEOUT_S = 6 * 3600  # a request of a long run may legitimately wait that long (vLLM's limit too)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--model", default=None, help="the model name to send (default: the first /v1/models lists)")
    p.add_argument("--checkpoint", default=None, metavar="DIR",
                   help="the served checkpoint's directory, read on this machine for the vocabulary size the "
                        "prompt token ids are drawn from (default: the directory /v1/models names as the "
                        "model's root)")
    p.add_argument("--request-rate", default="inf",
                   help="requests per second, comma-separated for several runs, inf = all at once "
                        "(default: %(default)s)")
    p.add_argument("--max-concurrency", type=int, default=None,
                   help="at most this many requests in flight; the others wait on the client (default: no limit)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    W.add_arguments(p)


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(x) for x in text.split(",")]  # float("inf") is inf
    except ValueError:
        raise ValueError(f"--request-rate takes numbers or inf, comma-separated: {text!r}") from None
    if any(not r > 0 for r in rates):
        raise ValueError(f"a request rate must be positive: {text!r}")
    return rates


@dataclass
class Result:
    """One request as the client saw it (seconds on the client's clock)."""

    prompt_len: int  # as sent; replaced by the usage chunk's count
    success: bool = False
    output_tokens: int = 0  # the usage chunk's completion_tokens
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0  # E2E
    error: str = ""


async def sse_lines(response):
    """The lines of an event stream, split where SSE ends a line (LF, CR LF, CR) and nowhere else: httpx's
    `aiter_lines` splits like str.splitlines, so a token's text holding U+2028 or U+0085, which JSON leaves
    raw, would cut a data line in two."""
    pending = b""
    async for data in response.aiter_bytes():
        lines = (pending + data).splitlines(keepends=True)  # bytes split on LF, CR LF and CR only
        pending = lines.pop() if lines and not lines[-1].endswith((b"\n", b"\r")) else b""
        for line in lines:
            yield line.rstrip(b"\r\n")
    if pending:
        yield pending


async def send(client, url: str, body: dict, result: Result) -> Result:
    """Send one streaming completion and time its chunks."""
    start = last = time.perf_counter()
    chunks, usage = 0, None
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                result.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}"
                return result
            async for line in sse_lines(r):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                data = json.loads(line[len(b"data: "):])
                if "error" in data:  # an error after the 200 header travels in the stream
                    result.error = f"stream error: {data['error'].get('message')}"
                    return result
                if data.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                elif data.get("usage"):
                    usage = data["usage"]
    except Exception as e:  # the benchmark goes on; the request counts as failed
        result.error = f"{type(e).__name__}: {e}"
        return result
    if chunks == 0 or usage is None:
        result.error = "the stream ended without a token" if chunks == 0 else "no usage chunk"
        return result
    result.latency = last - start
    result.output_tokens = usage["completion_tokens"]
    result.prompt_len = usage["prompt_tokens"]
    result.success = True
    return result


async def run_rate(client, url: str, model: str, requests, arrivals: list[float],
                   max_concurrency: int | None, desc: str) -> tuple[list[Result], float]:
    """Send every request at its arrival time; returns the results in request order and the duration."""
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=desc, unit="req")

    async def one(prompt: list[int], max_tokens: int) -> Result:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        if limit is None:
            result = await send(client, url, body, Result(len(prompt)))
        else:
            async with limit:  # the clock of a request starts once it is sent, as in vLLM
                result = await send(client, url, body, Result(len(prompt)))
        bar.update(1)
        return result

    start = time.perf_counter()
    tasks = []
    for (prompt, max_tokens), at in zip(requests, arrivals):
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(prompt, max_tokens)))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    bar.close()
    return list(results), duration


def percentile(values: list[float], p: float) -> float:
    """numpy's default (linear interpolation between the two nearest ranks), as vLLM reports them."""
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(results: list[Result], expected_output: list[int], duration: float) -> dict:
    """vLLM's figures and field names (times in ms); an empty list of values gives zeros, as there."""
    ok = [r for r in results if r.success]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    out = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
           "total_token_throughput": (total_in + total_out) / duration,
           # above 1 when chunks carry several tokens: then an ITL gap spans them (TPOT is per token)
           "tokens_per_chunk": total_out / max(1, sum(len(r.itl) + 1 for r in ok)),
           # a server that ends a request early (or late) despite ignore_eos would skew every figure
           "output_len_mismatches": sum(r.output_tokens != n for r, n in zip(ok, expected_output))}
    values = {"ttft": [r.ttft for r in ok],
              "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
              "itl": [gap for r in ok for gap in r.itl],
              "e2el": [r.latency for r in ok]}
    # how many of the gaps a stream's reader waited longer than SLOW_GAP_MS: what a p99 over it is made of
    out[f"itl_share_over_{SLOW_GAP_MS}ms"] = (sum(1e3 * gap > SLOW_GAP_MS for gap in values["itl"])
                                             / max(1, len(values["itl"])))
    for name, xs in values.items():
        xs = [1e3 * x for x in xs] or [0.0]
        out[f"mean_{name}_ms"] = statistics.fmean(xs)
        out[f"median_{name}_ms"] = statistics.median(xs)
        out[f"std_{name}_ms"] = statistics.pstdev(xs)
        for p in PERCENTILES:
            out[f"p{p}_{name}_ms"] = percentile(xs, p)
    out.update(input_lens=[r.prompt_len if r.success else 0 for r in results],
               output_lens=[r.output_tokens for r in results], ttfts=[r.ttft for r in results],
               itls=[r.itl for r in results], latencies=[r.latency for r in results],
               errors=[r.error for r in results])
    return out


def format_run(r: dict) -> str:
    rate = r["request_rate"]
    lines = [f"{' Serving Benchmark Result ':=^60}",
             f"{'Request rate (req/s):':<44}{rate}",
             f"{'Maximum request concurrency:':<44}{r['max_concurrency'] or 'no limit'}",
             f"{'Successful requests:':<44}{r['completed']}",
             f"{'Failed requests:':<44}{r['failed']}",
             f"{'Benchmark duration (s):':<44}{r['duration']:.2f}",
             f"{'Total input tokens:':<44}{r['total_input_tokens']}",
             f"{'Total generated tokens:':<44}{r['total_output_tokens']}",
             f"{'Request throughput (req/s):':<44}{r['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':<44}{r['output_throughput']:.2f}",
             f"{'Total token throughput (tok/s):':<44}{r['total_token_throughput']:.2f}",
             f"{'Output tokens per streamed chunk:':<44}{r['tokens_per_chunk']:.2f}"]
    for name, label in (("ttft", "Time to First Token (TTFT)"), ("tpot", "Time per Output Token, excl. 1st (TPOT)"),
                        ("itl", "Inter-token Latency (ITL)"), ("e2el", "End-to-end Latency (E2EL)")):
        lines.append(f"{' ' + label + ' ':-^60}")
        short = name.upper()
        lines.append(f"{'Mean ' + short + ' (ms):':<44}{r[f'mean_{name}_ms']:.2f}")
        lines += [f"{f'P{p} {short} (ms):':<44}{r[f'p{p}_{name}_ms']:.2f}" for p in PERCENTILES]
        if name == "itl":
            lines.append(f"{f'Gaps over {SLOW_GAP_MS} ms (%):':<44}{100 * r[f'itl_share_over_{SLOW_GAP_MS}ms']:.2f}")
    if r["output_len_mismatches"]:
        lines.append(f"warning: {r['output_len_mismatches']} request(s) generated a different number of tokens "
                     "than asked")
    for e in [e for e in r["errors"] if e][:5]:
        lines.append(f"error: {e}")
    lines.append("=" * 60)
    return "\n".join(lines)


def vocab_size(checkpoint: str | None, root: str | None) -> int:
    from .config import ModelArgs
    path = checkpoint or root
    if not path or not (Path(path) / "config.json").is_file():
        raise ValueError(f"cannot read the served model's vocabulary size here ({path or 'no root in /v1/models'} "
                         "holds no config.json): give --checkpoint DIR")
    return ModelArgs.from_pretrained(path).vocab_size


async def bench(args) -> dict:
    import httpx

    workload = W.from_args(args)
    rates = parse_rates(args.request_rate)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    # No pool limit: a client-side cap on connections would silently cap the concurrency.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(TIMEOUT_S, connect=30)) as client:
        try:
            r = await client.get("/v1/models")
        except httpx.TransportError as e:
            raise RuntimeError(f"cannot reach the server at {args.url}: {e}") from None
        if r.status_code != 200:
            raise RuntimeError(f"GET {args.url}/v1/models answered {r.status_code}: {r.text[:300]}")
        card = r.json()["data"][0]
        model = args.model or card["id"]
        requests = workload.requests(vocab_size(args.checkpoint, card.get("root")))
        expected = [n for _, n in requests]
        # One request first, as vLLM does: a server that cannot answer fails here, not as N failures.
        first, _ = await run_rate(client, "/v1/completions", model, requests[:1], [0.0], None, "test request")
        if not first[0].success:
            raise RuntimeError(f"the test request failed: {first[0].error}")
        result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "url": args.url, "model": model,
                  "max_concurrency": args.max_concurrency, "workload": workload.describe(), "runs": []}
        for rate in rates:
            results, duration = await run_rate(client, "/v1/completions", model, requests,
                                               workload.arrival_times(rate), args.max_concurrency, f"rate {rate:g}")
            run = {"request_rate": rate if math.isfinite(rate) else "inf",  # (JSON has no infinity)
                   "max_concurrency": args.max_concurrency, **summarize(results, expected, duration)}
            print(format_run(run), flush=True)
            result["runs"].append(run)
            if args.json:  # after every rate: a long sweep that is stopped keeps what it measured
                Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def raise_open_file_limit() -> None:
    """Each request in flight holds a socket: lift the soft limit on open files (often 1,024) to the
    hard one, as vLLM's server does, so that a burst of requests is not refused by the client itself."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # some systems refuse an unlimited soft limit: keep the one there is
        pass


def run(args) -> None:
    raise_open_file_limit()
    result = asyncio.run(bench(args))
    if len(result["runs"]) > 1:
        print(format_summary(result["runs"]))


def format_summary(runs: list[dict]) -> str:
    lines = ["| request rate | completed / failed | req/s | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | "
             f"ITL gaps over {SLOW_GAP_MS} ms | E2E p50 / p99 ms |", "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['request_rate']} | {r['completed']} / {r['failed']} | {r['request_throughput']:.2f} | "
                     f"{r['output_throughput']:,.0f} | {r['p50_ttft_ms']:.1f} / {r['p99_ttft_ms']:.1f} | "
                     f"{r['p50_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} | "
                     f"{100 * r[f'itl_share_over_{SLOW_GAP_MS}ms']:.1f}% | "
                     f"{r['p50_e2el_ms']:.0f} / {r['p99_e2el_ms']:.0f} |")
    return "\n".join(lines)
