"""Batches from nanoGPT's uint16 token files, identical whatever the number of ranks.

Micro-batch `m` of step `it` is drawn from a generator seeded by (seed, split,
it, m), so the global batch of a step does not depend on the world size, the
accumulation split or on resuming: rank r of W takes micro-batches r, r+W, ...
A 2-rank run and a 1-device run therefore see the same data step by step.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
SPLITS = {"train": 0, "val": 1}


def resolve_data_dir(dataset: str, data_dir: str = "") -> Path:
    return Path(data_dir) if data_dir else REPO_ROOT / "data" / dataset


def check_data(data_dir: Path, block_size: int):
    """Fail early, in one line, when the prepared data is missing or too short."""
    for split in SPLITS:
        f = data_dir / f"{split}.bin"
        if not f.exists():
            raise ConfigError(f"missing {f}; run data/{data_dir.name}/prepare.py first")
        n = f.stat().st_size // 2
        if n <= block_size + 1:
            raise ConfigError(f"{f} holds {n} tokens, fewer than block_size+2 ({block_size + 2})")


def load_meta(data_dir: Path) -> dict | None:
    path = data_dir / "meta.pkl"
    if not path.exists():
        return None
    with open(path, "rb") as f:
        return pickle.load(f)


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
