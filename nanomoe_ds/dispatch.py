"""Token permutation for MoE: group (token, slot) assignments by expert and back.

This step is separate from the expert math because expert parallelism inserts
its all-to-all between `permute` and the expert compute (see expert_parallel.py).
Nothing here knows what an expert computes, or about process groups. The gathers'
fast autograd functions (backwards without a scatter-add) are in kernels.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import kernels


@dataclass
class Permutation:
    order: torch.Tensor  # [M] flat assignment ids (token * k + slot), grouped by expert
    token_idx: torch.Tensor  # [M] token of each kept assignment, in `order`
    counts: torch.Tensor  # [E] kept assignments per expert (int64)
    routed: torch.Tensor  # [E] assignments the router made per expert, before any capacity drop
    num_assignments: int  # tokens * k, including dropped ones
    dropped: int  # assignments over capacity, zeroed in the output
    # [num_assignments] inverse of `order`: the row (in `order`) of each assignment,
    # len(order) for a dropped one.
    inv: torch.Tensor


def capacity(num_tokens: int, k: int, num_experts: int, factor: float) -> int | None:
    """Per-expert slot limit; None means dropless."""
    if factor <= 0:
        return None
    return math.ceil(factor * num_tokens * k / num_experts)


def permute(topk_idx: torch.Tensor, topk_weight: torch.Tensor, num_experts: int,
            cap: int | None = None, priority: str = "score") -> Permutation:
    """Sort the [T, k] expert choices by expert, dropping what exceeds `cap`.

    Capacity priority, when an expert is over-subscribed:
      - "score": assignments with the larger gate weight win (a token's strong
        choices survive before another token's weak ones);
      - "position": first choices of all tokens before any second choice, then
        earlier tokens first (GShard / Switch order).
    """
    T, k = topk_idx.shape
    flat = topk_idx.reshape(-1)
    if cap is None:
        order = torch.argsort(flat, stable=True)
        counts = routed = expert_counts(flat, num_experts)
        dropped = 0
    else:
        if priority == "score":
            pre = torch.argsort(topk_weight.reshape(-1), descending=True, stable=True)
        else:  # slot-major: all slot-0 assignments, then slot-1, ...
            pre = torch.arange(T * k, device=flat.device).view(T, k).t().reshape(-1)
        order = pre[torch.argsort(flat[pre], stable=True)]
        routed = expert_counts(flat, num_experts)
        starts = torch.cumsum(routed, 0) - routed
        sorted_exp = flat[order]
        rank_in_expert = torch.arange(order.numel(), device=flat.device) - starts[sorted_exp]
        keep = rank_in_expert < cap
        order = order[keep]
        counts = routed.clamp(max=cap)
        dropped = T * k - order.numel()
    return Permutation(order=order, token_idx=order // k, counts=counts, routed=routed,
                       num_assignments=T * k, dropped=int(dropped), inv=_inverse(order, T * k))


def expert_counts(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Assignments per expert [E] (int64): a bincount whose size does not depend on the data,
    so torch.compile keeps it inside the graph."""
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def _inverse(order: torch.Tensor, num_assignments: int) -> torch.Tensor:
    inv = torch.full((num_assignments,), order.numel(), dtype=torch.long, device=order.device)
    return inv.index_copy_(0, order, torch.arange(order.numel(), device=order.device))


def gather_tokens(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x[perm.token_idx] for x [T, d]: the rows the experts receive, grouped by expert.

    A token appears once per kept slot; kernels.GatherTokens sums each token's rows in
    backward (deterministic, in at least fp32) instead of autograd's scatter-add.
    """
    return kernels.GatherTokens.apply(x, perm)


def unpermute(y: torch.Tensor, perm: Permutation, topk_weight: torch.Tensor) -> torch.Tensor:
    """Weight each expert output by its gate and sum a token's k slots; dropped slots add zero.

    Each token sums its own k slots (rather than an index_add over tokens), which
    keeps the result deterministic; products and sum are in at least fp32. Below is
    the arithmetic; dropless, kernels.Combine computes it without [T*k, d] copies.
    """
    T, k = topk_weight.shape
    acc = torch.promote_types(y.dtype, torch.float32)
    if perm.dropped:  # dropped slots all read one appended zero row
        rows = torch.cat([y, y.new_zeros(1, y.shape[-1])]).index_select(0, perm.inv)
        out = (rows.view(T, k, y.shape[-1]).to(acc) * topk_weight.unsqueeze(-1)).sum(1)
    else:
        out = kernels.Combine.apply(y, topk_weight, perm, acc)
    return out.to(y.dtype)
