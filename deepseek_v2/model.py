"""DeepSeek-V2, top to bottom as in the paper: RMSNorm, Multi-head Latent Attention (with the
decoupled RoPE), the feed-forward layers (dense SwiGLU or DeepSeekMoE, in moe.py), the decoder
block, the model and its LM head.

The arithmetic of each step with a fused GPU kernel (norms, MLA's prepare step and decode attention,
SwiGLU's activation, routing, the routed experts) is called through the module's kernel set:
kernels/reference.py, the plain PyTorch math, unless `use_kernels("triton")` picks the Triton
kernels (the engine does, on a GPU).

FP8 (`use_fp8`, or a checkpoint in DeepSeek's FP8 layout): attention's query and output projections
and the MoE experts hold float8_e4m3fn weights with one scale per 128 x 128 block and multiply
through the kernel set's FP8 GEMM (parallel.Linear, kernels/fp8.py); docs/fp8.md.

MLA has two compute paths that give the same numbers:
- expanded: decompress per-head K and V from the latent with kv_b_proj and run ordinary attention
  (training, plain forward, and an engine step's prefill sequences, all in one call);
- absorbed: attend directly over the cached latent, with W_UK folded into the query and W_UV
  applied to the attended latent (decode). The cache holds only kv_lora_rank + qk_rope_head_dim
  values per token per layer: the normalised latent c_kv and the rotated k_pe.

Tensor parallelism (parallel.py) shrinks the modules to this rank's part: its heads, its
intermediate columns, its experts, its vocabulary rows; the all-reduces sit in the sharded linear
layers and the MoE layer. With one rank (the default) nothing is split and nothing is reduced.

Module attributes keep the checkpoint's tensor names.
Legend: B batch, S new tokens per sequence, L attended tokens, T flat tokens of an engine step,
H heads, D hidden, R kv_lora_rank, P qk_rope_head_dim, dn qk_nope_head_dim, dv v_head_dim.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .checkpoint import checkpoint_args, load_dtype, load_weights, quantize_checkpoint, save_model
from .config import ModelArgs
from .kernels import REFERENCE, load_kernels
from .kernels.fp8 import BLOCK, quantize_once, quantized_buffers
from .moe import MLP, MoE, MoEGate, RoutedExperts
from .plan import check_parallel_size
from .parallel import SINGLE, Linear, TensorParallel, column_parallel, fuse_rows, row_parallel, split_parameters
from .rope import RotaryEmbedding


# On GPUs, prefer cuDNN's fused attention: flash attention refuses MLA's mixed head dims (192 for
# q/k, 128 for v) and the memory-efficient kernel is about 4x slower on an H200 at 4K tokens.
_GPU_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]


def sdpa_backends(q: torch.Tensor):
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return sdpa_kernel(_GPU_SDPA_ORDER, set_priority=True)
    return contextlib.nullcontext()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.kernels = REFERENCE

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None):
        """norm(x), or with a residual stream: (norm(x + residual), x + residual). x_fp8: buffers that also
        receive norm(x) quantized, for an FP8 GEMM after it (the kernels' rms_norm's x_fp8)."""
        return self.kernels.rms_norm(x, self.weight, self.eps, residual, x_fp8=x_fp8)


@dataclass
class AttentionMetadata:
    """Layout of one engine step over the paged latent cache. Written by the model runner, read by
    MLA. The T new tokens are ordered: all prefill tokens (sequence by sequence), then the decode
    tokens (one query each)."""

    # [T] cache slot (block * block_size + offset) of every new token; None where the caller writes the
    # cache through the step pieces itself (engine/piecewise.py)
    slot_mapping: torch.Tensor | None
    prefill_query_lens: list[int]  # new tokens of each prefill sequence
    prefill_key_lens: list[int]  # its whole context: the tokens already in the cache and the new ones
    prefill_key_slots: torch.Tensor | None  # [sum of key lens] the cache slots of each one's context, in order
    prefill_cu_query: torch.Tensor | None  # [num_prefills + 1] int32 cumulative query lens (for the kernel)
    prefill_cu_key: torch.Tensor | None  # [num_prefills + 1] int32 cumulative key lens
    decode_block_tables: torch.Tensor | None  # [num_decode_tokens, max_blocks] int32
    decode_seq_lens: torch.Tensor | None  # [num_decode_tokens] int32, including the new token
    max_decode_seq_len: int = 0

    @property
    def num_prefill_tokens(self) -> int:
        return sum(self.prefill_query_lens)


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepseekV2Attention in the official code). Under tensor parallelism
    a rank holds its heads' rows of q_proj / q_b_proj and kv_b_proj and columns of o_proj."""

    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE):
        super().__init__()
        self.args = args
        H, D = args.num_attention_heads, args.hidden_size
        first, end = tp.part(H)
        self.num_heads = end - first  # this rank's
        if args.q_lora_rank is None:
            self.q_proj = column_parallel(D, H, args.qk_head_dim, tp)
        else:
            self.q_a_proj = Linear(D, args.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank)
            self.q_b_proj = column_parallel(args.q_lora_rank, H, args.qk_head_dim, tp)
        self.kv_a_proj_with_mqa = Linear(D, args.kv_cache_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(args.kv_lora_rank)
        self.kv_b_proj = column_parallel(args.kv_lora_rank, H, args.qk_nope_head_dim + args.v_head_dim, tp)
        self.o_proj = row_parallel(H, args.v_head_dim, D, tp, bias=args.attention_bias)  # sums the heads
        self.softmax_scale = args.softmax_scale
        self.in_proj_weight: torch.Tensor | None = None  # set by fuse_input_projections
        self.in_proj_scale: torch.Tensor | None = None  # its FP8 block scales
        self.in_proj_plain = False  # set by fuse_input_projections: an FP8 first projection, a bf16 kv_a_proj
        self.kernels = REFERENCE

    def forward(self, x, cos, sin):
        """Whole causal sequences (training, plain forward): x [B, S, D] -> [B, S, D], cos, sin
        [B, S, P / 2]. An engine step calls project, paged_attention and o_proj itself (the decoder
        layer's before_attention / after_attention)."""
        a = self.args
        B, S, D = x.shape
        q, c_kv, k_pe = self.project(x.reshape(-1, D), cos.reshape(-1, cos.shape[-1]), sin.reshape(-1, sin.shape[-1]))
        out = self.expanded_attention(q.view(B, S, self.num_heads, -1), c_kv.view(B, S, a.kv_lora_rank),
                                      k_pe.view(B, S, a.qk_rope_head_dim))
        return self.o_proj(out.reshape(B, S, -1))

    def input_fp8_buffers(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Buffers for the input norm to quantize x into (project's x_fp8), where the first projection is
        FP8 and a step of T tokens quantizes once (fp8.QUANTIZE_ONCE_FROM); else None."""
        fp8_first = self.in_proj_plain or (self.in_proj_weight is not None and self.in_proj_scale is not None)
        if not (fp8_first and quantize_once(T)):
            return None
        return quantized_buffers(T, self.args.hidden_size, device, pad_rows=BLOCK)

    def project(self, x, cos, sin, kv_cache: torch.Tensor | None = None, slot_mapping: torch.Tensor | None = None,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Everything before attention, for T tokens x [T, D] (cos, sin [T, P / 2]): the query
        q [T, H, dn + P] with RoPE on its last P values, the normalised latent c_kv [T, R] and the rotated
        rope key k_pe [T, P]; with kv_cache, [c_kv ; k_pe] is also written to the tokens' slots. x_fp8: x
        already quantized, for an FP8 first projection (input_fp8_buffers)."""
        a = self.args
        H, dn, P, R = self.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.kv_lora_rank
        if self.in_proj_weight is not None:  # both projections of x in one GEMM (fuse_input_projections)
            q, kv = self.kernels.linear(x, self.in_proj_weight, None, self.in_proj_scale, x_fp8=x_fp8).split(
                [self.in_proj_weight.shape[0] - R - P, R + P], -1)
        elif self.in_proj_plain:  # the FP8 one and the bf16 kv_a_proj_with_mqa in one call
            first = self.q_proj if a.q_lora_rank is None else self.q_a_proj
            q, kv = self.kernels.linear(x, first.weight, None, first.weight_scale_inv,
                                        plain_rows=self.kv_a_proj_with_mqa.weight, x_fp8=x_fp8)
        else:
            q = self.q_proj(x) if a.q_lora_rank is None else self.q_a_proj(x)
            kv = self.kv_a_proj_with_mqa(x)
        if a.q_lora_rank is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))
        q = q.view(-1, H, a.qk_head_dim)
        q_nope, q_pe = q.split([dn, P], dim=-1)  # [T, H, dn], [T, H, P]
        # The latent's norm, the RoPE of q_pe and of the one rope key all heads share, and (in an engine
        # step) the write of [c_kv ; k_pe] into this layer's cache.
        rotated, c_kv, k_pe = self.kernels.mla_prepare(q_pe, kv, cos, sin, self.kv_a_layernorm.weight,
                                                       self.kv_a_layernorm.eps, kv_cache, slot_mapping)
        if rotated.data_ptr() != q_pe.data_ptr():  # rotated out of place: put the query back together
            q = torch.cat([q_nope, rotated], dim=-1)
        return q, c_kv, k_pe

    @torch.no_grad()
    def fuse_input_projections(self) -> None:
        """Inference: the two projections of x (q_proj or q_a_proj, and kv_a_proj_with_mqa) in one
        matrix, both weights views of it (parallel.fuse_rows: one GEMM instead of two). With FP8 weights
        (kv_a_proj_with_mqa stays bf16: docs/fp8.md) they stay apart, multiplied in one call (linear's
        plain_rows: one launch of the FP8 GEMM at decode's few rows)."""
        first = self.q_proj if self.args.q_lora_rank is None else self.q_a_proj
        if self.in_proj_weight is None and (fused := fuse_rows([first, self.kv_a_proj_with_mqa])) is not None:
            self.in_proj_weight, self.in_proj_scale = fused
        kv_a = self.kv_a_proj_with_mqa
        self.in_proj_plain = (self.in_proj_weight is None and first.weight_scale_inv is not None
                              and kv_a.weight_scale_inv is None and first.bias is None and kv_a.bias is None
                              and tuple(first.block_offset) == (0, 0))

    # ---- expanded path: decompress K and V ---------------------------------------------------------
    def expanded_attention(self, q, c_kv, k_pe) -> torch.Tensor:
        """Whole causal sequences: q [B, S, H, dn + P]; c_kv [B, S, R], k_pe [B, S, P]. Returns [B, S, H, dv]."""
        a = self.args
        B, S, H = c_kv.shape[0], c_kv.shape[1], self.num_heads
        k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, -1).split([a.qk_nope_head_dim, a.v_head_dim], -1)
        q = q.transpose(1, 2)  # [B, H, S, dn + P]
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, -1)], dim=-1).transpose(1, 2)
        with sdpa_backends(q):
            out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True, scale=self.softmax_scale)
        return out.transpose(1, 2)

    # ---- absorbed path: attend over the latent ------------------------------------------------------
    def absorbed_attention(self, q_nope, q_pe, kv_cache, block_tables, seq_lens, max_seq_len: int):
        """One query per row: q_nope [N, H, dn], q_pe [N, H, P] over the paged cache. Returns [N, H, dv]."""
        a = self.args
        w_kv_b = self.kv_b_proj.weight.view(self.num_heads, -1, a.kv_lora_rank)
        w_uk, w_uv = w_kv_b[:, :a.qk_nope_head_dim], w_kv_b[:, a.qk_nope_head_dim:]  # [H, dn|dv, R]
        q_lat = self.kernels.absorb_query(q_nope, w_uk)  # W_UK folded into the query
        # attention over the latent, then W_UV on its output (kernels: in the launch that merges the splits)
        return self.kernels.mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, self.softmax_scale,
                                       max_seq_len=max_seq_len, w_uv=w_uv)

    def paged_attention(self, q, attn: AttentionMetadata, kv_cache):
        """The step's prefill sequences (expanded), then its decode tokens (absorbed), over the paged
        cache that already holds this step's latents. q [T, H, dn + P] (project's) -> [T, H, dv]."""
        n, dn = attn.num_prefill_tokens, self.args.qk_nope_head_dim
        outputs = []
        if n:
            outputs.append(self.prefill_attention(q[:n], attn, kv_cache))
        if n < q.shape[0]:
            outputs.append(self.absorbed_attention(q[n:, :, :dn], q[n:, :, dn:], kv_cache, attn.decode_block_tables,
                                                   attn.decode_seq_lens, attn.max_decode_seq_len))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def prefill_attention(self, q, attn: AttentionMetadata, kv_cache):
        """All prefill sequences of a step in one attention call: each one's whole context (cached prefix
        and new tokens) read from the cache and decompressed to per-head K and V with kv_b_proj, the
        causal mask aligned to the end. q [Tq, H, dn + P] -> [Tq, H, dv]."""
        a = self.args
        H, dn = self.num_heads, a.qk_nope_head_dim
        latent = self.kernels.gather_latents(kv_cache, attn.prefill_key_slots, q.dtype)      # [Tk, R + P]
        c, k_pe = latent.split([a.kv_lora_rank, a.qk_rope_head_dim], dim=-1)
        k_nope, v = self.kv_b_proj(c).view(-1, H, dn + a.v_head_dim).split([dn, a.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(-1, H, -1)], dim=-1)                      # [Tk, H, dn + P]
        return self.kernels.prefill_attention(q, k, v, attn.prefill_cu_query, attn.prefill_cu_key,
                                              attn.prefill_query_lens, attn.prefill_key_lens, self.softmax_scale)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.self_attn = MLA(args, tp)
        self.mlp = MoE(args, tp) if args.is_moe_layer(layer_idx) else MLP(args.hidden_size, args.intermediate_size, tp)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, residual, cos, sin):
        """Whole sequences: h = h + Attn(norm(h)); h = h + FFN(norm(h)), with the residual sum h carried
        beside the layer output so that each add fuses into the next norm. Returns (output, residual)."""
        x, residual = self.input_norm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    # ---- an engine step, cut at attention (see DeepseekV2ForCausalLM.forward_step) ------------------
    def before_attention(self, x, residual, cos, sin, kv_cache, slot_mapping):
        """The input norm (adding x into the residual stream, if there is one yet) and MLA's projections,
        which write the step's latents to kv_cache: (q [T, H, dn + P], residual [T, D])."""
        x_fp8 = self.self_attn.input_fp8_buffers(x.shape[0], x.device)
        x, residual = self.input_norm(x, residual, x_fp8)
        return self.self_attn.project(x, cos, sin, kv_cache, slot_mapping, x_fp8)[0], residual

    def input_norm(self, x, residual, x_fp8=None):
        """The input norm with x added into the residual stream (x starts it in the first layer):
        (normed, residual); x_fp8: buffers that also receive the normed x quantized (MLA's
        input_fp8_buffers)."""
        if residual is None:
            return self.input_layernorm(x, x_fp8=x_fp8), x
        return self.input_layernorm(x, residual, x_fp8=x_fp8)

    def after_attention(self, attn_out, residual):
        """o_proj of the attention output [T, H, dv], the post-attention norm and the FFN: (x, residual)."""
        x, residual = self.post_attention_layernorm(self.self_attn.o_proj(attn_out.flatten(1)), residual)
        return self.mlp(x), residual


class DeepseekV2Model(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)  # replicated
        self.layers = nn.ModuleList(DecoderLayer(args, i, tp) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args)

    def forward(self, input_ids, positions):
        """Whole sequences [B, S] -> final hidden states [B, S, D]."""
        x, residual = self.embed_tokens(input_ids), None
        cos, sin = self.rotary_emb(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        return self.norm(x, residual)[0]

    # ---- an engine step in pieces: everything but attention, between the attention calls ------------
    def step_first(self, input_ids, positions, kv_cache, slot_mapping):
        """From the token ids to layer 0's attention: (q, residual, cos, sin)."""
        cos, sin = self.rotary_emb(positions)
        q, residual = self.layers[0].before_attention(self.embed_tokens(input_ids), None, cos, sin, kv_cache,
                                                      slot_mapping)
        return q, residual, cos, sin

    def step_between(self, i, attn_out, residual, cos, sin, kv_cache, slot_mapping):
        """From layer i's attention output to layer i + 1's attention (kv_cache is layer i + 1's): (q, residual)."""
        x, residual = self.layers[i].after_attention(attn_out, residual)
        return self.layers[i + 1].before_attention(x, residual, cos, sin, kv_cache, slot_mapping)

    def step_last(self, attn_out, residual):
        """From the last layer's attention output to the final hidden states [T, D]."""
        x, residual = self.layers[-1].after_attention(attn_out, residual)
        return self.norm(x, residual)[0]


# The weights that are FP8 when the model runs in FP8 (use_fp8): the query and output projections of
# attention, and the MoE layers' shared and routed experts: nearly all of the parameters. The rest stay
# in the model's dtype, by measurement (docs/fp8.md: each group in FP8 alone on the demo model):
# kv_a_proj_with_mqa, kv_b_proj and the dense layers' MLPs moved the next-token distributions the most
# per parameter, and the LM head makes the logits. Router, norms and embedding are not Linear layers.
FP8_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "o_proj", "shared_experts.gate_proj", "shared_experts.up_proj",
               "shared_experts.down_proj")


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE):
        super().__init__()
        check_parallel_size(args, tp.size)
        self.args, self.tp = args, tp
        self.model = DeepseekV2Model(args, tp)
        self.lm_head = column_parallel(args.hidden_size, args.vocab_size, 1, tp)  # this rank's vocabulary rows
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Whole causal sequences: input_ids [B, S] -> fp32 logits [B, S, vocab]."""
        if positions is None:
            positions = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        return self.compute_logits(self.model(input_ids, positions))

    def forward_step(self, input_ids, positions, attn: AttentionMetadata, kv_caches) -> torch.Tensor:
        """One engine step over the paged cache: input_ids, positions [T] -> hidden states [T, D]. The
        pieces between the attention calls are the model's step_* methods, so that the engine can
        capture them in CUDA graphs and run attention, whose shapes change with every step, eagerly
        (engine/piecewise.py); this is the same computation in one go."""
        m = self.model
        q, residual, cos, sin = m.step_first(input_ids, positions, kv_caches[0], attn.slot_mapping)
        for i, layer in enumerate(m.layers):
            out = layer.self_attn.paged_attention(q, attn, kv_caches[i])
            if i + 1 < len(m.layers):
                q, residual = m.step_between(i, out, residual, cos, sin, kv_caches[i + 1], attn.slot_mapping)
        return m.step_last(out, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> fp32 logits [..., vocab] (the ranks' vocabulary rows gathered)."""
        return self.tp.all_gather_last(self.lm_head(hidden), self.args.vocab_size).float()

    def use_kernels(self, name: str) -> "DeepseekV2ForCausalLM":
        """Run the kernel families with the set called `name`: "reference" (the default: PyTorch,
        differentiable, any device) or "triton" (fused GPU kernels, inference only)."""
        kernels = load_kernels(name)
        for module in self.modules():
            if "kernels" in vars(module):
                module.kernels = kernels
        return self

    # ---- weights ------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "DeepseekV2ForCausalLM":
        """Random initialisation as the official code does it: N(0, initializer_range) for every
        matrix, ones for the norms. Each tensor draws from its own seed (seed, name, and the rank for a
        split tensor), so a replicated tensor is the same on every tensor-parallel rank."""
        gen = torch.Generator(device=self.device)  # drawn where the weights live (fast for big shapes)
        split_names = split_parameters(self)
        std = self.args.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                rank = self.tp.rank if name in split_names else 0
                gen.manual_seed(seed + zlib.crc32(f"{name}@{rank}".encode()))
                p.normal_(0.0, std, generator=gen)
        self.model.rotary_emb.reset_parameters()
        return self

    @torch.no_grad()
    def use_fp8(self) -> "DeepseekV2ForCausalLM":
        """FP8 weights (e4m3, one scale per 128 x 128 block) for FP8_LINEARS and the routed experts: the
        weights are quantized (on the meta device, before loading, only their dtype changes). For
        inference; call it before fuse_for_inference."""
        if any(getattr(m, "in_proj_weight", None) is not None or getattr(m, "gate_up_weight", None) is not None
               for m in self.modules()):
            raise ValueError("use_fp8 must come before fuse_for_inference")
        for name, module in self.named_modules():
            if (isinstance(module, Linear) and name.endswith(FP8_LINEARS)) or isinstance(module, RoutedExperts):
                module.to_fp8()
        self.args = self.args.replace(quantization="fp8")
        return self

    @torch.no_grad()
    def fuse_for_inference(self) -> "DeepseekV2ForCausalLM":
        """Merge the weights that multiply the same input (MLA's two input projections, each MLP's
        gate and up projections) into single matrices, the originals becoming views of them, and keep
        the routers' weights in fp32: same numbers, fewer kernels. Stack each MoE layer's shared experts
        after its routed ones (MoE.fuse_shared_experts): the same function in fewer kernels for small
        steps, rounded once where it was twice. Give FP8 weights whose K cuBLAS's FP8 GEMM cannot take
        zero columns up to a K it can (Linear.pad_columns). For inference (the fused weights are frozen)."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.fuse_shared_experts()
            elif isinstance(module, MLA):
                module.fuse_input_projections()
            elif isinstance(module, MLP):
                module.fuse_gate_up()
            elif isinstance(module, MoEGate):
                module.keep_fp32_weight()
            elif isinstance(module, Linear):
                module.pad_columns()
        return self

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", progress: bool | None = None,
                        tp: TensorParallel = SINGLE, quantization: str | None = None,
                        args: ModelArgs | None = None) -> "DeepseekV2ForCausalLM":
        """A checkpoint in the official format, in its own dtype unless `dtype` is given; with `tp`, this
        rank's part of it. The model is built on the meta device and each parameter filled once from
        the files (checkpoint.py). The progress bar shows on rank 0. quantization="fp8": FP8 weights
        (use_fp8), quantized as they load; a checkpoint in DeepSeek's FP8 layout loads as FP8 anyway.
        `args`: the checkpoint's shape with other positions (rope_scaling, max_position_embeddings) for
        a context extension."""
        args = args or checkpoint_args(path)
        if quantization is not None:
            args = args.replace(quantization=quantization)
        with torch.device("meta"):
            model = cls(args, tp).to(load_dtype(args, dtype))
        if args.quantization == "fp8":
            model.use_fp8()
        load_weights(model, path, device=device, progress=False if tp.rank else progress)
        model.model.rotary_emb.reset_parameters()  # a computed buffer, not in the files
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, max_shard_size: int = 5 * 1024**3) -> None:
        save_model(self, path, max_shard_size=max_shard_size)

    @classmethod
    def quantize_pretrained(cls, source: str | os.PathLike, target: str | os.PathLike,
                            max_shard_size: int = 5 * 1024**3) -> None:
        """Write the checkpoint at `source` in DeepSeek's FP8 layout at `target`, tensor by tensor (the
        same weights as from_pretrained(source, quantization="fp8").save_pretrained(target), without
        the model in memory)."""
        args = checkpoint_args(source).replace(quantization="fp8")
        with torch.device("meta"):
            model = cls(args).to(load_dtype(args)).use_fp8()
        quantize_checkpoint(model, source, target, max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device
