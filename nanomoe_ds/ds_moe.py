"""Making our MoE layers known to a DeepSpeed engine, from outside the model code.

The model code stays plain PyTorch. DeepSpeed's engine treats a layer as MoE only
if it is an instance of `deepspeed.moe.layer.MoE`; otherwise it would average
expert gradients over all ranks, silently wrong. So `adopt_moe_` swaps each of our
MoE instances to a runtime subclass of both classes, sets the attributes the
engine reads, keeps the rank's slice of the experts (expert_parallel.py) and tags
them as expert parameters. The README's "Distributed training" section says what
this means for users. (DeepSpeed's own `save_checkpoint`, which needs its expert key
naming, is not used: checkpoints are ds_checkpoint.py's.)
"""
from __future__ import annotations

from . import ds_groups
from .expert_parallel import parallelize_experts_
from .model import GPT


def _set_deepspeed_parallelism(self, use_data_before_expert_parallel_=False):
    """Called by the engine during initialize; the groups already exist (adopt_moe_ made them)."""


_SUBCLASSES: dict = {}


def adopt_moe_(model: GPT, ep_size: int):
    """Make every MoE layer an expert-parallel `deepspeed.moe.layer.MoE`, in place."""
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    name = ds_groups.group_name(ep_size)
    ep_group = ds_groups.expert_parallel_group(ep_size)
    for m in model.moe_layers():
        cls = type(m)
        if cls not in _SUBCLASSES:
            _SUBCLASSES[cls] = type("DeepSpeed" + cls.__name__, (cls, DeepSpeedMoE),
                                    {"set_deepspeed_parallelism": _set_deepspeed_parallelism})
        m.__class__ = _SUBCLASSES[cls]
        m.ep_size, m.num_local_experts = ep_size, m.num_experts // ep_size
        m.expert_group_name, m.enable_expert_tensor_parallelism, m.use_residual = name, False, False
        if ep_size > 1:
            parallelize_experts_(m, ep_group, ep_size)
        for p in m.experts.parameters():
            p.allreduce, p.group_name = False, name  # reduced over the expert-data-parallel group only
