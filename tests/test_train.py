"""End to end on the CPU: the loop, metrics.jsonl, checkpoints, resume and sampling."""
import json
import subprocess
import sys

import pytest

from nanomoe_ds.config import ConfigError, from_argv
from nanomoe_ds.local_engine import LocalEngine
from nanomoe_ds.trainer import get_lr, train

from conftest import REPO, tiny_args


def run_tiny(char_data, out, **over):
    m, t = from_argv(tiny_args(char_data, out, **over))
    return train(m, t)


def read_metrics(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_loss_falls_and_metrics_are_logged(char_data, tmp_path):
    res = run_tiny(char_data, tmp_path, max_iters=30, lr_decay_iters=30, eval_interval=30, learning_rate=3e-3)
    losses = res["train_losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    rows = read_metrics(tmp_path)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert len(train_rows) == 31 and [r["iter"] for r in eval_rows] == [0, 30]
    r = train_rows[-1]
    for key in ("iter", "loss", "ce_loss", "aux_loss", "z_loss", "lr", "tokens_per_sec", "grad_norm", "moe"):
        assert key in r
    assert r["loss"] > r["ce_loss"]  # the aux term is part of the training loss
    moe = r["moe"][0]
    # the whole step's routing: batch 4 x block 32 x top-2, over both accumulated micro-batches
    assert sum(moe["tokens_per_expert"]) == 4 * 32 * 2 * 2 and moe["drop_frac"] == 0.0
    assert r["mfu"] is None  # no peak for a CPU unless peak_tflops is given
    assert {"load_cv", "load_max_over_mean", "dead_experts", "aux_loss", "z_loss"} <= moe.keys()
    assert (tmp_path / "iter_30" / "metadata.json").exists()
    # train_s: cumulative step time, without the evals (iteration 0's time_ms includes one)
    train_s = [row["train_s"] for row in train_rows]
    assert all(b > a for a, b in zip(train_s, train_s[1:]))
    assert 0 < train_s[-1] < sum(row["time_ms"] for row in train_rows) / 1000
    assert eval_rows[0]["train_s"] == 0 and eval_rows[1]["train_s"] == train_s[29]  # the steps before each eval


def test_resume_reproduces_uninterrupted_losses(char_data, tmp_path):
    """Stop at iteration 3, resume, and get the same fp32 losses as a run that never stopped."""
    full = run_tiny(char_data, tmp_path / "full", dropout=0.1, router_jitter=0.1)["train_losses"]
    part = tmp_path / "part"
    run_tiny(char_data, part, dropout=0.1, router_jitter=0.1, max_iters=3)  # checkpoint at iter 3
    first_run = read_metrics(part)
    saved_s = next(r["train_s"] for r in first_run if r["iter"] == 2 and "loss" in r)  # iterations 0-2
    res = run_tiny(char_data, part, dropout=0.1, router_jitter=0.1, init_from="resume")
    assert res["train_losses"] == pytest.approx(full[3:], rel=1e-6, abs=0)
    event, *resumed = read_metrics(part)[len(first_run):]
    assert event["event"] == "resume" and event["iter"] == 3  # the restart's own record, first
    # train_s carries on from the checkpoint: the eval at iteration 3 reports the steps before it
    assert resumed[0]["val_loss"] and resumed[0]["train_s"] == saved_s
    assert all(r["train_s"] > saved_s for r in resumed if "loss" in r)


def test_resume_keeps_router_bias(char_data, tmp_path):
    run_tiny(char_data, tmp_path, bias_update_rate=0.01, max_iters=3)
    from nanomoe_ds import checkpoint_dir
    bias = checkpoint_dir.open_checkpoint(str(tmp_path)).whole("model/transformer.h.0.mlp.router.score_bias")
    assert bias.abs().sum() > 0  # moved by the sign rule, and saved


def test_lr_schedule():
    m, t = from_argv(["--learning_rate=1.0", "--min_lr=0.1", "--warmup_iters=10", "--lr_decay_iters=110"])
    assert get_lr(0, t) == pytest.approx(1 / 11)
    assert get_lr(10, t) == pytest.approx(1.0)
    assert get_lr(60, t) == pytest.approx(0.55)
    assert get_lr(200, t) == pytest.approx(0.1)


def test_missing_data_is_refused_before_compute(tmp_path):
    m, t = from_argv(tiny_args(tmp_path / "nothing", tmp_path))
    with pytest.raises(ConfigError, match="missing .*train.bin; run data/nothing/prepare.py first"):
        train(m, t)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout)


@pytest.mark.parametrize("argv, msg", [
    (["--n_layers=2"], "error: unknown config key 'n_layers'; did you mean n_layer"),
    (["--device=cpu", "--dtype=float17"], "error: unknown dtype 'float17'; choose auto, float32, bfloat16 or float16"),
    pytest.param(["--device=cuda"], "error: --device=cuda but CUDA is not available here; use --device=cpu",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")),
])
def test_cli_refusals_are_one_line(char_data, tmp_path, argv, msg):
    r = cli("launch/train.py", *tiny_args(char_data, tmp_path), *argv)
    assert r.returncode == 2 and r.stderr.startswith(msg), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_cli_train_then_sample(char_data, tmp_path):
    r = cli("launch/train.py", "launch/config/train_shakespeare_char.py", *tiny_args(char_data, tmp_path),
            "--max_iters=3", "--eval_interval=3")
    assert r.returncode == 0, r.stderr
    assert "step 3: train loss" in r.stdout
    r = cli("launch/sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--num_samples=2",
            "--max_new_tokens=20", "--start=ROMEO:")
    assert r.returncode == 0, r.stderr
    samples = [s for s in r.stdout.split("---------------") if "ROMEO:" in s]
    assert len(samples) == 2
    r = cli("launch/sample.py", f"--out_dir={tmp_path / 'none'}", "--device=cpu")
    assert r.returncode == 2 and r.stderr.startswith("error: no checkpoint in")


def test_finetune_from_local_gpt2(char_data, tmp_path):
    """init_from=<local HF dir>: nanoGPT's fine-tuning path, offline, with a tiny GPT-2 built here."""
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=65, n_positions=64)).save_pretrained(tmp_path / "hf")
    res = run_tiny(char_data, tmp_path / "out", init_from=str(tmp_path / "hf"), use_moe=False, max_iters=2, eval_interval=2)
    assert len(res["train_losses"]) == 3
    ck = __import__("nanomoe_ds.checkpoint_dir").checkpoint_dir.open_checkpoint(str(tmp_path / "out")).meta
    assert ck["model_args"]["block_size"] == 32  # cropped from the pretrained 64
    # use_moe=True upcycles it: the step-0 losses are the dense model's
    run_tiny(char_data, tmp_path / "moe", init_from=str(tmp_path / "hf"), max_iters=0, eval_interval=2)
    step0 = [[r for r in read_metrics(out) if "val_loss" in r][0] for out in (tmp_path / "out", tmp_path / "moe")]
    assert step0[1]["val_loss"] == pytest.approx(step0[0]["val_loss"], rel=1e-5)
    with pytest.raises(ConfigError, match=r"^block_size \(128\) exceeds the context of init_from '.*' \(64\)"):
        run_tiny(char_data, tmp_path / "long", init_from=str(tmp_path / "hf"), block_size=128)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_trains_in_auto_dtype(char_data, tmp_path, compile):
    """On a GPU: dtype=auto (bf16 where there is one), with and without torch.compile; the loss falls."""
    res = run_tiny(char_data, tmp_path, device="cuda", dtype="auto", compile=compile, max_iters=30,
                   lr_decay_iters=30, eval_interval=30, learning_rate=3e-3)
    losses = res["train_losses"]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    rows = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert rows[-1]["peak_mem_gib"] > 0


@pytest.mark.parametrize("again", ["late", "third"])
def test_preemption_duplicates_wait_and_a_later_or_third_signal_stops_at_once(again):
    """A first signal only sets the flag; a different one, or the same one again at once (a group kill
    plus the launcher's forward), keeps waiting; the same one after the window, or a third time, is final."""
    import os
    import signal
    from nanomoe_ds.preemption import Preemption
    original = signal.getsignal(signal.SIGUSR1)
    preemption = Preemption()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the handler: the process lives on
        os.kill(os.getpid(), signal.SIGTERM)  # e.g. the launcher forwarding the user's Ctrl-C
        os.kill(os.getpid(), signal.SIGUSR1)  # the same request again, within the window
        assert preemption.requested == "SIGUSR1" and set(preemption.received) == {"SIGUSR1", "SIGTERM"}
        assert preemption.previous, "a duplicate must not stop the process"
        preemption.previous[signal.SIGUSR1] = signal.SIG_IGN  # what "at once" re-raises into, made harmless
        if again == "late":
            first, times = preemption.received["SIGUSR1"]
            preemption.received["SIGUSR1"] = (first - Preemption.DUPLICATE_WINDOW_S - 1, 1)  # as if long ago
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preemption.previous == {}  # handlers restored and the signal re-raised
        assert signal.getsignal(signal.SIGTERM) != preemption._handle
    finally:
        preemption.restore()
        signal.signal(signal.SIGUSR1, original)


def test_the_entry_scripts_handlers_outlive_the_loop():
    """launch/train.py installs the handlers for the process's life; the loop installs and releases its own
    use. Releasing the loop's must keep them: a signal while a completed run shuts down is not fatal."""
    import signal
    from nanomoe_ds.preemption import Preemption
    original = signal.getsignal(signal.SIGTERM)
    entry = Preemption.install()
    try:
        loop = Preemption.install()
        assert loop is entry
        loop.release()
        assert signal.getsignal(signal.SIGTERM) == entry._handle
    finally:
        entry.release()
    assert signal.getsignal(signal.SIGTERM) == original  # the last release restores


def test_a_stop_asked_during_a_step_is_read_after_its_update(char_data, tmp_path):
    """The flag is read once the optimizer has stepped: a signal during step i stops after step i, not i+1."""
    import torch
    from nanomoe_ds import trainer
    from nanomoe_ds.data import Batches
    from nanomoe_ds.model import GPT
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, vocab_size=65))
    engine = LocalEngine(GPT(model_cfg), train_cfg, "cpu", torch.float32)
    batches = Batches(str(char_data), model_cfg.block_size, train_cfg.batch_size, "cpu", train_cfg.seed)
    weight = engine.module.lm_head.weight
    before = weight.detach().clone()
    seen = []
    _, _, stop = trainer.train_step(engine, batches, 0, 1e-3,
                                    lambda: seen.append(not torch.equal(weight, before)) or True, None)
    assert seen == [True] and stop


def test_fp16_overflow_is_a_skipped_step_not_a_divergence(tmp_path):
    """GradScaler skips an overflowing step and lowers the scale; step() must not report an inf norm
    (the NaN guard would stop a healthy fp16 run at its first overflow)."""
    import torch

    from nanomoe_ds.model import GPT
    from nanomoe_ds.trainer import check_finite
    model_cfg, train_cfg = from_argv(tiny_args(tmp_path, tmp_path, vocab_size=65))
    torch.manual_seed(0)
    engine = LocalEngine(GPT(model_cfg), train_cfg, "cpu", torch.float16)
    x = torch.randint(0, 65, (2, model_cfg.block_size))
    _, loss = engine.forward(x, x)
    engine.backward(loss)
    weight = engine.module.lm_head.weight
    weight.grad[0, 0] = float("inf")
    before, scale = weight.detach().clone(), engine.scaler.get_scale()
    assert engine.step(1e-3) is None
    check_finite({"gradient norm": None}, 0, str(tmp_path))  # nothing to stop for
    assert torch.equal(weight.detach(), before) and engine.scaler.get_scale() < scale
    _, loss = engine.forward(x, x)  # the next, finite step is applied and reports its norm
    engine.backward(loss)
    norm = engine.step(1e-3)
    assert norm is not None and norm > 0 and not torch.equal(weight.detach(), before)


# What makes a GPU's host wait for the device: reading a value (item, float, bool: all
# _local_scalar_dense) and ops whose output size depends on the data. On a CPU nothing waits,
# but the same ops are dispatched, so counting them here counts what a GPU step would wait for.
HOST_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten._unique2.default", "aten.unique_consecutive.default", "aten.bincount.default"}
BY_MASK = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}  # reads when indexed by a bool mask


def count_host_reads():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = str(func)
            if (name in HOST_READS or (name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None)
                    or (name in BY_MASK and any(i is not None and i.dtype == torch.bool for i in args[1]))):
                self.reads.append(name)  # (indexing by a boolean mask sizes its output from the mask's contents)
            return func(*args, **kwargs)
    return HostReads()


@pytest.mark.parametrize("over, reads", [
    ({}, 0), ({"bias_update_rate": 1e-3, "num_shared_experts": 1}, 0), ({"use_moe": False}, 0),
    ({"capacity_factor": 1.0}, 2),  # a capacity drop keeps rows by a mask: one read per MoE layer
])
def test_a_training_step_reads_the_host_once(char_data, tmp_path, monkeypatch, over, reads):
    """The single-device step with a GPU's expert kernel (grouped_mm): dropless forward, backward,
    clip, AdamW and bias balancing read nothing on the host; losses, stop flag and gradient norm
    come over in one copy (trainer.to_host)."""
    import torch

    from nanomoe_ds import trainer
    from nanomoe_ds.data import Batches
    from nanomoe_ds.model import GPT
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, moe_impl="grouped_mm", vocab_size=65, **over))
    torch.manual_seed(0)
    engine = LocalEngine(GPT(model_cfg), train_cfg, "cpu", torch.float32)
    batches = Batches(str(char_data), model_cfg.block_size, train_cfg.batch_size, "cpu", train_cfg.seed)
    reads_before_copy = []
    monkeypatch.setattr(trainer, "to_host", lambda t: reads_before_copy.append(list(counter.reads)) or t.cpu())
    for it in range(2):
        with count_host_reads() as counter:
            losses, norm, stop = trainer.train_step(engine, batches, it, 1e-3, lambda: it == 1, None)
        assert len(reads_before_copy[-1]) == reads * 2  # per micro-batch: nothing else waited for the device
        assert losses.shape == (4,) and norm > 0 and stop == (it == 1)
    assert len(reads_before_copy) == 2  # one copy per step


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="CUDA is not available")
def test_cuda_step_syncs_only_in_to_host(char_data, tmp_path, monkeypatch):
    """On a GPU, CUDA's sync debug mode errors on any synchronising call in a grouped_mm step but the one copy."""
    import torch

    from nanomoe_ds import trainer
    from nanomoe_ds.data import Batches
    from nanomoe_ds.model import GPT
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, moe_impl="grouped_mm", vocab_size=65,
                                               device="cuda", n_embd=64))
    torch.manual_seed(0)
    engine = LocalEngine(GPT(model_cfg), train_cfg, "cuda", torch.bfloat16)
    batches = Batches(str(char_data), model_cfg.block_size, train_cfg.batch_size, "cuda", train_cfg.seed)

    def to_host(tensor):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return tensor.cpu()
        finally:
            torch.cuda.set_sync_debug_mode("error")
    monkeypatch.setattr(trainer, "to_host", to_host)
    trainer.train_step(engine, batches, 0, 1e-3, lambda: False, None)  # warm-up: lazy state, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        losses, norm, _ = trainer.train_step(engine, batches, 1, 1e-3, lambda: False, None)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert losses.shape == (4,) and norm > 0


def test_rank_0_picks_the_source_runs_checkpoint_and_every_rank_loads_that_one(char_data, tmp_path):
    """init_from=<a dense run>: rank 0 chooses the source's newest checkpoint (choose_start) and the ranks
    build from that iteration, not each from whatever is newest when it looks (the source may be saving)."""
    import torch
    from nanomoe_ds import checkpoint_dir
    from nanomoe_ds.start import build_model, choose_start
    source = tmp_path / "dense"
    run_tiny(char_data, source, use_moe=False, max_iters=6, eval_interval=3)
    m, t = from_argv(tiny_args(char_data, tmp_path / "moe", init_from=str(source)))
    assert choose_start(t) == (str(source), 6)
    model = build_model(m, t, 3)  # as if rank 0 had chosen iteration 3
    older = checkpoint_dir.open_checkpoint(str(source), 3)
    expert = model.transformer.h[0].mlp.experts.w_in[0]  # upcycled: every expert starts as the dense MLP
    torch.testing.assert_close(expert, older.whole("model/transformer.h.0.mlp.c_fc.weight").t(), rtol=0, atol=0)


def test_a_signal_during_start_up_stops_cleanly_after_the_first_step(char_data, tmp_path):
    """SIGUSR1 while the process is still importing and starting (SLURM's time-limit warning can come at
    any moment): the handler is already in, so the run trains one step, saves and exits 0 (a requeue trap
    acts on that) instead of being killed by the signal's default action."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, "launch/train.py", *tiny_args(char_data, tmp_path, max_iters=50)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while True:  # the handler is in once the kernel lists SIGUSR1 among the caught signals
        caught = next(line for line in open(f"/proc/{proc.pid}/status") if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) >> (signal.SIGUSR1 - 1) & 1:
            break
        assert time.time() < deadline and proc.poll() is None, "the handler was never installed"
        time.sleep(0.005)
    assert not (tmp_path / "metrics.jsonl").exists()  # still starting up
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "stopped by SIGUSR1 before iteration 1; checkpoint saved to" in out
    assert (tmp_path / "iter_1").is_dir()
