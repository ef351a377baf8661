"""Time the FP8 kernels against their bf16 counterparts at V2-Lite's shapes, in one process: the
block-scaled FP8 GEMM as the model calls it (fp8_linear.linear: its quantization included, and
whichever of its paths the shape takes) against cuBLAS bf16, with the Triton GEMM over pre-quantized
x and torch._scaled_mm alone (1x128 / 128x128 block scales, x quantized beforehand) beside it; the fused MoE with FP8 and bf16 experts; MLA decode over an FP8 and a bf16
latent cache. Prints one table; the bytes column is what each call must read at least.

Run: python scripts/bench_fp8.py     (CUDA only; under a minute on an H200)
     python scripts/bench_fp8.py --few-rows (only the FP8 GEMM at one row against cuBLAS bf16, with a
                                             sweep of its launch config that cuts K into pieces; ~2 min;
                                             --few-rows=256: at 256 rows)
     python scripts/bench_fp8.py --moe-sweep (only the fused MoE with FP8 experts, its default launch
                                             against a sweep, 1 to 4096 tokens; a few minutes)
     python scripts/bench_fp8.py --mla-sweep (only MLA decode over the FP8 cache: its default launch and
                                             a grid of tile reads, warps and tiles, at 1, 32 and 256
                                             sequences, beside the bf16 cache, and both caches with
                                             more tiles in flight; about a minute)

Times are triton.testing.do_bench medians (L2 flushed between runs) of the call replayed from a CUDA
graph, which is what the engine runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deepseek_v2.kernels.fp8 import quantize_activation, quantize_cache, quantize_weight  # noqa: E402
from deepseek_v2.kernels.fp8_linear import FUSED_MAX_M, default_config, linear  # noqa: E402
from deepseek_v2.kernels.mla_decode import mla_decode  # noqa: E402
from deepseek_v2.kernels.moe import fused_moe  # noqa: E402
from deepseek_v2.kernels.moe import default_config as moe_config  # noqa: E402

DEVICE = "cuda"
ROWS: list[str] = []


def graph_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median") * 1e3


def row(what: str, shape: str, bf16_us: float, fp8_us: float, bf16_bytes: float, fp8_bytes: float,
        other: str = "") -> None:
    line = (f"| {what} | {shape} | {bf16_us:.1f} ({bf16_bytes / bf16_us / 1e3:.0f} GB/s) | "
            f"{fp8_us:.1f} ({fp8_bytes / fp8_us / 1e3:.0f} GB/s) | {bf16_us / fp8_us:.2f}x | {other} |")
    print(line, flush=True)
    ROWS.append(line)


def scaled_mm_us(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> str:
    """torch._scaled_mm alone with DeepSeek's scales, the activations quantized outside the timing (its
    error against the unquantized product); the error if this torch/cuBLAS refuses them."""
    xq, xs = quantize_activation(x)
    try:
        fn = lambda: torch._scaled_mm(xq, w.t(), scale_a=xs.t().contiguous().t(), scale_b=s.t(),  # noqa: E731
                                      out_dtype=torch.bfloat16)
        ref = F.linear(x.float(), w.float() * s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:w.shape[0],
                                                                                                 :w.shape[1]])
        err = ((fn().float() - ref).norm() / ref.norm()).item()
        return f"_scaled_mm {graph_us(fn):.1f} us (err {err:.3f})"
    except Exception as e:  # noqa: BLE001 - report what refused
        return f"_scaled_mm: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def bench_linear() -> None:
    # V2-Lite: q_proj [3072, 2048], o_proj [2048, 2048], shared experts' gate_up [5632, 2048] and down
    # [2048, 2816]; V2's q_b_proj [24576, 1536]
    for N, K in [(3072, 2048), (2048, 2048), (5632, 2048), (2048, 2816), (24576, 1536)]:
        wb = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) * K**-0.5
        w, s = quantize_weight(wb)
        for M in (1, 16, 256, 4096):
            x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
            b16 = graph_us(lambda: F.linear(x, wb))
            f8 = graph_us(lambda: linear(x, w, None, s))
            other = []
            if M > FUSED_MAX_M:  # the Triton GEMM over pre-quantized x, whichever path linear took
                triton_cfg = dict(default_config(M), FUSED=False)
                other.append(f"Triton {graph_us(lambda: linear(x, w, None, s, config=triton_cfg)):.1f} us")
            if M in (1, 256, 4096):
                other.append(scaled_mm_us(x, w, s))
            row("linear", f"M={M} N={N} K={K}", b16, f8, 2 * N * K + 2 * M * (N + K), N * K + 2 * M * (N + K),
                "; ".join(other))


def bench_moe() -> None:
    E, D, I, K = 64, 2048, 1408, 6
    w13 = torch.randn(E, 2 * I, D, device=DEVICE, dtype=torch.bfloat16) * D**-0.5
    w2 = torch.randn(E, D, I, device=DEVICE, dtype=torch.bfloat16) * I**-0.5
    (gq, gs), (uq, us), (dq, ds) = (quantize_weight(w) for w in (w13[:, :I], w13[:, I:], w2))
    q13, s13 = torch.cat([gq, uq], 1), torch.cat([gs, us], 1)
    for T in (1, 16, 256, 4096):
        x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
        topk_weights, topk_ids = torch.randn(T, E, device=DEVICE).softmax(-1).topk(K)
        touched = E * (1 - (1 - K / E) ** T)
        b16 = graph_us(lambda: fused_moe(x, w13, w2, topk_weights, topk_ids))
        f8 = graph_us(lambda: fused_moe(x, q13, dq, topk_weights, topk_ids, s13, ds))
        row("fused MoE", f"T={T} E={E} D={D} I={I}", b16, f8, touched * 3 * D * I * 2, touched * 3 * D * I)


def mla_inputs(N: int, L: int, H: int = 16, R: int = 512, P: int = 64, B: int = 64):
    """N sequences of L tokens in 64-token pages: (bf16 and FP8 caches of the same rows, block tables,
    lengths, bf16 q_lat, q_pe)."""
    blocks = -(-L // B)
    rows = torch.randn(N * blocks * B, R + P, device=DEVICE)
    caches = {"bf16": rows.to(torch.bfloat16).view(N * blocks, B, R + P),
              "fp8": quantize_cache(rows.view(N * blocks, B, R + P))}
    tables = torch.arange(N * blocks, device=DEVICE, dtype=torch.int32).view(N, blocks)
    lens = torch.full((N,), L, device=DEVICE, dtype=torch.int32)
    return (caches, tables, lens, torch.randn(N, H, R, device=DEVICE, dtype=torch.bfloat16),
            torch.randn(N, H, P, device=DEVICE, dtype=torch.bfloat16))


MLA_SHAPES = [(1, 1024), (32, 1152), (256, 1152)]
# (TMA, warps, tokens a tile, dots in fp16); the last three widen e4m3 to bf16 instead (the sm_90 build: 4 warps
# spill a few bytes there, none with fp16 dots since the latent is read in pairs)
MLA_GRID = [(tma, warps, block_n, True) for tma in (False, True)
            for warps, block_n in ((8, 32), (4, 32), (4, 16), (8, 16))]
MLA_GRID += [(False, 4, 32, False), (True, 4, 32, False), (True, 8, 32, False)]
# tiles in flight (mla_decode.TILE_BUFFERS; num_stages 2 * n + 1), each cache's default launch otherwise
MLA_BUFFERS = [(cache, n) for cache in ("bf16", "fp8") for n in (2, 3)]


def bench_mla() -> None:
    H, R, P = 16, 512, 64
    for N, L in MLA_SHAPES:
        caches, tables, lens, q_lat, q_pe = mla_inputs(N, L)
        t = {k: graph_us(lambda c=c: mla_decode(q_lat, q_pe, c, tables, lens, 0.1, max_seq_len=L))
             for k, c in caches.items()}  # the FP8 cache's default: its dots in fp16
        bf16_dots = graph_us(lambda: mla_decode(q_lat, q_pe, caches["fp8"], tables, lens, 0.1, max_seq_len=L,
                                                fp16_dots=False))
        row("MLA decode", f"N={N} L={L} H={H}", t["bf16"], t["fp8"], N * L * (R + P) * 2, N * L * (R + P + 4),
            f"FP8 cache, bf16 dots: {bf16_dots:.1f} us ({N * L * (R + P + 4) / bf16_dots / 1e3:.0f} GB/s)")


def bench_mla_sweep() -> None:
    """MLA decode over the FP8 cache (16 heads, bf16 queries): its default launch and the grid of tile
    reads (pointers or TMA), warps, tokens a tile and the dots' dtype, beside the bf16 cache's default; then
    both caches' default launches with more tiles in flight, and split as for a 4K-token max_model_len."""
    print("| sequences x tokens | bf16 cache | FP8 cache, default | " + " | ".join(
        [f"{'TMA' if tma else 'pointers'}, {w} warps, {n}-token tiles{'' if fp16 else ', bf16 dots'}"
         for tma, w, n, fp16 in MLA_GRID] + [f"{cache} cache, {n} tiles in flight" for cache, n in MLA_BUFFERS]
        + [f"{cache} cache, split for 4K tokens" for cache in ("bf16", "fp8")]) + " |")
    print("|---|---|---|" + "---|" * (len(MLA_GRID) + len(MLA_BUFFERS) + 2), flush=True)
    for N, L in MLA_SHAPES:
        caches, tables, lens, q_lat, q_pe = mla_inputs(N, L)
        cells = [graph_us(lambda: mla_decode(q_lat, q_pe, caches["bf16"], tables, lens, 0.1, max_seq_len=L)),
                 graph_us(lambda: mla_decode(q_lat, q_pe, caches["fp8"], tables, lens, 0.1, max_seq_len=L))]
        for tma, warps, block_n, fp16_dots in MLA_GRID:
            cells.append(graph_us(lambda: mla_decode(q_lat, q_pe, caches["fp8"], tables, lens, 0.1, max_seq_len=L,
                                                     tma=tma, num_warps=warps, block_n=block_n, fp16_dots=fp16_dots)))
        for cache, n in MLA_BUFFERS:
            cells.append(graph_us(lambda: mla_decode(q_lat, q_pe, caches[cache], tables, lens, 0.1, max_seq_len=L,
                                                     num_stages=2 * n + 1)))
        for cache in ("bf16", "fp8"):  # the split count an engine with a 4K max_model_len launches (one-tile pieces
            # at one sequence of 1K, where max_seq_len=L cuts 128-token pieces that more tiles in flight may serve)
            cells.append(graph_us(lambda: mla_decode(q_lat, q_pe, caches[cache], tables, lens, 0.1, max_seq_len=4096)))
        print(f"| {N} x {L} | " + " | ".join(f"{us:.1f}" for us in cells) + " |", flush=True)


def bench_fp8_pieces(M: int = 1) -> None:
    """The FP8 GEMM at M rows (fp8_linear.linear, x quantized as linear does at M) with its default
    launch (torch._scaled_mm where linear takes it) and the best of a sweep of the Triton kernel's launch
    that also cuts K into pieces (PIECES), against cuBLAS bf16. `--few-rows` sweeps one row (thin row
    blocks); `--few-rows=256` sweeps 256 rows (a 256-sequence decode step) over wider row blocks."""
    from itertools import product

    print("\n| shape | cuBLAS bf16 us (GB/s) | FP8 default us (GB/s) | FP8 best us (GB/s) | best config |")
    print("|---|---|---|---|---|", flush=True)
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    if M <= 16:
        space = [dict(BLOCK_M=16, BLOCK_N=n, num_warps=w, num_stages=st, per_sm=p)
                 for n, p, w, st in product((16, 32, 64), (0, 1, 2, 4, 8), (2, 4), (2, 3, 4))]
    else:
        space = [dict(BLOCK_M=m, BLOCK_N=n, num_warps=4 if m < 128 else 8, num_stages=st, per_sm=p)
                 for m, n, st, p in product((32, 64, 128), (64, 128), (3, 4), (0, 1, 2))]
    for N, K in [(3072, 2048), (2048, 2048), (5632, 2048), (2048, 2816), (576, 2048), (24576, 1536)]:
        wb = torch.randn(N, K, device=DEVICE, dtype=torch.bfloat16) * K**-0.5
        w, s = quantize_weight(wb)
        x = torch.randn(M, K, device=DEVICE, dtype=torch.bfloat16)
        best = None
        for point in space:
            cfg = {k: v for k, v in point.items() if k != "per_sm"}
            programs = -(-M // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
            pieces = 1 if point["per_sm"] == 0 else max(1, min(-(-K // 128), -(-point["per_sm"] * sms // programs)))
            cfg.update(GROUP_M=1 if M <= 16 else 8, PIECES=pieces, FUSED=M <= FUSED_MAX_M)
            try:
                us = graph_us(lambda: linear(x, w, None, s, config=cfg))
            except Exception:  # noqa: BLE001 - a config this GPU cannot run drops out
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        ref = linear(x, w, None, s, config=dict(default_config(M), FUSED=M <= FUSED_MAX_M)).float()
        err = ((linear(x, w, None, s, config=best[1]).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-3, (N, K, best, err)  # the same e4m3 products, summed in another order
        b16, f8 = graph_us(lambda: F.linear(x, wb)), graph_us(lambda: linear(x, w, None, s))
        print(f"| M={M} N={N} K={K} | {b16:.1f} ({2 * N * K / 1e3 / b16:.0f}) | {f8:.1f} ({N * K / 1e3 / f8:.0f}) | "
              f"{best[0]:.1f} ({N * K / 1e3 / best[0]:.0f}) | {best[1]} |", flush=True)


def bench_moe_sweep(token_counts=(1, 16, 256, 1024, 4096)) -> None:
    """The fused MoE with FP8 experts at V2-Lite's layer shape: its default launch against the best of a
    sweep, per token count, beside bf16's default. At 256 tokens (a 256-sequence decode step) the FP8
    experts moved their bytes at about half the bandwidth (docs/fp8.md's kernel table): the lever for
    FP8 decode throughput. Prints its own table (us; GB/s of the expert weights touched).
    `--moe-sweep=16,256` sweeps those token counts only."""
    from itertools import product


    E, D, I, K = 64, 2048, 1408, 6
    w13 = torch.randn(E, 2 * I, D, device=DEVICE, dtype=torch.bfloat16) * D**-0.5
    w2 = torch.randn(E, D, I, device=DEVICE, dtype=torch.bfloat16) * I**-0.5
    (gq, gs), (uq, us_), (dq, ds) = (quantize_weight(w) for w in (w13[:, :I], w13[:, I:], w2))
    q13, s13 = torch.cat([gq, uq], 1), torch.cat([gs, us_], 1)
    print("\n| tokens | bf16 default us | FP8 default us (GB/s) | FP8 best us (GB/s) | best config |")
    print("|---|---|---|---|---|", flush=True)
    for T in token_counts:
        x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
        topk_weights, topk_ids = torch.randn(T, E, device=DEVICE).softmax(-1).topk(K)
        gb = E * (1 - (1 - K / E) ** T) * 3 * D * I / 1e3  # FP8 bytes of the experts touched, per us

        def fp8_moe(cfg=None):
            return fused_moe(x, q13, dq, topk_weights, topk_ids, s13, ds, config=cfg)

        ref = fp8_moe().float()
        rows = T * K / E
        block_ms = (16,) if rows < 16 else (16, 32, 64) if T <= 256 else (32, 64, 128)
        best = None
        # at few tokens few experts are touched: narrower column tiles give more programs to stream them
        widths = (16, 32, 64, 128) if T <= 8 else (32, 64, 128)
        # at few tokens a program streams its weight tiles alone: deeper pipelines keep more bytes in flight;
        # at 256 the experts ran at 3.6 TB/s in the step against bf16's 3.9 (docs/benchmarks.md): 5 and 6 too
        depths = (3, 4, 6, 8) if T <= 8 else (3, 4, 5, 6) if T <= 256 else (3, 4)
        for m, n, warps, stages, swap in product(block_ms, widths, (4, 8), depths, (False, True)):
            if swap and (m > 32 or n < 64):  # swapped operands: for thin row blocks, 64+ weight columns
                continue
            cfg = dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=128, GROUP_M=1 if rows < 16 else 8, num_warps=warps,
                       num_stages=stages, SWAP_AB=swap)
            try:
                us = graph_us(lambda: fp8_moe(cfg))
            except Exception:  # noqa: BLE001 - a config this GPU cannot run (shared memory) drops out
                continue
            if best is None or us < best[0]:
                best = (us, cfg)
        err = ((fp8_moe(best[1]).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, (T, best, err)  # the same products, in other tiles
        b16 = graph_us(lambda: fused_moe(x, w13, w2, topk_weights, topk_ids))
        f8 = graph_us(lambda: fp8_moe())
        print(f"| {T} | {b16:.1f} | {f8:.1f} ({gb / f8:.0f}) {moe_config(rows, True)} | {best[0]:.1f} "
              f"({gb / best[0]:.0f}) | {best[1]} |", flush=True)


def main() -> None:
    few = next((a for a in sys.argv if a.startswith("--few-rows")), None)
    if few is not None:
        bench_fp8_pieces(int(few.split("=")[1]) if "=" in few else 1)
        return
    if "--mla-sweep" in sys.argv:
        bench_mla_sweep()
        return
    sweep = next((a for a in sys.argv if a.startswith("--moe-sweep")), None)
    if sweep is not None:
        bench_moe_sweep(*([tuple(map(int, sweep.split("=")[1].split(",")))] if "=" in sweep else []))
        return
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print("| kernel | shape | bf16 us (GB/s) | fp8 us (GB/s) | bf16 / fp8 | other |")
    print("|---|---|---|---|---|---|", flush=True)
    for part in (bench_linear, bench_moe, bench_mla):
        try:
            part()
        except Exception as e:  # noqa: BLE001 - one failing part must not cost the others
            print(f"{part.__name__} failed: {type(e).__name__}: {e}", flush=True)
    print("\n".join(["", "| kernel | shape | bf16 us (GB/s) | fp8 us (GB/s) | bf16 / fp8 | other |",
                     "|---|---|---|---|---|---|", *ROWS]))


if __name__ == "__main__":
    main()
