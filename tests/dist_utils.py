"""Spawn real ranks on gloo over loopback, the way DeepSpeed's launcher does.

Each rank is a separate `python launch/train.py ...` process with the launcher's
environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT). Traffic stays on
127.0.0.1: GLOO_SOCKET_IFNAME=lo, and MASTER_ADDR is set so MPI discovery is never used.
"""
from __future__ import annotations

import json
import os
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


def start_ranks(n: int, argv: list[str]) -> list[subprocess.Popen]:
    """Start launch/train.py on n ranks with the launcher's variables, as the deepspeed launcher would."""
    port = free_port()
    return [subprocess.Popen([sys.executable, str(REPO / "launch/train.py"), *argv], cwd=REPO,
                             env=loopback_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=n, MASTER_PORT=port),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]


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


def ds_json(tmp_path, name="zero2", bf16=False, **top) -> str:
    """A shipped DeepSpeed JSON with bf16 on or off (fp32 for exact comparisons), written to tmp_path."""
    cfg = json.load(open(REPO / "ds_configs" / f"{name}.json"))
    cfg["bf16"] = {"enabled": bf16}
    cfg.update(top)
    path = Path(tmp_path) / f"{name}_{'bf16' if bf16 else 'fp32'}.json"
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
