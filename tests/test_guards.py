"""The replica guard (guards.py): fingerprints in process, and a perturbed replica on real gloo ranks."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import tiny_args
from dist_utils import as_launched, ds_json, train_rows

from nanomoe_ds import guards
from nanomoe_ds.config import from_argv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fingerprint_is_exact_and_sees_one_changed_bit(dtype):
    x = torch.randn(1000, 7).to(dtype)
    assert torch.equal(guards.fingerprint(x), guards.fingerprint(x.clone()))
    assert torch.equal(guards.fingerprint(x), guards.fingerprint(x.t().contiguous().t()))  # layout does not matter
    y = x.clone()
    y.view(-1).view(guards._BITS[x.element_size()])[123] += 1  # the next representable value
    assert not torch.equal(x, y)
    assert not torch.equal(guards.fingerprint(x), guards.fingerprint(y))


def test_fingerprint_in_chunks_equals_one_pass(monkeypatch):
    x = torch.randn(10_000)
    whole = guards.fingerprint(x)
    monkeypatch.setattr(guards, "_CHUNK", 97)
    assert torch.equal(guards.fingerprint(x), whole)


def perturbed_rank(rank, world, argv, out, target):
    """Rank 1 changes one weight of its copy right after the engine is built; the others do not."""
    from nanomoe_ds import ds_engine
    as_launched(rank, world)
    make = ds_engine.make_engine_factory

    def make_perturbing(m, t):
        factory = make(m, t)

        def engine(model, train_cfg):
            built = factory(model, train_cfg)
            if rank == 1:
                with torch.no_grad():
                    dict(model.named_parameters())[target].view(-1)[0] += 1e-3
            return built
        return engine
    ds_engine.make_engine_factory = make_perturbing
    m, t = from_argv(argv)
    Path(f"{out}/code.{rank}").write_text(str(ds_engine.run(m, t)))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["transformer.h.1.mlp.experts.w_in", "transformer.h.0.attn.c_proj.weight"])
def test_a_replica_that_differs_stops_every_rank_and_saves_nothing(char_data, tmp_path, capfd, target, forkserver):
    """2 ranks, ep_size=1: every weight has two copies. One copy changed on rank 1 is named, with both
    ranks, in one line per rank; exit code 3; no checkpoint is written."""
    argv = ["--deepspeed_config", ds_json(tmp_path, "zero2"), *tiny_args(char_data, tmp_path / "run")]
    forkserver.spawn_ranks(perturbed_rank, (2, argv, str(tmp_path), target), 2)
    assert [(tmp_path / f"code.{r}").read_text() for r in range(2)] == ["3", "3"]
    err = capfd.readouterr().err
    line = f"replicas diverged at iteration 0: {target} differs between rank 0 and rank 1"
    assert err.count(line) == 2, err[-3000:]
    assert not list((tmp_path / "run").glob("iter_*"))


def healthy_rank(rank, world, argv, out):
    from nanomoe_ds import ds_engine
    as_launched(rank, world)
    calls = []
    check = guards.check

    def counted(*args):
        calls.append(args[1])
        return check(*args)
    guards.check = counted
    m, t = from_argv(argv)
    code = ds_engine.run(m, t)
    Path(f"{out}/code.{rank}").write_text(f"{code} {calls}")


@pytest.mark.slow
def test_the_guard_is_silent_on_a_healthy_run_at_four_ranks(char_data, tmp_path, forkserver):
    """4 ranks, ep_size=2 (two replica groups of experts): checked at every eval_interval, no stop."""
    argv = ["--deepspeed_config", ds_json(tmp_path, "zero2"),
            *tiny_args(char_data, tmp_path / "run", ep_size=2, gradient_accumulation_steps=4, check_grad_order=True)]
    forkserver.spawn_ranks(healthy_rank, (4, argv, str(tmp_path)), 4)
    assert {(tmp_path / f"code.{r}").read_text() for r in range(4)} == {"0 [0, 3, 6]"}
    assert len(train_rows(tmp_path / "run")) == 7
