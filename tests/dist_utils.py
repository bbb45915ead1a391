"""Spawn real ranks on gloo over loopback, the way DeepSpeed's launcher does.

Each rank is a separate `python launch/train.py ...` process with the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). Traffic stays on
127.0.0.1: GLOO_SOCKET_IFNAME=lo, and MASTER_ADDR is set so MPI discovery is never used.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(**extra) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def rank_commands(n: int, argv: list[str]) -> list[tuple[list[str], dict]]:
    """(script and arguments, environment) of each of n ranks of launch/train.py, as the deepspeed launcher
    starts them."""
    port = free_port()
    argv = [*argv, "--check_grad_order=True"]  # the reduction-order guard, on in tests (grad_order.py)
    return [([str(REPO / "launch/train.py"), *argv],
             loopback_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=n, MASTER_PORT=port)) for r in range(n)]


def start_ranks(n: int, argv: list[str]) -> list[subprocess.Popen]:
    """Start launch/train.py on n ranks with the launcher's variables, as the deepspeed launcher would."""
    return [subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for command, env in rank_commands(n, argv)]


def run_ranks(n: int, argv: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run launch/train.py on n ranks; a rank that does not finish in `timeout` s fails the test as a hang."""
    procs = start_ranks(n, argv)
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"rank hung for {timeout}s: {argv}")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def train_rows(out_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, open(Path(out_dir) / "metrics.jsonl")) if "loss" in r]


def ds_json(tmp_path, name="zero2", bf16=False, zero: dict | None = None, **top) -> str:
    """A shipped DeepSpeed JSON with bf16 on or off (fp32 for exact comparisons), written to tmp_path;
    `zero` updates its zero_optimization block, `top` its top level."""
    cfg = json.load(open(REPO / "ds_configs" / f"{name}.json"))
    cfg["bf16"] = {"enabled": bf16}
    cfg["zero_optimization"].update(zero or {})
    cfg.update(top)
    edited = "_" + re.sub(r"\W+", "", json.dumps(zero, sort_keys=True)) if zero else ""
    path = Path(tmp_path) / f"{name}{edited}_{'bf16' if bf16 else 'fp32'}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def wait_for_iter(out_dir, it: int, procs, timeout: float = 240):
    """Block until rank 0 has logged training iteration `it` (to inject a fault mid-run)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (Path(out_dir) / "metrics.jsonl").exists() and any(r["iter"] >= it for r in train_rows(out_dir)):
            return
        assert all(p.poll() is None for p in procs), "a rank ended before the fault was injected"
        time.sleep(0.1)
    raise AssertionError(f"iteration {it} not reached in {timeout}s")


def spawn_ranks(body, args: tuple, nprocs: int, timeout: float = 240):
    """Run `body(rank, *args)` on `nprocs` spawned gloo ranks over loopback; fail (and kill them all)
    past `timeout`. A failing body fails the call through its rank's exit code; a mismatched
    collective hangs instead, hence the deadline. `body` must be a module-level function."""
    import torch.multiprocessing as mp
    ranks = mp.start_processes(_gloo_rank, args=(nprocs, free_port(), body, args), nprocs=nprocs,
                               start_method="spawn", join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ranks.join(timeout=1):
            assert time.monotonic() < deadline, f"ranks did not finish in {timeout} s"
    finally:
        for p in ranks.processes:
            if p.is_alive():
                p.kill()


def as_launched(rank: int, world: int):
    """Give a spawned rank the variables a launcher sets, for code that reads them (the trainer, DeepSpeed)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")


def _gloo_rank(rank: int, world: int, port: int, body, args: tuple):
    """One spawned rank: join the gloo group, run the body, end without gloo's exit-time abort (PyTorch #190489)."""
    import traceback

    import torch.distributed as dist
    code = 0
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
        dist.init_process_group("gloo", rank=rank, world_size=world)
        body(rank, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)


# Rendezvous settings that make an elastic restart take seconds on one machine: a lost node is
# declared dead after 3 missed 1 s heartbeats, and the rendezvous closes 2 s after the minimum
# number of nodes is there (torchrun's defaults: 5 s x 3 and 30 s). docs/elastic.md explains them.
FAST_RDZV = "last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"


def start_agent(prefix: list[str], env: dict, endpoint: str, argv: list[str], log: Path, hosts_store: bool,
                rdzv_conf: str = FAST_RDZV) -> subprocess.Popen:
    """One 'node': a torchrun elastic agent (1 to 2 nodes, one rank each, 3 restarts, c10d rendezvous at
    `endpoint`) running launch/train.py, in a session of its own, its output in `log`. `hosts_store` says
    whether this agent runs the rendezvous store (torchrun guesses it from the host name otherwise, which
    fails for an address that is not the host name's, as in a network namespace)."""
    rdzv_conf = ",".join(part for part in (rdzv_conf, f"is_host={int(hosts_store)}") if part)
    cmd = [*prefix, sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1",
           "--max-restarts=3", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=elastic",
           f"--local-addr={env.get('NODE_ADDR', '127.0.0.1')}",  # where the other nodes reach this one
           "--monitor-interval=0.5", f"--rdzv-conf={rdzv_conf}", str(REPO / "launch/train.py"), *argv]
    # Without this, a restart in which a node joins deadlocks in torch's rendezvous (PyTorch #135712): the
    # surviving agent keeps the previous round's store address and never publishes the new round's.
    env = {**env, "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def kill_node(agent: subprocess.Popen):
    """kill -9 a node: the agent and its workers (torchrun starts each worker in a session of its own,
    so killing the agent's process group would leave them training)."""
    import psutil
    workers = psutil.Process(agent.pid).children(recursive=True)
    agent.kill()
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    agent.wait()


def records(out_dir) -> list[dict]:
    """Every record of out_dir/metrics.jsonl, in file order (events included)."""
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
