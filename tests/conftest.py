"""Shared fixtures: tiny random DeepSeek-V2 checkpoints written by Hugging Face transformers
(the numerical oracle) in the official format, and the Triton kernels under Triton's CPU interpreter."""

from __future__ import annotations

import importlib
import os
import sys
import types

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

# Small configs that together cover: q_lora_rank null and set, yarn and plain rope, greedy and
# group-limited routing, routed_scaling_factor != 1, first_k_dense_replace > 1, attention bias.
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
            qk_nope_head_dim=16, v_head_dim=16, n_shared_experts=1, max_position_embeddings=1280,
            bos_token_id=0, eos_token_id=1)
HF_CONFIGS = {
    "lite-yarn-greedy": dict(BASE, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=2,
                             first_k_dense_replace=1, topk_method="greedy", rope_parameters=YARN),
    "qlora-plain-grouped": dict(BASE, q_lora_rank=24, n_routed_experts=8, num_experts_per_tok=3,
                                first_k_dense_replace=2, topk_method="group_limited_greedy", n_group=4,
                                topk_group=2, routed_scaling_factor=2.5, attention_bias=True,
                                num_hidden_layers=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "qlora-yarn-scaled": dict(BASE, q_lora_rank=16, n_routed_experts=6, num_experts_per_tok=2,
                              n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy",
                              routed_scaling_factor=16.0, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0)),
}


def make_hf_model(name: str, seed: int = 0):
    """A transformers DeepseekV2ForCausalLM with random weights (std large enough that the
    logits are far from uniform, so greedy decoding is not decided by rounding)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM as HFModel

    torch.manual_seed(seed)
    cfg = DeepseekV2Config(**HF_CONFIGS[name], initializer_range=0.08)
    model = HFModel(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """name -> (transformers model, directory written by its save_pretrained)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_hf_model(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            cache[name] = (model, path)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_engine():
    """A factory of engines over the bundled model's weights (float32, CPU), each with its own cache
    and queues: tiny_engine(max_num_seqs=2) (64 cache blocks unless told)."""
    from deepseek_v2.config import EngineConfig
    from deepseek_v2.engine.llm_engine import LLMEngine

    core = LLMEngine.from_pretrained(dtype="float32", device="cpu", num_kv_blocks=64)
    return lambda **knobs: LLMEngine(core.model, core.tokenizer, EngineConfig(**{"num_kv_blocks": 64, **knobs}))


KERNEL_MODULES = ("launch", "absorb", "activation", "fp8_linear", "mla_merge", "mla_decode", "mla_prepare",
                  "moe_align", "moe", "norm", "prefill_triton", "router")


@pytest.fixture(scope="module")
def interpreted_kernels():
    """The Triton kernel modules built for Triton's CPU interpreter, for the test module that asks:
    a namespace with one attribute per kernel module, plus `kernels`, the model's "triton" kernel set
    made of them. Everything is put back afterwards, so every host (with or without a GPU, whatever
    ran before) runs the same tests:
    - TRITON_INTERPRET=1 is set only while the module runs. triton.jit reads it when a function is
      defined, so the kernel modules are imported afresh, and the jit functions of Triton's own
      language library (tl.sum, tl.max, ...: defined when triton was imported, maybe compiled) are
      swapped for interpreted ones; all of it is put back after;
    - three test-only fixes to Triton 3.6's interpreter, undone after:
      1. it turns loop bounds into ints with int(array of shape (1,)), which numpy >= 2.4 refuses
         (triton-lang/triton#9171, fixed upstream);
      2. it casts fp32 -> bf16 by truncation, where a GPU (cvt.rn.bf16.f32) and torch round to
         nearest even: without this, a kernel that rounds at the right places would look wrong;
      3. its fp32 -> fp8 (e4m3) cast rounds half up and drops the carry of a mantissa that rounds up
         into the exponent (127.8 becomes 64), where a GPU (cvt.rn.satfinite.e4m3x2.f32) and torch
         round to nearest even."""
    pytest.importorskip("triton")
    import triton.language as tl
    import triton.runtime.interpreter as interpreter
    from triton.runtime.jit import JITFunction

    names = [f"deepseek_v2.kernels.{m}" for m in KERNEL_MODULES]
    package = importlib.import_module("deepseek_v2.kernels")
    saved_modules = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    saved_env = os.environ.get("TRITON_INTERPRET")
    patch_lang_tensor = interpreter._patch_lang_tensor
    cast_impl = interpreter.InterpreterBuilder.cast_impl
    fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def patch_lang_tensor_numpy24(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    def cast_rounding_to_nearest(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            data = torch.from_numpy(np.array(src.data, dtype=np.float32, ndmin=1)).to(torch.bfloat16)
            bits = data.view(torch.int16).numpy().view(np.uint16).reshape(np.shape(src.data))
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def fp8_rounding_to_nearest(self, src, dst_type, rounding_mode):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.float8e4nv:
            data = torch.from_numpy(np.array(src.data, dtype=np.float32, ndmin=1)).clamp(-448, 448)
            bits = data.to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(np.shape(src.data))
            return interpreter.TensorHandle(bits, tl.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    library = [(module, attr, value) for name, module in list(sys.modules.items())
               if name == "triton.language" or name.startswith("triton.language.")
               for attr, value in list(vars(module).items()) if isinstance(value, JITFunction)]
    interpreted = {id(value): interpreter.InterpretedFunction(value.fn) for _, _, value in library}
    os.environ["TRITON_INTERPRET"] = "1"
    for module, attr, value in library:
        setattr(module, attr, interpreted[id(value)])
    interpreter._patch_lang_tensor = patch_lang_tensor_numpy24
    interpreter.InterpreterBuilder.cast_impl = cast_rounding_to_nearest
    interpreter.InterpreterBuilder.create_fp_to_fp = fp8_rounding_to_nearest
    try:
        modules = {m: importlib.import_module(f"deepseek_v2.kernels.{m}") for m in KERNEL_MODULES}
        assert isinstance(modules["norm"]._rms_norm_kernel, interpreter.InterpretedFunction)
        yield types.SimpleNamespace(**modules, kernels=package.load_kernels("triton"))
    finally:
        for module, attr, value in library:
            setattr(module, attr, value)
        interpreter._patch_lang_tensor = patch_lang_tensor
        interpreter.InterpreterBuilder.cast_impl = cast_impl
        interpreter.InterpreterBuilder.create_fp_to_fp = fp_to_fp
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for m, n in zip(KERNEL_MODULES, names):
            sys.modules.pop(n, None)
            if n in saved_modules:
                sys.modules[n] = saved_modules[n]
                setattr(package, m, saved_modules[n])
            elif hasattr(package, m):
                delattr(package, m)
