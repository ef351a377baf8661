"""How far two FP8 computations of the routed experts may lie apart when they round differently, against
how far each lies from the product with unquantized activations (CPU, about ten seconds).

    PYTHONPATH=. python3 scripts/fp8_moe_noise.py

The reference MoE with FP8 experts (V2-Lite's widths, 16 experts, top-6) is run twice on the same tokens:
with bf16 inputs (the intermediate silu(gate) * up rounded to bf16) and with fp32 inputs (rounded to
fp32). Each quantizes its GEMMs' inputs per token in groups of 128, scaled by the group's largest value,
so a rounding that moves that value moves the whole group's e4m3 grid. Printed: the two against each
other, and each against the same FP8 weights with unquantized activations.
"""

from __future__ import annotations

import torch

from deepseek_v2.kernels import reference
from deepseek_v2.kernels.fp8 import dequantize_weight, quantize_weight


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    torch.manual_seed(0)
    E, D, I, K = 16, 2048, 1408, 6
    w13 = torch.randn(E, 2 * I, D, dtype=torch.bfloat16).mul_(D**-0.5)
    w2 = torch.randn(E, D, I, dtype=torch.bfloat16).mul_(I**-0.5)
    (gq, gs), (uq, us), (dq, ds) = (quantize_weight(w) for w in (w13[:, :I], w13[:, I:], w2))
    q13, s13 = torch.cat([gq, uq], 1), torch.cat([gs, us], 1)
    w13_fp32 = torch.stack([torch.cat([dequantize_weight(gq[e], gs[e]), dequantize_weight(uq[e], us[e])])
                            for e in range(E)])
    w2_fp32 = torch.stack([dequantize_weight(dq[e], ds[e]) for e in range(E)])
    for T in (1, 8, 64):
        g = torch.Generator().manual_seed(T)
        x = torch.randn(T, D, dtype=torch.bfloat16, generator=g)
        weights, ids = torch.randn(T, E, generator=g).softmax(-1).topk(K)
        in_bf16 = reference.moe(x, q13, dq, weights, ids, s13, ds)
        in_fp32 = reference.moe(x.float(), q13, dq, weights, ids, s13, ds)
        unquantized = reference.moe(x.float(), w13_fp32, w2_fp32, weights, ids)
        print(f"{T:3d} tokens: bf16 against fp32 {rel(in_bf16, in_fp32):.2%}; from the product with unquantized "
              f"activations: bf16 {rel(in_bf16, unquantized):.2%}, fp32 {rel(in_fp32, unquantized):.2%}")


if __name__ == "__main__":
    main()
