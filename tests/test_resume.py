"""What a resume keeps and what it may change (resume.py): the table, in process; a restart command that
lost keys, with real processes."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import tiny_args
from dist_utils import ds_json
from nanomoe_ds import checkpoint_dir, resume
from nanomoe_ds.config import ALL_KEYS, ConfigError, GPTConfig, TrainConfig, to_dict


def saved_meta(model_cfg: GPTConfig, train_cfg: TrainConfig) -> dict:
    """The two entries of a checkpoint's metadata that a resume reads."""
    return {"model_args": dataclasses.asdict(model_cfg), "config": to_dict(model_cfg, train_cfg)}


SAVED_MODEL = GPTConfig(n_layer=2, n_embd=32, n_head=2, use_moe=True, num_experts=4, dropout=0.0, gate="sigmoid")
SAVED_TRAIN = TrainConfig(seed=7, dataset="shakespeare_char", gradient_accumulation_steps=6, batch_size=4,
                          learning_rate=1e-3, max_iters=100)


def test_every_key_has_a_rule():
    """A new key must be classified: fixed, noted or free."""
    assert set(resume.RESUME_RULES) == ALL_KEYS
    assert set(resume.RESUME_RULES.values()) == {resume.FIXED, resume.NOTED, resume.FREE}


def test_fixed_keys_given_otherwise_are_refused_in_one_line():
    asked_model = dataclasses.replace(SAVED_MODEL, n_layer=3, num_experts=8, dropout=0.1)
    asked_train = dataclasses.replace(SAVED_TRAIN, seed=8)
    with pytest.raises(ConfigError) as e:
        resume.reconcile(saved_meta(SAVED_MODEL, SAVED_TRAIN), asked_model, asked_train,
                         given={"n_layer", "num_experts", "dropout", "seed"})
    assert str(e.value) == ("init_from=resume: n_layer=3 (checkpoint: 2), num_experts=8 (checkpoint: 4), seed=8 "
                            "(checkpoint: 7) contradict the checkpoint's run; drop them to resume, or start a new run "
                            "in another out_dir")


def test_fixed_keys_not_given_follow_the_checkpoint_and_noted_keys_apply_with_a_note():
    """A restart command that lost --seed, the batch and the gate continues the same run; a new learning
    rate and max_iters apply, one note each."""
    asked_train = dataclasses.replace(TrainConfig(), learning_rate=5e-4, max_iters=200, dataset="shakespeare_char")
    got = resume.reconcile(saved_meta(SAVED_MODEL, SAVED_TRAIN), GPTConfig(dropout=0.1), asked_train,
                           given={"dropout", "learning_rate", "max_iters", "dataset"})
    assert (got.model_cfg.n_layer, got.model_cfg.gate, got.model_cfg.dropout) == (2, "sigmoid", 0.1)
    assert (got.train_cfg.seed, got.train_cfg.gradient_accumulation_steps, got.train_cfg.batch_size) == (7, 6, 4)
    assert (got.train_cfg.learning_rate, got.train_cfg.max_iters) == (5e-4, 200)
    assert got.followed == {"gate": "sigmoid", "seed": 7, "gradient_accumulation_steps": 6, "batch_size": 4}
    assert got.changed == {"learning_rate": [1e-3, 5e-4], "max_iters": [100, 200], "dropout": [0.0, 0.1]}
    assert got.notes() == [
        "note: the checkpoint's gate=sigmoid, seed=7, batch_size=4, gradient_accumulation_steps=6 (not set by this command) continue the run",
        "note: learning_rate changed on resume: 0.001 -> 0.0005",
        "note: max_iters changed on resume: 100 -> 200",
        "note: dropout changed on resume: 0.0 -> 0.1"]


def test_free_keys_are_not_compared():
    asked_train = dataclasses.replace(SAVED_TRAIN, out_dir="elsewhere", ep_size=2, compile=False, log_interval=7)
    got = resume.reconcile(saved_meta(SAVED_MODEL, SAVED_TRAIN), SAVED_MODEL, asked_train,
                           given={"out_dir", "ep_size", "compile", "log_interval"})
    assert (got.followed, got.changed, got.notes()) == ({}, {}, [])
    assert got.train_cfg == asked_train


def test_a_checkpoint_older_than_a_key_compares_only_what_it_recorded():
    """Checkpoints from before `config` was compared, or before the `activation` key (exact GELU)."""
    meta = {"model_args": {k: v for k, v in dataclasses.asdict(SAVED_MODEL).items() if k != "activation"}}
    got = resume.reconcile(meta, GPTConfig(activation="gelu_tanh"), TrainConfig(seed=9), given={"seed"})
    assert (got.model_cfg.activation, got.train_cfg.seed, got.changed) == ("gelu", 9, {})
    upcycled = saved_meta(dataclasses.replace(SAVED_MODEL, activation="gelu_tanh"), SAVED_TRAIN)
    assert resume.reconcile(upcycled, GPTConfig(), TrainConfig(), set()).model_cfg.activation == "gelu_tanh"


@pytest.fixture
def run_train(forkserver):
    """`python launch/train.py *args`, as a process forked from one that imported torch once."""
    return lambda *args: forkserver.run(["launch/train.py", *args], timeout=120)


def losses(out_dir) -> dict:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["iter"]: row["loss"] for row in rows if "loss" in row}


def test_a_restart_command_that_lost_keys_continues_the_same_run(char_data, tmp_path, run_train):
    """Saved with --seed=7 and 4 micro-batches; the restart forgets both and sets a new max_iters: it resumes
    with the checkpoint's seed and batch (losses equal an uninterrupted run's) and says what it did."""
    def args(out, **over):
        return tiny_args(char_data, out, init_from="auto", lr_decay_iters=12, eval_interval=3, **over)
    full = run_train(*args(tmp_path / "full", seed=7, gradient_accumulation_steps=4, max_iters=6))
    first = run_train(*args(tmp_path / "run", seed=7, gradient_accumulation_steps=4, max_iters=3))
    assert full.returncode == 0 and first.returncode == 0, first.stderr[-2000:]
    lost = [a for a in args(tmp_path / "run", max_iters=6) if not a.startswith(("--seed", "--gradient_acc"))]
    again = run_train(*lost)
    assert again.returncode == 0, again.stderr[-2000:]
    assert ("note: the checkpoint's seed=7, gradient_accumulation_steps=4 (not set by this command) continue the run"
            in again.stdout.splitlines())
    assert "note: max_iters changed on resume: 3 -> 6" in again.stdout.splitlines()
    resumed = losses(tmp_path / "run")
    assert resumed == losses(tmp_path / "full")  # bit for bit: the same data order and batch
    record = next(json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
                  if '"event": "resume"' in line)
    assert (record["followed"], record["changed"]) == ({"seed": 7, "gradient_accumulation_steps": 4},
                                                      {"max_iters": [3, 6]})
    refused = run_train(*args(tmp_path / "run", seed=8, gradient_accumulation_steps=4, max_iters=9))
    assert refused.returncode == 2
    assert refused.stderr == (f"error: init_from=auto (over the checkpoint in {tmp_path / 'run'}): seed=8 "
                              "(checkpoint: 7) contradict the checkpoint's run; drop them to resume, or start a new "
                              "run in another out_dir\n")


# ------------------------------------------------------------ falling back past a checkpoint that fails to verify
def flip_a_weight_bit(directory, shard: str = "shard_00000.bin"):
    """The lowest mantissa bit of one weight in `shard`: the value barely changes, only the checksum can tell."""
    records = checkpoint_dir.open_checkpoint(str(directory.parent), int(directory.name[5:])).meta["records"]
    _, _, numel, _, position, _ = max((r for r in records if r[3] == shard), key=lambda r: r[2])
    data = bytearray((directory / shard).read_bytes())
    data[position + 4 * (numel // 2)] ^= 0x01
    (directory / shard).write_bytes(bytes(data))


def everything(out_dir, iteration: int) -> dict:
    ckpt = checkpoint_dir.open_checkpoint(str(out_dir), iteration)
    return {key: ckpt.whole(key) for key in ckpt.meta["tensors"]}


def resume_records(out_dir) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("event") == "resume"]


def test_an_unpinned_resume_falls_back_past_a_corrupt_checkpoint_and_keeps_it_aside(char_data, tmp_path, run_train):
    """A flipped bit in the newest checkpoint's weights, then in a newer one's metadata: each restart with
    init_from=auto moves the bad one aside as iter_N.corrupt (nothing deleted), says so in one line, resumes
    from the previous one and retrains to the same state, bit for bit. A reader and a pinned resume refuse."""
    def args(**over):
        return tiny_args(char_data, tmp_path / "run", **{"init_from": "auto", "eval_interval": 3,
                                                         "lr_decay_iters": 9, **over})
    full = run_train(*args(max_iters=6))
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "run"
    good = everything(run, 6)
    flip_a_weight_bit(run / "iter_6")
    for pinned in (dict(eval_only=True, init_from="resume"), dict(init_from="resume", resume_iter=6)):
        refused = run_train(*args(max_iters=6, **pinned))
        assert refused.returncode == 2 and "iter_6/shard_00000.bin is corrupt" in refused.stderr, refused.stderr
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_3", "iter_6"]  # readers move nothing
    again = run_train(*args(max_iters=6))
    assert again.returncode == 0, again.stderr[-2000:]
    assert (f"note: {run}/iter_6/shard_00000.bin is corrupt (checksum mismatch at byte" in again.stdout
            and "moved iter_6 aside to iter_6.corrupt; resuming from iter_3" in again.stdout), again.stdout
    assert sorted(p.name for p in run.glob("iter_*")) == ["iter_3", "iter_6", "iter_6.corrupt"]
    retrained = everything(run, 6)
    assert all(torch.equal(good[key], retrained[key]) for key in good)
    record = resume_records(run)[-1]
    assert record["iter"] == 3 and record["set_aside"][0]["moved_to"] == "iter_6.corrupt"
    # The metadata's checksum: found when the checkpoint is opened, before the model is built.
    meta = run / "iter_6" / "metadata.json"
    meta.write_bytes(meta.read_bytes().replace(b'"iter_num": 6', b'"iter_num": 7'))
    third = run_train(*args(max_iters=6))
    assert third.returncode == 0, third.stderr[-2000:]
    assert "moved iter_6 aside to iter_6.corrupt.2; resuming from iter_3" in third.stdout, third.stdout
    assert all(torch.equal(good[key], value) for key, value in everything(run, 6).items())


def test_ranks_fall_back_together_when_only_one_ranks_share_is_corrupt(char_data, tmp_path, forkserver):
    """2 DeepSpeed ranks, ep_size=2: a bit flipped in rank 1's shard only. Rank 0 reads its share, rank 1
    does not; they agree, fall back together to the previous checkpoint, and retrain to the same weights."""
    ds = ds_json(tmp_path, "zero2")
    run = tmp_path / "run"
    argv = ["--deepspeed_config", ds, *tiny_args(char_data, run, init_from="auto", eval_interval=3, max_iters=6,
                                                  lr_decay_iters=9), "--ep_size=2"]
    for r in forkserver.run_ranks(2, argv):
        assert r.returncode == 0, r.stderr[-3000:]
    good = everything(run, 6)
    flip_a_weight_bit(run / "iter_6", "shard_00001.bin")
    ranks = forkserver.run_ranks(2, argv)
    for r in ranks:
        assert r.returncode == 0, r.stderr[-3000:]
    assert "moved iter_6 aside to iter_6.corrupt; resuming from iter_3" in ranks[0].stdout, ranks[0].stdout
    assert "iter_6/shard_00001.bin is corrupt" in ranks[0].stdout  # rank 1's own error, said by rank 0
    retrained = everything(run, 6)
    assert max((good[key] - retrained[key]).abs().max().item() for key in good) <= 1e-6
