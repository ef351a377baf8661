"""Configuration: the architecture (`ModelArgs`, read from a checkpoint's config.json) and the
engine knobs (`EngineConfig`). A config.json becomes a ModelArgs in exactly one function,
`ModelArgs.from_hf_config`; `ModelArgs.to_hf_config` writes it back in the official format.
(A little over 300 lines: the two dataclasses stay together, each with its checks, and ModelArgs
with its parameter count, which `info` and the benchmark floors read.)"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


# The demonstration model that ships inside the package: the default wherever no checkpoint is given.
DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


class ConfigError(ValueError):
    """A config.json that cannot describe a working DeepSeek-V2 model; the message names the key."""


@dataclass
class RopeScaling:
    """YaRN parameters (`rope_scaling` in official configs, `rope_parameters` in transformers 5)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass
class ModelArgs:
    # sizes
    vocab_size: int = 102400
    hidden_size: int = 2048
    num_hidden_layers: int = 27
    intermediate_size: int = 10944  # SwiGLU width of the dense layers
    # Multi-head Latent Attention
    num_attention_heads: int = 16
    q_lora_rank: int | None = None  # None: plain q_proj (Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    # DeepSeekMoE
    n_routed_experts: int | None = 64  # None: every layer dense
    n_shared_experts: int | None = 2
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1408
    topk_method: str = "greedy"  # or "group_limited_greedy"
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    # positions
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = field(
        default_factory=lambda: RopeScaling(40.0, 4096, 32.0, 1.0, 0.707, 0.707))
    # misc
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    # "fp8": linear weights in DeepSeek's FP8 layout (config.json's quantization_config; docs/fp8.md)
    quantization: str | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling(**self.rope_scaling)
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the normalised latent c_kv and the rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def mha_cache_dim(self) -> int:
        """Values per token per layer in the full per-head K and V cache the official code keeps."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-1/2, times mscale^2 under YaRN with mscale_all_dim set (official code)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_get_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (self.n_routed_experts is not None and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def validate(self) -> None:
        def need(cond: bool, key: str, why: str):
            if not cond:
                raise ConfigError(f"config key '{key}': {why}")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "intermediate_size"):
            need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, key,
                 f"must be a positive integer, got {getattr(self, key)!r}")
        need(isinstance(self.qk_nope_head_dim, int) and self.qk_nope_head_dim >= 0,
             "qk_nope_head_dim", "must be a non-negative integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
             f"rotary pairs need an even size, got {self.qk_rope_head_dim}")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", f"must be null or a positive integer, got {self.q_lora_rank!r}")
        need(self.hidden_act == "silu", "hidden_act",
             f"only 'silu' is supported (DeepSeek-V2 uses SwiGLU), got {self.hidden_act!r}")
        need(self.scoring_func == "softmax", "scoring_func",
             f"only 'softmax' is implemented, got {self.scoring_func!r}")
        need(self.quantization in (None, "fp8"), "quantization_config",
             f"only fp8 quantization is supported, got {self.quantization!r}")
        if self.n_routed_experts is not None:
            E = self.n_routed_experts
            need(isinstance(E, int) and E > 0, "n_routed_experts", f"must be positive, got {E!r}")
            need(self.topk_method in ("greedy", "group_limited_greedy"), "topk_method",
                 f"must be 'greedy' or 'group_limited_greedy', got {self.topk_method!r}")
            need(0 < self.num_experts_per_tok <= E, "num_experts_per_tok",
                 f"must be in 1..n_routed_experts={E}, got {self.num_experts_per_tok}")
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            need(self.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
            if self.topk_method == "group_limited_greedy":
                need(bool(self.n_group) and E % self.n_group == 0, "n_group",
                     f"must divide n_routed_experts={E}, got {self.n_group!r}")
                need(bool(self.topk_group) and 0 < self.topk_group <= self.n_group, "topk_group",
                     f"must be in 1..n_group={self.n_group}, got {self.topk_group!r}")
                need(self.topk_group * (E // self.n_group) >= self.num_experts_per_tok, "topk_group",
                     "the kept groups hold fewer experts than num_experts_per_tok")
        rs = self.rope_scaling
        if rs is not None:
            need(rs.factor >= 1.0, "rope_scaling.factor", f"must be >= 1, got {rs.factor}")
            need(rs.original_max_position_embeddings > 0,
                 "rope_scaling.original_max_position_embeddings", "must be positive")

    # ---- config.json in and out ------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArgs":
        """Build from a config.json dict, official (`rope_scaling` + `rope_theta`) or transformers-5
        style (`rope_parameters`)."""
        if cfg.get("model_type", "deepseek_v2") != "deepseek_v2":
            raise ConfigError(f"config key 'model_type': expected 'deepseek_v2', got {cfg['model_type']!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "torch_dtype", "quantization"}
        kwargs = {k: cfg[k] for k in known if k in cfg}
        if "dtype" in cfg or "torch_dtype" in cfg:
            kwargs["torch_dtype"] = str(cfg.get("torch_dtype") or cfg.get("dtype"))
        for key in ("n_group", "topk_group"):  # official configs write null for Lite-style greedy
            if key in kwargs and kwargs[key] is None and cfg.get("topk_method") != "group_limited_greedy":
                kwargs[key] = 1
        if cfg.get("topk_method") == "gready":  # the official default's known typo means greedy
            kwargs["topk_method"] = "greedy"
        if cfg.get("quantization_config") is not None:
            kwargs["quantization"] = parse_quantization_config(cfg["quantization_config"])

        rope_key = "rope_parameters" if cfg.get("rope_parameters") is not None else "rope_scaling"
        rope = dict(cfg.get(rope_key) or {})
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope.pop("rope_theta")
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or ("default" if not rope else None)
        rope.pop("type", None)
        if rope_type in ("default", None) and not rope:
            kwargs["rope_scaling"] = None
        elif rope_type in ("yarn", "deepseek_yarn"):
            names = {f.name for f in dataclasses.fields(RopeScaling)}
            unknown = set(rope) - names - {"attention_factor", "truncate"}
            if unknown:
                raise ConfigError(f"config key '{rope_key}': unknown YaRN parameter(s) {sorted(unknown)}")
            if "factor" not in rope:
                raise ConfigError(f"config key '{rope_key}.factor': YaRN needs a scaling factor")
            kwargs["rope_scaling"] = RopeScaling(**{k: v for k, v in rope.items() if k in names})
        else:
            raise ConfigError(f"config key '{rope_key}.type': unsupported rope type {rope_type!r} "
                              "(supported: default, yarn)")

        head_dim = cfg.get("head_dim")  # transformers 5 writes head_dim = qk_rope_head_dim
        if head_dim is not None and head_dim != kwargs.get("qk_rope_head_dim", cls.qk_rope_head_dim):
            raise ConfigError(f"config key 'head_dim': {head_dim} disagrees with qk_rope_head_dim "
                              f"{kwargs.get('qk_rope_head_dim', cls.qk_rope_head_dim)}")
        qk_head_dim = cfg.get("qk_head_dim")
        if qk_head_dim is not None:
            expect = (kwargs.get("qk_nope_head_dim", cls.qk_nope_head_dim)
                      + kwargs.get("qk_rope_head_dim", cls.qk_rope_head_dim))
            if qk_head_dim != expect:
                raise ConfigError(f"config key 'qk_head_dim': {qk_head_dim} is not "
                                  f"qk_nope_head_dim + qk_rope_head_dim = {expect}")
        try:
            return cls(**kwargs)
        except TypeError as e:  # a wrongly typed value
            raise ConfigError(f"config.json: {e}") from None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelArgs":
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no config.json (not a DeepSeek-V2 checkpoint directory)")
        try:
            with open(file) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_config(cfg)

    def to_hf_config(self) -> dict[str, Any]:
        """The config.json dict as the official checkpoints ship it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rs = d.pop("rope_scaling")
        d["rope_scaling"] = None if rs is None else {"type": "yarn", **dataclasses.asdict(rs)}
        if d.pop("quantization") == "fp8":
            d["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        d["num_key_value_heads"] = self.num_attention_heads
        d.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                 attention_dropout=0.0, use_cache=True, pretraining_tp=1, ep_size=1)
        return dict(sorted(d.items()))

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ---- parameter counts ------------------------------------------------------------------------
    def num_parameters(self) -> dict[str, int]:
        """Total and per-token activated parameter counts (activated includes the LM head and
        excludes the input embedding, which is a row lookup)."""
        D, H = self.hidden_size, self.num_attention_heads
        if self.q_lora_rank is None:
            q = D * H * self.qk_head_dim
        else:
            q = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
        attn = (q + D * self.kv_cache_dim + self.kv_lora_rank
                + self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * D)
        if self.attention_bias:
            attn += (self.q_lora_rank or 0) + self.kv_cache_dim + D
        norms = 2 * D
        dense_mlp = 3 * D * self.intermediate_size
        total = active = 0
        for i in range(self.num_hidden_layers):
            total += attn + norms
            active += attn + norms
            if self.is_moe_layer(i):
                expert = 3 * D * self.moe_intermediate_size
                shared = expert * (self.n_shared_experts or 0)
                gate = self.n_routed_experts * D
                total += gate + shared + expert * self.n_routed_experts
                active += gate + shared + expert * self.num_experts_per_tok
            else:
                total += dense_mlp
                active += dense_mlp
        embed = self.vocab_size * D
        head = 0 if self.tie_word_embeddings else self.vocab_size * D
        total += embed + head + D
        active += head + D if not self.tie_word_embeddings else embed + D
        return {"total": total, "activated": active}


# DeepSeek-V3's published FP8 checkpoints: e4m3 weights with one scale per 128 x 128 block
# (`weight_scale_inv` beside each quantized `weight`), activations quantized on the fly.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                           "weight_block_size": [128, 128]}


def parse_quantization_config(qc: dict) -> str:
    """config.json's quantization_config -> "fp8", or a ConfigError naming what is not supported."""
    expect = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    for key, want in expect.items():
        got = qc.get(key, want if key in ("fmt", "activation_scheme") else None)  # V3's optional keys
        if (list(got) if isinstance(got, (list, tuple)) else got) != want:
            raise ConfigError(f"config key 'quantization_config.{key}': only {want!r} is supported, got {got!r}")
    return "fp8"


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


# Built-in shapes of the official checkpoints, for random-weight models of the real size.
PRESETS: dict[str, ModelArgs] = {
    "v2-lite": ModelArgs(),
    "v2": ModelArgs(
        hidden_size=5120, num_hidden_layers=60, intermediate_size=12288, num_attention_heads=128,
        q_lora_rank=1536, n_routed_experts=160, moe_intermediate_size=1536,
        topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0),
}


LARGE_GPU_MEMORY = 70 * 2**30  # where vLLM's larger batch defaults start


def _knob(default, help: str, choices: tuple | None = None, short: str | None = None):
    """An EngineConfig field with its help text (and allowed values, and a short flag); deepseek_v2/flags.py
    makes the flag from them."""
    return field(default=default, metadata={"help": help, "choices": choices, "short": short})


@dataclass
class EngineConfig:
    """Runtime knobs of the inference engine (vLLM's names where vLLM has one). Every field is also a
    command-line flag (`--max-num-seqs` for max_num_seqs), with this default and help."""

    max_model_len: int | None = _knob(None, "context length, prompt plus output (default: the model's)")
    max_num_seqs: int | None = _knob(None, "sequences in one batch (default: 1024 on a GPU of at least 70 GiB, "
                                           "else 256)")
    max_num_batched_tokens: int | None = _knob(None, "tokens per engine step; longer prompts are prefilled in "
                                                     "chunks (default: 16384 on a GPU of at least 70 GiB, else 8192)")
    long_prefill_token_threshold: int = _knob(0, "the most tokens of one prompt prefilled in a step, so that a long "
                                                 "prompt goes in chunks beside the running decodes and delays "
                                                 "their tokens less; 0: as many as the step's budget leaves")
    # No cap by default, serve included: on an H200 a cap of 1,024 gave no lower p99 inter-token latency at
    # 20 requests/s and cost 8-24% of the output tokens/s all at once (docs/benchmarks.md, "The prompt cap").
    max_prefill_tokens_beside_decodes: int | None = _knob(
        None, "the most prompt tokens in a step that also decodes, so that prompts arriving while others generate "
              "delay their next tokens less; a step without decodes still takes max_num_batched_tokens (default: "
              "no such limit)")
    block_size: int = _knob(64, "tokens per cache block")
    enable_prefix_caching: bool = _knob(True, "reuse cached blocks of shared prompt prefixes")
    enforce_eager: bool = _knob(False, "no CUDA graphs")
    gpu_memory_utilization: float = _knob(0.9, "fraction of GPU memory for weights, activations and cache")
    cpu_kv_cache_gib: float = _knob(1.0, "cache budget on CPU, in GiB")
    num_kv_blocks: int | None = _knob(None, "fix the number of cache blocks, overriding the budgets "
                                            "(default: as many as the budget holds)")
    max_waiting_requests: int | None = _knob(None, "sequences (prompts x n) that may wait: the server answers 503 "
                                                   "with Retry-After to a request that would go over, 400 to one "
                                                   "larger than this (default: no limit)")
    seed: int = _knob(0, "seed of the sampler for requests without a seed of their own")
    tensor_parallel_size: int = _knob(1, "processes (GPUs) the model is split over: heads, experts, MLP "
                                            "columns and vocabulary (docs/parallel.md)", short="-tp")
    kernels: str = _knob("auto", "the model's kernel set: reference (PyTorch) or triton (fused GPU kernels); "
                                 "auto: triton on a GPU, else reference", choices=("auto", "reference", "triton"))
    quantization: str | None = _knob(None, "fp8: quantize the linear weights to FP8 with 128x128 block scales as "
                                           "they load (a checkpoint in that layout is FP8 without it; "
                                           "docs/fp8.md)", choices=("fp8",))
    async_scheduling: str = _knob("auto", "launch each step before the tokens of the one before reach the host (its "
                                          "decodes read them on the device), so that the device runs it while the "
                                          "host handles them: on, off, or auto (on with CUDA graphs in one process)", choices=("auto", "on", "off"))
    kv_cache_dtype: str = _knob("auto", "the latent cache's format: auto (the model's dtype) or fp8 (e4m3 with "
                                        "one scale per token: about twice the tokens)", choices=("auto", "fp8"))

    def __post_init__(self):
        for key in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_tokens_beside_decodes", "block_size",
                    "tensor_parallel_size"):
            if getattr(self, key) is not None and getattr(self, key) <= 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError(f"long_prefill_token_threshold must be >= 0, got {self.long_prefill_token_threshold}")
        if self.num_kv_blocks is not None and self.num_kv_blocks <= 0:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        for f in dataclasses.fields(self):
            allowed, value = f.metadata.get("choices"), getattr(self, f.name)
            if allowed and value not in allowed and not (value is None and f.default is None):  # None: off
                raise ValueError(f"{f.name} must be one of {', '.join(allowed)}, got {value!r}")

    def sized_for(self, gpu_memory: int | None) -> "EngineConfig":
        """This config with the batch budgets that were left to default filled in for a GPU of
        `gpu_memory` bytes (None: not a GPU). vLLM's defaults by device memory: a GPU of 70 GiB or more
        (H100, H200) takes 1024 sequences and 16384 tokens a step, which the V2-Lite shape's cache (31 KiB
        a token) holds with room to spare on an H200; smaller GPUs and CPUs 256 and 8192."""
        large = gpu_memory is not None and gpu_memory >= LARGE_GPU_MEMORY
        return dataclasses.replace(self, max_num_seqs=self.max_num_seqs or (1024 if large else 256),
                                   max_num_batched_tokens=self.max_num_batched_tokens or (16384 if large else 8192))

    @property
    def cpu_kv_cache_bytes(self) -> int:
        """The CPU budget as the model runner sizes the cache; people speak GiB (the field, the flag)."""
        return int(self.cpu_kv_cache_gib * 2**30)
