"""Prefill attention of all the step's prefill sequences in one call: flash attention over variable
lengths (torch's bundled FlashAttention-2, `_flash_attention_forward` with cumulative lengths), or
our Triton kernel (prefill_triton.py: V not padded) for steps with long contexts, from
TRITON_FROM_KEYS keys.

Why this: on an H200 at MLA's head dims one call over 80 prompts of ~200 tokens takes 0.56 ms and over
4 x 4096 tokens 1.5 ms (223 TFLOP/s), against 3.7 and 2.8 ms for the best per-sequence alternative; a
chunk after cached context needs no explicit mask, because flash aligns the causal mask to the end when
keys outnumber queries; and nothing is built per new shape, where the per-sequence cuDNN calls built a
plan for every new prompt length (prefill-holding steps of a mixed workload: 147 -> 56 ms; cuDNN's own
varlen path was slow and aligned the mask to the start). The numbers: docs/benchmarks.md.

Flash needs one head dim for q, k and v, and bf16 / fp16: V (128) is padded with zeros to the q/k dim
(192) and the padding dropped from the output (as vLLM does for MLA); other dtypes run the reference,
or our kernel when TRITON_FROM_KEYS hands it the step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import prefill_triton, reference

# A step whose longest sequence has at least this many keys (cached context + new tokens) runs the Triton
# kernel; None: flash for every step. None until the kernel has been timed against flash on a GPU
# (scripts/prefill_attention_variants.py): its value comes from that table.
TRITON_FROM_KEYS: int | None = None


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_query: torch.Tensor,
                      cu_key: torch.Tensor, query_lens: list[int], key_lens: list[int], scale: float) -> torch.Tensor:
    """Same contract as reference.prefill_attention."""
    if q.is_cuda and TRITON_FROM_KEYS is not None and max(key_lens) >= TRITON_FROM_KEYS:  # any float dtype
        return prefill_triton.prefill_attention(q, k, v, cu_query, cu_key, query_lens, key_lens, scale)
    if q.dtype not in (torch.bfloat16, torch.float16) or not q.is_cuda or q.shape[-1] > 256:
        return reference.prefill_attention(q, k, v, cu_query, cu_key, query_lens, key_lens, scale)
    dv = v.shape[-1]
    v = F.pad(v, (0, q.shape[-1] - dv)) if dv < q.shape[-1] else v
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_query, cu_key, max(query_lens), max(key_lens),
                                                  0.0, True, False, scale=scale)[0]
    return out[..., :dv]
