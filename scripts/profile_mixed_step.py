"""What a step that holds a prefill costs beside the decodes of a full batch, and where its time goes.

    PYTHONPATH=. python3 scripts/profile_mixed_step.py        (CUDA only, about a minute on an H200)

Online, such steps make the tail of the inter-token latency: every decode of the batch waits for them.
A random V2-Lite model (bf16, the engine's defaults: CUDA graphs for decode-only steps, piecewise graphs
around eager prefill attention for steps with prefills) decodes 256 sequences at 1K context; then one new prompt
of P tokens joins, and the step that prefills it is timed (wall clock, synchronised), for several P,
against the decode-only step: once with every prompt through the piecewise graphs, once with the
engine's choice (a prompt of at most ModelRunner's ABSORBED_PREFILL_MAX_TOKENS runs as rows of the
decode graph). Then mixed steps cut into their host phases (building inputs, queueing the forward and,
within it, the eager attention calls and the graph replays, waiting, sampling, handling the tokens)
beside the device's busy time; last, one mixed step under the torch profiler: the kernels' total
against the wall time says whether the step waits for the device or for the host, and the top
kernels say which.
"""

from __future__ import annotations

import statistics
import time

import torch

from deepseek_v2.config import DEFAULT_MODEL, PRESETS, EngineConfig
from deepseek_v2.engine.llm_engine import LLMEngine
from deepseek_v2.model import DeepseekV2ForCausalLM
from deepseek_v2.sampling_params import SamplingParams
from deepseek_v2.tokenizer import Tokenizer

BATCH, CONTEXT = 256, 1024


def timed_step(engine: LLMEngine) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    engine.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3


def main() -> None:
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(PRESETS["v2-lite"])
    model = model.to(torch.bfloat16).to_empty(device="cuda").init_weights(0).eval()
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    engine = LLMEngine(model, tok, EngineConfig(max_model_len=4096, max_num_seqs=BATCH + 8, async_scheduling="off",
                                                num_kv_blocks=(BATCH + 8) * 4096 // 64))
    params = SamplingParams(temperature=0, max_tokens=3000, ignore_eos=True, detokenize=False)
    g = torch.Generator().manual_seed(0)
    vocab = model.args.vocab_size
    for i in range(BATCH):
        engine.add_request(f"d{i}", torch.randint(10, vocab, (CONTEXT,), generator=g).tolist(), params)
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running):
        engine.step()
    decode = [timed_step(engine) for _ in range(30)]
    print(f"decode-only step, {BATCH} x {CONTEXT}: median {statistics.median(decode):.2f} ms")
    short = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    absorbed_rows = engine.runner.absorbed_prefill_max_rows
    for mode, rows in (("piecewise", 0), ("absorbed where it may", absorbed_rows)):
        # the prompt chunks run as decode-graph rows where ModelRunner.absorbs_prefill says so, or never
        engine.runner.absorbed_prefill_max_rows = rows
        print(f"{mode} (largest decode graph {max(engine.runner.graphs)} rows):")
        for n in (16, 48, 200, 500, 1000, 2000, 4000):
            times = []
            for r in range(5):
                engine.add_request(f"p{n}-{r}-{rows}", torch.randint(10, vocab, (n,), generator=g).tolist(), short)
                times.append(timed_step(engine))
                engine.step()  # (a decode-only step between two mixed ones)
            print(f"  + one {n}-token prompt: median {statistics.median(times):.2f} ms "
                  f"(+{statistics.median(times) - statistics.median(decode):.2f})")
    # under the profiler last: once used, it slows the launches of what runs after it
    for rows, prompt_len in ((0, 200), (0, 48), (absorbed_rows, 48)):
        engine.runner.absorbed_prefill_max_rows = rows
        host_breakdown(engine, g, vocab, short, prompt_len)
    engine.runner.absorbed_prefill_max_rows = 0

    from torch.profiler import ProfilerActivity, profile
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for r in range(3):
            engine.add_request(f"prof-{r}", torch.randint(10, vocab, (200,), generator=g).tolist(), short)
            walls.append(timed_step(engine))
            engine.step()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    steps = 6  # three mixed steps and three decode-only ones
    kernels = sum(e.self_device_time_total for e in events) / 1e3
    print(f"profiled: 3 mixed steps {statistics.median(walls):.2f} ms wall each (profiler on); kernels of all 6 "
          f"steps {kernels:.1f} ms, {sum(e.count for e in events) / steps:.0f} kernels a step on average")
    print("top kernels over the 6 steps (ms, calls):")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} {e.count:6d}  {e.key[:110]}")
    cpu = [e for e in prof.key_averages() if e.device_type.name == "CPU"]
    print("top host functions (self ms over the 6 steps, calls):")
    for e in sorted(cpu, key=lambda e: -e.self_cpu_time_total)[:15]:
        print(f"  {e.self_cpu_time_total / 1e3:8.2f} {e.count:6d}  {e.key[:110]}")


def host_breakdown(engine: LLMEngine, g: torch.Generator, vocab: int, short: SamplingParams,
                   prompt_len: int) -> None:
    """One mixed step (256 decodes and one prompt of prompt_len tokens) cut into its host phases, each
    timed on the host: building the inputs, queueing the forward (of which the eager attention calls, prefill and
    decode, and the graph replays), waiting for the device, sampling, and the engine's handling of the tokens; beside it the
    device's busy time (the step's kernels, from the profiler). Queueing longer than the device's busy
    time means the device waits for the host."""
    from torch.profiler import ProfilerActivity, profile

    from deepseek_v2.engine.model_runner import LaunchedStep
    from deepseek_v2.engine.scheduler import ScheduledSequence
    from deepseek_v2.model import MLA
    runner, prefill, absorbed = engine.runner, MLA.prefill_attention, MLA.absorbed_attention
    spent = {"eager prefill attention": 0.0, "eager decode attention": 0.0, "graph replays": 0.0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    MLA.prefill_attention = timed("eager prefill attention", prefill)
    MLA.absorbed_attention = timed("eager decode attention", absorbed)  # none when the graphs run it
    replay = torch.cuda.CUDAGraph.replay
    torch.cuda.CUDAGraph.replay = timed("graph replays", replay)
    phases: dict[str, list[float]] = {}
    busy = []
    try:
        for r in range(5):
            prompt = torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
            engine.add_request(f"host-{r}-{runner.absorbed_prefill_max_rows}", prompt, short)
            torch.cuda.synchronize()
            for key in spent:
                spent[key] = 0.0
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                marks = [time.perf_counter()]
                sched = engine.scheduler.schedule()
                step = runner.prepare_inputs(sched)
                marks.append(time.perf_counter())
                logits = runner.forward(step.forward)
                marks.append(time.perf_counter())
                torch.cuda.synchronize()
                marks.append(time.perf_counter())
                results = runner.sample(step, logits)
                marks.append(time.perf_counter())
                engine._process(sched.scheduled, runner.collect(LaunchedStep(step, results=results)))
                marks.append(time.perf_counter())
            names = ("schedule + inputs", "queue the forward", "wait for the device", "sample", "handle tokens")
            for name, a, b in zip(names, marks, marks[1:]):
                phases.setdefault(name, []).append((b - a) * 1e3)
            for key, value in spent.items():
                phases.setdefault(f"  of which {key}", []).append(value * 1e3)
            phases.setdefault("wall", []).append((marks[-1] - marks[0]) * 1e3)
            busy.append(sum(e.self_device_time_total for e in prof.key_averages()
                            if e.device_type.name == "CUDA") / 1e3)
            engine.step()
    finally:
        MLA.prefill_attention, MLA.absorbed_attention, torch.cuda.CUDAGraph.replay = prefill, absorbed, replay
    how = "absorbed" if runner.absorbs_prefill([ScheduledSequence(engine.scheduler.running[0], prompt_len)]) \
        else "piecewise"
    print(f"one mixed step (256 decodes + a {prompt_len}-token prompt, {how}), host phases (median of 5, ms):")
    for name, values in phases.items():
        print(f"  {name:28s} {statistics.median(values):7.2f}")
    print(f"  device busy (kernels)        {statistics.median(busy):7.2f}")


if __name__ == "__main__":
    main()
