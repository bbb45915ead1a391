"""What the multi-rank benchmark drivers share: a free port and the launcher's variables, to start CPU
ranks by hand as DeepSpeed's launcher would, and the CPU's name for their reports. No torch here: a
driver that only spawns ranks stays light."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int, threads: int = 1, **extra) -> dict:
    """This environment plus the launcher's variables for rank `rank` of `world`, on loopback, CPU ranks."""
    return dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads),
                PYTHONWARNINGS="ignore", **{k: str(v) for k, v in extra.items()})


def wait_all(procs: list[subprocess.Popen], timeout: float, label: str, logs: Path):
    """Wait for every rank; one still running `timeout` s after the start of the wait kills them all and
    ends the driver in one line (a hung collective must not hang the benchmark)."""
    deadline = time.time() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"{label}: a rank hung for {timeout:.0f}s; logs in {logs}")


def lscpu_model() -> str:
    """The CPU's model name as `lscpu` reports it (benchmark tables name the CPU)."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
