"""DeepSpeed's expert-parallel process groups, behind one small interface.

DeepSpeed keeps its expert groups in private registries (`deepspeed.utils.groups._*`);
every use of them in this project goes through here, so a DeepSpeed upgrade that
renames them is fixed in one place.

DeepSpeed's layout: with W ranks and ep_size E, consecutive ranks form an
expert-parallel group (they hold different experts and exchange tokens), and ranks
r, r+E, ... form an expert-data-parallel group (they hold the same experts and
average their gradients).
"""
from __future__ import annotations



def group_name(ep_size: int) -> str:
    return f"ep_size_{ep_size}"  # the name DeepSpeed's engine looks groups up by


def expert_parallel_group(ep_size: int):
    """The expert-parallel group of this rank for `ep_size`, created (collectively) on first use."""
    from deepspeed.utils import groups
    if group_name(ep_size) not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(group_name(ep_size))


def expert_group_of(param):
    """The expert-parallel group a tagged expert parameter is sharded over, or None (dense, or ep_size 1)."""
    if getattr(param, "allreduce", True) is not False:
        return None
    from deepspeed.utils import groups
    if groups._get_expert_parallel_world_size(param.group_name) == 1:
        return None
    return groups._get_expert_parallel_group(param.group_name)


def is_expert(param) -> bool:
    """Tagged as an expert parameter: its gradients are reduced over the expert-data-parallel group only."""
    return getattr(param, "allreduce", True) is False


def replica_group_of(param):
    """The ranks that hold identical copies of `param`: its expert-data-parallel group for an expert
    parameter, else every rank (None: the default group)."""
    if not is_expert(param):
        return None
    from deepspeed.utils import groups
    return groups._get_expert_data_parallel_group(param.group_name)
