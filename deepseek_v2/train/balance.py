"""DeepSeekMoE balance losses (DeepSeek-V2 paper, section 2.2.3 "Auxiliary Loss for Load Balance",
equations 23 to 31), expert load statistics and the load plot.

The routed experts are split into D device groups, contiguous blocks of E/D experts: the model's
`n_group` (as in the official configs, where V2 has 8 groups of 20). For one sequence of T tokens,
with s[t, e] the router's softmax score and K experts picked per token:

    f_e   = E / (K T) * #{t picks e}            P_e   = mean_t s[t, e]
    L_exp = alpha1 * sum_e f_e P_e                                              (expert level, eqs. 23-25)
    f'_d  = mean_{e in d} f_e                   P'_d  = sum_{e in d} P_e
    L_dev = alpha2 * sum_d f'_d P'_d                                            (device level, eqs. 26-28)
    f''_d = D / (M T) * #{t sends to d}         (a token is sent to d if it picks any expert there)
    L_com = alpha3 * sum_d f''_d P'_d                                           (communication, eqs. 29-31)

M is the device limit (`topk_group` under group_limited_greedy routing, otherwise min(K, D)).
Each loss is averaged over the sequences of the batch (the official seq_aux=True; with seq_aux
False the whole batch counts as one sequence) and summed over the MoE layers. The f terms are
counts and carry no gradient; the gradient flows to the router through P. alpha1 is the model's
`aux_loss_alpha`, the official config key.

Legend: B sequences, T tokens per sequence, N = B*T tokens, E routed experts, K picks per token,
D device groups, G = E/D experts per group, L MoE layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ModelArgs
from ..moe import Routing


@dataclass
class BalanceLosses:
    expert: torch.Tensor  # already multiplied by its alpha
    device: torch.Tensor
    comm: torch.Tensor

    @property
    def total(self) -> torch.Tensor:
        return self.expert + self.device + self.comm

    def __add__(self, other: "BalanceLosses") -> "BalanceLosses":
        return BalanceLosses(self.expert + other.expert, self.device + other.device, self.comm + other.comm)


def device_limit(args: ModelArgs) -> int:
    """M: the most device groups one token's experts can come from."""
    groups = args.n_group or 1
    if args.topk_method == "group_limited_greedy":
        return args.topk_group
    return min(args.num_experts_per_tok, groups)


def balance_losses(routing: Routing, num_seqs: int, args: ModelArgs, alpha2: float = 0.0,
                   alpha3: float = 0.0) -> BalanceLosses:
    """The three balance losses of one MoE layer from its routing record of num_seqs whole
    sequences (tokens in row-major order, as the model flattens [B, T])."""
    E, K = args.n_routed_experts, args.num_experts_per_tok
    D = args.n_group or 1
    if E % D:
        raise ValueError(f"n_group={D} device groups must divide n_routed_experts={E}")
    G, M = E // D, device_limit(args)
    B = num_seqs if args.seq_aux else 1
    scores = routing.scores.view(B, -1, E)  # [B, T, E]
    ids = routing.topk_ids.view(B, -1, K).long()  # [B, T, K]
    T = scores.shape[1]

    ones = torch.ones(B, T * K, device=scores.device)
    picks = torch.zeros(B, E, device=scores.device).scatter_add_(1, ids.flatten(1), ones)  # [B, E]
    f = picks * (E / (K * T))  # [B, E]
    P = scores.mean(dim=1)  # [B, E]
    f_dev = f.view(B, D, G).mean(dim=-1)  # [B, D]
    P_dev = P.view(B, D, G).sum(dim=-1)  # [B, D]
    sent = torch.zeros(B, T, D, device=scores.device).scatter_(2, ids // G, 1.0)  # [B, T, D] 1 if sent
    f_comm = sent.sum(dim=1) * (D / (M * T))  # [B, D]
    return BalanceLosses(
        expert=args.aux_loss_alpha * (f * P).sum(-1).mean(),
        device=alpha2 * (f_dev * P_dev).sum(-1).mean(),
        comm=alpha3 * (f_comm * P_dev).sum(-1).mean(),
    )


# ---- expert load ------------------------------------------------------------------------------------
def expert_counts(routing: Routing, num_experts: int) -> torch.Tensor:
    """[E] float: how many times each expert was picked (stays on the device; no host sync)."""
    return torch.bincount(routing.topk_ids.flatten().long(), minlength=num_experts).float()


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    """[L, E] counts -> [L, E] share of each layer's picks."""
    return counts / counts.sum(dim=-1, keepdim=True).clamp(min=1)


def load_spread(counts: torch.Tensor) -> float:
    """Most-loaded expert over the mean load, averaged over layers: 1.0 is perfect balance (the
    paper's MaxVio is this minus one)."""
    mean = counts.mean(dim=-1).clamp(min=1e-9)
    return float((counts.amax(dim=-1) / mean).mean())


def plot_expert_load(load: list[list[float]] | torch.Tensor, path: str, title: str = "expert load",
                     layer_ids: list[int] | None = None, group_size: int | None = None) -> None:
    """A PNG heatmap of per-expert load per MoE layer, as a multiple of the balanced load 1/E;
    lines mark the device groups when group_size is given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = torch.as_tensor(load, dtype=torch.float32)
    L, E = load.shape
    relative = (load * E).numpy()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * E + 2), max(2.5, 0.45 * L + 1.5)))
    vmax = max(2.0, float(relative.max()))
    im = ax.imshow(relative, cmap="coolwarm", vmin=0.0, vmax=vmax, aspect="auto")
    for i in range(L):
        for j in range(E):
            ax.text(j, i, f"{relative[i, j]:.2f}", ha="center", va="center", fontsize=7)
    for g in range(group_size or E, E, group_size or E):
        ax.axvline(g - 0.5, color="black", linewidth=2)
    ax.set_xticks(range(E))
    ax.set_yticks(range(L), [str(i) for i in (layer_ids or range(L))])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="load / balanced load")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
