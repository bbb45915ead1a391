"""Numerical tests for the MoE layer (nanomoe_ds/moe.py).

The core check compares the layer, its output and the gradients of every
parameter, against a naive reference written here: a per-token loop that picks
each token's experts in plain Python, applies the documented capacity priority,
and runs each chosen expert as a hand-written MLP on the stacked weights.
Shapes are tiny (24 tokens, d=16) so the whole file runs in seconds on a CPU.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from nanomoe_ds.config import ConfigError, GPTConfig, build, validate_model
from nanomoe_ds.model import GPT, Block
from nanomoe_ds.mlp import MLP
from nanomoe_ds.moe import GroupedExperts, MoE, Router, init_moe_

D, H = 16, 32  # model width, expert hidden width (multiples of 4/8 bytes: grouped_mm needs aligned strides)
B, S = 2, 12  # 24 tokens per forward
IMPLS = ("bmm", "loop", "grouped_mm")
GATES = ("softmax_topk", "topk_softmax", "sigmoid")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls are dominated by thread-pool wake-ups (tens of ms each on a busy 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_cfg(**kw) -> GPTConfig:
    base = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=D, dropout=0.0, bias=True,
                use_moe=True, num_experts=4, num_experts_per_tok=2, expert_hidden=H,
                gate="softmax_topk", moe_impl="bmm", aux_loss_coef=0.01, z_loss_coef=0.0)
    base.update(kw)
    cfg = GPTConfig(**base)
    validate_model(cfg)
    return cfg


def run(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """A layer's forward, its routing recorded on the layer (in a GPT, the forward's report carries it)."""
    out, routing = moe(x)
    moe.record(routing)
    return out


def make_moe(cfg: GPTConfig, dtype=torch.float64, seed: int = 0, router_std: float = 0.5) -> MoE:
    """An MoE with every parameter (biases included) random, so each gets a non-trivial gradient."""
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            std = router_std if name.startswith("router") else 0.3
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return moe.to(dtype)


def dtype_for(impl: str):
    # torch._grouped_mm has no float64 kernel; the other paths are checked in double.
    return torch.float32 if impl == "grouped_mm" else torch.float64


def tol_for(dtype):
    # The router runs in float32 by design, so even a float64 layer is only ~1e-7 accurate.
    return dict(atol=2e-5, rtol=2e-5) if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)


def gelu_ref(h):
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def silu_ref(h):
    return h / (1.0 + torch.exp(-h))


def softmax_ref(v):
    e = torch.exp(v - v.max())
    return e / e.sum()


def ref_route(x_t, W, gate: str, k: int, score_bias=None):
    """One token: (chosen experts, best first; their gate weights [k]; probs [E]; logits [E])."""
    logits = W @ x_t
    if gate == "softmax_topk":
        scores = softmax_ref(logits)
        probs = scores
        select = scores
    elif gate == "topk_softmax":
        scores = None
        probs = softmax_ref(logits)
        select = logits
    elif gate == "sigmoid":
        scores = 1.0 / (1.0 + torch.exp(-logits))
        probs = scores / scores.sum()
        select = scores
    else:
        raise AssertionError(gate)
    vals = select.detach().double().tolist()
    if score_bias is not None:
        vals = [v + float(b) for v, b in zip(vals, score_bias.tolist())]
    chosen = sorted(range(len(vals)), key=lambda e: -vals[e])[:k]
    if gate == "topk_softmax":
        w = softmax_ref(logits[chosen])
    else:
        w = scores[chosen] / scores[chosen].sum()
    return chosen, w, probs, logits


def ref_keep(choices, weights, num_experts: int, cap, priority: str):
    """keep[t][j]: whether token t's slot j survives capacity, by the documented priority."""
    T, k = len(choices), len(choices[0])
    keep = [[True] * k for _ in range(T)]
    if cap is None:
        return keep
    for e in range(num_experts):
        assigned = [(t, j) for t in range(T) for j in range(k) if choices[t][j] == e]  # (token, slot) order
        if priority == "score":  # larger gate weight first; ties keep (token, slot) order (sort is stable)
            assigned.sort(key=lambda tj: -weights[tj[0]][tj[1]])
        else:  # "position": slot-major, then token order
            assigned.sort(key=lambda tj: (tj[1], tj[0]))
        for t, j in assigned[cap:]:
            keep[t][j] = False
    return keep


def ref_expert(x_t, P, e: int, act: str):
    h = x_t @ P["experts.w_in"][e]
    if "experts.b_in" in P:
        h = h + P["experts.b_in"][e]
    if act == "swiglu":
        h = silu_ref(x_t @ P["experts.w_gate"][e]) * h
    else:
        h = gelu_ref(h)
    y = h @ P["experts.w_out"][e]
    if "experts.b_out" in P:
        y = y + P["experts.b_out"][e]
    return y


def ref_shared(x_t, P):
    h = P["shared_mlp.c_fc.weight"] @ x_t
    if "shared_mlp.c_fc.bias" in P:
        h = h + P["shared_mlp.c_fc.bias"]
    y = P["shared_mlp.c_proj.weight"] @ gelu_ref(h)
    if "shared_mlp.c_proj.bias" in P:
        y = y + P["shared_mlp.c_proj.bias"]
    return y


def ref_moe(x, P, cfg: GPTConfig, cf: float, score_bias=None):
    """Naive MoE forward on x [B, S, d]; returns (out [B, S, d], number of dropped (token, slot) pairs)."""
    xt = x.reshape(-1, x.shape[-1])
    T, E, k = xt.shape[0], cfg.num_experts, cfg.num_experts_per_tok
    routes = [ref_route(xt[t], P["router.weight"], cfg.gate, k, score_bias) for t in range(T)]
    choices = [r[0] for r in routes]
    weights = [r[1].tolist() for r in routes]
    cap = math.ceil(cf * T * k / E) if cf > 0 else None
    keep = ref_keep(choices, weights, E, cap, cfg.capacity_priority)
    rows = []
    for t in range(T):
        chosen, w = routes[t][0], routes[t][1]
        y = torch.zeros_like(xt[t])
        for j, e in enumerate(chosen):
            if keep[t][j]:
                y = y + w[j] * ref_expert(xt[t], P, e, cfg.expert_act)
        if cfg.num_shared_experts:
            y = y + ref_shared(xt[t], P)
        rows.append(y)
    dropped = sum(not kj for kt in keep for kj in kt)
    return torch.stack(rows).view_as(x), dropped


def leaf_copies(module):
    return {n: p.detach().clone().requires_grad_() for n, p in module.named_parameters()}


# ----------------------------------------------------------------------------- 1. against the reference

# Pairwise cover of (shared experts, bias, capacity); k and E vary too.
COMBOS = {
    "dense-nobias-dropless-k2": dict(num_shared_experts=0, bias=False, capacity_factor=0.0),
    "bias-cap-score-k2": dict(num_shared_experts=0, bias=True, capacity_factor=0.5, capacity_priority="score"),
    "shared-nobias-cap-position-k3": dict(num_shared_experts=1, bias=False, capacity_factor=0.6,
                                          capacity_priority="position", num_experts=6, num_experts_per_tok=3),
    "shared2-bias-dropless-k1": dict(num_shared_experts=2, bias=True, capacity_factor=0.0,
                                     num_experts=8, num_experts_per_tok=1),
}


@pytest.mark.parametrize("combo", list(COMBOS), ids=list(COMBOS))
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", GATES)
def test_moe_matches_naive_reference(gate, impl, act, combo):
    cfg = make_cfg(gate=gate, moe_impl=impl, expert_act=act, **COMBOS[combo])
    dtype = dtype_for(impl)
    moe = make_moe(cfg, dtype, seed=zlib.crc32(f"{gate}/{impl}/{act}/{combo}".encode()) % 1000).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, S, D, generator=g, dtype=dtype)
    upstream = torch.randn(B, S, D, generator=g, dtype=dtype)

    x1 = x.clone().requires_grad_()
    out = run(moe, x1)
    (out * upstream).sum().backward()

    P = leaf_copies(moe)
    x2 = x.clone().requires_grad_()
    ref, ref_dropped = ref_moe(x2, P, cfg, cfg.capacity_factor)
    (ref * upstream).sum().backward()

    T, k = B * S, cfg.num_experts_per_tok
    dropped = round(moe.stats["drop_frac"] * T * k)
    if cfg.capacity_factor > 0:
        assert ref_dropped > 0, "the capacity case must actually drop assignments"
    assert dropped == ref_dropped
    assert out.dtype == dtype and out.shape == x.shape
    tol = tol_for(dtype)
    torch.testing.assert_close(out, ref.detach(), **tol)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    names = [n for n, _ in moe.named_parameters()]
    expected = {"router.weight", "experts.w_in", "experts.w_out"}
    expected |= {"experts.b_in", "experts.b_out"} if cfg.bias else set()
    expected |= {"experts.w_gate"} if act == "swiglu" else set()
    assert expected <= set(names)
    for n, p in moe.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, P[n].grad, **tol, msg=lambda m: f"grad of {n}: {m}")


def test_reference_detects_a_wrong_layer():
    """Sanity check of the reference itself: perturbing one expert weight must break agreement."""
    cfg = make_cfg()
    moe = make_moe(cfg)
    x = torch.randn(B, S, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    P = leaf_copies(moe)
    with torch.no_grad():
        P["experts.w_out"][1, 0, 0] += 0.01
    ref, _ = ref_moe(x, P, cfg, 0.0)
    assert not torch.allclose(run(moe, x), ref, **tol_for(torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_eval_capacity_factor_overrides_in_eval_only(impl):
    cfg = make_cfg(moe_impl=impl, capacity_factor=0.5, eval_capacity_factor=0.0)
    dtype = dtype_for(impl)
    moe = make_moe(cfg, dtype, seed=5)
    x = torch.randn(B, S, D, dtype=dtype, generator=torch.Generator().manual_seed(6))
    P = leaf_copies(moe)
    out_train = run(moe.train(), x)
    assert moe.stats["drop_frac"] > 0
    torch.testing.assert_close(out_train, ref_moe(x, P, cfg, 0.5)[0].detach(), **tol_for(dtype))
    out_eval = run(moe.eval(), x)
    assert moe.stats["drop_frac"] == 0
    torch.testing.assert_close(out_eval, ref_moe(x, P, cfg, 0.0)[0].detach(), **tol_for(dtype))


# ----------------------------------------------------------------------------- 2. k == E: the full mixture

def expert_all_tokens(xt, ex: GroupedExperts, e: int):
    h = xt @ ex.w_in[e] + ex.b_in[e]
    return gelu_ref(h) @ ex.w_out[e] + ex.b_out[e]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gate", GATES)
def test_all_experts_chosen_gives_full_mixture(gate, impl):
    E = 4
    cfg = make_cfg(gate=gate, moe_impl=impl, num_experts=E, num_experts_per_tok=E)
    dtype = dtype_for(impl)
    moe = make_moe(cfg, dtype, seed=11)
    x = torch.randn(B, S, D, dtype=dtype, generator=torch.Generator().manual_seed(12))
    out = run(moe, x)
    with torch.no_grad():
        xt = x.reshape(-1, D)
        logits = xt @ moe.router.weight.t()
        if gate == "sigmoid":
            s = torch.sigmoid(logits)
            p = s / s.sum(-1, keepdim=True)
        else:  # with k == E, softmax-then-top-k and top-k-then-softmax are the same softmax
            p = torch.softmax(logits, -1)
        mix = sum(p[:, e:e + 1] * expert_all_tokens(xt, moe.experts, e) for e in range(E))
    torch.testing.assert_close(out, mix.view_as(x), **tol_for(dtype))
    assert moe.stats["tokens_per_expert"].tolist() == [B * S] * E


# ----------------------------------------------------------------------------- 3. capacity on a constructed routing

def routed_moe(logits: torch.Tensor, **kw):
    """An MoE whose router logits equal `logits` [T, E] for the inputs it returns (W = identity on the first E dims)."""
    T, E = logits.shape
    cfg = make_cfg(num_experts=E, **kw)
    moe = make_moe(cfg, torch.float64, seed=21)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, :E] = torch.eye(E)
    x = torch.zeros(1, T, D, dtype=torch.float64)
    x[0, :, :E] = logits
    x[0, :, E:] = torch.randn(T, D - E, generator=torch.Generator().manual_seed(22))
    return moe, x


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("priority", ["score", "position"])
def test_capacity_drops_hand_counted_assignments(priority, impl):
    # 8 tokens, E=4, k=2: every token picks experts 0 and 1 (logits -5 for 2 and 3).
    # Tokens 0-3 prefer expert 0, tokens 4-7 prefer expert 1; the margin varies per token.
    a = torch.tensor([1.0, 3.0, 2.0, 4.0, -1.0, -3.0, -2.0, -4.0])  # logit(0) - logit(1)
    logits = torch.stack([a / 2, -a / 2, torch.full((8,), -5.0), torch.full((8,), -5.0)], 1)
    # capacity = ceil(0.5 * 8 * 2 / 4) = 2 per expert; experts 0 and 1 each get 8 -> 12 dropped.
    moe, x = routed_moe(logits, num_experts_per_tok=2, capacity_factor=0.5, capacity_priority=priority,
                        moe_impl=impl)
    moe.train()
    if impl == "grouped_mm":
        moe, x = moe.float(), x.float()
    out = run(moe, x)
    assert moe.stats["tokens_per_expert"].tolist() == [2, 2, 0, 0]
    assert moe.stats["drop_frac"] == 12 / 16
    assert moe.stats["dead_experts"].item() == 2
    if priority == "position":
        # slot 0 first, then token order: expert 0 keeps tokens 0, 1 (their first choice);
        # expert 1 keeps tokens 4, 5. Tokens 2, 3, 6, 7 lose both slots.
        survivors = {0, 1, 4, 5}
    else:
        # larger gate weight first: expert 0 keeps the two tokens most sure of it (3 and 1),
        # expert 1 likewise keeps tokens 7 and 5.
        survivors = {1, 3, 5, 7}
    for t in range(8):
        if t in survivors:
            assert out[0, t].abs().max() > 1e-3, t
        else:
            assert torch.equal(out[0, t], torch.zeros(D, dtype=out.dtype)), t
    # and the survivors carry exactly their one kept slot
    P = leaf_copies(moe)
    torch.testing.assert_close(out, ref_moe(x, P, moe.cfg, 0.5)[0].detach(), **tol_for(x.dtype))


def test_capacity_counts_clamped_to_formula():
    E, k = 4, 2
    logits = torch.randn(24, E, generator=torch.Generator().manual_seed(31))
    logits[:, 0] += 4.0  # expert 0 over-subscribed
    for cf in (0.25, 0.5, 1.0, 1.5, 100.0):
        moe, x = routed_moe(logits, num_experts_per_tok=k, capacity_factor=cf)
        run(moe.train(), x)
        cap = math.ceil(cf * 24 * k / E)
        chosen = torch.topk(torch.softmax(logits, -1), k, -1).indices.reshape(-1)
        want = torch.bincount(chosen, minlength=E).clamp(max=cap)
        assert moe.stats["tokens_per_expert"].tolist() == want.tolist(), cf
        assert round(moe.stats["drop_frac"] * 24 * k) == 24 * k - int(want.sum())


def test_fully_dropped_token_is_zero_but_shared_expert_still_applies():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    logits = torch.stack([a, torch.zeros(4), torch.full((4,), -9.0)], 1)  # everyone wants expert 0
    # k=1, E=3: capacity = ceil(0.75 * 4 * 1 / 3) = 1 slot per expert, 3 of the 4 assignments dropped.
    moe, x = routed_moe(logits, num_experts_per_tok=1, capacity_factor=0.75, num_shared_experts=1)
    moe.train()
    out = run(moe, x)
    P = leaf_copies(moe)
    shared = torch.stack([ref_shared(x[0, t], P) for t in range(4)]).detach()
    # k=1: every gate weight is exactly 1, so "score" ties fall back to token order -> token 0 kept
    torch.testing.assert_close(out[0, 1:], shared[1:], atol=1e-12, rtol=0)
    assert not torch.allclose(out[0, 0], shared[0])


# ----------------------------------------------------------------------------- 4. aux loss and z-loss

@pytest.mark.parametrize("gate", GATES)
def test_aux_and_z_loss_hand_computed(gate):
    logits = [[2.0, 0.0, -1.0, 0.5],
              [0.3, 1.0, -0.2, 0.1],
              [-2.0, 0.5, 3.0, 0.0],
              [1.0, 1.5, 0.0, -0.5],
              [0.0, -1.0, 0.2, 2.5]]
    T, E, k = 5, 4, 2
    moe, x = routed_moe(torch.tensor(logits), num_experts_per_tok=k, gate=gate)
    run(moe.train(), x)
    # by hand, in Python floats
    probs, counts = [], [0] * E
    for row in logits:
        if gate == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            s = [math.exp(v) for v in row]
        probs.append([v / sum(s) for v in s])
        sel = s if gate != "topk_softmax" else row
        for e in sorted(range(E), key=lambda e: -sel[e])[:k]:
            counts[e] += 1
    f = [c / (T * k) for c in counts]
    P = [sum(p[e] for p in probs) / T for e in range(E)]
    aux = E * sum(fi * pi for fi, pi in zip(f, P))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits) / T
    assert moe.aux_loss.dtype == torch.float32 and moe.z_loss.dtype == torch.float32
    assert moe.aux_loss.item() == pytest.approx(aux, rel=1e-6)
    assert moe.z_loss.item() == pytest.approx(z, rel=1e-6)


@pytest.mark.parametrize("gate", GATES)
def test_uniform_router_aux_loss_is_exactly_one(gate):
    cfg = make_cfg(gate=gate, num_experts=8, num_experts_per_tok=2)
    moe = make_moe(cfg, torch.float32)
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(2, 16, D, generator=torch.Generator().manual_seed(41))  # T*k = 64: f_i exact in binary
    run(moe.train(), x)
    assert moe.aux_loss.item() == 1.0
    assert moe.z_loss.item() == pytest.approx(math.log(8) ** 2, rel=1e-6)


def test_aux_loss_gradient_matches_reference():
    cfg = make_cfg(num_experts=4, num_experts_per_tok=2, z_loss_coef=0.5)
    moe = make_moe(cfg, torch.float32, seed=43).train()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(44))
    run(moe, x)
    (moe.aux_loss + 0.5 * moe.z_loss).backward()
    W = moe.router.weight.detach().clone().requires_grad_()
    logits = x.reshape(-1, D) @ W.t()
    probs = torch.softmax(logits, -1)
    f = torch.bincount(torch.topk(probs, 2, -1).indices.reshape(-1), minlength=4).float() / (B * S * 2)
    ref = 4 * (f * probs.mean(0)).sum() + 0.5 * torch.logsumexp(logits, -1).square().mean()
    ref.backward()
    torch.testing.assert_close(moe.router.weight.grad, W.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aux_coef, z_coef", [(0.0, 0.1), (0.01, 0.0), (0.0, 0.0)])
def test_a_term_with_coefficient_zero_is_logged_without_a_graph(aux_coef, z_coef):
    """Its value is still computed (for the logs); it adds nothing to the loss and costs no backward."""
    cfg = make_cfg(aux_loss_coef=aux_coef, z_loss_coef=z_coef)
    model = GPT(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(3))
    _, loss, report = model(x, x, report=True)
    routing = report.routings[0]
    assert routing.aux_loss.requires_grad == (aux_coef != 0) and routing.z_loss.requires_grad == (z_coef != 0)
    assert report.aux_loss > 0 and report.z_loss > 0
    want = report.ce + aux_coef * report.aux_loss + z_coef * report.z_loss
    torch.testing.assert_close(loss.detach(), want)


def test_aux_terms_only_set_in_training():
    moe = make_moe(make_cfg(), torch.float32)
    run(moe.eval(), torch.randn(1, 4, D))
    assert moe.aux_loss is None and moe.z_loss is None
    assert int(moe.load.sum()) == 0  # eval forwards don't count towards the bias update


# ----------------------------------------------------------------------------- 5. aux-loss-free bias balancing

def skewed_moe(gate: str, k: int, **kw):
    E = 4
    cfg = make_cfg(gate=gate, num_experts=E, num_experts_per_tok=k, **kw)
    moe = make_moe(cfg, torch.float32, seed=51, router_std=0.3)
    with torch.no_grad():
        moe.router.weight[0, :] = 0.0
        moe.router.weight[0, 0] = 3.0  # inputs below have x[:, 0] ~ 1 + noise: expert 0 is strongly preferred
    return moe


def skewed_batch(gen, T=128):
    x = torch.randn(1, T, D, generator=gen)
    x[..., 0] += 1.5
    return x


@pytest.mark.parametrize("gate,k", [("softmax_topk", 1), ("softmax_topk", 2), ("topk_softmax", 2), ("sigmoid", 1)])
def test_bias_update_balances_load(gate, k):
    E = 4
    moe = skewed_moe(gate, k).train()
    gen = torch.Generator().manual_seed(52)
    rate = 0.05 if gate == "topk_softmax" else 0.005  # the bias is added to logits vs. to probabilities
    first = window = None
    with torch.no_grad():
        for step in range(300):
            run(moe, skewed_batch(gen))
            if step == 0:
                first = moe.load.float().clone()
                # the router is strongly skewed: expert 0 is in nearly every token's top-k
                assert first.max() / first.mean() > 0.8 * E / k, first
                logits_before = moe.router(skewed_batch(torch.Generator().manual_seed(53)).reshape(-1, D))[2]
            if step == 200:
                window = torch.zeros(E)
            if window is not None:
                window += moe.load.float()
            moe.update_bias(rate)
            assert int(moe.load.sum()) == 0  # reset after every update
    # The sign rule oscillates around balance; the load averaged over the last 100 steps is balanced.
    assert window.max() / window.mean() < 1.2, window
    assert moe.router.score_bias[0] < 0 and (moe.router.score_bias[1:] > 0).all()  # favourite pushed down
    # the bias only steers selection: the router's logits (and so probs, aux and z-loss) are untouched
    with torch.no_grad():
        logits_after = moe.router(skewed_batch(torch.Generator().manual_seed(53)).reshape(-1, D))[2]
    assert torch.equal(logits_before, logits_after)


@pytest.mark.parametrize("gate", GATES)
def test_bias_changes_selection_not_gate_weights(gate):
    cfg = make_cfg(gate=gate, num_experts=6, num_experts_per_tok=3)
    moe = make_moe(cfg, torch.float32, seed=55)
    router = moe.router
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(56))
    idx0, w0, _, _ = router(x)
    bias = torch.tensor([0.5, -0.5, 0.3, 0.0, -0.2, 0.4]) * (4.0 if gate == "topk_softmax" else 1.0)
    router.score_bias.copy_(bias)
    idx, w, logits, probs = router(x)
    assert not torch.equal(idx, idx0), "the bias must change some selections"
    P = {"router.weight": router.weight.detach()}
    for t in range(24):
        chosen, wr, pr, _ = ref_route(x[t], P["router.weight"], gate, 3, score_bias=bias)
        assert idx[t].tolist() == chosen
        # gate weights of the (biased) selection come from the unbiased scores
        torch.testing.assert_close(w[t], wr, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(probs[t], pr, atol=1e-6, rtol=1e-5)
    # tokens whose selection did not change keep exactly the same weights
    same = (idx == idx0).all(-1)
    assert same.any()
    torch.testing.assert_close(w[same], w0[same], atol=0, rtol=0)


def test_update_bias_sign_rule_and_reset():
    moe = make_moe(make_cfg(num_experts=4), torch.float32)
    moe.load.copy_(torch.tensor([10, 0, 2, 4]))  # mean 4 -> errors -6, +4, +2, 0
    moe.update_bias(0.25)
    assert moe.router.score_bias.tolist() == [-0.25, 0.25, 0.25, 0.0]
    assert moe.load.tolist() == [0, 0, 0, 0]
    moe.update_bias(0.25)  # no load recorded: nothing moves
    assert moe.router.score_bias.tolist() == [-0.25, 0.25, 0.25, 0.0]
    moe.update_bias(0.5, load=torch.tensor([1.0, 1.0, 3.0, 3.0]))  # an explicit (e.g. all-reduced) load
    assert moe.router.score_bias.tolist() == [0.25, 0.75, -0.25, -0.5]


def test_training_forward_accumulates_load():
    moe = make_moe(make_cfg(num_experts=4, num_experts_per_tok=2), torch.float32).train()
    x = torch.randn(1, 10, D, generator=torch.Generator().manual_seed(57))
    run(moe, x)
    first = moe.stats["tokens_per_expert"].clone()
    run(moe, x)
    assert moe.load.tolist() == (2 * first).tolist()
    assert int(moe.load.sum()) == 2 * 10 * 2


def test_bias_update_uses_routed_not_capacity_clamped_load():
    # 20 tokens, k=1, E=4: 12 tokens choose expert 0, 4 expert 1, 2 each experts 2 and 3.
    # True load [12, 4, 2, 2], mean 5: expert 1 is under-loaded and should be raised.
    # capacity = ceil(1.25 * 20 / 4) = 7 clamps the counts to [7, 4, 2, 2], mean 3.75,
    # which makes expert 1 look over-loaded.
    pref = [0] * 12 + [1] * 4 + [2] * 2 + [3] * 2
    logits = torch.full((20, 4), -2.0)
    logits[torch.arange(20), torch.tensor(pref)] = 2.0
    moe, x = routed_moe(logits, num_experts_per_tok=1, capacity_factor=1.25)
    run(moe.train(), x)
    moe.update_bias(0.1)
    assert moe.router.score_bias[0] < 0
    assert moe.router.score_bias[1] > 0
    assert moe.router.score_bias[2] > 0 and moe.router.score_bias[3] > 0


def test_score_bias_is_saved_in_state_dict():
    cfg = make_cfg()
    moe = make_moe(cfg, torch.float32)
    moe.router.score_bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
    sd = moe.state_dict()
    assert "router.score_bias" in sd
    assert "load" not in sd  # the running counter is transient
    fresh = MoE(cfg)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.router.score_bias, moe.router.score_bias)
    gpt = GPT(make_cfg(n_layer=2, moe_every=1))
    assert "transformer.h.0.mlp.router.score_bias" in gpt.state_dict()


# ----------------------------------------------------------------------------- 6. bf16 autocast

@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_autocast_close_to_fp32(impl, act):
    cfg = make_cfg(moe_impl=impl, expert_act=act, num_shared_experts=1)
    moe = make_moe(cfg, torch.float32, seed=61).train()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(62))
    ref = run(moe, x)
    ref_counts = moe.stats["tokens_per_expert"].clone()
    seen = {}
    hook = moe.experts.register_forward_hook(lambda m, i, o: seen.update(dtype=o.dtype))
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(moe, xb)
    hook.remove()
    assert seen["dtype"] == torch.bfloat16  # the experts really ran in bf16
    assert out.dtype == torch.float32  # the layer returns its input's dtype
    assert torch.equal(moe.stats["tokens_per_expert"], ref_counts)  # fp32 router: same choices
    err = (out - ref).norm() / ref.norm()
    assert err < 2e-2, err
    assert not torch.equal(out, ref)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in moe.parameters())
    assert torch.isfinite(xb.grad).all()


def test_bf16_autocast_impls_agree():
    """All three kernels cast once to the same dtype, so under autocast they should agree to bf16 rounding."""
    outs = []
    for impl in IMPLS:
        moe = make_moe(make_cfg(moe_impl=impl), torch.float32, seed=63)
        x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(run(moe, x))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------- 7. devices

def test_construct_on_meta_device():
    cfg = make_cfg(num_experts=8, num_experts_per_tok=2, expert_act="swiglu", num_shared_experts=2)
    with torch.device("meta"):
        moe = MoE(cfg)
    shapes = {n: tuple(p.shape) for n, p in moe.named_parameters()}
    assert shapes == {
        "router.weight": (8, D),
        "experts.w_in": (8, D, H),
        "experts.w_out": (8, H, D),
        "experts.w_gate": (8, D, H),
        "experts.b_in": (8, H),
        "experts.b_out": (8, D),
        "shared_mlp.c_fc.weight": (2 * H, D),
        "shared_mlp.c_fc.bias": (2 * H,),
        "shared_mlp.c_proj.weight": (D, 2 * H),
        "shared_mlp.c_proj.bias": (D,),
    }
    assert all(p.is_meta for p in moe.parameters())
    assert moe.router.score_bias.is_meta and tuple(moe.router.score_bias.shape) == (8,)
    assert moe.load.is_meta and moe.load.dtype == torch.long
    # materialise and initialise, as a sharded/deferred init would
    moe.to_empty(device="cpu")
    init_moe_(moe, n_layer=2)
    moe.shared_mlp.c_fc.reset_parameters()  # GPT._init_weights covers the shared MLP, init_moe_ does not
    moe.shared_mlp.c_proj.reset_parameters()
    with torch.no_grad():
        moe.router.score_bias.zero_()
        moe.load.zero_()
        for b in (moe.experts.b_in, moe.experts.b_out):
            assert torch.equal(b, torch.zeros_like(b))
    out = run(moe, torch.randn(1, 5, D))
    assert out.shape == (1, 5, D) and torch.isfinite(out).all()


def test_gpt_on_meta_device_shapes():
    cfg = make_cfg(n_layer=2, moe_every=2, num_experts=4)
    with torch.device("meta"):
        model = GPT(cfg)
    assert isinstance(model.transformer.h[1].mlp, MoE)
    assert model.transformer.h[1].mlp.experts.w_in.shape == (4, D, H)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_matches_cpu(impl):
    cfg = make_cfg(moe_impl=impl, num_shared_experts=1, capacity_factor=0.75)
    moe = make_moe(cfg, torch.float32, seed=71).train()
    x = torch.randn(B, S, D, generator=torch.Generator().manual_seed(72))
    ref = run(moe, x)
    moe_c = moe.cuda()
    if impl == "grouped_mm":  # the CUDA grouped GEMM runs in bf16
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = moe_c(x.cuda())
        assert ((out.cpu() - ref).norm() / ref.norm()) < 2e-2
    else:
        out = moe_c(x.cuda())
        torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "cuda" for p in moe_c.parameters())


def test_auto_kernel_on_cpu_and_forced_kernels():
    """On a CPU auto follows the rows per expert (kernels.cpu_prefers_bmm); forced kernels stay."""
    few, many = torch.zeros(24, D), torch.zeros(8 * 400, D)
    even = lambda rows, E: [rows // E] * E  # noqa: E731
    assert GroupedExperts(8, D, H, impl="auto").kernel_for(few, torch.float32, even(24, 8)) == "bmm"
    assert GroupedExperts(8, D, H, impl="auto").kernel_for(many, torch.bfloat16, even(3200, 8)) == "loop"
    skewed = [20, 4, 0, 0, 0, 0, 0, 0]  # bmm would pad 24 rows to 160
    assert GroupedExperts(8, D, H, impl="auto").kernel_for(few, torch.float32, skewed) == "loop"
    assert GroupedExperts(8, D, H, impl="auto").kernel_for(few, torch.float32) == "loop"  # rows not given
    assert GroupedExperts(17, D, H, impl="grouped_mm").kernel_for(few, torch.float32, even(24, 17)) == "grouped_mm"


def test_forced_grouped_mm_that_cannot_run_is_one_line_error():
    """The CPU grouped GEMM needs 16-byte-aligned rows: width 6 in fp32 is 24 bytes."""
    cfg = make_cfg(n_embd=6, n_head=2, expert_hidden=8, moe_impl="grouped_mm")
    moe = MoE(cfg)
    with pytest.raises(ConfigError, match=r"^moe_impl=grouped_mm cannot run on cpu with float32, torch \d+\.\d+ "
                                          r"and widths \(6, 8\); use moe_impl=auto"):
        run(moe, torch.randn(1, 4, 6))


@pytest.mark.parametrize("impl", IMPLS)
def test_experts_on_zero_rows_give_zero_gradients(impl):
    ex = GroupedExperts(4, D, H, gated=True, impl=impl)
    for p in ex.parameters():
        torch.nn.init.normal_(p)
    out = ex(torch.zeros(0, D), torch.zeros(4, dtype=torch.long))
    assert out.shape == (0, D)
    out.sum().backward()
    for n, p in ex.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n


@pytest.mark.parametrize("impl", IMPLS)
def test_experts_with_empty_groups(impl):
    ex = GroupedExperts(5, D, H, impl=impl)
    g = torch.Generator().manual_seed(73)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    counts = torch.tensor([0, 3, 0, 4, 0])
    x = torch.randn(7, D, generator=g)
    out = ex(x, counts)
    ref = torch.cat([expert_all_tokens(x[:3], ex, 1), expert_all_tokens(x[3:], ex, 3)])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for e in (0, 2, 4):
        assert torch.equal(ex.w_in.grad[e], torch.zeros(D, H))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("impl", IMPLS)
def test_experts_gradients_match_autograd_per_expert(impl, activation):
    """Each kernel's output and every gradient equal autograd through one plain MLP per expert.

    The loop kernel writes its backward by hand; an empty expert must get zero gradients.
    """
    dtype = dtype_for(impl)
    ex = GroupedExperts(5, D, H, impl=impl, gelu_variant=activation).to(dtype)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ex.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    counts = torch.tensor([3, 0, 5, 1, 4])
    x = torch.randn(13, D, generator=g, dtype=dtype, requires_grad=True)
    upstream = torch.randn(13, D, generator=g, dtype=dtype)
    (ex(x, counts) * upstream).sum().backward()

    P = {n: p.detach().clone().requires_grad_() for n, p in ex.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    outs = [torch.nn.functional.gelu(xe @ P["w_in"][e] + P["b_in"][e], approximate=approximate) @ P["w_out"][e]
            + P["b_out"][e] for e, xe in enumerate(x_ref.split(counts.tolist()))]
    (torch.cat(outs) * upstream).sum().backward()
    tol = tol_for(dtype)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    for n, p in ex.named_parameters():
        torch.testing.assert_close(p.grad, P[n].grad, **tol, msg=lambda m: f"grad of {n}: {m}")
        assert torch.equal(p.grad[1], torch.zeros_like(p.grad[1])), n


@pytest.mark.parametrize("impl", ["auto", "loop", "bmm"])
def test_compile_breaks_only_at_host_sized_experts_and_never_recompiles(impl):
    """torch.compile: the one graph break per MoE layer is the loop/bmm kernel (it reads the counts on
    the host); routing that changes from step to step causes no recompilation."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = make_cfg(moe_impl=impl, n_layer=2, block_size=S)
    model = GPT(cfg)
    compiled = torch.compile(model, backend="eager")  # dynamo's graph capture, without inductor's codegen
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(3):
            x = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))
            _, loss = compiled(x, x)
            loss.backward()
    reasons = counters["graph_break"]
    assert reasons and all("_host_sized" in reason for reason in reasons), list(reasons)
    assert sum(reasons.values()) <= cfg.n_layer + 1  # each layer's frame, and the model's loop over blocks
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointed", [False, True])
def test_compile_grouped_mm_is_one_graph(checkpointed):
    """The GPU's kernel (grouped_mm) reads nothing on the host: the whole model, forward and backward, is
    one graph (fullgraph=True refuses any break). In bf16, grouped_mm's compute dtype on a GPU: its
    checks under tracing accept nothing else. With activation checkpointing too: an MoE block returns
    its routing record instead of keeping it as module state (GPT.forward reports it), so the
    checkpoint's higher-order op captures the block whole."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from nanomoe_ds.activation_checkpoint import checkpoint_blocks_
    torch._dynamo.reset()
    counters.clear()
    cfg = make_cfg(moe_impl="grouped_mm", n_layer=2, block_size=S)
    model = GPT(cfg).to(torch.bfloat16)
    if checkpointed:
        checkpoint_blocks_(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    routed = 0
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed in range(2):
            x = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))
            _, loss, report = compiled(x, x, report=True)
            loss.backward()
            routed += sum(routing.routed.sum().item() for routing in report.routings)
    assert all(p.grad is not None for p in model.parameters())
    assert not counters["graph_break"], list(counters["graph_break"])
    assert routed == 2 * 2 * B * S * cfg.num_experts_per_tok  # every layer's routing reported, once per forward
    torch._dynamo.reset()


def test_compile_folds_the_grouped_gemm_bias_into_the_activation():
    """Eager, the grouped path adds each row's expert bias by gathering an [N, hidden] bias tensor first.
    Under torch.compile (the trainer's default) inductor computes that gather, the add and the GELU
    in one elementwise pass over the GEMM's output: the bias becomes its epilogue, with no gathered
    tensor in memory. Inductor's CPU code shows it as well as its CUDA code would (kernel names list
    the ops they fused; torch is pinned)."""
    import re

    import torch._dynamo
    from torch._inductor.utils import run_and_get_code
    torch._dynamo.reset()
    torch.manual_seed(0)
    experts = GroupedExperts(4, D, H, impl="grouped_mm").to(torch.bfloat16)
    for p in experts.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    counts = torch.tensor([5, 0, 7, 4])
    x = torch.randn(int(counts.sum()), D, dtype=torch.bfloat16)
    eager = experts(x, counts)
    compiled, (forward_code, *_) = run_and_get_code(torch.compile(experts, fullgraph=True), x, counts)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    kernels = set(re.findall(r"^(cpp_fused_\w+) = ", forward_code, re.MULTILINE))
    assert any("index_select" in k and "gelu" in k for k in kernels), kernels  # bias + activation, one pass
    assert "aten.index_select" not in forward_code  # no bias gathered on its own
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- 8. config validation

BAD = {
    "k_above_E": (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    "k_zero": (dict(num_experts=4, num_experts_per_tok=0), "num_experts_per_tok"),
    "k_negative": (dict(num_experts=4, num_experts_per_tok=-1), "num_experts_per_tok"),
    "negative_capacity": (dict(capacity_factor=-0.5), "capacity_factor"),
    "bad_eval_capacity": (dict(eval_capacity_factor=-0.5), "eval_capacity_factor"),
    "unknown_gate": (dict(gate="softmax"), "gate"),
    "negative_expert_hidden": (dict(expert_hidden=-8), "expert_hidden"),
    "unknown_act": (dict(expert_act="relu"), "expert_act"),
    "unknown_impl": (dict(moe_impl="triton"), "moe_impl"),
    "unknown_priority": (dict(capacity_priority="random"), "capacity_priority"),
    "zero_experts": (dict(num_experts=0, num_experts_per_tok=0), "num_experts"),
    "negative_shared": (dict(num_shared_experts=-1), "num_shared_experts"),
    "moe_every_zero": (dict(moe_every=0), "moe_every"),
    "negative_bias_rate": (dict(bias_update_rate=-1e-3), "bias_update_rate"),
}


@pytest.mark.parametrize("name", list(BAD), ids=list(BAD))
def test_bad_moe_config_raises_one_line(name):
    kw, key = BAD[name]
    base = dict(n_layer=2, n_head=2, n_embd=D, block_size=32, vocab_size=64, use_moe=True)
    cfg = GPTConfig(**{**base, **kw})
    with pytest.raises(ConfigError) as ei:
        validate_model(cfg)
    msg = str(ei.value)
    assert "\n" not in msg and key in msg, msg
    with pytest.raises(ConfigError, match=key):  # the same through build(), which the CLI uses
        build({**base, **kw})


def test_expert_hidden_zero_means_four_times_width():
    cfg = GPTConfig(n_embd=D, n_head=2, use_moe=True, expert_hidden=0)
    validate_model(cfg)
    assert cfg.expert_hidden == 4 * D


def test_good_moe_config_validates():
    for gate in GATES:
        validate_model(make_cfg(gate=gate, num_experts=4, num_experts_per_tok=4, capacity_factor=1.25))


# ----------------------------------------------------------------------------- 9. router precision

@pytest.mark.parametrize("gate", GATES)
def test_router_float32_under_bf16_autocast(gate):
    cfg = make_cfg(gate=gate, num_experts=8, num_experts_per_tok=2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(24, D, generator=torch.Generator().manual_seed(91))
    idx_ref, w_ref, logits_ref, probs_ref = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (x @ router.weight.t()).dtype == torch.bfloat16  # autocast is really on
        idx, w, logits, probs = router(x)
    assert logits.dtype == torch.float32 and w.dtype == torch.float32 and probs.dtype == torch.float32
    assert torch.equal(logits, logits_ref) and torch.equal(idx, idx_ref) and torch.equal(w, w_ref)
    assert torch.equal(probs, probs_ref)
    # a bf16 input (a bf16 engine) is upcast, and the weights stay fp32
    _, wb, logits_b, _ = router(x.bfloat16())
    assert logits_b.dtype == torch.float32 and wb.dtype == torch.float32
    torch.testing.assert_close(logits_b, x.bfloat16().float() @ router.weight.t())


def test_router_output_shapes_and_normalisation():
    cfg = make_cfg(num_experts=8, num_experts_per_tok=3)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    idx, w, logits, probs = router(torch.randn(24, D))
    assert idx.shape == (24, 3) and w.shape == (24, 3) and logits.shape == (24, 8) and probs.shape == (24, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(24))
    torch.testing.assert_close(probs.sum(-1), torch.ones(24))
    assert (w[:, :-1] >= w[:, 1:]).all()  # slot 0 is the strongest choice
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts


def test_router_jitter_only_in_training():
    cfg = make_cfg(router_jitter=0.5)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    x = torch.randn(24, D)
    router.eval()
    assert torch.equal(router(x)[2], router(x)[2])
    router.train()
    torch.manual_seed(0)
    a = router(x)[2]
    b = router(x)[2]
    assert not torch.equal(a, b)
    # multiplicative noise in [0.5, 1.5] on the input
    assert (a - x @ router.weight.t()).abs().max() <= (x.abs() @ router.weight.abs().t()).max() * 0.5 + 1e-5


# ----------------------------------------------------------------------------- 10. GPT level

def test_moe_every_places_moe_in_every_second_block():
    model = GPT(make_cfg(n_layer=4, moe_every=2))
    kinds = [type(b.mlp) for b in model.transformer.h]
    assert kinds == [MLP, MoE, MLP, MoE]
    assert model.moe_layers() == [model.transformer.h[1].mlp, model.transformer.h[3].mlp]
    dense = GPT(make_cfg(n_layer=3, use_moe=False))
    assert all(type(b.mlp) is MLP for b in dense.transformer.h) and dense.moe_layers() == []
    assert isinstance(Block(make_cfg(moe_every=1), 0).mlp, MoE)


def _reference_aux(x, W, gate, k):
    """Aux and z-loss of one MoE layer from its input, by the documented formulas."""
    xt = x.reshape(-1, x.shape[-1]).float()
    logits = xt @ W.float().t()
    if gate == "sigmoid":
        s = torch.sigmoid(logits)
        probs, sel = s / s.sum(-1, keepdim=True), s
    else:
        probs = torch.softmax(logits, -1)
        sel = probs if gate == "softmax_topk" else logits
    E = W.shape[0]
    f = torch.bincount(torch.topk(sel, k, -1).indices.reshape(-1), minlength=E).float() / (xt.shape[0] * k)
    return E * (f * probs.mean(0)).sum(), torch.logsumexp(logits, -1).square().mean()


@pytest.mark.parametrize("gate", ["softmax_topk", "sigmoid"])
def test_gpt_loss_train_vs_eval(gate):
    cfg = make_cfg(n_layer=4, moe_every=2, gate=gate, aux_loss_coef=0.3, z_loss_coef=0.05, vocab_size=64)
    torch.manual_seed(101)
    model = GPT(cfg)
    for m in model.moe_layers():  # a more decisive router than the 0.02 init, so the aux term is non-trivial
        torch.nn.init.normal_(m.router.weight, std=1.0)
    g = torch.Generator().manual_seed(102)
    idx = torch.randint(0, 64, (2, 12), generator=g)
    targets = torch.randint(0, 64, (2, 12), generator=g)
    inputs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: inputs.append((mod, i[0].detach()))) for m in model.moe_layers()]

    model.train()
    logits, loss, report = model(idx, targets, report=True)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 64), targets.view(-1))
    assert [mod for mod, _ in inputs] == model.moe_layers()
    auxes, zs = zip(*[_reference_aux(xi, mod.router.weight.detach(), gate, cfg.num_experts_per_tok)
                      for mod, xi in inputs])
    aux, z = torch.stack(auxes).mean(), torch.stack(zs).mean()
    assert aux > 1.0  # unbalanced routing: the aux term actually matters
    torch.testing.assert_close(loss, ce + 0.3 * aux + 0.05 * z, atol=1e-5, rtol=1e-5)
    assert (loss - ce).abs() > 0.3  # and it is really included
    torch.testing.assert_close(report.aux_loss, aux, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(report.z_loss, z, atol=1e-6, rtol=1e-5)
    loss.backward()
    assert all(m.router.weight.grad is not None for m in model.moe_layers())

    model.eval()
    with torch.no_grad():
        logits, loss, report = model(idx, targets, report=True)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 64), targets.view(-1))
    assert torch.equal(loss, ce)
    assert torch.equal(report.ce, ce) and report.aux_loss is None and report.z_loss is None
    for h in hooks:
        h.remove()


def test_gpt_inference_returns_last_position_only():
    model = GPT(make_cfg(n_layer=2, moe_every=1)).eval()
    idx = torch.randint(0, 64, (2, 7))
    logits, loss = model(idx)
    assert loss is None and logits.shape == (2, 1, 64)
    full, _ = model(idx, torch.zeros_like(idx))
    torch.testing.assert_close(logits[:, 0], full[:, -1])
