"""Time a whole MoE layer of the V2-Lite shape (router, shared and routed experts) with its shared
experts run as their own MLP beside the routed experts' kernel, and stacked as two more experts inside
it (MoE.fuse_shared_experts), in bf16 and with FP8 weights, from 1 to 4096 tokens. The crossing point
sets MoE.FUSED_SHARED_MAX_TOKENS. Then, for decode's token counts, the fused MoE's launch variants
against the default: each token's picks summed in the down GEMM (kernels/moe.py,
COMBINE_IN_GEMM_MAX_TOKENS) and thin row blocks multiplied with swapped operands (SWAP_AB_MAX_BLOCK_M).

Run: python scripts/bench_moe_layer.py [--variants]     (CUDA only; under a minute on an H200)

Times are triton.testing.do_bench medians (L2 flushed between runs) of the layer replayed from a CUDA
graph, which is what the engine runs; the routing is random, as random weights route.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from deepseek_v2.config import PRESETS  # noqa: E402
from deepseek_v2.kernels import load_kernels, moe as fused  # noqa: E402
from deepseek_v2.moe import MoE  # noqa: E402
from scripts.bench_fp8 import graph_us  # noqa: E402

DEVICE = "cuda"
TOKENS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)


@torch.no_grad()
def moe_layer(fp8: bool) -> MoE:
    """One MoE layer of V2-Lite, random weights, prepared as the engine prepares the model."""
    args = PRESETS["v2-lite"]
    torch.manual_seed(0)
    with torch.device(DEVICE):
        layer = MoE(args).to(torch.bfloat16)
    for name, p in layer.named_parameters():
        p.normal_(0.0, args.initializer_range)
    if fp8:
        layer.experts.to_fp8()
        for linear in (layer.shared_experts.gate_proj, layer.shared_experts.up_proj, layer.shared_experts.down_proj):
            linear.to_fp8()
    kernels = load_kernels("triton")
    for module in layer.modules():
        if "kernels" in vars(module):
            module.kernels = kernels
    layer.fuse_shared_experts()  # as fuse_for_inference does it: first the stack, then the MLP's gate/up
    layer.shared_experts.fuse_gate_up()
    layer.gate.keep_fp32_weight()
    assert layer.stack is not None
    return layer


@torch.no_grad()
def main() -> None:
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    print("| weights | tokens | shared MLP beside (us) | shared in the stack (us) | beside / stacked | rel. diff |")
    print("|---|---|---|---|---|---|", flush=True)
    for fp8 in (False, True):
        layer = moe_layer(fp8)
        for T in TOKENS:
            x = torch.randn(T, layer.args.hidden_size, device=DEVICE, dtype=torch.bfloat16)
            layer.FUSED_SHARED_MAX_TOKENS = 0  # this instance: the shared MLP beside the routed experts
            beside_out = layer(x).float()
            beside = graph_us(lambda: layer(x))
            layer.FUSED_SHARED_MAX_TOKENS = T
            stacked_out = layer(x).float()
            stacked = graph_us(lambda: layer(x))
            diff = ((stacked_out - beside_out).norm() / beside_out.norm()).item()
            print(f"| {'fp8' if fp8 else 'bf16'} | {T} | {beside:.1f} | {stacked:.1f} | {beside / stacked:.2f}x | "
                  f"{diff:.1e} |", flush=True)
        del layer
        torch.cuda.empty_cache()
    variants()


@torch.no_grad()
def variants() -> None:
    """The default layer against one module setting changed at a time, at decode's token counts."""
    changes = [("picks summed in the down GEMM", "COMBINE_IN_GEMM_MAX_TOKENS", 64),
               ("thin row blocks with swapped operands", "SWAP_AB_MAX_BLOCK_M", 32)]
    print("\n| weights | tokens | variant | default (us) | variant (us) | default / variant | same output |")
    print("|---|---|---|---|---|---|---|", flush=True)
    for fp8 in (False, True):
        layer = moe_layer(fp8)
        for T in (1, 4, 16, 64, 256):
            x = torch.randn(T, layer.args.hidden_size, device=DEVICE, dtype=torch.bfloat16)
            default_out, default = layer(x), graph_us(lambda: layer(x))
            for what, name, value in changes:
                saved = getattr(fused, name)
                setattr(fused, name, value)
                out, us = layer(x), graph_us(lambda: layer(x))
                setattr(fused, name, saved)
                print(f"| {'fp8' if fp8 else 'bf16'} | {T} | {what} | {default:.1f} | {us:.1f} | {default / us:.2f}x | "
                      f"{torch.equal(out, default_out)} |", flush=True)
        del layer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    variants() if "--variants" in sys.argv[1:] else main()
