"""bench/: the benchmark scripts run and report what ran (their timings are not asserted here)."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO
from dist_utils import loopback_env


def run_script(*argv) -> str:
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=loopback_env(OMP_NUM_THREADS=2))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def table_rows(out: str, name: str) -> list[list[str]]:
    """The cells of each table row that starts with `name`, in order."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(f"| {name} |")]


def test_bench_engine_reports_the_stage_that_ran():
    out = run_script("bench/bench_engine.py", "--steps=1", "--warmup=0", "--models=moe-10x2",
                     "--variants=plain,zero2,zero2-kept,plain-ac", "--n_layer=2")
    (_, plain, zero2, kept, ac), *throughput = table_rows(out, "moe-10x2")
    assert re.fullmatch(r"[\d.]+ ms \([\d.]+ MiB\)", plain), plain
    assert ", ZeRO 0," in zero2 and ", ZeRO 2," in kept  # one rank: the shipped JSON runs as ZeRO-0 unless kept
    saved = [float(re.search(r"([\d.]+) MiB", cell).group(1)) for cell in (plain, ac)]
    assert saved[1] < saved[0] / 2  # activation checkpointing keeps less for backward
    assert [row[1] for row in throughput] == ["plain", "zero2", "zero2-kept", "plain-ac"]
    assert all(float(row[2]) > 0 and row[3] == "n/a" for row in throughput)  # tokens/s; no CPU peak for MFU
    guard = re.search(r"replica check, moe-10x2: ([\d.]+) ms to fingerprint every weight = ([\d.]+) of a plain step", out)
    assert guard and float(guard.group(1)) > 0, out


def test_bench_step_times_every_variant():
    out = run_script("bench/bench_step.py", "--steps=1", "--warmup=0", "--n_layer=2")
    for name in ("dense", "moe-10x2", "moe-8x2-h256"):
        assert float(table_rows(out, name)[0][2]) > 0


def test_bench_layer_times_each_kernel_and_the_parts_of_a_layer():
    out = run_script("bench/bench.py", "--shapes=4x2x64", "--tokens=64", "--n_embd=32", "--dtype=fp32",
                     "--variants=dense,ours", "--impls=grouped_mm,loop", "--repeats=1", "--parts")
    rows = table_rows(out, "4x2x64        ")
    assert [row[2] for row in rows] == ["dense", "ours (auto: bmm)", "ours grouped_mm", "ours loop"]
    assert all(float(row[3]) > 0 for row in rows)
    parts = re.search(r"ours, ms forward\+backward: layer ([\d.]+), router\+permute\+gather ([\d.]+), "
                      r"experts ([\d.]+), combine ([\d.]+), the rest (-?[\d.]+)", out)
    assert parts and all(float(v) > 0 for v in parts.groups()[:4]), out


def test_bench_export_measures_each_export():
    out = run_script("bench/bench_export.py", "--tiny", "--shard_mb=0.5")
    rows = {name: table_rows(out, name) for name in ("hf", "hf-sharded", "pt")}
    assert all(len(found) == 1 for found in rows.values()), out
    (hf,), (sharded,), (pt,) = rows.values()
    assert int(sharded[4]) > int(hf[4]) > int(pt[4]) == 1  # files: shards and their index; config, card, code
    assert hf[5] == sharded[5]  # the same bytes, in MiB, cut into more files
    assert all(float(row[1]) >= 0 and float(row[6]) > 0 for row in (hf, sharded, pt))
