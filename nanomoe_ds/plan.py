"""The plan of a run before it runs: what each rank holds, moves and computes, and whether it fits.

Pure functions of the configs, the world size and the DeepSpeed JSON as the trainer reconciles
it (ds_config.reconcile, fit_accumulation, fit_ep_size: the same calls, so the plan describes the
run the trainer would start). No process group, no DeepSpeed import: the model is built on the
meta device, so a 64-expert GPT-2-medium costs nothing to plan on a laptop.

Model states are counted the way DeepSpeed 0.19.8 lays them out for this trainer (measured,
tests/test_plan.py counts the tensors of real gloo ranks and gets the same bytes):
- ZeRO-1/2 flatten each optimizer group into one buffer padded to 2 x its data-parallel size,
  keep an fp32 master copy of this rank's partition and AdamW's moments beside it, and hold the
  gradients of every parameter that touches the partition at the step boundary; ZeRO-1 keeps whole
  gradients (and its reduce bucket) between the micro-batches of a step, ZeRO-2 only the partition.
- Expert tensors hold ep_size-th of the experts; their groups are partitioned over the
  expert-data-parallel group (world / ep_size ranks), DeepSpeed's MoE groups, split at
  178,956,971 elements as deepspeed.moe.utils does.
- ZeRO-0 keeps everything whole; bf16/fp16 add fp32 masters. ZeRO-3 (dense only) partitions each
  parameter, keeps parameters of at most stage3_param_persistence_threshold elements whole on
  every rank, and holds its gradient partition and reduce bucket throughout.
Activations are what autograd saves for backward, counted per token from the model's code (the
tests compare with saved-tensor hooks). Ideas from DeepSpeed's estimate_zero2/3_model_states_mem_needs
and the MoE memory discussions of Megatron-LM (#4050) and Megatron-Bridge (#3910).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

from . import ds_config, precision
from .config import ConfigError, GPTConfig, TrainConfig
from .data import fit_accumulation
from .model import GPT

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
MOE_GROUP_LIMIT = 178956971  # deepspeed.moe.utils.split_params_into_different_moe_groups_for_optimizer's max_group_size
ADAM_MOMENTS = 2  # exp_avg and exp_avg_sq, fp32, beside each fp32 (master) element
CHECKPOINT_BYTES = 4 * (1 + ADAM_MOMENTS)  # a checkpoint writes fp32 weights and both moments, each element once


@dataclass(frozen=True)
class Device:
    """What the plan knows of the ranks' device; 0 means unknown."""
    memory: int = 0  # bytes
    tflops: float = 0.0  # peak in the run's dtype
    link_gbps: float = 0.0  # gigabits per second one rank sends over (400 for 400 Gb/s InfiniBand)


@dataclass(frozen=True)
class Layout:
    """How the engine factory lays the run out on its ranks (layout_of reads it from the configs)."""
    world_size: int = 1
    ep_size: int = 1
    zero_stage: int | None = None  # None: the single-device engine (plain PyTorch)
    dtype: str = "float32"  # compute dtype; DeepSpeed also stores the weights in it
    micro_batches: int = 1  # global micro-batches per step, fitted to the ranks
    activation_checkpointing: bool = False
    offload: bool = False  # ZeRO's offload_optimizer to the CPU
    reduce_bucket: int = 500_000_000  # elements (DeepSpeed's defaults below)
    allreduce_bucket: int = 500_000_000
    multi_rank_allreduce: bool = True  # ZeRO-1/2 reduce gradient buckets with all-reduce, not reduce
    persistence_threshold: int = 100_000  # ZeRO-3
    max_live_parameters: int = 1_000_000_000  # ZeRO-3

    @property
    def micro_per_rank(self) -> int:
        return self.micro_batches // self.world_size


@dataclass(frozen=True)
class ModelStates:
    """Bytes of one rank's training state: what it holds after a step, and on top of that in backward."""
    weights: int  # parameters as the engine stores them (ZeRO-1/2: padded flat buffers), and buffers
    masters: int  # fp32 master weights (ZeRO: this rank's partition); 0 where the weights are fp32 already
    moments: int  # AdamW's two moments
    kept: int  # also held after a step: ZeRO-3's gradient partition and bucket, offload's staging
    grads: int  # held at the step boundary, on top of the above
    accumulating: int  # held between the micro-batches of a step instead (0 with one micro-batch a rank)
    bucket: int  # ZeRO-1/2's reduce bucket during a backward, or ZeRO-0's flattened all-reduce
    host: int  # the part of masters, moments and kept in CPU memory (offload_optimizer)

    @property
    def resting(self) -> int:
        return self.weights + self.masters + self.moments + self.kept

    @property
    def device_buffers(self) -> int:
        """ZeRO's buffers on the device: the reduce bucket, and what of `kept` is not in CPU memory."""
        staged_on_host = self.host - self.masters - self.moments if self.host else 0
        return self.bucket + self.kept - staged_on_host


@dataclass(frozen=True)
class Activations:
    """Bytes one micro-batch keeps on a rank between its forward and its backward."""
    saved: int  # what autograd saves (with checkpointing: each block's input, and the head's)
    recompute: int  # with checkpointing, one block recomputed in backward; else 0
    transient: int  # the returned logits and cross-entropy's fp32 copy; autocast's low-precision weight copies
    dispatch: int  # of `saved`: the MoE's permuted token rows (and the expert-parallel exchange's)

    @property
    def peak(self) -> int:
        return self.saved + self.recompute + self.transient


@dataclass(frozen=True)
class Advice:
    """What to change, given the device's memory."""
    max_batch: int  # the largest micro-batch that fits as configured (0: none)
    max_batch_checkpointed: int  # ... with activation checkpointing
    ep_peaks: dict  # ep_size (dividing ranks and experts) -> peak bytes per rank
    verdict: str | None  # one line saying why the run cannot fit, or None


@dataclass(frozen=True)
class Plan:
    layout: Layout
    device: Device
    batch_size: int
    block_size: int
    states: ModelStates  # the rank that holds the most
    acts: Activations  # as configured
    acts_other: Activations  # the other way (with checkpointing where it is off, and back)
    peak: int  # device bytes at the highest point of a step
    collectives: dict  # (kind, group size) -> bytes one rank hands to it per step
    flops_per_token: int  # model FLOPs, forward and backward, on active parameters (GPT.flops_per_token)
    params: int  # the whole model's
    advice: Advice | None  # None where the device's memory is not given


# ---------------------------------------------------------------- the run's layout
def target_support(device_kind: str) -> precision.Support:
    """What the planned device computes in: a GPU is assumed to have bf16 (Ampere or newer); a CPU is asked."""
    if device_kind == "cuda":
        return precision.Support(bfloat16=True, float16=True)
    return precision.supports(device_kind)


def layout_of(model_cfg: GPTConfig, train_cfg: TrainConfig, world_size: int, ds: dict | None,
              device_kind: str = "cuda") -> Layout:
    """The layout the trainer builds, through the trainer's own reconciliation (ds_config.as_run, as ds_engine.reconcile_for)."""
    support = target_support(device_kind)
    if ds is None:
        if world_size != 1:
            raise ConfigError(f"world_size={world_size} needs DeepSpeed: add --deepspeed_config "
                              "(e.g. ds_configs/zero1.json)")
        dtype = precision.default_dtype(device_kind, support) if train_cfg.dtype == "auto" else train_cfg.dtype
        return Layout(dtype=precision.check(dtype, device_kind, support),
                      micro_batches=train_cfg.gradient_accumulation_steps,
                      activation_checkpointing=train_cfg.activation_checkpointing)
    ep_size, _ = ds_config.fit_ep_size(train_cfg.ep_size, world_size, model_cfg.num_experts)
    micro, _ = fit_accumulation(train_cfg.gradient_accumulation_steps, world_size, train_cfg.batch_size)
    checkpointing = ds_config.activation_checkpointing(ds, model_cfg, train_cfg)
    fitted = dataclasses.replace(train_cfg, gradient_accumulation_steps=micro, ep_size=ep_size)
    ds, _ = ds_config.as_run(ds, model_cfg, fitted, world_size, device_kind, support)
    dtype = ds_config.json_dtype(ds)
    if ds.get("data_types", {}).get("grad_accum_dtype") not in (None, dtype.replace("bfloat16", "bf16")):
        raise ConfigError("the planner does not model data_types.grad_accum_dtype; remove it from the JSON to plan")
    zero = ds.get("zero_optimization", {})
    return Layout(world_size, ep_size, zero.get("stage", 0), dtype, micro, checkpointing,
                  offload=zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None),
                  reduce_bucket=int(zero.get("reduce_bucket_size", 500_000_000)),
                  allreduce_bucket=int(ds.get("allreduce_bucket_size", 500_000_000)),
                  multi_rank_allreduce=zero.get("use_multi_rank_bucket_allreduce", True),
                  persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 100_000)),
                  max_live_parameters=int(zero.get("stage3_max_live_parameters", 1_000_000_000)))


@dataclass(frozen=True)
class Inventory:
    """What the plan reads of a model, once: its parameters in optimizer-group order, buffers, FLOPs."""
    config: GPTConfig
    groups: tuple  # the model's optimizer groups (decay, no decay): ((elements, expert?), ...) each, in order
    buffers: int  # bytes: router biases and loads, which no engine casts
    moe_layers: int
    flops_per_token: int  # GPT.flops_per_token: what MFU counts, one formula

    @property
    def numels(self) -> list[int]:
        return [numel for group in self.groups for numel, _ in group]


def inventory(model_cfg: GPTConfig) -> Inventory:
    """The model built on the meta device (shapes, no storage) and read: exact parameter lists for any size."""
    with torch.device("meta"):
        model = GPT(dataclasses.replace(model_cfg))
    experts = {id(p) for layer in model.moe_layers() for p in layer.experts.parameters()}
    groups = tuple(tuple((p.numel(), id(p) in experts) for p in g["params"]) for g in model.optimizer_groups(0.0))
    return Inventory(model_cfg, groups, sum(b.numel() * b.element_size() for b in model.buffers()),
                     len(model.moe_layers()), model.flops_per_token())


# ---------------------------------------------------------------- model states
def optimizer_groups(inv: Inventory, ep_size: int) -> list[tuple[list[int], bool]]:
    """(elements per parameter on one rank, expert group?) of each optimizer group, in DeepSpeed's order:
    the model's decay and no-decay groups, then their expert parameters in groups of their own (split at
    MOE_GROUP_LIMIT), empty groups dropped, as ds_engine's factory hands them to deepspeed.initialize."""
    dense = [([numel for numel, expert in g if not expert], False) for g in inv.groups]
    moe = []
    for g in inv.groups:
        chunk, size = [], 0
        for numel in (numel // ep_size for numel, expert in g if expert):
            if size + numel > MOE_GROUP_LIMIT:
                moe.append((chunk, True))
                chunk, size = [], 0
            chunk, size = chunk + [numel], size + numel
        moe.append((chunk, True))
    return [(numels, expert) for numels, expert in dense + moe if numels]


def param_parts(numels: list[int], size: int) -> list[tuple[int, int, int]]:
    """(elements, first partition, last partition) of each parameter of a flat group cut into partitions of
    `size`: the partitions it touches, whose ranks hold its whole gradient at the boundary (DeepSpeed's
    get_partition_info)."""
    parts, offset = [], 0
    for numel in numels:
        parts.append((numel, offset // size, (offset + numel - 1) // size))
        offset += numel
    return parts


def zero_partition(numels: list[int], dp: int, part: int) -> tuple[int, int, int]:
    """ZeRO-1/2's flat group: (padded elements, partition elements, elements of the parameters that touch
    partition `part`)."""
    padded = -(-sum(numels) // (2 * dp)) * (2 * dp)  # DeepSpeed aligns to nccl_start_alignment_factor (2) x dp
    size = padded // dp
    return padded, size, sum(numel for numel, first, last in param_parts(numels, size) if first <= part <= last)


def zero12_states(groups: list, layout: Layout, rank: int, buffers: int) -> ModelStates:
    """ZeRO-1/2 on rank `rank`: flat weights, fp32 partitions, gradients of the touching parameters."""
    width = DTYPE_BYTES[layout.dtype]
    weights, partition, touching, whole = buffers, 0, 0, 0
    for numels, expert in groups:
        dp = layout.world_size // layout.ep_size if expert else layout.world_size
        padded, size, touched = zero_partition(numels, dp, rank // layout.ep_size if expert else rank)
        weights, partition, touching = weights + padded * width, partition + size, touching + touched
        whole += sum(numels)
    grads = touching * width
    accumulating = 0
    if layout.micro_per_rank > 1:  # ZeRO-1 keeps whole gradients and its bucket; ZeRO-2 reduces into the partition
        accumulating = (whole + layout.reduce_bucket) * width if layout.zero_stage == 1 else grads
    optimizer = partition * 4 * (1 + ADAM_MOMENTS)
    kept = host = 0
    if layout.offload:  # masters, moments, the fp32 gradient partition and staging copies live in CPU memory
        largest = max(max(numels) for numels, _ in groups)
        staged = partition * (4 + width) + (touching + largest) * width
        # the device keeps one buffer as large as the largest parameter
        kept, host, grads = staged + largest * width, optimizer + staged, 0
        accumulating = 0 if layout.zero_stage == 2 else accumulating
    return ModelStates(weights, partition * 4, partition * 4 * ADAM_MOMENTS, kept, grads, accumulating,
                       layout.reduce_bucket * width, host)


def zero3_states(numels: list[int], layout: Layout, buffers: int) -> ModelStates:
    """ZeRO-3 (dense models): each parameter partitioned, small ones also whole; gradient partition and bucket kept."""
    width, world = DTYPE_BYTES[layout.dtype], layout.world_size
    partition = sum(-(-n // world) for n in numels)
    # small parameters stay whole on every rank beside their partition (on one rank the two are one tensor)
    persistent = sum(n for n in numels if n <= layout.persistence_threshold) if world > 1 else 0
    kept = (partition + layout.reduce_bucket) * width
    host = partition * 4 * (1 + ADAM_MOMENTS) if layout.offload else 0
    return ModelStates(buffers + (partition + persistent) * width, partition * 4, partition * 4 * ADAM_MOMENTS,
                       kept, 0, 0, 0, host)


def model_states(inv: Inventory, layout: Layout, rank: int = 0, groups: list | None = None) -> ModelStates:
    """What rank `rank` allocates for weights, gradients and optimizer state under `layout` (`groups`:
    optimizer_groups(inv, layout.ep_size), when the caller has them)."""
    groups = groups or optimizer_groups(inv, layout.ep_size)
    if layout.zero_stage in (1, 2):
        return zero12_states(groups, layout, rank, inv.buffers)
    if layout.zero_stage == 3:
        return zero3_states(inv.numels, layout, inv.buffers)
    numel = sum(sum(numels) for numels, _ in groups)
    width = 4 if layout.zero_stage is None else DTYPE_BYTES[layout.dtype]  # the plain engine keeps fp32 weights
    masters = numel * 4 if width != 4 else 0  # ZeRO-0 in bf16/fp16: DeepSpeed's fp32 copy of every weight
    reduce = min(numel, layout.allreduce_bucket) * width if layout.zero_stage == 0 and layout.world_size > 1 else 0
    grads = numel * width
    return ModelStates(inv.buffers + numel * width, masters, numel * 4 * ADAM_MOMENTS, 0, grads,
                       grads if layout.micro_per_rank > 1 else 0, reduce, 0)


def heaviest_rank(inv: Inventory, layout: Layout) -> ModelStates:
    """The model states of the rank holding the most. Ranks differ only in ZeRO-1/2's gradients, those of the
    parameters touching their partitions: summed per partition in one pass, at any number of ranks."""
    groups = optimizer_groups(inv, layout.ep_size)
    if layout.zero_stage not in (1, 2):
        return model_states(inv, layout, 0, groups)
    touched = [0] * layout.world_size
    for numels, expert in groups:
        dp = layout.world_size // layout.ep_size if expert else layout.world_size
        per_part = [0] * (dp + 1)
        for numel, first, last in param_parts(numels, zero_partition(numels, dp, 0)[1]):
            per_part[first] += numel
            per_part[last + 1] -= numel
        per_part = list(itertools.accumulate(per_part))
        for rank in range(layout.world_size):
            touched[rank] += per_part[rank // layout.ep_size if expert else rank]
    return model_states(inv, layout, max(range(layout.world_size), key=touched.__getitem__), groups)


# ---------------------------------------------------------------- activations
def kept_assignments(model_cfg: GPTConfig, tokens: int) -> int:
    """(token, expert) rows one MoE layer computes: all T*k dropless, at most capacity_factor of them otherwise."""
    routed = tokens * model_cfg.num_experts_per_tok
    return min(routed, math.ceil(model_cfg.capacity_factor * routed)) if model_cfg.capacity_factor > 0 else routed


def moe_layer_bytes(model_cfg: GPTConfig, tokens: int, width: int, ep_size: int) -> tuple[int, int]:
    """(bytes one MoE layer saves for backward, of which permuted token rows) for `tokens` tokens.

    Per kept row: the gathered input and the expert output (and under expert parallelism the
    received and regrouped copies), the expert's hidden activations (two for GELU, four for
    SwiGLU) and two int64 indices; per token: the fp32 router probabilities (and logits for the
    z-loss), the shared experts' hidden activations."""
    C, hidden, rows = model_cfg.n_embd, model_cfg.expert_hidden, kept_assignments(model_cfg, tokens)
    copies = 2 if ep_size == 1 else 4
    dispatch = rows * copies * C * width
    experts = rows * ((4 if model_cfg.expert_act == "swiglu" else 2) * hidden * width + 16)
    router = tokens * model_cfg.num_experts * 4 * (2 if model_cfg.z_loss_coef > 0 else 1)
    router += tokens * C * 4 if width != 4 else 0  # the router's fp32 copy of its input
    shared = tokens * 2 * model_cfg.num_shared_experts * hidden * width
    return dispatch + experts + router + shared, dispatch


def block_bytes(model_cfg: GPTConfig, layer: int, tokens: int, widths: tuple[int, int],
                ep_size: int) -> tuple[int, int]:
    """(bytes block `layer` saves for backward, of which MoE dispatch) for `tokens` tokens.

    widths: (compute, residual) element sizes; the residual stream stays fp32 under autocast.
    Attention saves the LayerNorm's input and output, q/k/v, its output, and fp32 statistics;
    the MLP its LayerNorm's input and output and the 4C hidden activations before and after GELU."""
    width, residual = widths
    C = model_cfg.n_embd
    norms = 2 * (C * residual + C * width + 8)  # each LayerNorm: input, output, fp32 mean and rstd
    attention = 4 * C * width + 4 * model_cfg.n_head  # q, k, v and the output; fp32 log-sum-exp per head
    masks = 2 * C if model_cfg.dropout > 0 else 0  # bool dropout masks: attention output and MLP output
    per_token = norms + attention + masks
    if not model_cfg.is_moe_layer(layer):
        return tokens * (per_token + 8 * C * width), 0
    moe, dispatch = moe_layer_bytes(model_cfg, tokens, width, ep_size)
    return tokens * per_token + moe, dispatch


def activations(inv: Inventory, batch_size: int, layout: Layout, checkpointed: bool) -> Activations:
    """Bytes one micro-batch of `batch_size` sequences keeps between its forward and backward on one rank."""
    model_cfg = inv.config
    tokens, C = batch_size * model_cfg.block_size, model_cfg.n_embd
    width = DTYPE_BYTES[layout.dtype]
    residual = 4 if layout.zero_stage is None else width  # the plain engine's autocast keeps the stream in fp32
    blocks = [block_bytes(model_cfg, i, tokens, (width, residual), layout.ep_size) for i in range(model_cfg.n_layer)]
    # the head: ln_f's input, output and statistics, fp32 log-softmax over the vocabulary, token ids and targets
    head = tokens * (C * residual + C * width + 8 + 4 * model_cfg.vocab_size + 16)
    # the logits the forward returns (alive until the next one), and cross-entropy's fp32 working copy: the
    # upcast in forward, the gradient of the logits in backward, each beside the saved log-softmax
    transient = tokens * model_cfg.vocab_size * (width + 4)
    if layout.zero_stage is None and width != 4:  # autocast's low-precision weight copies, saved for backward
        transient += sum(inv.numels) * width
    if checkpointed:  # each block keeps its input; its backward recomputes one block at a time
        return Activations(head + model_cfg.n_layer * tokens * C * residual, max(b for b, _ in blocks), transient, 0)
    return Activations(head + sum(b for b, _ in blocks), 0, transient, sum(d for _, d in blocks))


# ---------------------------------------------------------------- a step's collectives
def collectives(inv: Inventory, batch_size: int, layout: Layout) -> dict:
    """{(kind, group size): bytes} one rank hands to each kind of collective in one step: the MoE exchange,
    the gradient reduction and ZeRO's parameter gathers. (Scalars, losses and norms, add a few bytes.)"""
    cfg, width, micro = inv.config, DTYPE_BYTES[layout.dtype], layout.micro_per_rank
    out: dict = {}

    def add(kind: str, group: int, nbytes: int):
        out[(kind, group)] = out.get((kind, group), 0) + nbytes

    if layout.ep_size > 1:  # per MoE layer: counts, rows out, results back; backward: both row exchanges again
        rows = kept_assignments(cfg, batch_size * cfg.block_size) * cfg.n_embd * width
        forwards = 2 if layout.activation_checkpointing else 1  # the recompute repeats the forward's exchanges
        per_layer = forwards * (2 * rows + cfg.num_experts * 8) + 2 * rows
        add("all_to_all", layout.ep_size, micro * inv.moe_layers * per_layer)
    if layout.zero_stage is None or layout.world_size == 1 and layout.zero_stage == 0:
        return out  # one rank: nothing to reduce (ZeRO-1/2/3 still call their reduction, on a group of one)
    if layout.zero_stage == 3:
        numels = inv.numels
        add("reduce_scatter", layout.world_size, micro * sum(numels) * width)
        if layout.world_size > 1:  # gathered for each micro-batch's forward and kept for its backward; the
            # persistent small ones once a step, after the update
            parts = [(-(-n // layout.world_size), n <= layout.persistence_threshold) for n in numels]
            add("all_gather", layout.world_size, sum(part * (1 if kept else micro) for part, kept in parts) * width)
        return out
    reductions = micro if layout.zero_stage == 2 else 1  # ZeRO-2 reduces every micro-batch, 0 and 1 at the boundary
    kind = "all_reduce" if layout.zero_stage == 0 or layout.multi_rank_allreduce else "reduce"
    for numels, expert in optimizer_groups(inv, layout.ep_size):
        dp = layout.world_size // layout.ep_size if expert else layout.world_size
        add(kind, dp, reductions * sum(numels) * width)
        if layout.zero_stage in (1, 2) and dp > 1:  # the updated partitions, gathered into every rank's weights
            add("all_gather", dp, zero_partition(numels, dp, 0)[1] * width)
    return out


def wire_bytes(kind: str, group: int, nbytes: int) -> float:
    """Bytes a rank sends over its links for `nbytes` handed to a ring collective over `group` ranks."""
    if group == 1:
        return 0.0
    share = (group - 1) / group
    return {"all_to_all": share, "all_reduce": 2 * share, "reduce": share, "reduce_scatter": share,
            "all_gather": group - 1}[kind] * nbytes


def step_seconds(plan: Plan) -> tuple[float | None, float | None]:
    """(compute, communication) seconds of one step at the device's peak and link rate (None: not given).
    Their maximum is a lower bound on the step time: perfect overlap, every FLOP at peak."""
    layout, device = plan.layout, plan.device
    tokens = layout.micro_per_rank * plan.batch_size * plan.block_size
    recompute = 4 / 3 if layout.activation_checkpointing else 1.0  # one more forward: 8 FLOPs per 6
    compute = plan.flops_per_token * tokens * recompute / (device.tflops * 1e12) if device.tflops else None
    wire = sum(wire_bytes(kind, group, n) for (kind, group), n in plan.collectives.items())
    comm = wire * 8 / (device.link_gbps * 1e9) if device.link_gbps else None
    return compute, comm


# ---------------------------------------------------------------- the plan
def peak_bytes(states: ModelStates, acts: Activations, layout: Layout) -> int:
    """Device bytes at a step's highest point: the model states on the device, the gradients as the backward
    builds them (ZeRO-1 with several micro-batches: the whole accumulated ones and the partition), the
    reduce bucket, and one micro-batch's activations."""
    if layout.zero_stage == 1 and layout.micro_per_rank > 1:
        grads = states.accumulating + states.grads
    else:
        grads = max(states.grads, states.accumulating) + states.bucket
    return states.resting - states.host + grads + acts.peak


def plan_for(inv: Inventory, batch_size: int, layout: Layout, device: Device = Device()) -> Plan:
    """The plan of the model `inv` describes at micro-batch `batch_size` under `layout`."""
    states = heaviest_rank(inv, layout)
    acts = activations(inv, batch_size, layout, layout.activation_checkpointing)
    other = activations(inv, batch_size, layout, not layout.activation_checkpointing)
    plan = Plan(layout, device, batch_size, inv.config.block_size, states, acts, other,
                peak_bytes(states, acts, layout), collectives(inv, batch_size, layout), inv.flops_per_token,
                sum(inv.numels), None)
    if not device.memory:
        return plan
    return dataclasses.replace(plan, advice=advise(inv, plan))


def make_plan(model_cfg: GPTConfig, train_cfg: TrainConfig, world_size: int, ds: dict | None,
              device: Device = Device(), device_kind: str = "cuda") -> Plan:
    """The plan of the run these configs start on `world_size` ranks (ds: the DeepSpeed JSON, as loaded)."""
    layout = layout_of(model_cfg, train_cfg, world_size, ds, device_kind)
    return plan_for(inventory(model_cfg), train_cfg.batch_size, layout, device)


def largest_batch(inv: Inventory, layout: Layout, states: ModelStates, memory: int) -> int:
    """The largest micro-batch whose peak fits `memory` (peaks grow linearly with the batch)."""
    one, two = (peak_bytes(states, activations(inv, b, layout, layout.activation_checkpointing), layout)
                for b in (1, 2))
    if one > memory:
        return 0
    return 1 + (memory - one) // max(two - one, 1)


def advise(inv: Inventory, plan: Plan) -> Advice:
    """The largest micro-batches that fit, with and without activation checkpointing; the peak at each
    ep_size dividing both the ranks and the experts; and, when nothing fits, one line saying why."""
    layout, memory, cfg = plan.layout, plan.device.memory, inv.config
    batches = {ac: largest_batch(inv, dataclasses.replace(layout, activation_checkpointing=ac), plan.states, memory)
               for ac in (False, True)}
    ep_peaks = {}
    if cfg.use_moe and layout.zero_stage is not None:
        world = layout.world_size
        for ep in (e for e in range(1, world + 1) if world % e == 0 and cfg.num_experts % e == 0):
            other = dataclasses.replace(layout, ep_size=ep)
            ep_peaks[ep] = peak_bytes(heaviest_rank(inv, other), activations(inv, plan.batch_size, other,
                                                                              layout.activation_checkpointing), other)
    return Advice(batches[layout.activation_checkpointing], batches[True], ep_peaks,
                  verdict(inv, plan, batches, ep_peaks))


def states_bytes(inv: Inventory, layout: Layout) -> int:
    """Device bytes of the model states alone at their peak (no activations)."""
    return peak_bytes(heaviest_rank(inv, layout), Activations(0, 0, 0, 0), layout)


def verdict(inv: Inventory, plan: Plan, batches: dict, ep_peaks: dict) -> str | None:
    """One line saying why the plan does not fit the device, and what to change first; None when it fits."""
    memory, layout = plan.device.memory, plan.layout
    if plan.peak <= memory:
        return None
    held = states_bytes(inv, layout)
    if held > memory:
        return (f"does not fit: weights, gradients and optimizer state alone take {gib(held)} per rank of "
                f"{gib(memory)}; {fix_for_states(inv, plan, ep_peaks)}")
    if batches[True] == 0:
        one = activations(inv, 1, dataclasses.replace(layout, activation_checkpointing=True), True).peak
        return (f"does not fit: one sequence of {plan.block_size} tokens needs {gib(one)} of activations even with "
                f"activation checkpointing, beside {gib(held)} of model states; lower block_size")
    checkpointing = "--activation_checkpointing=True" + (
        f" --batch_size={batches[True]}" if batches[True] < plan.batch_size else "")
    largest = batches[layout.activation_checkpointing]
    fixes = [f"--batch_size={largest}"] if largest else []
    if not layout.activation_checkpointing:
        fixes = ([checkpointing] + fixes) if batches[True] >= plan.batch_size else (fixes + [checkpointing])
    return (f"does not fit: batch_size={plan.batch_size} needs {gib(plan.peak)} per rank of {gib(memory)}; use "
            + " or ".join(fixes))


def fix_for_states(inv: Inventory, plan: Plan, ep_peaks: dict) -> str:
    """The first change whose model states fit: an ep_size whose whole step fits, ZeRO-2 (ZeRO-3 for a dense
    model), the optimizer state offloaded; else more ranks."""
    layout, memory = plan.layout, plan.device.memory
    fits = sorted(ep for ep, peak in ep_peaks.items() if peak <= memory and ep != layout.ep_size)
    if fits:
        return f"use --ep_size={fits[0]}"
    if layout.zero_stage is None:
        return "use several ranks with --deepspeed_config (ds_configs/zero1.json)"
    sharded = 2 if inv.config.use_moe else 3
    for fix, other in ((f"use ZeRO-{sharded} (ds_configs/zero{sharded}.json)", dataclasses.replace(
            layout, zero_stage=sharded)), ("offload the optimizer state (ds_configs/zero2_offload.json)",
                                           dataclasses.replace(layout, zero_stage=2, offload=True))):
        if other.zero_stage >= layout.zero_stage and other != layout and states_bytes(inv, other) <= memory:
            return fix
    return "use more ranks"


# ---------------------------------------------------------------- what it prints
def gib(nbytes: float) -> str:
    """Bytes as GiB, or MiB and KiB below one GiB (a tiny model's plan reads as something)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


def engine_name(layout: Layout) -> str:
    if layout.zero_stage is None:
        return f"one device, {layout.dtype}"
    offload = " + offload" if layout.offload else ""
    ranks = f"{layout.world_size} rank" + ("s" if layout.world_size > 1 else "")
    return f"{ranks}, ZeRO-{layout.zero_stage}{offload}, {layout.dtype}, ep_size {layout.ep_size}"


def summary_line(plan: Plan) -> str:
    """The plan in one line: where the memory goes, whether it fits, what a step moves and its time bound."""
    states, acts = plan.states, plan.acts
    ac = " (checkpointed)" if plan.layout.activation_checkpointing else ""
    fit = ""
    if plan.device.memory:
        fit = f" of {gib(plan.device.memory)}: " + ("fits" if plan.advice.verdict is None else "does NOT fit")
    moved = sum(plan.collectives.values())
    compute, comm = step_seconds(plan)
    known = [t for t in (compute, comm) if t is not None]
    bound = f"; step >= {max(known):.3f} s" if known else ""
    buffers = f", ZeRO buffers {gib(states.device_buffers)}" if states.device_buffers else ""
    return (f"plan: {engine_name(plan.layout)}: peak {gib(plan.peak)} per rank{fit} (model states "
            f"{gib(plan.peak - acts.peak - states.device_buffers)}{buffers}, activations {gib(acts.peak)}{ac} at "
            f"batch {plan.batch_size}); "
            + (f"{gib(moved)} through collectives per rank per step" if moved else "no collectives")
            + bound)


COLLECTIVE_NAMES = {"all_to_all": "all-to-all", "all_reduce": "all-reduce", "reduce": "reduce",
                    "reduce_scatter": "reduce-scatter", "all_gather": "all-gather"}


def describe(plan: Plan) -> list[str]:
    """The plan as the lines launch/plan.py prints (docs/plan.md says how each number is computed)."""
    layout, states, acts, other = plan.layout, plan.states, plan.acts, plan.acts_other
    ac = layout.activation_checkpointing
    lines = [f"{engine_name(layout)}; micro-batch {plan.batch_size} x {plan.block_size} tokens, "
             f"{layout.micro_per_rank} per rank per step; {plan.params / 1e6:.1f}M parameters",
             "per rank (the rank holding the most):",
             f"  weights            {gib(states.weights):>12}",
             f"  gradients          {gib(states.grads):>12}  at the step boundary"
             + (f"; {gib(states.accumulating)} between micro-batches" if states.accumulating else ""),
             f"  fp32 masters       {gib(states.masters):>12}",
             f"  AdamW moments      {gib(states.moments):>12}"]
    if states.device_buffers:
        lines.append(f"  ZeRO buffers       {gib(states.device_buffers):>12}  on the device: reduce bucket "
                     f"({plan.layout.reduce_bucket:,} elements){', gradient partition' * (plan.layout.zero_stage == 3)}"
                     f"{', staging' * plan.layout.offload}")
    if states.host:
        lines.append(f"  in CPU memory      {gib(states.host):>12}  of the above (offload_optimizer)")
    lines += [f"  activations        {gib(acts.saved + acts.recompute):>12}  per micro-batch, "
              f"{'with' if ac else 'without'} checkpointing ({gib(other.saved + other.recompute)} "
              f"{'without' if ac else 'with'})",
              f"  MoE dispatch       {gib(max(acts.dispatch, other.dispatch)):>12}  permuted token rows, of the "
              f"activations without checkpointing"
              + (f" (balanced; up to {layout.ep_size}x the received rows on a rank that gets every row of its "
                 "group)" if layout.ep_size > 1 else ""),
              f"  logits and casts   {gib(acts.transient):>12}  the returned logits, cross-entropy's fp32 copy"
              + (", autocast's weight copies" if layout.zero_stage is None and layout.dtype != "float32" else ""),
              f"  peak               {gib(plan.peak):>12}" + device_fit(plan),
              f"  checkpoint share   {gib(plan.params * CHECKPOINT_BYTES / layout.world_size):>12}  on disk "
              f"(the whole checkpoint {gib(plan.params * CHECKPOINT_BYTES)})"]
    return lines + step_lines(plan) + advice_lines(plan) + [summary_line(plan)]


def device_fit(plan: Plan) -> str:
    if not plan.device.memory:
        return "  (give --gpu_mem_gb to check it fits)"
    return f"  of {gib(plan.device.memory)}: " + ("fits" if plan.advice.verdict is None else "does NOT fit")


def step_lines(plan: Plan) -> list[str]:
    lines = ["per step (bytes one rank hands to each collective):"]
    for (kind, group), nbytes in sorted(plan.collectives.items()):
        lines.append(f"  {COLLECTIVE_NAMES[kind]:<17}{gib(nbytes):>14}  over {group} rank{'s' * (group > 1)} "
                     f"({gib(wire_bytes(kind, group, nbytes))} on the wire)")
    if not plan.collectives:
        lines.append("  none (one rank)")
    tokens = plan.layout.micro_per_rank * plan.batch_size * plan.block_size
    lines.append(f"  FLOPs per token    {plan.flops_per_token / 1e9:.4g} GFLOP (6 x active parameters + attention); "
                 f"{tokens:,} tokens per rank per step")
    compute, comm = step_seconds(plan)
    known = [t for t in (compute, comm) if t is not None]
    parts = [f"compute {compute:.3f} s at {plan.device.tflops:g} TFLOPS" if compute is not None else None,
             f"communication {comm:.3f} s at {plan.device.link_gbps:g} Gb/s" if comm is not None else None]
    lines.append(f"  step time          >= {max(known):.3f} s (" + ", ".join(p for p in parts if p) + ")" if known
                 else "  step time          give --tflops and --link_gbps for a lower bound")
    return lines


def advice_lines(plan: Plan) -> list[str]:
    advice = plan.advice
    if advice is None:
        return []
    lines = ["suggestions:",
             f"  largest micro-batch that fits: {advice.max_batch}"
             + (f" (with activation checkpointing: {advice.max_batch_checkpointed})"
                if not plan.layout.activation_checkpointing else ""),
             "  activation checkpointing: " + checkpointing_advice(plan)]
    if advice.ep_peaks:
        lines.append(f"  ep_size choices (dividing {plan.layout.world_size} ranks and the experts): " + ", ".join(
            f"{ep}: {gib(peak)}" + ("" if peak <= plan.device.memory else " (too much)")
            for ep, peak in sorted(advice.ep_peaks.items())))
    if advice.verdict:
        lines.append("  " + advice.verdict)
    return lines


def checkpointing_advice(plan: Plan) -> str:
    with_ac = plan.acts if plan.layout.activation_checkpointing else plan.acts_other
    without = plan.acts_other if plan.layout.activation_checkpointing else plan.acts
    base = plan.peak - plan.acts.peak
    if base + without.peak <= plan.device.memory:
        return f"not needed at batch {plan.batch_size}"
    if base + with_ac.peak <= plan.device.memory:
        return f"needed at batch {plan.batch_size} (--activation_checkpointing=True)"
    return f"not enough at batch {plan.batch_size}"


# ---------------------------------------------------------------- at the trainer's start
def startup_lines(engine, train_cfg: TrainConfig, memory: int | None = None) -> list[str]:
    """What the trainer prints before its first step: the plan's summary line, and where the plan's peak exceeds
    the device's memory (on a GPU: its total; `memory` overrides) a warning. The planner never stops a run: a
    config it does not model gives a line saying so."""
    from .ds_config import load_ds_config
    from .metrics import device_peak_flops
    kind = str(engine.device).split(":")[0]
    if memory is None:
        memory = torch.cuda.get_device_properties(torch.device(engine.device)).total_memory if kind == "cuda" else 0
    peak_flops = device_peak_flops(engine.device, engine.compute_dtype, train_cfg.peak_tflops) or 0.0
    ds = load_ds_config(train_cfg.deepspeed_config) if train_cfg.deepspeed_config else None
    try:
        result = make_plan(engine.module.config, train_cfg, engine.world_size, ds, Device(memory, peak_flops / 1e12),
                           kind)
    except ConfigError as e:
        return [f"plan: not available ({e})"]
    lines = [summary_line(result)]
    if memory and result.peak > memory:
        lines.append(f"warning: the plan's peak of {gib(result.peak)} per rank exceeds this device's {gib(memory)}; "
                     f"expect an out-of-memory error ({result.advice.verdict.removeprefix('does not fit: ')}; "
                     "python launch/plan.py with these arguments says more)")
    return lines
