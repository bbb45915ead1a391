"""Where this process sits in the job, whichever launcher started it.

torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
The `deepspeed` launcher and torchrun set them; under mpirun DeepSpeed discovers
them through MPI itself, unless the user set MASTER_ADDR (then Open MPI's variables
are translated, so that address and MASTER_PORT stand). SLURM's `srun` sets only its own variables, so
`distributed_env` translates those (as torchtitan and Lightning do) when the usual
ones are missing. Pure functions of an environment mapping, so tests pass any.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Mapping

from .config import ConfigError

DEFAULT_MASTER_PORT = "29500"  # torch.distributed's usual default; set MASTER_PORT to run two jobs on one node
MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu3' -> 'gpu07', 'a1-ib,b2' -> 'a1-ib'."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = match.groups()
    if ranges is None:
        return prefix + suffix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first + suffix


def distributed_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables to add for this launcher (empty when nothing is missing).

    SLURM's always, Open MPI's where the user set MASTER_ADDR. Under mpirun inside a SLURM
    allocation SLURM_PROCID is not the MPI rank, so MPI's own variables win.
    """
    if "RANK" in environ:
        return {}
    if "OMPI_COMM_WORLD_RANK" in environ:
        return _open_mpi_env(environ)
    if "SLURM_PROCID" not in environ or any(v in environ for v in MPI_RANK_VARS):
        return {}
    env = {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
           "LOCAL_RANK": environ.get("SLURM_LOCALID", "0")}
    if "MASTER_ADDR" not in environ:
        env["MASTER_ADDR"] = first_host(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST", "127.0.0.1"))
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = DEFAULT_MASTER_PORT
    return env


def _open_mpi_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Under Open MPI's mpirun, with MASTER_ADDR set by the user: the ranks from Open MPI's variables.

    DeepSpeed's MPI discovery runs when RANK is missing, and it overwrites MASTER_ADDR with
    rank 0's first network address and MASTER_PORT with 29500. A user who exported
    MASTER_ADDR (`mpirun -x MASTER_ADDR=...`) chose the address, so discovery is skipped;
    without it, discovery finds rank 0's host, which multi-node runs need.
    """
    if "MASTER_ADDR" not in environ:
        return {}
    env = {"RANK": environ["OMPI_COMM_WORLD_RANK"], "WORLD_SIZE": environ.get("OMPI_COMM_WORLD_SIZE", "1"),
           "LOCAL_RANK": environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")}
    if "MASTER_PORT" not in environ:
        env["MASTER_PORT"] = DEFAULT_MASTER_PORT
    return env


def process_rank(environ: Mapping[str, str]) -> int:
    """This process's global rank as its launcher states it (0 for a plain single-process run)."""
    for var in ("RANK", *MPI_RANK_VARS, "SLURM_PROCID"):
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 0


def world_size(environ: Mapping[str, str]) -> int:
    """The number of ranks in the job as its launcher states it (1 for a plain single-process run)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if environ.get(var, "").isdigit():
            return int(environ[var])
    return 1


def error_line(error: Exception, environ: Mapping[str, str]) -> str:
    """`error: <message>`, with `rank R: ` after `error: ` when the job has more than one rank."""
    if world_size(environ) > 1:
        return f"error: rank {process_rank(environ)}: {error}"
    return f"error: {error}"


def run_script(main, argv: list[str]):
    """A side script's entry point (sample, export): main(argv), and a refusal or an I/O failure as one
    `error: ...` line with exit status 2 instead of a traceback."""
    try:
        main(argv)
    except (ConfigError, OSError) as e:
        report_error(e)
        sys.exit(2)


def errno_advice(number: int | None) -> str:
    """What to do about a failed file operation in out_dir, by its errno."""
    import errno
    return {
        errno.ENOSPC: "free space or choose another --out_dir",
        errno.EDQUOT: "free space within your quota or choose another --out_dir",
        errno.EROFS: "the file system is read-only: choose a writable --out_dir",
        errno.EACCES: "check its permissions, or choose another --out_dir",
        errno.EPERM: "check its permissions, or choose another --out_dir",
        errno.ENOENT: "it is not there on this node: a multi-node run needs an out_dir that every node shares",
        errno.ENOLCK: "this file system does not support file locks (flock): mount Lustre with -o flock, run NFS "
                      "with its lock manager, or put out_dir on a file system that locks",
    }.get(number, "check the path and the file system")


def os_error_line(error: OSError) -> str:
    """One line for a failed file operation: the path, what the system said, and what to do about it."""
    where = f"{error.filename}: " if error.filename else ""
    advice = errno_advice(error.errno)
    if advice == errno_advice(None):
        advice += ", then start again with --init_from=auto"
    return f"{where}{error.strerror or error}; {advice}"


class RunStopped(Exception):
    """The run stopped itself before a bad state could be saved: a non-finite loss, replicas that differ,
    gradients reduced in different orders. The checkpoint in out_dir is the last good state."""


def exit_status(error: BaseException) -> int | None:
    """For an error that ends a run in one line: report it on this rank and return the process's exit
    status (2: refused input, 3: stopped before saving a bad state, 1: a file system's error). None for
    anything else: a bug, or another rank's failure, which the caller reports.
    Both entry paths (launch/train.py, ds_engine.run) end through this one table."""
    if isinstance(error, ConfigError):
        report_error(error)
        return 2
    if isinstance(error, RunStopped):
        report_error(error)  # nothing of the bad state was saved
        return 3
    if isinstance(error, OSError):  # a disk that fills or goes away mid-run: one line, not a traceback
        report_error(os_error_line(error))
        return 1
    return None


def report_error(error: Exception):
    """Print an error on this rank's stderr, in one line, whichever rank it is.

    Every rank that has an error prints it. Rank 0 alone would hide a failure that only
    another rank has (a data file missing on its node): the job would then end, minutes
    later, on rank 0's dist_timeout line. In a multi-rank job each line names its rank,
    rank 0's too, as the dist_timeout line does. A config error that every rank hits is
    then printed once per rank, one `error: rank R: ...` line each: the cost of never
    hiding one; telling them apart from node-local ones would need the ranks to talk,
    which an error before or during set-up cannot rely on.
    """
    # One write of the whole line: ranks that share a stderr pipe (the deepspeed
    # launcher's) then never interleave within a line.
    sys.stderr.write(error_line(error, os.environ) + "\n")
    sys.stderr.flush()


# What torch.distributed's backends say when a peer process is gone (gloo: its socket closed
# or reset; NCCL: the communicator aborted after a remote failure).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
             "remote process exited", "communicator was aborted")


def collective_failure(message: str, functions: list[str], dist_timeout: int) -> str | None:
    """One line for a collective that failed because another rank died or hung; None for other errors.

    `functions` are the names of the traceback's frames in torch.distributed's API
    (distributed_c10d.py), outermost first: the first names the collective this rank was in.
    """
    collective = functions[0] if functions else "a collective"
    if any(text in message for text in PEER_GONE):
        address = re.search(r"\[([0-9A-Za-z.:%-]+)\]:(\d+)", message)
        peer = f"the rank at {address.group(1)}:{address.group(2)}" if address else "another rank"
        return (f"lost {peer} during {collective}: it died or its node is gone; this run cannot go on at this "
                "size: restart it with --init_from=auto (torchrun --max-restarts does that by itself)")
    if "timed out" in message.lower() or "timeout" in message.lower():
        return (f"a collective ({collective}) waited longer than dist_timeout={dist_timeout}s; another rank is hung "
                "or dead")
    return None


def distributed_frames(error: BaseException) -> list[str]:
    """The names of `error`'s traceback frames in torch.distributed's API, outermost first."""
    import traceback
    return [frame.name for frame in traceback.extract_tb(error.__traceback__)
            if frame.filename.endswith("distributed_c10d.py")]
