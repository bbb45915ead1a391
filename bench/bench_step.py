"""Time whole training steps of MoE GPTs against the dense one, side by side in one run.

Each variant is a model plus the trainer's own single-device engine (local_engine.LocalEngine:
autocast, AdamW, clipping), built from the same preset and overrides the trainer would
parse, so a step here is a step of `launch/train.py`. Variants are interleaved (one step
of each per round, rotating the order) and the median of the timed rounds is reported,
with its ratio to the first variant.

Default: the nanoGPT-MoE seed's CPU line (4 layers, n_embd 128, block 64, batch 12), as
  dense          the baby GPT;
  moe-10x2       the seed's MoE: 10 experts, top-2, experts as wide as the dense MLP;
  moe-8x2-h256   8 experts, top-2, expert_hidden 256: the same active FLOPs as dense;
and, with --optimizers, each of them again with the foreach (unfused) AdamW.

    python bench/bench_step.py                      # the seed's CPU line, fp32
    python bench/bench_step.py --dtype=bfloat16 --steps 60
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository

import torch

from bench import machine_name
from nanomoe_ds.config import from_argv
from nanomoe_ds.model import GPT
from nanomoe_ds.local_engine import LocalEngine
from nanomoe_ds.trainer import train_step

SEED_LINE = ["launch/config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--block_size=64",
             "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0", "--vocab_size=65"]
VARIANTS = {
    "dense": [],
    "moe-10x2": ["--use_moe=True", "--num_experts=10", "--num_experts_per_tok=2"],
    "moe-8x2-h256": ["--use_moe=True", "--num_experts=8", "--num_experts_per_tok=2", "--expert_hidden=256"],
    # Switch-style top-1, experts as wide as the dense MLP: also the dense FLOPs, half the routed rows
    "moe-8x1": ["--use_moe=True", "--num_experts=8", "--num_experts_per_tok=1"],
    "moe-8x1-every2": ["--use_moe=True", "--num_experts=8", "--num_experts_per_tok=1", "--moe_every=2"],
    "moe-8x2-h256-every2": ["--use_moe=True", "--num_experts=8", "--num_experts_per_tok=2", "--expert_hidden=256",
                            "--moe_every=2"],
    # cheaper steps tried for the equal-time race (docs/benchmarks.md): fewer experts, or top-1 plus a shared expert
    "moe-4x1-every2": ["--use_moe=True", "--num_experts=4", "--num_experts_per_tok=1", "--moe_every=2"],
    "moe-8x1-h256-shared1-every2": ["--use_moe=True", "--num_experts=8", "--num_experts_per_tok=1",
                                    "--expert_hidden=256", "--num_shared_experts=1", "--moe_every=2"],
}
for _name in list(VARIANTS)[1:3]:  # the MoEs again with each CPU kernel forced (--variants moe-10x2-bmm, ...)
    for _impl in ("loop", "bmm", "grouped_mm"):
        VARIANTS[f"{_name}-{_impl}"] = VARIANTS[_name] + [f"--moe_impl={_impl}"]
for _name in list(VARIANTS)[:3]:  # and each model under torch.compile (--variants dense-compiled, ...)
    VARIANTS[f"{_name}-compiled"] = VARIANTS[_name] + ["--compile=True"]


def build(argv: list[str], fused: bool) -> LocalEngine:
    model_cfg, train_cfg = from_argv(argv)
    torch.manual_seed(train_cfg.seed)
    engine = LocalEngine(GPT(model_cfg), train_cfg, train_cfg.device, getattr(torch, train_cfg.dtype))
    if not fused:  # the same parameter groups and hyper-parameters, default (foreach) implementation
        engine.optimizer = torch.optim.AdamW(engine.module.optimizer_groups(train_cfg.weight_decay),
                                             lr=train_cfg.learning_rate, betas=(train_cfg.beta1, train_cfg.beta2),
                                             foreach=True)
    return engine


class FixedBatches:
    """data.Batches' interface over one fixed batch: the steps time the model, not the data reads."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def get(self, split: str, it: int, micro: int, stream: int = 0):
        return self.x, self.x


def one_step(engine, batches: FixedBatches, lr: float) -> None:
    """The trainer's own step (trainer.train_step): forward, backward, optimizer, the losses' host copy."""
    train_step(engine, batches, 0, lr, lambda: False, None)


def build_all(variants: list[str], dtype: str = "float32", optimizers: bool = False,
              overrides: list[str] = ()) -> dict[str, LocalEngine]:
    """An engine per variant (and its foreach-AdamW twin with `optimizers`), on the seed's line."""
    base = SEED_LINE + [f"--dtype={dtype}"] + list(overrides)
    engines = {}
    for name in variants:
        engines[name] = build(base + VARIANTS[name], fused=True)
        if optimizers:
            engines[f"{name} (foreach AdamW)"] = build(base + VARIANTS[name], fused=False)
    return engines


def time_steps(engines: dict, steps: int = 40, warmup: int = 5, x: torch.Tensor | None = None) -> dict[str, float]:
    """Median step time in ms of each engine, one step of each per round, rotating the order.

    `x`: the micro-batch of token ids (default: the seed's 12 x block_size, seeded)."""
    if x is None:
        cfg = next(iter(engines.values())).module.config
        x = torch.randint(0, cfg.vocab_size, (12, cfg.block_size), generator=torch.Generator().manual_seed(0))
    batches = FixedBatches(x)
    times = {name: [] for name in engines}
    order = list(engines)
    for r in range(warmup + steps):
        for name in order[r % len(order):] + order[:r % len(order)]:
            t0 = time.perf_counter()
            one_step(engines[name], batches, lr=1e-3)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed rounds, after --warmup rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--variants", default=",".join(list(VARIANTS)[:3]), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--optimizers", action="store_true", help="also time each variant with the foreach AdamW")
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    engines = build_all(args.variants.split(","), args.dtype, args.optimizers, overrides)
    step_ms = time_steps(engines, args.steps, args.warmup)

    print(f"# {datetime.date.today()}  torch {torch.__version__}  {machine_name('cpu')}  threads "
          f"{torch.get_num_threads()}  {args.dtype}  median of {args.steps} interleaved steps")
    print(f"# {' '.join(['python bench/bench_step.py'] + sys.argv[1:])}")
    print("| variant | params total / active | step ms | x first |")
    print("|---|---|---:|---:|")
    ref = next(iter(step_ms.values()))
    for name, med in step_ms.items():
        model = engines[name].module
        print(f"| {name} | {model.get_num_params() / 1e6:.2f}M / {model.get_num_params(active=True) / 1e6:.2f}M "
              f"| {med:.1f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
