"""Summarise runs started from a dense model: val loss against iterations and wall time, expert spread, load.

    python bench/upcycle_report.py OUT_DIR [OUT_DIR ...] [--ckpts DIR]

For each out_dir: the median step time, and every eval's val loss with the iteration and
the summed step time (evals included) so far, and the mean load statistics of the MoE layers over the first and last 100 logged
steps. With --ckpts, a folder of checkpoints kept during an MoE run, it prints each one's
expert spread per MoE layer (upcycle.expert_spread of w_in and w_out; 0 = identical copies).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_ds.metrics import read_run  # noqa: E402
from nanomoe_ds.upcycle import expert_spread  # noqa: E402


def report_run(out_dir: Path):
    logged, evals = read_run(str(out_dir))  # every log_interval-th step, every eval
    step_ms = sorted(r["time_ms"] for r in logged)
    print(f"== {out_dir}: {logged[-1]['iter'] + 1} steps, {logged[-1]['train_s']:.1f} s of steps, "
          f"median logged step {step_ms[len(step_ms) // 2]:.1f} ms")
    for r in evals:  # train_s: step time before this eval (evaluations excluded)
        print(f"iter {r['iter']:5d}  val {r['val_loss']:.4f}  train {r['train_loss']:.4f}  steps {r['train_s']:7.1f}s")
    steps = [r for r in logged if r.get("moe")]
    for name, window in (("first 100", steps[:100]), ("last 100", steps[-100:])):
        if window:
            mean = {k: sum(layer[k] for r in window for layer in r["moe"]) / (len(window) * len(window[0]["moe"]))
                    for k in ("load_cv", "load_max_over_mean", "dead_experts", "aux_loss")}
            print(f"load, {name} steps, mean over layers: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))


def report_ckpts(folder: Path):
    for path in sorted(folder.glob("*.pt")):
        ck = torch.load(path, map_location="cpu", weights_only=False)
        sd = ck["model"]
        spreads = [f"{expert_spread(sd[k]):.3f}/{expert_spread(sd[k[:-4] + 'w_out']):.3f}"
                   for k in sorted(sd) if k.endswith("experts.w_in")]
        print(f"iter {ck['iter_num']:5d}  expert spread w_in/w_out per MoE layer: {'  '.join(spreads)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dirs", nargs="+", type=Path)
    p.add_argument("--ckpts", type=Path)
    a = p.parse_args()
    for d in a.out_dirs:
        report_run(d)
    if a.ckpts:
        report_ckpts(a.ckpts)
