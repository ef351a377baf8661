"""The baseline of `deepseek-v2 bench --compare-hf`: Hugging Face transformers' DeepseekV2ForCausalLM
sharing our weight tensors (same layout, no copy), timed with its `generate` in the same process."""

from __future__ import annotations

import time

import torch

from .config import ModelArgs
from .model import DeepseekV2ForCausalLM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_hf(model: DeepseekV2ForCausalLM, args, a: ModelArgs, random_prompts) -> dict:
    """transformers' DeepseekV2ForCausalLM sharing our weight tensors (same layout, no copy)."""
    from transformers import DeepseekV2Config
    from transformers import DeepseekV2ForCausalLM as HFModel
    cfg = a.to_hf_config()
    rs = cfg.pop("rope_scaling")
    cfg["rope_parameters"] = ({"rope_type": "yarn", "rope_theta": a.rope_theta,
                               **{k: v for k, v in rs.items() if k != "type"}} if rs else
                              {"rope_type": "default", "rope_theta": a.rope_theta})
    hf_cfg = DeepseekV2Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "ep_size",
                                                                            "scoring_func", "seq_aux", "aux_loss_alpha",
                                                                            "moe_layer_freq", "torch_dtype")})
    with torch.device("meta"):
        hf = HFModel(hf_cfg)
    ours = dict(model.named_parameters())
    for name, _ in list(hf.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        setattr(hf.get_submodule(module_name), attr, torch.nn.Parameter(ours[name], requires_grad=False))
    hf.model.rotary_emb.to_empty(device=model.device)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    inv_freq, _ = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, model.device) \
        if hf_cfg.rope_parameters["rope_type"] != "default" else (model.model.rotary_emb.inv_freq, 1.0)
    hf.model.rotary_emb.inv_freq = inv_freq.to(model.device)
    hf.model.rotary_emb.original_inv_freq = inv_freq.to(model.device)
    hf.eval()
    res, dev = {}, model.device

    def generate(batch, new_tokens, length):
        ids = torch.tensor(random_prompts(batch, length, a.vocab_size, 7), device=dev)
        sync(dev)
        t = time.perf_counter()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync(dev)
        return time.perf_counter() - t

    generate(1, 2, 32)  # warm up
    for b in [int(x) for x in args.hf_batch_sizes.split(",")]:
        one = generate(b, 1, args.prompt_len)
        full = generate(b, args.hf_output_len + 1, args.prompt_len)
        per_step = (full - one) / args.hf_output_len
        res[f"decode_b{b}"] = {"ms_per_step": 1e3 * per_step, "tokens_per_s": b / per_step}
    ids = torch.tensor(random_prompts(1, args.prefill_len, a.vocab_size, 9), device=dev)
    with torch.inference_mode():
        hf(ids[:, :64])
        sync(dev)
        t = time.perf_counter()
        hf(ids, logits_to_keep=1)
        sync(dev)
    res["prefill"] = {"prompt_len": args.prefill_len, "tokens_per_s": args.prefill_len / (time.perf_counter() - t)}
    res["experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    return res
