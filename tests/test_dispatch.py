"""Tests for token permutation (nanomoe_ds/dispatch.py): grouping by expert, capacity and the way back."""
from __future__ import annotations

import math

import pytest
import torch

from nanomoe_ds.dispatch import Permutation, capacity, gather_tokens, permute, unpermute
from nanomoe_ds.kernels import _chunks


def random_routing(T: int, k: int, E: int, seed: int = 0):
    """Distinct experts per token (like a top-k) and positive weights summing to 1 per token."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=g, dtype=torch.float64) + 0.1
    return idx, w / w.sum(-1, keepdim=True)


# ----------------------------------------------------------------------------- capacity()

def test_capacity_formula():
    assert capacity(24, 2, 4, 0.0) is None  # 0 means dropless
    assert capacity(24, 2, 4, -1.0) is None
    assert capacity(24, 2, 4, 1.0) == 12
    assert capacity(24, 2, 4, 0.5) == 6
    assert capacity(24, 2, 8, 1.25) == math.ceil(1.25 * 24 * 2 / 8) == 8
    assert capacity(10, 3, 7, 1.0) == 5  # ceil(30 / 7)
    assert capacity(1, 1, 64, 0.01) == 1  # never below one slot for a non-empty batch


# ----------------------------------------------------------------------------- dropless permute

@pytest.mark.parametrize("T,k,E", [(24, 1, 4), (24, 2, 4), (24, 3, 8), (7, 4, 4)])
def test_dropless_counts_order_and_stability(T, k, E):
    idx, w = random_routing(T, k, E, seed=T * k + E)
    perm = permute(idx, w, E)
    flat = idx.reshape(-1)
    assert isinstance(perm, Permutation)
    assert perm.counts.dtype == torch.int64
    assert torch.equal(perm.counts, torch.bincount(flat, minlength=E))
    assert perm.num_assignments == T * k and perm.dropped == 0
    # every assignment exactly once
    assert sorted(perm.order.tolist()) == list(range(T * k))
    # grouped by expert, in expert order
    experts = flat[perm.order]
    assert (experts.diff() >= 0).all()
    # stable: within an expert, assignments stay in (token, slot) order
    for e in range(E):
        ids = perm.order[experts == e]
        assert (ids.diff() > 0).all()
    assert torch.equal(perm.token_idx, perm.order // k)
    # explicit expected order from a Python sort
    want = sorted(range(T * k), key=lambda a: (flat[a].item(), a))
    assert perm.order.tolist() == want


def test_hand_example():
    idx = torch.tensor([[2, 0], [0, 1], [2, 1]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    perm = permute(idx, w, 4)
    # flat assignments: 0->e2, 1->e0, 2->e0, 3->e1, 4->e2, 5->e1
    assert perm.order.tolist() == [1, 2, 3, 5, 0, 4]
    assert perm.token_idx.tolist() == [0, 1, 1, 2, 0, 2]
    assert perm.counts.tolist() == [2, 2, 2, 0]


def test_empty_experts():
    E = 6
    idx = torch.tensor([[3, 0], [0, 3], [3, 0], [0, 3]])
    w = torch.full((4, 2), 0.5)
    for cap in (None, 1, 2, 10):
        perm = permute(idx, w, E, cap)
        c = perm.counts.tolist()
        assert c[1] == c[2] == c[4] == c[5] == 0
        assert c[0] == c[3] == (4 if cap is None else min(cap, 4))
        assert perm.counts.shape == (E,)
        assert perm.order.numel() == sum(c)
    # an expert index beyond the used ones but within E must still show up (minlength)
    perm = permute(torch.tensor([[0]]), torch.ones(1, 1), 5)
    assert perm.counts.tolist() == [1, 0, 0, 0, 0]


def test_permute_zero_tokens():
    for cap in (None, 0, 3):
        perm = permute(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4, cap)
        assert perm.counts.tolist() == [0, 0, 0, 0]
        assert perm.order.numel() == 0 and perm.token_idx.numel() == 0
        assert perm.num_assignments == 0 and perm.dropped == 0


def test_unpermute_zero_tokens():
    perm = permute(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4)
    out = unpermute(torch.zeros(0, 8), perm, torch.zeros(0, 2))
    assert out.shape == (0, 8)


# ----------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("cap", [None, 4])
@pytest.mark.parametrize("T,k,E", [(24, 1, 4), (24, 2, 4), (24, 3, 6)])
def test_roundtrip_with_one_hot_weights(T, k, E, cap):
    idx, w = random_routing(T, k, E, seed=3)
    perm = permute(idx, w, E, cap)
    x = torch.randn(T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    xs = x[perm.token_idx]
    keep = torch.zeros(T * k, dtype=torch.bool)
    keep[perm.order] = True
    keep = keep.view(T, k)
    for slot in range(k):
        onehot = torch.zeros(T, k, dtype=torch.float64)
        onehot[:, slot] = 1.0
        out = unpermute(xs, perm, onehot)
        # tokens whose `slot` survived come back exactly, the others as zeros
        want = torch.where(keep[:, slot:slot + 1], x, torch.zeros_like(x))
        torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    if cap is None:
        assert keep.all()
        torch.testing.assert_close(unpermute(xs, perm, torch.ones(T, k, dtype=torch.float64)), k * x,
                                   atol=1e-5, rtol=1e-6)
    else:
        assert not keep.all()


def test_unpermute_weights_and_sums_slots():
    T, k, E, d = 24, 3, 6, 8
    idx, w = random_routing(T, k, E, seed=5)
    perm = permute(idx, w, E)
    g = torch.Generator().manual_seed(6)
    y = torch.randn(T * k, d, generator=g)  # an "expert output" per kept row, in permuted order
    out = unpermute(y, perm, w.float())
    want = torch.zeros(T, d)
    for row, a in enumerate(perm.order.tolist()):
        t, s = divmod(a, k)
        want[t] += w[t, s].float() * y[row]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)


def test_unpermute_gradients():
    T, k, E, d = 12, 2, 4, 8
    idx, w = random_routing(T, k, E, seed=7)
    perm = permute(idx, w, E, cap=4)
    assert perm.dropped > 0
    g = torch.Generator().manual_seed(8)
    y = torch.randn(perm.order.numel(), d, generator=g, requires_grad=True)
    wt = w.float().clone().requires_grad_()
    up = torch.randn(T, d, generator=g)
    (unpermute(y, perm, wt) * up).sum().backward()
    want_y = torch.zeros_like(y)
    want_w = torch.zeros(T, k)
    for row, a in enumerate(perm.order.tolist()):
        t, s = divmod(a, k)
        want_y[row] = wt[t, s].detach() * up[t]
        want_w[t, s] = (y[row].detach() * up[t]).sum()
    torch.testing.assert_close(y.grad, want_y)
    torch.testing.assert_close(wt.grad, want_w)  # dropped slots: zero gradient


def test_unpermute_dropless_gradients_across_chunks():
    """The dropless combine (several chunks of tokens and of rows here) against autograd on the plain formula."""
    T, k, E, d = 4096, 4, 8, 256  # 2 token chunks and 2 row chunks of the CPU's chunk size
    idx, w = random_routing(T, k, E, seed=21)
    perm = permute(idx, w, E)
    assert len(_chunks(T, k * d, torch.device("cpu"))) > 1 and len(_chunks(T * k, d, torch.device("cpu"))) > 1
    g = torch.Generator().manual_seed(22)
    y = torch.randn(T * k, d, generator=g, requires_grad=True)
    wt = w.float().clone().requires_grad_()
    up = torch.randn(T, d, generator=g)
    (unpermute(y, perm, wt) * up).sum().backward()
    y_ref, w_ref = y.detach().clone().requires_grad_(), wt.detach().clone().requires_grad_()
    ((y_ref[perm.inv].view(T, k, d) * w_ref.unsqueeze(-1)).sum(1) * up).sum().backward()
    torch.testing.assert_close(y.grad, y_ref.grad, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(wt.grad, w_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cap", [None, 5])
def test_gather_tokens_gradient_sums_each_tokens_rows(cap):
    """gather_tokens is x[token_idx]; its backward (sums through inv) equals autograd's scatter-add."""
    T, k, E, d = 24, 3, 6, 8
    idx, w = random_routing(T, k, E, seed=23)
    perm = permute(idx, w, E, cap=cap)
    assert (perm.dropped > 0) == (cap is not None)
    g = torch.Generator().manual_seed(24)
    x = torch.randn(T, d, generator=g, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    up = torch.randn(perm.order.numel(), d, generator=g)
    xs = gather_tokens(x, perm)
    assert torch.equal(xs, x_ref[perm.token_idx])
    (xs * up).sum().backward()
    (x_ref[perm.token_idx] * up).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-6, rtol=1e-6)


def test_unpermute_bf16_accumulates_in_fp32_and_returns_bf16():
    T, k, E, d = 24, 2, 4, 16
    idx, w = random_routing(T, k, E, seed=9)
    perm = permute(idx, w, E)
    y = torch.randn(T * k, d, generator=torch.Generator().manual_seed(10)).bfloat16()
    out = unpermute(y, perm, w.float())
    assert out.dtype == torch.bfloat16
    want = unpermute(y.float(), perm, w.float()).bfloat16()
    assert torch.equal(out, want)  # products and slot sum in fp32, a single rounding at the end


def test_unpermute_keeps_float64_precision():
    T, k, E, d = 24, 2, 4, 16
    idx, w = random_routing(T, k, E, seed=11)
    perm = permute(idx, w, E)
    y = torch.randn(T * k, d, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    out = unpermute(y, perm, w)  # everything float64
    want = torch.zeros(T, d, dtype=torch.float64)
    for row, a in enumerate(perm.order.tolist()):
        t, s = divmod(a, k)
        want[t] += w[t, s] * y[row]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- capacity priority

def kept_set(perm: Permutation, k: int):
    return {divmod(a, k) for a in perm.order.tolist()}


def test_priority_score_keeps_largest_weights():
    # Expert 0 is wanted by all 4 tokens; cap 2.
    idx = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])
    w = torch.tensor([[0.55, 0.45], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    perm = permute(idx, w, 3, cap=2, priority="score")
    # expert 0 candidates: (t0,s0) .55, (t1,s1) .40, (t2,s0) .90, (t3,s1) .70 -> keep t2, t3
    # expert 1: (t0,s1) .45, (t1,s0) .60 -> both; expert 2: (t2,s1) .1, (t3,s0) .3 -> both
    assert kept_set(perm, 2) == {(2, 0), (3, 1), (0, 1), (1, 0), (2, 1), (3, 0)}
    assert perm.counts.tolist() == [2, 2, 2]
    assert perm.dropped == 2
    # within an expert, rows are in priority order (largest weight first) and counts match the groups
    assert perm.order.tolist()[:2] == [2 * 2 + 0, 3 * 2 + 1]


def test_priority_position_is_slot_major_then_token():
    idx = torch.tensor([[0, 1], [1, 0], [0, 2], [2, 0]])
    w = torch.tensor([[0.55, 0.45], [0.6, 0.4], [0.9, 0.1], [0.3, 0.7]])
    perm = permute(idx, w, 3, cap=2, priority="position")
    # expert 0: first choices t0, t2 beat the second choices of t1, t3, whatever the weights
    assert {(t, s) for t, s in kept_set(perm, 2) if idx[t, s] == 0} == {(0, 0), (2, 0)}
    assert perm.dropped == 2
    # a slot-1 assignment can beat a later token's slot-1 but never an earlier slot-0
    idx = torch.tensor([[1, 0], [0, 1], [1, 0]])
    w = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])
    perm = permute(idx, w, 2, cap=2, priority="position")
    # expert 0: (t1,s0), then (t0,s1), then (t2,s1) -> the last is dropped
    assert {(t, s) for t, s in kept_set(perm, 2) if idx[t, s] == 0} == {(1, 0), (0, 1)}
    assert perm.dropped == 2  # expert 1 likewise drops (t1,s1)


def test_priority_score_ties_fall_back_to_token_order():
    idx = torch.zeros(5, 1, dtype=torch.long)
    w = torch.ones(5, 1)
    perm = permute(idx, w, 2, cap=3, priority="score")
    assert perm.order.tolist() == [0, 1, 2]
    assert perm.counts.tolist() == [3, 0]


@pytest.mark.parametrize("priority", ["score", "position"])
@pytest.mark.parametrize("cap", [1, 3, 5, 8])
def test_capacity_against_python_reference(priority, cap):
    T, k, E = 24, 2, 4
    idx, w = random_routing(T, k, E, seed=cap)
    idx[:10, 0] = 0  # over-subscribe expert 0 (keeping choices distinct per token)
    idx[:10, 1] = torch.where(idx[:10, 1] == 0, 1, idx[:10, 1])
    perm = permute(idx, w, E, cap, priority)
    want = set()
    for e in range(E):
        cand = [(t, s) for t in range(T) for s in range(k) if idx[t, s] == e]
        if priority == "score":
            cand.sort(key=lambda ts: -w[ts].item())
        else:
            cand.sort(key=lambda ts: (ts[1], ts[0]))
        want |= set(cand[:cap])
    assert kept_set(perm, k) == want
    counts = torch.bincount(idx.reshape(-1), minlength=E)
    assert perm.counts.tolist() == counts.clamp(max=cap).tolist()
    assert perm.dropped == T * k - len(want) == int((counts - cap).clamp(min=0).sum())
    # rows are grouped by expert, with counts matching the groups
    experts = idx.reshape(-1)[perm.order]
    assert (experts.diff() >= 0).all()
    assert torch.equal(torch.bincount(experts, minlength=E), perm.counts)
    assert torch.equal(perm.token_idx, perm.order // k)


@pytest.mark.parametrize("priority", ["score", "position"])
def test_large_capacity_equals_dropless(priority):
    T, k, E = 24, 2, 4
    idx, w = random_routing(T, k, E, seed=13)
    free = permute(idx, w, E)
    capped = permute(idx, w, E, cap=T, priority=priority)
    assert capped.dropped == 0
    assert torch.equal(capped.counts, free.counts)
    assert sorted(capped.order.tolist()) == list(range(T * k))
    x = torch.randn(T, 8, generator=torch.Generator().manual_seed(14))
    y_free, y_cap = x[free.token_idx] * 2, x[capped.token_idx] * 2
    torch.testing.assert_close(unpermute(y_cap, capped, w.float()), unpermute(y_free, free, w.float()))
