"""Launcher variables -> torch.distributed's, in-process (the process tests are in test_launch.py)."""
import pytest

from nanomoe_ds.launch_env import (DEFAULT_MASTER_PORT, collective_failure, distributed_env, error_line, first_host,
                                   process_rank, world_size)


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


@pytest.mark.parametrize("env, size", [
    ({}, 1),  # a plain single-process run
    ({"RANK": "0", "WORLD_SIZE": "4"}, 4),  # deepspeed, torchrun
    ({"WORLD_SIZE": "2", "SLURM_NTASKS": "8"}, 2),  # deepspeed inside an allocation: the launcher's own count
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "3"}, 3),  # mpirun, before MPI discovery
    ({"PMI_RANK": "1", "PMI_SIZE": "5"}, 5),  # MPICH, Intel MPI
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "6"}, 6),  # srun
])
def test_world_size_as_the_launcher_states_it(env, size):
    assert world_size(env) == size


def test_error_line_names_the_rank_only_in_a_multi_rank_job():
    error = ValueError("missing data/x/train.bin; run data/x/prepare.py first")
    assert error_line(error, {}) == "error: missing data/x/train.bin; run data/x/prepare.py first"
    assert error_line(error, {"RANK": "0", "WORLD_SIZE": "1"}) == f"error: {error}"  # one rank: a single process
    assert error_line(error, {"RANK": "1", "WORLD_SIZE": "2"}) == f"error: rank 1: {error}"
    assert error_line(error, {"RANK": "0", "WORLD_SIZE": "2"}) == f"error: rank 0: {error}"  # rank 0 names itself too
    assert error_line(error, {"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == f"error: rank 3: {error}"


def test_report_error_prints_on_every_rank(monkeypatch, capsys):
    """Not only on rank 0: a failure only rank 1 has (its node's data) must not hide behind rank 0."""
    from nanomoe_ds.launch_env import report_error
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    report_error(ValueError("boom"))
    assert capsys.readouterr().err == "error: rank 1: boom\n"


GLOO_CLOSED = ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
               "[10.0.0.2]:41234. This is typically caused by a remote worker crashing.")


@pytest.mark.parametrize("message, frames, expected", [
    (GLOO_CLOSED, ["all_reduce"], "lost the rank at 10.0.0.2:41234 during all_reduce: it died or its node is gone; "
     "this run cannot go on at this size: restart it with --init_from=auto (torchrun --max-restarts does that by "
     "itself)"),
    ("Connection reset by peer", ["all_to_all_single"], "lost another rank during all_to_all_single: it died or its "
     "node is gone; this run cannot go on at this size: restart it with --init_from=auto (torchrun --max-restarts "
     "does that by itself)"),
    ("Timed out waiting 30000ms for recv operation to complete", ["barrier"],
     "a collective (barrier) waited longer than dist_timeout=30s; another rank is hung or dead"),
    ("Timed out waiting 30000ms for recv operation to complete", [],
     "a collective (a collective) waited longer than dist_timeout=30s; another rank is hung or dead"),
    ("CUDA out of memory", ["all_reduce"], None),  # not another rank's failure: its traceback is the report
])
def test_a_collective_failure_caused_by_another_rank_is_one_line(message, frames, expected):
    assert collective_failure(message, frames, dist_timeout=30) == expected
