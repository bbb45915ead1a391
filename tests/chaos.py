#!/usr/bin/env python
"""A seeded chaos supervisor for `--init_from=auto` restarts.

It reruns the SAME training command (`launch/train.py ... --init_from=auto`) until the run
completes, and injects random faults at random moments, all drawn from random.Random seeded by
(--seed, topology, fault number), so fault N of a seed is the same fault whatever happened before.
With --deal the kinds are dealt from a seeded shuffle instead (each kind once in every len(faults)
faults), so that a short run such as the CI test's meets every kind; the moments are drawn as before.
Two topologies: `one` (one CPU process) and `ds` (the `deepspeed` launcher, 2 gloo ranks, ZeRO-2,
ep_size=2, fp32).

Faults (name, or the issue's number):
  1 kill      kill -9 of the training process; at 2 ranks of rank 0, rank 1, or the launcher together
              with its whole session (a lost node: nothing of it may linger)
  2 term      SIGTERM to the run's process group: save, say "stopped by SIGTERM", stop
  3 usr1      SIGUSR1 to the training process / rank 0: the same
  4 diskfull  out_dir lives on a small tmpfs (the topology runs in a mount namespace of its own);
              a ballast file fills it for a few seconds: the run may fail in one line, a restart continues
  5 writer    a second copy of the command on the same out_dir: refused in one line, the first undisturbed
  6 reader    `--eval_only=True --init_from=resume` meanwhile, on a read-only bind mount of out_dir and
              under strace: it may fail in one line, but must try to change nothing in out_dir
  7 bitflip   between runs (with 2+ committed checkpoints), one bit of a file of the newest checkpoint is
              flipped: the next start must move it aside (iter_N.corrupt) and resume from the previous one

Moments: a random delay after the start, a random iteration reached in metrics.jsonl, or while a save is
in progress (an iter_N.partial appeared). Each fault is judged: exit code, one `error:` line at most
per rank, never a traceback; a nonzero exit must be explained by the fault. When faults remain but a
run completed, the episode ends and a new one starts in a fresh out_dir. Every episode ends with a run
without faults, which must exit 0 at completion, and is checked against an uninterrupted reference
run of the same command: the final checkpoint's weights, Adam moments and step (bit for bit on one
device, 1e-6 at 2 ranks), the loss of every iteration in metrics.jsonl, no staging directory left,
no process left.

    python tests/chaos.py --seed 1 --count 30 --topology both --out /tmp/chaos
    python tests/chaos.py --seed 3 --faults kill,term,usr1,diskfull,writer,reader --count 10 --topology one

Exit status 1 on any failure; each failure comes with a one-line repro (seed and fault number).
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import psutil  # noqa: E402

from conftest import tiny_args  # noqa: E402
from dist_utils import ds_json, free_port, loopback_env  # noqa: E402

KINDS = ("kill", "term", "usr1", "diskfull", "writer", "reader", "bitflip")  # the faults 1..7
TRIGGERS = {"kill": ("delay", "iter", "save"), "term": ("delay", "iter", "save"), "usr1": ("delay", "iter", "save"),
            "diskfull": ("delay", "iter", "save"), "writer": ("window",), "reader": ("window",),
            "bitflip": ("between",)}
WORLD = {"one": 1, "ds": 2}
TRACEBACK = "Traceback (most recent call last)"
CORRUPT_WORDS = ("corrupt", "checksum", "truncated", "unreadable", "inconsistent")
WRITE_SYSCALLS = ("openat", "open", "creat", "unlink", "unlinkat", "rename", "renameat", "renameat2", "mkdir",
                  "mkdirat", "rmdir", "truncate", "ftruncate")


class Timeout(Exception):
    """The topology's time budget ran out."""


# ------------------------------------------------------------------ processes
class Proc:
    """One started command, in a session of its own (so it and everything it starts can be killed at once),
    its stdout and stderr in files."""

    registry: list["Proc"] = []

    def __init__(self, cmd: list[str], env: dict, log_dir: Path, label: str):
        self.cmd, self.label, self.t0 = cmd, label, time.monotonic()
        self.out_path, self.err_path = log_dir / f"{label}.out", log_dir / f"{label}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        self.sid = self.popen.pid
        self.end_t: float | None = None
        Proc.registry.append(self)

    def members(self) -> list[psutil.Process]:
        """Every live process of this session (the launcher, its ranks, ...)."""
        found = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == self.sid and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (OSError, psutil.Error):
                pass
        return found

    def leader_running(self) -> bool:
        return self.popen.poll() is None

    def alive(self) -> bool:
        """The leader, or anything it started (ranks outlive a `deepspeed` runner killed by SIGTERM)."""
        if self.popen.poll() is None:
            return True
        gone = not self.members()
        if gone and self.end_t is None:
            self.end_t = time.monotonic()
        return not gone

    def wait_gone(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                return True
            time.sleep(0.05)
        return not self.alive()

    def ranks(self) -> dict[int, psutil.Process]:
        """rank -> process: the `--local_rank=N` children of a deepspeed launcher, or the leader itself."""
        found = {}
        for p in self.members():
            try:
                cmdline = p.cmdline()
            except psutil.Error:
                continue
            if not any(a.endswith("launch/train.py") for a in cmdline):
                continue
            rank = next((int(a.split("=", 1)[1]) for a in cmdline if a.startswith("--local_rank=")), 0)
            found[rank] = p
        return found

    def kill(self):
        try:
            os.killpg(self.sid, signal.SIGKILL)
        except OSError:
            pass
        for p in self.members():
            try:
                p.kill()
            except psutil.Error:
                pass
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    @property
    def rc(self):
        return self.popen.poll()

    def output(self) -> tuple[str, str]:
        return (self.out_path.read_text(errors="replace"), self.err_path.read_text(errors="replace"))


def kill_all():
    for p in Proc.registry:
        p.kill()


def can_unshare() -> tuple[bool, str]:
    if shutil.which("unshare") is None:
        return False, "no unshare here"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, text=True)
    return r.returncode == 0, r.stderr.strip()


# ------------------------------------------------------------------ out_dir
def committed(run_dir: Path) -> list[int]:
    try:
        return sorted(int(p.name[5:]) for p in run_dir.iterdir()
                      if p.name.startswith("iter_") and p.name[5:].isdigit() and (p / "metadata.json").is_file())
    except OSError:
        return []


def read_metrics(path: Path) -> tuple[list[dict], list[tuple[int, str]]]:
    """(records, torn lines): read line by line, a line that does not parse (cut by a kill or a full disk) is
    reported, not fatal."""
    records, torn = [], []
    try:
        data = path.read_bytes()
    except OSError:
        return records, torn
    lines = data.split(b"\n")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
            records.append(record)
        except ValueError:
            if n == len(lines):  # the last line without its newline: still being written, or cut
                torn.append((n, line[:100].decode(errors="replace") + " (no newline)"))
            else:
                torn.append((n, line[:100].decode(errors="replace")))
    return records, torn


class MetricsTail:
    """New complete records of metrics.jsonl since construction (cheap to poll)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.offset = path.stat().st_size
        except OSError:
            self.offset = 0
        self.buffer = b""

    def new(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        from nanomoe_ds import metrics  # imported by Chaos() already (see there)
        return metrics.records(lines)


def lock_holders(inodes: set[int]) -> set[int]:
    """The pids holding a flock on one of these inodes, from /proc/locks."""
    pids = set()
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return pids
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4].isdigit():
            try:
                inode = int(fields[5].split(":")[2])
            except (IndexError, ValueError):
                continue
            if inode in inodes:
                pids.add(int(fields[4]))
    return pids


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def tail(text: str, n: int = 4) -> list[str]:
    lines = [line for line in text.splitlines() if line.strip() and "[INFO]" not in line]
    return lines[-n:]


def strace_writes(path: Path, run_dir: Path) -> list[str]:
    """The syscalls in a strace log that tried to change something under run_dir."""
    found = []
    needle = str(run_dir)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ["no strace log"]
    for line in lines:
        m = re.match(r"^\d+\s+(\w+)\((.*)", line)
        if not m or m.group(1) not in WRITE_SYSCALLS or needle not in line:
            continue
        call, rest = m.groups()
        if call in ("openat", "open") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", rest):
            continue
        if call in ("mkdir", "mkdirat") and "EEXIST" in rest:  # makedirs(exist_ok=True) of what is there
            continue
        found.append(line[:240])
    return found


# ------------------------------------------------------------------ faults
@dataclass
class Fault:
    topology: str
    n: int
    kind: str
    trigger: str
    params: dict
    episode: int = 0
    start: int = 0  # which start of the command (1-based, in its episode) it hit
    injected: bool = False
    at_s: float | None = None  # seconds after the start it hit
    at_iter: int | None = None  # the newest training iteration logged when it hit
    target: str = ""
    rc: int | None = None
    output_tail: list = field(default_factory=list)
    outcome: str = ""
    notes: list = field(default_factory=list)
    failures: list = field(default_factory=list)
    repro: str = ""


class Chaos:
    """One topology: a reference run, then episodes of faults, each checked against the reference."""

    def __init__(self, topo: str, opts, kinds: list[str], base: Path, disk: Path | None, notes: list[str]):
        # torch (nanomoe_ds.metrics imports it) here, before any run is timed: not at the top, since the parent
        # outside the tmpfs namespace never needs it, nor at a trigger's first wait, where a run could end meanwhile
        import nanomoe_ds.metrics  # noqa: F401
        self.topo, self.opts, self.kinds, self.base, self.disk = topo, opts, kinds, base, disk
        self.world = WORLD[topo]
        self.M = opts.max_iters
        self.logs = base / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.ds_config = ds_json(base, "zero2") if topo == "ds" else None
        self.faults: list[Fault] = []
        self.failures: list[str] = []  # outside any fault: the reference, the final runs, the checks
        self.findings: list[str] = []
        self.notes = list(notes)
        self.starts = 0
        self.episodes = 0
        self.misses: dict[int, int] = {}  # fault number -> times a completed run left it undone
        self.ro_reader, why = can_unshare()
        self.strace = shutil.which("strace") is not None
        if not self.ro_reader:
            self.notes.append(f"reader runs without a read-only mount ({why})")
        if not self.strace:
            self.notes.append("no strace: a reader's writes are caught by the read-only mount only")
        self.deadline = time.monotonic() + opts.timeout
        self.log_file = Path(opts.log) if opts.log else None
        self.ref: dict = {}

    # ---------------------------------------------------------- commands
    def command(self, run_dir: Path, init_from: str = "auto", eval_only: bool = False) -> list[str]:
        args = tiny_args(self.opts.data, run_dir, max_iters=self.M, lr_decay_iters=self.M, warmup_iters=2,
                         eval_interval=self.opts.eval_interval, keep_last=2, init_from=init_from)
        if eval_only:
            args.append("--eval_only=True")
        if self.topo == "one":
            return [sys.executable, str(REPO / "launch/train.py"), *args]
        launcher = Path(sys.executable).with_name("deepspeed")
        launcher = str(launcher) if launcher.exists() else (shutil.which("deepspeed") or "deepspeed")
        return [launcher, "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "launch/train.py"),
                "--deepspeed_config", self.ds_config, *args, "--ep_size=2", "--dist_timeout=60"]

    def start(self, run_dir: Path, label: str, **kw) -> Proc:
        return Proc(self.command(run_dir, **kw), loopback_env(), self.logs, label)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"the topology's time budget ({self.opts.timeout:.0f} s) ran out")
        return left

    def wait_end(self, proc: Proc, timeout: float) -> bool:
        """Wait until every process of proc's session is gone; False (and everything killed) past timeout."""
        if proc.wait_gone(min(timeout, self.remaining())):
            return True
        proc.kill()
        return False

    def progress(self, msg: str):
        print(f"[{self.topo}] {msg}", flush=True)

    def repro(self, n: int) -> str:
        extra = (f" --max_iters={self.M}" if self.M != 24 else "") + (" --deal" if self.opts.deal else "")
        return (f"python tests/chaos.py --topology {self.topo} --seed {self.opts.seed} --faults {','.join(self.kinds)} "
                f"--count {n}{extra}")

    # ---------------------------------------------------------- the reference
    def reference(self):
        run_dir = self.base / "ref"
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = self.start(run_dir, "ref")
        t_lock = t_first = None
        metrics = run_dir / "metrics.jsonl"
        while proc.alive():
            now = time.monotonic() - proc.t0
            if t_lock is None and (run_dir / ".run.lock").exists():
                t_lock = now
            if t_first is None and metrics.exists() and b'"loss"' in metrics.read_bytes():
                t_first = now
            if now > 600:
                proc.kill()
                break
            self.remaining()
            time.sleep(0.02)
        wall = time.monotonic() - proc.t0
        out, err = proc.output()
        if proc.rc != 0 or TRACEBACK in out + err:
            raise RuntimeError(f"the reference run failed (rc {proc.rc}): {tail(err, 8)}")
        self.ref = {"dir": run_dir, "wall_s": wall, "t_lock": t_lock or wall / 2, "t_first": t_first or wall / 2}
        self.progress(f"reference run: {wall:.1f} s (lock at {self.ref['t_lock']:.1f} s, first step at "
                      f"{self.ref['t_first']:.1f} s)")

    # ---------------------------------------------------------- drawing
    def draw(self, n: int) -> Fault:
        # A fault that a completed run left undone is drawn again from a stream of its own: the same
        # draw would miss again (a delay longer than a start under less load than the reference's).
        attempt = self.misses.get(n, 0)
        rng = random.Random(f"{self.opts.seed}/{self.topo}/{n}" + (f"/{attempt}" if attempt else ""))
        kind = rng.choice(self.kinds)
        if self.opts.deal:  # the card stays across misses: only its moment is drawn anew
            kind = self.dealt(n)
        trigger = rng.choice(TRIGGERS[kind])
        params = {"u": rng.random(), "save_delay": rng.uniform(0, 0.03), "hold": rng.uniform(0.5, 3.0),
                  "target": rng.choice(["rank0", "rank1", "launcher"]) if self.topo == "ds" else "process",
                  "flip": rng.random(), "flip_file": rng.random(), "flip_bit": rng.randrange(8)}
        return Fault(self.topo, n, kind, trigger, params, repro=self.repro(n))

    def dealt(self, n: int) -> str:
        """Fault n's kind under --deal: the kinds shuffled (seeded) into a deck per len(kinds) faults, so that a
        short run meets every kind once, in a random order."""
        deck = list(self.kinds)
        random.Random(f"{self.opts.seed}/{self.topo}/deck{(n - 1) // len(deck)}").shuffle(deck)
        return deck[(n - 1) % len(deck)]

    def record(self, fault: Fault):
        self.faults.append(fault)
        state = "FAIL " + "; ".join(fault.failures) if fault.failures else "ok"
        where = (f"at {fault.at_s:.2f} s" if fault.at_s is not None else "") + \
                (f", iter {fault.at_iter}" if fault.at_iter is not None else "")
        self.progress(f"fault {fault.n} {fault.kind} ({fault.trigger}{', ' + fault.target if fault.target else ''}) "
                      f"{where}: {fault.outcome or ('missed' if not fault.injected else '')} -> {state}")
        if self.log_file:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(asdict(fault)) + "\n")

    # ---------------------------------------------------------- triggers
    def wait_trigger(self, fault: Fault, main: Proc, run_dir: Path) -> bool:
        """Wait for the fault's moment; False if the run ended first."""
        p, trig = fault.params, fault.trigger
        have = committed(run_dir)
        low = have[-1] if have else 0
        # this start's expected length: the reference's start-up, and its training from the newest checkpoint on
        expected = self.ref["t_first"] + (self.M + 1 - min(low, self.M)) / (self.M + 1) * \
            (self.ref["wall_s"] - self.ref["t_first"])
        if trig == "delay":
            until = main.t0 + p["u"] * 0.95 * expected
            while time.monotonic() < until:
                if not main.alive():
                    return False
                self.remaining()
                time.sleep(0.01)
            return main.alive()
        if trig == "window":  # aim the second process's own start-up to end in the run's training window
            until = main.t0 + p["u"] * max(0.3, 0.7 * (expected - self.ref["t_lock"]))
            while time.monotonic() < until:
                if not main.alive():
                    return False
                time.sleep(0.01)
            return main.alive()
        if trig == "iter":
            target = min(self.M, low + int(p["u"] * (self.M + 1 - low)))
            fault.params["iter"] = target
            tail_ = MetricsTail(run_dir / "metrics.jsonl")
            while main.alive():
                if any("loss" in r and r.get("iter", -1) >= target for r in tail_.new()):
                    return True
                self.remaining()
                time.sleep(0.005)
            return False
        if trig == "save":
            try:
                before = {e.name for e in os.scandir(run_dir)}
            except OSError:
                before = set()
            while main.alive():
                try:
                    names = [e.name for e in os.scandir(run_dir)]
                except OSError:
                    names = []
                fresh = [n for n in names if n.endswith(".partial") and n not in before]
                if fresh:
                    fault.params["saving"] = fresh[0]
                    time.sleep(p["save_delay"])
                    return main.alive()
                self.remaining()
                time.sleep(0.002)
            return False
        raise ValueError(trig)

    def newest_logged(self, run_dir: Path) -> int | None:
        records, _ = read_metrics(run_dir / "metrics.jsonl")
        iters = [r["iter"] for r in records if "loss" in r and isinstance(r.get("iter"), int)]
        return iters[-1] if iters else None

    # ---------------------------------------------------------- judging a run's end
    def judge_end(self, main: Proc, fault: Fault | None, run_dir: Path, committed_before: list[int]) -> list[str]:
        """What is wrong with how this start ended, given the fault that ended it (None: it ended by itself)."""
        out, err = main.output()
        rc, problems = main.rc, []
        errors = error_lines(err)
        stopped = re.search(r"stopped by (SIG\w+|a signal to another rank) before iteration (\d+)", out)
        started = "parameters:" in out  # printed once the lock is held and the model is built
        completed = re.search(rf"^iter {self.M}: loss", out, re.M) is not None
        if TRACEBACK in out + err:
            problems.append("a traceback in the run's output: " + " | ".join(tail(err, 3)))
        by_rank = {}
        for line in errors:
            m = re.match(r"error: rank (\d+): ", line)
            by_rank.setdefault(m.group(1) if m else "0", []).append(line)
        if any(len(v) > 1 for v in by_rank.values()) or len(errors) > self.world:
            problems.append(f"{len(errors)} error lines for {self.world} rank(s): " + " | ".join(errors[:4]))
        kind = fault.kind if fault is not None else None
        if stopped:
            k = int(stopped.group(2))
            if kind not in ("term", "usr1"):
                problems.append(f"stopped by a signal nobody sent: {stopped.group(0)}")
            elif k not in committed(run_dir) and not any(c >= k for c in committed(run_dir)):
                problems.append(f"said {stopped.group(0)!r} but iter_{k} is not committed")
            if errors:
                problems.append("a preempted run printed an error: " + errors[0])
            if self.topo == "one" and rc != 0:
                problems.append(f"a preempted run exited {rc}, not 0")
            if self.topo == "ds" and rc not in (0, -signal.SIGTERM):
                problems.append(f"the launcher of a preempted run exited {rc}")
            return problems
        if kind is None or kind in ("writer", "reader"):
            if rc != 0:
                problems.append(f"exit {rc} not explained by any fault" + (f": {errors[0]}" if errors else
                                                                           f" ({' | '.join(tail(err, 2))})"))
            elif not completed and not self.rerun_of_done(committed_before):
                problems.append("exit 0 without a stop line or the last iteration")
            return problems
        if kind == "kill":
            if rc == 0 and not completed:
                problems.append("exit 0 after kill -9, without completing")
            for line in errors:
                if not re.search(r"lost the rank|died|cannot save|connection|timed out|closed", line):
                    problems.append(f"an error line after killing {fault.target} that does not say a rank was "
                                    f"lost: {line}")
            return problems
        if kind in ("term", "usr1"):
            signum = signal.SIGTERM if kind == "term" else signal.SIGUSR1
            if rc == 0 and completed:
                fault.notes.append("the run completed before the signal could stop it")
            elif not started and not errors:
                fault.notes.append(f"the signal came during start-up, before the handlers (exit {rc})")
            elif completed and rc == -signum and not errors:
                fault.notes.append(f"the signal came after the loop had ended: exit {rc} although the run completed")
                self.findings.append(f"fault {fault.n} {kind}: a stop signal in the shutdown after the last iteration "
                                     f"killed the process (exit {rc}) although the run had completed and saved "
                                     f"[repro: {fault.repro}]")
            else:
                problems.append(f"exit {rc} without a stop line after {kind}" + (f": {errors[0]}" if errors else ""))
            return problems
        if kind == "diskfull":
            if rc == 0:
                if not completed and not self.rerun_of_done(committed_before):
                    problems.append("exit 0 without completing")
                return problems
            if not errors:
                problems.append(f"exit {rc} after a full disk without an error line ({' | '.join(tail(err, 2))})")
            elif not any(re.search(r"no space left", line, re.I) for line in errors):
                problems.append(f"exit {rc} after a full disk, but the error is not about space: {errors[0]}")
            else:
                for line in errors:
                    if not re.search(r"no space left|lost the rank|died", line, re.I):
                        problems.append(f"an unexpected error line with a full disk: {line}")
            if self.topo == "one" and rc not in (1, 2):
                problems.append(f"exit {rc} after a full disk (docs: 2 for a save, 1 otherwise)")
            return problems
        raise ValueError(kind)

    def rerun_of_done(self, committed_before: list[int]) -> bool:
        return bool(committed_before) and committed_before[-1] >= self.M

    # ---------------------------------------------------------- injecting
    def inject_signal(self, fault: Fault, main: Proc) -> bool:
        """kill / term / usr1: hit the target. False if it was gone already."""
        kind, target = fault.kind, fault.params["target"]
        if kind == "term":
            fault.target = "process group"
            try:
                os.killpg(main.sid, signal.SIGTERM)
            except OSError:
                return False
            return True
        if kind == "kill" and target == "launcher":
            fault.target = "launcher and its session"
            main.kill()  # a lost node: the launcher and every rank it started
            return True
        rank = 0 if kind == "usr1" or target in ("rank0", "process") else 1
        fault.target = f"rank {rank}" if self.topo == "ds" else "process"
        while main.alive():  # a delay can land before the launcher has started its ranks
            proc = main.ranks().get(rank)
            if proc is not None:
                try:
                    proc.send_signal(signal.SIGKILL if kind == "kill" else signal.SIGUSR1)
                    return True
                except psutil.Error:
                    pass
            self.remaining()
            time.sleep(0.02)
        return False

    def fill_disk(self, fault: Fault, main: Proc):
        """Fill the tmpfs with a ballast file (outside out_dir) for a few seconds, then delete it."""
        ballast = self.disk / "ballast"
        fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for size in (1 << 20, 1 << 16, 1 << 12, 1):
                chunk = b"\0" * size
                while True:
                    try:
                        os.write(fd, chunk)
                    except OSError as e:
                        if e.errno != errno.ENOSPC:
                            raise
                        break
            fault.params["ballast_bytes"] = os.fstat(fd).st_size
            until = time.monotonic() + fault.params["hold"]
            while time.monotonic() < until and main.alive():
                time.sleep(0.01)
        finally:
            os.close(fd)
            ballast.unlink()
        fault.target = f"{fault.params['ballast_bytes'] / 2**20:.2f} MiB ballast for {fault.params['hold']:.1f} s"

    def second_writer(self, fault: Fault, main: Proc, run_dir: Path, label: str) -> Proc | None:
        """A second copy of the command. Returns the process that is now the run, if the second took over.

        Who holds the run lock is read from /proc/locks every 20 ms: the two must never hold it at once."""
        second = self.start(run_dir, label)
        fault.target = "second copy of the command"
        inodes: set[int] = set()
        both = first_held = second_held = None
        deadline = time.monotonic() + 300
        adopted = None
        while second.alive() and time.monotonic() < deadline:
            try:
                inodes.add(os.stat(run_dir / ".run.lock").st_ino)
            except OSError:
                pass
            holders = lock_holders(inodes)
            in_main = holders & {p.pid for p in main.members()}
            in_second = holders & {p.pid for p in second.members()}
            if in_main and in_second and both is None:
                both = time.monotonic() - main.t0
            first_held = first_held or (time.monotonic() - main.t0 if in_main else None)
            second_held = second_held or (time.monotonic() - main.t0 if in_second else None)
            if not main.alive():
                m_err = main.output()[1]
                if any("is in use by another run" in line for line in error_lines(m_err)):
                    adopted = second  # the second took the lock first: the first was refused, the second is the run
                    break
            self.remaining()
            time.sleep(0.02)
        if both is not None:
            fault.failures.append(f"both runs held the run lock at once ({both:.2f} s after the first's start)")
        if adopted is not None:
            out, err = main.output()
            fault.rc, fault.output_tail = main.rc, tail(err)
            errs = error_lines(err)
            if TRACEBACK in out + err or len(errs) > self.world or not errs:
                fault.failures.append(f"the first run, refused, did not say so in one line: {tail(err)}")
            fault.outcome = "the second took the lock first; the first was refused in one line and the second goes on"
            return second
        if second.alive():
            second.kill()
            fault.failures.append("the second writer did not end in 300 s")
            return None
        out, err = second.output()
        fault.rc, fault.output_tail = second.rc, tail(err)
        errs = error_lines(err)
        if TRACEBACK in out + err:
            fault.failures.append("a traceback in the second writer's output")
        if second.rc != 0:
            if not errs or not all("is in use by another run" in line for line in errs) or len(errs) > self.world:
                fault.failures.append(f"the second writer failed without the one-line refusal: {tail(err)}")
            fault.outcome = f"refused: {errs[0][:90] if errs else '?'}"
        else:
            fault.outcome = "the first had let go of the lock before the second took it: it ran as a restart"
            if main.alive() and both is None:
                fault.notes.append("the first was still shutting down")
        return None

    def reader(self, fault: Fault, main: Proc, run_dir: Path, label: str):
        cmd = self.command(run_dir, init_from="resume", eval_only=True)
        trace = self.logs / f"{label}.strace"
        if self.strace:
            cmd = ["strace", "-f", "-y", "--seccomp-bpf", "-e", "trace=" + ",".join(WRITE_SYSCALLS), "-o", str(trace),
                   *cmd]
        if self.ro_reader and run_dir.is_dir():
            script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
            cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(run_dir), *cmd]
            fault.target = "eval_only reader (read-only mount" + (", strace)" if self.strace else ")")
        else:
            fault.target = "eval_only reader" + (" (strace)" if self.strace else "")
        reader = Proc(cmd, loopback_env(), self.logs, label)
        if not self.wait_end(reader, 300):
            fault.failures.append("the reader did not end in 300 s")
            return
        out, err = reader.output()
        fault.rc, fault.output_tail = reader.rc, tail(err) or tail(out, 2)
        errs = error_lines(err)
        if TRACEBACK in out + err:
            fault.failures.append("a traceback in the reader's output: " + " | ".join(tail(err, 3)))
        if re.search(r"read-only file system", out + err, re.I):
            fault.failures.append("the reader tried to write into out_dir: " + " | ".join(tail(err, 2)))
        if reader.rc == 0:
            fault.outcome = "evaluated" if re.search(r"^step \d+: train loss", out, re.M) else "exit 0"
            if fault.outcome != "evaluated":
                m = re.search(r"resuming iteration (\d+)", out)
                at = f" (it loaded iteration {m.group(1)})" if m else ""
                fault.failures.append(f"the eval_only reader exited 0 without evaluating anything{at}: a checkpoint at "
                                      "an iteration that is not a multiple of eval_interval (a preemption's) is "
                                      "never evaluated")
        else:
            if not errs or len(errs) > self.world:
                fault.failures.append(f"the reader failed (exit {reader.rc}) without one error line: {tail(err)}")
            fault.outcome = f"refused: {errs[0][:100] if errs else '?'}"
        if self.strace:
            writes = strace_writes(trace, run_dir)
            if writes:
                fault.failures.append(f"the reader tried to change out_dir ({len(writes)} calls): {writes[0]}")

    # ---------------------------------------------------------- bit flips
    def flip(self, fault: Fault, run_dir: Path) -> dict | None:
        have = committed(run_dir)
        if len(have) < 2:
            return None
        newest = run_dir / f"iter_{have[-1]}"
        files = sorted(p for p in newest.iterdir()
                       if p.name.startswith(("shard_", "rng_")) or p.name == "metadata.json")
        path = files[int(fault.params["flip_file"] * len(files))]
        data = bytearray(path.read_bytes())
        pos, bit = int(fault.params["flip"] * len(data)), fault.params["flip_bit"]
        original = bytes(data)
        data[pos] ^= 1 << bit
        path.write_bytes(bytes(data))
        equivalent = False
        if path.name == "metadata.json":
            try:
                equivalent = json.loads(original) == json.loads(bytes(data))
            except ValueError:
                pass
        fault.injected, fault.target = True, f"{path.relative_to(run_dir)} byte {pos} bit {bit}"
        return {"iter": have[-1], "previous": have[-2], "path": path, "pos": pos, "bit": bit,
                "equivalent": equivalent}

    def judge_flip(self, fault: Fault, flip: dict, main: Proc, run_dir: Path) -> bool:
        """Watch the start after a flip until it resumes or ends. Returns True if the run was refused
        (its end is then explained by the flip)."""
        metrics = MetricsTail(run_dir / "metrics.jsonl")
        metrics.offset = fault.params.get("metrics_offset", metrics.offset)
        resumed = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for r in metrics.new():
                if r.get("event") == "resume" and resumed is None:
                    resumed = r["iter"]
            if resumed is not None or not main.alive():
                break
            self.remaining()
            time.sleep(0.02)
        for r in metrics.new():
            if r.get("event") == "resume" and resumed is None:
                resumed = r["iter"]
        out, err = main.output()
        n = flip["iter"]
        errs = error_lines(err)
        if resumed is None and not main.alive() and main.rc != 0:
            fault.rc, fault.output_tail = main.rc, tail(err)
            if any(any(w in line for w in CORRUPT_WORDS) for line in errs):
                fault.outcome = "restart refused in one line"
                fault.failures.append(f"fallback missing: the restart refused iter_{n} instead of moving it aside and "
                                      f"resuming from iter_{flip['previous']}: {errs[0][:200]}")
                if TRACEBACK in out + err or len(errs) > self.world:
                    fault.failures.append("the refusal was not one line per rank")
            else:
                fault.outcome = f"exit {main.rc}"
                fault.failures.append(f"the restart after a flipped bit failed: {tail(err)}")
            if flip["path"].exists():  # put the bit back, so that the run can go on
                data = bytearray(flip["path"].read_bytes())
                data[flip["pos"]] ^= 1 << flip["bit"]
                flip["path"].write_bytes(bytes(data))
                fault.notes.append("bit flipped back to go on")
            return True
        if resumed is None:
            fault.outcome = "no resume seen"
            fault.failures.append(f"no resume record after the flip (exit {main.rc})")
            return False
        said = [line for line in (out + err).splitlines() if "corrupt" in line and f"iter_{n}" in line]
        aside = [p.name for p in run_dir.glob(f"iter_{n}.corrupt*")]
        fault.output_tail = said[:1] or tail(out, 2)
        if resumed < n:
            fault.outcome = f"fell back from iter_{n} to iter_{resumed}"
            if resumed != flip["previous"]:
                fault.failures.append(f"fell back to iter_{resumed}, not the previous checkpoint iter_{flip['previous']}")
            if not aside:
                fault.failures.append(f"iter_{n} was not moved aside as iter_{n}.corrupt")
            if not said:
                fault.failures.append(f"no line says that iter_{n} is corrupt")
        elif flip["equivalent"]:
            fault.outcome = f"resumed from iter_{n}: the flip left metadata.json's content equal (e.g. 'e' -> 'E')"
        else:
            fault.outcome = f"resumed from the corrupt iter_{n}"
            fault.failures.append(f"the flipped bit in iter_{n} went unnoticed: the run resumed from it")
        return False

    # ---------------------------------------------------------- an episode
    def episode(self, ep: int, n: int) -> int:
        """Faults n+1, n+2, ... into one out_dir until the count is reached or the run completes with faults
        to go; then starts without faults until one completes, and the checks. Returns the faults drawn so far."""
        self.episodes += 1
        run_dir = (self.disk or self.base) / f"run{ep}"
        shutil.rmtree(run_dir, ignore_errors=True)
        count, pending, starts, faulted_last = self.opts.count, None, 0, True

        def draw_next() -> Fault | None:
            nonlocal n
            if n >= count:
                return None
            n += 1
            fault = self.draw(n)
            fault.episode = ep
            return fault

        while True:
            if starts > 6 * self.opts.count + 10:
                self.failures.append(f"ep{ep}: {starts} starts without completing  [repro: {self.repro(n)}]")
                break
            # between runs: a bit flip, if one is due and possible (2+ committed checkpoints)
            pending = pending or draw_next()
            flip = flip_fault = None
            if pending is not None and pending.kind == "bitflip":
                flip = self.flip(pending, run_dir)
                if flip is not None:
                    flip_fault, pending = pending, None
                    flip_fault.start = starts + 1
                    flip_fault.params["metrics_offset"] = MetricsTail(run_dir / "metrics.jsonl").offset
                    pending = draw_next()
            starts += 1
            self.starts += 1
            before = committed(run_dir)
            main = self.start(run_dir, f"ep{ep}_start{starts}")
            faulted_last, ended_by, explained, disk_fault = flip is not None, None, False, None
            if flip is not None:
                explained = self.judge_flip(flip_fault, flip, main, run_dir)
                self.record(flip_fault)
            while main.alive() and not explained:
                if pending is None or pending.kind == "bitflip":  # nothing to do in this run: let it end
                    break
                fault, pending = pending, None
                fault.start = starts
                if not self.wait_trigger(fault, main, run_dir):
                    pending = fault  # the run ended first: armed again for the next start, sooner
                    fault.params["u"] *= 0.5
                    break
                fault.injected, faulted_last = True, True
                fault.at_s = time.monotonic() - main.t0
                fault.at_iter = self.newest_logged(run_dir)
                if fault.kind in ("kill", "term", "usr1"):
                    if not self.inject_signal(fault, main):
                        fault.injected, pending = False, fault  # the target was gone: armed again
                        break
                    ended_by = fault
                    if not self.wait_end(main, 120 if self.topo == "one" else 240):
                        fault.failures.append(f"the run's processes were still there long after {fault.kind} "
                                              "(killed)")
                    break
                if fault.kind == "diskfull":
                    self.fill_disk(fault, main)
                    settle = time.monotonic() + (2.0 if self.topo == "one" else 10.0)
                    while main.alive() and time.monotonic() < settle:  # a failure takes a moment to reach every rank
                        if error_lines(main.output()[1]):
                            self.wait_end(main, 120)
                        time.sleep(0.05)
                    if not main.alive():
                        ended_by = fault
                        break
                    fault.outcome = "the run went on"
                    disk_fault = fault
                elif fault.kind == "writer":
                    took_over = self.second_writer(fault, main, run_dir, f"ep{ep}_start{starts}_writer{fault.n}")
                    if took_over is not None:
                        starts += 1
                        self.starts += 1
                        main = took_over
                elif fault.kind == "reader":
                    self.reader(fault, main, run_dir, f"ep{ep}_start{starts}_reader{fault.n}")
                self.record(fault)
                pending = draw_next()
            if not self.wait_end(main, 300):
                self.failures.append(f"ep{ep} start {starts}: the run did not end in 300 s (killed)  "
                                     f"[repro: {self.repro(n)}]")
            if explained:
                continue
            if ended_by is None and disk_fault is not None and main.rc != 0 and \
                    any(re.search(r"no space left", line, re.I) for line in error_lines(main.output()[1])):
                ended_by = disk_fault  # it failed once the disk was free again: a write of the full moment
                ended_by.outcome = "the run failed after the ballast was gone"
            problems = self.judge_end(main, ended_by, run_dir, before)
            out, err = main.output()
            stopped = re.search(r"stopped by \S+ before iteration \d+", out)
            if ended_by is not None:
                ended_by.rc, ended_by.output_tail = main.rc, tail(err) or tail(out, 2)
                ended_by.outcome = ended_by.outcome or (f"exit {main.rc}" + (f", {stopped.group(0)}" if stopped else ""))
                ended_by.failures += problems
                self.record(ended_by)
            elif problems:
                self.failures.append(f"ep{ep} start {starts} ({'a fault before' if faulted_last else 'no fault'}): "
                                     + "; ".join(problems) + f"  [repro: {self.repro(n)}]")
            done = main.rc == 0 and not stopped and (committed(run_dir)[-1:] or [-1])[0] >= self.M
            if not done:
                continue  # the same command again
            if pending is not None and pending.kind != "bitflip":
                self.misses[pending.n] = self.misses.get(pending.n, 0) + 1
                n -= 1  # completed with faults to go: the next episode draws this one anew, in a fresh out_dir
                pending, count = None, n
            elif pending is None and n < count:
                peek = self.draw(n + 1)
                if peek.kind != "bitflip":
                    count = n
            if pending is None and n >= count and not faulted_last:
                break  # a start without faults completed: the episode is over
        self.check(ep, run_dir)
        return n

    # ---------------------------------------------------------- checks against the reference
    def check(self, ep: int, run_dir: Path):
        from nanomoe_ds import checkpoint_dir
        import torch
        label = f"ep{ep}"
        ref = self.ref["dir"]
        common = sorted(set(committed(run_dir)) & set(committed(ref)))
        if not common:
            self.failures.append(f"{label}: no committed checkpoint at the same iteration as the reference "
                                 f"({committed(run_dir)} vs {committed(ref)})")
        else:
            it = self.M if self.M in common else common[-1]
            try:
                a, b = checkpoint_dir.open_checkpoint(str(run_dir), it), checkpoint_dir.open_checkpoint(str(ref), it)
                if set(a.meta["tensors"]) != set(b.meta["tensors"]):
                    self.failures.append(f"{label}: iter_{it} holds other tensors than the reference's")
                worst, differ = 0.0, []
                for key in sorted(b.meta["tensors"]):
                    if key not in a.meta["tensors"]:
                        continue
                    x, y = a.whole(key), b.whole(key)
                    if self.topo == "one":
                        if not torch.equal(x, y):
                            differ.append(key)
                    else:
                        d = float((x - y).abs().max())
                        worst = max(worst, d)
                        if d > 1e-6:
                            differ.append(f"{key} ({d:.2e})")
                if differ:
                    self.failures.append(f"{label}: iter_{it} differs from the reference in {len(differ)} tensors: "
                                         f"{', '.join(differ[:4])}")
                for k in ("optimizer_step", "iter_num"):
                    if a.meta.get(k) != b.meta.get(k):
                        self.failures.append(f"{label}: iter_{it} {k} {a.meta.get(k)} != reference {b.meta.get(k)}")
            except Exception as e:  # a checkpoint that cannot be read is a finding, not a crash of the supervisor
                self.failures.append(f"{label}: cannot compare iter_{it}: {type(e).__name__}: {e}")
        records, torn = read_metrics(run_dir / "metrics.jsonl")
        for line_no, text in torn:
            self.findings.append(f"{label}: metrics.jsonl line {line_no} does not parse (torn): {text!r}")
        ref_records, _ = read_metrics(ref / "metrics.jsonl")
        want = {r["iter"]: r["loss"] for r in ref_records if "loss" in r}
        got: dict[int, list[float]] = {}
        for r in records:
            if "loss" in r and isinstance(r.get("iter"), int):
                got.setdefault(r["iter"], []).append(r["loss"])
        tol = 0.0 if self.topo == "one" else 1e-6
        missing = [i for i in want if i not in got]
        if missing:
            self.failures.append(f"{label}: metrics.jsonl has no training record of iterations {missing[:10]}")
        bad_last = [i for i in want if i in got and abs(got[i][-1] - want[i]) > tol]
        if bad_last:
            i = bad_last[0]
            self.failures.append(f"{label}: the loss of iterations {bad_last[:8]} differs from the reference "
                                 f"(iter {i}: {got[i][-1]!r} vs {want[i]!r})")
        bad_earlier = [i for i in want if i in got and any(abs(v - want[i]) > tol for v in got[i][:-1])]
        if bad_earlier:
            self.failures.append(f"{label}: an earlier (redone) record of iterations {bad_earlier[:8]} has another "
                                 "loss than the reference")
        extra = sorted(set(got) - set(want))
        if extra:
            self.notes.append(f"{label}: training records beyond the reference's: iterations {extra}")
        left = [p.name for p in run_dir.glob("iter_*") if p.name.endswith((".partial", ".discard"))]
        if left:
            self.failures.append(f"{label}: staging directories left: {left}")
        other = [p.name for p in run_dir.iterdir() if p.name not in ("metrics.jsonl", ".run.lock")
                 and not (p.name.startswith("iter_") and p.name[5:].isdigit())]
        if other:
            self.notes.append(f"{label}: other entries in out_dir: {sorted(other)}")
        lingering = []
        for proc in Proc.registry:
            lingering += proc.members()
        for p in psutil.process_iter():
            try:
                if any(str(run_dir) in a for a in p.cmdline()) and p.pid != os.getpid():
                    lingering.append(p)
            except psutil.Error:
                pass
        if lingering:
            self.failures.append(f"{label}: processes left running: {sorted({p.pid for p in lingering})}")
            kill_all()
        if self.disk is not None:  # keep a copy for a post-mortem; free the small tmpfs for the next episode
            keep = self.base / f"run{ep}.final"
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(run_dir, keep, symlinks=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        self.progress(f"episode {ep}: checked against the reference")

    # ---------------------------------------------------------- the whole topology
    def run(self) -> dict:
        t0 = time.monotonic()
        try:
            self.reference()
            chaos_t0 = time.monotonic()
            n, ep = 0, 0
            while n < self.opts.count:
                ep += 1
                n = self.episode(ep, n)
        except Timeout as e:
            self.failures.append(str(e))
            chaos_t0 = locals().get("chaos_t0", time.monotonic())
        except Exception as e:
            import traceback
            traceback.print_exc()
            self.failures.append(f"the supervisor failed: {type(e).__name__}: {e}")
            chaos_t0 = locals().get("chaos_t0", time.monotonic())
        finally:
            kill_all()
        chaos_wall = time.monotonic() - chaos_t0
        injected = [f for f in self.faults if f.injected]
        by_kind: dict[str, int] = {}
        for f in injected:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        failures = [f"fault {f.n} {f.kind} ({f.trigger}, {f.target}): {x}  [repro: {f.repro}]"
                    for f in self.faults for x in f.failures] + self.failures
        ref_wall = self.ref.get("wall_s", 0.0)
        return {"topology": self.topo, "faults_by_kind": by_kind, "faults_injected": len(injected),
                "faults_missed": sum(1 for f in self.faults if not f.injected),
                "faults_survived": sum(1 for f in injected if not f.failures), "restarts": self.starts - self.episodes,
                "starts": self.starts, "episodes": self.episodes, "wall_s": time.monotonic() - t0,
                "chaos_wall_s": chaos_wall, "reference_wall_s": ref_wall,
                "time_lost_s": chaos_wall - self.episodes * ref_wall,
                "failures": failures, "findings": self.findings, "notes": self.notes}


# ------------------------------------------------------------------ entry points
def parse_faults(text: str) -> list[str]:
    if text in ("all", ""):
        return list(KINDS)
    kinds = []
    for part in text.split(","):
        part = part.strip()
        name = KINDS[int(part) - 1] if part.isdigit() and 1 <= int(part) <= len(KINDS) else part
        if name not in KINDS:
            raise SystemExit(f"error: unknown fault {part!r}; choose from {', '.join(KINDS)} (or 1-7)")
        if name not in kinds:
            kinds.append(name)
    return kinds


def ensure_data(path: Path | None, out: Path) -> Path:
    if path is not None and (path / "train.bin").is_file():
        return path
    target = path or Path("/tmp/chaosdata")
    if (target / "train.bin").is_file():
        return target
    for candidate in (os.environ.get("SHAKESPEARE_INPUT"), REPO.parent / "shared/data/tinyshakespeare/input.txt",
                      REPO / "data/shakespeare_char/input.txt"):
        if candidate and Path(candidate).is_file():
            subprocess.run([sys.executable, str(REPO / "data/shakespeare_char/prepare.py"), "--input", str(candidate),
                            "--out_dir", str(target)], check=True, capture_output=True)
            return target
    raise SystemExit("error: no Tiny Shakespeare to prepare: set SHAKESPEARE_INPUT or pass --data")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Seeded chaos for --init_from=auto restarts (see the module docstring).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", default="all", help=f"comma list of {', '.join(KINDS)} (or 1-7); default all")
    p.add_argument("--count", type=int, default=10, help="faults per topology")
    p.add_argument("--deal", action="store_true",
                   help="deal the kinds from a seeded shuffle (every kind once in each len(faults) faults) instead of "
                        "drawing each fault's kind independently; moments stay drawn")
    p.add_argument("--topology", choices=("one", "ds", "both"), default="both")
    p.add_argument("--out", type=Path, default=Path("/tmp/chaos"))
    p.add_argument("--log", default=None, help="JSON lines of every fault (default OUT/faults.jsonl)")
    p.add_argument("--data", type=Path, default=None, help="prepared shakespeare_char (default /tmp/chaosdata)")
    p.add_argument("--max_iters", type=int, default=24)
    p.add_argument("--eval_interval", type=int, default=4)
    p.add_argument("--tmpfs_mib", type=float, default=0, help="size of the tmpfs for diskfull (default: fits the run)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per topology, all included")
    p.add_argument("--_inside", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    return p


def run_topology(topo: str, opts, kinds: list[str], notes: list[str], disk: Path | None) -> dict:
    base = opts.out / topo
    base.mkdir(parents=True, exist_ok=True)
    return Chaos(topo, opts, kinds, base, disk, notes).run()


def inside_namespace(opts, kinds: list[str]) -> dict:
    """The child re-executed under `unshare --mount`: out_dir on a tmpfs of its own."""
    topo = opts._inside
    disk = opts.out / topo / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    mib = opts.tmpfs_mib or (6 + (kinds.count("bitflip") and 1.0 * opts.count))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(mib * 1024)}k", "tmpfs", str(disk)], check=True)
    notes = [f"out_dir on a {mib:g} MiB tmpfs"]
    return run_topology(topo, opts, kinds, notes, disk)


def run_one(topo: str, opts, kinds: list[str], argv: list[str]) -> dict:
    if "diskfull" in kinds:
        ok, why = can_unshare()
        if ok:
            result_path = opts.out / topo / "result.json"
            result_path.parent.mkdir(parents=True, exist_ok=True)
            result_path.unlink(missing_ok=True)
            child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", sys.executable,
                                      str(Path(__file__).resolve()), *argv, f"--_inside={topo}",
                                      f"--_result={result_path}"], start_new_session=True)
            try:
                child.wait(timeout=opts.timeout + 120)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    child.kill()
            if result_path.is_file():
                return json.loads(result_path.read_text())
            return {"topology": topo, "failures": [f"the namespace child ended (rc {child.returncode}) without a "
                                                   "result"], "findings": [], "notes": []}
        kinds = [k for k in kinds if k != "diskfull"]
        note = f"diskfull skipped: unshare --mount is not permitted here ({why})"
        if not kinds:
            return {"topology": topo, "failures": [], "findings": [], "notes": [note], "skipped": True}
        return run_topology(topo, opts, kinds, [note], None)
    return run_topology(topo, opts, kinds, [], None)


def summary(results: list[dict]) -> str:
    lines = []
    for r in results:
        lines.append(f"== {r['topology']}: {r.get('faults_injected', 0)} faults injected "
                     f"({', '.join(f'{k} {v}' for k, v in sorted(r.get('faults_by_kind', {}).items())) or 'none'}), "
                     f"{r.get('faults_missed', 0)} missed, {r.get('faults_survived', 0)} survived; "
                     f"{r.get('restarts', 0)} restarts in {r.get('episodes', 0)} episodes")
        if "wall_s" in r:
            lines.append(f"   wall {r['wall_s']:.0f} s (reference {r['reference_wall_s']:.1f} s, chaos "
                         f"{r['chaos_wall_s']:.0f} s); time lost {r['time_lost_s']:.0f} s = chaos wall time minus "
                         f"episodes x reference wall time")
        for note in r.get("notes", []):
            lines.append(f"   note: {note}")
        for finding in r.get("findings", []):
            lines.append(f"   finding: {finding}")
        for failure in r.get("failures", []):
            lines.append(f"   FAILURE: {failure}")
    total = sum(len(r.get("failures", [])) for r in results)
    lines.append(f"chaos: {'FAILED, ' + str(total) + ' failure(s)' if total else 'passed'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parser().parse_args(argv)
    kinds = parse_faults(opts.faults)
    opts.out = opts.out.resolve()
    opts.out.mkdir(parents=True, exist_ok=True)
    opts.log = opts.log or str(opts.out / "faults.jsonl")
    opts.data = ensure_data(opts.data, opts.out).resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the finally blocks kill what was started
    try:
        if opts._inside:
            result = inside_namespace(opts, kinds)
            Path(opts._result).write_text(json.dumps(result))
            return 0
        Path(opts.log).unlink(missing_ok=True)
        child_argv = [a for a in argv if not a.startswith(("--_inside", "--_result"))]
        if not any(a.startswith("--data") for a in child_argv):
            child_argv.append(f"--data={opts.data}")
        if not any(a.startswith("--out") for a in child_argv):
            child_argv.append(f"--out={opts.out}")
        if not any(a.startswith("--log") for a in child_argv):
            child_argv.append(f"--log={opts.log}")
        topologies = ["one", "ds"] if opts.topology == "both" else [opts.topology]
        results = [run_one(topo, opts, kinds, child_argv) for topo in topologies]
    finally:
        kill_all()
    print(summary(results), flush=True)
    (opts.out / "summary.json").write_text(json.dumps(results, indent=1))
    return 1 if any(r.get("failures") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
