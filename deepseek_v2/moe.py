"""DeepSeekMoE: SwiGLU experts, the softmax router with greedy or group-limited top-k, and the
MoE layer (routed experts plus always-on shared experts).

Routed expert weights are stacked at load time: `experts.gate_up_proj [E, 2I, D]` (rows 0..I-1 are
each expert's gate_proj, rows I..2I-1 its up_proj) and `experts.down_proj [E, D, I]`. The
checkpoint keeps one tensor per expert; checkpoint.py stacks and unstacks them.

Legend: N tokens, D hidden, E routed experts, K experts per token, I expert width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .kernels import use_gpu_kernels
from .kernels.reference import moe_ref


class MLP(nn.Module):
    """SwiGLU MLP: dense layers and the fused shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by fuse_gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        gate_up = F.linear(x, self.gate_up_weight)
        if use_gpu_kernels(x):
            from .kernels.activation import silu_and_mul
            h = silu_and_mul(gate_up.view(-1, gate_up.shape[-1])).view(*x.shape[:-1], -1)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            h = F.silu(gate) * up
        return self.down_proj(h)

    @torch.no_grad()
    def fuse_gate_up(self) -> None:
        """Inference: one [2I, D] matrix for gate_proj and up_proj (the two become views of it)."""
        if self.gate_up_weight is not None:
            return
        fused = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        n = self.gate_proj.weight.shape[0]
        self.gate_proj.weight = nn.Parameter(fused[:n], requires_grad=False)
        self.up_proj.weight = nn.Parameter(fused[n:], requires_grad=False)
        self.gate_up_weight = fused


@dataclass
class Routing:
    """What the router decided for N tokens; kept for the balance losses and load statistics."""

    scores: torch.Tensor | None  # [N, E] fp32 softmax over all routed experts (None: fused GPU router)
    topk_ids: torch.Tensor  # [N, K]
    topk_weights: torch.Tensor  # [N, K] fp32, already normalised or scaled


class MoEGate(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))

    def forward(self, x: torch.Tensor) -> Routing:
        a = self.args
        # The router runs in fp32 whatever the model dtype (official code; better accuracy), also
        # under bf16 autocast in training.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())  # [N, E]
        if use_gpu_kernels(x) and a.topk_method == "greedy":
            from .kernels.router import topk_softmax  # softmax, top-k and weighting in one kernel
            weights, ids = topk_softmax(logits, a.num_experts_per_tok, a.norm_topk_prob and a.num_experts_per_tok > 1,
                                        a.routed_scaling_factor)
            return Routing(None, ids, weights)
        scores = logits.softmax(dim=-1)
        if a.topk_method == "greedy":
            weights, ids = torch.topk(scores, a.num_experts_per_tok, dim=-1, sorted=False)
        else:  # group_limited_greedy: keep the topk_group groups with the highest max score
            group_scores = scores.view(-1, a.n_group, a.n_routed_experts // a.n_group).amax(dim=-1)
            group_ids = torch.topk(group_scores, a.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_ids, 1.0)
            expert_mask = group_mask.repeat_interleave(a.n_routed_experts // a.n_group, dim=-1)
            masked = scores.masked_fill(expert_mask == 0, 0.0)
            weights, ids = torch.topk(masked, a.num_experts_per_tok, dim=-1, sorted=False)
        if a.num_experts_per_tok > 1 and a.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * a.routed_scaling_factor
        return Routing(scores, ids, weights)


class RoutedExperts(nn.Module):
    """All routed experts of one layer as two stacked weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        E, D, I = args.n_routed_experts, args.hidden_size, args.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if use_gpu_kernels(x):  # inference on GPU: the fused Triton kernels
            from .kernels.moe import fused_moe
            return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)
        # Tokens grouped by expert, a loop over experts (never over tokens); differentiable, so
        # it is also the training path.
        return moe_ref(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = MoEGate(args)
        self.experts = RoutedExperts(args)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)
        self.last_routing: Routing | None = None  # set when record_routing is on (training)
        self.record_routing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.gate(x)
        if self.record_routing:
            self.last_routing = routing
        y = self.experts(x, routing.topk_ids, routing.topk_weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y.view(shape)
