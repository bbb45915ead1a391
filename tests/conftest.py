"""Shared fixtures: the prepared shakespeare_char data and a tiny-run config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    """Tiny Shakespeare: launch/test.sh exports SHAKESPEARE_INPUT; a bare `pytest` looks where that script would."""
    for candidate in (os.environ.get("SHAKESPEARE_INPUT"), REPO.parent / "shared/data/tinyshakespeare/input.txt",
                      REPO / "data/shakespeare_char/input.txt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.fail("no Tiny Shakespeare for the tests: run `bash launch/test.sh` (it downloads it once) "
                "or set SHAKESPEARE_INPUT=path/to/input.txt")


@pytest.fixture(scope="session")
def char_data(shakespeare, tmp_path_factory) -> Path:
    """shakespeare_char prepared once per session into a temp dir (never into the repo)."""
    out = tmp_path_factory.mktemp("shakespeare_char")
    subprocess.run([sys.executable, str(REPO / "data/shakespeare_char/prepare.py"), "--input", str(shakespeare),
                    "--out_dir", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="session")
def forkserver():
    """Processes forked from one that imported torch and DeepSpeed once (tests/forkserver.py): a
    launch/train.py run or refusal without 2-3 s of imports each."""
    from forkserver import ForkServer
    with ForkServer() as server:
        yield server


def tiny_args(data_dir: Path, out_dir: Path, **over) -> list[str]:
    """Command-line args for a seconds-long CPU run of a tiny MoE GPT."""
    args = dict(dataset="shakespeare_char", data_dir=str(data_dir), out_dir=str(out_dir), device="cpu",
                compile=False, n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
                gradient_accumulation_steps=2, max_iters=6, lr_decay_iters=6, warmup_iters=2, eval_interval=3,
                eval_iters=2, log_interval=1, dropout=0.0, use_moe=True, num_experts=4, num_experts_per_tok=2,
                learning_rate=1e-3, min_lr=1e-4, always_save_checkpoint=True)
    args.update(over)
    return [f"--{k}={v}" for k, v in args.items()]


def read_checkpoint(out_dir: Path) -> dict:
    """The newest checkpoint in out_dir: its metadata, and `model` as whole fp32 tensors by name."""
    from nanomoe_ds import checkpoint_dir
    ck = checkpoint_dir.open_checkpoint(str(out_dir))
    model = {key.split("/", 1)[1]: ck.whole(key) for key in ck.meta["tensors"] if key.startswith("model/")}
    return {**ck.meta, "model": model}


def wandb_history(out_dir: Path) -> tuple[list[dict], bool]:
    """(history rows, whether the run was finished) from the offline run file under out_dir/wandb.

    The .wandb file is a LevelDB-style log of protobuf records: a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type).
    """
    import struct
    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = Path(out_dir).glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    rows, finished, pos, chunk = [], False, 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a FULL record, or the LAST chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
            finished |= record.WhichOneof("record_type") == "exit"
    return rows, finished


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag in the event files under log_dir: [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
