"""Processes without the import bill: a server that imports torch and DeepSpeed once, then forks a child
per command.

A test process that runs `python launch/train.py ...` pays 2-3 s of imports before the script does
anything; a tiny run or a refusal then takes a fraction of that. The server (this file run as a
script) imports them once and forks: each child is a real process of its own, with its own
environment, pid, process group, stdout and stderr files and exit status, and it runs the script
as `__main__`, as the interpreter would, so `os._exit`, process groups and launcher variables
behave as in a fresh process; it runs in the repository's root. What a child inherits beyond that is
what importing the modules did: no threads (the server runs no torch op, so OpenMP's pool does not
exist yet) and no process group. One difference stays: what torch reads from the environment when it
is imported is the server's (OMP_NUM_THREADS=1: one thread per process, as dist_utils' ranks have;
TORCH_LOGS unset), so a test that sets such a variable runs its process the ordinary way.

    with ForkServer() as server:            # tests get one per session: the `forkserver` fixture
        server.run(["launch/train.py", *args], env=loopback_env())
        server.run_ranks(2, argv)           # as dist_utils.run_ranks
        server.spawn_ranks(body, args, 2)   # as dist_utils.spawn_ranks
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The muon module is what DeepSpeed imports at its first engine build (it pulls in torch._inductor):
# loaded here once, not in every forked rank.
PRELOAD = ("torch", "numpy", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer", "nanomoe_ds.ds_engine",
           "nanomoe_ds.trainer", "nanomoe_ds.start")


class ForkServer:
    """The client: starts the server, sends it jobs (run together, one child each) and collects their results."""

    def __init__(self):
        from dist_utils import loopback_env
        self.dir = Path(tempfile.mkdtemp(prefix="forkserver."))
        self.jobs = 0
        self.log = open(self.dir / "server.log", "w")
        env = loopback_env()
        del env["PYTHONWARNINGS"]  # the interpreter's default filters; each child applies its own PYTHONWARNINGS
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def run(self, argv: list[str], env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        """`subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, env=env)`, forked:
        a command that outlives `timeout` fails as a hang."""
        (result,) = self.run_together([(argv, env)], timeout)
        return result

    def run_together(self, commands: list[tuple[list[str], dict | None]], timeout: float) -> list:
        """Start every (argv, env) at once, wait for all; CompletedProcess each, in order."""
        jobs = [self._job({"script": argv[0], "argv": argv[1:]}, env) for argv, env in commands]
        codes = self._send(jobs, timeout, what=[argv for argv, _ in commands])
        return [subprocess.CompletedProcess([sys.executable, *argv], code, *self._output(job))
                for (argv, _), job, code in zip(commands, jobs, codes)]

    def run_ranks(self, n: int, argv: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
        """dist_utils.run_ranks in forked processes: launch/train.py on n ranks with the launcher's variables."""
        from dist_utils import rank_commands
        try:
            return self.run_together(rank_commands(n, argv), timeout)
        except TimeoutError:
            raise AssertionError(f"rank hung for {timeout}s: {argv}") from None

    def spawn_ranks(self, body, args: tuple, nprocs: int, timeout: float = 240):
        """dist_utils.spawn_ranks in forked processes: `body(rank, *args)` on `nprocs` gloo ranks; their
        output is echoed to this process's stdout and stderr (where capfd reads it)."""
        from dist_utils import _gloo_rank, free_port
        port = free_port()
        jobs = [self._job({"call": base64.b64encode(pickle.dumps((_gloo_rank, (rank, nprocs, port, body, args))))
                           .decode()}, dict(os.environ)) for rank in range(nprocs)]
        try:
            codes = self._send(jobs, timeout, what=body.__name__)
        except TimeoutError:
            raise AssertionError(f"ranks did not finish in {timeout} s") from None
        finally:
            for job in jobs:
                out, err = self._output(job)
                sys.stdout.write(out)
                sys.stderr.write(err)
        failed = [f"rank {rank} exited with {code}" for rank, code in enumerate(codes) if code != 0]
        assert not failed, ", ".join(failed)

    def _job(self, what: dict, env: dict | None) -> dict:
        self.jobs += 1
        stem = self.dir / f"job{self.jobs}"
        return {**what, "env": dict(os.environ) if env is None else env,
                "stdout": f"{stem}.out", "stderr": f"{stem}.err"}

    def _output(self, job: dict) -> tuple[str, str]:
        """The job's stdout and stderr, read once (their files go)."""
        texts = []
        for key in ("stdout", "stderr"):
            path = Path(job[key])
            texts.append(path.read_text(errors="replace") if path.exists() else "")
            path.unlink(missing_ok=True)
        return tuple(texts)

    def _send(self, jobs: list[dict], timeout: float, what) -> list[int]:
        """One request: the server forks the jobs, waits for all of them (killing them past `timeout`)."""
        assert self.proc.poll() is None, f"the fork server died: {(self.dir / 'server.log').read_text()[-3000:]}"
        self.proc.stdin.write(json.dumps({"jobs": jobs, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + 60)
        line = self.proc.stdout.readline() if ready else ""
        assert line, f"the fork server did not answer: {(self.dir / 'server.log').read_text()[-3000:]}"
        reply = json.loads(line)
        if reply["timed_out"]:
            raise TimeoutError(f"{what} ran past {timeout}s")
        return reply["codes"]


# ---------------------------------------------------------------- the server (this file as a script)
def serve():
    """Read one request per line on stdin; answer each with the jobs' exit codes on the original stdout."""
    import importlib
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # what an import prints must not reach the answers
    sys.path.insert(1, str(REPO))  # this checkout's package, as the scripts do; [0] is the child's script's folder
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:  # only a speed-up: another DeepSpeed may lack a module; the child imports what it needs
            pass
    for line in sys.stdin:
        request = json.loads(line)
        pids = [fork_job(job, answer.fileno()) for job in request["jobs"]]
        codes, timed_out = wait_all(pids, request["timeout"])
        answer.write(json.dumps({"codes": codes, "timed_out": timed_out}) + "\n")
        answer.flush()
    os._exit(0)  # stdin closed: the client is done (an interpreter's exit would tear down torch for seconds)


def wait_all(pids: list[int], timeout: float) -> tuple[list, bool]:
    """Every child's exit code (negative: the signal that ended it); past `timeout` kill their process groups."""
    import signal
    codes: dict = {}
    deadline = time.monotonic() + timeout
    while len(codes) < len(pids) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    timed_out = len(codes) < len(pids)
    for pid in pids:
        if pid not in codes:
            os.killpg(pid, signal.SIGKILL)
            codes[pid] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return [codes[pid] for pid in pids], timed_out


def fork_job(job: dict, answer_fd: int) -> int:
    """Fork a child for `job`; it never returns into the server's loop."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setpgid(0, 0)  # the child and whatever it starts: killed together past the timeout
        os.close(answer_fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.environ.clear()
        os.environ.update(job["env"])
        apply_warning_options(job["env"])
        code = run_script(job["script"], job["argv"]) if "script" in job else call(job["call"])
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        end_process(code)


def apply_warning_options(env: dict):
    """PYTHONWARNINGS, as an interpreter started with it applies it (the server started without)."""
    import warnings
    for option in filter(None, env.get("PYTHONWARNINGS", "").split(",")):
        warnings._setoption(option)


def run_script(script: str, argv: list[str]) -> int:
    """`python script *argv`: the script as __main__, its directory first on sys.path; its exit status."""
    import runpy
    sys.argv = [script, *argv]
    sys.path[0] = os.path.dirname(os.path.abspath(script))
    try:
        runpy.run_path(script, run_name="__main__")
        return 0
    except SystemExit as e:
        return exit_status(e.code)
    except BaseException:
        import traceback
        traceback.print_exc()
        return 1


def call(pickled: str) -> int:
    """A module-level function and its arguments (spawn_ranks' rank: it ends the process itself)."""
    function, args = pickle.loads(base64.b64decode(pickled))
    function(*args)
    return 0


def exit_status(code) -> int:
    """The status the interpreter exits with for SystemExit(code)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def end_process(code: int):
    """End as the interpreter would: join threads, run atexit handlers, flush; then leave without
    returning into the server."""
    import atexit
    import threading
    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    serve()
