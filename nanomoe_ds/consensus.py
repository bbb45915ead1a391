"""Decisions every rank must share: rank 0 decides, or the ranks pool what each found.

Without a process group (one device) each function is the identity.
"""
from __future__ import annotations

import os

import torch

from . import launch_env
from .config import ConfigError


def _world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _use_own_gpu():
    import torch.distributed as dist
    if dist.get_backend() == "nccl":  # object collectives go through the current GPU: this rank's own
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def rank0_decides(decide, rank: int):
    """decide() on rank 0; its result, or its refusal, on every rank (one broadcast when there are several)."""
    import torch.distributed as dist
    outcome = None
    if rank == 0:
        try:
            outcome = ("ok", decide())
        except ConfigError as e:
            outcome = ("error", str(e))
        except OSError as e:  # the lock's write on a full disk, recovery in a read-only out_dir: every rank says so
            outcome = ("error", launch_env.os_error_line(e))
    if _world() > 1:
        _use_own_gpu()
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    if outcome[0] == "error":
        raise ConfigError(outcome[1])
    return outcome[1]


def first_error(error: str | None, echo: str = "another rank") -> str | None:
    """Every rank's error pooled: the first one a rank had of its own (not one that only `echo`es another
    rank's failure), or None if no rank had one. The same answer on every rank."""
    if _world() == 1:
        return error
    import torch.distributed as dist
    _use_own_gpu()
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    found = [e for e in errors if e is not None]
    return next((e for e in found if not e.startswith(echo)), found[0] if found else None)
