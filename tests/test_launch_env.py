"""Launcher variables -> torch.distributed's, in-process (the process tests are in test_launch.py)."""
import pytest

from nanomoe_ds.launch_env import DEFAULT_MASTER_PORT, distributed_env, first_host, process_rank


@pytest.mark.parametrize("nodelist, host", [
    ("node7", "node7"),
    ("gpu[07-09,12]", "gpu07"),
    ("gpu[12,07-09]", "gpu12"),
    ("a[1-2]-ib,b3", "a1-ib"),
    ("cpu3,gpu[1-4]", "cpu3"),
    ("rack1-node[003-010]", "rack1-node003"),
])
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_srun_variables_are_translated():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODELIST": "gpu[03-06]"}
    assert distributed_env(env) == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu03",
                                    "MASTER_PORT": DEFAULT_MASTER_PORT}
    assert process_rank(env) == 5


def test_srun_keeps_what_the_user_set():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n[1-2]", "MASTER_ADDR": "10.0.0.9",
           "MASTER_PORT": "1234", "SLURM_STEP_NODELIST": "n2"}
    assert distributed_env(env) == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}


@pytest.mark.parametrize("env", [
    {},  # a plain single-process run
    {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0"},  # deepspeed / torchrun inside an allocation
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "OMPI_COMM_WORLD_RANK": "3"},  # mpirun inside an allocation
])
def test_nothing_added_where_the_launcher_already_speaks(env):
    assert distributed_env(env) == {}


def test_process_rank_prefers_the_launchers_own_rank():
    assert process_rank({"RANK": "2", "SLURM_PROCID": "0"}) == 2
    assert process_rank({"OMPI_COMM_WORLD_RANK": "3", "SLURM_PROCID": "0"}) == 3
    assert process_rank({}) == 0


def test_mpirun_with_master_addr_skips_mpi_discovery():
    """DeepSpeed's MPI discovery would overwrite MASTER_ADDR/PORT; a user-set MASTER_ADDR stands."""
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "MASTER_ADDR": "10.0.0.9", "SLURM_PROCID": "0"}
    assert distributed_env(env) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
                                    "MASTER_PORT": DEFAULT_MASTER_PORT}
    assert distributed_env({**env, "MASTER_PORT": "1234"}) == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
