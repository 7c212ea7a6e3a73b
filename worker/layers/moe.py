"""DeepSeek-style mixture of experts: a router (top-k gating), routed experts run grouped (each
expert's MLP once over the tokens routed to it) and always-on shared experts.

Tensor parallelism: every expert is split like the dense MLP — each rank holds all experts,
with 1/tp of each one's intermediate width (gate/up column-parallel, down row-parallel) — and
the routed and shared partial sums are all-reduced once per layer. Routing is replicated:
every rank computes the same gate on the same (already reduced) hidden states. Why not expert
parallelism: with activations replicated on every rank both need the same one all-reduce,
but sharding experts leaves a rank with hot experts doing most of the work, while splitting
every expert keeps the ranks' work equal whatever the routing; any tp that divides
moe_intermediate_size works.

Gating follows DeepSeek-VL2's MoEGate: float32 logits; softmax or sigmoid scores; `greedy`
top-k, `group_limited_greedy` (top-k within the `topk_group` groups of highest best score) or
`noaux_tc` (groups ranked by the sum of their top-2 bias-corrected scores, experts chosen by
bias-corrected score, weighted by the uncorrected one); weights renormalized when
`norm_topk_prob` (and k > 1), then scaled by `routed_scaling_factor`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fovea.common.families.deepseek_vl2 import DeepseekV2TextConfig
from fovea.worker.distributed import all_reduce, tp_rank, tp_size
from fovea.worker.layers.linear import (
    Loaded,
    MergedColumnParallelLinear,
    RowParallelLinear,
    copy_checked,
    divide,
    narrow_loaded,
    set_weight_loader,
)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), tensor-parallel like Llama's MLP (gate_up_proj is the
    fused gate_proj/up_proj)."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate])
        self.down_proj = RowParallelLinear(intermediate, hidden)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of the output, not yet all-reduced (no bias: there is none)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj.matmul(F.silu(gate) * up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_reduce(self.partial(x))


class MoEGate(nn.Module):
    """Router: hidden states [T, hidden] -> (expert ids [T, k] int64, weights [T, k] float32)."""

    def __init__(self, cfg: DeepseekV2TextConfig) -> None:
        super().__init__()
        assert cfg.n_routed_experts is not None
        self.num_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        # Replicated on every rank: [experts, hidden].
        self.weight = nn.Parameter(
            torch.empty(self.num_experts, cfg.hidden_size), requires_grad=False
        )
        self.e_score_correction_bias: nn.Parameter | None = None
        if self.method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(
                torch.empty(self.num_experts), requires_grad=False
            )

    def _group_mask(self, scores: torch.Tensor, group_scores: torch.Tensor) -> torch.Tensor:
        """scores [T, E] with experts outside each token's topk_group best groups set to 0."""
        t = scores.shape[0]
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)  # [T, n_group]
        mask = group_mask.unsqueeze(-1).expand(t, self.n_group, self.num_experts // self.n_group)
        return scores.masked_fill(~mask.reshape(t, -1).bool(), 0.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float())  # [T, E] float32, as the reference
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        t, k = scores.shape[0], self.top_k
        if self.method == "greedy":
            weights, ids = torch.topk(scores, k=k, dim=-1, sorted=False)
        elif self.method == "group_limited_greedy":
            group_scores = scores.view(t, self.n_group, -1).max(dim=-1).values
            weights, ids = torch.topk(self._group_mask(scores, group_scores), k=k, sorted=False)
        else:  # noaux_tc: choose by bias-corrected scores, weigh by the plain ones
            assert self.e_score_correction_bias is not None
            choice = scores + self.e_score_correction_bias.float().unsqueeze(0)
            group_scores = choice.view(t, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
            ids = torch.topk(self._group_mask(choice, group_scores), k=k, sorted=False)[1]
            weights = scores.gather(1, ids)
        if k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scaling


class StackedExpertWeight(nn.Module):
    """One projection of every expert, stacked: weight [experts, out_per_rank, in_per_rank].
    Checkpoint tensors come one per expert and projection; shard id (expert, part) where part
    is the index of the projection inside the stacked output (gate 0, up 1) or 0.
    `split_dim` is the dimension (0 out, 1 in) split across tp ranks, `part_size` its full
    size per part."""

    def __init__(self, experts: int, parts: int, part_size: int, other: int, split_dim: int):
        super().__init__()
        self.part_per_rank = divide(part_size, tp_size(), "expert intermediate size")
        self.split_dim = split_dim
        shape = (
            [experts, parts * self.part_per_rank, other]
            if split_dim == 0
            else [experts, other, self.part_per_rank]
        )
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: Any = None) -> None:
        expert, part = shard_id
        n = self.part_per_rank
        piece = narrow_loaded(loaded, self.split_dim, tp_rank() * n, n)
        dst = param.data[expert].narrow(self.split_dim, part * n, n)
        copy_checked(dst, piece, f"expert {expert} part {part}")


class RoutedExperts(nn.Module):
    """Every routed expert's gated MLP; forward runs each expert once over its tokens."""

    def __init__(self, experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.num_experts = experts
        self.gate_up = StackedExpertWeight(experts, 2, intermediate, hidden, split_dim=0)
        self.down = StackedExpertWeight(experts, 1, intermediate, hidden, split_dim=1)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [T, hidden], ids/weights [T, k] -> this rank's partial sum [T, hidden] float32 of
        sum_j weights[t, j] * expert_{ids[t, j]}(x[t])."""
        k = ids.shape[1]
        flat = ids.reshape(-1)  # [T * k]: token t's j-th choice at t * k + j
        order = torch.argsort(flat, stable=True)  # choices grouped by expert
        token = order // k  # [T * k] the token of each grouped choice
        # One host sync for the group sizes (the loop bounds).
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        grouped = x.index_select(0, token)  # [T * k, hidden]
        out = torch.empty_like(grouped)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = grouped[start : start + n]
                gate, up = F.linear(rows, self.gate_up.weight[e]).chunk(2, dim=-1)
                out[start : start + n] = F.linear(F.silu(gate) * up, self.down.weight[e])
                start += n
        # Weighted sum in float32 (the reference multiplies and sums in the gate's float32).
        scaled = out.float() * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros(x.shape[0], x.shape[1], device=x.device).index_add_(0, token, scaled)


class DeepseekMoE(nn.Module):
    """Gate, routed experts and shared experts; one all-reduce for all of them."""

    def __init__(self, cfg: DeepseekV2TextConfig) -> None:
        super().__init__()
        assert cfg.n_routed_experts is not None
        self.gate = MoEGate(cfg)
        self.experts = RoutedExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        )
        self.shared_experts: GatedMLP | None = None
        if cfg.n_shared_experts:
            self.shared_experts = GatedMLP(
                cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        y = self.experts(x, ids, weights).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts.partial(x)
        return all_reduce(y)
