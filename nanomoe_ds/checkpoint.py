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

This file is the format alone: writing a rank's shard, the metadata's encoding and
checks, and the readers. How a save is staged, committed, pruned and recovered after a
crash is checkpoint_dir.py's; docs/checkpoints.md has the design and its costs. `ckpt.pt`
files written by earlier versions are still read (LegacyCheckpoint).
"""
from __future__ import annotations

import errno
import io
import json
import os
import traceback
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import ConfigError
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
def disk_error(path: Path, error: OSError, needed: int | None = None) -> dict:
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
    or disk_error's answer when the disk refused (the caller aborts the save on every rank).
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
        return disk_error(Path(e.filename) if e.filename else shard, e, needed)
    except Exception as e:  # not the disk: still an answer, or rank 0 would wait for this rank in the gather
        traceback.print_exc()  # a bug: where it happened matters more than one line
        return {"error": f"rank {rank}: {type(e).__name__}: {e}", "bug": True}
    files = {shard.name: {"bytes": position}, rng_path.name: {"bytes": len(rng_bytes), "crc": zlib.crc32(rng_bytes)}}
    return {"records": records, "files": files}


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


def metadata_bytes(meta: dict) -> bytes:
    """metadata.json's bytes: the index and the small state, with the CRC-32 of their canonical form."""
    return json.dumps({**meta, "crc32": zlib.crc32(_canonical(meta))}).encode()


def read_metadata(path: Path) -> dict | None:
    """A metadata file whose checksum holds, or None."""
    try:
        meta = json.loads(path.read_bytes())
        crc = meta.pop("crc32")
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return meta if zlib.crc32(_canonical(meta)) == crc else None


# ---------------------------------------------------------------- reading
class Checkpoint:
    """A committed checkpoint opened for reading: its metadata now, tensor ranges on demand."""

    def __init__(self, directory: Path, meta: dict, fallback: str):
        self.directory, self.meta, self._fallback = directory, meta, fallback
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
                # No local keeps the record: _record drops it before reading the next one.
                out[lo - start:hi - start].copy_(torch.from_numpy(self._record(record)[lo - offset:hi - offset]))
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
        self._cached = None  # dropped before the next record is allocated: a reader holds one record, not two
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
        """What to do when this checkpoint is unreadable (its opener knows whether an older one is left)."""
        return self._fallback

    def model_state(self, model: nn.Module) -> dict:
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
        self._fallback = "restore it from a copy, or start again with init_from=scratch"
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
