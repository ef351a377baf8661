"""DeepSeekMoE: SwiGLU experts, the softmax router with greedy or group-limited top-k, and the
MoE layer (routed experts plus always-on shared experts).

Routed expert weights are stacked at load time: `experts.gate_up_proj [E, 2I, D]` (rows 0..I-1 are
each expert's gate_proj, rows I..2I-1 its up_proj) and `experts.down_proj [E, D, I]`, and in FP8
their block scales likewise (`gate_up_proj_scale_inv`: the gate_proj's block rows, then the
up_proj's). The checkpoint keeps one tensor per expert; checkpoint.py stacks and unstacks them.
For inference on one rank the shared experts are also stacked after the routed ones, as S more
experts of width I that every token picks at weight 1 (MoE.fuse_shared_experts): small steps run
all of them in one call of the fused MoE kernels.

Under tensor parallelism (parallel.py) a rank holds a contiguous range of the routed experts whole,
and its columns of the shared experts and dense MLPs; the MoE layer sums its routed and shared parts
with one all-reduce. The router is replicated: every rank routes every token the same way.

Legend: N tokens, D hidden, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelArgs
from .kernels import REFERENCE
from .kernels.fp8 import BLOCK, quantize_once, quantized_buffers, quantize_weight, zero_padded
from .parallel import SINGLE, TensorParallel, column_parallel, fuse_rows, row_parallel


class MLP(nn.Module):
    """SwiGLU MLP: dense layers and the fused shared experts. Split by the intermediate dimension; the
    down projection's partial sums are all-reduced unless reduce=False (the MoE layer reduces once)."""

    def __init__(self, hidden_size: int, intermediate_size: int, tp: TensorParallel = SINGLE, reduce: bool = True):
        super().__init__()
        self.gate_proj = column_parallel(hidden_size, intermediate_size, 1, tp)
        self.up_proj = column_parallel(hidden_size, intermediate_size, 1, tp)
        self.down_proj = row_parallel(intermediate_size, 1, hidden_size, tp, reduce=reduce)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse_gate_up
        self.gate_up_scale: torch.Tensor | None = None  # its FP8 block scales
        self.kernels = REFERENCE

    def forward(self, x: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """down(silu(gate(x)) * up(x)). x_fp8: x already quantized, for FP8 gate/up weights (the kernels'
        linear's x_fp8). A step that quantizes once (fp8.QUANTIZE_ONCE_FROM) has the activation's launch
        quantize its output for an FP8 down projection, at the width it multiplies (zero columns too)."""
        if self.gate_up_weight is None:
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        else:
            gate_up = self.kernels.linear(x, self.gate_up_weight, None, self.gate_up_scale, x_fp8=x_fp8)
        down = self.down_proj
        T = gate_up.numel() // gate_up.shape[-1]
        if down.weight_scale_inv is None or down.block_offset != (0, 0) or not quantize_once(T):
            return down(self.kernels.silu_and_mul(gate_up))
        width = zero_padded(down.weight, down.weight_scale_inv)[0].shape[1]
        h_fp8 = quantized_buffers(T, width, gate_up.device, pad_rows=BLOCK)
        return down(self.kernels.silu_and_mul(gate_up, x_fp8=h_fp8), x_fp8=h_fp8)

    @torch.no_grad()
    def fuse_gate_up(self) -> None:
        """Inference: one [2I, D] matrix for gate_proj and up_proj, both views of it (parallel.fuse_rows)."""
        if self.gate_up_weight is None and (fused := fuse_rows([self.gate_proj, self.up_proj])) is not None:
            self.gate_up_weight, self.gate_up_scale = fused


@dataclass
class Routing:
    """What the router decided for N tokens; kept for the balance losses and load statistics."""

    logits: torch.Tensor  # [N, E] fp32 router logits
    topk_ids: torch.Tensor  # [N, K]
    topk_weights: torch.Tensor  # [N, K] fp32, already normalised or scaled

    @property
    def scores(self) -> torch.Tensor:
        """[N, E] the softmax over all routed experts (what the balance losses average)."""
        return self.logits.softmax(dim=-1)


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        # inference: the weight in fp32 once (keep_fp32_weight), not cast again at every step
        self.register_buffer("weight_fp32", None, persistent=False)
        self.kernels = REFERENCE

    def forward(self, x: torch.Tensor, num_shared: int = 0,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> Routing:
        """Softmax scores over the routed experts, the top K of them (greedy, or among the best
        topk_group of n_group expert groups), weighted: divided by their sum with norm_topk_prob,
        else times routed_scaling_factor. num_shared: each token's picks end with that many more, the
        experts E, E + 1, ... at weight 1 (the shared experts stacked after the routed ones). x_fp8:
        buffers that also receive x quantized for FP8 experts (the kernels' route)."""
        a = self.args
        # The router runs in fp32 whatever the model dtype (official code; better accuracy), also
        # under bf16 autocast in training.
        weight = self.weight.float() if self.weight_fp32 is None else self.weight_fp32
        K = a.num_experts_per_tok
        groups = None if a.topk_method == "greedy" else (a.n_group, a.topk_group)
        logits, weights, ids = self.kernels.route(x, weight, K, a.norm_topk_prob and K > 1, a.routed_scaling_factor,
                                                  num_shared, groups, x_fp8=x_fp8)
        return Routing(logits, ids, weights)

    @torch.no_grad()
    def keep_fp32_weight(self) -> None:
        """Inference: hold the weight's fp32 copy that the router multiplies by, so that a step does
        not cast it again (a kernel per MoE layer and step, in a bf16 model); the same numbers. The copy
        is not updated: for weights that no longer change."""
        if self.weight.dtype != torch.float32:
            self.weight_fp32 = self.weight.float()


class RoutedExperts(nn.Module):
    """The routed experts of one layer this rank holds (all of them on one rank) as two stacked weights."""

    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.first_expert, end = tp.part(E)
        self.num_experts = E
        self.gate_up_proj = nn.Parameter(torch.empty(end - self.first_expert, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(end - self.first_expert, D, I))
        self.register_parameter("gate_up_proj_scale_inv", None)  # FP8 block scales (to_fp8)
        self.register_parameter("down_proj_scale_inv", None)
        self.kernels = REFERENCE

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                add: torch.Tensor | None = None, x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, D] -> sum over each token's K experts of weight * SwiGLU expert(x), [N, D]; with part
        of the experts, over those held here (a pick of another rank's expert gets the id -1). add
        [N, D]: added to that sum (the shared experts' output: the kernels add it in their last launch).
        x_fp8: FP8 experts' input already quantized (by the router's launch), the kernels' moe's x_fp8."""
        held = self.gate_up_proj.shape[0]
        if held < self.num_experts:  # global ids -> this rank's, -1 for the rest
            local = topk_ids - self.first_expert
            topk_ids = torch.where((local >= 0) & (local < held), local, -1)
        return self.kernels.moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids,
                                self.gate_up_proj_scale_inv, self.down_proj_scale_inv, add, x_fp8=x_fp8)

    @torch.no_grad()
    def to_fp8(self) -> None:
        """FP8 experts, as parallel.Linear.to_fp8 does it: gate_proj and up_proj are quantized as the two
        matrices they are in the checkpoint, their block scales stacked."""
        I = self.down_proj.shape[-1]
        (gate, gate_s), (up, up_s), (down, down_s) = (
            quantize_weight(w) for w in (self.gate_up_proj[:, :I], self.gate_up_proj[:, I:], self.down_proj))
        for name, value in [("gate_up_proj", torch.cat([gate, up], dim=1)), ("down_proj", down),
                            ("gate_up_proj_scale_inv", torch.cat([gate_s, up_s], dim=1)),
                            ("down_proj_scale_inv", down_s)]:
            setattr(self, name, nn.Parameter(value, requires_grad=False))


@dataclass
class ExpertStack:
    """The routed experts with the shared experts after them, as more experts (MoE.fuse_shared_experts):
    the fused MoE kernel's stacked weights [E + S, 2I, D] and [E + S, D, I], and their FP8 block scales."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_scale: torch.Tensor | None
    down_scale: torch.Tensor | None
    num_shared: int


class MoE(nn.Module):
    # Steps of up to this many tokens run the shared experts inside the routed experts' kernel
    # (fuse_shared_experts); larger ones run them as their own MLP, whose dense GEMMs are as fast or
    # faster there. scripts/bench_moe_layer.py on an H200 (V2-Lite's layer, stacked against beside):
    # bf16 1.12x at 1 token, 1.03x at 16, 1.01x at 64, 0.96x at 128; FP8 1.30x, 1.11x, 1.11x, 1.01x.
    FUSED_SHARED_MAX_TOKENS = 64

    def __init__(self, args: ModelArgs, tp: TensorParallel = SINGLE):
        super().__init__()
        self.args, self.tp = args, tp
        self.gate = MoEGate(args)
        self.experts = RoutedExperts(args, tp)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, tp,
                                   reduce=False) if args.n_shared_experts else None)
        self.stack: ExpertStack | None = None  # set by fuse_shared_experts
        self.last_routing: Routing | None = None  # set when record_routing is on (training)
        self.record_routing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        T = x.shape[0]
        stack = self.stack if self.stack is not None and T <= self.FUSED_SHARED_MAX_TOKENS else None
        x_fp8 = shared_x_fp8 = None
        if self.experts.gate_up_proj_scale_inv is not None:  # FP8 experts: the router quantizes x for them
            share = (stack is None and quantize_once(T) and self.shared_experts is not None
                     and self.shared_experts.gate_up_scale is not None)  # and for the shared experts' GEMM
            q, scales = quantized_buffers(T, x.shape[1], x.device, pad_rows=BLOCK if share else 1)
            x_fp8 = (q[:T], scales[:T])
            shared_x_fp8 = (q, scales) if share else None
        routing = self.gate(x, stack.num_shared if stack is not None else 0, x_fp8)
        if self.record_routing:
            K = self.args.num_experts_per_tok  # the routed picks only
            self.last_routing = Routing(routing.logits, routing.topk_ids[:, :K], routing.topk_weights[:, :K])
        if stack is not None:  # routed and shared experts in one kernel
            y = self.experts.kernels.moe(x, stack.gate_up, stack.down, routing.topk_weights, routing.topk_ids,
                                         stack.gate_up_scale, stack.down_scale, x_fp8=x_fp8,
                                         num_shared=stack.num_shared)
        else:
            shared = self.shared_experts(x, shared_x_fp8) if self.shared_experts is not None else None
            y = self.experts(x, routing.topk_ids, routing.topk_weights, add=shared, x_fp8=x_fp8)  # routed + shared
        return self.tp.all_reduce(y).view(shape)  # routed and shared parts of every rank, summed once

    @torch.no_grad()
    def fuse_shared_experts(self) -> None:
        """Inference: the shared experts, an MLP of width S * I, also as S experts of width I stacked after
        the routed ones, which every token picks at weight 1: small steps then run all experts in the
        fused MoE's kernels, not in three more launches (two GEMMs and the activation). Same function:
        the MLP's intermediate columns split into S groups, the down projection's partial sums added in
        fp32 with the routed picks (rounded once to the model's dtype, not twice). The routed experts'
        weights become views of the stack; the shared experts' weights are copied (their MLP still runs
        steps of more than FUSED_SHARED_MAX_TOKENS tokens), S * 3 * I * D more values a layer. Only on one
        rank (under tensor parallelism a rank holds a slice of the shared MLP, and other ranks' experts),
        and where both are in one format: FP8 needs I a multiple of 128 (whole scale blocks per expert)."""
        shared, experts = self.shared_experts, self.experts
        if shared is None or self.stack is not None or self.tp.size > 1:
            return
        I = experts.down_proj.shape[2]
        layers = (shared.gate_proj, shared.up_proj, shared.down_proj)
        fp8 = experts.gate_up_proj_scale_inv is not None
        if any((layer.weight_scale_inv is not None) != fp8 or layer.weight.dtype != experts.down_proj.dtype
               or layer.bias is not None for layer in layers) or (fp8 and I % BLOCK):
            return
        S = shared.gate_proj.out_features // I

        def as_experts(gate, up, down):
            """[S I, D], [S I, D], [D, S I] (or their block scales) -> [S, 2I, D], [S, D, I]."""
            gate_up = torch.cat([gate.unflatten(0, (S, -1)), up.unflatten(0, (S, -1))], 1)
            return gate_up, down.unflatten(1, (S, -1)).transpose(0, 1)

        gate_up, down = as_experts(*(layer.weight for layer in layers))
        names = [("gate_up_proj", gate_up), ("down_proj", down)]
        if fp8:
            gate_up_s, down_s = as_experts(*(layer.weight_scale_inv for layer in layers))
            names += [("gate_up_proj_scale_inv", gate_up_s), ("down_proj_scale_inv", down_s)]
        stacked = {}
        for name, extra in names:
            stacked[name] = torch.cat([getattr(experts, name), extra])
            setattr(experts, name, nn.Parameter(stacked[name][:-S], requires_grad=False))
        self.stack = ExpertStack(stacked["gate_up_proj"], stacked["down_proj"],
                                 stacked.get("gate_up_proj_scale_inv"), stacked.get("down_proj_scale_inv"), S)
