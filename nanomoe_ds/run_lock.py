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


class LockHeld(ConfigError):
    """Another process holds the lock; `holder` says who, as far as its file tells."""

    def __init__(self, message: str, holder: str):
        super().__init__(message)
        self.holder = holder


_HELD: dict[str, "RunLock"] = {}  # out_dir (its real path) -> this process's lock on it


class RunLock:
    """Held from `acquire` until `release` or the end of the process."""

    def __init__(self, fd: int, path: Path, text: str):
        self.fd, self.path = fd, path
        self.text = text  # what acquire wrote there: every rank must read the same if out_dir is shared

    @classmethod
    def acquire(cls, out_dir: str) -> "RunLock":
        for _ in range(3):  # the file can be deleted between our open and our flock: then lock the new one
            lock = cls._acquire_once(out_dir)
            if lock.is_current():
                _HELD[os.path.realpath(out_dir)] = lock
                return lock
            lock.release()
        raise ConfigError(f"out_dir '{out_dir}': its {LOCK_NAME} keeps being deleted while this run takes it; stop "
                          "whatever removes it, then start again")

    def is_current(self) -> bool:
        """Whether the file this lock holds is still the one at out_dir/.run.lock (not deleted, not replaced)."""
        try:
            here, mine = os.stat(self.path), os.fstat(self.fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    @classmethod
    def _acquire_once(cls, out_dir: str) -> "RunLock":
        path = Path(out_dir) / LOCK_NAME
        os.makedirs(out_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(f"out_dir '{out_dir}' is in use by another run ({holder}); two runs would overwrite "
                           "each other's checkpoints: wait for it to end or stop it, or choose another --out_dir",
                           holder) from None
        except OSError as e:  # ENOLCK and kin: a file system without flock (Lustre without -o flock, NFS without lockd)
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                e = OSError(errno.ENOLCK, f"cannot lock it ({e.strerror})", str(path))
            raise ConfigError(f"out_dir '{out_dir}' cannot hold the run's lock: {launch_env.os_error_line(e)}") \
                from None
        text = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(), 0)
        except OSError as e:  # a full disk: name the file (a write through a descriptor does not)
            os.close(fd)
            raise OSError(e.errno, e.strerror, str(path)) from None
        return cls(fd, path, text)

    def release(self):
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1
        for key, lock in list(_HELD.items()):
            if lock is self:
                del _HELD[key]


def release(out_dir: str):
    """Release this process's lock on out_dir, whichever it holds now (ensure_held may have taken a new one)."""
    lock = _HELD.get(os.path.realpath(out_dir))
    if lock is not None:
        lock.release()


def shared_out_dir_problem(out_dir: str, lock_text: str, rank: int) -> str | None:
    """None if this rank sees rank 0's lock file, as written, in out_dir; else one line saying what is wrong.

    Every rank writes its shard into out_dir and rank 0 commits them: a directory local to each
    node would leave each checkpoint scattered over nodes (found only at the first save).
    """
    try:
        seen = (Path(out_dir) / LOCK_NAME).read_text()
    except OSError:
        seen = None
    if seen == lock_text:
        return None
    return (f"rank {rank} does not see the run lock rank 0 wrote in out_dir '{out_dir}': out_dir is not shared "
            "between this rank's node and rank 0's; a multi-node run needs an out_dir on a file system every "
            "node mounts (NFS, Lustre, ...)")


def ensure_held(out_dir: str):
    """Before this run writes into out_dir (a save): its lock must still be the file at out_dir/.run.lock.

    A cleanup (`rm -rf out/.*`) that deleted it lets a second run in, and two writers would then
    prune each other's checkpoints. If the file is gone or new and no one holds it, this run takes
    it again (with a note); if another run holds it, ConfigError: this run stops without writing.
    A process that holds no lock on out_dir (ranks other than 0, readers) has nothing to check.
    """
    lock = _HELD.get(os.path.realpath(out_dir))
    if lock is None or lock.is_current():
        return
    lock.release()
    try:
        RunLock.acquire(out_dir)
    except LockHeld as e:
        raise ConfigError(f"this run's lock on out_dir '{out_dir}' was deleted or replaced while it trained (a "
                          f"cleanup script?), and another run now holds it ({e.holder}); this run stops without "
                          "saving, so that it overwrites none of that run's files; check out_dir, then continue "
                          "the run you keep with --init_from=auto") from None
    print(f"note: {Path(out_dir) / LOCK_NAME} was deleted while this run held it; it is taken again", flush=True)


def _read_holder(fd: int) -> str:
    """'pid 1234 on host gpu07, since 2026-11-30 12:00:00', or what can be said without it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on host {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder did not say who it is"
