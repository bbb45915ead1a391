"""Activation checkpointing: keep each transformer block's input, recompute the rest in backward.

Applied from outside the model, as torchtitan's `apply_ac`: every block's forward is
wrapped in non-reentrant `torch.utils.checkpoint`, so a block keeps only its input
between forward and backward, and runs its forward a second time when its gradients
are needed. Parameter names do not change (the wrapper replaces the instance's forward
rather than wrapping the module), so checkpoints are the same with and without it.

The recompute must make the routing decisions of the forward it replays, or the
gradients would belong to another computation:
  - router jitter and dropout draw the same numbers: checkpoint restores the RNG state
    the block started with (`preserve_rng_state`, CPU and the device);
  - top-k and capacity drops are functions of the same input and weights;
  - so the all-to-all split sizes of expert parallelism are the same too, and every rank
    recomputes its blocks in the same backward order, so the exchanges pair up.
What a forward records besides its output (the MoE layers' load count for bias
balancing, the routing statistics for the logs) is recorded once: the recompute runs
under `moe.recomputing()`. DeepSpeed's own activation checkpointing needs model code to
call it; its JSON block is mapped onto this one by ds_config.activation_checkpointing.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import checkpoint

from .model import GPT
from .moe import MoE, recomputing


def _contexts():
    """(context of the first forward, context of the recompute), as torch.utils.checkpoint's context_fn."""
    return nullcontext(), recomputing()


def checkpoint_blocks_(model: GPT):
    """Recompute every block of `model` in backward instead of keeping its activations, in place."""
    for block in model.transformer.h:
        block.forward = _checkpointed(block.forward, records=isinstance(block.mlp, MoE))


def _checkpointed(forward, records: bool):
    """`records`: the block records routing (an MoE block) and its replay must not record it again.
    Only those blocks get a context_fn: torch.compile captures a block without such side effects
    whole, and its captured checkpoint takes no context managers of this kind."""
    options = dict(use_reentrant=False, preserve_rng_state=True, **({"context_fn": _contexts} if records else {}))

    def checkpointed_forward(x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # eval, sampling: nothing is kept for a backward anyway
            return forward(x)
        return checkpoint(forward, x, **options)
    return checkpointed_forward
