"""The replica guard: ranks that should hold identical copies of a tensor check that they do.

Data parallelism keeps copies: every rank holds the dense weights, and each
expert lives on all the ranks of its expert-data-parallel group. They stay equal
only if every rank applies the same update, and nothing in a normal step checks
that: a wrong reduction (issue 23), a rank-local bug or a flipped bit on one device
makes the copies drift apart without a word, and the checkpoint then records
whichever copy each rank happens to save. Megatron-Core checks this with
`--check-weight-hash-across-dp-replicas-interval`; this is the same idea.

Each rank computes a fingerprint of each tensor it holds: two wrapping int64 sums
over the tensor's raw bits (the bits themselves and their squares). Integer sums
are exact in any order, so equal copies give equal fingerprints on any device.
Then one all-reduce (max of the fingerprint and of its negation) per group of
replicas: equal everywhere exactly when the maxima agree. The cost is one read of
the weights and one small all-reduce per group, every `replica_check_interval`
iterations; a step in between pays nothing (docs/benchmarks.md).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .launch_env import RunStopped

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_CHUNK = 1 << 22  # elements widened to int64 at a time: the guard's extra memory stays small


class ReplicasDiverged(RunStopped):
    """Copies of a tensor that must be identical on several ranks are not."""


def fingerprint(tensor: torch.Tensor) -> torch.Tensor:
    """[sum of the raw bits, sum of their squares] as wrapping int64: equal for bit-identical tensors."""
    bits = tensor.detach().contiguous().view(-1).view(_BITS[tensor.element_size()])
    out = torch.zeros(2, dtype=torch.int64, device=tensor.device)
    for chunk in bits.split(_CHUNK):
        wide = chunk.long()
        out[0] += wide.sum()
        out[1] += (wide * wide).sum()
    return out


def check(replicas: dict, iter_num: int, device):
    """Raise ReplicasDiverged on every rank if any group's copies differ.

    `replicas` maps a group key (the same keys on every rank) to (process group or
    None for all ranks, [(name, tensor)]). Groups of one rank are skipped. `device`
    is where collectives run (NCCL reduces GPU tensors only).
    """
    local_error = None
    for key in sorted(replicas):
        group, named = replicas[key]
        if not named or dist.get_world_size(group) == 1:
            continue
        prints = torch.stack([fingerprint(t).to(device) for _, t in named])
        both = torch.cat([prints, -prints])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        differ = (both[:len(named)] != -both[len(named):]).any(dim=1)
        if differ.any() and local_error is None:
            i = int(differ.nonzero()[0])
            local_error = _who_differs(named[i][0], prints[i], group, iter_num)
    flag = torch.tensor([0 if local_error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)  # every rank stops, not only the group that saw it
    if int(flag) == 0:
        return
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, local_error)
    raise ReplicasDiverged(next(line for line in lines if line is not None))


def _who_differs(name: str, mine: torch.Tensor, group, iter_num: int) -> str:
    """One line naming the tensor and two ranks whose copies differ (a collective over `group`)."""
    prints = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(prints, mine, group=group)
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    other = next(i for i, p in enumerate(prints) if not torch.equal(p, prints[0]))
    return (f"replicas diverged at iteration {iter_num}: {name} differs between rank {ranks[0]} and rank "
            f"{ranks[other]}, which must hold identical copies; the run stops and saves nothing of this state "
            "(the newest checkpoint is from before it); please report it with this line")
