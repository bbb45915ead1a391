"""The training loop, shared by the single-device path and the DeepSpeed path.

Both paths hand the loop an *engine* (the `Engine` protocol below), so there is
one loop, one eval, one log and one checkpoint cadence. `LocalEngine` below is plain
PyTorch on one device; the DeepSpeed one lives in deepspeed_integration.py. The loop
reads as nanoGPT's, in named steps: `evaluate_and_save`, `train_step`, `check_finite`,
`log_step`; a signal stops it at a step boundary after a save.
"""
from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
from torch.profiler import record_function

from . import checkpoint, launch_env, metrics, precision, profiling, resume, run_lock
from .consensus import rank0_decides
from .activation_checkpoint import checkpoint_blocks_
from .config import ConfigError, GPTConfig, TrainConfig, init_source, is_run_dir, resolve_init_from, to_dict
from .data import Batches, check_data, check_tokens_fit, choose_vocab, load_meta, resolve_data_dir, shard
from .model import GPT
from .preemption import Preemption
from .upcycle import upcycle


class Engine(Protocol):
    """What the loop uses of an engine: LocalEngine below, deepspeed_integration.DeepSpeedEngine."""

    module: GPT
    rank: int
    world_size: int
    micro_batches: int  # global micro-batches per step: gradient_accumulation_steps fitted to the world size
    device: str
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> torch.Tensor | None:
        """Clip, update, zero the gradients; return the global gradient norm, a 0-dim tensor on the device.

        A tensor, not a float: reading it on the host would wait for the step to finish,
        and train_step reads it with the losses in the step's one device-to-host copy.
        None where it isn't computed, and for a step the fp16 loss scaler skipped (an
        overflow it handles by lowering the scale: not a divergence to stop for).
        """

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over all ranks (a copy, on the tensor's device)."""

    def check_replicas(self, iter_num: int) -> None:
        """Stop every rank if copies of a tensor that must be identical differ (guards.py; a collective)."""

    def topology(self) -> dict:
        """What the state's layout depends on (checkpoint.topology): recorded in checkpoints."""

    def save(self, out_dir: str, state: dict) -> None: ...

    def load(self, ckpt: checkpoint.Checkpoint) -> dict:
        """Restore this rank's share from a checkpoint saved at any topology; return its training state."""


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
        if kind == "cuda":  # the current device is the one whose RNG state checkpoints save (cuda:1 too)
            torch.cuda.set_device(torch.device(device))
        self.ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=kind, dtype=dtype)
        # fp16 needs loss scaling against gradient underflow: a GradScaler on CUDA and on
        # CPUs with native fp16; MPS fp16 runs without (no scaler support there).
        self.scaler = torch.amp.GradScaler(kind, enabled=(dtype == torch.float16 and kind != "mps"))
        self.optimizer = model.configure_optimizers(t.weight_decay, t.learning_rate, (t.beta1, t.beta2), kind)
        self.forward_module = torch.compile(model) if t.compile else model
        self.micro_batches = t.gradient_accumulation_steps  # one rank: nothing to fit

    def forward(self, x, y):
        with self.ctx:
            return self.forward_module(x, y)

    def backward(self, loss):
        self.scaler.scale(loss / self.micro_batches).backward()

    def step(self, lr: float) -> torch.Tensor | None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.t.grad_clip if self.t.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale is not None and self.scaler.get_scale() < scale:  # (fp16 only: get_scale reads the host)
            return None  # fp16 overflow: the scaler skipped this step and lowered the scale (not divergence)
        return norm

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def check_replicas(self, iter_num: int):
        pass  # one device: one copy of everything

    def topology(self) -> dict:
        return checkpoint.topology("local", 1, 1, None, str(self.compute_dtype).removeprefix("torch."))

    def save(self, out_dir: str, state: dict):
        """The same format as every path: one shard holding every tensor whole."""
        tensors = {checkpoint.tensor_key(kind, n): value.detach()
                   for kind in ("model", *checkpoint.MOMENTS) for n, value in self._tensors(kind)}
        steps = [int(st["step"]) for st in self.optimizer.state.values() if "step" in st]
        scale = None
        if self.scaler.is_enabled():
            scale = {"scale": self.scaler.get_scale(), "torch": self.scaler.state_dict()}
        meta = {**state, "topology": self.topology(), "optimizer_step": steps[0] if steps else 0,
                "loss_scale": scale, "tensors": {key: list(value.shape) for key, value in tensors.items()}}
        pieces = [(key, 0, value.view(-1)) for key, value in tensors.items()]
        checkpoint.save(out_dir, meta, pieces, rank=0, keep_last=self.t.keep_last)

    def _tensors(self, kind: str):
        """(name, tensor) of the weights and router biases (kind "model"), or of an AdamW moment."""
        if kind == "model":
            yield from self.module.named_parameters()
            yield from ((n, b) for n, b in self.module.named_buffers() if n.endswith("score_bias"))
            return
        for n, p in self.module.named_parameters():
            if kind in self.optimizer.state.get(p, {}):
                yield n, self.optimizer.state[p][kind]

    @torch.no_grad()
    def load(self, ckpt: checkpoint.Checkpoint) -> dict:
        """Restore from a checkpoint saved by any engine at any topology; return its training state."""
        for n, value in self._tensors("model"):
            ckpt.read_into(checkpoint.tensor_key("model", n), 0, value.data.view(-1))
        params = list(self.module.named_parameters())
        if ckpt.has(checkpoint.tensor_key(checkpoint.MOMENTS[0], params[0][0])):
            group = self.optimizer.param_groups[0]  # fused or not: the same for every group
            for n, p in params:
                self.optimizer.state[p] = {"step": checkpoint.adamw_step(ckpt.meta["optimizer_step"], p, group)}
                for kind in checkpoint.MOMENTS:
                    self.optimizer.state[p][kind] = torch.empty_like(p)
                    ckpt.read_into(checkpoint.tensor_key(kind, n), 0, self.optimizer.state[p][kind].view(-1))
        scale = ckpt.meta.get("loss_scale")
        if scale is not None and self.scaler.is_enabled():  # from another engine: its scale only
            self.scaler.load_state_dict(scale.get("torch", {**self.scaler.state_dict(), "scale": scale["scale"]}))
        rng = ckpt.rng(0)
        if rng is not None:
            checkpoint.set_rng_state(rng)
        return ckpt.meta


class Diverged(Exception):
    """Training produced a non-finite loss or gradient norm; nothing of it was saved."""


def check_finite(values: dict, iter_num: int, out_dir: str):
    """Stop at the first NaN/inf, before a save could overwrite the last good checkpoint (None: not known)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise Diverged(f"non-finite {name} ({value}) at iteration {iter_num}: training stopped and nothing of it "
                           f"was saved (the checkpoint in {out_dir} is the last good state); lower learning_rate "
                           "or check the data, then resume with --init_from=resume")


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


def build_model(m: GPTConfig, t: TrainConfig, source_iter: int = -1) -> GPT:
    """A new model (scratch, resume), or one started from a dense source: with use_moe=True, upcycled.
    `source_iter` picks a run source's checkpoint (rank 0's choice; -1: its newest)."""
    if t.init_from not in ("scratch", "resume"):  # a GPT-2 (name or HF directory) or a dense run's out_dir
        dense = checkpoint.load_source(t.init_from, m.dropout, source_iter)
        if dense.config.use_moe:
            raise ConfigError(f"init_from '{t.init_from}' is an MoE run; init_from=resume continues it "
                              "(with out_dir set to it), and upcycling starts from a dense model")
        if m.block_size > dense.config.block_size:
            raise ConfigError(f"block_size ({m.block_size}) exceeds the context of init_from '{t.init_from}' "
                              f"({dense.config.block_size}); use block_size <= {dense.config.block_size}")
        if not m.use_moe:
            return dense
        return upcycle(dense, m, t.upcycle_router_std, t.upcycle_noise, seed=t.seed)
    meta = load_meta(resolve_data_dir(t.dataset, t.data_dir))
    m.vocab_size, why = choose_vocab(meta, m.vocab_size, GPTConfig.vocab_size)  # nanoGPT: the data's vocab
    if why and launch_env.process_rank(os.environ) == 0:
        print(why, flush=True)
    torch.manual_seed(t.seed)
    return GPT(m)


def train(m: GPTConfig, t: TrainConfig, engine_factory=None, given: frozenset = frozenset()) -> dict:
    """Check, take the run's lock, set up, run the loop, and close the log sinks (flushed even when it fails).

    `given` names the keys the user set (preset or command line); on resume, a model
    shape key among them must agree with the checkpoint. Returns the last eval and the
    train losses (handy for tests).
    """
    metrics.check_sinks(t)
    rank = launch_env.process_rank(os.environ)
    if not t.eval_only:
        checkpoint.check_writable(t.out_dir, rank)  # every rank: each writes its own shard there
    asked = f"init_from={t.init_from}" + (f" (over the checkpoint in {t.out_dir})" if t.init_from == "auto" else "")
    # A resume that names no --resume_iter may fall back past a checkpoint that fails to verify (resume.py).
    may_fall_back = t.resume_iter == -1 and not t.eval_only  # a reader never moves anything

    def lock_and_choose() -> tuple[str, int, str | None]:
        if t.eval_only:  # a reader: no lock
            return *choose_start(t), None
        lock = run_lock.RunLock.acquire(t.out_dir)  # one writer per out_dir; the kernel frees it however we end
        return *choose_start(t), lock.text
    try:
        # Rank 0 decides where every rank starts: ranks that each looked for the newest checkpoint
        # could see different ones (a save being finished, a file system's stale directory cache).
        t.init_from, iteration, lock_text = rank0_decides(lock_and_choose, rank)
        if lock_text is not None:
            check_out_dir_shared(t.out_dir, lock_text, rank)
        if t.init_from == "resume":
            t.resume_iter = iteration
        start = Start(rank, asked, iteration, may_fall_back, given)
        return set_up_and_run(m, t, start, engine_factory)
    finally:
        run_lock.release(t.out_dir)


def check_out_dir_shared(out_dir: str, lock_text: str, rank: int):
    """Every rank reads the lock file rank 0 just wrote; any that can't stops every rank in one line, before
    training (not an eval_interval later, at the first save)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, run_lock.shared_out_dir_problem(out_dir, lock_text, rank))
    first = next((problem for problem in problems if problem is not None), None)
    if first is not None:
        raise ConfigError(first)


def choose_start(t: TrainConfig) -> tuple[str, int]:
    """Rank 0, holding the run's lock: finish or clear what a killed save left, then resolve init_from=auto
    and pick the checkpoint to start from: the one to resume, or a source run's newest (its iteration;
    -1 for an older version's ckpt.pt, or a source that is not a run of ours)."""
    if t.init_from in ("resume", "auto") and not t.eval_only:  # a reader holds no lock: a run may be saving
        checkpoint.recover_partial_saves(t.out_dir)
    init_from = resolve_init_from(t.init_from, is_run_dir(t.out_dir), t.out_dir)
    iteration = t.resume_iter
    if init_from == "resume" and iteration == -1:
        found = checkpoint.committed(t.out_dir)
        iteration = found[-1][0] if found else -1  # none: an older version's ckpt.pt, or the refusal on opening
    elif init_source(init_from) == "run":  # every rank must load the same one, even while that run saves
        found = checkpoint.committed(init_from)
        iteration = found[-1][0] if found else -1
    return init_from, iteration


@dataclass
class Start:
    """Where train() decided this process starts."""
    rank: int
    asked: str  # the init_from the user gave, for messages
    iteration: int  # the checkpoint rank 0 chose: to resume, or in a source run
    may_fall_back: bool  # past a resumed checkpoint that fails to verify
    given: frozenset  # the keys the preset and the command line set (resume.reconcile)


def set_up_and_run(m: GPTConfig, t: TrainConfig, start: Start, engine_factory) -> dict:
    """Model, engine, resume, loop."""
    ckpt, resumed, set_aside, rank = None, None, [], start.rank
    if t.init_from == "resume":  # the run's identity follows the checkpoint (resume.py)
        # the metadata; tensors are read by engine.load
        ckpt = resume.open_to_resume(t.out_dir, t.resume_iter, start.may_fall_back, rank, set_aside)
        resumed = resume.reconcile(ckpt.meta, m, t, start.given, start.asked)
        m, t = resumed.model_cfg, resumed.train_cfg
        for line in resumed.notes() if rank == 0 else []:
            print(line, flush=True)
    data_dir = resolve_data_dir(t.dataset, t.data_dir)
    check_data(data_dir, m.block_size)
    model = build_model(m, t, start.iteration)
    check_tokens_fit(data_dir, model.config.vocab_size)
    if m.block_size < model.config.block_size:
        model.crop_block_size(m.block_size)
    if t.activation_checkpointing:
        checkpoint_blocks_(model)
    flops_per_token = model.flops_per_token()  # before experts are sharded: the whole model's active params
    if rank == 0:
        print(f"parameters: {model.get_num_params() / 1e6:.2f}M total, "
              f"{model.get_num_params(active=True) / 1e6:.2f}M active per token", flush=True)
    if engine_factory is None:
        device, dtype = resolve_device(t)
        engine = LocalEngine(model, t, device, dtype)
    else:
        engine = engine_factory(model, t)
    start_iter, best_val, train_s = 0, 1e9, 0.0
    if ckpt is not None:
        state, ckpt = resume.load_to_resume(engine, ckpt, start.may_fall_back, set_aside)
        start_iter, best_val = state["iter_num"], state["best_val_loss"]
        train_s = state.get("train_s", 0.0)  # absent from checkpoints written before it was recorded
    if engine.rank == 0:
        log = metrics.MetricsLog(metrics.make_sinks(t, to_dict(m, t)), metrics.progress_bar(t, start_iter))
        if ckpt is not None and not t.eval_only:
            record = metrics.resume_record(t.out_dir, start_iter, ckpt.meta["topology"], engine.topology())
            record.update({k: v for k, v in (("followed", resumed.followed), ("changed", resumed.changed),
                                             ("set_aside", set_aside)) if v})
            log.event(record, metrics.describe_resume(record))
    else:
        log = metrics.MetricsLog([], echo=False)
    peak = metrics.device_peak_flops(engine.device, engine.compute_dtype, t.peak_tflops)
    try:
        result = run_loop(engine, Batches(data_dir, m.block_size, t.batch_size, engine.device, t.seed), t, log,
                          start_iter, best_val, flops_per_token, peak, train_s)
    except BaseException:
        log.close(failed=True)
        raise
    log.close()
    return result


def run_loop(engine: Engine, batches: Batches, t: TrainConfig, log: metrics.MetricsLog, iter_num: int,
             best_val: float, flops_per_token: int, peak_flops: float | None, train_s: float = 0.0) -> dict:
    """nanoGPT's loop over the engine: eval and checkpoint, step, guard, log; stop on a signal after a save."""
    model = engine.module
    my_micro = shard(engine.micro_batches, engine.rank, engine.world_size)
    tokens_per_iter = engine.micro_batches * t.batch_size * model.config.block_size
    log.print(f"tokens per iteration: {tokens_per_iter:,}")
    tally = metrics.RoutingTally(model.moe_layers()) if t.log_moe_stats and model.moe_layers() else None
    result: dict = {"train_losses": []}
    t0, running_mfu, local_iter = time.time(), None, 0
    # train_s: seconds spent in training steps (evaluation and checkpoints excluded), carried across
    # resumes in the checkpoint: runs compare on it
    preemption = Preemption.install()  # SIGTERM/SIGINT/SIGUSR1: finish the step, save, stop
    try:
        while True:
            lr = get_lr(iter_num, t)
            if replica_check_due(t, iter_num):  # before an eval's save can write diverged copies
                engine.check_replicas(iter_num)
            if iter_num % t.eval_interval == 0 or t.eval_only:  # eval_only: at any checkpoint, a stop's too
                # may_save: not before this process has trained. A resumed run would otherwise save
                # again the checkpoint it just loaded: wasted I/O, and a replace of iter_N/ itself.
                best_val = evaluate_and_save(engine, batches, t, log, iter_num, best_val, tokens_per_iter, result,
                                             train_s, may_save=local_iter > 0)
            if t.eval_only or iter_num > t.max_iters:
                break
            logging = iter_num % t.log_interval == 0
            if t.profile and local_iter == PROFILE_AFTER:  # past warm-up (and compilation)
                prof, prof_ms = profiling.profiler(str(engine.device).split(":")[0]), 0.0
                prof.start()
            step_t0 = time.time()
            losses, grad_norm, stop_requested = train_step(engine, batches, t, my_micro, iter_num, lr,
                                                           lambda: preemption.requested is not None,
                                                           tally if logging else None)
            if t.profile and PROFILE_AFTER <= local_iter < PROFILE_AFTER + profiling.STEPS:
                prof_ms += (time.time() - step_t0) * 1000
                if local_iter == PROFILE_AFTER + profiling.STEPS - 1:
                    prof.stop()
                    report_profile(prof, engine, t, log, prof_ms)
            check_finite({"loss": float(losses[0]), "gradient norm": grad_norm}, iter_num, t.out_dir)
            result["train_losses"].append(float(losses[0]))
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            train_s += t1 - step_t0
            if logging:
                if local_iter >= 5:  # past compilation and warm-up; an EMA as in nanoGPT
                    mfu = metrics.mfu(flops_per_token, tokens_per_iter / engine.world_size / dt, peak_flops)
                    running_mfu = mfu if running_mfu is None or mfu is None else 0.9 * running_mfu + 0.1 * mfu
                log_step(engine, t, log, tally, iter_num, lr, losses, grad_norm, dt, tokens_per_iter, running_mfu,
                         train_s)
            log.advance({"loss": f"{float(losses[0]):.4f}", "tok/s": f"{tokens_per_iter / dt:.0f}"})
            iter_num += 1
            local_iter += 1
            if stop_requested:  # preempted: save where the next iteration starts, then leave the loop
                save(engine, t, iter_num, best_val, train_s)
                log.print(f"stopped by {preemption.requested or 'a signal to another rank'} before iteration "
                          f"{iter_num}; checkpoint saved to {t.out_dir}; continue with --init_from=resume")
                result["stopped_by_signal"] = True
                break
    finally:
        preemption.release()
    return result


PROFILE_AFTER = 5  # warm-up steps before --profile measures


def replica_check_due(t: TrainConfig, iter_num: int) -> bool:
    """Whether the replica guard runs before this iteration: every replica_check_interval (-1: eval_interval)."""
    interval = t.eval_interval if t.replica_check_interval == -1 else t.replica_check_interval
    return interval > 0 and iter_num % interval == 0


def report_profile(prof, engine: Engine, t: TrainConfig, log: metrics.MetricsLog, wall_ms: float):
    """Rank 0 prints the step's breakdown and writes out_dir/profile.json."""
    if engine.rank != 0:
        return
    ranges = profiling.totals(prof, str(engine.device).split(":")[0])
    rows = profiling.report(ranges, wall_ms, profiling.STEPS)
    log.print(profiling.write(rows, t.out_dir, wall_ms, profiling.STEPS))


def evaluate_and_save(engine: Engine, batches: Batches, t: TrainConfig, log: metrics.MetricsLog, iter_num: int,
                      best_val: float, tokens_per_iter: int, result: dict, train_s: float, may_save: bool) -> float:
    """Eval both splits; checkpoint when val improved (or always_save_checkpoint) and `may_save`.
    Returns the best val loss.

    `train_s`, the step time spent so far, goes into the record: val loss against training time.
    """
    losses = estimate_loss(engine, batches, t, iter_num)
    check_finite({"val loss": losses["val"]}, iter_num, t.out_dir)
    result.update(losses)
    log({"iter": iter_num, "tokens": iter_num * tokens_per_iter, "train_loss": losses["train"],
         "val_loss": losses["val"], "lr": get_lr(iter_num, t), "train_s": train_s},
        f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    if losses["val"] < best_val or t.always_save_checkpoint:
        best_val = min(best_val, losses["val"])
        if may_save:
            save(engine, t, iter_num, best_val, train_s)
            log.print(f"saving checkpoint to {t.out_dir}")
    return best_val


def save(engine: Engine, t: TrainConfig, iter_num: int, best_val: float, train_s: float):
    """A checkpoint from which training continues at `iter_num`, written only while this run still owns out_dir."""
    rank0_decides(lambda: run_lock.ensure_held(t.out_dir), engine.rank)  # every rank stops if rank 0 lost it
    model_cfg = engine.module.config
    engine.save(t.out_dir, {"iter_num": iter_num, "best_val_loss": best_val, "train_s": train_s,
                            "model_args": asdict(model_cfg), "config": to_dict(model_cfg, t)})


def restore(engine: Engine, out_dir: str, iteration: int = -1) -> dict:
    """Load the newest committed checkpoint in out_dir (or iter_`iteration`) into the engine; return its state."""
    return engine.load(checkpoint.open_checkpoint(out_dir, iteration))


def train_step(engine: Engine, batches: Batches, t: TrainConfig, micro_ids: list[int], iter_num: int, lr: float,
               stop_asked: Callable[[], bool], tally) -> tuple[torch.Tensor, float | None, bool]:
    """One optimizer step over this rank's micro-batches of the global batch.

    Returns the global mean (loss, ce, aux, z), the gradient norm, and whether any rank
    was asked to stop: stop_asked() is read after the update, so a signal during this step
    stops after it, and the flag rides in the all-reduce of the losses the step does
    anyway, so every rank stops (and saves) at the same step boundary. All three reach
    the host in one copy (to_host).
    """
    model = engine.module
    parts = []  # (loss, ce, aux, z) per micro-batch, kept on the device: one sync per step, not four per micro
    for micro in micro_ids:
        x, y = batches.get("train", iter_num, micro)
        with record_function("forward"):  # named ranges for --profile (a few µs without one)
            _, loss = engine.forward(x, y)
        with record_function("backward"):
            engine.backward(loss)
        ll = model.last_losses
        zero = torch.zeros((), device=loss.device)
        parts.append(torch.stack([loss.detach().float(), ll["ce"].float(), ll.get("aux_loss", zero).float(),
                                  ll.get("z_loss", zero).float()]))
        if tally is not None:
            tally.add()
    with record_function("optimizer"):
        grad_norm = engine.step(lr)
    layers = model.moe_layers()
    if model.config.bias_update_rate > 0 and layers:  # one all-reduce for every layer's load (a dense model has none)
        loads = engine.all_reduce(torch.stack([layer.load for layer in layers]))
        for layer, load in zip(layers, loads):
            layer.update_bias(model.config.bias_update_rate, load)
    device = parts[0].device
    stop_flag = torch.tensor([float(stop_asked())], dtype=torch.float64).to(device, non_blocking=True)
    reduced = engine.all_reduce(torch.cat([torch.stack(parts).double().sum(0), stop_flag]))
    norm = grad_norm.detach().double().view(1).to(device) if grad_norm is not None else reduced.new_zeros(1)
    host = to_host(torch.cat([reduced, norm]))
    return host[:4] / engine.micro_batches, None if grad_norm is None else float(host[5]), bool(host[4] > 0)


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """The step's one device-to-host copy (losses, stop flag, gradient norm): on a GPU the host
    waits here for the step's kernels; everything else in a step stays on the device
    (tests/test_train.py counts the reads)."""
    return tensor.cpu()


def log_step(engine: Engine, t: TrainConfig, log: metrics.MetricsLog, tally, iter_num: int, lr: float,
             losses: torch.Tensor, grad_norm: float | None, dt: float, tokens_per_iter: int,
             running_mfu: float | None, train_s: float):
    """One metrics.jsonl record (and stdout line) for a logged step; the routing reduce is a collective."""
    model = engine.module
    rec = {"iter": iter_num, "tokens": (iter_num + 1) * tokens_per_iter, "loss": float(losses[0]),
           "ce_loss": float(losses[1]), "aux_loss": float(losses[2]), "z_loss": float(losses[3]), "lr": lr,
           "grad_norm": grad_norm, "time_ms": dt * 1000, "train_s": train_s, "tokens_per_sec": tokens_per_iter / dt,
           "mfu": running_mfu}
    if str(engine.device).startswith("cuda"):  # the high-water mark of this process's GPU allocations
        rec["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if tally is not None:
        rec["moe"] = tally.reduce(engine.all_reduce, engine.micro_batches, model.config.bias_update_rate > 0)
    mfu_text = "n/a" if running_mfu is None else f"{running_mfu * 100:.2f}%"
    log(rec, f"iter {iter_num}: loss {rec['loss']:.4f}, time {dt * 1000:.2f}ms, "
             f"tok/s {rec['tokens_per_sec']:.0f}, mfu {mfu_text}")
