"""Time the fused small-op kernels against the eager PyTorch code they replace, on one GPU.

Run: python scripts/bench_fused_kernels.py     (CUDA only; under a minute on an H200)

Shapes are DeepSeek-V2-Lite's (D=2048, 16 heads, R=512, P=64, 64 experts top-6, bf16), and the router
also at DeepSeek-V2's (D=5120, 160 experts top-6 in 8 groups, 3 kept). Times are triton.testing.do_bench
medians (L2 flushed before each sample). T=1 (a decode step; the router also at T=64) is timed from a
CUDA graph holding REPS back-to-back calls, divided by REPS: per-call launch overheads vanish in a graph,
what remains is what the decode graph pays per op. T=16384 (a prefill) is timed eagerly, with the
bandwidth the fused kernel reaches against the H200's 4.8 TB/s. "kernels" counts the GPU kernels one
eager call launches (torch profiler).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deepseek_v2.kernels import reference  # noqa: E402
from deepseek_v2.kernels.activation import silu_and_mul  # noqa: E402
from deepseek_v2.kernels.mla_prepare import mla_prepare  # noqa: E402
from deepseek_v2.kernels.norm import rms_norm  # noqa: E402
from deepseek_v2.kernels import router  # noqa: E402
from deepseek_v2.kernels.router import topk_softmax  # noqa: E402

DEVICE = "cuda"
BF16 = torch.bfloat16
PEAK_BYTES = 4.8e12
REPS = 16  # calls per CUDA graph at T=1


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median") * 1e3


def graphed_us(fn) -> float:
    """Per-call time of fn replayed REPS times back to back from one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    return median_us(graph.replay) / REPS


def count_kernels(fn) -> str:
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return str(sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA))
    except Exception:  # noqa: BLE001 - no CUPTI: leave the column blank
        return "?"


def inputs(op: str, T: int):
    """(fused call, eager call, bytes the fused kernel moves) for one op at T tokens; fresh buffers."""
    g = torch.Generator(device=DEVICE).manual_seed(T)

    def randn(*shape, dtype=BF16):
        return torch.randn(*shape, device=DEVICE, generator=g).to(dtype)

    if op == "rms_norm D=2048":
        x, w = randn(T, 2048), randn(2048)
        return (lambda: rms_norm(x, w, 1e-6)), (lambda: reference.rms_norm(x, w, 1e-6)), 2 * T * 2048 * 2
    if op == "add+rms_norm D=2048":
        x, r, w = randn(T, 2048), randn(T, 2048), randn(2048)
        return ((lambda: rms_norm(x, w, 1e-6, residual=r)), (lambda: reference.rms_norm(x, w, 1e-6, residual=r)),
                4 * T * 2048 * 2)
    if op == "mla_prepare H=16":
        H, R, P, dn = 16, 512, 64, 128
        q, kv, w = randn(T, H * (dn + P)), randn(T, R + P), randn(R)
        q_pe = q.unflatten(-1, (H, dn + P)).split([dn, P], -1)[1]
        angles = randn(T, P // 2, dtype=torch.float32) * 100  # a real rotation: repeated calls stay finite
        cos, sin = torch.cos(angles), torch.sin(angles)
        cache = randn(T // 64 + 8, 64, R + P)
        slots = torch.randperm(cache.shape[0] * 64, device=DEVICE, generator=g)[:T]
        return ((lambda: mla_prepare(q_pe, kv, cos, sin, w, 1e-6, cache, slots)),
                (lambda: reference.mla_prepare(q_pe, kv, cos, sin, w, 1e-6, cache, slots)),
                T * (2 * H * P * 2 + (R + P) * 2 * 3 + P * 4))
    if op.startswith("silu_and_mul"):
        I = int(op.split("=")[1])
        x = randn(T, 2 * I)
        return (lambda: silu_and_mul(x)), (lambda: reference.silu_and_mul(x)), 3 * T * I * 2
    if op == "topk_softmax E=64 k=6":
        logits = randn(T, 64, dtype=torch.float32)
        return ((lambda: topk_softmax(logits, 6, False, 1.0)), (lambda: reference.topk_softmax(logits, 6, False, 1.0)),
                T * (64 * 4 + 6 * 8))
    if op == "route V2 E=160 8/3 groups":  # DeepSeek-V2's group-limited router, hidden 5120 (one launch up to 64)
        x, w = randn(T, 5120), randn(160, 5120, dtype=torch.float32)
        args = (x, w, 6, False, 16.0, 0, (8, 3))

        def in_kernel():
            router.GROUPED_IN_KERNEL = True
            return router.route(*args)
        return in_kernel, (lambda: reference.route(*args)), T * 5120 * 2 + 160 * 5120 * 4
    raise ValueError(op)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_fused_kernels.py needs a CUDA GPU")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    ops = ["rms_norm D=2048", "add+rms_norm D=2048", "mla_prepare H=16", "silu_and_mul I=1408",
           "silu_and_mul I=10944", "topk_softmax E=64 k=6", "route V2 E=160 8/3 groups"]
    print(f"\n{'op':<24} {'T':>6} {'kernels':>8} {'eager us':>9} {'fused us':>9} {'speedup':>8}  notes")
    for op in ops:
        for T in (1, 64) if op.startswith("route") else (1, 16384):
            fused, eager, nbytes = inputs(op, T)
            kernels = count_kernels(eager) if T <= 64 else ""
            if T <= 64:
                eager_us, fused_us = graphed_us(eager), graphed_us(fused)
                notes = f"CUDA graph, {REPS} calls"
            else:
                eager_us, fused_us = median_us(eager), median_us(fused)
                rate = nbytes / fused_us * 1e6
                notes = f"fused {rate / 1e9:6.0f} GB/s = {rate / PEAK_BYTES:4.0%} of peak"
            print(f"{op:<24} {T:>6} {kernels:>8} {eager_us:9.2f} {fused_us:9.2f} {eager_us / fused_us:7.1f}x  {notes}",
                  flush=True)
            del fused, eager
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
