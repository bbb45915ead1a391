"""DeepSpeed checkpoints: which ranges of the training state a rank owns, writes and reads.

The format and its commit are checkpoint.py's. This module maps a rank's share of
every tensor to ranges of the flattened whole tensor, per DeepSpeed 0.19.8's layout
(docs/checkpoints.md):

- ZeRO-1/2 and the bf16 optimizer give every parameter a `_dp_group` and an
  `_hp_mapping`: None where this rank owns none of it, else the addresses of its fp32
  fragment in the flat partition, which is the single parameter of the inner torch
  optimizer's group `param_group_index`. The AdamW moments sit at the same addresses of
  that parameter's state. The fragments of the ranks sharing a parameter tile it once.
- ZeRO-0 partitions nothing: every replica holds all of it (in fp32 the parameters are
  the optimizer's own; in bf16/fp16 each has an fp32 copy in `fp32_groups`). The
  replicas split the writing evenly, so each element is still written once.
- ZeRO-3 partitions every parameter itself: rank r of its group holds elements
  [r * part, (r + 1) * part) of the flattened whole (the last ranks' partitions are padded
  past its end), in the compute dtype as the parameter's `ds_tensor`, and in fp32 at one
  place of the optimizer's flat partition (in CPU memory under offload_optimizer), where the
  AdamW moments sit too. The model keeps no whole copy.
- Expert parameters hold rows `ep_rank * E/ep_size ...` of the whole [E, ...] tensor,
  replicated over the expert-data-parallel group; dense ones are replicated over all ranks.

So a save writes each element once, in parallel, and a load at any topology reads only
this rank's ranges (its fragments, and its local copy of the weights the model keeps
whole on every rank at ZeRO-0/1/2). DeepSpeed's own `save_checkpoint` files are not
written: they would hold the same state a second time.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from . import checkpoint, checkpoint_dir, ds_groups, train_state
from .checkpoint import tensor_key
from .train_state import MOMENTS


class DistCollectives:
    """What a save needs of the process group: rank 0 gathers the index and decides for all."""

    def gather(self, obj) -> list | None:
        out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


# ---------------------------------------------------------------- where a parameter's share lives
def _is_wrapped(p) -> bool:
    return hasattr(p, "_dp_group")  # ZeRO-1/2 and the bf16 optimizer link every parameter


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id")  # ZeRO-3 gives every parameter it partitions an id


def _zero3_range(p) -> tuple[int, int]:
    """(start, numel) of the flattened whole that this rank's ZeRO-3 partition of p holds, padding excluded."""
    part = p.ds_tensor.ds_numel
    start = dist.get_rank(group=p.ds_process_group) * part
    return start, max(0, min(part, p.ds_numel - start))


def _zero3_local(p, kind: str) -> torch.Tensor:
    """This rank's fp32 partition of p (kind "model") or of its AdamW moment `kind`, padding excluded: a view,
    where the optimizer keeps it (in CPU memory under offload_optimizer). DeepSpeed's public getters
    (`safe_get_local_*`) call this and then copy the result to the accelerator: under offload that
    would put the whole share on the GPU during a save, which is what offloading avoids."""
    local, _ = p._z3_optimizer._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                               optim_state_key=None if kind == "model" else kind)
    return local.view(-1).narrow(0, 0, _zero3_range(p)[1])


def _inner(optimizer):
    """The torch optimizer that holds the state: DeepSpeed's wrappers keep it as `.optimizer`."""
    return getattr(optimizer, "optimizer", optimizer)


def _master(optimizer, p):
    """The tensor the torch optimizer steps for an unpartitioned parameter p: p itself, or, under
    ZeRO-0 with bf16/fp16 (FP16_UnfusedOptimizer), its fp32 copy at the same place in `fp32_groups`."""
    if hasattr(optimizer, "fp32_groups") and hasattr(optimizer, "fp16_groups"):
        for low, high in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            for i, q in enumerate(low):
                if q is p:
                    return high[i]
    return p


def _fragment(optimizer, p, kind: str) -> torch.Tensor:
    """This rank's fp32 fragment of p (kind "model"), or of its AdamW moment `kind`: a view, 1-D."""
    mapping = p._hp_mapping
    if kind == "model":
        return mapping.hp_fragment.view(-1)
    inner = optimizer.optimizer
    flat = inner.param_groups[mapping.param_group_index]["params"][0]
    return inner.state[flat][kind].narrow(0, mapping.hp_fragment_address.start, mapping.hp_fragment_address.numel)


def _local(optimizer, p, kind: str) -> torch.Tensor:
    """All of this rank's unpartitioned copy of p (kind "model": its fp32 master) or of a moment; 1-D."""
    master = _master(optimizer, p)
    return (master.detach() if kind == "model" else _inner(optimizer).state[master][kind]).view(-1)


def _rows_offset(p) -> int:
    """Where this rank's slice of p starts in the flattened whole: its local experts' first row."""
    group = ds_groups.expert_group_of(p)
    return 0 if group is None else dist.get_rank(group) * p.numel()


def global_shape(p) -> list[int]:
    if _is_zero3(p):
        return list(p.ds_shape)
    group = ds_groups.expert_group_of(p)
    rows = p.shape[0] * (1 if group is None else dist.get_world_size(group))
    return [rows, *p.shape[1:]] if p.dim() else []


def _replica_split(p, numel: int) -> tuple[int, int]:
    """(start, numel) of the even part of an unpartitioned p that this replica writes."""
    group = ds_groups.replica_group_of(p)
    index, count = dist.get_rank(group), dist.get_world_size(group)
    per = -(-numel // count)
    start = min(index * per, numel)
    return start, min(per, numel - start)


def _has_moments(optimizer) -> bool:
    return any("exp_avg" in st for st in _inner(optimizer).state.values())


def _step(optimizer) -> int:
    states = [st for st in _inner(optimizer).state.values() if "step" in st]
    return int(states[0]["step"]) if states else 0


# ---------------------------------------------------------------- save
def _kinds(optimizer) -> tuple[str, ...]:
    """What a save holds of each parameter: its weights, and AdamW's moments once they exist."""
    return ("model", *MOMENTS) if _has_moments(optimizer) else ("model",)


def shapes(model, optimizer) -> dict[str, list[int]]:
    """Every tensor the checkpoint holds and its whole shape (rank 0 writes them into the index)."""
    kinds = _kinds(optimizer)
    out = {tensor_key(kind, n): global_shape(p) for n, p in model.named_parameters() for kind in kinds}
    out.update({tensor_key("model", n): list(b.shape) for n, b in train_state.state_buffers(model)})
    return out


def owned_pieces(model, optimizer, rank: int):
    """(tensor key, offset into the flattened whole, 1-D view) for every range this rank writes."""
    kinds = _kinds(optimizer)
    for n, p in model.named_parameters():
        base = _rows_offset(p)
        for kind in kinds:
            if _is_zero3(p):
                start, numel = _zero3_range(p)
                if numel:
                    yield tensor_key(kind, n), start, _zero3_local(p, kind)
            elif _is_wrapped(p):
                if p._hp_mapping is not None:
                    yield tensor_key(kind, n), base + p._hp_mapping.lp_fragment_address.start, _fragment(optimizer, p,
                                                                                                         kind)
            else:
                start, numel = _replica_split(p, p.numel())
                if numel:
                    yield tensor_key(kind, n), base + start, _local(optimizer, p, kind).narrow(0, start, numel)
    if rank == 0:  # the router bias: identical on every rank
        for n, b in train_state.state_buffers(model):
            yield tensor_key("model", n), 0, b.detach().view(-1)


def loss_scale(engine) -> dict | None:
    """The fp16 dynamic loss scaler's state (None unless fp16): DeepSpeed keeps it in the optimizer."""
    if not engine.fp16_enabled():
        return None
    holder = _scaler(engine.optimizer)
    state = {k: getattr(holder, k) for k in ("cur_iter", "last_overflow_iter", "cur_hysteresis") if hasattr(holder, k)}
    return {"scale": float(holder.cur_scale), "deepspeed": state}


def _scaler(optimizer):
    # ZeRO-1/2 and the fused fp16 optimizer: `loss_scaler`; the unfused (ZeRO-0) one: `loss_scale_config`
    return getattr(optimizer, "loss_scaler", None) or optimizer.loss_scale_config


def save(engine, model, out_dir: str, state: dict, topology: dict, keep_last: int):
    """Every rank calls this: each writes its share, rank 0 commits (checkpoint_dir.save)."""
    rank = dist.get_rank()
    meta = {**state, "topology": topology, "optimizer_step": _step(engine.optimizer), "loss_scale": loss_scale(engine),
            "tensors": shapes(model, engine.optimizer) if rank == 0 else {}}
    checkpoint_dir.save(out_dir, meta, owned_pieces(model, engine.optimizer, rank), rank, keep_last, DistCollectives())


# ---------------------------------------------------------------- load
def _ensure_state(optimizer, step: int):
    """AdamW creates its state at the first step; a resume writes into it before that."""
    inner = _inner(optimizer)
    for group, flat in _flat_partitions(optimizer):
        train_state.ensure_adamw_state(inner.state[flat], flat, step, group)


def _flat_partitions(optimizer):
    """(torch param group, tensor the torch optimizer steps) pairs. ZeRO-3 hands its fp32 partitions
    to the torch optimizer's groups only while it steps them, so they are listed from its own record."""
    inner = _inner(optimizer)
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return [(inner.param_groups[optimizer.sub_group_to_group_id[i]], flat)
                for i, flat in enumerate(optimizer.fp32_partitioned_groups_flat)]
    return [(group, flat) for group in inner.param_groups for flat in group["params"]]


@torch.no_grad()
def restore_(model, optimizer, ckpt: checkpoint.Checkpoint):
    """Read this rank's ranges of every tensor into the model, the fp32 masters and AdamW's state."""
    with_moments = ckpt.has(tensor_key(MOMENTS[0], next(n for n, _ in model.named_parameters())))
    if with_moments:
        _ensure_state(optimizer, ckpt.meta["optimizer_step"])
    for n, p in model.named_parameters():
        if _is_zero3(p):
            _restore_zero3(p, n, ckpt, with_moments)
            continue
        base = _rows_offset(p)
        # The weights: the model's copy is whole on every rank at ZeRO-0/1/2; read it in place when fp32.
        weights = p.data.view(-1) if p.dtype == torch.float32 else torch.empty(p.numel(), device=p.device)
        ckpt.read_into(tensor_key("model", n), base, weights)
        if weights.data_ptr() != p.data.data_ptr():
            p.data.view(-1).copy_(weights)
        if _is_wrapped(p):
            if p._hp_mapping is not None:
                address = p._hp_mapping.lp_fragment_address
                _fragment(optimizer, p, "model").copy_(weights.narrow(0, address.start, address.numel))
                for kind in MOMENTS if with_moments else ():
                    ckpt.read_into(tensor_key(kind, n), base + address.start, _fragment(optimizer, p, kind))
        else:
            master = _local(optimizer, p, "model")
            if master.data_ptr() != p.data.data_ptr():
                master.copy_(weights)
            for kind in MOMENTS if with_moments else ():
                ckpt.read_into(tensor_key(kind, n), base, _local(optimizer, p, kind))
    for n, b in model.named_buffers():
        if ckpt.has(tensor_key("model", n)):
            ckpt.read_into(tensor_key("model", n), 0, b.view(-1))


def _restore_zero3(p, name: str, ckpt: checkpoint.Checkpoint, with_moments: bool):
    """This rank's partition of a ZeRO-3 parameter: the fp32 master, the compute-dtype copy, the moments.

    Through DeepSpeed's setters, which copy into the partition wherever the optimizer keeps it (in CPU
    memory under offload_optimizer); they take the padded partition, so the padding is written as zeros."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
    start, numel = _zero3_range(p)
    if not numel:
        return
    value = torch.zeros(p.ds_tensor.numel(), dtype=torch.float32, device=p.ds_tensor.device)
    ckpt.read_into(tensor_key("model", name), start, value.narrow(0, 0, numel))
    safe_set_local_fp32_param(p, value)
    p.ds_tensor.data.view(-1).copy_(value)  # the compute-dtype partition the next forward gathers
    for kind in MOMENTS if with_moments else ():
        value.zero_()
        ckpt.read_into(tensor_key(kind, name), start, value.narrow(0, 0, numel))
        safe_set_local_optimizer_state(p, value, kind)


def set_loss_scale(engine, saved: dict | None):
    if saved is None or not engine.fp16_enabled():
        return
    holder = _scaler(engine.optimizer)
    holder.cur_scale = saved["scale"]
    for k, v in saved.get("deepspeed", {}).items():  # the same engine wrote it: its counters too
        setattr(holder, k, v)


def load(engine, model, ckpt: checkpoint.Checkpoint, topology: dict) -> str:
    """Restore this rank from a checkpoint saved at any topology; return how (a line for rank 0)."""
    failure = None
    # ZeRO-3 keeps whole copies of its small ("persistent") parameters between steps: release them
    # before the partitions change, gather them again once every rank has read its share.
    zero3 = engine.zero_optimization_partition_weights()
    try:
        if zero3:
            engine.optimizer.checkpoint_event_prologue()
        restore_(model, engine.optimizer, ckpt)
        set_loss_scale(engine, ckpt.meta.get("loss_scale"))
        rng = ckpt.rng(dist.get_rank())
        if rng is not None:  # a rank the saving run did not have keeps its own seeded state
            train_state.set_rng_state(rng)
    except Exception as e:  # whatever stopped this rank, the others must not wait for it in the vote below
        failure = e
    # Every rank learns whether all ranks read their share: one rank's corrupt record stops them all now.
    failed = torch.tensor([float(failure is not None)], device=engine.device)  # NCCL reduces GPU tensors only
    dist.all_reduce(failed)
    if zero3:  # also after a failed read: a fallback to an older checkpoint starts from a consistent engine
        engine.optimizer.checkpoint_event_epilogue()
    if failure is not None:
        raise failure
    if failed.item():
        raise checkpoint.CheckpointError(f"another rank could not read {ckpt.directory} (its error says why)")
    saved = ckpt.meta["topology"]
    how = "same topology" if saved == topology else f"resharded from {train_state.describe(saved)}"
    return f"resuming iteration {ckpt.meta['iter_num']} from {ckpt.directory} ({how})"
