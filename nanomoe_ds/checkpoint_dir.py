"""A checkpoint directory's life: staging a save, committing it, keeping the newest, recovering after a crash.

Crash safety: ranks write their shards into `iter_N.partial/`; rank 0 writes metadata.json
there last, then renames the directory to `iter_N/`. The metadata's atomic write is the
commit point and the rename makes it visible: a directory named `iter_N` is complete, and
a staging directory holding metadata is finished by the next resume. Resume takes the
newest one (or --resume_iter). The bytes inside are checkpoint.py's format.
"""
from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path

from .checkpoint import (FORMAT_VERSION, METADATA, Checkpoint, CheckpointError, LegacyCheckpoint, check_index,
                         disk_error, metadata_bytes, read_metadata, write_shard)
from .config import CKPT_NAME, ConfigError
from .launch_env import errno_advice


def _fsync_file(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def staging_dir(out_dir: str, iter_num: int) -> Path:
    return Path(out_dir) / f"iter_{iter_num}.partial"


def prepare_staging(out_dir: str, iter_num: int) -> dict | None:
    """Rank 0, before a save: an empty staging directory (a killed save's leftovers removed); or a disk error."""
    staging = staging_dir(out_dir, iter_num)
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as e:
        return disk_error(staging, e)
    return None


def _discard(path: Path):
    """Delete a committed checkpoint so that no kill leaves part of it looking committed: out of
    committed()'s sight first (an atomic rename), then removed."""
    trash = path.with_name(path.name + ".discard")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _install(out_dir: str, iter_num: int):
    """Rename a complete iter_N.partial to iter_N. Checkpoints at N or newer (left by a run resumed from an
    older one with --resume_iter) go out of sight first, so that "the newest" is always this run's; they
    are deleted only once the new one is in place, and come back if the rename fails. A directory at
    iter_N that is not a committed checkpoint (a crash's, an older format's, a copy by hand) is moved
    aside, never reused or deleted."""
    target = Path(out_dir) / f"iter_{iter_num}"
    if target.exists() and not (target / METADATA).is_file():
        aside = _free_name(target.with_name(target.name + ".stale"))
        os.replace(target, aside)
        print(f"note: {target} was not a committed checkpoint (no {METADATA}); moved aside to {aside.name}",
              flush=True)
    hidden = []
    for it, path in committed(out_dir):
        if it >= iter_num:
            trash = path.with_name(path.name + ".discard")
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(path, trash)
            hidden.append((path, trash))
    try:
        os.replace(staging_dir(out_dir, iter_num), target)
    except OSError:
        for path, trash in hidden:  # a failed install loses nothing that was committed
            os.replace(trash, path)
        raise
    _fsync_dir(Path(out_dir))
    for _, trash in hidden:
        shutil.rmtree(trash, ignore_errors=True)


def set_aside(out_dir: str, iter_num: int) -> Path:
    """Rank 0, holding the lock: move a committed checkpoint that fails to verify out of committed()'s
    sight, as iter_N.corrupt, for a person to inspect (nothing deletes it)."""
    path = Path(out_dir) / f"iter_{iter_num}"
    aside = _free_name(path.with_name(path.name + ".corrupt"))
    os.replace(path, aside)
    _fsync_dir(Path(out_dir))
    return aside


def _free_name(path: Path) -> Path:
    """`path`, or `path.2`, `path.3`, ... : the first name not taken."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def commit(out_dir: str, iter_num: int, meta: dict, keep_last: int) -> dict | None:
    """Rank 0, after every rank wrote its shard: write the metadata into iter_N.partial, then install it.

    The metadata's atomic write is the commit point: a staging directory that holds it is
    complete (its shards were on disk before it was written), so a kill before the rename
    is finished by the next resume (recover_partial_saves). Returns None, or disk_error's
    answer when the disk refused (the previous checkpoint is untouched).
    """
    check_index(meta)
    staging = staging_dir(out_dir, iter_num)
    path = staging / METADATA
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(metadata_bytes(meta))
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(staging)
        _install(out_dir, iter_num)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        return disk_error(Path(e.filename) if e.filename else path, e)
    prune(out_dir, keep_last)
    return None


def committed(out_dir: str) -> list[tuple[int, Path]]:
    """The committed checkpoints in out_dir, oldest first."""
    found = []
    for path in Path(out_dir).glob("iter_*"):
        if path.name[5:].isdigit() and (path / METADATA).is_file():
            found.append((int(path.name[5:]), path))
    return sorted(found)


def prune(out_dir: str, keep_last: int):
    """Keep the newest `keep_last` committed checkpoints; remove the rest, and leftovers of removals."""
    for _, path in committed(out_dir)[:-keep_last]:
        _discard(path)
    for path in [*Path(out_dir).glob("iter_*.discard"), *Path(out_dir).glob("iter_*.partial")]:
        shutil.rmtree(path, ignore_errors=True)  # the saving run holds the lock: these are left by killed ones


def recover_partial_saves(out_dir: str):
    """On resume, by the run that owns out_dir (it holds the run lock), before choosing a checkpoint:
    finish a save whose metadata was written (committed) but not yet renamed; delete the rest of
    what a killed save or removal left. A reader (sample.py, init_from) must not: a run may be saving."""
    def iteration(path: Path) -> tuple[int, str]:  # iter_9 before iter_10 (string order has it after)
        it = path.name[5:-len(".partial")]
        return (int(it) if it.isdigit() else -1, path.name)
    for path in sorted(Path(out_dir).glob("iter_*.partial"), key=iteration):
        it = path.name[5:-len(".partial")]
        if it.isdigit() and read_metadata(path / METADATA) is not None:
            _install(out_dir, int(it))
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in Path(out_dir).glob("iter_*.discard"):
        shutil.rmtree(path, ignore_errors=True)
    (Path(out_dir) / CKPT_NAME).with_suffix(".pt.tmp").unlink(missing_ok=True)  # an older version's


def check_writable(out_dir: str, rank: int):
    """Refuse an out_dir this rank cannot write, before training: every rank writes its own shard there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = Path(out_dir) / f".write_probe_{rank}_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = disk_error(Path(out_dir), e)["error"].split(": ", 1)[1]
        raise ConfigError(f"out_dir '{out_dir}' is not writable ({why}): "
                          "checkpoints and metrics go there; choose another --out_dir") from None


def open_checkpoint(out_dir: str, iteration: int = -1) -> Checkpoint:
    """The newest committed checkpoint in out_dir (or iter_`iteration`), or an older version's ckpt.pt."""
    found = dict(committed(out_dir))
    if iteration >= 0:
        if iteration not in found:
            have = ", ".join(str(it) for it in found) or "none"
            raise ConfigError(f"{out_dir} has no committed checkpoint iter_{iteration} (committed iterations: {have})")
        directory = found[iteration]
    elif found:
        directory = found[max(found)]
    elif (Path(out_dir) / CKPT_NAME).is_file():
        return LegacyCheckpoint(Path(out_dir) / CKPT_NAME)
    else:
        raise ConfigError(f"no checkpoint in {out_dir} (no iter_N/{METADATA}); train first, or check --out_dir")
    meta = read_metadata(directory / METADATA)
    if meta is None:
        raise CheckpointError(f"{directory / METADATA} is unreadable or fails its checksum; restore it from a copy, "
                              "or resume from an older iter_N with --resume_iter")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / METADATA} has format {meta.get('format')}, this nanomoe_ds reads "
                              f"{FORMAT_VERSION}; use the version that wrote it")
    try:
        check_index(meta)
        ckpt = Checkpoint(directory, meta, fallback_advice(directory, meta.get("iter_num")))
        sizes = {name: int(info["bytes"]) for name, info in meta["files"].items()}
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:  # parses, but the wrong shape
        iteration = meta.get("iter_num") if isinstance(meta, dict) else None
        raise CheckpointError(f"{directory / METADATA} is inconsistent ({type(e).__name__}: {e}); "
                              f"{fallback_advice(directory, iteration)}") from None
    for name, expected in sizes.items():  # a truncated file can hide behind records that still verify
        try:
            size = (directory / name).stat().st_size
        except OSError as e:
            raise CheckpointError(f"cannot read {directory / name}: {e.strerror}; {ckpt.fallback()}") from None
        if size != expected:
            raise CheckpointError(f"{directory / name} is {'truncated' if size < expected else 'too long'} "
                                  f"({size:,} bytes; the checkpoint wrote {expected:,}); {ckpt.fallback()}")
    return ckpt


def fallback_advice(directory: Path, iteration) -> str:
    """What to do when the checkpoint in `directory` (of `iteration`, if known) is unreadable: the previous one."""
    older = [it for it, _ in committed(directory.parent) if isinstance(iteration, int) and it < iteration]
    if older:
        return (f"the previous checkpoint iter_{older[-1]} is still there: resume from it with "
                f"--init_from=resume --resume_iter={older[-1]}")
    return "no earlier checkpoint is left in this out_dir: restore the file from a copy, or start again"


class SingleProcess:
    """The collectives of a world of one (the single-device trainer)."""

    def gather(self, obj) -> list:
        return [obj]

    def broadcast(self, obj):
        return obj


def save(out_dir: str, meta: dict, pieces, rank: int, keep_last: int, collectives=SingleProcess()):
    """Every rank calls this with its pieces; rank 0's `meta` holds the small state and the tensors' shapes.

    Order: rank 0 makes the staging directory; every rank writes its shard; rank 0 gathers
    the index parts (so every shard is on disk) and commits; every rank learns the outcome.
    A disk error on any rank aborts the save on all, in one line, leaving the previous
    checkpoint as it was and no staging directory behind.
    """
    iter_num = meta["iter_num"]
    # failure: {"error": one line, and "errno" (the disk's) or "bug" (anything else)}, the same on every rank
    failure = collectives.broadcast(prepare_staging(out_dir, iter_num) if rank == 0 else None)
    if failure is None:
        parts = collectives.gather(write_shard(staging_dir(out_dir, iter_num), rank, pieces))
        if rank == 0:
            failure = next((part for part in parts if "error" in part), None)
            if failure is None:
                index = {"format": FORMAT_VERSION, **meta, "records": [r for part in parts for r in part["records"]],
                         "files": {k: v for part in parts for k, v in part["files"].items()}}
                try:
                    failure = commit(out_dir, iter_num, index, keep_last)
                except Exception as e:  # not a disk error (e.g. check_index): still tell the other ranks
                    traceback.print_exc()
                    shutil.rmtree(staging_dir(out_dir, iter_num), ignore_errors=True)
                    failure = {"error": f"{type(e).__name__}: {e}", "bug": True}
            else:
                shutil.rmtree(staging_dir(out_dir, iter_num), ignore_errors=True)
        failure = collectives.broadcast(failure)
    if failure is not None:
        last = committed(out_dir)
        kept = f"the last committed checkpoint, {last[-1][1].name}, is intact" if last else "no checkpoint was committed"
        advice = ("this is a bug, not the disk (its traceback is above): please report it"
                  if failure.get("bug") else errno_advice(failure.get("errno")))
        raise CheckpointError(f"cannot save the checkpoint of iteration {iter_num}: {failure['error']}; {kept}; "
                              f"{advice}, then continue with --init_from=resume")
