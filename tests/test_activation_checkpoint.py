"""Activation checkpointing: the recompute routes as the forward did, so gradients are the run's without it.

On one device in-process, and at EP=2 on 2 real gloo ranks (the recompute repeats the
all-to-all exchanges in backward). Every set-up has the things that could make a replay
differ: router jitter and dropout (RNG), capacity drops, shared experts, the z-loss.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn_ranks

from nanomoe_ds.activation_checkpoint import checkpoint_blocks_
from nanomoe_ds.config import GPTConfig
from nanomoe_ds.expert_parallel import parallelize_experts_
from nanomoe_ds.model import GPT

WORLD = 2


def make_pair(**over) -> tuple[GPT, GPT]:
    """Two copies of one seeded MoE GPT; the second recomputes its blocks."""
    cfg = GPTConfig(**{**dict(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=50, use_moe=True,
                              num_experts=4, num_experts_per_tok=2, expert_hidden=48, router_jitter=0.1,
                              dropout=0.1, capacity_factor=1.0, num_shared_experts=1, z_loss_coef=1e-3,
                              bias_update_rate=1e-3, moe_every=1, moe_impl="loop"), **over})
    torch.manual_seed(0)
    plain = GPT(cfg)
    recomputed = copy.deepcopy(plain)
    checkpoint_blocks_(recomputed)
    return plain, recomputed


def step(model: GPT, idx: torch.Tensor, seed: int):
    """-> (loss, the forward's ForwardReport), after the backward (where a checkpointed block is recomputed)."""
    torch.manual_seed(seed)  # the same jitter and dropout draws for both models
    _, loss, report = model(idx, idx, report=True)
    loss.backward()
    return loss.detach(), report


def assert_same_routing(plain: GPT, a, b):
    """The two forwards' reports route alike, one record per MoE layer (the recompute adds none)."""
    assert len(a.routings) == len(b.routings) == len(plain.moe_layers())
    for ra, rb in zip(a.routings, b.routings):
        assert torch.equal(ra.routed, rb.routed)
        assert torch.equal(ra.kept, rb.kept) and ra.dropped == rb.dropped


def assert_same_gradients(plain: GPT, recomputed: GPT, atol=1e-6):
    for (name, p), (_, q) in zip(plain.named_parameters(), recomputed.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=atol, msg=name)


def test_gradients_equal_without_it_on_one_device():
    plain, recomputed = make_pair()
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    recomputed.transformer.h[0].attn.register_forward_hook(lambda *_: calls.append(1))
    (loss_b, report_b), (loss_a, report_a) = step(recomputed, idx, seed=5), step(plain, idx, seed=5)
    assert loss_b == loss_a
    assert len(calls) == 2  # the block really ran again in backward
    assert_same_gradients(plain, recomputed)
    assert all(r.dropped > 0 for r in report_a.routings)  # capacity drops: the replay had to drop the same ones
    assert_same_routing(plain, report_a, report_b)  # reported once, not again by the recompute


@pytest.mark.parametrize("impl, moe_every, backend", [("grouped_mm", 1, "eager"), ("loop", 1, "eager"),
                                                      ("loop", 2, "aot_eager"), ("loop", 0, "aot_eager")])
def test_under_torch_compile(impl, moe_every, backend):
    """Compiled, the gradients are still the run's without recompute. Blocks are captured with their
    checkpoint (aot_eager runs that capture through AOTAutograd, as inductor would): dense blocks and
    grouped_mm MoE blocks whole; a loop/bmm MoE block reads its counts on the host, so dynamo falls
    back to running that checkpointed block eagerly (moe_every=0: a dense model)."""
    plain, recomputed = make_pair(moe_impl=impl, moe_every=moe_every or 1, use_moe=moe_every > 0)
    compiled = torch.compile(recomputed, backend=backend)
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(1))
    (loss_b, report_b), (loss_a, report_a) = step(compiled, idx, seed=5), step(plain, idx, seed=5)
    assert loss_b == loss_a
    assert_same_gradients(plain, recomputed)
    assert_same_routing(plain, report_a, report_b)


def test_state_dict_keys_and_eval_unchanged():
    plain, recomputed = make_pair(dropout=0.0, router_jitter=0.0)
    assert list(plain.state_dict()) == list(recomputed.state_dict())  # checkpoints are the same either way
    plain.eval(), recomputed.eval()
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(recomputed(idx, idx)[1], plain(idx, idx)[1], rtol=0, atol=0)


def test_saves_less_for_backward():
    """What autograd keeps between forward and backward: each block's input instead of its activations."""
    def saved_bytes(model):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(3))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(idx, idx)
        return total[0]

    plain, recomputed = make_pair(n_layer=4)
    assert saved_bytes(recomputed) < 0.5 * saved_bytes(plain)


def ep_worker(rank, out_path):
    torch.set_num_threads(1)
    plain, recomputed = make_pair(n_layer=2)
    for model in (plain, recomputed):
        for layer in model.moe_layers():
            parallelize_experts_(layer, dist.group.WORLD, WORLD)
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(10 + rank))
    (loss_a, report_a), (loss_b, report_b) = step(plain, idx, seed=7 + rank), step(recomputed, idx, seed=7 + rank)
    losses = [loss_a, loss_b]
    assert losses[0] == losses[1], losses
    assert_same_gradients(plain, recomputed)
    assert_same_routing(plain, report_a, report_b)
    torch.save(losses, f"{out_path}.{rank}")


def test_gradients_equal_without_it_at_ep2(tmp_path):
    out = str(tmp_path / "res")
    spawn_ranks(ep_worker, (out,), WORLD)  # a mismatched exchange hangs: the deadline fails it and kills the ranks
    assert all(os.path.exists(f"{out}.{r}") for r in range(WORLD))
