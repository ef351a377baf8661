"""Time the MLA decode and routed-MoE kernels on one GPU and print a compact table.

Run: python scripts/bench_kernels.py     (CUDA only; about a minute on an H200)

Times are triton.testing.do_bench medians (L2 flushed between runs), of the call replayed from a
CUDA graph (what the engine runs) and, for comparison, launched eagerly. Bandwidth is against the
H200's 4.3 TB/s: for MLA the latent cache plus q read and out written; for MoE the weights of the
experts the batch touches. Also sweeps the MLA tile and the MoE launch tiers, to check the defaults.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch.nn.functional as F  # noqa: E402

from deepseek_v2.kernels import reference  # noqa: E402
from deepseek_v2.kernels.mla_decode import mla_decode  # noqa: E402
from deepseek_v2.kernels.moe import default_config, fused_moe  # noqa: E402
from deepseek_v2.kernels.moe_align import moe_align  # noqa: E402

PEAK_BYTES = 4.3e12
DEVICE = "cuda"
ROWS: list[tuple[str, str, float, str]] = []  # (what, shape, microseconds, notes)


def median_us(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graphed(fn):
    """fn replayed from a CUDA graph, or None if it cannot be captured (e.g. a host sync)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - capture failed; report eager only
        return None
    return graph.replay


def time_both(fn, capture=True) -> tuple[float, float | None]:
    replay = graphed(fn) if capture else None
    return median_us(fn), (median_us(replay) if replay else None)


def report(what, shape, eager_us, graph_us, work):
    """work(us) -> notes string, computed on the graph time when there is one."""
    best = graph_us if graph_us is not None else eager_us
    graph = f"{graph_us:8.1f}" if graph_us is not None else "       -"
    line = f"{what:<22} {shape:<26} {eager_us:8.1f} {graph} us  {work(best)}"
    print(line, flush=True)
    ROWS.append((what, shape, best, work(best)))


# ------------------------------------------------------------------ MLA decode (V2-Lite: 16 heads)

def bench_mla():
    H, R, P, block_size = 16, 512, 64, 64
    print("\nMLA decode, V2-Lite (16 heads, R=512, P=64, block 64, bf16); eager / graph")
    for batch in (1, 64, 256):
        for ctx in (1024, 4096):
            blocks_per_seq = ctx // block_size
            num_blocks = batch * blocks_per_seq
            kv_cache = torch.randn(num_blocks, block_size, R + P, device=DEVICE, dtype=torch.bfloat16)
            block_tables = torch.randperm(num_blocks, device=DEVICE).int().view(batch, blocks_per_seq)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEVICE)
            q_lat = torch.randn(batch, H, R, device=DEVICE, dtype=torch.bfloat16)
            q_pe = torch.randn(batch, H, P, device=DEVICE, dtype=torch.bfloat16)
            nbytes = 2 * (batch * ctx * (R + P) + batch * H * (R + P) + batch * H * R)
            sweep = [None] + ([16, 64] if batch in (1, 64) and ctx == 4096 else [])
            for block_n in sweep:
                fn = lambda: mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, 0.1147,  # noqa: E731
                                        block_n=block_n)
                eager, graph = time_both(fn)
                what = "mla_decode" + (f" block_n={block_n}" if block_n else "")
                report(what, f"B={batch} ctx={ctx}", eager, graph, lambda us: (
                    f"{nbytes / us / 1e3:7.0f} GB/s = {nbytes / us * 1e6 / PEAK_BYTES:5.1%} of 4.3 TB/s"))
            del kv_cache


# ------------------------------------------------------------------ routed MoE (V2-Lite layer)

def grouped_mm_moe(x, w13, w2, topk_weights, topk_ids):
    """The baseline the fused kernel must beat: torch._grouped_mm (CUDA, bf16, torch >= 2.8), which
    multiplies rows offs[e-1]:offs[e] of a by b[e]. Rows are grouped by expert with fused_moe's own
    alignment kernel, each expert's run padded to 16 (16-byte aligned strides, as torchtitan does)."""
    T, D = x.shape
    E, K = w13.shape[0], topk_ids.shape[1]
    a = moe_align(topk_ids, E, 16)
    blocks = torch.arange(a.expert_ids.numel(), device=x.device)
    used = blocks * 16 < a.num_padded                                     # blocks past the total: junk
    per_expert = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(
        0, torch.where(used, a.expert_ids, 0).long(), used.int() * 16)
    offs = per_expert.cumsum(0, dtype=torch.int32)
    slot_used = torch.arange(a.sorted_ids.numel(), device=x.device) < a.num_padded
    row = torch.where(slot_used, a.sorted_ids, T * K).long()             # T * K: padding, dropped below
    gate, up = torch._grouped_mm(x[row.clamp(max=T * K - 1) // K], w13.transpose(1, 2), offs=offs).chunk(2, -1)
    out = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
    y = x.new_empty(T * K + 1, D)
    y[row] = out                                                          # back to row t*K + k
    return (y[:T * K].view(T, K, D).float() * topk_weights.unsqueeze(-1)).sum(dim=1).to(x.dtype)


def bench_moe():
    E, D, I, K = 64, 2048, 1408, 6
    print(f"\nRouted MoE, V2-Lite layer (E={E}, D={D}, I={I}, top-{K}, bf16); eager / graph")
    w13 = torch.randn(E, 2 * I, D, device=DEVICE, dtype=torch.bfloat16).mul_(D**-0.5)
    w2 = torch.randn(E, D, I, device=DEVICE, dtype=torch.bfloat16).mul_(I**-0.5)
    tiers = {"BLOCK_M=16": 1, "BLOCK_M=64": 64, "BLOCK_M=128": 1024}  # name: a rows-per-expert in that tier
    for T in (1, 8, 64, 256, 4096):
        x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
        topk_weights, topk_ids = torch.randn(T, E, device=DEVICE).softmax(-1).topk(K)
        touched = topk_ids.unique().numel()
        weight_bytes = touched * 3 * D * I * 2
        flops = 2 * T * K * 3 * D * I

        def work(us):
            return (f"{touched:2d} experts {weight_bytes / us / 1e3:7.0f} GB/s of weights"
                    f" ({weight_bytes / us * 1e6 / PEAK_BYTES:4.0%}) {flops / us / 1e6:6.1f} TFLOP/s")

        impls = [("fused_moe", lambda: fused_moe(x, w13, w2, topk_weights, topk_ids))]
        if hasattr(torch, "_grouped_mm"):
            impls.append(("grouped_mm_moe", lambda: grouped_mm_moe(x, w13, w2, topk_weights, topk_ids)))
        impls.append(("reference.moe", lambda: reference.moe(x, w13, w2, topk_weights, topk_ids)))
        default = default_config(T * K / E)["BLOCK_M"]
        for name, rows_per_expert in tiers.items():  # the other launch tiers, to check the heuristic
            config = default_config(rows_per_expert)
            if config["BLOCK_M"] != default and T >= 8:
                impls.append((f"fused {name}", lambda config=config: fused_moe(
                    x, w13, w2, topk_weights, topk_ids, config=config)))
        for name, fn in impls:
            eager, graph = time_both(fn, capture=name != "reference.moe")  # the reference syncs the host
            report(name, f"T={T}", eager, graph, work)


def main():
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    bench_mla()
    bench_moe()
    print("\nSummary (CUDA-graph replay where it could be captured, else eager):")
    print(f"{'kernel':<22} {'shape':<26} {'us':>8}  notes")
    for what, shape, us, notes in ROWS:
        print(f"{what:<22} {shape:<26} {us:8.1f}  {notes}")


if __name__ == "__main__":
    main()
