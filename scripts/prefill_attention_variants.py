"""Prefill attention over several sequences at MLA's head dims (q/k 192, v 128), on one GPU: which way of
running it is right and fast. Each variant gets the packed queries of every sequence's new tokens and the
packed keys/values of each sequence's whole context (cached prefix + new tokens), and must apply the
causal mask aligned to the end (query i of a sequence with C cached tokens sees keys 0 .. C + i).

    PYTHONPATH=. python3 scripts/prefill_attention_variants.py [--sweep]     (CUDA only, about a minute)

Variants:
- loop_sdpa: today's model code, one scaled_dot_product_attention per sequence (cuDNN first; an explicit
  [S, L] mask when there is cached context);
- flash_varlen: one flash-attention call over all sequences (cu_seqlens), V padded from 128 to 192 (flash
  needs one head dim), causal aligned to the end as flash does when the key is longer than the query;
- cudnn_varlen: one cuDNN call with cu_seqlens (q/k 192 and v 128 as they are), if the torch build has it;
- loop_lower_right: one SDPA per sequence with CausalBias lower-right instead of an explicit mask;
- triton_varlen: our Triton kernel (kernels/prefill_triton.py), one launch, V at its own width.
With --sweep: triton_varlen's launch configs (BLOCK_M, BLOCK_N, warps, stages, K and V read through TMA
descriptors or not) on each workload, beside flash.
Correctness: each against an fp32 reference, ||out - ref|| / ||ref||; then the median time (do_bench,
the same shapes again and again) and the "cold" time of the first call on prompt lengths not seen
before, as serving meets them (a library that builds a plan per shape pays it there).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
import triton

from deepseek_v2.kernels import prefill_triton

H, DQK, DV = 16, 192, 128
DEV, DT = "cuda", torch.bfloat16
SCALE = DQK ** -0.5


def workload(query_lens, context_lens, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    key_lens = [c + q for q, c in zip(query_lens, context_lens)]
    q = torch.randn(sum(query_lens), H, DQK, device=DEV, dtype=DT, generator=g)
    k = torch.randn(sum(key_lens), H, DQK, device=DEV, dtype=DT, generator=g)
    v = torch.randn(sum(key_lens), H, DV, device=DEV, dtype=DT, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    cu_k = torch.tensor([0, *torch.tensor(key_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    return q, k, v, cu_q, cu_k, query_lens, key_lens


def pieces(w):
    q, k, v, cu_q, cu_k, ql, kl = w
    qs, ks = [0, *torch.tensor(ql).cumsum(0).tolist()], [0, *torch.tensor(kl).cumsum(0).tolist()]
    for i in range(len(ql)):
        yield q[qs[i]:qs[i + 1]], k[ks[i]:ks[i + 1]], v[ks[i]:ks[i + 1]]


def reference(w, rows=1024):
    """fp32 attention, 1024 queries at a time (the scores of a 16K chunk over 128K keys would not fit)."""
    outs = []
    for qi, ki, vi in pieces(w):
        S, L = qi.shape[0], ki.shape[0]
        kf, vf = ki.float(), vi.float()
        for r in range(0, S, rows):
            qr = qi[r:r + rows].float()
            mask = torch.arange(r, r + qr.shape[0], device=DEV)[:, None] + (L - S) >= torch.arange(L, device=DEV)
            s = torch.einsum("shd,lhd->hsl", qr, kf) * SCALE
            outs.append(torch.einsum("hsl,lhd->shd", s.masked_fill(~mask, float("-inf")).softmax(-1), vf))
    return torch.cat(outs)


def loop_sdpa(w):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    outs = []
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(order, set_priority=True):
        for qi, ki, vi in pieces(w):
            S, L = qi.shape[0], ki.shape[0]
            mask = None if S == L else torch.arange(S, device=DEV)[:, None] + (L - S) >= torch.arange(L, device=DEV)
            o = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],  # [1, H, L, d]
                                               vi.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                               scale=SCALE)
            outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def loop_lower_right(w):
    from torch.nn.attention.bias import causal_lower_right
    outs = []
    for qi, ki, vi in pieces(w):
        S, L = qi.shape[0], ki.shape[0]
        o = F.scaled_dot_product_attention(qi.transpose(0, 1)[None], ki.transpose(0, 1)[None],
                                           vi.transpose(0, 1)[None], attn_mask=causal_lower_right(S, L),
                                           scale=SCALE)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def flash_varlen(w):
    q, k, v, cu_q, cu_k, ql, kl = w
    v_pad = F.pad(v, (0, DQK - DV))
    out = torch.ops.aten._flash_attention_forward(q, k, v_pad, cu_q, cu_k, max(ql), max(kl), 0.0, True, False,
                                                  scale=SCALE)[0]
    return out[..., :DV]


def cudnn_varlen(w):
    q, k, v, cu_q, cu_k, ql, kl = w
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu_q, cu_k, max(ql), max(kl), False, 0.0, True,
                                                   False, scale=SCALE)[0]


def triton_varlen(w, config=None):
    q, k, v, cu_q, cu_k, ql, kl = w
    return prefill_triton.prefill_attention(q, k, v, cu_q, cu_k, ql, kl, SCALE, config=config)


# launch configs that build for sm_90 without spills at these head dims (tests/sm90_build.py)
SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st, TMA=tma)
         for bm, bn, w, st in [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (128, 32, 8, 4),
                               (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4)]
         for tma in (False, True)]


def sweep():
    print(f"{'workload':<36} {'config':<34} {'rel err':>9} {'ms':>9}  TFLOP/s (causal)")
    for name, (ql, cl) in WORKLOADS.items():
        cl = cl or [0] * len(ql)
        w = workload(ql, cl)
        ref = reference(w)
        flops = sum(4 * H * q * (c + (q + 1) / 2) * (DQK + DV) / 2 for q, c in zip(ql, cl))
        for config in [None, *SWEEP]:
            fn = flash_varlen if config is None else (lambda w, config=config: triton_varlen(w, config))
            label = "flash_varlen" if config is None else " ".join(str(x) for x in config.values())
            try:
                err = ((fn(w).float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(lambda: fn(w), warmup=5, rep=30, return_mode="median")
                print(f"{name:<36} {label:<34} {err:9.2e} {ms:9.3f}  {flops / ms / 1e9:.0f}", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
                print(f"{name:<36} {label:<34} {type(e).__name__}: {str(e)[:80]}", flush=True)


WORKLOADS = {
    "80 new prompts ~200 tokens": ([int(x) for x in torch.randint(20, 600, (80,), generator=torch.Generator().manual_seed(1))],
                                   None),
    "4 new prompts x 4096": ([4096] * 4, None),
    "4 chunks of 2048 after 2048 cached": ([2048] * 4, [2048] * 4),
    "one 16K chunk after 112K cached": ([16384], [114688]),
}


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    rows = []
    for name, (ql, cl) in WORKLOADS.items():
        w = workload(ql, cl or [0] * len(ql))
        ref = reference(w)
        flops = sum(4 * H * q * (c + (q + 1) / 2) * (DQK + DV) / 2 for q, c in zip(ql, cl or [0] * len(ql)))
        for k, fn in enumerate((loop_sdpa, flash_varlen, cudnn_varlen, loop_lower_right, triton_varlen)):
            try:
                out = fn(w)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                ms = triton.testing.do_bench(lambda: fn(w), warmup=5, rep=30, return_mode="median")
                fresh = workload([q + 1 + k for q in ql], cl or [0] * len(ql), seed=k + 1)  # unseen lengths
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(fresh)
                end.record()
                torch.cuda.synchronize()
                rows.append((name, fn.__name__, err, ms, start.elapsed_time(end), flops / ms / 1e9))
            except Exception as e:  # noqa: BLE001 - a variant this build lacks is reported, not fatal
                rows.append((name, fn.__name__, float("nan"), float("nan"), float("nan"),
                             f"{type(e).__name__}: {str(e)[:80]}"))
        print(f"done: {name}", flush=True)
    print(f"{'workload':<36} {'variant':<18} {'rel err':>9} {'ms':>9} {'cold ms':>9}  TFLOP/s (causal)")
    for name, fn, err, ms, cold, tf in rows:
        print(f"{name:<36} {fn:<18} {err:9.2e} {ms:9.3f} {cold:9.1f}  {tf if isinstance(tf, str) else f'{tf:.0f}'}")


if __name__ == "__main__":
    sweep() if "--sweep" in sys.argv[1:] else main()
