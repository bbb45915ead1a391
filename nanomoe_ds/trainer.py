"""The training loop, shared by the single-device path and the DeepSpeed path.

Both paths hand the loop an *engine* with the same small interface
(`forward`, `backward`, `step`, `save`, `all_reduce`), so there is one loop, one
eval and one log. `LocalEngine` below is plain PyTorch on one device; the
DeepSpeed one lives in deepspeed_integration.py.
"""
from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch

from . import checkpoint, precision
from .config import ConfigError, GPTConfig, TrainConfig, to_dict
from .data import Batches, check_data, check_tokens_fit, choose_vocab, load_meta, resolve_data_dir, shard
from .model import GPT


def get_lr(it: int, t: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then min_lr."""
    if not t.decay_lr:
        return t.learning_rate
    if it < t.warmup_iters:
        return t.learning_rate * (it + 1) / (t.warmup_iters + 1)
    if it > t.lr_decay_iters:
        return t.min_lr
    ratio = (it - t.warmup_iters) / max(1, t.lr_decay_iters - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.learning_rate - t.min_lr)


def resolve_device(t: TrainConfig, support: precision.Support | None = None) -> tuple[str, torch.dtype]:
    """Check the device and pick a dtype it can run; refuse impossible pairs in one line.

    `support` defaults to asking this machine (precision.supports); tests pass one in.
    """
    kind = t.device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={t.device} but CUDA is not available here; use --device=cpu")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("--device=mps but MPS is not available here; use --device=cpu")
    support = support or precision.supports(kind)
    name = precision.default_dtype(kind, support) if t.dtype == "auto" else t.dtype
    return t.device, getattr(torch, precision.check(name, kind, support))


class LocalEngine:
    """One device, plain PyTorch: autocast, GradScaler for fp16, AdamW and clipping."""

    rank, world_size = 0, 1

    def __init__(self, model: GPT, t: TrainConfig, device: str, dtype: torch.dtype):
        self.module, self.t, self.dtype = model.to(device), t, dtype
        kind = device.split(":")[0]
        self.ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=kind, dtype=dtype)
        # fp16 needs loss scaling against gradient underflow: a GradScaler on CUDA and on
        # CPUs with native fp16; MPS fp16 runs without (no scaler support there).
        self.scaler = torch.amp.GradScaler(kind, enabled=(dtype == torch.float16 and kind != "mps"))
        self.optimizer = model.configure_optimizers(t.weight_decay, t.learning_rate, (t.beta1, t.beta2), kind)
        self.forward_module = torch.compile(model) if t.compile else model
        self.grad_accum = t.gradient_accumulation_steps

    def forward(self, x, y):
        with self.ctx:
            return self.forward_module(x, y)

    def backward(self, loss):
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self, lr: float) -> float:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def topology(self) -> dict:
        return checkpoint.topology("local", 1, 1, None, str(self.dtype).removeprefix("torch."))

    def save(self, out_dir: str, state: dict):
        checkpoint.save(out_dir, {**state, "model": self.module.state_dict(), "topology": self.topology(),
                                  "optimizer_state": checkpoint.optimizer_state_by_name(self.module, self.optimizer),
                                  "scaler": self.scaler.state_dict(), "rng": checkpoint.rng_state()})

    def load(self, out_dir: str, ckpt: dict | None = None) -> dict:
        """Restore from `ckpt` (already read by the caller) or out_dir/ckpt.pt, saved by any engine."""
        ckpt = ckpt if ckpt is not None else checkpoint.load(out_dir)
        self.module.load_state_dict(ckpt["model"])  # copies into the parameters, on their device
        checkpoint.load_optimizer_state_by_name(self.module, self.optimizer, ckpt["optimizer_state"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        return ckpt


class Diverged(Exception):
    """Training produced a non-finite loss or gradient norm; nothing of it was saved."""


def check_finite(values: dict, iter_num: int, out_dir: str):
    """Stop at the first NaN/inf, before a save could overwrite the last good checkpoint (None: not known)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise Diverged(f"non-finite {name} ({value}) at iteration {iter_num}: training stopped and nothing of it "
                           f"was saved (the checkpoint in {out_dir} is the last good state); lower learning_rate "
                           "or check the data, then resume with --init_from=resume")


class Preemption:
    """Turns SIGTERM, SIGINT and SIGUSR1 into a request to stop at the next step boundary.

    SLURM and Kubernetes preempt with SIGTERM (SLURM can send SIGUSR1 earlier with
    --signal); Ctrl-C is SIGINT. A second signal stops at once, as without this.
    Handlers can only be set from the main thread; elsewhere this does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.requested: str | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame):
        if self.requested is not None:  # asked twice: stop now
            self.restore()
            signal.raise_signal(signum)
            return
        self.requested = signal.Signals(signum).name

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}


class MetricsLog:
    """Human-readable lines on stdout and one JSON object per line in out_dir/metrics.jsonl."""

    def __init__(self, out_dir: str, enabled: bool, wandb_run=None):
        self.enabled, self.wandb = enabled, wandb_run
        self.path = os.path.join(out_dir, "metrics.jsonl")
        if enabled:
            os.makedirs(out_dir, exist_ok=True)

    def __call__(self, record: dict, line: str | None = None):
        if not self.enabled:
            return
        if line:
            print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["iter"])


def moe_stats(model: GPT) -> list[dict]:
    out = []
    for m in model.moe_layers():
        s = m.stats
        out.append({"tokens_per_expert": s["tokens_per_expert"].tolist(), "load_cv": float(s["load_cv"]),
                    "load_max_over_mean": float(s["load_max_over_mean"]), "dead_experts": int(s["dead_experts"]),
                    "drop_frac": float(s["drop_frac"]),
                    "aux_loss": float(m.aux_loss.detach()) if m.aux_loss is not None else None,
                    "z_loss": float(m.z_loss.detach()) if m.z_loss is not None else None})
    return out


@torch.no_grad()
def estimate_loss(engine, batches: Batches, t: TrainConfig, it: int) -> dict:
    """Mean pure cross-entropy over eval_iters batches per split, sharded over ranks.

    Every rank runs the same number of forwards (expert parallelism needs every
    rank in every exchange), then the sums are all-reduced: all ranks agree.
    """
    model = engine.module
    model.eval()
    out = {}
    per_rank = math.ceil(t.eval_iters / engine.world_size)
    for split in ("train", "val"):
        total = torch.zeros(2, dtype=torch.float64)
        for j in range(per_rank):
            k = engine.rank + j * engine.world_size
            x, y = batches.get(split, it, k, stream=1)
            _, loss = engine.forward(x, y)
            if k < t.eval_iters:
                total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        total = engine.all_reduce(total)
        out[split] = float(total[0] / total[1])
    model.train()
    return out


def build_model(m: GPTConfig, t: TrainConfig) -> GPT:
    if t.init_from not in ("scratch", "resume"):  # pretrained GPT-2: a hub name or a local directory
        if m.use_moe:
            raise ConfigError(f"init_from={t.init_from} loads a dense GPT-2; drop use_moe=True to fine-tune it")
        return GPT.from_pretrained(t.init_from, {"dropout": m.dropout})
    meta = load_meta(resolve_data_dir(t.dataset, t.data_dir))
    m.vocab_size, why = choose_vocab(meta, m.vocab_size, GPTConfig.vocab_size)  # nanoGPT: the data's vocab
    if why and int(os.environ.get("RANK", "0")) == 0:
        print(why, flush=True)
    torch.manual_seed(t.seed)
    return GPT(m)


def train(m: GPTConfig, t: TrainConfig, engine_factory=None, given: frozenset = frozenset()) -> dict:
    """Run the loop; return the last eval and train numbers (handy for tests).

    `given` names the keys the user set (preset or command line); on resume, a model
    shape key among them must agree with the checkpoint.
    """
    data_dir = resolve_data_dir(t.dataset, t.data_dir)
    check_data(data_dir, m.block_size)
    ckpt = None
    if t.init_from == "resume":  # the checkpoint's model shape wins, as in nanoGPT, unless given otherwise
        ckpt = checkpoint.load(t.out_dir)
        if "topology" not in ckpt:
            raise ConfigError(f"{t.out_dir}/ckpt.pt has no topology record (written before checkpoints could be "
                              "resharded); resume it with the nanomoe_ds that wrote it, or start again")
        m = checkpoint.resume_model_config(ckpt["model_args"], m, given)
    model = build_model(m, t)
    check_tokens_fit(data_dir, model.config.vocab_size)
    if m.block_size < model.config.block_size:
        model.crop_block_size(m.block_size)
    if int(os.environ.get("RANK", "0")) == 0:  # before experts are sharded: whole-model counts
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, "
              f"{model.get_num_params(active=True) / 1e6:.2f}M active per token", flush=True)
    if engine_factory is None:
        device, dtype = resolve_device(t)
        engine = LocalEngine(model, t, device, dtype)
    else:
        engine = engine_factory(model, t)
        device = engine.device
    master = engine.rank == 0
    iter_num, best_val = 0, 1e9
    if t.init_from == "resume":
        state = engine.load(t.out_dir, ckpt)
        iter_num, best_val = state["iter_num"], state["best_val_loss"]
    batches = Batches(data_dir, m.block_size, t.batch_size, device, t.seed)
    my_micro = shard(t.gradient_accumulation_steps, engine.rank, engine.world_size)
    wandb_run = None
    if t.wandb_log and master:
        import wandb
        wandb_run = wandb.init(project=t.wandb_project, name=t.wandb_run_name, config=to_dict(m, t))
    log = MetricsLog(t.out_dir, master, wandb_run)
    tokens_per_iter = t.gradient_accumulation_steps * t.batch_size * m.block_size
    if master:
        print(f"tokens per iteration: {tokens_per_iter:,}", flush=True)
    result: dict = {"train_losses": []}
    t0, running_mfu = time.time(), -1.0
    preemption = Preemption()  # SIGTERM/SIGINT/SIGUSR1: finish the step, save, stop
    try:
        while True:
            lr = get_lr(iter_num, t)
            if iter_num % t.eval_interval == 0:
                losses = estimate_loss(engine, batches, t, iter_num)
                check_finite({"val loss": losses["val"]}, iter_num, t.out_dir)
                result.update(losses)
                log({"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"], "lr": lr},
                    f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                if losses["val"] < best_val or t.always_save_checkpoint:
                    best_val = min(best_val, losses["val"])
                    if iter_num > 0:
                        engine.save(t.out_dir, {"iter_num": iter_num, "best_val_loss": best_val,
                                                "model_args": asdict(model.config), "config": to_dict(m, t)})
                        if master:
                            print(f"saving checkpoint to {t.out_dir}", flush=True)
            if t.eval_only or iter_num > t.max_iters:
                break
            parts = []  # (loss, ce, aux, z) per micro-batch, kept on the device: one sync per step, not four per micro
            for micro in my_micro:
                x, y = batches.get("train", iter_num, micro)
                _, loss = engine.forward(x, y)
                engine.backward(loss)
                ll = model.last_losses
                zero = torch.zeros((), device=loss.device)
                parts.append(torch.stack([loss.detach().float(), ll["ce"].float(), ll.get("aux_loss", zero).float(),
                                          ll.get("z_loss", zero).float()]))
            grad_norm = engine.step(lr)
            if model.config.bias_update_rate > 0:  # one all-reduce for every layer's load
                layers = model.moe_layers()
                loads = engine.all_reduce(torch.stack([layer.load for layer in layers]))
                for layer, load in zip(layers, loads):
                    layer.update_bias(model.config.bias_update_rate, load)
            # One all-reduce per step carries the losses and whether any rank was asked to stop,
            # so every rank stops (and saves) at the same step boundary.
            stop_flag = torch.tensor([float(preemption.requested is not None)], dtype=torch.float64)
            reduced = engine.all_reduce(torch.cat([torch.stack(parts).double().sum(0).cpu(), stop_flag]))
            parts, stop_requested = reduced[:4] / t.gradient_accumulation_steps, bool(reduced[4] > 0)
            check_finite({"loss": float(parts[0]), "gradient norm": grad_norm}, iter_num, t.out_dir)  # before any save
            result["train_losses"].append(float(parts[0]))
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if iter_num % t.log_interval == 0:
                if iter_num >= 5:
                    mfu = model.estimate_mfu(t.batch_size * t.gradient_accumulation_steps, dt)
                    running_mfu = mfu if running_mfu == -1.0 else 0.9 * running_mfu + 0.1 * mfu
                rec = {"iter": iter_num, "loss": float(parts[0]), "ce_loss": float(parts[1]),
                       "aux_loss": float(parts[2]), "z_loss": float(parts[3]), "lr": lr, "grad_norm": grad_norm,
                       "time_ms": dt * 1000, "tokens_per_sec": tokens_per_iter / dt, "mfu": running_mfu}
                if str(device).startswith("cuda"):  # the high-water mark of this process's GPU allocations
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                if t.log_moe_stats and model.moe_layers():
                    rec["moe"] = moe_stats(model)
                log(rec, f"iter {iter_num}: loss {rec['loss']:.4f}, time {dt * 1000:.2f}ms, "
                         f"tok/s {rec['tokens_per_sec']:.0f}, mfu {running_mfu * 100:.2f}%")
            iter_num += 1
            if stop_requested:  # preempted: save where the next iteration starts, then leave the loop
                engine.save(t.out_dir, {"iter_num": iter_num, "best_val_loss": best_val,
                                        "model_args": asdict(model.config), "config": to_dict(m, t)})
                if master:
                    print(f"stopped by {preemption.requested or 'a signal to another rank'} before iteration "
                          f"{iter_num}; checkpoint saved to {t.out_dir}; continue with --init_from=resume", flush=True)
                result["stopped_by_signal"] = True
                break
    finally:
        preemption.restore()
    return result
