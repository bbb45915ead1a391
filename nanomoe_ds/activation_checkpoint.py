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
Blocks record nothing themselves: an MoE block returns its routing record (aux terms,
load, statistics) and GPT.forward collects it into its report, outside the checkpoint, in
the forward only. So the recompute has no
side effects to repeat, and torch.compile captures a checkpointed block whole: a dense one,
or an MoE one on the grouped_mm kernel (loop and bmm read their counts on the host, so
dynamo runs such a block eagerly).
DeepSpeed's own activation checkpointing needs model code to call it; its JSON block is
mapped onto this one by ds_config.activation_checkpointing.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .model import GPT


def checkpoint_blocks_(model: GPT):
    """Recompute every block of `model` in backward instead of keeping its activations, in place."""
    for block in model.transformer.h:
        block.forward = _checkpointed(block.forward)


def _checkpointed(forward):
    def checkpointed_forward(x: torch.Tensor):
        if not torch.is_grad_enabled():  # eval, sampling: nothing is kept for a backward anyway
            return forward(x)
        return checkpoint(forward, x, use_reentrant=False, preserve_rng_state=True)
    return checkpointed_forward
