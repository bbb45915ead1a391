"""One writer per out_dir (nanomoe_ds/run_lock.py): in-process, and with real runs killed for real."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_args
from dist_utils import records, wait_for_iter

from nanomoe_ds.config import ConfigError
from nanomoe_ds.run_lock import RunLock


def test_a_second_holder_is_refused_naming_the_first_until_it_lets_go(tmp_path):
    first = RunLock.acquire(str(tmp_path))
    with pytest.raises(ConfigError) as e:
        RunLock.acquire(str(tmp_path))
    assert re.fullmatch(rf"out_dir '{tmp_path}' is in use by another run \(pid {os.getpid()} on host "
                        rf"{re.escape(socket.gethostname())}, since [\d-]+ [\d:]+\); two runs would overwrite each "
                        r"other's checkpoints: wait for it to end or stop it, or choose another --out_dir", str(e.value))
    first.release()
    RunLock.acquire(str(tmp_path)).release()


def train_cmd(char_data, out_dir, **over) -> list[str]:
    return [sys.executable, "launch/train.py", *tiny_args(char_data, out_dir, **over)]


def test_a_second_run_into_a_running_runs_out_dir_is_refused_and_a_kill_frees_it(char_data, tmp_path, forkserver):
    """Tried for real: a second run into a training run's out_dir stops in one line, before it writes
    anything; after the first is killed -9 (the kernel drops its lock) a new run takes over and resumes.
    The second and third runs are forked (tests/forkserver.py)."""
    out = tmp_path / "run"
    first = subprocess.Popen(train_cmd(char_data, out, max_iters=100000, eval_interval=5, init_from="auto"),
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iter(out, 12, [first])
        second = forkserver.run(train_cmd(char_data, out, max_iters=20, init_from="auto")[1:], timeout=120)
        assert second.returncode == 2
        assert re.fullmatch(rf"error: out_dir '{out}' is in use by another run \(pid {first.pid} on host .*\n",
                            second.stderr), second.stderr
        assert first.poll() is None  # the first run trains on
    finally:
        first.kill()
        first.communicate()
    rows = [r for r in records(out) if "loss" in r]
    assert [r["iter"] for r in rows] == list(range(len(rows)))  # one writer: its records alone, in order
    third = forkserver.run(train_cmd(char_data, out, max_iters=rows[-1]["iter"] + 3, init_from="auto")[1:],
                           timeout=120)
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed at iteration " in third.stdout


def test_a_file_system_without_flock_is_one_line_naming_the_cause(tmp_path, monkeypatch):
    """Lustre without -o flock, NFS without its lock manager: flock fails with ENOLCK (simulated: a local
    disk locks). One line that names the cause and the way out, not a traceback."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(ConfigError, match=rf"^out_dir '{tmp_path}' cannot hold the run's lock: {tmp_path}/.run.lock: "
                                          r"cannot lock it \(No locks available\); this file system does not support "
                                          r"file locks \(flock\): mount Lustre with -o flock"):
        RunLock.acquire(str(tmp_path))


def test_a_full_disk_at_start_up_is_one_line(char_data, tmp_path):
    """The disk is full before the run starts: the lock's own write fails (ENOSPC), in one line that says
    what to do, exit status 2, before any compute."""
    from test_checkpoint import in_mount_namespace
    mnt, res = tmp_path / "mnt", tmp_path / "res"
    mnt.mkdir()
    res.mkdir()
    train = f"{sys.executable} launch/train.py " + " ".join(tiny_args(char_data, mnt / "run"))
    in_mount_namespace(f"""
        mount -t tmpfs -o size=64k tmpfs {mnt}
        mkdir {mnt}/run
        dd if=/dev/zero of={mnt}/fill bs=4k count=64 2>/dev/null || true
        {train} > {res}/out 2> {res}/err && echo 0 > {res}/rc || echo $? > {res}/rc
    """, tmp_path)
    err = (res / "err").read_text()
    assert (res / "rc").read_text().strip() == "2", err[-2000:]
    assert err == (f"error: {mnt / 'run' / '.run.lock'}: No space left on device; free space or choose another "
                   "--out_dir\n"), err


def lock_deleted_under_a_lone_run(char_data, alone) -> tuple[int, str, str]:
    """A run whose `.run.lock` is deleted at iteration 2, to its end: (exit status, stdout, stderr)."""
    first = subprocess.Popen(train_cmd(char_data, alone, max_iters=12, eval_interval=6), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_iter(alone, 2, [first])
        (alone / ".run.lock").unlink()
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    return first.returncode, out, err


def lock_deleted_under_a_run_beside_another(char_data, shared):
    """A run paused at iteration 2, its lock deleted, a second run started into the same out_dir and holding
    the new lock, then the first resumed to its next save: (first, second, the first's stderr)."""
    first = subprocess.Popen(train_cmd(char_data, shared, max_iters=100000, eval_interval=10), cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        wait_for_iter(shared, 2, [first])
        first.send_signal(signal.SIGSTOP)  # paused before its next save, until the second run holds the lock
        (shared / ".run.lock").unlink()
        second = subprocess.Popen(train_cmd(char_data, shared, max_iters=100000, eval_interval=100000,
                                            init_from="auto"), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while f'"pid": {second.pid}' not in ((shared / ".run.lock").read_text()
                                            if (shared / ".run.lock").exists() else ""):
            assert time.time() < deadline and second.poll() is None, "the second run did not take the lock"
            time.sleep(0.1)
        assert max(r["iter"] for r in records(shared) if "loss" in r) < 9, "the first run saved too soon"
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
        assert second.poll() is None  # the second run trains on
    finally:
        for p in (first, second):
            if p is not None:
                p.kill()
                p.communicate()
    return first, second, err


def test_a_deleted_lock_is_taken_again_or_the_run_stops_before_it_writes(char_data, tmp_path):
    """Tried for real: `.run.lock` deleted under a training run. Alone, the run takes it again at its next
    save. With a second run admitted meanwhile (it locked the new file), the first stops at its next save
    in one line, without writing: it prunes none of the second run's files. The two cases run side by side."""
    from concurrent.futures import ThreadPoolExecutor
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    with ThreadPoolExecutor(1) as pool:
        lone_run = pool.submit(lock_deleted_under_a_lone_run, char_data, alone)
        first, second, err = lock_deleted_under_a_run_beside_another(char_data, shared)
        code, lone_out, lone_err = lone_run.result(timeout=240)
    assert code == 0, lone_err[-2000:]
    assert f"note: {alone / '.run.lock'} was deleted while this run held it; it is taken again" in lone_out
    assert (alone / "iter_12").is_dir()

    assert first.returncode == 2, err[-2000:]
    assert re.fullmatch(rf"error: this run's lock on out_dir '{shared}' was deleted or replaced while it trained "
                        rf"\(a cleanup script\?\), and another run now holds it \(pid {second.pid} on host .*\); "
                        r"this run stops without saving, so that it overwrites none of that run's files; check "
                        r"out_dir, then continue the run you keep with --init_from=auto\n",
                        err), err
    assert not list(shared.glob("iter_*"))
