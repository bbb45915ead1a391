"""Gradients reach ZeRO's reduction in one order on every rank, whatever order backward makes them in.

Why. ZeRO-2 (and ZeRO-1 with overlap_comm, and ZeRO-3) starts reducing from
per-parameter backward hooks: each gradient is copied into a bucket in the order
its hook fires, and the bucket is reduced as one flat buffer whose slices are
matched across ranks by position. The ranks must therefore fire their hooks in
the same order. Backward's order is not a property of the model, though, but of
the graph a rank's data built: on a CPU `moe_impl=auto` picks the expert kernel
from each call's load, and the loop kernel (one autograd node) and the padded
bmm (several nodes) hand out the experts' weight gradients in different orders.
Two ranks that picked different kernels in the same micro-batch then summed
w_in's gradient on one rank with w_out's on the other (the same size, so nothing
failed): the run trained on silently wrong gradients (issue 23). Any other
data-dependent backward, such as a branch for an empty expert, does the same.

The fix, at the depth of the reduction rather than of the kernel: hold each
gradient as its hook fires and pass it on only in a fixed order, the reverse of
`model.parameters()` (close to the order backward produces them, so little is
held and reduction still overlaps backward). A gradient whose turn has not come
waits; at the end of each backward, before ZeRO's epilogue reduces what is left,
the rest go in that order. PyTorch's DDP does the same thing differently: it
fixes its buckets once and launches them strictly in order.

The check (`check=True`, on in tests): a hash of the order each rank passed on,
compared across ranks once per optimizer step. It catches whatever this
ordering cannot, such as a parameter with a gradient on one rank and none on
another, and names the first parameter where two ranks differ.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .config import ConfigError
from .launch_env import RunStopped

_HASH_MOD = (1 << 61) - 1  # a Mersenne prime: the order hash stays exact in int64


class ReductionOrderMismatch(RunStopped):
    """Ranks handed gradients to the reduction in different orders: their sums would mix tensors."""


class CanonicalReduction:
    """Wraps a ZeRO optimizer's per-parameter reduction so every rank reduces in `model.parameters()`'s reverse order.

    `optimizer` is DeepSpeed's ZeRO-1/2 (`reduce_ready_partitions_and_remove_grads(param, i)`)
    or ZeRO-3 optimizer (`...(param)`); both end each backward in
    `independent_gradient_partition_epilogue`, which is where the held gradients go in.
    """

    def __init__(self, optimizer, named_params: list[tuple[str, torch.nn.Parameter]], check: bool = False):
        order = [(n, p) for n, p in reversed(named_params) if p.requires_grad]
        self.names = [n for n, _ in order]
        self.position = {id(p): k for k, (_, p) in enumerate(order)}
        self.check = check
        self._held: dict[int, tuple] = {}  # position -> the reduction call's arguments
        self._next = 0  # the position whose gradient goes in next
        self._sent: list[int] = []  # positions passed on since the last step (for the check)
        self._reduce = optimizer.reduce_ready_partitions_and_remove_grads
        self._epilogue = optimizer.independent_gradient_partition_epilogue
        optimizer.reduce_ready_partitions_and_remove_grads = self._arrive
        optimizer.independent_gradient_partition_epilogue = self._end_of_backward

    def _arrive(self, param, *args):
        k = self.position.get(id(param))
        if k is None:  # not one of the model's parameters: nothing to order it against
            self._reduce(param, *args)
            return
        self._held[k] = (param, *args)
        while self._next in self._held:
            self._send(self._next)
            self._next += 1

    def _send(self, k: int):
        self._reduce(*self._held.pop(k))
        if self.check:
            self._sent.append(k)

    def _end_of_backward(self, *args, **kwargs):
        for k in sorted(self._held):  # those waiting behind a parameter that got no gradient
            self._send(k)
        self._next = 0
        return self._epilogue(*args, **kwargs)

    def order_hash(self) -> int:
        h = 0
        for k in self._sent:
            h = (h * 1_000_003 + k + 1) % _HASH_MOD
        return h

    def check_step(self, iter_num: int | None = None):
        """Compare this step's reduction order across ranks (a collective); raise on every rank if they differ."""
        if not self.check:
            return
        h = self.order_hash()
        both = torch.tensor([h, -h], dtype=torch.int64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)  # max(h) == min(h) iff all equal
        sent, self._sent = self._sent, []
        if int(both[0]) == -int(both[1]):
            return
        orders = [None] * dist.get_world_size()
        dist.all_gather_object(orders, sent)
        raise ReductionOrderMismatch(describe_mismatch(orders, self.names, iter_num))


def describe_mismatch(orders: list[list[int]], names: list[str], iter_num: int | None) -> str:
    """One line naming the first gradient two ranks reduced differently (orders: positions per rank)."""
    where = f" at iteration {iter_num}" if iter_num is not None else ""
    first = orders[0]
    for rank, order in enumerate(orders[1:], start=1):
        if order == first:
            continue
        i = next((j for j, (a, b) in enumerate(zip(first, order)) if a != b), min(len(first), len(order)))
        got = [names[o[i]] if i < len(o) else "nothing" for o in (first, order)]
        return (f"gradient reduction order differs between ranks{where}: reduction {i} was {got[0]} on rank 0 "
                f"and {got[1]} on rank {rank}; their sums would mix different tensors, so the run stops "
                "(nothing of this step was applied or saved)")
    return f"gradient reduction order differs between ranks{where}"


def install(engine, model: torch.nn.Module, check: bool) -> CanonicalReduction | None:
    """Order the reduction of a DeepSpeed engine's ZeRO optimizer; None where its reduction is already ordered.

    ZeRO-0 and ZeRO-1 without overlap_comm reduce at the step boundary in parameter
    order already, and have no per-parameter hook path to wrap.
    """
    optimizer = engine.optimizer
    if not hasattr(optimizer, "reduce_ready_partitions_and_remove_grads"):
        return None
    if not hasattr(optimizer, "independent_gradient_partition_epilogue"):
        raise ConfigError("this DeepSpeed version's ZeRO optimizer has no independent_gradient_partition_epilogue; "
                          "nanomoe_ds needs it to order gradient reduction (pin deepspeed to a tested version)")
    return CanonicalReduction(optimizer, list(model.named_parameters()), check)
