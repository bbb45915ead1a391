"""Expert parallelism: shard a MoE layer's experts over ranks, move tokens by all-to-all.

This is the only difference between the single-device and the expert-parallel
MoE. `parallelize_experts_` replaces a layer's `GroupedExperts` with an
`ExpertParallelExperts` that holds this rank's slice of the same weights and has the
same `forward(xs, counts)`: rows of *every* expert in, their outputs out. So
`MoE.forward` neither knows nor branches (as torchtitan applies parallelism from
outside the model). It uses plain torch.distributed on the process group it is
given; the DeepSpeed module supplies DeepSpeed's expert-parallel group.

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
from torch.profiler import record_function

from .kernels import gather_rows
from .moe import EXPERT_PARAMS, GroupedExperts, MoE


class ExpertParallelExperts(GroupedExperts):
    """This rank's experts of a GroupedExperts sharded over `group`; the same interface as the whole."""

    def __init__(self, experts: GroupedExperts, group, ep_size: int):
        if experts.num_experts % ep_size:
            raise ValueError(f"num_experts ({experts.num_experts}) must be divisible by ep_size ({ep_size})")
        num_local = experts.num_experts // ep_size  # what the expert math loops over
        d, hidden = experts.w_in.shape[1:]
        # The same constructor as the whole, so every setting carries over; then this rank's
        # slice of the full, seeded init, under the same parameter names.
        super().__init__(num_local, d, hidden, gated=experts.gated, bias=experts.b_in is not None, impl=experts.impl,
                         gelu_variant=experts.gelu_variant)
        self.to(device=experts.w_in.device, dtype=experts.w_in.dtype)
        self.group, self.ep_size = group, ep_size
        start = dist.get_rank(group) * num_local
        with torch.no_grad():
            for name in EXPERT_PARAMS:
                if getattr(experts, name) is not None:
                    getattr(self, name).copy_(getattr(experts, name)[start:start + num_local])

    @torch.compiler.disable  # split sizes read on the host change every step: traced, each would recompile
    def forward(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs: [N, d] rows sorted by global expert id; counts: [E] global -> the experts' outputs for xs' rows."""
        P, L = self.ep_size, self.num_experts
        send = counts.view(P, L)
        recv = torch.empty_like(send)
        with record_function("moe.all_to_all"):
            dist.all_to_all_single(recv, send, group=self.group)  # recv[s, e]: rows from rank s for local expert e
            in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
            x_recv = dist_fn.all_to_all_single(xs.new_empty(sum(out_splits), xs.shape[-1]), xs,
                                               out_splits, in_splits, group=self.group)
        local_expert = torch.repeat_interleave(torch.arange(L, device=xs.device).repeat(P), recv.reshape(-1))
        by_expert = torch.argsort(local_expert, stable=True)  # (source, expert) -> (expert, source)
        y_local = super().forward(gather_rows(x_recv, by_expert), recv.sum(0))
        y_recv = torch.empty_like(y_local).index_copy(0, by_expert, y_local)
        with record_function("moe.all_to_all"):
            return dist_fn.all_to_all_single(y_recv.new_empty(xs.shape[0], y_recv.shape[-1]), y_recv,
                                             in_splits, out_splits, group=self.group)


def parallelize_experts_(moe: MoE, group, ep_size: int):
    """Shard `moe`'s experts over the ranks of `group` (collective-free; call on every rank)."""
    moe.experts = ExpertParallelExperts(moe.experts, group, ep_size)
