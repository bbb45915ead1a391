"""Differential fuzzing of the distributed path against one device, in the style of compiler fuzzers.

A seed draws one small random config (`draw`): world size 2-4, an `ep_size` that
divides it, a ZeRO stage, the MoE's shape, kernel, gate, capacity and extras, the
batch arithmetic and ZeRO's bucket size. `run` trains it for a few steps on gloo
ranks with DeepSpeed, as `launch/train.py` does for a user, and on one device
in process; every iteration's loss and gradient norm and every final weight must
agree to 1e-5 in fp32. A failure prints one command that reproduces it.

    python tests/equivalence_fuzz.py --data_dir DIR --configs 200       # the long run (docs/equivalence.md)
    python tests/equivalence_fuzz.py --data_dir DIR --seed 17          # one config again
    python tests/equivalence_fuzz.py --data_dir DIR --issue23          # the table of issue 23

DIR is a prepared shakespeare_char directory (data/shakespeare_char/prepare.py).
tests/test_equivalence_fuzz.py runs a fixed handful of seeds in CI.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import read_checkpoint, tiny_args  # noqa: E402
from dist_utils import ds_json, run_ranks, train_rows  # noqa: E402

TOLERANCE = 1e-5
ISOLATED = 2  # elements of one tensor that may differ by fp32 rounding through Adam (see compare)
GATES = ("softmax_topk", "sigmoid", "topk_softmax")
# "auto-flip" is auto, dropless, with micro-batches sized so experts get a few dozen rows each: there the
# CPU's rule (kernels.cpu_prefers_bmm) switches between loop and bmm as the busiest expert's load moves,
# so ranks run different kernels in the same micro-batch (what broke ZeRO-2 in issue 23).
KERNELS = ("auto-flip", "auto-flip", "auto", "loop", "bmm", "grouped_mm")


def draw(seed: int) -> dict:
    """One random config: {"world", "stage", "zero" (JSON overrides), "args" (train.py keys)}. Pure."""
    rng = random.Random(seed)
    world = rng.choice((2, 3, 4))
    dense = rng.random() < 0.15
    stage = rng.choice((0, 1, 2, 3) if dense else (0, 1, 2))
    args = dict(n_layer=rng.choice((1, 2)), n_head=2, n_embd=rng.choice((16, 32)), block_size=16,
                batch_size=rng.randint(1, 8), gradient_accumulation_steps=world * rng.randint(1, 6),
                max_iters=3, eval_interval=3, lr_decay_iters=6, warmup_iters=1, learning_rate=3e-3,
                grad_clip=rng.choice((0.0, 0.3)), activation_checkpointing=rng.random() < 0.25,
                use_moe=not dense, seed=rng.randint(0, 9999))
    if not dense:
        ep_size = rng.choice([d for d in range(1, world + 1) if world % d == 0])
        experts = ep_size * rng.randint(math.ceil(2 / ep_size), 16 // ep_size)
        kernel = rng.choice(KERNELS)
        args.update(ep_size=ep_size, num_experts=experts, num_experts_per_tok=rng.randint(1, min(4, experts)),
                    moe_impl=kernel.removesuffix("-flip"), gate=rng.choice(GATES),
                    capacity_factor=rng.choice((0.0, 0.0, round(rng.uniform(0.5, 0.95), 2))),
                    num_shared_experts=rng.choice((0, 0, 1)), moe_every=rng.choice((1, 1, 2)),
                    expert_act=rng.choice(("gelu", "swiglu")), bias_update_rate=rng.choice((0.0, 0.0, 0.01)),
                    z_loss_coef=rng.choice((0.0, 1e-3)))
        if args["moe_every"] > args["n_layer"]:
            args["moe_every"] = 1  # keep at least one MoE layer
        if kernel == "auto-flip":  # about 32 rows per expert (a capacity would cap the busiest: no flip)
            rows_per_sample = args["block_size"] * args["num_experts_per_tok"]
            args.update(capacity_factor=0.0, batch_size=min(8, max(1, round(32 * experts / rows_per_sample))))
    zero = {}
    if stage in (1, 2):  # small buckets: several reductions per backward, whose boundaries must agree too
        zero["reduce_bucket_size"] = rng.choice((200_000_000, 3000))
        zero["overlap_comm"] = rng.random() < 0.3  # ZeRO-1 then reduces from backward hooks too
    return {"seed": seed, "world": world, "stage": stage, "zero": zero, "args": args}


def issue23_rows() -> list[dict]:
    """The table of issue 23 (zero2.json/zero1.json in fp32 against one device), as cases: each row failed before
    the reduction was ordered, or is its control."""
    common = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, dropout=0.0, use_moe=True, num_experts_per_tok=2,
                  gradient_accumulation_steps=4, warmup_iters=2, lr_decay_iters=12, max_iters=6, eval_interval=6,
                  grad_clip=1.0, activation_checkpointing=False, capacity_factor=0.0,
                  moe_impl="auto", seed=1337)
    rows = [(2, 2, 2, 8, 4, {}), (2, 1, 1, 8, 4, {}), (2, 1, 2, 8, 4, {}), (2, 1, 2, 8, 8, {}),
            (2, 1, 2, 4, 2, {}), (4, 2, 2, 8, 2, dict(gradient_accumulation_steps=12)),
            (4, 2, 2, 8, 4, dict(grad_clip=0.0)), (4, 4, 2, 8, 2, {}), (2, 1, 2, 8, 4, dict(moe_impl="loop")),
            (2, 1, 2, 8, 4, dict(moe_impl="bmm"))]
    return [{"seed": f"issue23-row{i + 1}", "world": world, "stage": stage, "zero": {},
             "args": {**common, "ep_size": ep_size, "num_experts": experts, "batch_size": batch, **extra}}
            for i, (world, ep_size, stage, experts, batch, extra) in enumerate(rows)]


def features(case: dict) -> set[str]:
    """What a config exercises, from the config alone (CI's handful of seeds must cover these)."""
    args, found = case["args"], set()
    if args["use_moe"]:
        if case["world"] > args["ep_size"]:
            found.add(f"replicas-zero{case['stage']}")
        if args["ep_size"] > 1:
            found.add("expert-parallel")
        if 0 < args["capacity_factor"] < 1:
            found.add("drops")
        flip = args["moe_impl"] == "auto" and args["capacity_factor"] == 0 and 16 <= \
            args["batch_size"] * args["block_size"] * args["num_experts_per_tok"] / args["num_experts"] <= 64
        found.add("kernel-auto-flip" if flip else f"kernel-{args['moe_impl']}")
    else:
        found.add(f"dense-zero{case['stage']}")
    if case["world"] == 3:
        found.add("world-3")
    if case["zero"].get("reduce_bucket_size", 200_000_000) < 10_000:
        found.add("small-buckets")
    if case["zero"].get("overlap_comm"):
        found.add("overlap-comm")
    if args["activation_checkpointing"]:
        found.add("activation-checkpointing")
    return found


def empty_experts(run_dir: Path) -> bool:
    """Whether some expert got no token in a whole step (the run's routing statistics say)."""
    return any(layer["dead_experts"] > 0 for row in train_rows(run_dir) for layer in row.get("moe", []))


def run(case: dict, data_dir: Path, work: Path, timeout: float = 300, notes: list | None = None,
        launch_ranks=run_ranks) -> list[str]:
    """Train `case` on its ranks and on one device; return what disagreed (empty: equivalent). With a `notes`
    list, isolated rounding differences (compare) go there instead of failing. `launch_ranks` starts the
    ranks: dist_utils.run_ranks, or a ForkServer's (tests/forkserver.py), which skips their imports."""
    from nanomoe_ds.config import from_argv
    from nanomoe_ds.trainer import train
    args = dict(case["args"])
    one_args = {k: v for k, v in args.items() if k != "ep_size"}
    m, t = from_argv(tiny_args(data_dir, work / "one", **one_args, eval_iters=1, log_interval=1))
    train(m, t)
    json_path = ds_json(work, f"zero{case['stage']}", zero=case["zero"])
    ranks = launch_ranks(case["world"], ["--deepspeed_config", json_path,
                                         *tiny_args(data_dir, work / "dist", **args, eval_iters=1, log_interval=1)],
                         timeout=timeout)
    failed = [f"rank {r}: exit {res.returncode}: {res.stderr.strip().splitlines()[-1:]}"
              for r, res in enumerate(ranks) if res.returncode != 0]
    return failed or compare(work / "one", work / "dist", notes)


def compare(one_dir: Path, dist_dir: Path, notes: list | None = None) -> list[str]:
    """What disagrees beyond TOLERANCE. One exception, appended to `notes` instead: a weight tensor in
    which at most ISOLATED elements differ (each by less than one step's learning rate) while every loss
    and gradient norm agrees. That is fp32 rounding, not a wrong gradient: an element whose gradient
    was near zero in some step gets Adam's normalised update g / (|g| + eps), which the summation order
    of a near-cancelling sum can move by a visible fraction (docs/equivalence.md). A wrong reduction
    moves whole tensors, and the losses and norms with them."""
    problems, isolated = [], []
    one, dist = train_rows(one_dir), train_rows(dist_dir)
    if [r["iter"] for r in one] != [r["iter"] for r in dist]:
        return [f"iterations differ: {[r['iter'] for r in one]} vs {[r['iter'] for r in dist]}"]
    for a, b in zip(one, dist):
        for key in ("loss", "grad_norm"):
            if a[key] is None or b[key] is None:
                if (a[key] is None) != (b[key] is None):
                    problems.append(f"iteration {a['iter']}: {key} {a[key]} on one device vs {b[key]}")
            elif abs(a[key] - b[key]) > TOLERANCE * abs(a[key]):
                problems.append(f"iteration {a['iter']}: {key} {a[key]:.7g} on one device vs {b[key]:.7g}")
    one_ck, dist_ck = read_checkpoint(one_dir), read_checkpoint(dist_dir)
    lr = one_ck["config"]["learning_rate"]
    for name, value in one_ck["model"].items():
        diff = (dist_ck["model"][name].float() - value.float()).abs()
        if diff.max() > TOLERANCE:
            off = int((diff > TOLERANCE).sum())
            line = f"weight {name} differs by {diff.max().item():.3g} ({off} of {diff.numel()} elements)"
            (isolated if off <= ISOLATED and diff.max() < lr else problems).append(line)
    if notes is not None and not problems:
        notes.extend(f"explained, fp32 rounding through Adam: {line}" for line in isolated)
    return problems or ([] if notes is not None else isolated)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", required=True, help="a prepared shakespeare_char directory")
    parser.add_argument("--configs", type=int, default=1, help="how many consecutive seeds to run")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--log", default="", help="append one JSON line per config here")
    parser.add_argument("--issue23", action="store_true", help="run the table of issue 23 instead of random configs")
    opts = parser.parse_args(argv)
    failures = 0
    cases = issue23_rows() if opts.issue23 else [draw(seed) for seed in range(opts.seed, opts.seed + opts.configs)]
    for case in cases:
        seed = case["seed"]
        t0 = time.time()
        with tempfile.TemporaryDirectory() as work:
            notes: list[str] = []
            problems = run(case, Path(opts.data_dir), Path(work), notes=notes)
            empty = not problems and case["args"]["use_moe"] and empty_experts(Path(work) / "one")
        failures += bool(problems)
        tags = sorted(features(case) | ({"empty-experts"} if empty else set()))
        print(f"seed {seed}: {'FAIL' if problems else 'ok'} in {time.time() - t0:.1f}s [{' '.join(tags)}] "
              f"(world {case['world']}, ZeRO-{case['stage']}, {json.dumps(case['args'])}, zero {case['zero']})",
              flush=True)
        for p in [*notes, *problems[:5]]:
            print(f"  {p}")
        if problems:
            more = f"  (and {len(problems) - 5} more)\n" if len(problems) > 5 else ""
            again = "--issue23" if opts.issue23 else f"--seed {seed}"
            print(f"{more}  reproduce: python tests/equivalence_fuzz.py --data_dir {opts.data_dir} {again}", flush=True)
        if opts.log:
            with open(opts.log, "a") as f:
                f.write(json.dumps({**case, "problems": problems, "notes": notes, "seconds": time.time() - t0,
                                    "tags": tags}) + "\n")
    print(f"{len(cases) - failures} passed, {failures} failed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
