"""Token permutation for MoE: group (token, slot) assignments by expert and back.

This step is separate from the expert math because expert parallelism inserts
its all-to-all between `permute` and the expert compute (see expert_parallel.py).
Nothing here knows what an expert computes, or about process groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Permutation:
    order: torch.Tensor  # [M] flat assignment ids (token * k + slot), grouped by expert
    token_idx: torch.Tensor  # [M] token of each kept assignment, in `order`
    counts: torch.Tensor  # [E] kept assignments per expert (int64)
    num_assignments: int  # tokens * k, including dropped ones
    dropped: int  # assignments over capacity, zeroed in the output


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
        counts = torch.bincount(flat, minlength=num_experts)
        dropped = 0
    else:
        if priority == "score":
            pre = torch.argsort(topk_weight.reshape(-1), descending=True, stable=True)
        else:  # slot-major: all slot-0 assignments, then slot-1, ...
            pre = torch.arange(T * k, device=flat.device).view(T, k).t().reshape(-1)
        order = pre[torch.argsort(flat[pre], stable=True)]
        counts_all = torch.bincount(flat, minlength=num_experts)
        starts = torch.cumsum(counts_all, 0) - counts_all
        sorted_exp = flat[order]
        rank_in_expert = torch.arange(order.numel(), device=flat.device) - starts[sorted_exp]
        keep = rank_in_expert < cap
        order = order[keep]
        counts = counts_all.clamp(max=cap)
        dropped = T * k - order.numel()
    return Permutation(order=order, token_idx=order // k, counts=counts,
                       num_assignments=T * k, dropped=int(dropped))


def unpermute(y: torch.Tensor, perm: Permutation, topk_weight: torch.Tensor) -> torch.Tensor:
    """Weight each expert output by its gate and sum a token's k slots; dropped slots add zero.

    Writing slots into a [T*k, d] buffer and summing over k (rather than an
    index_add over tokens) keeps the result deterministic.
    """
    T, k = topk_weight.shape
    buf = y.new_zeros(perm.num_assignments, y.shape[-1])
    buf[perm.order] = y
    acc = torch.promote_types(buf.dtype, torch.float32)  # sum the k slots in at least fp32
    out = (buf.view(T, k, y.shape[-1]).to(acc) * topk_weight.unsqueeze(-1)).sum(1)
    return out.to(y.dtype)
