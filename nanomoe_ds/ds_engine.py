"""The DeepSpeed path: the engine adapter (the Engine of engine.py over a DeepSpeed engine) and the entry point.

Split by job, one ds_* file each: the JSON's reconciliation is ds_config.py (pure), making our
MoE known to the engine is ds_moe.py, checkpoints are ds_checkpoint.py, DeepSpeed's private
group registry is behind ds_groups.py. Only ds_* modules import DeepSpeed.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import os
import sys

import torch
import torch.distributed as dist

from . import checkpoint, ds_checkpoint, ds_groups, grad_order, guards, launch_env, precision, train_state
from .ds_config import activation_checkpointing, as_run, fit_ep_size, json_dtype, load_ds_config
from .config import ConfigError, GPTConfig, TrainConfig
from .data import fit_accumulation
from .model import GPT
from .ds_moe import adopt_moe_

# ---------------------------------------------------------------- engine adapter
class DeepSpeedEngine:
    """The trainer's engine interface over a DeepSpeed engine."""

    def __init__(self, engine, train_cfg: TrainConfig, micro_batches: int, clip_ourselves: bool,
                 ordering: grad_order.CanonicalReduction | None = None):
        self.engine, self.module, self.train_cfg = engine, engine.module, train_cfg
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.micro_batches = micro_batches  # global micro-batches per step (data.fit_accumulation)
        self.device = str(engine.device)
        self.compute_dtype = (torch.bfloat16 if engine.bfloat16_enabled() else
                              torch.float16 if engine.fp16_enabled() else torch.float32)
        self.clip_ourselves = clip_ourselves
        self.ordering = ordering  # the ZeRO reduction's fixed order (grad_order.py); None where already ordered

    def forward(self, x, y, **kwargs):
        return self.engine(x, y, **kwargs)  # DeepSpeed's forward passes keywords on to the module

    def backward(self, loss):
        self.engine.backward(loss)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # DeepSpeed counts micro-steps in step(); it only updates on the boundary

    def step(self, lr: float) -> torch.Tensor | None:
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        if self.ordering is not None:
            self.ordering.check_step()  # before anything is applied: a mismatch leaves the weights as they were
        norm = None
        if self.clip_ourselves:
            norm = clip_grad_norm_global_(self.module, self.train_cfg.grad_clip)
        self.engine.step()
        if not self.engine.was_step_applied():
            return None  # fp16 overflow: the loss scaler skipped this step (not divergence)
        if norm is None:
            norm = self.engine.get_global_grad_norm()  # a float or a tensor, as the ZeRO stage has it
        if norm is None:
            return None  # this set-up does not compute it
        return torch.as_tensor(norm, dtype=torch.float64, device=self.engine.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over all ranks; goes through the engine's device, as NCCL only takes GPU tensors."""
        x = t.to(self.engine.device, copy=True)
        dist.all_reduce(x)
        return x.to(t.device)

    def check_replicas(self, iter_num: int):
        """Every copy of every tensor is the same on the ranks that hold one (guards.py); ZeRO-3 keeps no copies."""
        if self.engine.zero_optimization_stage() == 3:
            return
        replicas: dict = {"": (None, [])}  # dense weights and router biases: on every rank
        for name, p in self.module.named_parameters():
            key = p.group_name if ds_groups.is_expert(p) else ""
            group = ds_groups.replica_group_of(p)
            replicas.setdefault(key, (group, []))[1].append((name, p))
        replicas[""][1].extend(train_state.state_buffers(self.module))
        guards.check(replicas, iter_num, self.engine.device)

    def topology(self) -> dict:
        return train_state.topology("deepspeed", self.world_size, self.train_cfg.ep_size,
                                    self.engine.zero_optimization_stage(), str(self.compute_dtype).removeprefix("torch."))

    def save(self, out_dir: str, state: dict):
        ds_checkpoint.save(self.engine, self.module, out_dir, state, self.topology(), self.train_cfg.keep_last)

    def load(self, ckpt: checkpoint.Checkpoint) -> dict:
        """Restore this rank's share from a checkpoint saved at any topology; return its training state."""
        how = ds_checkpoint.load(self.engine, self.module, ckpt, self.topology())
        if self.rank == 0:
            print(how, flush=True)
        return ckpt.meta


def undo_initial_step_(optimizer):
    """Undo the AdamW step DeepSpeed's ZeRO-0 bf16/fp16 wrapper takes on zero gradients when it is built.

    FP16_UnfusedOptimizer creates the optimizer state by stepping once (DeepSpeed 0.19.8,
    initialize_optimizer_states): the step count then starts at 1, so Adam's bias correction
    shrinks the first real update (to about 0.74x at beta2=0.95), and weight decay has already
    shrunk the fp32 masters once. Fresh state, and masters copied back from the weights they
    were made from, make its first step the plain loop's.
    """
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    if not isinstance(optimizer, FP16_UnfusedOptimizer):
        return
    optimizer.optimizer.state.clear()
    with torch.no_grad():
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for weight, master in zip(low, high):
                master.copy_(weight.float())


def clip_grad_norm_global_(model: GPT, max_norm: float) -> torch.Tensor:
    """Clip by the true global norm where ZeRO-0 can't (upstream #8475: experts) or won't tell it
    (fp32: DeepSpeed clips without reporting the norm). Dense models are the case without experts.

    After the boundary backward, dense grads are identical on every rank, expert
    grads identical within the expert-data-parallel group. Each expert counts once
    if its squared norm is summed over the expert-parallel group only.
    """
    # Squared norms per tensor in one foreach call per bucket (not three ops per parameter),
    # summed in float64: the dense bucket, then one bucket per expert-parallel group.
    buckets: dict = {None: ([], None)}
    for p in model.parameters():
        if p.grad is not None:
            group = ds_groups.expert_group_of(p)  # None: dense, or experts replicated on every rank (ep_size 1)
            key = None if group is None else p.group_name
            buckets.setdefault(key, ([], group))[0].append(p.grad)
    device = next(model.parameters()).device  # NCCL reduces GPU tensors only
    total = torch.zeros((), dtype=torch.float64, device=device)
    for name in sorted(buckets, key=lambda k: "" if k is None else k):  # the same order on every rank
        grads, group = buckets[name]
        sq = torch.zeros((), dtype=torch.float64, device=device)
        if grads:
            sq = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().square().sum()
        if group is not None:
            dist.all_reduce(sq, group=group)
        total += sq
    norm = total.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for grads, _ in buckets.values():
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return norm


# ---------------------------------------------------------------- entry point
def make_engine_factory(model_cfg: GPTConfig, train_cfg: TrainConfig):
    """Init distributed, check the set-up, and return a factory that wraps the model in an engine."""
    ds_cfg = load_ds_config(train_cfg.deepspeed_config)  # before any process-group work: fail fast
    # train() wraps the blocks
    train_cfg.activation_checkpointing = activation_checkpointing(ds_cfg, model_cfg, train_cfg)
    import deepspeed
    # CPU runs: skip DeepSpeed's shared-memory op, a 20 s JIT build that training never uses.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    os.environ.update(launch_env.distributed_env(os.environ))  # srun: translate SLURM's variables
    timeout = datetime.timedelta(seconds=train_cfg.dist_timeout)
    set_group_timeout(timeout)
    try:
        deepspeed.init_distributed(timeout=timeout)
    except RuntimeError as e:  # torch's DistNetworkError: the rendezvous store could not listen
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        port = os.environ.get("MASTER_PORT", "29500")
        raise ConfigError(f"the rendezvous port {port} on {os.environ.get('MASTER_ADDR', 'this node')} is in use "
                          "(a previous job's ranks still exiting, or another job on this node); choose another "
                          "with the launcher's --master_port=N (torchrun: --master-port, or set MASTER_PORT)") from None
    world = dist.get_world_size()
    # e.g. an elastic restart on fewer ranks
    train_cfg.ep_size, fitted = fit_ep_size(train_cfg.ep_size, world, model_cfg.num_experts)
    if fitted and dist.get_rank() == 0:
        print(fitted, flush=True)
    # Refuse a contradiction now, before the model is built; the factory reconciles again with the configs a
    # resume settles (resume.py).
    micro_batches = fit_accumulation(train_cfg.gradient_accumulation_steps, world, train_cfg.batch_size)[0]
    reconcile_for(ds_cfg, model_cfg, train_cfg, micro_batches, world)

    def factory(model: GPT, train_cfg: TrainConfig) -> DeepSpeedEngine:
        # train_cfg, not t: a resume may have taken the run's batch and seed from its checkpoint (resume.py)
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        micro_batches, changed = fit_accumulation(train_cfg.gradient_accumulation_steps, world, train_cfg.batch_size)
        if changed and dist.get_rank() == 0:
            print(changed, flush=True)
        final_cfg, clip_ourselves = reconcile_for(ds_cfg, model.config, train_cfg, micro_batches, world, say=True)
        if model.config.use_moe:
            adopt_moe_(model, train_cfg.ep_size)
        groups = split_params_into_different_moe_groups_for_optimizer(model.optimizer_groups(train_cfg.weight_decay))
        engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=final_cfg)
        undo_initial_step_(engine.optimizer)
        ordering = grad_order.install(engine, model, train_cfg.check_grad_order)
        if world == 1 and engine.zero_optimization_stage() == 0:
            # A sum over one rank: skip DeepSpeed's flatten-reduce-unflatten pass over every gradient.
            engine.enable_backward_allreduce = False
        if train_cfg.compile:  # torch.compile of the module in place (nn.Module.compile): parameter names stay
            engine.compile()
        return DeepSpeedEngine(engine, train_cfg, micro_batches, clip_ourselves, ordering)

    return factory


def reconcile_for(ds_cfg: dict, model_cfg: GPTConfig, train_cfg: TrainConfig, micro_batches: int, world: int,
                  say: bool = False) -> tuple[dict, bool]:
    """The DeepSpeed config these ranks run (ds_config.reconcile), and whether the trainer clips itself.
    `micro_batches` is train_cfg.gradient_accumulation_steps fitted to `world`; `say` prints rank 0's notes."""
    from deepspeed.accelerator import get_accelerator
    device_kind = get_accelerator().device_name()  # "cuda" or "cpu": the ranks' device
    train_cfg = dataclasses.replace(train_cfg, gradient_accumulation_steps=micro_batches)
    ds_cfg, note = as_run(ds_cfg, model_cfg, train_cfg, world, device_kind, precision.supports(device_kind))
    if note and say and dist.get_rank() == 0:
        print(note, flush=True)
    # ZeRO-0 computes the norm wrongly with experts (#8475), and in fp32 (a plain torch optimizer)
    # it clips without reporting the norm: the trainer clips there itself. (Not under fp16: its
    # gradients are loss-scaled; reconcile refuses fp16 with ZeRO-0 for MoE.)
    zero0 = ds_cfg.get("zero_optimization", {}).get("stage", 0) == 0
    clip_ourselves = zero0 and (model_cfg.use_moe or json_dtype(ds_cfg) == "float32")
    if clip_ourselves:
        ds_cfg["gradient_clipping"] = 0.0
    return ds_cfg, clip_ourselves


def set_group_timeout(timeout: datetime.timedelta):
    """Make every process group of this process wait at most `timeout` in a collective.

    init_distributed's timeout reaches the default group only. DeepSpeed makes its
    data-parallel and expert groups with `new_group(ranks)`, and torch gives such
    groups its own 30-minute default rather than the default group's timeout (checked:
    an all_reduce on a new gloo group outlived a 5 s init timeout). So the defaults
    torch reads for new groups are set too, before any group exists.
    """
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def run(model_cfg: GPTConfig, train_cfg: TrainConfig, given: frozenset = frozenset()) -> int:
    """Run a DeepSpeed training; return the process's exit code (the entry point ends the process with shutdown)."""
    from .trainer import train
    try:
        train(model_cfg, train_cfg, make_engine_factory(model_cfg, train_cfg), given)
        return 0
    except BaseException as e:
        status = launch_env.exit_status(e)
        if status is not None:
            return status
        line = launch_env.collective_failure(str(e), launch_env.distributed_frames(e), train_cfg.dist_timeout)
        if line is None:  # not another rank's failure: a bug, whose traceback is the report
            import traceback
            traceback.print_exc()
            return 1
        launch_env.report_error(line)  # one line per surviving rank, not a gloo traceback
        return 1


def shutdown(code: int):
    """End a distributed process without gloo's abort at interpreter exit (PyTorch #190489)."""
    if dist.is_initialized():
        if code == 0:
            dist.barrier()
        dist.destroy_process_group()
    if "mpi4py" in sys.modules:  # launched by mpirun: DeepSpeed discovered ranks through MPI
        from mpi4py import MPI
        MPI.Finalize()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
