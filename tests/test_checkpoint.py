"""Checkpoints: resume at another topology with the optimizer state, compatibility refusals, corrupt files.

Every resharding case trains to iteration 3, then continues from the same checkpoint
twice: at the topology it was saved at, and at another. Both continuations must take
the same next steps (losses and gradient norms to 1e-5 relative, fp32).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_args
from dist_utils import ds_json, run_ranks, start_ranks, train_rows, wait_for_iter

from nanomoe_ds import checkpoint
from nanomoe_ds.config import ConfigError, GPTConfig, from_argv
from nanomoe_ds.trainer import train

OVER = dict(eval_interval=3, grad_clip=0.5, num_experts=4, num_experts_per_tok=2, bias_update_rate=0.01)
TOPOLOGIES = {  # name: (ranks, ep_size, DeepSpeed JSON or None for the single-device trainer); fp32 unless named
    "local": (1, 1, None), "w2ep2-zero2": (2, 2, "zero2"), "w2ep1-zero2": (2, 1, "zero2"),
    "w2ep2-zero1": (2, 2, "zero1"), "w2ep2-zero0": (2, 2, "zero0"), "w2ep2-zero0-bf16": (2, 2, "zero0"),
}


def run_at(topology: str, char_data, out_dir, tmp_path, **over):
    ranks, ep_size, json_name = TOPOLOGIES[topology]
    args = tiny_args(char_data, out_dir, **{**OVER, **over})
    if json_name is None:
        model_cfg, train_cfg = from_argv(args)
        # One thread, as in the rank subprocesses (OMP_NUM_THREADS=1): a bit-for-bit comparison
        # needs the same reduction splits, and those follow the thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train(model_cfg, train_cfg)
        finally:
            torch.set_num_threads(threads)
        return
    ds = ds_json(tmp_path, json_name, bf16=topology.endswith("bf16"))
    for r in run_ranks(ranks, ["--deepspeed_config", ds, *args, f"--ep_size={ep_size}"]):
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def saved(char_data, tmp_path_factory):
    """Per source topology: a checkpoint at iteration 3, and the steps 3-6 of continuing there."""
    cache = {}

    def get(topology):
        if topology not in cache:
            base = tmp_path_factory.mktemp(topology)
            run_at(topology, char_data, base / "run", base, max_iters=3)
            shutil.copytree(base / "run", base / "at3")
            run_at(topology, char_data, base / "run", base, max_iters=6, init_from="resume")
            cache[topology] = base / "at3", train_rows(base / "run")[-4:]
        return cache[topology]
    return get


@pytest.mark.parametrize("source, target", [
    ("w2ep2-zero2", "local"),  # DeepSpeed EP=2 -> one device
    ("w2ep2-zero2", "w2ep1-zero2"),  # EP 2 -> 1 on the same ranks
    ("w2ep1-zero2", "w2ep2-zero2"),  # EP 1 -> 2
    ("local", "w2ep2-zero2"),  # one device -> DeepSpeed EP=2
    ("w2ep2-zero1", "w2ep2-zero2"),  # ZeRO-1 -> ZeRO-2
    ("w2ep2-zero2", "w2ep2-zero1"),  # ZeRO-2 -> ZeRO-1
    ("w2ep2-zero0", "local"),  # ZeRO-0, the optimizer's own parameters
    ("w2ep2-zero0-bf16", "local"),  # ZeRO-0 bf16 (the shipped zero0.json): fp32 copies; bf16 vs fp32 tolerance
])
def test_resume_at_another_topology_takes_the_same_steps(saved, char_data, tmp_path, source, target):
    at3, continued = saved(source)
    shutil.copytree(at3, tmp_path / "run")
    run_at(target, char_data, tmp_path / "run", tmp_path, max_iters=6, init_from="resume")
    resharded = train_rows(tmp_path / "run")[-4:]
    assert [r["iter"] for r in resharded] == [r["iter"] for r in continued] == [3, 4, 5, 6]
    rel = 2e-2 if source.endswith("bf16") else 1e-5
    for a, b in zip(resharded, continued):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=rel * 5)


@pytest.mark.parametrize("topology", ["local", "w2ep2-zero2"])
def test_a_resumed_run_does_not_rewrite_the_checkpoint_it_loaded(saved, char_data, tmp_path, topology):
    """Resumed at an eval-aligned iteration with always_save_checkpoint (nanoGPT's default), a run evaluates
    but saves only after it has trained: a kill then cannot truncate the checkpoint it came from."""
    import hashlib
    at3, _ = saved(topology)
    out = tmp_path / "run"
    shutil.copytree(at3, out)

    def digests():
        return {p.relative_to(out): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file() and p.name != "metrics.jsonl"}
    before = digests()
    before_rows = len(open(out / "metrics.jsonl").readlines())
    run_at(topology, char_data, out, tmp_path, max_iters=3, init_from="resume")  # eval at 3, train 3, stop
    resumed = [json.loads(line) for line in open(out / "metrics.jsonl").readlines()[before_rows:]]
    assert [(r["iter"], "val_loss" in r) for r in resumed] == [(3, True), (3, False)]
    assert digests() == before  # ckpt.pt and DeepSpeed's iter_3/ files, byte for byte


def test_checkpoint_records_topology(saved):
    at3, _ = saved("w2ep2-zero2")
    ck = torch.load(at3 / "ckpt.pt", weights_only=False)
    assert ck["topology"] == {"engine": "deepspeed", "world_size": 2, "ep_size": 2, "zero_stage": 2,
                              "dtype": "float32"}
    assert ck["model"]["transformer.h.0.mlp.experts.w_in"].shape[0] == 4  # whole tensors: every expert
    moments = ck["optimizer_state"]["moments"]["transformer.h.0.mlp.experts.w_in"]
    assert moments["exp_avg"].shape[0] == 4 and moments["exp_avg_sq"].abs().sum() > 0
    assert ck["optimizer_state"]["step"] == 3


# ------------------------------------------------------------ compatibility and corruption, in-process
def test_resume_refuses_contradicting_shape_keys_in_one_line():
    saved_args = vars(GPTConfig(n_layer=2, n_embd=32, n_head=2, use_moe=True, num_experts=4))
    asked = GPTConfig(n_layer=3, n_embd=32, n_head=2, use_moe=True, num_experts=8, dropout=0.1)
    with pytest.raises(ConfigError) as e:
        checkpoint.resume_model_config(saved_args, asked, given={"n_layer", "num_experts", "dropout"})
    assert str(e.value) == ("init_from=resume: n_layer=3 (checkpoint: 2), num_experts=8 (checkpoint: 4) contradict "
                            "the checkpoint's model; drop them to resume, or train a new model in another out_dir")


def test_resume_takes_shape_from_checkpoint_and_the_rest_from_the_command_line():
    saved_args = vars(GPTConfig(n_layer=2, n_embd=32, n_head=2, use_moe=True, num_experts=4, dropout=0.0))
    asked = GPTConfig(n_layer=12, dropout=0.1)  # defaults, not given: follow the checkpoint
    got = checkpoint.resume_model_config(saved_args, asked, given={"dropout"})
    assert (got.n_layer, got.num_experts, got.use_moe, got.dropout) == (2, 4, True, 0.1)


def test_resume_keeps_the_checkpoints_activation():
    """An upcycled GPT-2 trains with gelu_tanh; resuming it must not fall back to the default exact GELU."""
    saved_args = vars(GPTConfig(n_layer=2, n_embd=32, n_head=2, activation="gelu_tanh"))
    assert checkpoint.resume_model_config(saved_args, GPTConfig(), given=set()).activation == "gelu_tanh"
    del saved_args["activation"]  # a checkpoint from before the key: exact GELU, as it was trained
    assert checkpoint.resume_model_config(saved_args, GPTConfig(activation="gelu_tanh"), set()).activation == "gelu"


def test_truncated_checkpoint_is_one_line_error(char_data, tmp_path):
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, max_iters=3))
    train(model_cfg, train_cfg)
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"left by a killed save")
    for script in (["launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume")],
                   ["launch/sample.py", f"--out_dir={tmp_path}", "--device=cpu"]):
        r = subprocess.run([sys.executable, *script], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.startswith(f"error: cannot read {tmp_path / 'ckpt.pt'}: it is truncated or corrupt (")
        assert r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "ckpt.pt.tmp").exists()  # cleaned up


def test_cli_resume_with_another_shape_is_refused(char_data, tmp_path):
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, max_iters=3))
    train(model_cfg, train_cfg)
    r = subprocess.run([sys.executable, "launch/train.py", *tiny_args(char_data, tmp_path, init_from="resume"),
                        "--n_layer=4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr == ("error: init_from=resume: n_layer=4 (checkpoint: 2) contradict the checkpoint's model; "
                        "drop them to resume, or train a new model in another out_dir\n")


# ------------------------------------------------------------ faults, with real processes
def digest(out_dir) -> dict:
    """What a resume would read: ckpt.pt, latest and the DeepSpeed directories, by content hash."""
    import hashlib
    files = [p for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != "metrics.jsonl"]
    return {str(p.relative_to(out_dir)): hashlib.sha1(p.read_bytes()).hexdigest() for p in files}


@pytest.mark.parametrize("topology", ["local", "w2ep2-zero2"])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(char_data, tmp_path, topology):
    run_at(topology, char_data, tmp_path / "run", tmp_path, max_iters=3)
    before = digest(tmp_path / "run")
    ranks, ep_size, json_name = TOPOLOGIES[topology]
    args = [*tiny_args(char_data, tmp_path / "run", **{**OVER, "max_iters": 30, "init_from": "resume",
                                                        "learning_rate": 1e9, "min_lr": 0.0,
                                                        "always_save_checkpoint": False})]
    if json_name:
        args = ["--deepspeed_config", ds_json(tmp_path, json_name), *args, f"--ep_size={ep_size}"]
    res = run_ranks(ranks, args)
    assert [r.returncode for r in res] == [3] * ranks, res[0].stderr[-2000:]
    line = res[0].stderr.strip().splitlines()[-1]
    prefix = "error: rank 0: " if ranks > 1 else "error: "  # a multi-rank job's lines name their rank
    assert line.startswith(prefix + "non-finite loss (nan) at iteration 4: training stopped and nothing of it was saved")
    assert digest(tmp_path / "run") == before  # ckpt.pt, latest and every iter_N file untouched


@pytest.mark.parametrize("topology, signal_rank", [("local", 0), ("w2ep2-zero2", 1)])
def test_sigterm_saves_and_resume_continues_exactly(char_data, tmp_path, topology, signal_rank):
    """SIGTERM to one rank mid-run: every rank finishes the step and saves; the resumed run
    takes the uninterrupted run's steps (bit for bit on one device, 1e-6 under DeepSpeed)."""
    import signal
    last = 40  # room for the signal to land mid-run: a one-device step takes ~20 ms, the poll 100 ms
    run_at(topology, char_data, tmp_path / "full", tmp_path, max_iters=last, eval_interval=100)
    full = {r["iter"]: r["loss"] for r in train_rows(tmp_path / "full")}
    ranks, ep_size, json_name = TOPOLOGIES[topology]
    args = tiny_args(char_data, tmp_path / "part", **{**OVER, "max_iters": last, "eval_interval": 100})
    if json_name:
        args = ["--deepspeed_config", ds_json(tmp_path, json_name), *args, f"--ep_size={ep_size}"]
    procs = start_ranks(ranks, args)
    try:
        wait_for_iter(tmp_path / "part", 4, procs)
        procs[signal_rank].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * ranks, outs[0][1][-2000:]
    stop_line = next(line for line in outs[0][0].splitlines() if line.startswith("stopped by"))
    stopped_at = int(stop_line.split("before iteration ")[1].split(";")[0])
    assert 4 < stopped_at < last
    resume = [*args, "--init_from=resume"]
    for r in run_ranks(ranks, resume):
        assert r.returncode == 0, r.stderr[-2000:]
    resumed = {r["iter"]: r["loss"] for r in train_rows(tmp_path / "part")[-(last + 1 - stopped_at):]}
    assert sorted(resumed) == list(range(stopped_at, last + 1))
    for it, loss in resumed.items():
        if json_name:
            assert loss == pytest.approx(full[it], rel=1e-6)
        else:
            assert loss == full[it]  # bit for bit


@pytest.mark.parametrize("victim, delay", [(0, 0.0), (0, 0.15), (1, 0.05), (1, 0.3)])
def test_kill_during_saves_then_resume_from_newest_complete(char_data, tmp_path, victim, delay):
    """A save every iteration, so a kill -9 at these moments usually lands inside one. Whatever
    it hits, resume works, from the newest checkpoint whose files all exist."""
    import time
    args = ["--deepspeed_config", ds_json(tmp_path, "zero2"),
            *tiny_args(char_data, tmp_path / "run", **{**OVER, "max_iters": 1000, "eval_interval": 1}), "--ep_size=2"]
    procs = start_ranks(2, args)
    try:
        wait_for_iter(tmp_path / "run", 3, procs)
        time.sleep(delay)
        procs[victim].kill()
        procs[1 - victim].wait(timeout=60)  # the survivor's collectives fail: it ends too
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    committed = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["iter_num"]
    resume = [a if not a.startswith("--max_iters") else f"--max_iters={committed + 1}" for a in args]
    res = run_ranks(2, [*resume, "--init_from=resume"])
    assert [r.returncode for r in res] == [0, 0], res[0].stderr[-3000:]
    assert f"resuming from iter_{committed} (DeepSpeed's files, same topology)" in res[0].stdout
    assert not (tmp_path / "run" / "ckpt.pt.tmp").exists()
    dirs = sorted(p.name for p in (tmp_path / "run").glob("iter_*"))
    assert len(dirs) <= OVER.get("keep_last", 2), dirs  # pruned, incomplete ones included
