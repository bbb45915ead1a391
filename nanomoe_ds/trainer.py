"""The training loop, shared by the single-device path and the DeepSpeed path.

Both paths hand the loop an engine (engine.py), so there is one loop, one eval, one log
and one checkpoint cadence. The loop reads as nanoGPT's, in named steps:
`evaluate_and_save`, `train_step`, `check_finite`, `log_step`; a signal stops it at a
step boundary after a save. Where it starts (init_from, the lock, the model) is start.py's.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.profiler import record_function

from . import metrics, plan, profiling, resume, run_lock, start
from .config import GPTConfig, TrainConfig, to_dict
from .train_state import TrainState
from .consensus import rank0_decides
from .data import Batches, check_data, resolve_data_dir, shard
from .engine import Engine
from .launch_env import RunStopped
from .local_engine import LocalEngine, resolve_device
from .preemption import Preemption


def train(model_cfg: GPTConfig, train_cfg: TrainConfig, engine_factory=None, given: frozenset = frozenset()) -> dict:
    """Check, take the run's lock, set up, run the loop, and close the log sinks (flushed even when it fails).

    `engine_factory(model, train_cfg)` makes the engine (default: LocalEngine). `given` names
    the keys the user set (preset or command line), which a resume compares with its
    checkpoint (resume.py). Returns the last eval and the train losses (handy for tests).
    """
    metrics.check_sinks(train_cfg)
    try:
        begin = start.decide(train_cfg, given)
        return set_up_and_run(model_cfg, train_cfg, begin, engine_factory)
    finally:
        run_lock.release(train_cfg.out_dir)


@dataclass
class Loop:
    """What the loop runs with, and its clocks."""
    engine: Engine
    batches: Batches
    train_cfg: TrainConfig
    log: metrics.MetricsLog
    flops_per_token: int
    peak_flops: float | None
    result: dict = field(default_factory=lambda: {"train_losses": []})
    last_time: float = field(default_factory=time.time)
    running_mfu: float | None = None

    def __post_init__(self):
        model, train_cfg = self.engine.module, self.train_cfg
        self.tokens_per_iter = self.engine.micro_batches * train_cfg.batch_size * model.config.block_size
        routed = train_cfg.log_moe_stats and model.moe_layers()
        self.tally = metrics.RoutingTally(model.moe_layers()) if routed else None


def set_up_and_run(model_cfg: GPTConfig, train_cfg: TrainConfig, begin: start.Start, engine_factory) -> dict:
    """Model, engine, resume, loop."""
    model_cfg, train_cfg, ckpt, resumed = start.open_resumed(model_cfg, train_cfg, begin)
    data_dir = resolve_data_dir(train_cfg.dataset, train_cfg.data_dir)
    check_data(data_dir, model_cfg.block_size)
    model = start.prepare_model(model_cfg, train_cfg, begin, data_dir)
    flops_per_token = model.flops_per_token()  # before experts are sharded: the whole model's active params
    if engine_factory is None:
        engine = LocalEngine(model, train_cfg, *resolve_device(train_cfg))
    else:
        engine = engine_factory(model, train_cfg)
    state = TrainState()
    if ckpt is not None:
        meta, ckpt = resume.load_to_resume(engine, ckpt, begin.may_fall_back, begin.set_aside)
        state = TrainState.from_record(meta)
    log = open_log(engine, model_cfg, train_cfg, state)
    if ckpt is not None and not train_cfg.eval_only:
        record = metrics.resume_record(train_cfg.out_dir, state.iter_num, ckpt.meta["topology"], engine.topology())
        record.update({k: v for k, v in (("followed", resumed.followed), ("changed", resumed.changed),
                                         ("set_aside", begin.set_aside)) if v})
        log.event(record, metrics.describe_resume(record))
    for line in plan.startup_lines(engine, train_cfg) if engine.rank == 0 and not train_cfg.eval_only else []:
        log.print(line)  # the plan's summary line; on a GPU, a warning where its peak exceeds the memory
    peak = metrics.device_peak_flops(engine.device, engine.compute_dtype, train_cfg.peak_tflops)
    batches = Batches(data_dir, model_cfg.block_size, train_cfg.batch_size, engine.device, train_cfg.seed)
    try:
        result = run_loop(Loop(engine, batches, train_cfg, log, flops_per_token, peak), state)
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return result


def open_log(engine: Engine, model_cfg: GPTConfig, train_cfg: TrainConfig, state: TrainState) -> metrics.MetricsLog:
    """Rank 0 logs to the sinks (metrics.jsonl for a writer, wandb, TensorBoard) and stdout; the others don't."""
    if engine.rank != 0:
        return metrics.MetricsLog([], echo=False)
    sinks = metrics.make_sinks(train_cfg, to_dict(model_cfg, train_cfg))
    return metrics.MetricsLog(sinks, metrics.progress_bar(train_cfg, state.iter_num))


def run_loop(loop: Loop, state: TrainState) -> dict:
    """nanoGPT's loop over the engine: eval and checkpoint, step, guard, log; stop on a signal after a save."""
    engine, train_cfg = loop.engine, loop.train_cfg
    loop.log.print(f"tokens per iteration: {loop.tokens_per_iter:,}")
    preemption = Preemption.install()  # SIGTERM/SIGINT/SIGUSR1: finish the step, save, stop
    local_iter = 0
    window = profiling.Window(train_cfg.profile, str(engine.device).split(":")[0], train_cfg.out_dir,
                              loop.log.print if engine.rank == 0 else None)
    try:
        while True:
            if replica_check_due(train_cfg, state.iter_num):  # before an eval's save can write diverged copies
                engine.check_replicas(state.iter_num)
            if state.iter_num % train_cfg.eval_interval == 0 or train_cfg.eval_only:  # eval_only: at any checkpoint
                # may_save: not before this process has trained. A resumed run would otherwise save
                # again the checkpoint it just loaded: wasted I/O, and a replace of iter_N/ itself.
                evaluate_and_save(loop, state, may_save=local_iter > 0)
            if train_cfg.eval_only or state.iter_num > train_cfg.max_iters:
                break
            window.step_begins(local_iter)
            step_t0 = time.time()
            stop = step_and_log(loop, state, lambda: preemption.requested is not None)
            window.step_ended(local_iter, time.time() - step_t0)
            local_iter += 1
            if stop:  # preempted: save where the next iteration starts, then leave the loop
                save(engine, train_cfg, state)
                loop.log.print(f"stopped by {preemption.requested or 'a signal to another rank'} before iteration "
                               f"{state.iter_num}; checkpoint saved to {train_cfg.out_dir}; continue with "
                               "--init_from=resume")
                loop.result["stopped_by_signal"] = True
                break
    finally:
        preemption.release()
    return loop.result


def step_and_log(loop: Loop, state: TrainState, stop_asked: Callable[[], bool]) -> bool:
    """Train iteration state.iter_num, check it, log it, advance; return whether any rank asked to stop."""
    train_cfg, it = loop.train_cfg, state.iter_num
    logging = it % train_cfg.log_interval == 0
    lr = get_lr(it, train_cfg)
    step_t0 = time.time()
    losses, grad_norm, stop = train_step(loop.engine, loop.batches, it, lr, stop_asked,
                                         loop.tally if logging else None)
    check_finite({"loss": float(losses[0]), "gradient norm": grad_norm}, it, train_cfg.out_dir)
    loop.result["train_losses"].append(float(losses[0]))
    now = time.time()
    dt, loop.last_time = now - loop.last_time, now
    state.train_s += now - step_t0
    if logging:
        if len(loop.result["train_losses"]) > 5:  # past compilation and warm-up; an EMA as in nanoGPT
            mfu = metrics.mfu(loop.flops_per_token, loop.tokens_per_iter / loop.engine.world_size / dt,
                              loop.peak_flops)
            loop.running_mfu = mfu if loop.running_mfu is None or mfu is None else 0.9 * loop.running_mfu + 0.1 * mfu
        log_step(loop, state, lr, losses, grad_norm, dt)
    loop.log.advance({"loss": f"{float(losses[0]):.4f}", "tok/s": f"{loop.tokens_per_iter / dt:.0f}"})
    state.iter_num += 1
    return stop


def replica_check_due(train_cfg: TrainConfig, iter_num: int) -> bool:
    """Whether the replica guard runs before this iteration: every replica_check_interval (-1: eval_interval)."""
    interval = train_cfg.eval_interval if train_cfg.replica_check_interval == -1 else train_cfg.replica_check_interval
    return interval > 0 and iter_num % interval == 0


def evaluate_and_save(loop: Loop, state: TrainState, may_save: bool):
    """Eval both splits; checkpoint when val improved (or always_save_checkpoint) and `may_save`.
    The record holds train_s, the step time spent so far: val loss against training time."""
    train_cfg, it = loop.train_cfg, state.iter_num
    losses = estimate_loss(loop.engine, loop.batches, train_cfg, it)
    check_finite({"val loss": losses["val"]}, it, train_cfg.out_dir)
    loop.result.update(losses)
    loop.log({"iter": it, "tokens": it * loop.tokens_per_iter, "train_loss": losses["train"],
              "val_loss": losses["val"], "lr": get_lr(it, train_cfg), "train_s": state.train_s},
             f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if losses["val"] < state.best_val or train_cfg.always_save_checkpoint:
        state.best_val = min(state.best_val, losses["val"])
        if may_save:
            save(loop.engine, train_cfg, state)
            loop.log.print(f"saving checkpoint to {train_cfg.out_dir}")


def save(engine: Engine, train_cfg: TrainConfig, state: TrainState):
    """A checkpoint from which training continues at state.iter_num, written only while this run still
    owns out_dir."""
    rank0_decides(lambda: run_lock.ensure_held(train_cfg.out_dir), engine.rank)  # every rank stops if rank 0 lost it
    engine.save(train_cfg.out_dir, state.record(engine.module.config, train_cfg))


def train_step(engine: Engine, batches: Batches, iter_num: int, lr: float, stop_asked: Callable[[], bool],
               tally) -> tuple[torch.Tensor, float | None, bool]:
    """One optimizer step over this rank's micro-batches of the global batch (its share of engine.micro_batches).

    Returns the global mean (loss, ce, aux, z), the gradient norm, and whether any rank
    was asked to stop: stop_asked() is read after the update, so a signal during this step
    stops after it, and the flag rides in the all-reduce of the losses the step does
    anyway, so every rank stops (and saves) at the same step boundary. All three reach
    the host in one copy (to_host).
    """
    balancing = engine.module.config.bias_update_rate > 0
    parts = []  # (loss, ce, aux, z) per micro-batch, kept on the device: one sync per step, not four per micro
    routed = []  # per micro-batch [layers, E] assignments the router made: the load the biases balance
    for micro in shard(engine.micro_batches, engine.rank, engine.world_size):
        x, y = batches.get("train", iter_num, micro)
        with record_function("forward"):  # named ranges for --profile (a few µs without one)
            _, loss, report = engine.forward(x, y, report=True)
        with record_function("backward"):
            engine.backward(loss)
        parts.append(loss_parts(loss, report))
        if balancing and report.routings:  # a dense model routes nothing
            routed.append(torch.stack([routing.routed for routing in report.routings]))
        if tally is not None:
            tally.add(report.routings)
    with record_function("optimizer"):
        grad_norm = engine.step(lr)
    if routed:
        update_router_biases(engine, torch.stack(routed).sum(0))
    device = parts[0].device
    stop_flag = torch.tensor([float(stop_asked())], dtype=torch.float64).to(device, non_blocking=True)
    reduced = engine.all_reduce(torch.cat([torch.stack(parts).double().sum(0), stop_flag]))
    norm = grad_norm.detach().double().view(1).to(device) if grad_norm is not None else reduced.new_zeros(1)
    host = to_host(torch.cat([reduced, norm]))
    return host[:4] / engine.micro_batches, None if grad_norm is None else float(host[5]), bool(host[4] > 0)


def loss_parts(loss: torch.Tensor, report) -> torch.Tensor:
    """One micro-batch's [loss, ce, aux, z] on the device; 0 for a term its forward has not (a dense model)."""
    zero = torch.zeros((), device=loss.device)
    terms = (report.ce, report.aux_loss, report.z_loss)
    return torch.stack([loss.detach().float(), *((zero if term is None else term).float() for term in terms)])


def update_router_biases(engine: Engine, routed: torch.Tensor):
    """Aux-loss-free balancing after the step: `routed` [layers, E] is this rank's load over the step's
    micro-batches; one all-reduce makes it the global batch's, the same on every rank, so the biases
    stay replicas."""
    model = engine.module
    loads = engine.all_reduce(routed)
    for layer, load in zip(model.moe_layers(), loads):
        layer.update_bias(model.config.bias_update_rate, load)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The step's one device-to-host copy (losses, stop flag, gradient norm): on a GPU the host waits here
    for the step's kernels; everything else in a step stays on the device (tests/test_train.py counts)."""
    return tensor.cpu()


def log_step(loop: Loop, state: TrainState, lr: float, losses: torch.Tensor, grad_norm: float | None,
             dt: float):
    """One metrics.jsonl record (and stdout line) for a logged step; the routing reduce is a collective."""
    engine, it, tokens = loop.engine, state.iter_num, loop.tokens_per_iter
    rec = {"iter": it, "tokens": (it + 1) * tokens, "loss": float(losses[0]),
           "ce_loss": float(losses[1]), "aux_loss": float(losses[2]), "z_loss": float(losses[3]), "lr": lr,
           "grad_norm": grad_norm, "time_ms": dt * 1000, "train_s": state.train_s, "tokens_per_sec": tokens / dt,
           "mfu": loop.running_mfu}
    if str(engine.device).startswith("cuda"):  # the high-water mark of this process's GPU allocations
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if loop.tally is not None:
        rec["moe"] = loop.tally.reduce(engine.all_reduce, engine.micro_batches,
                                       engine.module.config.bias_update_rate > 0)
    mfu_text = "n/a" if loop.running_mfu is None else f"{loop.running_mfu * 100:.2f}%"
    loop.log(rec, f"iter {it}: loss {rec['loss']:.4f}, time {dt * 1000:.2f}ms, "
                  f"tok/s {rec['tokens_per_sec']:.0f}, mfu {mfu_text}")


class Diverged(RunStopped):
    """Training produced a non-finite loss or gradient norm; nothing of it was saved."""


def check_finite(values: dict, iter_num: int, out_dir: str):
    """Stop at the first NaN/inf, before a save could overwrite the last good checkpoint (None: not known)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise Diverged(f"non-finite {name} ({value}) at iteration {iter_num}: training stopped and nothing of it "
                           f"was saved (the checkpoint in {out_dir} is the last good state); lower learning_rate "
                           "or check the data, then resume with --init_from=resume")


@torch.no_grad()
def estimate_loss(engine, batches: Batches, train_cfg: TrainConfig, it: int) -> dict:
    """Mean pure cross-entropy over eval_iters batches per split, sharded over ranks.

    Every rank runs the same number of forwards (expert parallelism needs every
    rank in every exchange), then the sums are all-reduced: all ranks agree.
    """
    model = engine.module
    model.eval()
    out = {}
    per_rank = math.ceil(train_cfg.eval_iters / engine.world_size)
    for split in ("train", "val"):
        total = torch.zeros(2, dtype=torch.float64)
        for j in range(per_rank):
            k = engine.rank + j * engine.world_size
            x, y = batches.get(split, it, k, stream=1)
            _, loss = engine.forward(x, y)
            if k < train_cfg.eval_iters:
                total += torch.tensor([float(loss), 1.0], dtype=torch.float64)
        total = engine.all_reduce(total)
        out[split] = float(total[0] / total[1])
    model.train()
    return out


def get_lr(it: int, train_cfg: TrainConfig) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr, then min_lr."""
    if not train_cfg.decay_lr:
        return train_cfg.learning_rate
    if it < train_cfg.warmup_iters:
        return train_cfg.learning_rate * (it + 1) / (train_cfg.warmup_iters + 1)
    if it > train_cfg.lr_decay_iters:
        return train_cfg.min_lr
    ratio = (it - train_cfg.warmup_iters) / max(1, train_cfg.lr_decay_iters - train_cfg.warmup_iters)
    return train_cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train_cfg.learning_rate - train_cfg.min_lr)
