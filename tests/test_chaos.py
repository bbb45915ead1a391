"""Chaos (tests/chaos.py): seeded faults against `--init_from=auto` restarts, a small subset.

Each test runs the supervisor as a script: an uninterrupted reference run, then faults (kill -9,
SIGTERM, SIGUSR1, a disk that fills, a second writer, an eval_only reader, a flipped bit) into
restarts of the same command, a last run without faults, and the checks against the reference
(final weights and Adam moments, every iteration's loss, no staging directory or process left).
`python tests/chaos.py --count 30` is the long version; a failure prints its repro line.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from chaos import can_unshare
from conftest import REPO

ALL = "kill,term,usr1,diskfull,writer,reader,bitflip"


def run_chaos(char_data, tmp_path, *args: str, budget: int) -> str:
    """Run the supervisor with a time budget (it kills what it started and reports when that runs out)."""
    cmd = [sys.executable, str(REPO / "tests/chaos.py"), "--data", str(char_data), "--out", str(tmp_path / "chaos"),
           "--timeout", str(budget), *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=budget + 60)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert "chaos: passed" in r.stdout
    return r.stdout


@pytest.mark.timeout(150)
@pytest.mark.parametrize("seed", [1, 2])
def test_chaos_one_device(char_data, tmp_path, seed):
    """Two faults of any kind into restarts of one CPU process; the result equals the reference bit for bit."""
    out = run_chaos(char_data, tmp_path, "--topology", "one", "--seed", str(seed), "--count", "2", "--faults", ALL,
                    budget=90)
    assert "faults injected" in out


@pytest.mark.timeout(200)
def test_chaos_deepspeed(char_data, tmp_path):
    """Two faults into restarts of the deepspeed launcher with 2 ranks (ZeRO-2, ep_size 2, fp32); 1e-6 of the
    reference."""
    run_chaos(char_data, tmp_path, "--topology", "ds", "--seed", "1", "--count", "2", "--faults", ALL, budget=140)


@pytest.mark.timeout(120)
def test_chaos_a_flipped_bit_falls_back(char_data, tmp_path):
    """A bit flipped in the newest checkpoint between runs: the next start moves it aside and resumes from the
    previous one (reported as "fallback missing" where a restart refuses instead)."""
    out = run_chaos(char_data, tmp_path, "--topology", "one", "--seed", "5", "--count", "1", "--faults", "bitflip",
                    budget=80)
    assert "bitflip 1" in out


@pytest.mark.timeout(120)
def test_chaos_a_disk_that_fills(char_data, tmp_path):
    """out_dir on a small tmpfs that a ballast file fills for a moment."""
    ok, why = can_unshare()
    if not ok:
        pytest.skip(f"unshare --mount is not permitted here ({why}): no tmpfs to fill")
    out = run_chaos(char_data, tmp_path, "--topology", "one", "--seed", "3", "--count", "1", "--faults", "diskfull",
                    budget=80)
    assert "diskfull 1" in out
