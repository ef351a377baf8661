"""Write a small random-weight DeepSeek-V2 checkpoint (official format) with the project's
tokenizer: the placeholder default model until a trained one replaces it.

    python scripts/make_untrained_model.py [OUT_DIR]
"""

import shutil
import sys
from pathlib import Path

import torch

from deepseek_v2.config import ModelArgs, RopeScaling
from deepseek_v2.model import DeepseekV2ForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def main(out: str = "deepseek_v2/default_model") -> None:
    args = ModelArgs(
        vocab_size=4096, hidden_size=128, num_hidden_layers=3, intermediate_size=256,
        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1,
        max_position_embeddings=4096, rope_scaling=RopeScaling(4.0, 1024, 32.0, 1.0, 0.707, 0.707),
        bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16")
    model = DeepseekV2ForCausalLM(args).init_weights(seed=0).to(torch.bfloat16)
    out_dir = Path(out)
    src = Path(__file__).resolve().parent.parent / "deepseek_v2" / "default_model"
    if out_dir.resolve() != src.resolve():
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in TOKENIZER_FILES:
            shutil.copy(src / name, out_dir / name)
    model.save_pretrained(out_dir)
    print(f"wrote {out_dir}: {args.num_parameters()['total']:,} parameters")


if __name__ == "__main__":
    main(*sys.argv[1:])
