"""The kernel families the model calls, and the one switch between their two implementations.

Each family has a PyTorch reference (reference.py: the model's math; differentiable, any device) and
a GPU kernel (one module per family: fused, inference only, same contract; Triton, with torch's
FlashAttention for prefill attention as kernels/prefill.py's TRITON_FROM_KEYS allows). A `Kernels`
set names one implementation per family. The model holds one set: the reference unless
`DeepseekV2ForCausalLM.use_kernels("triton")` picks the kernels, which the engine does on a GPU
(EngineConfig.kernels). Nothing else chooses: not the device, not grad mode.

The Triton modules import triton, so they are imported only when the "triton" set is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import reference

KERNEL_SETS = ("reference", "triton")


@dataclass(frozen=True)
class Kernels:
    name: str
    linear: Callable               # the linear layers: F.linear, or the FP8 GEMM when a weight has block scales
    rms_norm: Callable             # RMSNorm, optionally after the residual add
    mla_prepare: Callable          # latent norm, both RoPEs and the latent-cache write
    gather_latents: Callable       # the cached latents of the prefill contexts (an FP8 cache dequantized)
    prefill_attention: Callable    # causal attention of the step's prefill sequences, packed
    absorb_query: Callable         # W_UK folded into absorbed decode's queries
    mla_decode: Callable           # absorbed MLA decode over the paged latent cache
    silu_and_mul: Callable         # SwiGLU's activation
    route: Callable                # routing (greedy or group-limited): the router's fp32 product and its top-k
    moe: Callable                  # the routed experts (with the shared experts' output added)


REFERENCE = Kernels("reference", reference.linear, reference.rms_norm, reference.mla_prepare,
                    reference.gather_latents, reference.prefill_attention, reference.absorb_query, reference.mla_decode,
                    reference.silu_and_mul, reference.route, reference.moe)


def load_kernels(name: str) -> Kernels:
    """The kernel set called `name`: "reference" or "triton"."""
    if name == "reference":
        return REFERENCE
    if name != "triton":
        raise ValueError(f"unknown kernel set {name!r} (known: {', '.join(KERNEL_SETS)})")
    from . import absorb, activation, fp8_linear, mla_decode, mla_prepare, moe, norm, prefill, router
    return Kernels("triton", fp8_linear.linear, norm.rms_norm, mla_prepare.mla_prepare,
                   reference.gather_latents,  # an indexing copy (and a dequantize), no kernel of its own
                   prefill.prefill_attention, absorb.absorb_query, mla_decode.mla_decode,
                   activation.silu_and_mul, router.route, moe.fused_moe)
