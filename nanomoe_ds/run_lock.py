"""One writer per run: an exclusive lock on `out_dir`, held by rank 0 for the life of the run.

Two trainings into one out_dir (a stale restart racing its replacement, a requeued job
overlapping the old one) would interleave metrics.jsonl and overwrite each other's
checkpoints. `fcntl.flock` on `out_dir/.run.lock` makes the second one stop in one line
that names the holder. The kernel releases the lock when the holder's process dies, however
it dies (kill -9 included), so a crashed run never leaves a stale lock behind; the host and
pid written into the file are only there to be reported. Readers (sample.py, export.py,
init_from=<run>) take no lock.

flock is per host on some network file systems (NFSv3 without lockd, some FUSE mounts):
there, two hosts could both hold it. On Lustre mount with `-o flock`; NFSv4 and local
disks lock across processes as intended.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from . import launch_env
from .config import ConfigError

LOCK_NAME = ".run.lock"


class RunLock:
    """Held from `acquire` until `release` or the end of the process."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, out_dir: str) -> "RunLock":
        path = Path(out_dir) / LOCK_NAME
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"out_dir '{out_dir}' is in use by another run ({holder}); two runs would overwrite "
                              "each other's checkpoints: wait for it to end or stop it, or choose another --out_dir") \
                from None
        except OSError as e:  # ENOLCK and kin: a file system without flock (Lustre without -o flock, NFS without lockd)
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                e = OSError(errno.ENOLCK, f"cannot lock it ({e.strerror})", str(path))
            raise ConfigError(f"out_dir '{out_dir}' cannot hold the run's lock: {launch_env.os_error_line(e)}") \
                from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}).encode(),
                      0)
        except OSError as e:  # a full disk: name the file (a write through a descriptor does not)
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(path)) from None
        return cls(fd, path)

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1


def _read_holder(fd: int) -> str:
    """'pid 1234 on host gpu07, since 2026-11-30 12:00:00', or what can be said without it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder did not say who it is"
