"""Time the DeepSpeed engine's training step against the plain loop's, side by side on one rank.

Every variant is a model plus an engine built the way `launch/train.py` builds it: `plain`
is trainer.LocalEngine (what `python launch/train.py` runs), `zeroN` is
deepspeed_integration's engine on the shipped `ds_configs/zeroN.json` with bf16 off (fp32),
in this one process as a single rank (RANK=0, WORLD_SIZE=1, gloo on loopback). Suffixes:
  -kept     keep the JSON's ZeRO stage on one rank (--zero_single_rank_as_stage0=False):
            DeepSpeed's ZeRO machinery itself, which the default replaces with ZeRO-0 there;
  -unfused  the JSON's optimizer with "fused": false (DeepSpeed's torch AdamW default);
  -ac       --activation_checkpointing=True (any variant, e.g. plain-ac, zero2-ac).
Steps of all variants are interleaved (one step of each per round, rotating the order) and
the median of the timed rounds is reported with its ratio to `plain` of the same model,
next to what autograd keeps for backward in one forward (the activation memory, counted
with saved-tensor hooks). Other --key=value arguments override the seed's CPU line.

    python launch/bench/bench_engine.py                       # dense and the seed's MoE, plain vs ZeRO-0/1/2
    python launch/bench/bench_engine.py --variants plain,zero2,zero2-kept,zero2-unfused --steps 60
    python launch/bench/bench_engine.py --variants plain,plain-ac,zero2,zero2-ac --block_size=256 --n_layer=8
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch

from bench import machine_name
from bench_step import SEED_LINE, VARIANTS as MODELS, time_steps
from nanomoe_ds.config import ArgumentParser, from_argv
from nanomoe_ds.model import GPT
from nanomoe_ds.trainer import LocalEngine

DEFAULT_VARIANTS = "plain,zero0,zero1,zero2,zero1-kept,zero2-kept"


def one_rank_env():
    """The launcher's variables for a world of one, on loopback (left alone if a launcher set them)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           GLOO_SOCKET_IFNAME="lo", DS_ACCELERATOR="cpu").items():
        os.environ.setdefault(key, value)


def fp32_json(stage: str, fused: bool | None, tmp: str) -> str:
    """The shipped JSON for `stage` with bf16 off; `fused` False forces DeepSpeed's unfused AdamW."""
    with open(os.path.join(REPO, "ds_configs", f"{stage}.json")) as f:
        cfg = json.load(f)
    cfg["bf16"] = {"enabled": False}
    if fused is not None:
        cfg["optimizer"]["params"]["fused"] = fused
    path = os.path.join(tmp, f"{stage}-{fused}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def build(model: str, variant: str, overrides: list[str], tmp: str):
    """The engine of one variant for one model, seeded and wrapped like the trainer's."""
    argv = SEED_LINE + MODELS[model] + ["--dtype=float32"] + overrides
    kind, *options = variant.split("-")
    if "ac" in options:
        argv.append("--activation_checkpointing=True")
    if kind == "plain":
        model_cfg, train_cfg = from_argv(argv)
        return LocalEngine(seeded_model(model_cfg, train_cfg), train_cfg, train_cfg.device, torch.float32)
    from nanomoe_ds.deepspeed_integration import make_engine_factory
    argv += [f"--deepspeed_config={fp32_json(kind, False if 'unfused' in options else None, tmp)}", "--dtype=auto"]
    if "kept" in options:
        argv.append("--zero_single_rank_as_stage0=False")
    model_cfg, train_cfg = from_argv(argv)
    factory = make_engine_factory(model_cfg, train_cfg)
    return factory(seeded_model(model_cfg, train_cfg), train_cfg)


def seeded_model(model_cfg, train_cfg) -> GPT:
    torch.manual_seed(train_cfg.seed)
    model = GPT(model_cfg)
    if getattr(train_cfg, "activation_checkpointing", False):  # as trainer.train does (getattr: older commits)
        from nanomoe_ds.activation_checkpoint import checkpoint_blocks_  # here: the script also times older commits
        checkpoint_blocks_(model)
    return model


def saved_for_backward_mib(engine, batch, checkpointed: bool) -> float:
    """MiB that autograd keeps from one forward until its backward (then freed by running it).

    Checkpointed blocks keep their input outside autograd's saved tensors (the recompute's
    arguments): counted here as one [batch, block, n_embd] activation per block.
    """
    cfg = engine.module.config
    total = cfg.n_layer * batch[0].numel() * cfg.n_embd * 4 if checkpointed else 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, loss = engine.forward(*batch)
    engine.backward(loss)
    engine.step(1e-3)
    return total / 2**20


def stage_run(engine) -> str:
    """The ZeRO stage the engine actually runs ('-' for the plain loop)."""
    return str(int(engine.engine.zero_optimization_stage())) if hasattr(engine, "engine") else "-"


def main():
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="dense,moe-10x2", help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="plain, zeroN, zeroN-kept, zeroN-unfused (N: 0 1 2)")
    ap.add_argument("--steps", type=int, default=40, help="timed rounds, after --warmup rounds")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    one_rank_env()
    variants = args.variants.split(",")
    if variants[0] != "plain":  # ratios are to it
        ap.error("--variants must start with plain (ratios are to it)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            engines = {v: build(model, v, overrides, tmp) for v in variants}
            cfg = engines["plain"].module.config
            batch_size = from_argv(SEED_LINE + overrides)[1].batch_size
            x = torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size), generator=torch.Generator().manual_seed(0))
            saved = {v: saved_for_backward_mib(engine, (x, x), "-ac" in v) for v, engine in engines.items()}
            step_ms = time_steps(engines, args.steps, args.warmup, x)
            rows.append((model, engines, step_ms, saved))

    print(f"# {datetime.date.today()}  torch {torch.__version__}  {machine_name('cpu')}  threads "
          f"{torch.get_num_threads()}  fp32, one rank, median of {args.steps} interleaved steps")
    print(f"# {' '.join(['python launch/bench/bench_engine.py'] + sys.argv[1:])}")
    print("| model | " + " | ".join(variants) + " |")
    print("|---|" + "---:|" * len(variants))
    for model, engines, step_ms, saved in rows:
        ref = step_ms["plain"]
        cells = [f"{step_ms[v]:.1f} ms ({step_ms[v] / ref:.2f}x, ZeRO {stage_run(engines[v])}, {saved[v]:.1f} MiB)"
                 if v != "plain" else f"{ref:.1f} ms ({saved[v]:.1f} MiB)" for v in variants]
        print(f"| {model} | " + " | ".join(cells) + " |")
    print("cells: median step (x plain, the ZeRO stage that ran, MiB kept for backward by one forward)")
    sys.stdout.flush()
    os._exit(0)  # no gloo teardown at exit (PyTorch #190489): the table is out


if __name__ == "__main__":
    main()
