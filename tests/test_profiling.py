"""--profile=True: the step's breakdown by part, from the model's and the loop's named ranges."""
import json

import pytest

from conftest import tiny_args
from dist_utils import ds_json, run_ranks

from nanomoe_ds import profiling
from nanomoe_ds.config import from_argv
from nanomoe_ds.trainer import train


def test_report_arithmetic():
    """Per-step rows from totals over 2 steps: experts exclude the all-to-all nested in them."""
    ranges = {"attention": 4.0, "moe.router+permute": 2.0, "moe.experts": 10.0, "moe.all_to_all": 6.0,
              "moe.unpermute": 2.0, "forward": 24.0, "backward": 30.0, "optimizer": 6.0}
    rows = {r["part"]: r["ms"] for r in profiling.report(ranges, wall_ms=70.0, steps=2)}
    assert rows == {"attention": 2.0, "moe.router+permute": 1.0, "moe.experts": 2.0, "moe.all_to_all": 3.0,
                    "moe.unpermute": 1.0, "forward, other": 3.0, "backward": 15.0, "optimizer": 3.0,
                    "other (data, all-reduce, logging)": 5.0}
    assert sum(rows.values()) == pytest.approx(35.0)  # the whole step


def check_profile(out_dir, parts):
    prof = json.load(open(out_dir / "profile.json"))
    got = {r["part"]: r for r in prof["parts"]}
    assert set(parts) <= set(got), got
    for part in parts:
        assert got[part]["ms"] > 0, part
    # The "other" rows are what the named ranges leave of the step; a range counted twice
    # (nesting) would drive them negative, so the shares' sum of 1 alone proves nothing.
    assert all(r["ms"] >= 0 for r in prof["parts"]), prof["parts"]
    assert sum(r["share"] for r in prof["parts"]) == pytest.approx(1.0)
    assert prof["steps"] == profiling.STEPS and prof["step_ms"] > 0


def test_profile_one_device(char_data, tmp_path, capsys):
    model_cfg, train_cfg = from_argv(tiny_args(char_data, tmp_path, max_iters=9, eval_interval=100, profile=True))
    train(model_cfg, train_cfg)
    check_profile(tmp_path, ["attention", "moe.router+permute", "moe.experts", "moe.unpermute", "backward",
                             "optimizer"])
    assert "profile of 3 steps" in capsys.readouterr().out


def test_profile_two_ranks_shows_the_all_to_all(char_data, tmp_path):
    res = run_ranks(2, ["--deepspeed_config", ds_json(tmp_path, "zero2"),
                        *tiny_args(char_data, tmp_path / "o", max_iters=9, eval_interval=100, profile=True),
                        "--ep_size=2"])
    assert [r.returncode for r in res] == [0, 0], res[0].stderr[-2000:]
    check_profile(tmp_path / "o", ["moe.all_to_all", "moe.experts", "backward", "optimizer"])
    assert "profile of 3 steps" in res[0].stdout and "profile of" not in res[1].stdout
