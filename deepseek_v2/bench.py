"""`deepseek-v2 bench`, two workloads.

`--workload fixed` (the default): batch-1 decode latency, output throughput at several
concurrencies, prefill throughput and time to first token, each against the floor that memory
bandwidth or arithmetic sets (both ceilings measured in the same run), optionally beside Hugging
Face transformers' `generate` on the same weights in the same process.

`--workload mixed`: the requests of workload.py (log-normal lengths) submitted together and run
to the end with greedy sampling: throughput, how the steps split between those that hold a
prefill and decode-only ones, the host time outside the model runner, and a checksum of every
output token so that two versions of the engine can be shown to give the same greedy outputs.

Random weights of a named shape (`--shape v2-lite`), a config.json, or a real checkpoint.
The mixed workload's run is bench_mixed.py, the transformers baseline bench_hf.py.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import DEFAULT_MODEL, PRESETS, EngineConfig, ModelArgs
from .engine.llm_engine import LLMEngine
from .engine.workers import ModelSource
from .flags import add_engine_arguments, add_model_arguments, engine_kwargs, flag_name
from .plan import cache_bytes_per_token, fp8_parameters
from .sampling_params import SamplingParams
from .tokenizer import Tokenizer
from . import workload as W
from .bench_hf import bench_hf, sync
from .bench_mixed import bench_mixed, format_mixed, title


WARMUP_LEN = 64  # prompt tokens of the warm-up requests
MIXED_MAX_NUM_SEQS = 256  # the mixed workload's concurrency unless --max-num-seqs is given


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shape", choices=sorted(PRESETS), help="random weights of a built-in shape")
    src.add_argument("--config", help="random weights of the shape in this config.json")
    add_model_arguments(p, model_into=src)
    p.add_argument("--workload", choices=["fixed", "mixed"], default="fixed",
                   help="fixed: the runs below (batch-1 decode, --batch-sizes, prefill); mixed: --num-prompts "
                        "requests of log-normal lengths submitted together (default: %(default)s)")
    p.add_argument("--batch-sizes", default="1,32,256", help="concurrencies for the throughput runs")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--decode-len", type=int, default=128, help="tokens for the batch-1 latency run")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--prefill-prompts", type=int, default=8)
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' generate on the same weights")
    p.add_argument("--hf-batch-sizes", default="1,8,32")
    p.add_argument("--hf-output-len", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results to this file")
    W.add_arguments(p)
    add_engine_arguments(p)
    # The settings docs/benchmarks.md's figures were measured with. None: sized from the workload.
    p.set_defaults(dtype="bfloat16", max_num_batched_tokens=16384, gpu_memory_utilization=0.85,
                   max_model_len=None, max_num_seqs=None)
    p.epilog = ("Unless given, --max-model-len and --max-num-seqs (None above) are what the workload needs: "
                "the longest prompt plus output, the largest concurrency (mixed: "
                f"{MIXED_MAX_NUM_SEQS}). A larger value is used as given, a smaller --max-model-len is refused.")


def engine_config(args) -> EngineConfig:
    """The flags' EngineConfig, with max_model_len and max_num_seqs sized for the workload unless given
    (a given value below the workload's needs would fail or mislabel a figure, so it is refused)."""
    knobs = engine_kwargs(args)
    if args.workload == "mixed":
        need = {"max_model_len": max(args.prompt_len_max + args.output_len_max, WARMUP_LEN + 8)}
        knobs["max_num_seqs"] = knobs["max_num_seqs"] or MIXED_MAX_NUM_SEQS  # a knob here, not a need
    else:
        need = {"max_model_len": max(args.prompt_len + max(args.output_len, args.decode_len), args.prefill_len,
                                     WARMUP_LEN) + 8,
                "max_num_seqs": max([int(x) for x in args.batch_sizes.split(",")] + [args.prefill_prompts])}
    for name, value in need.items():
        if knobs[name] is None:
            knobs[name] = value
        elif knobs[name] < value:
            raise ValueError(f"{flag_name(name)} {knobs[name]} is below the {value} this workload needs")
    return EngineConfig(**knobs)


@dataclass
class Ceilings:
    bandwidth: float  # bytes/s, device-to-device copy counting read + write
    flops: float  # bf16 matmul FLOP/s


def measure_ceilings(device: torch.device) -> Ceilings:
    if device.type != "cuda":
        return Ceilings(bandwidth=float("nan"), flops=float("nan"))
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    y = torch.randn_like(x)

    dev = device

    def timed(fn, reps=10):
        fn()
        sync(dev)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(dev)
        return (time.perf_counter() - start) / reps

    return Ceilings(2 * n / timed(lambda: b.copy_(a)), 2 * 8192**3 / timed(lambda: x @ y))


def model_source(args) -> tuple[ModelSource, str]:
    """Random weights of a shape (a preset or a config.json), or a checkpoint; and how to name it."""
    if args.shape:
        return ModelSource(args=PRESETS[args.shape]), f"random weights, shape {args.shape}"
    if args.config:  # a config.json file, or a directory holding one
        path = Path(args.config)
        margs = ModelArgs.from_hf_config(json.loads((path / "config.json" if path.is_dir() else path).read_text()))
        return ModelSource(args=margs), f"random weights, shape {args.config}"
    path = args.model or DEFAULT_MODEL
    return ModelSource(path=path), path


def engine_source(args):
    """(model source, EngineConfig, dtype, device): what every tensor-parallel rank builds (the CLI)."""
    return model_source(args)[0], engine_config(args), args.dtype, args.device


# ---- floors ---------------------------------------------------------------------------------------
def decode_bytes(a: ModelArgs, batch: int, context: int, dtype_bytes: int = 2, tp: int = 1,
                 fp8_weights: bool = False, fp8_cache: bool = False) -> float:
    """Bytes one decode step must read on each GPU: every always-used weight, the routed experts the
    batch touches (uniform routing), the LM head (these split over tp GPUs; the small replicated
    matrices counted as split too), and the batch's latent cache (replicated: each GPU reads it all).
    FP8 weights and cache count 1 byte per value (and their cache scales; the weights' block scales
    are 1/4096 of a byte per value, left out). All-reduce time is not in it."""
    D = a.hidden_size
    counts = a.num_parameters()
    expert = 3 * D * a.moe_intermediate_size
    moe_layers = sum(a.is_moe_layer(i) for i in range(a.num_hidden_layers))
    routed_active = moe_layers * a.num_experts_per_tok * expert if a.n_routed_experts else 0
    always = counts["activated"] - routed_active
    if a.n_routed_experts:
        E, K = a.n_routed_experts, a.num_experts_per_tok
        touched = E * (1 - (1 - K / E) ** batch)
        always += moe_layers * touched * expert
    weights = always * dtype_bytes
    if fp8_weights:  # the FP8 ones read 1 byte, not dtype_bytes: the touched experts and the always-used rest
        fp8_sharded, fp8_replicated, _, _ = fp8_parameters(a, 1)
        routed_held = moe_layers * (a.n_routed_experts or 0) * expert
        fp8_always = fp8_sharded + fp8_replicated - routed_held + (always - counts["activated"] + routed_active)
        weights -= fp8_always * (dtype_bytes - 1)
    kv = batch * context * cache_bytes_per_token(a, 1 if fp8_cache else dtype_bytes)
    return weights / tp + kv


def prefill_flops_per_token(a: ModelArgs, length: int) -> float:
    linear = 2 * (a.num_parameters()["activated"] - a.vocab_size * a.hidden_size)
    attn = 2 * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * a.num_hidden_layers * (length + 1) / 2
    return linear + attn


# ---- runs -----------------------------------------------------------------------------------------
def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def run_requests(engine: LLMEngine, prompts, max_tokens: int):
    """Run prompts to completion; returns (wall seconds, per-request outputs, decode-only step
    time and tokens)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}-{time.monotonic_ns()}", p, params)
    sync(engine.runner.device)
    start = time.perf_counter()
    outs, decode_time, decode_tokens = [], 0.0, 0
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        sched_decodes = all(s.num_uncomputed_tokens == 1 for s in engine.scheduler.running) and not engine.scheduler.waiting
        step_out = engine.step()
        dt = time.perf_counter() - t0
        if sched_decodes:
            decode_time += dt
            decode_tokens += len(engine.scheduler.running) + sum(o.finished for o in step_out)
        outs += [o for o in step_out if o.finished]
    return time.perf_counter() - start, outs, decode_time, decode_tokens


def bench_engine(engine: LLMEngine, a: ModelArgs, args, ceil: Ceilings) -> dict:
    vocab, res, tp = a.vocab_size, {}, engine.config.tensor_parallel_size  # floors and MFU per GPU
    run_requests(engine, random_prompts(2, WARMUP_LEN, vocab, 0), 8)  # warm up
    # batch-1 decode latency at prompt_len context
    _, outs, dtime, dtok = run_requests(engine, random_prompts(1, args.prompt_len, vocab, 1), args.decode_len)
    m = outs[0].metrics
    ms = 1e3 * (m.last_token_time - m.first_token_time) / (args.decode_len - 1)
    fp8 = dict(fp8_weights=a.quantization == "fp8", fp8_cache=engine.config.kv_cache_dtype == "fp8")
    floor_ms = 1e3 * decode_bytes(a, 1, args.prompt_len, tp=tp, **fp8) / ceil.bandwidth
    res["decode_b1"] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms, "floor_ms": floor_ms,
                        "fraction_of_floor": floor_ms / ms}
    # throughput at each concurrency
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        wall, outs, dtime, dtok = run_requests(engine, random_prompts(b, args.prompt_len, vocab, 2 + b),
                                               args.output_len)
        total_out = sum(len(o.outputs[0].token_ids) for o in outs)
        ctx = args.prompt_len + args.output_len // 2
        floor_step = decode_bytes(a, b, ctx, tp=tp, **fp8) / ceil.bandwidth
        decode_tps = dtok / dtime if dtime else float("nan")
        res[f"throughput_b{b}"] = {"output_tokens_per_s": total_out / wall, "decode_tokens_per_s": decode_tps,
                                   "decode_floor_tokens_per_s": b / floor_step,
                                   "decode_fraction_of_floor": decode_tps / (b / floor_step), "wall_s": wall}
    # prefill throughput and time to first token
    n, L = args.prefill_prompts, args.prefill_len
    wall, _, _, _ = run_requests(engine, random_prompts(n, L, vocab, 100), 1)
    fl = prefill_flops_per_token(a, L)
    res["prefill"] = {"prompt_len": L, "prompts": n, "tokens_per_s": n * L / wall,
                      "mfu": n * L * fl / wall / (ceil.flops * tp)}
    wall, _, _, _ = run_requests(engine, random_prompts(1, args.prompt_len, vocab, 200), 1)
    res["ttft"] = {"prompt_len": args.prompt_len, "ms": 1e3 * wall}
    return res


def run(args) -> None:
    config = engine_config(args)  # a refused value fails here, before the minutes of measuring
    mixed = W.from_args(args) if args.workload == "mixed" else None  # (a bad distribution fails here too)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.compare_hf and (mixed or config.tensor_parallel_size > 1 or config.quantization):
        raise ValueError("--compare-hf runs transformers in this process on the fixed workload and the same bf16 "
                         "weights: use it with one process (-tp 1), --workload fixed and no --quantization")
    ceil = None if mixed else measure_ceilings(device)  # the mixed workload has no floors
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the ceiling measurement's buffers back before the model
    source, description = model_source(args)
    tokenizer = Tokenizer.from_pretrained(args.model or DEFAULT_MODEL)
    t = time.perf_counter()
    engine = LLMEngine.from_source(source, tokenizer, config, args.dtype, args.device)
    startup = time.perf_counter() - t  # building (or loading) the weights, the profile run, the graphs
    model, a = engine.model, engine.model.args
    results = {"source": description, "tensor_parallel_size": config.tensor_parallel_size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "dtype": str(model.dtype).removeprefix("torch."),  # "auto" resolved
               "quantization": a.quantization, "kv_cache_dtype": config.kv_cache_dtype,
               "async_scheduling": engine.async_scheduling, "engine_startup_s": startup, "workload": args.workload}
    if mixed:
        results["engine"] = {"max_num_seqs": config.max_num_seqs,
                             "max_num_batched_tokens": config.max_num_batched_tokens,
                             "max_model_len": engine.max_model_len,
                             "enable_prefix_caching": config.enable_prefix_caching}
        results["mixed_workload"] = mixed.describe()
        results["mixed"] = bench_mixed(engine, mixed, lambda: run_requests(engine, random_prompts(
            2, WARMUP_LEN, engine.model.args.vocab_size, 0), 8))
    else:
        results["ceilings"] = {"copy_GBps": ceil.bandwidth / 1e9, "matmul_TFLOPs": ceil.flops / 1e12}
        results["ours"] = bench_engine(engine, a, args, ceil)
    engine.close()  # the other tensor-parallel ranks, if any
    if args.compare_hf:
        del engine
        import gc
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results["hf"] = bench_hf(model, args, a, random_prompts)
    print(format_mixed(results) if mixed else format_results(results, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def format_results(r: dict, args) -> str:
    o = r["ours"]
    lines = [title(r),
             f"ceilings measured: copy {r['ceilings']['copy_GBps']:.0f} GB/s, bf16 matmul "
             f"{r['ceilings']['matmul_TFLOPs']:.0f} TFLOP/s; engine start-up {r['engine_startup_s']:.1f} s",
             "| figure | ours | floor | ours/floor |" + (" HF | ours/HF |" if "hf" in r else ""),
             "|---|---|---|---|" + ("---|---|" if "hf" in r else "")]
    d = o["decode_b1"]
    row = (f"| batch-1 decode, {args.prompt_len}-token context | {d['ms_per_token']:.2f} ms/token "
           f"({d['tokens_per_s']:.0f} tok/s) | {d['floor_ms']:.2f} ms | {d['fraction_of_floor']:.0%} |")
    if "hf" in r and "decode_b1" in r["hf"]:
        h = r["hf"]["decode_b1"]
        row += f" {h['ms_per_step']:.1f} ms/token | {h['ms_per_step'] / d['ms_per_token']:.1f}x |"
    lines.append(row)
    for key, v in o.items():
        if key.startswith("throughput_b"):
            b = int(key[len("throughput_b"):])
            row = (f"| {b} concurrent, {args.prompt_len} in / {args.output_len} out | "
                   f"{v['output_tokens_per_s']:.0f} output tok/s overall, {v['decode_tokens_per_s']:.0f} in decode steps"
                   f" | {v['decode_floor_tokens_per_s']:.0f} tok/s (decode) | {v['decode_fraction_of_floor']:.0%} |")
            if "hf" in r and f"decode_b{b}" in r["hf"]:
                h = r["hf"][f"decode_b{b}"]["tokens_per_s"]
                row += f" {h:.0f} tok/s (decode) | {v['decode_tokens_per_s'] / h:.1f}x |"
            lines.append(row)
    p = o["prefill"]
    row = (f"| prefill, {p['prompts']} x {p['prompt_len']} tokens | {p['tokens_per_s']:.0f} tok/s | "
           f"compute | {p['mfu']:.0%} MFU |")
    if "hf" in r:
        row += f" {r['hf']['prefill']['tokens_per_s']:.0f} tok/s (1 prompt) | {p['tokens_per_s'] / r['hf']['prefill']['tokens_per_s']:.1f}x |"
    lines.append(row)
    lines.append(f"| time to first token, {o['ttft']['prompt_len']}-token prompt | {o['ttft']['ms']:.1f} ms | | |"
                 + (" | |" if "hf" in r else ""))
    return "\n".join(lines)
