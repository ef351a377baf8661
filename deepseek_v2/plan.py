"""The memory plan: what one GPU holds when the model is split over N ranks in parallel.py's layout,
and how much latent cache is left beside it. Plain arithmetic on ModelArgs (no torch), so that
`deepseek-v2 info` can answer "does it fit on 8 x H100?" before anyone owns a GPU; the engine still
measures the real activation peak with a profile run when it sizes the cache.

Every split is `split` below (contiguous parts whose sizes differ by at most one); rank 0 holds the
largest part of each, so rank 0 is the rank that decides whether a plan fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import EngineConfig, ModelArgs

GiB = 2**30
# Bytes per value of the weights or the latent cache; "fp8" (1 byte) means the FP8 formats of docs/fp8.md,
# which add their scales: the weights' one fp32 per 128 x 128 block, the cache's one fp32 per token and layer.
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "fp8": 1}
FP8_BLOCK = 128
FP8_CACHE_SCALE_BYTES = 4  # kernels/fp8.py's CACHE_SCALE_BYTES (a test keeps the two equal)

# The memory of one GPU as nvidia-smi reports it (a little less than the name says).
KNOWN_GPUS = {"H100 80 GB": 81_559 * 2**20, "H200 141 GB": 143_771 * 2**20}

# Memory no tensor of the forward accounts for, taken before the cache is sized. Round figures, on the
# high side of what PyTorch engines report on Hopper GPUs.
CUDA_CONTEXT_BYTES = 1 * GiB  # the CUDA context, cuBLAS / cuDNN workspaces, loaded kernel code
ALLOCATOR_SLACK_BYTES = 1 * GiB  # the caching allocator's rounding and fragmentation, small tensors not listed
CUDA_GRAPH_BYTES = 1 * GiB  # the decode graphs' shared memory pool (captured after the cache is made)
NCCL_BYTES = 1 * GiB  # NCCL's communicator buffers, with more than one rank
SAMPLER_BYTES_PER_LOGIT = 40  # the sampler's worst case: ~10 live fp32 [N, V] copies, int64 sort indices among them


def split(n: int, parts: int, index: int) -> tuple[int, int]:
    """The [start, end) of part `index` when n items are cut into `parts` contiguous parts whose sizes
    differ by at most one (the first n % parts parts are one larger)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def check_parallel_size(args: ModelArgs, tensor_parallel_size: int) -> None:
    """A clear error for a tensor-parallel size the layout cannot give every rank work under."""
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    if tp > args.num_attention_heads:
        raise ValueError(f"tensor_parallel_size {tp} is larger than the model's {args.num_attention_heads} "
                         "attention heads: attention is split by heads, so every rank needs one")
    if args.n_routed_experts is not None and tp > args.n_routed_experts:
        raise ValueError(f"tensor_parallel_size {tp} is larger than the model's {args.n_routed_experts} "
                         "routed experts: experts are partitioned whole, so every rank needs one")
    if tp > 1 and args.tie_word_embeddings:
        raise ValueError("tie_word_embeddings with tensor_parallel_size > 1 is not supported (the LM head is "
                         "split by vocabulary, the embedding replicated; no DeepSeek-V2 checkpoint ties them)")


def rank_parameters(args: ModelArgs, tensor_parallel_size: int, rank: int = 0) -> tuple[int, int]:
    """(sharded, replicated): the parameters `rank` holds. Sharded ones are its part of a split weight;
    replicated ones every rank holds whole. At tp 1 the sum is num_parameters()["total"]."""
    check_parallel_size(args, tensor_parallel_size)
    a, D = args, args.hidden_size

    def part(n: int) -> int:
        start, end = split(n, tensor_parallel_size, rank)
        return end - start

    h = part(a.num_attention_heads)
    # q_proj / q_b_proj and kv_b_proj: the rank's heads' rows; o_proj: their columns
    q_in = a.q_lora_rank or D
    sharded_attn = h * (a.qk_head_dim * q_in + (a.qk_nope_head_dim + a.v_head_dim) * a.kv_lora_rank
                        + a.v_head_dim * D)
    # kv_a_proj_with_mqa with kv_a_layernorm (one latent head), the two layer norms, q_a_proj with its norm
    replicated_attn = D * a.kv_cache_dim + a.kv_lora_rank + 2 * D
    if a.q_lora_rank is not None:
        replicated_attn += D * a.q_lora_rank + a.q_lora_rank
    if a.attention_bias:  # o_proj's bias too: it is added once, after the all-reduce of the partial sums
        replicated_attn += (a.q_lora_rank or 0) + a.kv_cache_dim + D
    sharded = replicated = 0
    for i in range(a.num_hidden_layers):
        sharded += sharded_attn
        replicated += replicated_attn
        if a.is_moe_layer(i):
            replicated += a.n_routed_experts * D  # the router: every rank routes every token
            sharded += 3 * D * (a.moe_intermediate_size * part(a.n_routed_experts)  # whole experts
                                + part(a.moe_intermediate_size * (a.n_shared_experts or 0)))  # shared: columns
        else:
            sharded += 3 * D * part(a.intermediate_size)
    replicated += a.vocab_size * D + D  # the embedding (a lookup reads only its rows) and the final norm
    if not a.tie_word_embeddings:  # a tied head reads the replicated embedding: nothing more to hold
        sharded += part(a.vocab_size) * D
    return sharded, replicated


def fp8_parameters(args: ModelArgs, tensor_parallel_size: int, rank: int = 0) -> tuple[int, int, int, int]:
    """(sharded, replicated) values and (sharded, replicated) 128 x 128 scale blocks of the weights `rank`
    holds in FP8 under quantization "fp8": model.FP8_LINEARS (q_proj or q_a_proj and q_b_proj, o_proj,
    the shared experts) and the routed experts. The rest of rank_parameters stays in bf16."""
    a, D = args, args.hidden_size

    def part(n: int) -> int:
        start, end = split(n, tensor_parallel_size, rank)
        return end - start

    h = part(a.num_attention_heads)
    matrices = [(h * a.qk_head_dim, a.q_lora_rank or D, True), (D, h * a.v_head_dim, True)]  # (rows, cols, split)
    if a.q_lora_rank is not None:
        matrices.append((a.q_lora_rank, D, False))
    counts = [0, 0, 0, 0]
    for i in range(a.num_hidden_layers):
        layer = list(matrices)
        if a.is_moe_layer(i):
            shared = part(a.moe_intermediate_size * (a.n_shared_experts or 0))
            layer += [(shared, D, True)] * 2 + [(D, shared, True)]
            I = a.moe_intermediate_size
            layer += [(I, D, True)] * 2 * part(a.n_routed_experts) + [(D, I, True)] * part(a.n_routed_experts)
        for rows, cols, is_split in layer:
            blocks = -(-rows // FP8_BLOCK) * -(-cols // FP8_BLOCK)
            counts[0 if is_split else 1] += rows * cols
            counts[2 if is_split else 3] += blocks
    return tuple(counts)


def cache_bytes_per_token(args: ModelArgs, bytes_per_value: int) -> int:
    """Latent cache bytes per token, all layers (1 byte per value: FP8, with its scale per layer)."""
    scale = FP8_CACHE_SCALE_BYTES if bytes_per_value == 1 else 0
    return args.num_hidden_layers * (args.kv_cache_dim * bytes_per_value + scale)


def activation_terms(args: ModelArgs, tensor_parallel_size: int, config: EngineConfig, max_model_len: int,
                     bytes_per_value: int) -> dict[str, int]:
    """The activation reserve of rank 0, in bytes, term by term. The peak tensors of one engine step
    (activations in the weights' dtype, `bytes_per_value`), plus memory outside the tensors. Every term
    is counted as if all were alive at once, which they are not (attention's temporaries are freed
    before the MoE's are made, the logits come after the last layer): an overestimate by design."""
    check_parallel_size(args, tensor_parallel_size)
    a, b = args, bytes_per_value
    tp = tensor_parallel_size
    D, R, P = a.hidden_size, a.kv_lora_rank, a.qk_rope_head_dim
    h = split(a.num_attention_heads, tp, 0)[1]
    T = min(config.max_num_batched_tokens, max_model_len)  # tokens of the largest prefill step
    # Keys that step's prefill chunk attends to: the last chunk of a max-length prompt (or one after a
    # long cached prefix) attends to the whole context, expanded for the rank's heads.
    L = max_model_len
    N = config.max_num_seqs  # rows that need logits: one per sequence of a decode step
    moe = dense = 0
    if a.n_routed_experts is not None:
        # the routed experts' gate/up output [T*K, 2I] (fused kernels keep only [T*K, I]) and their
        # outputs [T*K, D]; the router's fp32 scores [T, E]; the fp32 sum over the K picks [T, D];
        # the shared experts' gate/up output [T, 2 * the rank's columns]
        shared = split(a.moe_intermediate_size * (a.n_shared_experts or 0), tp, 0)[1]
        moe = (T * a.num_experts_per_tok * (2 * a.moe_intermediate_size + D) * b
               + T * a.n_routed_experts * 4 + T * D * 4 + T * 2 * shared * b)
    if any(not a.is_moe_layer(i) for i in range(a.num_hidden_layers)):
        dense = T * 2 * split(a.intermediate_size, tp, 0)[1] * b  # gate/up output [T, 2 * the rank's columns]
    return {
        # the hidden state, the residual stream, the normed input and the layer output, [T, D] each
        "hidden": 4 * T * D * b,
        # q_a's output; q and its copy concatenated for attention [T, h, dn + P]; the latent and k_pe
        # [T, R + P]; the rotated q_pe [T, h, P]; attention's output and its copy laid out for o_proj
        "attention": T * ((a.q_lora_rank or 0) + 2 * h * a.qk_head_dim + R + P + h * P + 2 * h * a.v_head_dim) * b,
        # the context's latents gathered from the cache [L, R + P]; kv_b_proj's output [L, h, dn + dv];
        # K concatenated with the shared rope key [L, h, dn + P]; V padded to that head dim for flash
        # attention [L, h, dn + P] (kernels/prefill.py; it needs no mask: causal is aligned to the end)
        "expanded_kv": L * (R + P + h * (a.qk_nope_head_dim + a.v_head_dim) + 2 * h * a.qk_head_dim) * b,
        "ffn": max(moe, dense),
        # the vocabulary-split head's outputs gathered from every rank, then padded and concatenated
        # [N, V] (weights' dtype), then fp32 logits and the sampler's working copies of them
        "logits": N * a.vocab_size * (2 * b + SAMPLER_BYTES_PER_LOGIT),
        "fixed": (CUDA_CONTEXT_BYTES + ALLOCATOR_SLACK_BYTES + (0 if config.enforce_eager else CUDA_GRAPH_BYTES)
                  + (NCCL_BYTES if tp > 1 else 0)),
        # on one rank, the shared experts' copy stacked after the routed experts for small steps
        # (MoE.fuse_shared_experts), in the activations' dtype (FP8 weights hold about half of it)
        "shared_experts_stacked": (3 * D * a.moe_intermediate_size * (a.n_shared_experts or 0) * b
                                   * sum(a.is_moe_layer(i) for i in range(a.num_hidden_layers)) if tp == 1 else 0),
    }


@dataclass(frozen=True)
class MemoryPlan:
    """Memory of the rank with the largest share (rank 0), in bytes.

    `fits` means exactly: weights plus the activation reserve are less than the budget
    (gpu_memory_bytes x gpu_memory_utilization), and the cache left over, in whole blocks of
    block_size tokens less the engine's one scratch block, holds at least one sequence of
    max_model_len tokens. (When only the second part fails, the engine starts anyway and lowers
    max_model_len to what the cache holds.)"""

    tensor_parallel_size: int
    gpu_memory_bytes: int
    gpu_memory_utilization: float
    max_model_len: int
    sharded_weight_bytes: int
    replicated_weight_bytes: int
    activation_bytes: int  # the reserve estimate, fixed overhead included
    cache_bytes_per_token: int  # on every rank: the latent cache is replicated
    cache_bytes: int  # the budget left for the cache (negative when weights and reserve do not fit)
    cache_tokens: int  # whole blocks of it, less the scratch block

    @property
    def weight_bytes(self) -> int:
        return self.sharded_weight_bytes + self.replicated_weight_bytes

    @property
    def budget_bytes(self) -> float:
        return self.gpu_memory_bytes * self.gpu_memory_utilization

    @property
    def max_length_sequences(self) -> float:
        return self.cache_tokens / self.max_model_len

    @property
    def weights_fit(self) -> bool:
        """Weights and the activation reserve fit in the budget (the engine refuses to start otherwise)."""
        return self.weight_bytes + self.activation_bytes < self.budget_bytes

    @property
    def fits(self) -> bool:
        return self.weights_fit and self.cache_tokens >= self.max_model_len


def memory_plan(args: ModelArgs, tensor_parallel_size: int, gpu_memory_bytes: int,
                config: EngineConfig | None = None, weight_bytes_per_value: int = 2,
                cache_bytes_per_value: int = 2) -> MemoryPlan:
    """The plan for rank 0 of `tensor_parallel_size` GPUs of `gpu_memory_bytes` each, with the engine
    knobs of `config` (max_model_len None: the model's, as the engine takes it). weight_bytes_per_value
    1: FP8 weights (fp8_parameters in e4m3 plus their scales, the rest and the activations in bf16);
    cache_bytes_per_value 1: the FP8 latent cache (plus its scales)."""
    if gpu_memory_bytes <= 0:
        raise ValueError(f"gpu_memory_bytes must be positive, got {gpu_memory_bytes}")
    config = (config or EngineConfig()).sized_for(gpu_memory_bytes)  # the engine's batch budgets on this GPU
    max_model_len = min(config.max_model_len or args.max_position_embeddings, args.max_position_embeddings)
    sharded, replicated = rank_parameters(args, tensor_parallel_size)
    sharded_bytes, replicated_bytes = sharded * weight_bytes_per_value, replicated * weight_bytes_per_value
    if weight_bytes_per_value == 1:  # FP8: e4m3 values and fp32 block scales, the rest in bf16
        fp8_sharded, fp8_replicated, sharded_blocks, replicated_blocks = fp8_parameters(args, tensor_parallel_size)
        sharded_bytes = 2 * sharded - fp8_sharded + 4 * sharded_blocks
        replicated_bytes = 2 * replicated - fp8_replicated + 4 * replicated_blocks
    reserve = sum(activation_terms(args, tensor_parallel_size, config, max_model_len,
                                   max(weight_bytes_per_value, 2)).values())  # FP8 activations are bf16
    per_token = cache_bytes_per_token(args, cache_bytes_per_value)
    weights = sharded_bytes + replicated_bytes
    cache = int(gpu_memory_bytes * config.gpu_memory_utilization) - weights - reserve
    blocks = max(cache // (per_token * config.block_size) - 1, 0)  # as ModelRunner._size_cache counts them
    return MemoryPlan(tensor_parallel_size, gpu_memory_bytes, config.gpu_memory_utilization, max_model_len,
                      sharded_bytes, replicated_bytes, reserve, per_token, cache, blocks * config.block_size)


def longest_fitting_len(args: ModelArgs, tensor_parallel_size: int, gpu_memory_bytes: int,
                        config: EngineConfig | None = None, weight_bytes_per_value: int = 2,
                        cache_bytes_per_value: int = 2) -> int:
    """The largest max_model_len whose plan fits (0: none). The reserve grows with max_model_len (the
    expanded context, the mask), so this is more than the tokens a longer plan's cache holds."""
    config = config or EngineConfig()

    def fits(n: int) -> bool:
        return memory_plan(args, tensor_parallel_size, gpu_memory_bytes, replace(config, max_model_len=n),
                           weight_bytes_per_value, cache_bytes_per_value).fits

    lo, hi = 0, args.max_position_embeddings  # fits(lo) is taken as true; fits grows false with n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def format_plan(plan: MemoryPlan) -> str:
    """Two lines a person reads: what rank 0 holds, and whether it fits."""
    p = plan
    memory = f"{round(p.gpu_memory_bytes / GiB, 1):g} GiB x {p.gpu_memory_utilization:.2f}"
    head = (f"per GPU (rank 0 of {p.tensor_parallel_size}): weights {_gib(p.weight_bytes)} GiB "
            f"({_gib(p.sharded_weight_bytes)} sharded + {_gib(p.replicated_weight_bytes)} replicated), "
            f"activations ~{_gib(p.activation_bytes)} GiB, ")
    needed = p.weight_bytes + p.activation_bytes
    if not p.weights_fit:
        return (head + f"no cache\n  does not fit in {memory}: weights and activations need {_gib(needed)} GiB "
                f"of the {_gib(p.budget_bytes)} GiB budget")
    verdict = (f"fits in {memory}" if p.fits else
               f"the model fits in {memory}, but not a whole sequence of {p.max_model_len:,} tokens "
               f"({_gib(p.max_model_len * p.cache_bytes_per_token)} GiB of cache): serve a shorter context")
    return (head + f"cache {_gib(p.cache_bytes)} GiB\n  = {p.cache_tokens:,} tokens = "
            f"{p.max_length_sequences:,.1f} sequences of {p.max_model_len:,}; {verdict}")
