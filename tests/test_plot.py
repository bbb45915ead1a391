"""launch/plot.py: three PNGs from runs' metrics.jsonl, several runs overlaid."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, tiny_args

from nanomoe_ds.config import from_argv
from nanomoe_ds.trainer import train


def test_plot_writes_three_pngs_for_overlaid_runs(char_data, tmp_path):
    pytest.importorskip("matplotlib")  # the [plot] extra; part of [dev]
    from PIL import Image
    for name, over in (("a", {}), ("b", {"bias_update_rate": 0.01, "aux_loss_coef": 0.0})):
        m, t = from_argv(tiny_args(char_data, tmp_path / name, max_iters=4, eval_interval=2, **over))
        train(m, t)
    r = subprocess.run([sys.executable, "launch/plot.py", f"--out_dir={tmp_path / 'a'},{tmp_path / 'b'}",
                        f"--plot_dir={tmp_path / 'plots'}"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for png in ("loss.png", "expert_load.png", "load_cv.png"):
        with Image.open(tmp_path / "plots" / png) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_plot_refuses_a_directory_without_metrics(tmp_path):
    r = subprocess.run([sys.executable, "launch/plot.py", f"--out_dir={tmp_path}"], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: no metrics.jsonl in {tmp_path}; train first or check --out_dir"
