"""DeepSpeed checkpoints that resume at any topology, and never point at a half-written save.

A save writes, in this order:
  1. DeepSpeed's own files for tag `iter_N` on every rank (model, ZeRO optimizer
     partitions, one file per expert), without moving `latest`;
  2. each rank's RNG state;
  3. `ckpt.pt`, written by rank 0 after a collective that every rank reaches only when
     its files are on disk: the whole training state, keyed by parameter name, with the
     topology it was saved at. Replacing ckpt.pt is the commit point;
  4. `latest`, then old `iter_*` directories beyond `keep_last` are pruned.
A kill anywhere before 3 leaves ckpt.pt on the previous save, and resume uses that.

Resume reads ckpt.pt. At the same topology (world size, ep_size, ZeRO stage, dtype) it
loads DeepSpeed's own files for that tag, the fast path. Otherwise it reshards: every
rank takes its slice of the whole tensors in ckpt.pt, weights and AdamW moments alike.
DeepSpeed's `ds_to_universal` cannot do this for native MoE layers.

Where a rank's share of each parameter lives, per the facts in DeepSpeed 0.19.8's ZeRO
and bf16 optimizers (see docs/checkpoints.md): every parameter has `_dp_group` and an
`_hp_mapping` that is None where this rank owns none of it, else the addresses of its
fragment in the flat fp32 partition, which is the single parameter of the inner torch
optimizer's group `param_group_index`. At ZeRO-0 nothing is partitioned: in fp32 the
parameters are the optimizer's own, in bf16/fp16 each has an fp32 copy in the same
place of `fp32_groups`.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint, ds_groups

MOMENTS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------- one parameter, whole or sliced
def _is_wrapped(p) -> bool:
    return hasattr(p, "_dp_group")  # ZeRO-1/2 and the bf16 optimizer link every parameter


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


def _flat_state(optimizer, group_index: int) -> dict:
    """The inner torch optimizer's state for the flat fp32 partition of a parameter group."""
    inner = optimizer.optimizer
    return inner.state[inner.param_groups[group_index]["params"][0]]


def _fragment(optimizer, p, key: str | None) -> torch.Tensor:
    """This rank's fp32 fragment of p (key None), or of its optimizer state `key`."""
    mapping = p._hp_mapping
    if key is None:
        return mapping.hp_fragment
    address = mapping.hp_fragment_address
    return _flat_state(optimizer, mapping.param_group_index)[key].narrow(0, address.start, address.numel)


def _local_whole(optimizer, p, key: str | None) -> torch.Tensor:
    """This rank's whole copy of p (its local experts, for an expert parameter), fp32. Collective."""
    if not _is_wrapped(p):
        master = _master(optimizer, p)
        value = master.detach() if key is None else _inner(optimizer).state[master][key]
        return value.float().clone()
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    if p._hp_mapping is not None:
        address = p._hp_mapping.lp_fragment_address
        buf.narrow(0, address.start, address.numel).copy_(_fragment(optimizer, p, key))
    dist.all_reduce(buf, group=p._dp_group)  # the fragments of the ranks sharing p tile it exactly once
    return buf.view_as(p)


def _whole(optimizer, p, key: str | None) -> torch.Tensor:
    """All of p, every expert included, on the CPU. Collective."""
    local = _local_whole(optimizer, p, key)
    group = ds_groups.expert_group_of(p)
    if group is not None:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, local, group=group)
        local = torch.cat(parts)
    return local.cpu()


def _my_slice(p, whole: torch.Tensor) -> torch.Tensor:
    """The rows of `whole` this rank holds: its local experts for an expert parameter, else all."""
    group = ds_groups.expert_group_of(p)
    if group is None:
        return whole
    n_local = p.shape[0]
    start = dist.get_rank(group) * n_local
    return whole[start:start + n_local]


def _set(optimizer, p, key: str | None, value: torch.Tensor):
    """Write this rank's share of `value` (p's shape) into p's fp32 copy (key None) or state `key`."""
    value = value.to(p.device, torch.float32)
    if not _is_wrapped(p):
        master = _master(optimizer, p)
        if key is None:
            p.data.copy_(value.to(p.dtype))
            master.data.copy_(value)
        else:
            _inner(optimizer).state[master][key].copy_(value)
        return
    if key is None:
        p.data.copy_(value.to(p.dtype))  # the model's (bf16 or fp32) copy, whole on every rank at ZeRO-1/2
    if p._hp_mapping is not None:
        address = p._hp_mapping.lp_fragment_address
        _fragment(optimizer, p, key).copy_(value.flatten().narrow(0, address.start, address.numel))


def _ensure_state(optimizer, step: int):
    """AdamW creates its state at the first step; a resharded resume writes into it before that."""
    inner = _inner(optimizer)
    for group in inner.param_groups:
        for flat in group["params"]:
            state = inner.state[flat]
            for key in MOMENTS:
                state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
            device = flat.device if group.get("fused") or group.get("capturable") else "cpu"
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


# ---------------------------------------------------------------- the whole state
def gather_train_state(model, optimizer) -> dict:
    """Weights (fp32), AdamW moments and step as whole tensors by name, as checkpoint.py stores them. Collective."""
    weights = {n: _whole(optimizer, p, None) for n, p in model.named_parameters(remove_duplicate=False)}
    for n, b in model.named_buffers():
        if n.endswith("score_bias"):  # the router bias: identical on every rank
            weights[n] = b.detach().float().cpu().clone()
    moments, step = {}, 0
    states = [st for st in _inner(optimizer).state.values() if "exp_avg" in st]
    if states:  # none before the first step
        for n, p in model.named_parameters():
            moments[n] = {key: _whole(optimizer, p, key) for key in MOMENTS}
        step = int(states[0]["step"])
    return {"model": weights, "optimizer_state": {"step": step, "moments": moments}}


def scatter_train_state(model, optimizer, ckpt: dict):
    """Load whole tensors saved by any engine at any topology into this rank's shares."""
    weights, opt_state = ckpt["model"], ckpt["optimizer_state"]
    params = list(model.named_parameters())
    if opt_state["moments"]:
        _ensure_state(optimizer, opt_state["step"])
    with torch.no_grad():
        for n, p in params:
            _set(optimizer, p, None, _my_slice(p, weights[n]))
            for key, whole in opt_state["moments"].get(n, {}).items():
                _set(optimizer, p, key, _my_slice(p, whole))
        for n, b in model.named_buffers():
            if n in weights:
                b.copy_(weights[n].to(b.device, b.dtype))


# ---------------------------------------------------------------- save / load
def save(engine, model, out_dir: str, state: dict, topology: dict, keep_last: int):
    """Every rank calls this; see the module docstring for the order that makes it crash-safe."""
    rank, tag = dist.get_rank(), f"iter_{state['iter_num']}"
    engine.save_checkpoint(out_dir, tag=tag, client_state=state, save_latest=False)
    torch.save(checkpoint.rng_state(), Path(out_dir) / tag / f"rng_rank{rank}.pt")
    universal = gather_train_state(model, engine.optimizer)  # every rank got here: its files are written
    if rank == 0:
        checkpoint.save(out_dir, {**state, **universal, "topology": topology, "ds_tag": tag,
                                  "rng": checkpoint.rng_state()})
        _write_latest(out_dir, tag)
        prune(out_dir, keep_last, current=int(state["iter_num"]))
    dist.barrier()


def _write_latest(out_dir: str, tag: str):
    tmp = Path(out_dir) / "latest.tmp"
    tmp.write_text(tag)
    os.replace(tmp, Path(out_dir) / "latest")


def iter_dirs(out_dir: str) -> list[tuple[int, Path]]:
    found = []
    for path in Path(out_dir).glob("iter_*"):
        if path.is_dir() and path.name[5:].isdigit():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def prune(out_dir: str, keep_last: int, current: int | None = None):
    """Keep the newest `keep_last` complete checkpoints; remove older ones and any newer, incomplete one."""
    dirs = iter_dirs(out_dir)
    committed = [it for it, _ in dirs if current is None or it <= current]
    keep = set(committed[-keep_last:])
    for it, path in dirs:
        if it not in keep:
            shutil.rmtree(path, ignore_errors=True)


def load(engine, model, out_dir: str, ckpt: dict, topology: dict) -> str:
    """Restore this rank from ckpt.pt's save; return how (a line for rank 0 to print)."""
    tag, saved = ckpt.get("ds_tag"), ckpt["topology"]
    incomplete = [p.name for it, p in iter_dirs(out_dir) if it > ckpt["iter_num"]]
    note = f"; skipped incomplete {', '.join(incomplete)} (a save that did not finish)" if incomplete else ""
    if saved == topology and tag and (Path(out_dir) / tag).is_dir():
        engine.load_checkpoint(out_dir, tag=tag, load_lr_scheduler_states=False)
        rng = Path(out_dir) / tag / f"rng_rank{dist.get_rank()}.pt"
        if rng.exists():
            checkpoint.set_rng_state(torch.load(rng, weights_only=False))
        return f"resuming from {tag} (DeepSpeed's files, same topology){note}"
    scatter_train_state(model, engine.optimizer, ckpt)
    checkpoint.set_rng_state(ckpt["rng"])
    return (f"resuming iteration {ckpt['iter_num']} saved at {checkpoint.describe(saved)} on "
            f"{checkpoint.describe(topology)}: resharded from ckpt.pt{note}")
