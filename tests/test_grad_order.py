"""Gradient reduction in one order on every rank (grad_order.py), and the order guard.

The regression tests of issue 23 run the trainer's DeepSpeed engine on real gloo
ranks where backward's order really differs between ranks (the CPU's `auto` kernel
picked per call from the load) or where experts get no token, and hold every
loss, gradient norm and expert weight to one device's.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import read_checkpoint, tiny_args
from dist_utils import as_launched, ds_json, train_rows

from nanomoe_ds import grad_order
from nanomoe_ds.config import from_argv
from nanomoe_ds.local_engine import LocalEngine
from nanomoe_ds.trainer import train


# ---------------------------------------------------------------- the ordering itself (in process)
class ReductionLog:
    """Stands in for a ZeRO optimizer's two entry points: records what reaches the reduction."""

    def __init__(self):
        self.reduced, self.epilogues = [], 0

    def reduce_ready_partitions_and_remove_grads(self, param, i):
        self.reduced.append((param, i))

    def independent_gradient_partition_epilogue(self):
        self.epilogues += 1


def ordered(params, arrivals, missing=()):
    log = ReductionLog()
    order = grad_order.CanonicalReduction(log, [(f"p{k}", p) for k, p in enumerate(params)], check=True)
    for k in arrivals:
        if k not in missing:
            log.reduce_ready_partitions_and_remove_grads(params[k], 7)
    log.independent_gradient_partition_epilogue()
    index = {id(p): k for k, p in enumerate(params)}
    return [index[id(p)] for p, _ in log.reduced], log, order


@pytest.mark.parametrize("seed", range(5))
def test_any_arrival_order_reduces_in_reverse_parameter_order(seed):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(6)]
    arrivals = torch.randperm(6, generator=torch.Generator().manual_seed(seed)).tolist()
    reduced, log, order = ordered(params, arrivals)
    assert reduced == [5, 4, 3, 2, 1, 0]
    assert log.epilogues == 1
    assert order.order_hash() == ordered(params, list(range(6)))[2].order_hash()


def test_a_gradient_that_never_comes_does_not_hold_back_the_others_past_backward():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(4)]
    reduced, _, order = ordered(params, [3, 1, 0, 2], missing={2})
    assert reduced == [3, 1, 0]  # 1 and 0 waited for 2 until the end of backward, then went in order
    assert order.order_hash() != ordered(params, [3, 2, 1, 0])[2].order_hash()


def test_the_mismatch_line_names_the_first_differing_gradient():
    names = ["lm_head", "h.0.mlp.experts.w_out", "h.0.mlp.experts.w_in"]
    line = grad_order.describe_mismatch([[0, 1, 2], [0, 1, 2], [0, 2, 1]], names, 4)
    assert "at iteration 4" in line and "reduction 1" in line
    assert "h.0.mlp.experts.w_out on rank 0 and h.0.mlp.experts.w_in on rank 2" in line
    assert "nothing" in grad_order.describe_mismatch([[0, 1], [0]], names, None)


# ---------------------------------------------------------------- real ranks against one device
# The failing row: 8 experts, micro-batches of 4 x 32 tokens, top-2. Each call brings
# 256 rows for 8 experts, right where the CPU's auto rule switches between loop and bmm as the
# busiest expert's load moves: ranks pick different kernels in the same micro-batch.
FLIP = dict(n_embd=64, num_experts=8, num_experts_per_tok=2, batch_size=4, max_iters=3, eval_interval=3,
            eval_iters=1, grad_clip=0.5, lr_decay_iters=12)
EMPTY_EXPERTS = [4, 5, 6, 7]  # a router bias keeps every token away: at ep_size=2, ranks 1 and 3 get none


def skew_router(model):
    """Send every token to experts 0-3: experts 4-7 get no token in any step, on any rank."""
    for layer in model.moe_layers():
        layer.router.score_bias[EMPTY_EXPERTS] = -1e4


def record_kernels(path):
    """Log, per call, which kernel `auto` picked on this rank (to prove the ranks disagreed)."""
    from nanomoe_ds.moe import GroupedExperts
    choose, picks = GroupedExperts.kernel_for, []

    def kernel_for(self, x, dtype, sizes=None):
        impl = choose(self, x, dtype, sizes)
        if sizes is not None:
            picks.append(impl)
            Path(path).write_text(json.dumps(picks))
        return impl
    GroupedExperts.kernel_for = kernel_for


def ds_rank(rank, world, argv, case, out):
    from nanomoe_ds.ds_engine import make_engine_factory
    as_launched(rank, world)
    if case == "flip":
        record_kernels(f"{out}/kernels.{rank}.json")
    m, t = from_argv(argv)
    factory = make_engine_factory(m, t)

    def engine(model, train_cfg):
        if case == "empty":
            skew_router(model)
        return factory(model, train_cfg)
    train(m, t, engine)


def one_device(argv, case):
    m, t = from_argv(argv)

    def engine(model, train_cfg):
        if case == "empty":
            skew_router(model)
        return LocalEngine(model, train_cfg, "cpu", torch.float32)
    train(m, t, engine)


@pytest.fixture(scope="module")
def one_device_runs(char_data, tmp_path_factory):
    """The one-device reference of a (case, world): its run directory and arguments. ZeRO-1 and ZeRO-2
    are held to the same reference, so it trains once for both."""
    runs = {}

    def reference(case: str, world: int) -> tuple[Path, list[str]]:
        if (case, world) not in runs:
            out = tmp_path_factory.mktemp(f"one-{case}-{world}")
            argv = tiny_args(char_data, out, **replicated_args(world))
            one_device(argv, case)
            runs[case, world] = out, argv
        return runs[case, world]
    return reference


def replicated_args(world: int) -> dict:
    """FLIP with two micro-batches per rank, the order guard on."""
    return dict(FLIP, gradient_accumulation_steps=2 * world, check_grad_order=True)


def assert_same_steps(one_dir, dist_dir, atol=1e-5):
    one, dist = train_rows(one_dir), train_rows(dist_dir)
    assert [r["iter"] for r in one] == [r["iter"] for r in dist]
    for a, b in zip(one, dist):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=0)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=0)
    ck_one, ck_dist = read_checkpoint(one_dir), read_checkpoint(dist_dir)
    for name, value in ck_one["model"].items():
        torch.testing.assert_close(ck_dist["model"][name], value, rtol=0, atol=atol, msg=name)
    return ck_one


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero1", "zero2"])
@pytest.mark.parametrize("world,ep_size", [(2, 1), (4, 2)])
@pytest.mark.parametrize("case", ["flip", "empty"])
def test_replicated_experts_match_one_device(char_data, tmp_path, case, world, ep_size, stage, forkserver,
                                             one_device_runs):
    """Expert replicas (world > ep_size) under ZeRO-1/2: one device's losses, norms and weights,
    whether the ranks' backwards ran different kernels or some experts saw no token all run."""
    one_dir, one_argv = one_device_runs(case, world)
    dist_argv = ["--deepspeed_config", ds_json(tmp_path, stage),
                 *tiny_args(char_data, tmp_path / "dist", ep_size=ep_size, **replicated_args(world))]
    forkserver.spawn_ranks(ds_rank, (world, dist_argv, case, str(tmp_path)), world)
    ck = assert_same_steps(one_dir, tmp_path / "dist")
    if case == "flip":  # the ranks of one replica group did run different kernels in the same call
        picks = [json.loads((tmp_path / f"kernels.{r}.json").read_text()) for r in range(world)]
        replicas = [(r, r + ep_size) for r in range(world - ep_size)]
        assert any(a != b for r, s in replicas for a, b in zip(picks[r], picks[s])), picks
    else:  # an expert that no token reached all run: a zero gradient, so AdamW's update is weight decay alone
        m, t = from_argv(one_argv)
        decay = 1.0
        from nanomoe_ds.trainer import get_lr
        for it in range(t.max_iters):  # the checkpoint at max_iters holds the weights before its step
            decay *= 1 - get_lr(it, t) * t.weight_decay
        torch.manual_seed(t.seed)
        from nanomoe_ds.model import GPT
        m.vocab_size = ck["model_args"]["vocab_size"]
        init = GPT(m).state_dict()
        for name, value in ck["model"].items():
            if name.endswith("experts.w_in"):
                torch.testing.assert_close(value[EMPTY_EXPERTS], init[name][EMPTY_EXPERTS] * decay, rtol=1e-6, atol=0)


# ---------------------------------------------------------------- the order guard
def unordered_rank(rank, world, argv, out):
    """A rank whose reduction takes gradients as backward makes them (the ordering switched off)."""
    from nanomoe_ds import ds_engine
    as_launched(rank, world)

    def arrive(self, param, *args):
        self._held[self.position[id(param)]] = (param, *args)
        self._send(self.position[id(param)])
    grad_order.CanonicalReduction._arrive = arrive
    m, t = from_argv(argv)
    Path(f"{out}/code.{rank}").write_text(str(ds_engine.run(m, t)))


@pytest.mark.slow
def test_order_guard_stops_ranks_whose_reductions_differ(char_data, tmp_path, capfd, forkserver):
    """Without the ordering, the kernel flip reaches ZeRO-2's buckets: the guard stops every rank
    with one line, exit code 3, before the step is applied or anything saved."""
    argv = ["--deepspeed_config", ds_json(tmp_path, "zero2"),
            *tiny_args(char_data, tmp_path / "run", **FLIP, gradient_accumulation_steps=4, check_grad_order=True)]
    forkserver.spawn_ranks(unordered_rank, (2, argv, str(tmp_path)), 2)
    assert [(tmp_path / f"code.{r}").read_text() for r in range(2)] == ["3", "3"]
    err = capfd.readouterr().err
    assert err.count("gradient reduction order differs between ranks: reduction") == 2, err[-3000:]
    assert "experts.w_" in err
    assert not list((tmp_path / "run").glob("iter_*"))
