"""The accuracy of FP8 weights and the FP8 latent cache against bf16, on CPU: the table of docs/fp8.md.

Teacher-forced: each sequence is prefilled whole through the engine's step path (model.forward_step
over a fresh paged cache, so the FP8 cache is written and read back as in serving), once per setting:
bf16 weights and cache; FP8 weights; FP8 weights and the FP8 cache; the FP8 cache alone. Reports the
perplexity, its change against bf16, the share of tokens whose top-1 prediction equals bf16's, and
the mean KL divergence KL(bf16 || setting) of the next-token distributions. Sets:
- the shipped demo model on the held-out chat conversations (tests/data/demo_chat_heldout.jsonl,
  assistant tokens only) and on the pretraining held-out text (data/demo/val.bin, built by
  scripts/build_demo_corpus.py; --val-sequences of 1024 tokens);
- random weights on random tokens (KL and top-1 only: the text means nothing): on CPU a small model
  with V2-Lite's attention head dims (16 heads, kv_lora_rank 512, qk_rope 64, qk_nope 128, v 128);
  with --v2-lite (a GPU, Triton kernels) the whole V2-Lite shape (15.7B parameters) and nothing else.

    PYTHONPATH=. python scripts/fp8_accuracy.py [--val-sequences 86] [--random-sequences 4]
    PYTHONPATH=. python scripts/fp8_accuracy.py --v2-lite [--random-sequences 4]     (CUDA)
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from deepseek_v2 import DeepseekV2ForCausalLM, ModelArgs, Tokenizer
from deepseek_v2.config import DEFAULT_MODEL, PRESETS, RopeScaling
from deepseek_v2.kernels.fp8 import cache_width
from deepseek_v2.model import AttentionMetadata
from deepseek_v2.train.data import IGNORE, load_chat

SETTINGS = {  # name: (the model's weights, FP8 cache)
    "bf16": ("bf16", False),
    "fp8 weights": ("fp8", False),
    "fp8 weights + fp8 cache": ("fp8", True),
    "fp8 cache": ("bf16", True),
}
BLOCK_SIZE = 64


@torch.no_grad()
def step_logits(model: DeepseekV2ForCausalLM, ids: torch.Tensor, fp8_cache: bool, caches_out: list | None = None
                ) -> torch.Tensor:
    """ids [S] prefilled as one engine step into a fresh paged cache -> fp32 logits [S, V] (the
    caches appended to caches_out)."""
    a, n = model.args, ids.shape[0]
    dtype = torch.uint8 if fp8_cache else model.model.embed_tokens.weight.dtype  # (the LM head may be FP8)
    blocks = -(-n // BLOCK_SIZE)
    device = ids.device
    caches = [torch.zeros(blocks, BLOCK_SIZE, cache_width(a.kv_cache_dim, fp8_cache), dtype=dtype, device=device)
              for _ in range(a.num_hidden_layers)]
    pos = torch.arange(n, device=device)
    cu = torch.tensor([0, n], dtype=torch.int32, device=device)
    attn = AttentionMetadata(slot_mapping=pos, prefill_query_lens=[n], prefill_key_lens=[n], prefill_key_slots=pos,
                             prefill_cu_query=cu, prefill_cu_key=cu, decode_block_tables=None, decode_seq_lens=None)
    logits = model.compute_logits(model.forward_step(ids, pos, attn, caches))
    if caches_out is not None:
        caches_out.append([c.view(-1, c.shape[-1])[:n] for c in caches])
    return logits


def fake_quantize(x: torch.Tensor, groups: int) -> torch.Tensor:
    """x [T, W] (fp32) in e4m3 with one scale per `groups` consecutive rows (absmax / 448), dequantized."""
    T, W = x.shape
    g = x[:T // groups * groups].view(-1, groups * W)
    scale = g.abs().amax(-1, keepdim=True).clamp(min=1e-10) / 448
    return ((g / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).view(-1, W)


def cache_granularity(model: DeepseekV2ForCausalLM, data: list) -> dict:
    """The latents the model caches (bf16) on `data`, quantized to e4m3 with one scale per tensor (each
    sequence's whole layer: a calibrated static scale could not do better), per 64-token tile, per
    token, and per token with separate scales for the latent and the rope key: the mean relative
    error ||dequantized - latent|| / ||latent|| over layers and sequences, for the latent c and the rope
    key k_pe apart."""
    R = model.args.kv_lora_rank
    caches = []
    for ids, _ in data:
        step_logits(model, ids, False, caches)
    errors = {name: [0.0, 0.0] for name in ("per tensor", "per 64-token tile", "per token",
                                            "per token, c and k_pe apart")}
    count = 0
    for layers in caches:
        for rows in layers:
            x = rows.float()
            x = x[:x.shape[0] // 64 * 64]
            variants = {"per tensor": fake_quantize(x, x.shape[0]), "per 64-token tile": fake_quantize(x, 64),
                        "per token": fake_quantize(x, 1),
                        "per token, c and k_pe apart": torch.cat([fake_quantize(x[:, :R].contiguous(), 1),
                                                                  fake_quantize(x[:, R:].contiguous(), 1)], -1)}
            for name, deq in variants.items():
                for i, part in enumerate((slice(0, R), slice(R, None))):
                    errors[name][i] += ((deq[:, part] - x[:, part]).norm() / x[:, part].norm()).item()
            count += 1
    return {name: (c / count, pe / count) for name, (c, pe) in errors.items()}


def compare(models: dict, data: list[tuple[torch.Tensor, torch.Tensor]], with_loss: bool) -> dict:
    """For each setting: perplexity, top-1 agreement with bf16 and mean KL(bf16 || setting)."""
    stats = {name: {"nll": 0.0, "agree": 0, "kl": 0.0} for name in SETTINGS}
    count = 0
    for ids, targets in data:
        mask = targets != IGNORE
        logps = {name: step_logits(models[weights], ids, fp8_cache).log_softmax(-1)[mask]
                 for name, (weights, fp8_cache) in SETTINGS.items()}
        ref = logps["bf16"]
        for name, lp in logps.items():
            s = stats[name]
            s["nll"] -= lp.gather(1, targets[mask][:, None]).float().sum().item()
            s["agree"] += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
            s["kl"] += F.kl_div(lp, ref, log_target=True, reduction="sum").item()
        count += int(mask.sum())
    base = math.exp(stats["bf16"]["nll"] / count)
    out = {}
    for name, s in stats.items():
        ppl = math.exp(s["nll"] / count)
        out[name] = {"tokens": count, "ppl": ppl if with_loss else None, "ppl_change": ppl / base - 1,
                     "top1": s["agree"] / count, "kl": s["kl"] / count}
    return out


WEIGHT_GROUPS = {  # name: module-name suffixes of the linear layers quantized alone
    "q_proj": ("q_proj",), "kv_a_proj_with_mqa": ("kv_a_proj_with_mqa",), "kv_b_proj": ("kv_b_proj",),
    "o_proj": ("o_proj",), "dense MLP": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    "shared experts": ("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
    "routed experts": ("experts",), "lm_head": ("lm_head",),
}


@torch.no_grad()
def per_weight(data: list, dtype: torch.dtype) -> Iterator[tuple[str, float, float]]:
    """Each group of weights of the demo model in FP8 alone, the rest bf16: the mean KL(bf16 || that) on
    `data` (teacher-forced, bf16 cache) and the group's share of the parameters: which weights FP8 hurts
    most per parameter. Yields (group, share, KL) as each is measured."""
    from deepseek_v2.moe import RoutedExperts
    from deepseek_v2.parallel import Linear
    base = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=dtype)
    ref = [step_logits(base, ids, False).log_softmax(-1)[targets != IGNORE] for ids, targets in data]
    total = sum(p.numel() for p in base.parameters())
    for name, suffixes in WEIGHT_GROUPS.items():
        model = DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=dtype)
        if model.args.tie_word_embeddings and name == "lm_head":
            continue
        count = 0
        for module_name, module in model.named_modules():
            if module_name.endswith(suffixes) and isinstance(module, (Linear, RoutedExperts)):
                count += sum(p.numel() for p in module.parameters())
                module.to_fp8()
        kl, tokens = 0.0, 0
        for (ids, targets), r in zip(data, ref):
            lp = step_logits(model, ids, False).log_softmax(-1)[targets != IGNORE]
            kl += F.kl_div(lp, r, log_target=True, reduction="sum").item()
            tokens += len(r)
        yield name, count / total, kl / tokens


def demo_models(dtype: torch.dtype) -> dict:
    return {"bf16": DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=dtype),
            "fp8": DeepseekV2ForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=dtype, quantization="fp8")}


def random_models(seed: int = 0, v2_lite: bool = False) -> dict:
    """Random bf16 weights and the FP8 model made of the very same weights."""
    if v2_lite:  # the real shape on the GPU, the engine's kernels
        with torch.device("meta"):
            base = DeepseekV2ForCausalLM(PRESETS["v2-lite"])
        base = base.to(torch.bfloat16).to_empty(device="cuda").init_weights(seed).eval()
        fp8 = copy.deepcopy(base).use_fp8()
        return {"bf16": base.use_kernels("triton"), "fp8": fp8.use_kernels("triton")}
    args = ModelArgs(vocab_size=1024, hidden_size=512, num_hidden_layers=4, intermediate_size=1024,
                     num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                     qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=16, num_experts_per_tok=4,
                     n_shared_experts=2, moe_intermediate_size=256, first_k_dense_replace=1,
                     max_position_embeddings=4096, rope_scaling=RopeScaling(40.0, 256, 32, 1, 0.707, 0.707),
                     initializer_range=0.04, bos_token_id=0, eos_token_id=1)
    base = DeepseekV2ForCausalLM(args).init_weights(seed).to(torch.bfloat16).eval()
    return {"bf16": base, "fp8": copy.deepcopy(base).use_fp8()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--val-sequences", type=int, default=86, help="1024-token sequences of val.bin (86: all of it)")
    p.add_argument("--random-sequences", type=int, default=4, help="1024-token random sequences")
    p.add_argument("--val", default="data/demo/val.bin")
    p.add_argument("--v2-lite", action="store_true", help="only the random V2-Lite-shape set, on the GPU")
    args = p.parse_args()
    torch.manual_seed(0)
    start = time.time()
    tables = {}
    if args.v2_lite:
        g = torch.Generator().manual_seed(1)
        rand = [(ids.cuda(), ids.cuda()) for ids in torch.randint(2, PRESETS["v2-lite"].vocab_size,
                                                                  (args.random_sequences, 1024), generator=g)]
        models = random_models(v2_lite=True)
        tables["random weights, V2-Lite shape (GPU)"] = compare(models, rand, False)
        print_granularity(cache_granularity(models["bf16"], rand), "V2-Lite shape, random weights and tokens")
        print_tables(tables, start)
        return
    models = demo_models(torch.bfloat16)
    chat = load_chat("tests/data/demo_chat_heldout.jsonl", Tokenizer.from_pretrained(DEFAULT_MODEL), 1024)
    inputs, targets = chat.get(list(range(chat.num_sequences)))
    tables["demo, held-out chat (assistant tokens)"] = compare(models, list(zip(inputs, targets)), True)
    print_granularity(cache_granularity(models["bf16"], list(zip(inputs, targets))[:64]), "demo, held-out chat")
    print("| in FP8 alone (demo, held-out chat) | share of parameters | mean KL(bf16 ‖ that) | KL per 1% of the parameters |")
    print("|---|---|---|---|")
    for name, share, kl in per_weight(list(zip(inputs, targets)), torch.bfloat16):
        print(f"| {name} | {100 * share:.1f}% | {kl:.5f} | {kl / (100 * share):.5f} |", flush=True)
    tokens = torch.from_numpy(np.fromfile(args.val, dtype=np.uint16).astype(np.int64))
    n = min(args.val_sequences, (len(tokens) - 1) // 1024)
    val = [(tokens[i * 1024:(i + 1) * 1024], tokens[i * 1024 + 1:(i + 1) * 1024 + 1]) for i in range(n)]
    tables["demo, pretraining held-out text"] = compare(models, val, True)
    g = torch.Generator().manual_seed(1)
    rand = [(ids, ids) for ids in torch.randint(2, 1024, (args.random_sequences, 1024), generator=g)]
    tables["random weights, V2-Lite head dims"] = compare(random_models(), rand, False)
    print_tables(tables, start)


def print_granularity(errors: dict, where: str) -> None:
    print(f"| latent cache scales ({where}) | rel. error of c | rel. error of k_pe |")
    print("|---|---|---|")
    for name, (c, pe) in errors.items():
        print(f"| {name} | {100 * c:.2f}% | {100 * pe:.2f}% |", flush=True)


def print_tables(tables: dict, start: float) -> None:
    print("| set | setting | tokens | perplexity | vs bf16 | top-1 = bf16 | mean KL(bf16 ‖ setting) |")
    print("|---|---|---|---|---|---|---|")
    for set_name, rows in tables.items():
        for name, r in rows.items():
            ppl = "" if r["ppl"] is None else f"{r['ppl']:.4f}"
            change = "" if r["ppl"] is None or name == "bf16" else f"{100 * r['ppl_change']:+.2f}%"
            print(f"| {set_name} | {name} | {r['tokens']:,} | {ppl} | {change} | {100 * r['top1']:.2f}% | "
                  f"{r['kl']:.5f} |")
    print(f"\n({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
