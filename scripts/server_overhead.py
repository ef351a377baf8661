"""What the serving layer costs by itself: the engine and the server with the model's forward replaced
by a stand-in for the H200's step: the step's kernel launches as as many small torch calls (each lets
go of the GIL and takes it back, as a launch does), then a sleep until the modelled GPU time has
passed (the GPU leaves the host free while it works); on the shipped model's tokenizer and vocabulary.

    PYTHONPATH=. python scripts/server_overhead.py offline [--num-prompts 500]
    PYTHONPATH=. python scripts/server_overhead.py serve --port 8041 [--gc-stats] [--no-freeze-gc] &  # then drive it:
    PYTHONPATH=. python -m deepseek_v2.cli bench-serve --url http://127.0.0.1:8041 --num-prompts 500 \\
        --request-rate 20,inf

`offline` steps the engine directly (the upper bound the server can reach with this step time);
`serve` is `deepseek-v2 serve` with the same stand-in. The step time is a fit of the H200 runs of
docs/benchmarks.md (V2-Lite shape, bf16, CUDA graphs): STEP_MS + DECODE_US per decode row + PREFILL_US
per prefill token (255 decodes: 11 ms; a step with 8K prefill tokens beside them: ~43 ms). Every
sampled token is the same ordinary text token, so each one is streamed as a chunk of text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STEP_MS, DECODE_US, PREFILL_US = 6.0, 20.0, 4.0
# Python-dispatched operations a step launches (each releases the GIL and must take it back, as a
# torch call does): a decode-only step replays one CUDA graph among a few input copies; a step that
# holds prefills replays a graph per layer with attention eager between them (27 layers, about a
# dozen launches each: engine/piecewise.py)
OPS_DECODE, OPS_PREFILL = 20, 27 * 12
TOKEN = 300  # an ordinary token of the shipped vocabulary


def stand_in() -> None:
    """Replace ModelRunner.forward by a sleep of the modelled GPU time and logits that pick TOKEN."""
    import torch

    from deepseek_v2.engine.model_runner import ModelRunner

    x = torch.zeros(8)

    def forward(self, f, device_ids=None):
        prefill_tokens = sum(f.prefill_query_lens)
        decodes = len(f.input_ids) - prefill_tokens
        gpu_s = (STEP_MS + DECODE_US * decodes / 1e3 + PREFILL_US * prefill_tokens / 1e3) / 1e3
        start = time.perf_counter()
        for _ in range(OPS_PREFILL if prefill_tokens else OPS_DECODE):  # the launches
            torch.add(x, 1.0)
        time.sleep(max(0.0, gpu_s - (time.perf_counter() - start)))  # the GPU finishing behind them
        if not f.logit_rows:
            return None
        logits = torch.zeros(len(f.logit_rows), self.model.args.vocab_size)
        logits[:, TOKEN] = 1.0
        return logits

    ModelRunner.forward = forward


ENGINE_KNOBS = dict(device="cpu", max_num_seqs=256, max_num_batched_tokens=16384, num_kv_blocks=8192,
                    enforce_eager=True)


def when_serving(callback) -> None:
    """Call callback(engine) on the event loop once the server's engine has loaded, from the loop's
    next turn: after the server's own start-up work that follows the load (its freeze of the heap, a
    full collection of the start-up heap)."""
    import asyncio

    from deepseek_v2.engine.async_engine import AsyncLLMEngine
    loaded = AsyncLLMEngine.wait_until_loaded

    async def wait_until_loaded(self):
        await loaded(self)
        asyncio.get_running_loop().call_soon(callback, self)

    AsyncLLMEngine.wait_until_loaded = wait_until_loaded


def report_gc_pauses(garbage_types: bool = False) -> None:
    """Print, at exit, how long the garbage collector stopped the process, per generation, while the
    server started (loading: the model, torch's modules) and once it served, and how many objects it
    freed (those in reference cycles, which only it frees). A full collection walks every live object
    outside the frozen start-up heap. garbage_types: also print what each full collection walks and
    count the cyclic garbage by type (gc.DEBUG_SAVEALL, emptied after each collection)."""
    import atexit
    import collections
    import gc

    pauses: dict[tuple[str, int], list[float]] = collections.defaultdict(list)
    freed = collections.Counter()
    types = collections.Counter()
    started, phase_of = [0.0], ["start-up"]
    when_serving(lambda engine: phase_of.__setitem__(0, "serving"))

    def timer(phase, info):
        key = (phase_of[0], info["generation"])
        if phase == "start":
            if garbage_types and key == ("serving", 2):  # what a full collection walks, by type
                walked = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
                print("gc full collection walks", sum(walked.values()), "objects:", dict(walked.most_common(12)),
                      file=sys.stderr, flush=True)
            started[0] = time.perf_counter()
            return
        pauses[key].append(time.perf_counter() - started[0])
        freed[key] += info["collected"]
        if garbage_types:
            types.update(type(o).__qualname__ for o in gc.garbage)
            gc.garbage.clear()

    def report():
        for (phase, generation), times in sorted(pauses.items(), key=lambda kv: (kv[0][0] != "start-up", kv[0][1])):
            print(f"gc generation {generation}, {phase}: {len(times)} collections, {1e3 * sum(times):.1f} ms in all, "
                  f"longest {1e3 * max(times):.1f} ms, {freed[phase, generation]} objects freed", file=sys.stderr,
                  flush=True)
        if types:
            print("gc cyclic garbage by type:", dict(types.most_common(25)), file=sys.stderr, flush=True)

    if garbage_types:
        gc.set_debug(gc.DEBUG_SAVEALL)
    gc.callbacks.append(timer)
    atexit.register(report)


def report_step_gaps(slow_ms: float = 30.0) -> None:
    """Print, at exit, what the engine's steps were where a running sequence waited more than slow_ms
    for its next token: the time from one step's outputs to the next's (what a stream's inter-token
    latency is made of; the engine call itself in brackets), by kind of step (decode-only or holding
    prompt tokens; launched ahead or scheduled then) with its prompt tokens and decodes. Only steps that carried decodes count; once no request is left, the next steps are another
    run (the benchmark's next request rate)."""
    import atexit

    from deepseek_v2.engine.llm_engine import LLMEngine
    runs: list[list[tuple]] = [[]]  # per run: (kind, gap, call, prompt tokens, decodes)
    last = {"done": None, "sched": None}
    step, schedule = LLMEngine.step, None

    def timed_step(self):
        nonlocal schedule
        if schedule is None:  # the scheduler's last step, seen through its schedule()
            schedule = self.scheduler.schedule

            def remembered():
                last["sched"] = schedule()
                return last["sched"]
            self.scheduler.schedule = remembered
        ahead = self._ahead
        last["sched"] = None
        start = time.perf_counter()
        outputs = step(self)
        done = time.perf_counter()
        items = ahead.step.items if ahead is not None else last["sched"].scheduled if last["sched"] else None
        if items is not None:
            prompt = sum(i.num_new_tokens for i in items if i.num_new_tokens > 1)
            decodes = sum(1 for i in items if i.num_new_tokens == 1)
            when = "launched ahead" if ahead is not None else "scheduled"
            kind = f"with prompt tokens, {when}" if prompt else f"decode-only, {when}"
        else:
            kind, prompt, decodes = None, 0, 0
        if kind is not None and decodes and last["done"] is not None:
            runs[-1].append((kind, done - last["done"], done - start, prompt, decodes))
        last["done"] = done if outputs else None
        if not self.has_unfinished_requests() and runs[-1]:  # drained: the next steps are another run
            runs.append([])
        return outputs

    LLMEngine.step = timed_step

    def mean(rows, k):
        return sum(r[k] for r in rows) / len(rows) if rows else 0.0

    def report():
        for number, records in enumerate(r for r in runs if r):
            slow = [r for r in records if r[1] * 1e3 > slow_ms]
            print(f"steps with decodes, run {number + 1}: {len(records)}; gaps over {slow_ms:g} ms: {len(slow)}",
                  file=sys.stderr)
            for kind in sorted({r[0] for r in records}):
                every = [r for r in records if r[0] == kind]
                over = [r for r in slow if r[0] == kind]
                print(f"  {kind}: {len(every)} steps, {len(over)} over; all: gap {1e3 * mean(every, 1):.1f} ms "
                      f"(call {1e3 * mean(every, 2):.1f}), prompt tokens {mean(every, 3):.0f}, decodes "
                      f"{mean(every, 4):.0f}; over: gap {1e3 * mean(over, 1):.1f} ms (call {1e3 * mean(over, 2):.1f}), "
                      f"prompt tokens {mean(over, 3):.0f}, decodes {mean(over, 4):.0f}", file=sys.stderr, flush=True)

    atexit.register(report)


def report_loop_lag(interval_s: float = 0.005) -> None:
    """Print, at exit, how late the server's event loop woke from a sleep of interval_s while it
    served: the delay every streamed chunk, HTTP read and request admission meets there (the loop
    shares the interpreter lock with the engine thread)."""
    import asyncio
    import atexit

    lags: list[float] = []

    async def monitor():
        while True:
            start = time.perf_counter()
            await asyncio.sleep(interval_s)
            lags.append(time.perf_counter() - start - interval_s)

    def start(engine):
        engine._lag_monitor = asyncio.get_running_loop().create_task(monitor())  # referenced: not collected

    when_serving(start)

    def report():
        if lags:
            ordered = sorted(lags)
            share = {ms: sum(lag * 1e3 > ms for lag in lags) / len(lags) for ms in (10, 30)}
            print(f"event loop lag over {len(lags)} wake-ups: p50 {1e3 * ordered[len(lags) // 2]:.1f} ms, p99 "
                  f"{1e3 * ordered[int(len(lags) * 0.99)]:.1f} ms, max {1e3 * ordered[-1]:.1f} ms; over 10 ms "
                  f"{100 * share[10]:.1f}%, over 30 ms {100 * share[30]:.2f}%", file=sys.stderr, flush=True)

    atexit.register(report)


def keep_gc_unfrozen() -> None:
    """The server without its freeze of the start-up heap (`async_engine.freeze_loaded_heap`), for an
    A/B of what that freeze buys."""
    from deepseek_v2.engine import async_engine
    async_engine.freeze_loaded_heap = lambda: None


def offline(args) -> None:
    from deepseek_v2 import workload as W
    from deepseek_v2.bench_mixed import bench_mixed
    from deepseek_v2.engine.llm_engine import LLMEngine
    stand_in()
    engine = LLMEngine.from_pretrained(None, **ENGINE_KNOBS)
    # the host's work of a step in its parts: scheduling, the runner's inputs, the tokens' handling
    # (appending, stop checks, detokenizing, the outputs)
    spent = {"schedule": 0.0, "prepare inputs": 0.0, "handle tokens": 0.0}

    def timed(name, fn):
        def wrapper(*a):
            t = time.perf_counter()
            result = fn(*a)
            spent[name] += time.perf_counter() - t
            return result
        return wrapper

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine.runner.prepare_inputs = timed("prepare inputs", engine.runner.prepare_inputs)
    engine._process = timed("handle tokens", engine._process)
    result = bench_mixed(engine, W.from_args(args), warm_up=lambda: None)
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()
           if k in ("num_requests", "output_tokens", "wall_s", "requests_per_s", "output_tokens_per_s", "steps",
                    "host_ms_per_step")})
    print("host us per output token:", {k: round(v * 1e6 / result["output_tokens"], 1) for k, v in spent.items()})


def serve(args) -> None:
    from deepseek_v2.server.cli import main
    os.environ[STAND_IN_ENV] = "1"  # an engine process re-imports this file, which then stands in there too
    stand_in()
    if args.gc_stats or args.gc_garbage_types:
        report_gc_pauses(args.gc_garbage_types)
    if args.step_stats:
        report_step_gaps()
        report_loop_lag()
    if args.no_freeze_gc:
        keep_gc_unfrozen()
    if args.gc_threshold:
        import gc
        gc.set_threshold(*(int(x) for x in args.gc_threshold.split(",")))
    knobs = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE_KNOBS.items() if k != "enforce_eager"]
    extra = ["--engine-process"] if args.engine_process else []
    sys.exit(main(knobs + extra + ["--enforce-eager", "--port", str(args.port), "--log-level", "warning"]))


STAND_IN_ENV = "DEEPSEEK_V2_STAND_IN"
if __name__ != "__main__" and os.environ.get(STAND_IN_ENV) == "1":
    stand_in()


if __name__ == "__main__":
    from deepseek_v2 import workload as W
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    W.add_arguments(sub.add_parser("offline"))
    serving = sub.add_parser("serve")
    serving.add_argument("--port", type=int, default=8041)
    serving.add_argument("--gc-stats", action="store_true", help="print the garbage collector's pauses at exit")
    serving.add_argument("--gc-garbage-types", action="store_true",
                         help="also count the cyclic garbage by type (slower: every cycle is kept until counted)")
    serving.add_argument("--step-stats", action="store_true",
                         help="print, at exit, what the steps were where a stream waited over 30 ms for a token, "
                              "and how late the event loop woke")
    serving.add_argument("--engine-process", action="store_true", help="the engine in a process of its own")
    serving.add_argument("--no-freeze-gc", action="store_true",
                         help="leave the start-up heap to the collector (the server freezes it by default)")
    serving.add_argument("--gc-threshold", help="the collector's thresholds, e.g. 700,10,100 (gc.set_threshold)")
    a = p.parse_args()
    offline(a) if a.mode == "offline" else serve(a)
