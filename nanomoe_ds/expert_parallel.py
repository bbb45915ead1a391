"""Expert parallelism: shard a MoE layer's experts over ranks, move tokens by all-to-all.

This is the only difference between the single-device and the expert-parallel
MoE: `MoE.forward` permutes tokens by expert as always, then hands them to
`ExpertParallel.run` instead of calling the experts directly. It uses plain
torch.distributed on whatever process group it is given; the DeepSpeed module
supplies DeepSpeed's expert-parallel group.

Ranks r of an EP group of size P hold experts [r*E/P, (r+1)*E/P). One exchange:
  1. all_to_all the per-expert counts, so each rank knows what it will receive;
  2. all_to_all the token rows (autograd-aware, uneven splits, zero-size allowed);
  3. rows arrive ordered (source rank, local expert): regroup by local expert;
  4. run the local experts; undo 3; all_to_all the results back along the same splits.
Every rank calls both exchanges once per forward (and once per backward), whatever
its routing, so uneven or empty routing cannot deadlock.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from .dispatch import gather_rows
from .moe import MoE


class ExpertParallel:
    def __init__(self, group, ep_size: int, num_experts: int):
        self.group, self.ep_size = group, ep_size
        self.num_local = num_experts // ep_size

    def run(self, experts, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs: [N, d] rows sorted by global expert id; counts: [E] -> expert outputs for xs' rows."""
        P, L = self.ep_size, self.num_local
        send = counts.view(P, L)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)  # recv[s, e]: rows from rank s for local expert e
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        x_recv = dist_fn.all_to_all_single(xs.new_empty(sum(out_splits), xs.shape[-1]), xs,
                                           out_splits, in_splits, group=self.group)
        local_expert = torch.repeat_interleave(torch.arange(L, device=xs.device).repeat(P), recv.reshape(-1))
        by_expert = torch.argsort(local_expert, stable=True)  # (source, expert) -> (expert, source)
        y_local = experts(gather_rows(x_recv, by_expert), recv.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, by_expert, y_local)
        return dist_fn.all_to_all_single(y_recv.new_empty(xs.shape[0], y_recv.shape[-1]), y_recv,
                                         in_splits, out_splits, group=self.group)


def shard_experts_(moe: MoE, ep_rank: int, ep_size: int):
    """Keep this rank's slice of the stacked expert weights (of the full, seeded init) in place."""
    ex = moe.experts
    if moe.num_experts % ep_size:
        raise ValueError(f"num_experts ({moe.num_experts}) must be divisible by ep_size ({ep_size})")
    L = moe.num_experts // ep_size
    for name, p in list(ex.named_parameters(recurse=False)):
        setattr(ex, name, torch.nn.Parameter(p.data[ep_rank * L:(ep_rank + 1) * L].clone()))
    ex.num_experts = L
