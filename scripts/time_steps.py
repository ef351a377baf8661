"""Time one prefill step (4 x 4096 new tokens) and one eager decode step (256 x 1K context) of a random
V2-Lite model: CUDA events around the model alone (no scheduler, no sampling), median of 10 / 20 runs.
It runs on any version of this tree (before the kernel sets existed too), so two versions can be
compared on one machine back to back:

    PYTHONPATH=. python3 scripts/time_steps.py LABEL        (CUDA only, about 30 s on an H200)
"""
import sys

import torch

from deepseek_v2.config import PRESETS
from deepseek_v2.model import AttentionMetadata, DeepseekV2ForCausalLM

dev = "cuda"
with torch.device("meta"):
    model = DeepseekV2ForCausalLM(PRESETS["v2-lite"])
model = model.to(torch.bfloat16).to_empty(device=dev).init_weights(0).eval().fuse_for_inference()
if hasattr(model, "use_kernels"):
    model.use_kernels("triton")
a, bs = model.args, 64
n_pref, L = 4, 4096
blocks = n_pref * L // bs + 256 * 1024 // bs + 8
caches = [torch.zeros(blocks, bs, a.kv_cache_dim, dtype=torch.bfloat16, device=dev) for _ in range(a.num_hidden_layers)]
g = torch.Generator(device=dev).manual_seed(0)

def timed(fn, reps):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]

T = n_pref * L
ids = torch.randint(10, a.vocab_size, (T,), device=dev, generator=g)
pos = torch.arange(L, device=dev).repeat(n_pref)
slots = torch.arange(T, device=dev)

def metadata(**fields):
    """AttentionMetadata of this tree's version: packed prefill fields, or the older per-sequence ones."""
    try:
        return AttentionMetadata(**fields)
    except TypeError:
        old = {k: v for k, v in fields.items() if not k.startswith(("prefill_key", "prefill_cu"))}
        return AttentionMetadata(**old, prefill_context_lens=[0] * len(fields["prefill_query_lens"]),
                                 prefill_block_tables=None)


cu = torch.arange(0, T + 1, L, dtype=torch.int32, device=dev)
pre = metadata(slot_mapping=slots, prefill_query_lens=[L] * n_pref, prefill_key_lens=[L] * n_pref,
               prefill_key_slots=slots, prefill_cu_query=cu, prefill_cu_key=cu, decode_block_tables=None,
               decode_seq_lens=None)
last = torch.arange(L - 1, T, L, device=dev)
with torch.inference_mode():
    prefill_ms = timed(lambda: model.compute_logits(model.forward_step(ids, pos, pre, caches)[last]), 10)
    B, ctx = 256, 1024
    base = n_pref * L // bs
    tables = (base + torch.arange(B * ctx // bs, device=dev).view(B, ctx // bs)).int()
    dec = metadata(slot_mapping=(tables[:, -1].long() * bs + (ctx - 1)), prefill_query_lens=[], prefill_key_lens=[],
                   prefill_key_slots=None, prefill_cu_query=None, prefill_cu_key=None, decode_block_tables=tables,
                   decode_seq_lens=torch.full((B,), ctx, dtype=torch.int32, device=dev), max_decode_seq_len=ctx)
    dids = torch.randint(10, a.vocab_size, (B,), device=dev, generator=g)
    dpos = torch.full((B,), ctx - 1, device=dev)
    decode_ms = timed(lambda: model.compute_logits(model.forward_step(dids, dpos, dec, caches)), 20)
print(f"{sys.argv[1]:4s} prefill 4x4096: {prefill_ms:7.2f} ms ({T / prefill_ms * 1e3:,.0f} tok/s) | eager decode 256x1K: {decode_ms:6.2f} ms")
