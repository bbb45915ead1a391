"""Batches from nanoGPT's uint16 token files, identical whatever the number of ranks.

Micro-batch `m` of step `it` is drawn from a generator seeded by (seed, split,
it, m), so the global batch of a step does not depend on the world size, the
accumulation split or on resuming: rank r of W takes micro-batches r, r+W, ...
A 2-rank run and a 1-device run therefore see the same data step by step.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from . import launch_env
from .config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": 0, "val": 1}


def resolve_data_dir(dataset: str, data_dir: str = "") -> Path:
    return Path(data_dir) if data_dir else REPO_ROOT / "data" / dataset


def check_data(data_dir: Path, block_size: int):
    """Fail early, in one line, when the prepared data is missing, too short, or not what prepare.py wrote.

    Sizes only (os.stat): the token count tokens.json recorded catches a .bin truncated
    or replaced since, without reading it.
    """
    stats = read_token_stats(data_dir)
    for split in SPLITS:
        f = data_dir / f"{split}.bin"
        if not f.exists():
            raise ConfigError(f"missing {f}; run data/{data_dir.name}/prepare.py first")
        size = f.stat().st_size
        if size % 2:  # uint16 ids are two bytes each: an odd size is a truncated or foreign file
            raise ConfigError(f"{f} has an odd number of bytes ({size:,}), so it is not uint16 token ids; "
                              f"re-run data/{data_dir.name}/prepare.py")
        n = size // 2
        if n <= block_size + 1:
            raise ConfigError(f"{f} holds {n} tokens, fewer than block_size+2 ({block_size + 2})")
        if stats is not None and n != stats[split]["tokens"]:
            raise ConfigError(f"{f} holds {n:,} tokens, but {TOKEN_STATS} records {stats[split]['tokens']:,}: "
                              f"it was truncated or replaced since; re-run data/{data_dir.name}/prepare.py")


# Each split's token count and largest id, as data/*/prepare.py records them next to the .bin
# files (prepare_common.write_token_stats): start-up checks these instead of reading every token.
TOKEN_STATS = "tokens.json"
STAT_KEYS = ("tokens", "max_token")


def read_token_stats(data_dir: Path) -> dict | None:
    """{split: {"tokens", "max_token", "dtype"}} from data_dir/tokens.json; None if there is none."""
    path = data_dir / TOKEN_STATS
    try:
        stats = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e}); delete it (the next start rebuilds it "
                          f"from the .bin files) or re-run data/{data_dir.name}/prepare.py") from None
    for split in SPLITS:
        entry = stats.get(split) if isinstance(stats, dict) else None
        if not isinstance(entry, dict) or any(type(entry.get(k)) is not int for k in STAT_KEYS):
            raise ConfigError(f"{path} has no integer tokens and max_token for {split}; delete it (the next start "
                              f"rebuilds it from the .bin files) or re-run data/{data_dir.name}/prepare.py")
        if entry.get("dtype", "uint16") != "uint16":
            raise ConfigError(f"{path} records {split} as {entry['dtype']}, but training reads uint16 token ids; "
                              f"re-run data/{data_dir.name}/prepare.py")
    return stats


def scan_token_stats(data_dir: Path) -> dict:
    """The token stats read from the .bin files themselves: one pass over all the data."""
    stats = {}
    for split in SPLITS:
        ids = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        stats[split] = {"tokens": len(ids), "max_token": int(ids.max()) if len(ids) else -1, "dtype": "uint16"}
    return stats


def write_token_stats(data_dir: Path, stats: dict):
    """Write tokens.json atomically (a temporary name, then a rename), as prepare.py does."""
    path = data_dir / TOKEN_STATS
    tmp = path.with_name(f"{TOKEN_STATS}.{os.getpid()}.tmp")  # per process: two jobs may start on one data_dir
    try:
        tmp.write_text(json.dumps(stats, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def record_token_stats(data_dir: Path) -> dict:
    """For a data_dir prepared before tokens.json existed: scan once, and write it so later starts don't."""
    stats = scan_token_stats(data_dir)
    try:
        write_token_stats(data_dir, stats)
        said = "wrote it, so later starts read it instead"
    except OSError as e:  # a read-only data_dir: the scan still checked this run
        said = f"could not write it ({e.strerror or e}), so every start scans until it can"
    print(f"no {data_dir / TOKEN_STATS} (data from an older prepare.py): scanned train.bin and val.bin, and {said}",
          flush=True)
    return stats


def load_meta(data_dir: Path) -> dict | None:
    """The dataset's meta.pkl (vocab_size, and stoi/itos for char-level data); None if there is none."""
    path = data_dir / "meta.pkl"
    if not path.exists():
        return None
    try:
        with open(path, "rb") as f:
            meta = pickle.load(f)
    except Exception as e:  # unpickling can raise almost anything on a damaged file
        raise ConfigError(f"cannot read {path} ({type(e).__name__}: {e}); "
                          f"re-run data/{data_dir.name}/prepare.py") from None
    vocab = meta.get("vocab_size") if isinstance(meta, dict) else None
    if type(vocab) is not int or vocab < 1:
        raise ConfigError(f"{path} has no positive integer vocab_size (got {vocab!r}); "
                          f"re-run data/{data_dir.name}/prepare.py")
    return meta


def choose_vocab(meta: dict | None, configured: int, default: int) -> tuple[int, str | None]:
    """The model's vocab_size, and a line saying where it came from when the data did not give it.

    As nanoGPT: meta.pkl's vocab wins over the default; an explicit vocab_size wins over both.
    Without meta.pkl the default is GPT-2's vocab, right for GPT-2-token data (openwebtext,
    shakespeare) and far too large for a small vocab: hence the line.
    """
    if configured != default:
        return configured, None
    if meta is not None:
        return meta["vocab_size"], None
    return default, (f"no meta.pkl with the data: assuming GPT-2 tokens, vocab_size {default} "
                     f"(50257 rounded up to a multiple of 64); pass --vocab_size to change it")


def check_tokens_fit(data_dir: Path, vocab_size: int):
    """Refuse data whose largest token id has no row in the embedding (it would fail mid-forward).

    The largest id comes from tokens.json. Without one (data prepared by an older prepare.py),
    rank 0 scans the files once and writes it. The other ranks skip the check rather than
    scan or wait: N ranks reading the same ~17 GB is the cost tokens.json removes, and a wait
    would hang where rank 0 cannot write the file (a read-only data_dir) or writes it on
    another node's disk. Rank 0's refusal still ends the job, and once its tokens.json is in
    place (a shared or rewritten data_dir) every rank checks at every start.
    """
    stats = read_token_stats(data_dir)
    if stats is None:
        if launch_env.process_rank(os.environ) != 0:
            return
        stats = record_token_stats(data_dir)
    for split in SPLITS:
        f = data_dir / f"{split}.bin"
        top = stats[split]["max_token"]
        if top >= vocab_size:
            raise ConfigError(f"{f} holds token id {top}, but vocab_size is {vocab_size}; the data and its "
                              f"meta.pkl (or --vocab_size) disagree: re-run data/{data_dir.name}/prepare.py")


class Batches:
    def __init__(self, data_dir: Path, block_size: int, batch_size: int, device: str, seed: int):
        self.data_dir, self.block_size, self.batch_size = Path(data_dir), block_size, batch_size
        self.device, self.seed = device, seed
        self.pin = str(device).startswith("cuda")

    def _tokens(self, split: str) -> np.memmap:
        # A fresh memmap per batch avoids a memory leak (see nanoGPT's train.py).
        return np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")

    def get(self, split: str, it: int, micro: int, stream: int = 0):
        """Micro-batch `micro` of step `it`; stream 1 is for evaluation, 0 for training."""
        data = self._tokens(split)
        rng = np.random.default_rng([self.seed, SPLITS[split], stream, it, micro])
        ix = rng.integers(0, len(data) - self.block_size - 1, size=self.batch_size)
        x = torch.from_numpy(np.stack([data[i:i + self.block_size].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + self.block_size].astype(np.int64) for i in ix]))
        if self.pin:
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


def shard(num_micro: int, rank: int, world: int) -> list[int]:
    """The global micro-batch ids rank `rank` processes, in order."""
    return list(range(rank, num_micro, world))


def fit_accumulation(num_micro: int, world: int, batch_size: int) -> tuple[int, str | None]:
    """Global micro-batches per step for `world` ranks, and a line saying what changed (None if nothing).

    As in nanoGPT's DDP, gradient_accumulation_steps counts the micro-batches of the
    *global* step, split over the ranks, so the global batch is the same whatever the
    world size. Every rank needs the same number of micro-batches, at least one, so a
    count that is not a multiple of the world size is rounded up to the next multiple:
    the global batch grows (it never silently shrinks), and the line says by how much.
    """
    fitted = -(-num_micro // world) * world
    if fitted == num_micro:
        return num_micro, None
    return fitted, (f"global batch {batch_size}x{num_micro} -> {batch_size}x{fitted} for {world} ranks "
                    f"(gradient_accumulation_steps {num_micro} -> {fitted}: a multiple of the number of ranks)")
