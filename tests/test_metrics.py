"""metrics.py: the peak table and MFU, routing statistics, and the sinks read back (wandb offline, TensorBoard)."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest

from conftest import REPO, tensorboard_scalars, tiny_args, wandb_history

from nanomoe_ds import metrics
from nanomoe_ds.config import ConfigError, GPTConfig, from_argv
from nanomoe_ds.model import GPT
from nanomoe_ds.start import build_model
from nanomoe_ds.trainer import train


@pytest.mark.parametrize("name, dtype, tf32, want_tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", False, 989.5),  # SXM
    ("NVIDIA H100 PCIe", "bfloat16", False, 756.5),
    ("NVIDIA H200", "float16", False, 989.5),
    ("NVIDIA A100-SXM4-80GB", "float32", False, 19.5),  # plain fp32 unless TF32 is allowed
    ("NVIDIA A100-SXM4-80GB", "float32", True, 156.0),
    ("NVIDIA A10G", "bfloat16", False, 70.0),  # not the A10's row, nor the A100's
    ("NVIDIA A10", "bfloat16", False, 125.0),
    ("NVIDIA L40S", "bfloat16", False, 366.0),  # not the L4's row
    ("NVIDIA L4", "bfloat16", False, 121.0),
    ("Tesla V100-SXM2-16GB", "float32", True, 15.7),  # no TF32 units: fp32 stays fp32
    ("Tesla V100-SXM2-16GB", "bfloat16", False, None),  # no bf16 units
    ("cpu", "float32", False, None),
    ("Some Future GPU", "bfloat16", False, None),
])
def test_peak_table(name, dtype, tf32, want_tflops):
    peak = metrics.peak_flops(name, dtype, tf32)
    assert peak == (None if want_tflops is None else want_tflops * 1e12)


def test_peak_tflops_overrides_the_table():
    assert metrics.peak_flops("cpu", "float32", override_tflops=2.5) == 2.5e12
    assert metrics.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16", override_tflops=500) == 500e12
    with pytest.raises(ConfigError, match="peak_tflops must be >= 0"):
        from_argv(["--peak_tflops=-1"])


def test_mfu_by_hand():
    # A 1-layer, 1-head dense GPT, n_embd 4, block 8, vocab 10, no biases. Non-embedding parameters
    # (the tied wte counts, wpe does not): wte 40 + ln_1 4 + c_attn 48 + c_proj 16 + ln_2 4 + c_fc 64
    # + mlp c_proj 64 + ln_f 4 = 244. FLOPs per token = 6 * 244 + 12 * L * H * Q * T = 1464 + 12*1*1*4*8 = 1848.
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=4, block_size=8, vocab_size=10, bias=False))
    assert model.flops_per_token() == 1848
    # An H100 SXM in bf16 (989.5 TFLOP/s); this rank processes 1e11 tokens/s: 1848e11 / 989.5e12.
    peak = metrics.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16")
    assert metrics.mfu(1848, 1e11, peak) == pytest.approx(0.18676099, rel=1e-6)
    assert metrics.mfu(1848, 1e11, None) is None


def test_scalars_flattens_moe_layers():
    rec = {"iter": 3, "loss": 2.0, "mfu": None, "moe": [{"load_cv": 0.5, "tokens_per_expert": [1, 2]}]}
    assert metrics.scalars(rec) == {"iter": 3, "loss": 2.0, "moe/layer0/load_cv": 0.5}


def test_routing_tally_sums_micro_batches(char_data, tmp_path):
    """The logged counts are the step's: every micro-batch, and with bias balancing the bias spread."""
    m, t = from_argv(tiny_args(char_data, tmp_path, max_iters=3, eval_interval=100, bias_update_rate=0.01,
                               gradient_accumulation_steps=3))
    train(m, t)
    rows = [r for r in map(json.loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
    for r in rows:
        for layer in r["moe"]:
            assert sum(layer["tokens_per_expert"]) == 3 * 4 * 32 * 2  # 3 micro-batches of 4 x 32 tokens, top-2
            # each update moves every bias by at most the rate (sign rule), up or down
            assert 0 <= layer["bias_spread"] <= 2 * 0.01 * (r["iter"] + 1) + 1e-6
    assert rows[-1]["moe"][0]["bias_spread"] > 0  # the bias moved


def test_sinks_read_back_single_device(char_data, tmp_path, monkeypatch):
    """wandb (offline) and TensorBoard get every logged step; wandb is finished; MFU uses peak_tflops."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out, tb = tmp_path / "out", tmp_path / "tb"
    m, t = from_argv(tiny_args(char_data, out, max_iters=6, wandb_log=True, tensorboard_dir=str(tb),
                               peak_tflops=0.001))
    train(m, t)
    rows = [r for r in map(json.loads, open(out / "metrics.jsonl")) if "loss" in r]
    history, finished = wandb_history(out)
    assert finished  # run.finish() was called: the exit record is in the file
    logged = {h["_step"]: h for h in history if "loss" in h}
    assert sorted(logged) == [r["iter"] for r in rows]
    for r in rows:
        assert logged[r["iter"]]["loss"] == pytest.approx(r["loss"])
        assert logged[r["iter"]]["moe/layer1/load_cv"] == pytest.approx(r["moe"][1]["load_cv"])
    scalars = tensorboard_scalars(tb)
    assert [s for s, _ in scalars["loss"]] == [r["iter"] for r in rows]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows])
    assert "val_loss" in scalars and "moe/layer0/drop_frac" in scalars
    # MFU on one device against 1 GFLOP/s: flops per token * tokens/s / peak at the first measured step (5)
    flops = build_model(m, t).flops_per_token()
    r5 = next(r for r in rows if r["iter"] == 5)
    assert r5["mfu"] == pytest.approx(flops * r5["tokens_per_sec"] / 1e9, rel=1e-9)
    assert all(r["mfu"] is None for r in rows if r["iter"] < 5)


def test_missing_sink_package_is_refused(char_data, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    m, t = from_argv(tiny_args(char_data, tmp_path, wandb_log=True))
    with pytest.raises(ConfigError, match=r"pip install -e \.\[wandb\]"):
        train(m, t)


def run_in_terminal(argv: list[str], timeout: float = 120, launcher: list[str] | None = None, env=None) -> str:
    """Run launch/train.py (under `launcher`, if given) with a pseudo-terminal as stdout; return what it wrote there."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    command = [*(launcher or [sys.executable]), str(REPO / "launch/train.py"), *argv]
    proc = subprocess.Popen(command, cwd=REPO, stdout=follower, stderr=subprocess.DEVNULL,
                            env=dict(env or os.environ, PYTHONPATH=str(REPO)))
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=timeout)
    os.close(leader)
    assert proc.returncode == 0
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_only_in_a_terminal_and_when_asked(char_data, tmp_path, capsys, progress):
    text = run_in_terminal(tiny_args(char_data, tmp_path, max_iters=4, progress=progress))
    has_bar = "5/5 [" in text  # tqdm's "n/total [elapsed<remaining, rate, postfix]"
    assert has_bar == progress
    assert "iter 4: loss" in text  # the log lines still come through
    if not progress:
        return
    # never to a pipe (log files, CI), even when asked for: the same loop in this process, its stdout captured
    m, t = from_argv(tiny_args(char_data, tmp_path / "p", max_iters=1, progress=True))
    train(m, t)
    piped = capsys.readouterr().out
    assert "iter 1: loss" in piped and "it/s" not in piped and "s/it" not in piped


def test_progress_bar_under_the_deepspeed_launcher(char_data, tmp_path):
    """The README's 2-rank command in a terminal: rank 0 draws the bar (the launcher passes its terminal on)."""
    from dist_utils import free_port, loopback_env
    text = run_in_terminal(["--deepspeed_config", str(REPO / "ds_configs/zero2.json"),
                            *tiny_args(char_data, tmp_path, max_iters=4), "--ep_size=2"], timeout=300,
                           launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())],
                           env=loopback_env())
    assert "5/5 [" in text and "iter 4: loss" in text


def test_read_run_keeps_the_later_record_of_a_resumed_iteration(tmp_path):
    from nanomoe_ds.metrics import read_run
    records = [{"iter": 0, "val_loss": 4.0, "train_loss": 4.1}, {"iter": 0, "loss": 4.2}, {"iter": 1, "loss": 3.9},
               {"iter": 2, "loss": 3.5}, {"iter": 2, "val_loss": 3.6, "train_loss": 3.5},
               {"iter": 2, "val_loss": 3.7, "train_loss": 3.6}, {"iter": 2, "loss": 3.4}]  # resumed at 2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    train, evals = read_run(str(tmp_path))
    assert [(r["iter"], r["loss"]) for r in train] == [(0, 4.2), (1, 3.9), (2, 3.4)]
    assert [(r["iter"], r["val_loss"]) for r in evals] == [(0, 4.0), (2, 3.7)]
    with pytest.raises(ConfigError, match=f"^no metrics.jsonl in {tmp_path}/nothing; train first or check --out_dir"):
        read_run(str(tmp_path / "nothing"))


def test_a_resume_record_says_what_changed_and_what_was_lost(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for it in range(25):
            f.write(json.dumps({"iter": it, "loss": 1.0}) + "\n")
        f.write('{"iter": 25, "lo')  # a line cut by the kill
    os.utime(tmp_path / "metrics.jsonl", (0, __import__("time").time() - 7))
    saved = {"world_size": 2, "ep_size": 2}
    now = {"world_size": 1, "ep_size": 1}
    record = metrics.resume_record(str(tmp_path), 20, saved, now)
    assert record["event"] == "resume" and record["iter"] == 20
    assert (record["from"], record["to"]) == (saved, now)
    assert record["redone_iters"] == 5  # iterations 20-24 were trained after the checkpoint
    assert 6.5 < record["lost_s"] < 30
    assert metrics.describe_resume(record).startswith("resumed at iteration 20: world size 2 -> 1, ep_size 2 -> 1; ")
    fresh = metrics.resume_record(str(tmp_path / "none"), 0, saved, saved)
    assert (fresh["lost_s"], fresh["redone_iters"]) == (None, 0)


def test_read_run_skips_restart_records(tmp_path):
    lines = [{"iter": 0, "val_loss": 2.0}, {"iter": 0, "loss": 2.1}, {"iter": 1, "loss": 2.0},
             {"event": "resume", "iter": 1, "from": {}, "to": {}, "lost_s": 1.0, "redone_iters": 0},
             {"iter": 1, "loss": 1.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    train_rows, evals = metrics.read_run(str(tmp_path))
    assert [r["loss"] for r in train_rows] == [2.1, 1.9] and evals == [lines[0]]


def test_a_line_cut_by_a_full_disk_is_ended_and_skipped_by_readers(tmp_path):
    """A run stopped mid-record (a full disk wrote part of a line): the next run's first record starts a line
    of its own, and read_run and last_record skip the cut one."""
    from nanomoe_ds.metrics import JsonlSink, last_record, read_run
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"iter": 0, "loss": 2.0}) + '\n{"iter": 1, "lo')
    sink = JsonlSink(str(tmp_path))
    sink.log({"iter": 1, "loss": 1.5})
    sink.log({"iter": 2, "loss": 1.25})
    assert (tmp_path / "metrics.jsonl").read_text().splitlines()[1:] == [
        '{"iter": 1, "lo', '{"iter": 1, "loss": 1.5}', '{"iter": 2, "loss": 1.25}']
    train, _ = read_run(str(tmp_path))
    assert [(r["iter"], r["loss"]) for r in train] == [(0, 2.0), (1, 1.5), (2, 1.25)]
    assert last_record(str(tmp_path))[0] == {"iter": 2, "loss": 1.25}


def test_a_record_the_disk_cannot_hold_leaves_metrics_jsonl_whole(tmp_path):
    """On a full tmpfs the write fails (the run then stops in one line) and takes back what part of the
    line it wrote: the file ends with the previous record."""
    script = f"""
mount -t tmpfs -o size=8k tmpfs {tmp_path}
{sys.executable} - <<'PY'
import errno, json, os, sys
sys.path.insert(0, {str(REPO)!r})
from nanomoe_ds.metrics import JsonlSink
sink = JsonlSink({str(tmp_path)!r})
sink.log({{"iter": 0, "loss": 2.0}})
with open(os.path.join({str(tmp_path)!r}, "ballast"), "wb") as f:  # fill the disk but a few bytes
    try:
        f.write(b"x" * 65536)
    except OSError:
        pass
try:
    sink.log({{"iter": 1, "loss": 1.5, "note": "y" * 8192}})
    print("written")
except OSError as e:
    print("refused", errno.errorcode[e.errno])
print(repr(open(sink.path).read()))
PY
"""
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-euc", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["refused ENOSPC", repr(json.dumps({"iter": 0, "loss": 2.0}) + "\n")]
