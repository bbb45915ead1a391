"""Time the DeepSpeed engine's training step against the plain loop's, side by side on one rank.

Every variant is a model plus an engine built the way `launch/train.py` builds it: `plain`
is local_engine.LocalEngine (what `python launch/train.py` runs), `zeroN` is
ds_engine's engine on the shipped `ds_configs/zeroN.json` in --dtype, in this
one process as a single rank (RANK=0, WORLD_SIZE=1, gloo or NCCL). Suffixes:
  -kept     keep the JSON's ZeRO stage on one rank (--zero_single_rank_as_stage0=False):
            DeepSpeed's ZeRO machinery itself, which the default replaces with ZeRO-0 there;
  -unfused  the JSON's optimizer with "fused": false (DeepSpeed's torch AdamW default);
  -ac       --activation_checkpointing=True (any variant, e.g. plain-ac, zero2-ac);
  -check    --check_grad_order=True: the reduction-order guard's cost per step (zero2-kept-check);
  -unordered  without grad_order.py's fixed reduction order, to measure what it costs (zero2-kept-unordered).
Each step is the trainer's own train_step over one fixed micro-batch. Steps of all variants
are interleaved (one step of each per round, rotating the order) and the median of the
timed rounds is reported with its ratio to `plain` of the same model, next to what autograd
keeps for backward in one forward (the activation memory, counted with saved-tensor hooks),
then tokens/s, MFU and, on a GPU, the step's peak memory above what the engines hold. Other
--key=value arguments override the seed's CPU line for every model.

    python bench/bench_engine.py                       # dense and the seed's MoE, plain vs ZeRO-0/1/2
    python bench/bench_engine.py --variants plain,zero2,zero2-kept,zero2-unfused --steps 60
    python bench/bench_engine.py --variants plain,plain-ac,zero2,zero2-ac --block_size=256 --n_layer=8
    python bench/bench_engine.py --device=cuda --dtype=bf16 --models=dense,moe-8x2-h256 \\
        --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8 --vocab_size=50304 \\
        --expert_hidden=1536          # GPT-2 small and its FLOP-matched MoE (launch/gpu_check.sh)
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch

from bench import machine_name
from ranks import free_port
from bench_step import SEED_LINE, VARIANTS as MODELS, FixedBatches, one_step, time_steps
from nanomoe_ds.activation_checkpoint import checkpoint_blocks_
from nanomoe_ds.config import ArgumentParser, from_argv
from nanomoe_ds.metrics import device_peak_flops, mfu
from nanomoe_ds.model import GPT
from nanomoe_ds.local_engine import LocalEngine

DEFAULT_VARIANTS = "plain,zero0,zero1,zero2,zero1-kept,zero2-kept"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def one_rank_env(device: str):
    """The launcher's variables for a world of one, on loopback (left alone if a launcher set them)."""
    port = free_port()
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR=device).items():
        os.environ.setdefault(key, value)


def ds_json(stage: str, dtype: str, fused: bool | None, tmp: str) -> str:
    """The shipped JSON for `stage` in `dtype`; `fused` False forces DeepSpeed's unfused AdamW."""
    with open(os.path.join(REPO, "ds_configs", f"{stage}.json")) as f:
        cfg = json.load(f)
    cfg["bf16"] = {"enabled": dtype == "bf16"}
    if fused is not None:
        cfg["optimizer"]["params"]["fused"] = fused
    path = os.path.join(tmp, f"{stage}-{dtype}-{fused}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def build(model: str, variant: str, args, overrides: list[str], tmp: str):
    """The engine of one variant for one model, seeded and wrapped like the trainer's."""
    argv = SEED_LINE + MODELS[model] + [f"--device={args.device}"] + overrides
    kind, *options = variant.split("-")
    if "ac" in options:
        argv.append("--activation_checkpointing=True")
    if kind == "plain":
        model_cfg, train_cfg = from_argv(argv)
        return LocalEngine(seeded_model(model_cfg, train_cfg), train_cfg, train_cfg.device, DTYPES[args.dtype])
    from nanomoe_ds.ds_engine import make_engine_factory
    argv += [f"--deepspeed_config={ds_json(kind, args.dtype, False if 'unfused' in options else None, tmp)}"]
    if "kept" in options:
        argv.append("--zero_single_rank_as_stage0=False")
    if "check" in options:
        argv.append("--check_grad_order=True")
    model_cfg, train_cfg = from_argv(argv)
    factory = make_engine_factory(model_cfg, train_cfg)
    if "unordered" not in options:
        return factory(seeded_model(model_cfg, train_cfg), train_cfg)
    from nanomoe_ds import grad_order
    install, grad_order.install = grad_order.install, lambda *args: None
    try:
        return factory(seeded_model(model_cfg, train_cfg), train_cfg)
    finally:
        grad_order.install = install


def seeded_model(model_cfg, train_cfg) -> GPT:
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    if train_cfg.activation_checkpointing:  # as trainer.train does
        checkpoint_blocks_(model)
    return model


def saved_for_backward_mib(engine, batches: FixedBatches, checkpointed: bool) -> float:
    """MiB that autograd keeps from one forward until its backward (then freed by running it).

    Checkpointed blocks keep their input outside autograd's saved tensors (the recompute's
    arguments): counted here as one [batch, block, n_embd] activation per block.
    """
    cfg = engine.module.config
    width = engine.module.transformer.wte.weight.element_size()  # the residual stream: fp32, or bf16 under a bf16 engine
    total = cfg.n_layer * batches.x.numel() * cfg.n_embd * width if checkpointed else 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = engine.forward(batches.x, batches.x)
    engine.backward(loss)
    engine.step(1e-3)
    return total / 2**20


def step_peak_mib(engine, batches: FixedBatches) -> float | None:
    """On a GPU: the peak of one training step above what was allocated before it (None elsewhere)."""
    if not torch.cuda.is_available() or not str(engine.device).startswith("cuda"):
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    one_step(engine, batches, lr=1e-3)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def replica_check_ms(model: GPT, repeats: int = 20) -> float:
    """Median time of the replica guard's work on one rank: a fingerprint of every weight (guards.py).
    Its all-reduce moves 32 bytes per tensor; a step between two checks pays nothing."""
    import time
    from nanomoe_ds import guards
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for p in model.parameters():
            guards.fingerprint(p)
        if torch.cuda.is_available() and next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def stage_run(engine) -> str:
    """The ZeRO stage the engine actually runs ('-' for the plain loop)."""
    return str(int(engine.engine.zero_optimization_stage())) if hasattr(engine, "engine") else "-"


def main():
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="dense,moe-10x2", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="plain, zeroN, zeroN-kept, zeroN-unfused (N: 0 1 2)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    ap.add_argument("--steps", type=int, default=40, help="timed rounds, after --warmup rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    one_rank_env(args.device)
    variants = args.variants.split(",")
    if variants[0] != "plain":  # ratios are to it
        ap.error("--variants must start with plain (ratios are to it)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            engines = {v: build(model, v, args, overrides, tmp) for v in variants}
            plain = engines["plain"]
            cfg = plain.module.config
            batches = FixedBatches(torch.randint(0, cfg.vocab_size, (plain.train_cfg.batch_size, cfg.block_size),
                                                 generator=torch.Generator().manual_seed(0)).to(args.device))
            saved = {v: saved_for_backward_mib(engine, batches, "-ac" in v) for v, engine in engines.items()}
            peak = {v: step_peak_mib(engine, batches) for v, engine in engines.items()}
            step_ms = time_steps(engines, args.steps, args.warmup, batches.x)
            flops = plain.module.flops_per_token()
            guard_ms = replica_check_ms(plain.module)
            rows.append((model, {v: (step_ms[v], saved[v], peak[v], stage_run(engines[v])) for v in variants}, flops,
                         batches.x.numel(), guard_ms))
            del engines, plain
    print_report(args, variants, rows)
    sys.stdout.flush()
    os._exit(0)  # no gloo/NCCL teardown at exit (PyTorch #190489): the tables are out


def print_report(args, variants: list[str], rows: list):
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else machine_name("cpu")
    threads = "" if args.device == "cuda" else f"  threads {torch.get_num_threads()}"
    print(f"# {datetime.date.today()}  torch {torch.__version__}  {device_name}{threads}  {args.dtype}, one rank, "
          f"median of {args.steps} interleaved steps")
    print(f"# {' '.join(['python bench/bench_engine.py'] + sys.argv[1:])}")
    print("| model | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for model, results, _, _, _ in rows:
        ref = results["plain"][0]
        cells = [f"{ms:.1f} ms ({ms / ref:.2f}x, ZeRO {stage}, {saved:.1f} MiB)" if v != "plain"
                 else f"{ms:.1f} ms ({saved:.1f} MiB)" for v, (ms, saved, _, stage) in results.items()]
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("cells: median step (x plain, the ZeRO stage that ran, MiB kept for backward by one forward)\n")
    for model, results, _, _, guard_ms in rows:
        print(f"replica check, {model}: {guard_ms:.2f} ms to fingerprint every weight = "
              f"{guard_ms / results['plain'][0]:.3f} of a plain step, once per replica_check_interval")
    print()
    peak_flops = device_peak_flops(args.device, DTYPES[args.dtype], 0.0)
    print("| model | variant | tokens/s | MFU | step peak above resident |")
    print("|---|---|---:|---:|---:|")
    for model, results, flops_per_token, tokens, _ in rows:
        for v, (ms, _, peak, _) in results.items():
            tokens_per_s = tokens / (ms / 1e3)
            util = mfu(flops_per_token, tokens_per_s, peak_flops)
            print(f"| {model} | {v} | {tokens_per_s:.0f} | {'n/a' if util is None else f'{util * 100:.1f}%'} | "
                  f"{'n/a' if peak is None else f'{peak:.0f} MiB'} |")


if __name__ == "__main__":
    main()
