"""The engine: what the training loop uses of a model, its optimizer and its ranks.

Two classes implement it: local_engine.LocalEngine (one device, plain PyTorch) and
ds_engine.DeepSpeedEngine (many ranks). The loop (trainer.py) sees only this, so there is
one loop, one eval, one log and one checkpoint cadence for both.
"""
from __future__ import annotations

from typing import Protocol

import torch

from . import checkpoint
from .model import GPT


class Engine(Protocol):
    """What the loop uses of an engine."""

    module: GPT
    rank: int
    world_size: int
    micro_batches: int  # global micro-batches per step: gradient_accumulation_steps fitted to the world size
    device: str
    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor, y: torch.Tensor, **kwargs) -> tuple:
        """The module's forward: (logits, loss), and its ForwardReport with report=True (model.py);
        keyword arguments go to the module as they are."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self, lr: float) -> torch.Tensor | None:
        """Clip, update, zero the gradients; return the global gradient norm, a 0-dim tensor on the device.

        A tensor, not a float: reading it on the host would wait for the step to finish,
        and train_step reads it with the losses in the step's one device-to-host copy.
        None where it isn't computed, and for a step the fp16 loss scaler skipped (an
        overflow it handles by lowering the scale: not a divergence to stop for).
        """

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over all ranks (a copy, on the tensor's device)."""

    def check_replicas(self, iter_num: int) -> None:
        """Stop every rank if copies of a tensor that must be identical differ (guards.py; a collective)."""

    def topology(self) -> dict:
        """What the state's layout depends on (train_state.topology): recorded in checkpoints."""

    def save(self, out_dir: str, state: dict) -> None: ...

    def load(self, ckpt: checkpoint.Checkpoint) -> dict:
        """Restore this rank's share from a checkpoint saved at any topology; return its training state."""
