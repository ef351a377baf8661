"""What some of decode's small launches cost: run a deepseek-v2 command with their kernels swapped for
nothing. The numbers come out wrong, the time right (the launches' shapes are kept); for deciding which
launches are worth folding into another kernel, never for serving.

    PYTHONPATH=. python3 scripts/time_without_launches.py norms -- bench --shape v2-lite --batch-sizes 1 \\
        --prompt-len 1024 --output-len 256 --prefill-len 4096 --prefill-prompts 1 --quantization fp8

What to leave out, comma-separated: `norms` (every RMSNorm, the residual add with it), `prepare` (MLA
prepare: the latent's norm, the RoPEs, the cache write), `absorb` (W_UK's product), `attention` (absorbed
MLA decode with its merge and W_UV's product), `router` (every token takes the first K experts and the
shared ones), `experts` (the fused MoE: routed and stacked shared experts), `fp8_gemms` (the linear
layers with FP8 weights; bf16 ones still run), or `none`. A launch's cost in a step is what leaving it
out saves, not its time under the profiler: with programmatic dependent launch a kernel's time there
includes its wait for the kernel ahead.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from deepseek_v2.kernels import absorb, fp8_linear, mla_decode, mla_prepare, moe, norm, router  # noqa: E402


def no_norm(x, weight, eps, residual=None, *, x_fp8=None):
    return x if residual is None else (x, residual)


def no_prepare(q_pe, kv, cos, sin, weight, eps, kv_cache=None, slot_mapping=None):
    R = kv.shape[1] - q_pe.shape[2]
    return q_pe, kv[:, :R], kv[:, R:]


def no_absorb(q_nope, w_uk):
    return q_nope.new_empty(q_nope.shape[0], q_nope.shape[1], w_uk.shape[2])


def no_attention(q_lat, q_pe, kv_cache, block_tables, seq_lens, softmax_scale, *args, w_uv=None, **kwargs):
    return q_lat.new_empty(*q_lat.shape[:2], w_uv.shape[1]) if w_uv is not None else torch.empty_like(q_lat)


_routes: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def no_router(x, weight, k, renormalize, scaling=1.0, num_shared=0, groups=None, *, x_fp8=None):
    """Fixed picks (tensors made at the first call of a shape, in the warm-up before any graph capture)."""
    T, E = x.shape[0], weight.shape[0]
    key = (T, E, k, num_shared, x.device)
    if key not in _routes:
        ids = torch.cat([torch.arange(k), E + torch.arange(num_shared)]).to(torch.int32)
        _routes[key] = (torch.zeros(T, E, device=x.device), torch.full((T, k + num_shared), 1.0 / k, device=x.device),
                        ids.expand(T, -1).contiguous().to(x.device))
    return _routes[key]


def no_experts(x, *args, **kwargs):
    return torch.empty_like(x)


real_linear = fp8_linear.linear


_zeros: dict[tuple, torch.Tensor] = {}


def no_fp8_gemm(x, weight, bias=None, weight_scale_inv=None, block_offset=(0, 0), *, plain_rows=None, config=None,
                x_fp8=None):
    """Zeros, not garbage (NaNs would route a token to no expert), made once a shape (in the warm-up)."""
    if weight_scale_inv is None:  # a bf16 weight: still multiplied
        return real_linear(x, weight, bias, plain_rows=plain_rows)
    def zeros(width):
        key = ((*x.shape[:-1], width), x.dtype, x.device)
        if key not in _zeros:
            _zeros[key] = x.new_zeros(key[0])
        return _zeros[key]
    return zeros(weight.shape[0]) if plain_rows is None else (zeros(weight.shape[0]), zeros(plain_rows.shape[0]))


LEFT_OUT = {"norms": (norm, "rms_norm", no_norm), "prepare": (mla_prepare, "mla_prepare", no_prepare),
            "absorb": (absorb, "absorb_query", no_absorb), "attention": (mla_decode, "mla_decode", no_attention),
            "router": (router, "route", no_router), "experts": (moe, "fused_moe", no_experts),
            "fp8_gemms": (fp8_linear, "linear", no_fp8_gemm)}


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    for name in filter(None, sys.argv[1].split(",")):
        if name == "none":
            continue
        if name not in LEFT_OUT:
            raise SystemExit(f"time_without_launches: unknown launch {name!r} (known: {', '.join(LEFT_OUT)}, none)")
        module, attribute, stand_in = LEFT_OUT[name]
        setattr(module, attribute, stand_in)  # read by load_kernels when the engine picks the Triton set
    from deepseek_v2.cli import main as cli
    return cli(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
