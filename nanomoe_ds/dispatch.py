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


class _GatherRows(torch.autograd.Function):
    """src[idx] where idx takes each row of src at most once.

    A general gather's backward is a scatter-add (index_add_), which is slow and
    serial on CPU; with no repeated rows it is a plain scatter (index_copy_).
    """

    @staticmethod
    def forward(ctx, src, idx):
        ctx.save_for_backward(idx)
        ctx.num_rows = src.shape[0]
        return src.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.num_rows, *grad.shape[1:]).index_copy_(0, idx, grad), None


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] along dim 0 for an index without repeats (a permutation or part of one)."""
    return _GatherRows.apply(src, idx)


class _GatherTokens(torch.autograd.Function):
    """x[token_idx]: the token row of each kept assignment, in expert order.

    A token appears once per kept slot, so autograd's backward of this gather is a
    scatter-add (index_put_ with accumulate), which runs serially on a CPU. Through
    the inverse permutation each token sums its own k rows instead, a chunk of
    tokens at a time as in the combine: gathers and a sum, deterministic, with the
    sum in at least fp32. Dropped slots read an appended zero row.
    """

    @staticmethod
    def forward(ctx, x, perm):
        ctx.inv, ctx.dropped = perm.inv, perm.dropped
        ctx.num_tokens, ctx.k = x.shape[0], perm.num_assignments // max(x.shape[0], 1)
        return x.index_select(0, perm.token_idx)

    @staticmethod
    def backward(ctx, grad):
        inv, k, T = ctx.inv, ctx.k, ctx.num_tokens
        if ctx.dropped:
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[-1])])
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_x = grad.new_empty(T, grad.shape[-1])
        for t in _chunks(T, k * grad.shape[-1], grad.device):
            if acc == grad.dtype:
                _sum_slots(_slot_rows(grad, inv, t, k), None, grad_x[t])
            else:  # sum in the wider dtype, then one rounding
                grad_x[t] = _sum_slots(_slot_rows(grad, inv, t, k), None, grad.new_empty(t.stop - t.start,
                                                                                          grad.shape[-1], dtype=acc))
        return grad_x, None


def gather_tokens(x: torch.Tensor, perm: Permutation) -> torch.Tensor:
    """x[perm.token_idx] for x [T, d]: the rows the experts receive, grouped by expert."""
    return _GatherTokens.apply(x, perm)


def unpermute(y: torch.Tensor, perm: Permutation, topk_weight: torch.Tensor) -> torch.Tensor:
    """Weight each expert output by its gate and sum a token's k slots; dropped slots add zero.

    Each token sums its own k slots (rather than an index_add over tokens), which
    keeps the result deterministic; products and sum are in at least fp32.
    """
    T, k = topk_weight.shape
    acc = torch.promote_types(y.dtype, torch.float32)
    if perm.dropped:  # dropped slots all read one appended zero row
        rows = torch.cat([y, y.new_zeros(1, y.shape[-1])]).index_select(0, perm.inv)
        out = (rows.view(T, k, y.shape[-1]).to(acc) * topk_weight.unsqueeze(-1)).sum(1)
    else:
        out = _Combine.apply(y, topk_weight, perm, acc)
    return out.to(y.dtype)


class _Combine(torch.autograd.Function):
    """Dropless unpermute: out[t] = sum_j w[t, j] * y[inv[t*k + j]], a chunk of tokens at a time.

    The arithmetic of (y[inv].view(T, k, d).to(acc) * w[..., None]).sum(1), summed in
    slot order, and its autograd backward, without materialising [T*k, d] copies
    (gathered rows, their fp32 cast, the weighted products): at 8k tokens x k=8 x
    d=384 each is 50-100 MB, which costs more to allocate and stream through memory
    than the math. The gradient of y is gathered row by row in expert order
    (grad[token of row] * its gate weight) rather than scattered through inv: a
    gather is several times faster than index_copy_ on a CPU.
    """

    @staticmethod
    def forward(ctx, y, w, perm, acc):
        T, k = w.shape
        out = y.new_empty(T, y.shape[-1], dtype=torch.promote_types(acc, w.dtype))
        for t in _chunks(T, k * y.shape[-1], y.device):
            _sum_slots(_slot_rows(y, perm.inv, t, k), w[t], out[t])
        ctx.save_for_backward(y, w)
        ctx.perm = perm
        return out

    @staticmethod
    def backward(ctx, grad):
        y, w = ctx.saved_tensors
        perm = ctx.perm
        T, k = w.shape
        grad_w = torch.empty_like(w)
        for t in _chunks(T, k * y.shape[-1], y.device):  # (type promotion reads bf16 rows as fp32: no copy)
            grad_w[t] = (grad[t].unsqueeze(1) * _slot_rows(y, perm.inv, t, k)).sum(-1)
        grad_y = torch.empty_like(y)  # row r belongs to assignment order[r]: token order[r] // k
        w_of_row = w.reshape(-1).index_select(0, perm.order).unsqueeze(-1)
        for r in _chunks(y.shape[0], y.shape[-1], y.device):
            # The product in grad's dtype, then one rounding to y's (autograd's casts, in order).
            rows = grad_y[r] if grad.dtype == y.dtype else None
            rows = torch.index_select(grad, 0, perm.token_idx[r], out=rows).mul_(w_of_row[r])
            if rows.dtype != y.dtype:
                grad_y[r] = rows
        return grad_y, grad_w, None, None


def _slot_rows(y, inv, t: slice, k: int):
    """[tokens in t, k, d]: the expert output row of each of their slots."""
    return y.index_select(0, inv[t.start * k:t.stop * k]).view(t.stop - t.start, k, -1)


def _sum_slots(rows: torch.Tensor, weight: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weight[t, j] * rows[t, j] (the plain sum when weight is None), in out's dtype.

    Slot by slot, in slot order: one multiply-add per slot over contiguous rows. On a
    CPU a reduction over the middle dimension of [tokens, k, d] is several times
    slower than that, and casting rows to the wider dtype first would be a copy.
    """
    for j in range(rows.shape[1]):
        row, w = rows[:, j], None if weight is None else weight[:, j:j + 1]
        if j == 0:
            out.copy_(row) if w is None else torch.mul(row, w, out=out)
        else:
            out.add_(row) if w is None else out.addcmul_(row, w)
    return out


def _chunks(n: int, row_size: int, device: torch.device):
    """Slices of range(n) of a bounded number of elements each.

    On a CPU a few MB, so each chunk's temporaries are reused and stay in cache. On a
    GPU each chunk costs several kernel launches, so chunks are large (hundreds of
    MB): one or two for a typical batch, and still a cap on the temporaries.
    """
    elems = 1 << 27 if device.type == "cuda" else 1 << 21
    step = max(1, elems // max(row_size, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
