"""Dense vs the FLOP-matched MoE at equal wall-clock, on the nanoGPT-MoE seed's CPU line.

1. Calibrate: time training steps of both models side by side (bench_step's interleaved
   method), on this machine, now.
2. Train the dense model for --max_iters (the seed's 2000) and the MoE for as many
   iterations as fit in the same time: max_iters x dense step / MoE step, rounded to the
   eval interval. Each gets its own full learning-rate schedule (lr_decay_iters = its
   max_iters), as a user with that time budget would set it. Both run launch/train.py.
3. Print val loss against training time (`train_s` in metrics.jsonl: step time only,
   evaluations excluded) for both runs, and the final comparison; with matplotlib, also
   plot both curves into <out_dir>/race.png.

    python data/shakespeare_char/prepare.py                # once
    python bench/race.py                                  # about 6 minutes on 2 cores
    python bench/race.py --max_iters=500 --eval_interval=100   # a quick look
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository

from bench_step import SEED_LINE, VARIANTS, build_all, time_steps  # noqa: E402
from nanomoe_ds.metrics import read_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The seed's CPU command (the README's quick start, on a CPU); bench_step's SEED_LINE is its model part.
TRAIN_LINE = SEED_LINE + ["--log_interval=50"]  # logging routing statistics costs the MoE time


def fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def moe_iters(max_iters: int, dense_ms: float, moe_ms: float, eval_interval: int) -> int:
    """The MoE's iterations in the dense run's time, rounded to the nearest eval (so its last step is evaluated)."""
    return max(eval_interval, round(max_iters * dense_ms / moe_ms / eval_interval) * eval_interval)


def train(name: str, extra: list[str], iters: int, args) -> list[tuple[int, float, float]]:
    """Train one model through launch/train.py; its val curve."""
    out_dir = os.path.join(args.out_dir, name)
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py")] + TRAIN_LINE + extra + [
        f"--max_iters={iters}", f"--lr_decay_iters={iters}", f"--eval_interval={args.eval_interval}",
        f"--eval_iters={args.eval_iters}", f"--out_dir={out_dir}", "--always_save_checkpoint=False"]
    print(f"# {name}: {iters} iterations -> {out_dir}", flush=True)
    if subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL).returncode:
        fail(f"training {name} failed; rerun its command to see why: {' '.join(cmd)}")
    _, evals = read_run(out_dir)
    return val_curve(evals)


def val_curve(evals: list[dict]) -> list[tuple[int, float, float]]:
    """(iteration, training seconds before it, val loss) at every eval."""
    return [(r["iter"], r["train_s"], r["val_loss"]) for r in evals]


def plot(curves: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        ax.plot([c[1] for c in curve], [c[2] for c in curve], "o-", ms=3, label=name)
    ax.set_xlabel("training time (s, evaluations excluded)")
    ax.set_ylabel("val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max_iters", type=int, default=2000, help="the dense run's iterations (the seed's 2000)")
    ap.add_argument("--moe", default="moe-8x2-h256", choices=[v for v in VARIANTS if v != "dense"])
    ap.add_argument("--eval_interval", type=int, default=100)
    ap.add_argument("--eval_iters", type=int, default=50, help="batches per val estimate (the seed's line uses 20)")
    ap.add_argument("--calibration_steps", type=int, default=30)
    ap.add_argument("--out_dir", default="out-race")
    args = ap.parse_args()
    for split in ("train", "val"):
        if not os.path.exists(os.path.join(REPO, "data", "shakespeare_char", f"{split}.bin")):
            fail(f"missing data/shakespeare_char/{split}.bin; run python data/shakespeare_char/prepare.py first")
    for name in ("dense", args.moe):  # the trainer appends to metrics.jsonl: the curves would mix runs
        if os.path.exists(os.path.join(args.out_dir, name, "metrics.jsonl")):
            fail(f"{os.path.join(args.out_dir, name)} already holds a run; remove it or pass another --out_dir")
    if args.max_iters % args.eval_interval:
        fail(f"--max_iters ({args.max_iters}) must be a multiple of --eval_interval ({args.eval_interval})")

    step_ms = time_steps(build_all(["dense", args.moe]), steps=args.calibration_steps)
    iters = {"dense": args.max_iters,
             args.moe: moe_iters(args.max_iters, step_ms["dense"], step_ms[args.moe], args.eval_interval)}
    print(f"# calibration: step dense {step_ms['dense']:.1f} ms, {args.moe} {step_ms[args.moe]:.1f} ms "
          f"({step_ms[args.moe] / step_ms['dense']:.2f}x)", flush=True)
    curves = {name: train(name, VARIANTS[name], iters[name], args) for name in iters}

    print("| run | iterations | training time s | val loss at the end | best val loss |")
    print("|---|---:|---:|---:|---:|")
    for name, curve in curves.items():
        it, seconds, val = curve[-1]
        print(f"| {name} | {it} | {seconds:.1f} | {val:.4f} | {min(c[2] for c in curve):.4f} |")
    print("\n| run | iteration | training time s | val loss |\n|---|---:|---:|---:|")
    for name, curve in curves.items():
        for it, seconds, val in curve:
            print(f"| {name} | {it} | {seconds:.1f} | {val:.4f} |")
    (_, dense_s, dense_val), (_, moe_s, moe_val) = curves["dense"][-1], curves[args.moe][-1]
    verdict = "lower" if moe_val < dense_val else "not lower"
    print(f"\n# {args.moe} in {moe_s:.0f} s: val {moe_val:.4f}; dense in {dense_s:.0f} s: val {dense_val:.4f} "
          f"-> the MoE's val loss is {verdict} (difference {moe_val - dense_val:+.4f})")
    png = os.path.join(args.out_dir, "race.png")
    if plot(curves, png):
        print(f"# curves: {png}")


if __name__ == "__main__":
    main()
