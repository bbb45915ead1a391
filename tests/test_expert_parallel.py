"""The all-to-all exchange on 2 real gloo ranks, against the same experts on one device.

Routing extremes included: every token to one expert (one rank receives nothing),
and a rank with no tokens at all (it sends nothing). None may hang.
"""
from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from dist_utils import spawn_ranks

from nanomoe_ds.config import GPTConfig
from nanomoe_ds.expert_parallel import parallelize_experts_
from nanomoe_ds.moe import MoE

E, D, WORLD = 4, 8, 2


def make_layer():
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=D, n_head=1, use_moe=True, num_experts=E, num_experts_per_tok=2, expert_hidden=16,
                    moe_impl="loop", activation="gelu_tanh")  # not the default: the sharded experts must keep it
    layer = MoE(cfg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.5)
    return layer


def tokens(case: str, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    n = 0 if case == "rank1_empty" and rank == 1 else 6
    return torch.randn(1, n, D, generator=g, dtype=torch.double)


def skew(layer, case):
    if case == "all_to_expert0":  # huge router bias: expert 0 and 1 (both on rank 0) take every token
        with torch.no_grad():
            layer.router.score_bias.copy_(torch.tensor([10.0, 9.0, 0.0, 0.0]))


def worker(rank, case, out_path):
    layer = make_layer()
    skew(layer, case)
    parallelize_experts_(layer, dist.group.WORLD, WORLD)
    x = tokens(case, rank).requires_grad_()
    y, _ = layer(x)
    (y.square().sum() * (rank + 1)).backward()
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": {n: p.grad for n, p in layer.named_parameters()}},
               f"{out_path}.{rank}")


@pytest.mark.parametrize("case", ["uniform", "all_to_expert0", "rank1_empty"])
def test_ep2_matches_one_device(tmp_path, case):
    out = str(tmp_path / "res")
    spawn_ranks(worker, (case, out), WORLD)  # a mismatched exchange hangs: the deadline fails it and kills the ranks
    ref = make_layer()
    skew(ref, case)
    res = [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]
    for r in range(WORLD):
        x = tokens(case, r).requires_grad_()
        y, routing = ref(x)
        ref.record(routing)
        (y.square().sum() * (r + 1)).backward()
        torch.testing.assert_close(res[r]["y"], y.detach())
        torch.testing.assert_close(res[r]["x_grad"], x.grad)
    if case == "all_to_expert0":
        assert ref.stats["tokens_per_expert"][2:].sum() == 0  # rank 1's experts got nothing
    # Dense (router) grads: each rank has its own; they sum to the one-device grad over both inputs.
    torch.testing.assert_close(res[0]["grads"]["router.weight"] + res[1]["grads"]["router.weight"], ref.router.weight.grad)
    # Expert grads: rank r owns experts [2r, 2r+2) and has gradients from *both* ranks' tokens.
    for name in ("w_in", "b_in", "w_out", "b_out"):
        full = getattr(ref.experts, name).grad
        got = torch.cat([res[r]["grads"][f"experts.{name}"] for r in range(WORLD)])
        torch.testing.assert_close(got, full)
