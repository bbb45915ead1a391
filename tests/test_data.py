"""Batch arithmetic (the global batch whatever the world size), and the checks of the prepared data."""
import json
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, tiny_args
from dist_utils import free_port, loopback_env
from nanomoe_ds.config import ConfigError
from nanomoe_ds.data import check_data, check_tokens_fit, fit_accumulation, shard


@pytest.mark.parametrize("num_micro, world", [(40, 1), (40, 8), (8, 4), (1, 1), (6, 3)])
def test_global_batch_kept_where_it_divides(num_micro, world):
    assert fit_accumulation(num_micro, world, 12) == (num_micro, None)


@pytest.mark.parametrize("num_micro, world, fitted", [(1, 2, 2), (1, 8, 8), (5, 4, 8), (40, 16, 48), (3, 2, 4)])
def test_global_batch_rounded_up_and_said(num_micro, world, fitted):
    got, line = fit_accumulation(num_micro, world, 12)
    assert got == fitted and got % world == 0 and got >= num_micro
    assert line.startswith(f"global batch 12x{num_micro} -> 12x{fitted} for {world} ranks")


def test_shards_cover_the_global_batch_once():
    for world in (1, 2, 3, 4):
        parts = [shard(12, r, world) for r in range(world)]
        assert sorted(m for p in parts for m in p) == list(range(12))
        assert len({len(p) for p in parts}) == 1


def test_vocab_comes_from_meta_else_gpt2_with_a_line():
    from nanomoe_ds.data import choose_vocab
    assert choose_vocab({"vocab_size": 65}, 50304, 50304) == (65, None)  # nanoGPT: the data's vocab
    assert choose_vocab({"vocab_size": 65}, 128, 50304) == (128, None)  # an explicit --vocab_size wins
    vocab, line = choose_vocab(None, 50304, 50304)
    assert vocab == 50304 and line.startswith("no meta.pkl with the data: assuming GPT-2 tokens, vocab_size 50304")


def test_tokens_beyond_the_vocab_are_refused(tmp_path):
    for split in ("train", "val"):
        np.array([0, 3, 9, 2], dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    check_tokens_fit(tmp_path, 10)
    with pytest.raises(ConfigError, match=r"train.bin holds token id 9, but vocab_size is 9"):
        check_tokens_fit(tmp_path, 9)


# ---------------------------------------------------------------- tokens.json: checks from a few bytes
IDS = np.arange(100, dtype=np.uint16) % 10  # largest id 9


def write_split_files(data_dir, ids=IDS, stats=True):
    """train.bin and val.bin holding `ids`, and a tokens.json describing them (or `stats`, or none)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        ids.tofile(data_dir / f"{split}.bin")
    if stats is True:
        stats = {s: {"tokens": len(ids), "max_token": int(ids.max()), "dtype": "uint16"} for s in ("train", "val")}
    if stats:
        (data_dir / "tokens.json").write_text(json.dumps(stats))
    return data_dir


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


@pytest.fixture
def rank0(monkeypatch):
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_scan(monkeypatch):
    """Fail the test if anything maps a token file: the checks must not read the data."""
    def scan(*args, **kwargs):
        raise AssertionError("a .bin file was read")
    monkeypatch.setattr(np, "memmap", scan)


def test_prepared_data_passes_from_its_token_stats(char_data, no_scan):
    stats = json.loads((char_data / "tokens.json").read_text())
    assert stats["train"] == {"tokens": 1_003_854, "max_token": 64, "dtype": "uint16"}
    check_data(char_data, 256)
    check_tokens_fit(char_data, 65)


def test_token_stats_are_trusted_without_reading_the_bin(tmp_path, rank0, no_scan):
    """tokens.json says the largest id is 9: ids of 1000 in the file itself go unread (and unrefused)."""
    write_split_files(tmp_path, stats={s: {"tokens": 100, "max_token": 9, "dtype": "uint16"} for s in ("train", "val")})
    np.full(100, 1000, dtype=np.uint16).tofile(tmp_path / "train.bin")  # the same size, other content
    check_data(tmp_path, 32)
    check_tokens_fit(tmp_path, 10)


def test_a_recorded_largest_id_beyond_the_vocab_is_refused_in_one_line(tmp_path, rank0, no_scan):
    write_split_files(tmp_path)
    with pytest.raises(ConfigError) as e:
        check_tokens_fit(tmp_path, 9)
    assert one_line(e).startswith(f"{tmp_path}/train.bin holds token id 9, but vocab_size is 9; ")


def test_a_truncated_bin_is_refused_in_one_line(tmp_path, no_scan):
    write_split_files(tmp_path)
    IDS[:98].tofile(tmp_path / "val.bin")  # two tokens short: an even size, long enough, so only tokens.json tells
    with pytest.raises(ConfigError) as e:
        check_data(tmp_path, 32)
    assert one_line(e) == (f"{tmp_path}/val.bin holds 98 tokens, but tokens.json records 100: it was truncated or "
                           f"replaced since; re-run data/{tmp_path.name}/prepare.py")


@pytest.mark.parametrize("content", ["{not json", '{"train": {"tokens": 100}}', '[1, 2]'])
def test_a_damaged_tokens_json_is_refused_in_one_line(tmp_path, content):
    write_split_files(tmp_path, stats=False)
    (tmp_path / "tokens.json").write_text(content)
    with pytest.raises(ConfigError) as e:
        check_data(tmp_path, 32)
    assert "tokens.json" in one_line(e) and "delete it (the next start rebuilds it" in one_line(e)


def test_old_data_is_scanned_once_by_rank_0_which_writes_the_stats(tmp_path, rank0, capsys, monkeypatch):
    write_split_files(tmp_path, stats=False)
    check_data(tmp_path, 32)
    check_tokens_fit(tmp_path, 10)
    said = capsys.readouterr().out.splitlines()
    assert said == [f"no {tmp_path}/tokens.json (data from an older prepare.py): scanned train.bin and val.bin, "
                    "and wrote it, so later starts read it instead"]
    assert json.loads((tmp_path / "tokens.json").read_text())["val"] == {"tokens": 100, "max_token": 9,
                                                                         "dtype": "uint16"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokens.json", "train.bin", "val.bin"]  # no .tmp left
    monkeypatch.setattr(np, "memmap", lambda *a, **k: pytest.fail("scanned a second time"))
    check_tokens_fit(tmp_path, 10)
    with pytest.raises(ConfigError, match="holds token id 9, but vocab_size is 9"):
        check_tokens_fit(tmp_path, 9)
    assert capsys.readouterr().out == ""


def test_old_data_other_ranks_neither_scan_nor_write(tmp_path, monkeypatch, no_scan):
    """N ranks reading the whole dataset is the cost tokens.json removes: rank 0 alone scans."""
    monkeypatch.setenv("RANK", "1")
    write_split_files(tmp_path, stats=False)
    check_data(tmp_path, 32)
    check_tokens_fit(tmp_path, 10)
    assert not (tmp_path / "tokens.json").exists()


def test_old_data_in_a_read_only_dir_is_still_checked(tmp_path, rank0, capsys, monkeypatch):
    write_split_files(tmp_path, stats=False)

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")  # EROFS: what a read-only mount answers (root ignores chmod)
    monkeypatch.setattr("pathlib.Path.write_text", read_only)
    check_tokens_fit(tmp_path, 10)
    assert capsys.readouterr().out.strip().endswith(
        "could not write it (Read-only file system), so every start scans until it can")
    with pytest.raises(ConfigError, match="holds token id 9, but vocab_size is 9"):
        check_tokens_fit(tmp_path, 9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train.bin", "val.bin"]


# ---------------------------------------------------------------- a node-local data error, said by its rank
def test_a_data_error_on_rank_1_only_is_said_by_rank_1_at_once(char_data, tmp_path):
    """Two ranks with the same command line; `--data_dir=shakespeare_char` resolves on each rank's own "node" (its
    working directory), and rank 1's has no data there. Rank 1 says so in one line and exits 2 in seconds,
    while rank 0 still waits for it (so not behind rank 0's dist_timeout); rank 0 then fails on that timeout."""
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    (nodes[0] / "shakespeare_char").symlink_to(char_data)
    argv = [sys.executable, str(REPO / "launch/train.py"), "--deepspeed_config", str(REPO / "ds_configs/zero2.json"),
            *tiny_args("shakespeare_char", tmp_path / "out", max_iters=2), "--dist_timeout=10"]
    port = free_port()
    start = time.monotonic()
    procs = [subprocess.Popen(argv, cwd=node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=loopback_env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=2, MASTER_PORT=port))
             for r, node in enumerate(nodes)]
    try:
        _, err1 = procs[1].communicate(timeout=120)
        rank1_s = time.monotonic() - start
        rank0_waiting = procs[0].poll() is None
        _, err0 = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    errors = [line for line in err1.splitlines() if line.startswith("error:")]
    assert procs[1].returncode == 2 and errors == [
        "error: rank 1: missing shakespeare_char/train.bin; run data/shakespeare_char/prepare.py first"], err1[-3000:]
    assert "Traceback" not in err1
    assert rank1_s < 30, f"rank 1 took {rank1_s:.0f} s to report (start-up included)"
    assert procs[0].returncode != 0, err0[-3000:]
    assert rank0_waiting or "lost the rank" in err0, "rank 1 reported only after rank 0's dist_timeout"
    # rank 0 then ends on its own one line: at once if it was in a collective with rank 1 (a lost peer),
    # or after dist_timeout if it was still waiting for rank 1 to join
    assert re.search(r"^error: rank 0: (lost the rank at .* during \w+|a collective \(\w+\) waited longer than "
                     r"dist_timeout=10s)", err0, re.M), (rank0_waiting, err0[-3000:])
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
