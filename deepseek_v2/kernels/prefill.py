"""Prefill attention of all the step's prefill sequences in one call: on a Hopper-class GPU our Triton
kernel (prefill_triton.py: causal over variable lengths, V not padded); on other GPUs, or where
TRITON_FROM_KEYS says so, torch's bundled FlashAttention-2 (`_flash_attention_forward` with cumulative
lengths, bf16 / fp16); elsewhere the reference.

Why this: on an H200 at MLA's head dims (docs/benchmarks.md, "Prefill attention"), one flash call over
80 prompts of ~200 tokens takes 0.56 ms and over 4 x 4096 tokens 1.5 ms, against 3.7 and 2.8 ms for
the best per-sequence alternative, and nothing is built per new shape (per-sequence cuDNN calls built
a plan for every prompt length). Our kernel halves flash's times again (0.31 and 0.76 ms; a 16K chunk
after 112K cached keys 45 ms against 79), because flash needs one head dim for q, k and v: V (128) is
padded with zeros to the q/k dim (192), as vLLM does for MLA, and the padding dropped from the output.
Both align a chunk's causal mask to the end when keys outnumber queries: no explicit mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import prefill_triton, reference
from .launch import hopper_class

# On a Hopper-class GPU, a step whose longest sequence has at least this many keys (cached context + new
# tokens) runs the Triton kernel, shorter ones flash (other GPUs: flash); None: flash for every step (bf16 /
# fp16). 0: the kernel for every step, as it was faster at every length timed
# (scripts/prefill_attention_variants.py).
TRITON_FROM_KEYS: int | None = 0


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_query: torch.Tensor,
                      cu_key: torch.Tensor, query_lens: list[int], key_lens: list[int], scale: float) -> torch.Tensor:
    """Same contract as reference.prefill_attention."""
    # (our kernel's launch, 128 x 64 tiles of 192-wide heads in three stages and TMA, needs a Hopper-class GPU)
    if q.is_cuda and TRITON_FROM_KEYS is not None and max(key_lens) >= TRITON_FROM_KEYS and hopper_class(q.device):
        return prefill_triton.prefill_attention(q, k, v, cu_query, cu_key, query_lens, key_lens, scale)
    if q.dtype not in (torch.bfloat16, torch.float16) or not q.is_cuda or q.shape[-1] > 256:
        return reference.prefill_attention(q, k, v, cu_query, cu_key, query_lens, key_lens, scale)
    dv = v.shape[-1]
    v = F.pad(v, (0, q.shape[-1] - dv)) if dv < q.shape[-1] else v
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu_query, cu_key, max(query_lens), max(key_lens),
                                                  0.0, True, False, scale=scale)[0]
    return out[..., :dv]
