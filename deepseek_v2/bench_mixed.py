"""The mixed workload of `deepseek-v2 bench --workload mixed`: workload.py's requests submitted together,
run to the end with greedy sampling; how the steps split between those holding a prefill and the
decode-only ones, the host time outside the model runner, and a checksum of every output token."""

from __future__ import annotations

import hashlib
import json
import time

from .engine.llm_engine import LLMEngine
from .sampling_params import SamplingParams
from . import workload as W


class RunnerTimer:
    """Stands in for the model runner's step calls (`launch`, `launch_next`, `collect`) to time them
    apart from the rest of `engine.step` and to note whether the step held a prefill: a sequence given
    more than one token (a prompt, a chunk of one, or a preempted sequence being recomputed); the
    runner runs the others as decodes. A step launched ahead is collected by the next `engine.step`,
    which it counts for. `collect` waits for the sampled tokens, so the runner's time includes the
    device's work that the host waits for."""

    CALLS = ("launch", "launch_next", "collect")

    def __init__(self, runner):
        self.runner = runner
        self.seconds: float | None = None  # this step's, None until a call
        self.prefill = False
        self.next_prefill = False  # the step launched ahead (the next engine.step's) holds one
        for name in self.CALLS:  # instance attributes hide the methods
            setattr(runner, name, self._timed(getattr(runner, name), name))

    def _timed(self, call, name: str):
        def timed(*args):
            if name == "launch":
                self.prefill = any(item.num_new_tokens > 1 for item in args[0].scheduled)
            elif name == "launch_next":
                self.next_prefill = any(item.num_new_tokens > 1 for item in args[1])
            t = time.perf_counter()
            try:
                return call(*args)
            finally:
                self.seconds = (self.seconds or 0.0) + time.perf_counter() - t
        return timed

    def next_step(self) -> None:
        self.seconds, self.prefill, self.next_prefill = None, self.next_prefill, False

    def restore(self) -> None:
        for name in self.CALLS:
            delattr(self.runner, name)


def bench_mixed(engine: LLMEngine, workload: W.Workload, warm_up) -> dict:
    """Submit every request of the workload at once (greedy, ignore_eos, detokenized as a server
    would), step the engine until all finish, and split the steps' time by kind and into the model
    runner's and the host's. warm_up() runs first (a few requests, for the compilations)."""
    requests = workload.requests(engine.model.args.vocab_size)
    warm_up()
    preempted_before = engine.scheduler.num_preemptions
    timer = RunnerTimer(engine.runner)
    kinds = {kind: {"steps": 0, "seconds": 0.0, "runner_seconds": 0.0} for kind in ("prefill", "decode")}
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    for i, (prompt, max_tokens) in enumerate(requests):
        engine.add_request(f"mixed-{i}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    while engine.has_unfinished_requests():
        timer.next_step()
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        if timer.seconds is not None:  # (a step that scheduled nothing did not run the model)
            k = kinds["prefill" if timer.prefill else "decode"]
            k["steps"] += 1
            k["seconds"] += dt
            k["runner_seconds"] += timer.seconds
        tokens.update((o.request_id, o.outputs[0].token_ids) for o in outs if o.finished)
    wall = time.perf_counter() - start
    timer.restore()
    outputs = [tokens[f"mixed-{i}"] for i in range(len(requests))]
    prompt_tokens = sum(len(p) for p, _ in requests)
    output_tokens = sum(len(o) for o in outputs)
    for k in kinds.values():
        k["host_seconds"] = k["seconds"] - k["runner_seconds"]
        k["ms_per_step"] = 1e3 * k["seconds"] / k["steps"] if k["steps"] else 0.0
        k["host_ms_per_step"] = 1e3 * k["host_seconds"] / k["steps"] if k["steps"] else 0.0
    steps = sum(k["steps"] for k in kinds.values())
    host = sum(k["host_seconds"] for k in kinds.values())
    return {"num_requests": len(requests), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "wall_s": wall, "requests_per_s": len(requests) / wall, "output_tokens_per_s": output_tokens / wall,
            "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
            "steps": steps, "prefill_steps": kinds["prefill"]["steps"], "decode_steps": kinds["decode"]["steps"],
            "prefill": kinds["prefill"], "decode": kinds["decode"],
            "host_s": host, "host_ms_per_step": 1e3 * host / steps if steps else 0.0,
            # adding the requests and the loop itself: the wall time that is in no step
            "outside_steps_s": wall - sum(k["seconds"] for k in kinds.values()),
            "preemptions": engine.scheduler.num_preemptions - preempted_before,
            "output_checksum": output_checksum(outputs)}


def output_checksum(outputs: list[list[int]]) -> str:
    """SHA-256 of every output token id, request by request in submission order."""
    h = hashlib.sha256()
    for ids in outputs:
        h.update(json.dumps(ids).encode() + b"\n")
    return "sha256:" + h.hexdigest()




def title(r: dict) -> str:
    fp8 = [what for what, on in (("fp8 weights", r.get("quantization") == "fp8"),
                                 ("fp8 cache", r.get("kv_cache_dtype") == "fp8")) if on]
    steps = "asynchronous scheduling" if r.get("async_scheduling") else "synchronous steps"
    return f"# {r['source']} | {r['device']} | torch {r['torch']} | {' + '.join([r['dtype'], *fp8])} | {steps}"


def format_mixed(r: dict) -> str:
    m, w, e = r["mixed"], r["mixed_workload"], r["engine"]
    p, d = m["prefill"], m["decode"]

    def dist(x: dict) -> str:
        return f"log-normal median {x['median']:g} sigma {x['sigma']:g} in [{x['min']}, {x['max']}]"

    return "\n".join([
        title(r),
        f"mixed workload: {m['num_requests']} requests submitted together (seed {w['seed']}), greedy, ignore_eos; "
        f"prompts {dist(w['prompt_len'])} ({m['prompt_tokens']:,} tokens), outputs {dist(w['output_len'])} "
        f"({m['output_tokens']:,} tokens); max_num_seqs {e['max_num_seqs']}, max_num_batched_tokens "
        f"{e['max_num_batched_tokens']:,}; engine start-up {r['engine_startup_s']:.1f} s",
        "| figure | value |", "|---|---|",
        f"| wall time | {m['wall_s']:.2f} s |",
        f"| requests/s | {m['requests_per_s']:.2f} |",
        f"| output tokens/s | {m['output_tokens_per_s']:,.0f} |",
        f"| total tokens/s (prompt + output) | {m['total_tokens_per_s']:,.0f} |",
        f"| steps: holding a prefill / decode-only | {m['steps']:,}: {p['steps']:,} / {d['steps']:,} |",
        f"| time in steps holding a prefill | {p['seconds']:.2f} s, {p['ms_per_step']:.2f} ms/step |",
        f"| time in decode-only steps | {d['seconds']:.2f} s, {d['ms_per_step']:.2f} ms/step |",
        f"| host time outside the model runner | {m['host_s']:.2f} s ({m['host_s'] / m['wall_s']:.0%} of the wall), "
        f"{m['host_ms_per_step']:.2f} ms/step ({p['host_ms_per_step']:.2f} in prefill steps, "
        f"{d['host_ms_per_step']:.2f} in decode-only) |",
        f"| wall time in no step (adding requests, the loop) | {m['outside_steps_s']:.3f} s |",
        f"| preemptions | {m['preemptions']} |",
        f"| greedy output checksum | {m['output_checksum']} |"])
