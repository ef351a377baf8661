"""What a step that holds a prefill costs beside the decodes of a full batch, and where its time goes.

    PYTHONPATH=. python3 scripts/profile_mixed_step.py        (CUDA only, about a minute on an H200)

Online, such steps make the tail of the inter-token latency: every decode of the batch waits for them.
A random V2-Lite model (bf16, the engine's defaults: CUDA graphs for decode-only steps, piecewise graphs
around eager attention for steps with prefills) decodes 256 sequences at 1K context; then one new prompt
of P tokens joins, and the step that prefills it is timed (wall clock, synchronised), for several P,
against the decode-only step. Last, one mixed step under the torch profiler: the kernels' total against
the wall time says whether the step waits for the device or for the host, and the top kernels say which.
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
    for n in (16, 200, 1000, 2000, 4000):
        times = []
        for r in range(5):
            engine.add_request(f"p{n}-{r}", torch.randint(10, vocab, (n,), generator=g).tolist(), short)
            times.append(timed_step(engine))
            engine.step()  # (a decode-only step between two mixed ones)
        print(f"  + one {n}-token prompt: median {statistics.median(times):.2f} ms "
              f"(+{statistics.median(times) - statistics.median(decode):.2f})")

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


if __name__ == "__main__":
    main()
