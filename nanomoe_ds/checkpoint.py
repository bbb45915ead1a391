"""The checkpoint format: every rank writes its own share, a small metadata record commits it.

A checkpoint is a directory `out_dir/iter_N/`:

    shard_00000.bin    rank 0's share: raw fp32 records, back to back
    shard_00001.bin    rank 1's share ...
    rng_00000.pt       each rank's RNG state
    metadata.json      the small state (iteration, config, model shape, topology, AdamW's
                       step, the loss scale) and the index: for every record, which tensor,
                       where in it (an offset into the flattened whole tensor), which file,
                       where in the file, and its CRC-32

Every tensor (weights, AdamW's two moments, the router bias) is addressed as its
flattened whole: a record is a contiguous range of it. A rank writes the ranges it
owns (its ZeRO fragment, its local experts' rows) and reads the ranges it needs, from
whichever files hold them: nothing depends on the topology that wrote it, and no rank
holds more than its share plus one record (at most RECORD_BYTES). The single-device
trainer writes the same format, with one shard.

Crash safety: ranks write into `iter_N.partial/`; rank 0 writes metadata.json there
last, then renames the directory to `iter_N/`. That rename is the commit point: a
directory named `iter_N` is complete. Resume takes the newest one (or --resume_iter).
docs/checkpoints.md has the design and its costs; `ckpt.pt` files written by earlier
versions are still read (LegacyCheckpoint).
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import traceback
import zlib
from pathlib import Path

import numpy as np
import torch

from .config import CKPT_NAME, ConfigError, GPTConfig, init_source
from .launch_env import errno_advice
from .model import GPT
from .train_state import rng_state

METADATA = "metadata.json"
FORMAT_VERSION = 1
RECORD_BYTES = 16 << 20  # a record's size cap: the most a reader holds at once beyond its share


class CheckpointError(ConfigError):
    """A checkpoint could not be written or read; one line for the user."""


def tensor_key(kind: str, name: str) -> str:
    """A tensor's name in the index: kind is "model" (weights, buffers) or an AdamW moment."""
    return f"{kind}/{name}"


# ---------------------------------------------------------------- writing
def _disk_error(path: Path, error: OSError, needed: int | None = None) -> dict:
    """A failed write, as save() passes it between ranks: one line (which file, why, how much it needed)
    and the errno, which picks the advice (launch_env.errno_advice)."""
    why = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only file system"}.get(error.errno, error.strerror or str(error))
    size = f" (this rank's share needs {needed / 2**20:.1f} MiB)" if needed else ""
    return {"error": f"{path}: {why}{size}", "errno": error.errno}


def write_shard(directory: Path, rank: int, pieces) -> dict:
    """Write this rank's pieces and RNG state into `directory`; return its part of the index.

    `pieces` yields (tensor key, offset into the flattened whole tensor, 1-D tensor); each
    is written in records of at most RECORD_BYTES, copied to the host one record at a time.
    Returns {"records": [[key, offset, numel, file, position, crc32], ...], "files": {...}}
    or _disk_error's answer when the disk refused (the caller aborts the save on every rank).
    """
    shard = directory / f"shard_{rank:05d}.bin"
    records, position, needed = [], 0, None
    try:
        pieces = list(pieces)
        needed = sum(value.numel() * 4 for _, _, value in pieces)
        with open(shard, "wb") as f:
            per_record = RECORD_BYTES // 4
            for key, offset, value in pieces:
                for start in range(0, value.numel(), per_record):
                    chunk = value.detach()[start:start + per_record].to("cpu", torch.float32).contiguous()
                    data = memoryview(chunk.numpy()).cast("B")
                    f.write(data)
                    records.append([key, offset + start, chunk.numel(), shard.name, position, zlib.crc32(data)])
                    position += len(data)
            f.flush()
            os.fsync(f.fileno())
        rng_path = directory / f"rng_{rank:05d}.pt"
        buffer = io.BytesIO()
        torch.save(rng_state(), buffer)
        rng_bytes = buffer.getvalue()
        with open(rng_path, "wb") as f:
            f.write(rng_bytes)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return _disk_error(Path(e.filename) if e.filename else shard, e, needed)
    except Exception as e:  # not the disk: still an answer, or rank 0 would wait for this rank in the gather
        traceback.print_exc()  # a bug: where it happened matters more than one line
        return {"error": f"rank {rank}: {type(e).__name__}: {e}", "bug": True}
    files = {shard.name: {"bytes": position}, rng_path.name: {"bytes": len(rng_bytes), "crc": zlib.crc32(rng_bytes)}}
    return {"records": records, "files": files}


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
        return _disk_error(staging, e)
    return None


def check_index(meta: dict):
    """Every element of every tensor in exactly one record: sorted by offset, each record starts where the
    previous one ended, and the last ends at the tensor's size. Raises ValueError naming the first flaw."""
    ranges: dict[str, list] = {}
    for key, offset, numel, *_ in meta["records"]:
        ranges.setdefault(key, []).append((offset, numel))
    for key, shape in meta["tensors"].items():
        end, size = 0, int(np.prod(shape))
        for offset, numel in sorted(ranges.pop(key, [])):
            if offset != end:
                raise ValueError(f"{key}: elements {min(offset, end)}-{max(offset, end)} are "
                                 f"{'missing' if offset > end else 'in two records'}")
            end += numel
        if end != size:
            raise ValueError(f"{key}: records cover {end} of its {size} elements")
    if ranges:
        raise ValueError(f"records of tensors the index does not list: {', '.join(sorted(ranges)[:3])}")


def _canonical(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


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
    is finished by the next resume (recover_partial_saves). Returns None, or _disk_error's
    answer when the disk refused (the previous checkpoint is untouched).
    """
    check_index(meta)
    staging = staging_dir(out_dir, iter_num)
    path = staging / METADATA
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(json.dumps({**meta, "crc32": zlib.crc32(_canonical(meta))}).encode())
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(staging)
        _install(out_dir, iter_num)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        return _disk_error(Path(e.filename) if e.filename else path, e)
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
        if it.isdigit() and _read_metadata(path / METADATA) is not None:
            _install(out_dir, int(it))
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in Path(out_dir).glob("iter_*.discard"):
        shutil.rmtree(path, ignore_errors=True)
    (Path(out_dir) / CKPT_NAME).with_suffix(".pt.tmp").unlink(missing_ok=True)  # an older version's


def _read_metadata(path: Path) -> dict | None:
    """A metadata file whose checksum holds, or None."""
    try:
        meta = json.loads(path.read_bytes())
        crc = meta.pop("crc32")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return meta if zlib.crc32(_canonical(meta)) == crc else None


def check_writable(out_dir: str, rank: int):
    """Refuse an out_dir this rank cannot write, before training: every rank writes its own shard there."""
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = Path(out_dir) / f".write_probe_{rank}_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"out_dir '{out_dir}' is not writable ({_disk_error(Path(out_dir), e)['error'].split(': ', 1)[1]}): "
                          "checkpoints and metrics go there; choose another --out_dir") from None


# ---------------------------------------------------------------- reading
class Checkpoint:
    """A committed checkpoint opened for reading: its metadata now, tensor ranges on demand."""

    def __init__(self, directory: Path, meta: dict):
        self.directory, self.meta = directory, meta
        self.name = directory.name
        self._by_key: dict[str, list] = {}
        for record in meta["records"]:
            self._by_key.setdefault(record[0], []).append(record)
        for records in self._by_key.values():
            records.sort(key=lambda r: r[1])
        self._cached: tuple | None = None  # (record, data): consecutive reads often share a record

    def has(self, key: str) -> bool:
        return key in self.meta["tensors"]

    def shape(self, key: str) -> tuple:
        return tuple(self.meta["tensors"][key])

    def read_into(self, key: str, start: int, out: torch.Tensor):
        """Fill the 1-D tensor `out` (any dtype, any device) with elements [start, start + numel) of `key`."""
        end = start + out.numel()
        if key not in self._by_key or end > int(np.prod(self.shape(key))):
            raise CheckpointError(f"{self.directory}: holds no {key}[{start}:{end}]; it was saved by another model")
        copied = 0
        for record in self._by_key[key]:
            _, offset, numel, *_ = record
            lo, hi = max(start, offset), min(end, offset + numel)
            if lo < hi:
                data = self._record(record)
                out[lo - start:hi - start].copy_(torch.from_numpy(data[lo - offset:hi - offset]))
                copied += hi - lo
        if copied != out.numel():  # check_index makes this impossible; never hand back uninitialised memory
            raise CheckpointError(f"{self.directory}: the index covers {copied} of {key}[{start}:{end}]; "
                                  f"{self.fallback()}")

    def whole(self, key: str) -> torch.Tensor:
        """A whole tensor, fp32 on the CPU (for consolidating: sampling, export)."""
        out = torch.empty(self.shape(key), dtype=torch.float32)
        self.read_into(key, 0, out.view(-1))
        return out

    def _record(self, record) -> np.ndarray:
        if self._cached is not None and self._cached[0] is record:
            return self._cached[1]
        key, _, numel, file, position, crc = record
        path = self.directory / file
        data = bytearray(numel * 4)
        try:
            with open(path, "rb") as f:
                f.seek(position)
                got = f.readinto(data)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror}; {self.fallback()}") from None
        if got != len(data) or zlib.crc32(data) != crc:
            raise CheckpointError(f"{path} is corrupt (checksum mismatch at byte {position}, in {key}); "
                                  f"{self.fallback()}")
        array = np.frombuffer(data, dtype=np.float32)
        self._cached = (record, array)
        return array

    def rng(self, rank: int) -> dict | None:
        """Rank `rank`'s RNG state, if the run that saved had that rank."""
        path = self.directory / f"rng_{rank:05d}.pt"
        info = self.meta["files"].get(path.name)
        if info is None:
            return None
        try:
            data = path.read_bytes()
        except OSError:
            data = b""  # missing or unreadable: the checksum below says so
        if zlib.crc32(data) != info["crc"]:
            raise CheckpointError(f"{path} is corrupt (checksum mismatch); {self.fallback()}")
        return torch.load(io.BytesIO(data), weights_only=False)

    def fallback(self) -> str:
        """What to do when this checkpoint is unreadable: the previous one, if there is one."""
        return fallback_advice(self.directory, self.meta.get("iter_num"))

    def model_state(self, model: GPT) -> dict:
        """Whole fp32 tensors for every entry of `model`'s state_dict that the checkpoint holds (tied names too)."""
        by_id = {id(p): name for name, p in model.named_parameters()}  # a tied weight's saved name
        names = {**{n: n for n, _ in model.named_buffers()},
                 **{n: by_id[id(p)] for n, p in model.named_parameters(remove_duplicate=False)}}
        return {n: self.whole(tensor_key("model", src)) for n, src in names.items()
                if self.has(tensor_key("model", src))}


class LegacyCheckpoint(Checkpoint):
    """An `out_dir/ckpt.pt` written before the sharded format: whole tensors by name, read through mmap."""

    def __init__(self, path: Path):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # a truncated or overwritten file: zip, pickle or storage errors
            raise CheckpointError(f"cannot read {path}: it is truncated or corrupt "
                                  f"({str(e).splitlines()[0][:120]}); restore it from a copy, or start again "
                                  "with init_from=scratch") from None
        if "topology" not in ckpt:
            raise CheckpointError(f"{path} has no topology record (written before checkpoints could be resharded); "
                                  "resume it with the nanomoe_ds that wrote it, or start again")
        self.directory, self.name, self._cached = path.parent, path.name, None
        self._tensors = {tensor_key("model", n): v for n, v in ckpt["model"].items()}
        opt = ckpt["optimizer_state"]
        for name, moments in opt["moments"].items():
            for kind, value in moments.items():
                self._tensors[tensor_key(kind, name)] = value
        scaler = ckpt.get("scaler") or {}
        self.meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer_state", "rng", "scaler")}
        self.meta.update(optimizer_step=opt["step"], files={}, records=[],
                         loss_scale={"scale": scaler["scale"]} if scaler.get("scale") else None,
                         tensors={k: list(v.shape) for k, v in self._tensors.items()})
        self._rng = ckpt["rng"]

    def read_into(self, key: str, start: int, out: torch.Tensor):
        out.copy_(self._tensors[key].reshape(-1)[start:start + out.numel()])

    def rng(self, rank: int) -> dict | None:
        return self._rng if rank == 0 else None  # rank 0's: the only one it saved

    def fallback(self) -> str:
        return "restore it from a copy, or start again with init_from=scratch"


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
    meta = _read_metadata(directory / METADATA)
    if meta is None:
        raise CheckpointError(f"{directory / METADATA} is unreadable or fails its checksum; restore it from a copy, "
                              "or resume from an older iter_N with --resume_iter")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{directory / METADATA} has format {meta.get('format')}, this nanomoe_ds reads "
                              f"{FORMAT_VERSION}; use the version that wrote it")
    try:
        check_index(meta)
        ckpt = Checkpoint(directory, meta)
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


# ---------------------------------------------------------------- whole models (sampling, export, init_from)
def model_from_checkpoint(ckpt: Checkpoint, dropout: float | None = None) -> GPT:
    """The model a checkpoint holds, whole on the CPU; checkpoints older than the `activation` key get exact GELU."""
    args = ckpt.meta["model_args"] if dropout is None else {**ckpt.meta["model_args"], "dropout": dropout}
    model = GPT(GPTConfig(**args))
    model.load_state_dict(ckpt.model_state(model))
    return model


def load_source(init_from: str, dropout: float, iteration: int = -1) -> GPT:
    """The model an init_from source names (config.init_source): GPT-2 through transformers, or a run of ours
    (its checkpoint `iteration`, -1 for the newest)."""
    if init_source(init_from) == "hf":
        return GPT.from_pretrained(init_from, {"dropout": dropout})
    return model_from_checkpoint(open_checkpoint(init_from, iteration), dropout=dropout)


# ---------------------------------------------------------------- one save, every rank
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
