"""Where a decode step's time goes on the GPU, and which fused-MoE launch configs are fastest.

    PYTHONPATH=. python3 scripts/profile_decode.py        (CUDA only, about a minute on an H200;
                                                          --step-only: part 3 alone, ~25 s;
                                                          --batch=256: part 3 with 256 sequences;
                                                          --timeline: part 3's graph steps alone;
                                                          --fp8: part 3 with FP8 weights)

1. fused_moe launch-config sweep at the V2-Lite MoE shape for several token counts (CUDA graph
   replay, median of triton.testing.do_bench), thin row blocks also with swapped operands (SWAP_AB).
2. mla_decode at batch 1, 32 and 256 for several split counts, its whole tiles read with pointers and
   through TMA; at batches 1 and 256 also the tile size, warps and pipeline stages (the fastest six,
   with the bandwidth they reach). `--mla-only`: part 2 alone.
3. One decode step of a random V2-Lite model at 1K context (batch 1, or --batch=N sequences), eager,
   under the torch profiler: total kernel time per step, the top kernels and the kernels by family, against the CUDA-graph
   step time (the engine as it runs: asynchronous scheduling where it is on), and how much of the graph
   steps' wall time the device spends running kernels, and idle between them.
"""

from __future__ import annotations

import itertools
import sys
import time

import torch
import triton

from deepseek_v2.config import DEFAULT_MODEL, PRESETS, EngineConfig
from deepseek_v2.engine.llm_engine import LLMEngine
from deepseek_v2.kernels.mla_decode import mla_decode
from deepseek_v2.kernels.moe import default_config, fused_moe
from deepseek_v2.model import DeepseekV2ForCausalLM
from deepseek_v2.sampling_params import SamplingParams
from deepseek_v2.tokenizer import Tokenizer

DEV = "cuda"


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(8):
            fn()
    return triton.testing.do_bench(g.replay, warmup=20, rep=100, return_mode="median") * 1e3 / 8


def sweep_moe() -> None:
    E, D, I, K = 64, 2048, 1408, 6
    w13 = torch.randn(E, 2 * I, D, device=DEV, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, D, I, device=DEV, dtype=torch.bfloat16) * 0.02
    for T in (1, 8, 64, 256, 1024, 4096, 16384):  # 1024: a step admitting prompts beside the decodes
        x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E, device=DEV)[:K] for _ in range(T)]).int()
        w = torch.rand(T, K, device=DEV)
        results = []
        if T <= 16:
            space = [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, GROUP_M=1, num_warps=wp, num_stages=st)
                     for n, k, wp, st in itertools.product((32, 64), (128, 256), (2, 4), (4,))]
        elif T <= 256:
            space = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=wp, num_stages=st)
                     for m, n, k, wp, st in itertools.product((16, 32, 64), (64, 128), (64,), (4,), (4,))]
        elif T <= 2048:
            space = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=wp, num_stages=st)
                     for m, n, k, wp, st in itertools.product((32, 64, 128), (64, 128), (64,), (4, 8), (3, 4))]
        else:
            space = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=wp, num_stages=st)
                     for m, n, k, wp, st in itertools.product((64, 128), (128, 256), (64,), (8,), (3, 4))]
        # the thin row blocks again with swapped operands (the weight's columns as the MMA's rows)
        space += [dict(cfg, SWAP_AB=True) for cfg in space if cfg["BLOCK_M"] <= 32 and cfg["BLOCK_N"] >= 64]
        default = default_config(T * K / E)
        for cfg in [None] + space:
            try:
                us = graph_us(lambda: fused_moe(x, w13, w2, w, ids, config=cfg))
            except Exception:  # out of shared memory and the like
                continue
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        base = next(us for us, cfg in results if cfg is None)
        print(f"fused_moe T={T:6d}: default {base:8.1f} us ({default}); best:")
        for us, cfg in results[:3]:
            print(f"    {us:8.1f} us  {cfg}")


def sweep_mla() -> None:
    R, P, H, bs = 512, 64, 16, 64
    for batch, ctx in ((1, 1024), (1, 4096), (32, 1024), (256, 1024)):
        blocks = batch * ctx // bs
        cache = torch.randn(blocks + 1, bs, R + P, device=DEV, dtype=torch.bfloat16)
        tables = torch.arange(blocks, device=DEV, dtype=torch.int32).view(batch, -1)
        lens = torch.full((batch,), ctx, device=DEV, dtype=torch.int32)
        q = torch.randn(batch, H, R, device=DEV, dtype=torch.bfloat16)
        qp = torch.randn(batch, H, P, device=DEV, dtype=torch.bfloat16)
        for tma in (False, True):  # the whole tiles with pointers, or through tensor descriptors
            row = []
            for splits in (None, 1, 2, 4, 8, 16, 32, 64):
                us = graph_us(lambda: mla_decode(q, qp, cache, tables, lens, 0.1, num_kv_splits=splits,
                                                 max_seq_len=4104, tma=tma))
                row.append(f"{splits}:{us:.1f}")
            print(f"mla_decode B={batch} ctx={ctx}{' TMA' if tma else ''}: " + "  ".join(row))
        if batch in (1, 256):  # the tile and the launch, at the default split count and at one split
            results = []
            for splits, block_n, warps, stages, tma in itertools.product((None, 1), (32, 64), (4, 8), (2, 3, 4),
                                                                         (False, True)):
                try:
                    us = graph_us(lambda: mla_decode(q, qp, cache, tables, lens, 0.1, num_kv_splits=splits,
                                                     max_seq_len=4104, block_n=block_n, num_warps=warps,
                                                     num_stages=stages, tma=tma))
                except Exception:  # out of shared memory or registers
                    continue
                results.append((us, dict(splits=splits, block_n=block_n, num_warps=warps, num_stages=stages,
                                         tma=tma)))
            results.sort(key=lambda r: r[0])
            bytes_read = batch * ctx * (R + P) * 2
            for us, cfg in results[:6]:  # the fastest six
                print(f"    {us:8.1f} us ({bytes_read / us / 1e6:.2f} TB/s)  {cfg}")


def device_timeline(engine: LLMEngine, steps: int = 10) -> None:
    """How busy the device is over engine steps as they run (graphs, asynchronous scheduling): the union
    of the kernels' intervals against the wall time, and the gaps where the device ran nothing (waiting
    for the host, or between kernels)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t) * 1e6
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    if not spans:
        print("  no kernels recorded")
        return
    busy, gaps, (start, end) = 0.0, [], spans[0]
    for s, e in spans[1:]:
        if s > end:
            busy, gaps, start = busy + end - start, gaps + [s - end], s
        end = max(end, e)
    busy += end - start
    print(f"  device over {steps} steps: wall {wall_us / steps / 1e3:.2f} ms a step, kernels running "
          f"{busy / steps / 1e3:.2f} ms a step ({len(spans) / steps:.0f} kernels); idle between kernels "
          f"{sum(g for g in gaps if g <= 20) / steps / 1e3:.2f} ms a step in gaps of <= 20 us, "
          f"{sum(g for g in gaps if g > 20) / steps / 1e3:.2f} ms in longer ones (largest, us: "
          f"{', '.join(f'{g:.0f}' for g in sorted(gaps)[-4:])})")


# a kernel's family in the step's summary: the first pattern its name contains
FAMILIES = [("_moe_gemm_kernel", "routed experts' GEMMs"), ("_mla_decode_split", "MLA decode"),
            ("merge", "MLA decode's merge"), ("_fp8_linear", "FP8 GEMM (Triton)"), ("_sum_pieces", "FP8 GEMM (Triton)"),
            ("qqtst", "FP8 GEMM (cuBLAS)"), ("_quantize_kernel", "activations quantized"),
            ("_route_kernel", "router"), ("_topk_softmax", "router"), ("sgemm", "router"), ("splitKreduce", "router"),
            ("_rms_norm", "RMSNorm"), ("_mla_prepare", "MLA prepare"), ("_absorb", "W_UK's product"),
            ("_moe_align", "MoE alignment"), ("_combine", "MoE combine"), ("_silu", "SwiGLU activation"),
            ("nvjet", "bf16 GEMMs (cuBLAS: dense, W_UK / W_UV batched, LM head)"),
            ("copy", "copies and casts"), ("elementwise", "other elementwise")]


def family(kernel: str) -> str:
    return next((name for pattern, name in FAMILIES if pattern in kernel), "other")


def profile_step() -> None:
    batch = next((int(a.split("=")[1]) for a in sys.argv if a.startswith("--batch=")), 1)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(PRESETS["v2-lite"])
    model = model.to(torch.bfloat16).to_empty(device=DEV).init_weights(0).eval()
    if "--fp8" in sys.argv:  # FP8 weights, quantized from the random bf16 ones
        model.use_fp8()
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    for eager in (False,) if "--timeline" in sys.argv else (False, True):
        engine = LLMEngine(model, tok, EngineConfig(max_model_len=2048, max_num_seqs=max(4, batch),
                                                    enforce_eager=eager))
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True, detokenize=False)
        prompts = torch.randint(10, model.args.vocab_size, (batch, 1034), generator=torch.Generator().manual_seed(0))
        for i in range(batch):  # distinct random prompts: tokens that route as real traffic's do, no shared prefix
            engine.add_request(f"p{i}", prompts[i].tolist(), params)
        while any(s.num_computed_tokens < 1024 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # the prompts' prefill
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t) / 50 * 1e3
        print(f"{'eager' if eager else 'graph'} decode step at batch {batch}: {step_ms:.2f} ms")
        if not eager:
            device_timeline(engine)
        if eager:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    engine.step()
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
            total = sum(e.self_device_time_total for e in events) / 5 / 1e3
            count = sum(e.count for e in events) / 5
            print(f"kernel time per step {total:.2f} ms over {count:.0f} kernels; top kernels (ms/step, calls/step):")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:18]:
                print(f"  {e.self_device_time_total / 5 / 1e3:7.3f} {e.count / 5:6.0f}  {e.key[:110]}")
            print("by family (ms/step, calls/step):")
            families: dict[str, list[float]] = {}
            for e in events:
                total_calls = families.setdefault(family(e.key), [0.0, 0.0])
                total_calls[0] += e.self_device_time_total / 5 / 1e3
                total_calls[1] += e.count / 5
            for name, (ms, calls) in sorted(families.items(), key=lambda item: -item[1][0]):
                print(f"  {ms:7.3f} {calls:6.0f}  {name}")
        for i in range(batch):
            engine.abort(f"p{i}")
        del engine


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    parts = (profile_step, sweep_mla, sweep_moe)
    if "--step-only" in sys.argv:
        parts = (profile_step,)
    elif "--mla-only" in sys.argv:
        parts = (sweep_mla,)
    for fn in parts:
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:
            print(f"{fn.__name__} failed: {type(e).__name__}: {e}")
        print(f"[{fn.__name__}: {time.perf_counter() - t:.0f} s]", flush=True)
