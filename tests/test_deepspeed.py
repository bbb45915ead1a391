"""DeepSpeed path on real gloo ranks: equivalence with one device, bf16, clipping, checkpoints, refusals."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch

from conftest import REPO, read_checkpoint, tensorboard_scalars, tiny_args, wandb_history
from dist_utils import ds_json, free_port, loopback_env, run_ranks, train_rows

from nanomoe_ds.config import from_argv
from nanomoe_ds.start import build_model
from nanomoe_ds.trainer import train

# A tiny MoE GPT whose clipping threshold (0.5) sits below its gradient norm (~1.5):
# every step below is clipped, so a wrong global norm would show in the weights.
COMMON = dict(max_iters=4, eval_interval=4, grad_clip=0.5, num_experts=4, num_experts_per_tok=2)


def run_ds(forkserver, ranks, tmp_path, char_data, out, json_path, **over):
    """launch/train.py on `ranks` ranks (processes forked from one that imported torch and DeepSpeed once)."""
    res = forkserver.run_ranks(ranks, ["--deepspeed_config", json_path,
                                       *tiny_args(char_data, tmp_path / out, **{**COMMON, **over})])
    for r in res:
        assert r.returncode == 0, r.stderr[-3000:]
    return train_rows(tmp_path / out), read_checkpoint(tmp_path / out)


@pytest.fixture(scope="module")
def single(char_data, tmp_path_factory):
    """The one-device reference run, fp32."""
    out = tmp_path_factory.mktemp("single")
    m, t = from_argv(tiny_args(char_data, out, **COMMON))
    train(m, t)
    return train_rows(out), read_checkpoint(out)


def assert_same_run(a, b, rel, weight_atol):
    (rows_a, ck_a), (rows_b, ck_b) = a, b
    assert [r["iter"] for r in rows_a] == [r["iter"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=rel)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=rel)
        assert ra["grad_norm"] > COMMON["grad_clip"]  # clipping really was active
        # routing statistics describe the global batch (reduced over ranks), not rank 0's share
        for la, lb in zip(ra["moe"], rb["moe"]):
            assert la["tokens_per_expert"] == lb["tokens_per_expert"]
            assert la["drop_frac"] == lb["drop_frac"]
            for key in ("load_cv", "aux_loss", "z_loss"):
                assert la[key] == pytest.approx(lb[key], rel=rel)
    sd_a, sd_b = ck_a["model"], ck_b["model"]
    for k, v in sd_a.items():
        if k.endswith("experts.w_in") or k.endswith("experts.w_out"):
            assert v.shape[0] == COMMON["num_experts"]  # every expert, gathered from every rank
        torch.testing.assert_close(sd_b[k].float(), v.float(), rtol=0, atol=weight_atol, msg=k)


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
@pytest.mark.parametrize("ep_size", [1, 2])
def test_fp32_two_ranks_match_one_device(single, char_data, tmp_path, stage, ep_size, forkserver):
    dist = run_ds(forkserver, 2, tmp_path, char_data, "ds", ds_json(tmp_path, stage), ep_size=ep_size)
    assert_same_run(single, dist, rel=1e-5, weight_atol=1e-5)


@pytest.mark.parametrize("stage", ["zero1", "zero2_offload"])
def test_other_stages_ep2_match_one_device(single, char_data, tmp_path, stage, forkserver):
    dist = run_ds(forkserver, 2, tmp_path, char_data, "ds", ds_json(tmp_path, stage), ep_size=2)
    assert_same_run(single, dist, rel=1e-5, weight_atol=1e-5)


def test_four_ranks_two_expert_groups_match_one_device(char_data, tmp_path, forkserver):
    """4 ranks, ep_size=2: two expert-parallel groups, each expert on 2 ranks' data. The preset's
    2 micro-batches cannot be split over 4 ranks, so the global batch becomes 4 micro-batches:
    the same numbers as one device with gradient_accumulation_steps=4."""
    m, t = from_argv(tiny_args(char_data, tmp_path / "one", **{**COMMON, "gradient_accumulation_steps": 4}))
    train(m, t)
    one = train_rows(tmp_path / "one"), read_checkpoint(tmp_path / "one")
    four = run_ds(forkserver, 4, tmp_path, char_data, "four", ds_json(tmp_path, "zero2"), ep_size=2)
    assert_same_run(one, four, rel=1e-5, weight_atol=1e-5)


def test_capacity_limited_exchange_ep2(char_data, tmp_path, forkserver):
    """With capacity_factor > 0 tokens are dropped before the exchange; EP=2 still matches one device."""
    over = dict(capacity_factor=0.8, gate="sigmoid", num_shared_experts=1, expert_act="swiglu")
    m, t = from_argv(tiny_args(char_data, tmp_path / "one", **{**COMMON, **over}))
    train(m, t)
    one = train_rows(tmp_path / "one"), read_checkpoint(tmp_path / "one")
    assert one[0][0]["moe"][0]["drop_frac"] > 0.05
    dist = run_ds(forkserver, 2, tmp_path, char_data, "ds", ds_json(tmp_path, "zero2"), ep_size=2, **over)
    assert_same_run(one, dist, rel=1e-5, weight_atol=1e-5)


@pytest.mark.parametrize("keep_stage", [False, True])
def test_single_process_deepspeed_debug_mode(single, char_data, tmp_path, keep_stage, forkserver):
    """`deepspeed --num_gpus 1 ...`: one rank, the engine path, same numbers as plain PyTorch.

    ZeRO-2 on one rank runs as ZeRO-0 and says so, unless told to keep the stage."""
    args = tiny_args(char_data, tmp_path / "one", **COMMON, zero_single_rank_as_stage0=not keep_stage)
    (res,) = forkserver.run_ranks(1, ["--deepspeed_config", ds_json(tmp_path, "zero2"), *args])
    assert res.returncode == 0, res.stderr[-3000:]
    dist = train_rows(tmp_path / "one"), read_checkpoint(tmp_path / "one")
    assert_same_run(single, dist, rel=1e-5, weight_atol=1e-5)
    assert dist[1]["topology"]["zero_stage"] == (2 if keep_stage else 0)  # what ran is what the checkpoint says
    note = "note: ZeRO-2 on 1 rank partitions nothing; running ZeRO-0"
    assert (note in res.stdout) != keep_stage, res.stdout[-2000:]


def test_dense_one_rank_matches_plain_and_reports_its_gradient_norm(char_data, tmp_path, forkserver):
    """A dense model on one rank (zero2.json in fp32, run as ZeRO-0): the plain loop's steps, and the
    gradient norm logged (ZeRO-0's fp32 clip in DeepSpeed keeps it to itself; the trainer clips there)."""
    dense = dict(use_moe=False)
    m, t = from_argv(tiny_args(char_data, tmp_path / "plain", **COMMON, **dense))
    train(m, t)
    plain_rows = train_rows(tmp_path / "plain")
    rows, ck = run_ds(forkserver, 1, tmp_path, char_data, "ds", ds_json(tmp_path, "zero2"), **dense)
    assert ck["topology"]["zero_stage"] == 0
    for a, b in zip(plain_rows, rows):
        assert b["grad_norm"] is not None and b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)


def test_zero0_bf16_takes_the_same_steps_as_zero1_bf16(char_data, tmp_path, forkserver):
    """DeepSpeed's ZeRO-0 bf16 wrapper steps AdamW once on zero gradients when it is built; undone, its
    run follows ZeRO-1's (the step count no longer starts at 1, nor the masters one decay behind)."""
    runs = [run_ds(forkserver, 1, tmp_path, char_data, name, ds_json(tmp_path, name, bf16=True))
            for name in ("zero0", "zero1")]
    (rows0, ck0), (rows1, ck1) = runs
    assert ck0["topology"]["zero_stage"] == 0 and ck1["topology"]["zero_stage"] == 1  # bf16 keeps its stage
    for a, b in zip(rows0, rows1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_activation_checkpointing_json_block_ep2_matches_one_device(single, char_data, tmp_path, forkserver):
    """DeepSpeed's "activation_checkpointing" block turns on block recompute: the exchanges repeat in backward."""
    path = ds_json(tmp_path, "zero2", activation_checkpointing={"partition_activations": False})
    (rows, ck) = run_ds(forkserver, 2, tmp_path, char_data, "ac", path, ep_size=2)
    assert ck["config"]["activation_checkpointing"] is True
    assert_same_run(single, (rows, ck), rel=1e-5, weight_atol=1e-5)


def test_bf16_ep2_within_bf16_tolerance(single, char_data, tmp_path, forkserver):
    dist = run_ds(forkserver, 2, tmp_path, char_data, "bf16", ds_json(tmp_path, "zero2", bf16=True), ep_size=2)
    rows_s, rows_d = single[0], dist[0]
    for rs, rd in zip(rows_s, rows_d):
        assert rd["loss"] == pytest.approx(rs["loss"], rel=2e-2)
        assert rd["grad_norm"] == pytest.approx(rs["grad_norm"], rel=5e-2)
    ep1 = run_ds(forkserver, 2, tmp_path, char_data, "bf16_ep1", ds_json(tmp_path, "zero2", bf16=True), ep_size=1)
    for r1, r2 in zip(ep1[0], rows_d):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-2)


def test_checkpoint_round_trip_ep2_zero2(char_data, tmp_path, forkserver):
    cfg = ds_json(tmp_path, "zero2")
    over = dict(max_iters=6, eval_interval=3, ep_size=2)
    full, _ = run_ds(forkserver, 2, tmp_path, char_data, "full", cfg, **over)
    run_ds(forkserver, 2, tmp_path, char_data, "part", cfg, **{**over, "max_iters": 3})
    shards = sorted(p.name for p in (tmp_path / "part" / "iter_3").glob("shard_*"))
    assert shards == ["shard_00000.bin", "shard_00001.bin"]  # each rank wrote its share
    resumed, ck = run_ds(forkserver, 2, tmp_path, char_data, "part", cfg, **{**over, "init_from": "resume"})
    # metrics.jsonl of "part" now holds iters 0-3 then the resumed 3-6
    tail = [r for r in resumed if r["iter"] >= 3][-4:]
    assert [r["iter"] for r in tail] == [3, 4, 5, 6]
    for a, b in zip(tail, full[3:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert ck["iter_num"] == 6
    # launch/sample.py runs on the consolidated checkpoint of a DeepSpeed run
    r = forkserver.run(["launch/sample.py", f"--out_dir={tmp_path / 'part'}", "--device=cpu", "--num_samples=1",
                        "--max_new_tokens=10"])
    assert r.returncode == 0, r.stderr


def test_sinks_and_mfu_two_ranks(char_data, tmp_path, monkeypatch, forkserver):
    """wandb (offline) and TensorBoard read back after os._exit; MFU counts this rank's tokens only."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tb = tmp_path / "tb"
    rows, _ = run_ds(forkserver, 2, tmp_path, char_data, "ds", ds_json(tmp_path, "zero2"), ep_size=2, max_iters=6,
                     wandb_log=True, tensorboard_dir=str(tb), peak_tflops=0.001)
    history, finished = wandb_history(tmp_path / "ds")
    assert finished
    assert sorted(h["_step"] for h in history if "loss" in h) == [r["iter"] for r in rows]
    assert [v for _, v in tensorboard_scalars(tb)["loss"]] == pytest.approx([r["loss"] for r in rows])
    flops = build_model(*from_argv(tiny_args(char_data, tmp_path, **COMMON))).flops_per_token()
    r5 = next(r for r in rows if r["iter"] == 5)  # the first measured step: no averaging yet
    assert r5["mfu"] == pytest.approx(flops * r5["tokens_per_sec"] / 2 / 1e9, rel=1e-9)


def test_compile_under_deepspeed(single, char_data, tmp_path, monkeypatch):
    """--compile=True compiles the engine's module (not silently ignored); the numbers stay the same."""
    monkeypatch.setenv("TORCH_LOGS", "dynamo")  # dynamo says on stderr when it traces a frame
    res = run_ranks(1, ["--deepspeed_config", ds_json(tmp_path, "zero2"),
                        *tiny_args(char_data, tmp_path / "c", **{**COMMON, "compile": True})], timeout=500)
    assert res[0].returncode == 0, res[0].stderr[-3000:]
    assert "torchdynamo start tracing forward" in res[0].stderr  # the model's forward was compiled
    for rs, rc in zip(single[0], train_rows(tmp_path / "c")):
        assert rc["loss"] == pytest.approx(rs["loss"], rel=1e-4)


def test_mfu_is_null_on_cpu_without_peak_tflops(char_data, tmp_path, forkserver):
    rows, _ = run_ds(forkserver, 1, tmp_path, char_data, "ds", ds_json(tmp_path, "zero2"), max_iters=6)
    assert [r["mfu"] for r in rows] == [None] * 7


@pytest.mark.parametrize("json_edit, over, msg", [
    ({"train_micro_batch_size_per_gpu": 8}, {}, "error: DeepSpeed JSON train_micro_batch_size_per_gpu=8 contradicts batch_size=4"),
    ({"gradient_clipping": 2.0}, {}, "error: DeepSpeed JSON gradient_clipping=2.0 contradicts grad_clip=1.0"),
    ({"zero_optimization": {"stage": 3}}, {}, "error: ZeRO-3 does not support native MoE layers in DeepSpeed; use ZeRO-1 or ZeRO-2"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, {},
     "error: the DeepSpeed JSON enables both bf16 and fp16; set one of bf16.enabled / fp16.enabled to false"),
    ({}, {"num_experts": 3, "num_experts_per_tok": 1, "ep_size": 1, "gradient_accumulation_steps": 3},
     None),  # control: a valid odd set-up runs
])
def test_refusals_one_rank(char_data, tmp_path, json_edit, over, msg, forkserver):
    cfg = json.load(open(REPO / "ds_configs/zero2.json"))
    cfg.update(json_edit)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    (r,) = forkserver.run_ranks(1, ["--deepspeed_config", str(path),
                                    *tiny_args(char_data, tmp_path / "o", **{"max_iters": 1, **over})])
    if msg is None:
        assert r.returncode == 0, r.stderr[-2000:]
        return
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(msg), r.stderr[-2000:]
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # refused before any training


def test_num_experts_not_divisible_by_ep_size(char_data, tmp_path):
    res = run_ranks(2, ["--deepspeed_config", str(REPO / "ds_configs/zero2.json"),
                        *tiny_args(char_data, tmp_path, num_experts=3, num_experts_per_tok=1, ep_size=2)])
    assert [r.returncode for r in res] == [2, 2]
    for rank, r in enumerate(res):  # every rank that has an error says it, naming itself
        assert r.stderr.strip().splitlines()[-1] == f"error: rank {rank}: num_experts (3) must be divisible by ep_size (2)"


@pytest.mark.parametrize("path, msg", [
    ("nope.json", "error: --deepspeed_config: no such file 'nope.json'; see ds_configs/"),
    ("BAD", "error: --deepspeed_config: '"),
])
def test_missing_or_invalid_json(char_data, tmp_path, path, msg, forkserver):
    if path == "BAD":
        path = tmp_path / "bad.json"
        path.write_text("{ not json")
    r = forkserver.run(["launch/train.py", "--deepspeed_config", str(path), *tiny_args(char_data, tmp_path)],
                       env=loopback_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_PORT=free_port()))
    assert r.returncode == 2 and r.stderr.startswith(msg) and r.stderr.count("\n") == 1, r.stderr


def test_deepspeed_launcher_two_ranks(char_data, tmp_path):
    """The README's command: `deepspeed --num_gpus 2 launch/train.py --deepspeed_config ...`.

    The preset's gradient_accumulation_steps=1 cannot be split over 2 ranks: the global
    batch doubles, and rank 0 says so once.
    """
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "launch/train.py",
                        "--deepspeed_config", "ds_configs/zero2.json", "launch/config/train_shakespeare_char_moe.py",
                        *tiny_args(char_data, tmp_path, max_iters=2, eval_interval=2, gradient_accumulation_steps=1),
                        "--ep_size=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=loopback_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("global batch 4x1 -> 4x2 for 2 ranks") == 1, r.stdout[-3000:]
    assert "tokens per iteration: 256" in r.stdout  # 4 x 2 x block 32
    rows = train_rows(tmp_path)
    assert [row["iter"] for row in rows] == [0, 1, 2]
    assert (tmp_path / "iter_2" / "shard_00001.bin").exists()
