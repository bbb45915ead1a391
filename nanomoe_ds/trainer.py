"""The training loop, shared by the single-device path and the DeepSpeed path.

Both paths hand the loop an *engine* with the same small interface
(`forward`, `backward`, `step`, `save`, `all_reduce`), so there is one loop, one
eval and one log. `LocalEngine` below is plain PyTorch on one device; the
DeepSpeed one lives in deepspeed_integration.py.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict

import torch

from . import checkpoint, metrics, precision
from .config import ConfigError, GPTConfig, TrainConfig, to_dict
from .data import Batches, check_data, load_meta, resolve_data_dir, shard
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
        self.module, self.t, self.device, self.compute_dtype = model.to(device), t, device, dtype
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

    def save(self, out_dir: str, state: dict):
        checkpoint.save(out_dir, {**state, "model": self.module.state_dict(),
                                  "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                                  "rng": checkpoint.rng_state()})

    def load(self, out_dir: str, ckpt: dict | None = None) -> dict:
        """Restore from `ckpt` (already read by the caller) or from out_dir/ckpt.pt."""
        ckpt = ckpt if ckpt is not None else checkpoint.load(out_dir)
        self.module.load_state_dict(ckpt["model"])  # copies into the parameters, on their device
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        return ckpt


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
    if meta is not None and m.vocab_size == GPTConfig.vocab_size:
        m.vocab_size = meta["vocab_size"]  # nanoGPT: take the vocab from the prepared data
    torch.manual_seed(t.seed)
    return GPT(m)


def train(m: GPTConfig, t: TrainConfig, engine_factory=None) -> dict:
    """Set up, run the loop, and close the log sinks (flushed even when the loop fails)."""
    metrics.check_sinks(t)
    data_dir = resolve_data_dir(t.dataset, t.data_dir)
    check_data(data_dir, m.block_size)
    ckpt = None
    if t.init_from == "resume" and engine_factory is None:  # the checkpoint's model shape wins, as in nanoGPT
        ckpt = checkpoint.load(t.out_dir)
        m = GPTConfig(**ckpt["model_args"])
    model = build_model(m, t)
    if m.block_size < model.config.block_size:
        model.crop_block_size(m.block_size)
    flops_per_token = model.flops_per_token()  # before experts are sharded: the whole model's active params
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, "
              f"{model.get_num_params(active=True) / 1e6:.2f}M active per token", flush=True)
    if engine_factory is None:
        device, dtype = resolve_device(t)
        engine = LocalEngine(model, t, device, dtype)
    else:
        engine = engine_factory(model, t)
    start_iter, best_val = 0, 1e9
    if t.init_from == "resume":
        state = engine.load(t.out_dir, ckpt)
        start_iter, best_val = state["iter_num"], state["best_val_loss"]
    master = engine.rank == 0
    if master:
        log = metrics.MetricsLog(metrics.make_sinks(t, to_dict(m, t)), metrics.progress_bar(t, start_iter))
    else:
        log = metrics.MetricsLog([], echo=False)
    peak = metrics.device_peak_flops(engine.device, engine.compute_dtype, t.peak_tflops)
    try:
        result = run_loop(engine, Batches(data_dir, m.block_size, t.batch_size, engine.device, t.seed), t, log,
                          start_iter, best_val, flops_per_token, peak)
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return result


def run_loop(engine, batches: Batches, t: TrainConfig, log: metrics.MetricsLog, iter_num: int, best_val: float,
             flops_per_token: int, peak_flops: float | None) -> dict:
    """nanoGPT's loop over the engine: eval and checkpoint, accumulate, step, log."""
    model = engine.module
    my_micro = shard(t.gradient_accumulation_steps, engine.rank, engine.world_size)
    tokens_per_iter = t.gradient_accumulation_steps * t.batch_size * model.config.block_size
    log.print(f"tokens per iteration: {tokens_per_iter:,}")
    tally = metrics.RoutingTally(model.moe_layers()) if t.log_moe_stats and model.moe_layers() else None
    result: dict = {"train_losses": []}
    t0, running_mfu, local_iter = time.time(), None, 0
    while True:
        lr = get_lr(iter_num, t)
        if iter_num % t.eval_interval == 0:
            losses = estimate_loss(engine, batches, t, iter_num)
            result.update(losses)
            log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train_loss": losses["train"],
                 "val_loss": losses["val"], "lr": lr},
                f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val or t.always_save_checkpoint:
                best_val = min(best_val, losses["val"])
                if iter_num > 0:
                    engine.save(t.out_dir, {"iter_num": iter_num, "best_val_loss": best_val,
                                            "model_args": asdict(model.config), "config": to_dict(model.config, t)})
                    log.print(f"saving checkpoint to {t.out_dir}")
        if t.eval_only or iter_num > t.max_iters:
            break
        logging = iter_num % t.log_interval == 0
        parts = []  # (loss, ce, aux, z) per micro-batch, kept on the device: one sync per step, not four per micro
        for micro in my_micro:
            x, y = batches.get("train", iter_num, micro)
            _, loss = engine.forward(x, y)
            engine.backward(loss)
            ll = model.last_losses
            zero = torch.zeros((), device=loss.device)
            parts.append(torch.stack([loss.detach().float(), ll["ce"].float(), ll.get("aux_loss", zero).float(),
                                      ll.get("z_loss", zero).float()]))
            if tally is not None and logging:
                tally.add()
        grad_norm = engine.step(lr)
        if model.config.bias_update_rate > 0:  # one all-reduce for every layer's load
            layers = model.moe_layers()
            loads = engine.all_reduce(torch.stack([layer.load for layer in layers]))
            for layer, load in zip(layers, loads):
                layer.update_bias(model.config.bias_update_rate, load)
        parts = engine.all_reduce(torch.stack(parts).double().sum(0).cpu()) / t.gradient_accumulation_steps
        result["train_losses"].append(float(parts[0]))
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if logging:
            if local_iter >= 5:  # past compilation and warm-up; an EMA as in nanoGPT
                mfu = metrics.mfu(flops_per_token, tokens_per_iter / engine.world_size / dt, peak_flops)
                running_mfu = mfu if running_mfu is None or mfu is None else 0.9 * running_mfu + 0.1 * mfu
            rec = {"iter": iter_num, "tokens": (iter_num + 1) * tokens_per_iter, "loss": float(parts[0]),
                   "ce_loss": float(parts[1]), "aux_loss": float(parts[2]), "z_loss": float(parts[3]), "lr": lr,
                   "grad_norm": grad_norm, "time_ms": dt * 1000, "tokens_per_sec": tokens_per_iter / dt,
                   "mfu": running_mfu}
            if str(engine.device).startswith("cuda"):  # the high-water mark of this process's GPU allocations
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if tally is not None:
                rec["moe"] = tally.reduce(engine.all_reduce, t.gradient_accumulation_steps,
                                          model.config.bias_update_rate > 0)
            mfu_text = "n/a" if running_mfu is None else f"{running_mfu * 100:.2f}%"
            log(rec, f"iter {iter_num}: loss {rec['loss']:.4f}, time {dt * 1000:.2f}ms, "
                     f"tok/s {rec['tokens_per_sec']:.0f}, mfu {mfu_text}")
        log.advance({"loss": f"{float(parts[0]):.4f}", "tok/s": f"{tokens_per_iter / dt:.0f}"})
        iter_num += 1
        local_iter += 1
    return result
