"""Time one MoE layer's forward+backward against a dense MLP, the seed's loop and DeepSpeed's MoE.

One run builds, for each shape, four layers on the same input and output gradient:
  dense  a GELU MLP with the MoE's active FLOPs (hidden = k * expert_hidden): the reference;
  ours   nanomoe_ds.moe.MoE, dropless, with moe_impl="auto" (the row says what auto picked)
         and, below it, forced to each other kernel in --impls;
  seed   the nanoGPT-MoE seed's style: repeat_interleave(k) and a Python loop over experts
         with boolean masks;
  ds     deepspeed.moe.layer.MoE (ep_size=1, drop_tokens=False) on a world-size-1 group.
bf16 means torch.autocast(dtype=bfloat16) around the forward for every layer, with fp32
parameters, as the single-device trainer runs. Candidates are interleaved (one step of each
per round, rotating the order) and the median of --repeats rounds is reported.

Peak memory is the largest extra allocation during one forward+backward above what was
live before it (so parameters and the input are not counted, their gradients are): from
torch.cuda.max_memory_allocated on CUDA, from the profiler's allocation events on CPU.

    python bench/bench.py                                # everything, CPU, 2 threads
    python bench/bench.py --shapes 64x8x192 --dtype bf16 --variants dense,ours --profile
    python bench/bench.py --shapes 8x2x256 --tokens 768 --n_embd 128 --dtype fp32 --variants dense,ours --parts
    python bench/bench.py --device cuda --dtype bf16 --shapes 8x2x3072 --variants dense,ours --compile
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # the repository

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomoe_ds import kernels
from nanomoe_ds.config import GPTConfig, validate_model
from nanomoe_ds.dispatch import gather_tokens, permute, unpermute
from nanomoe_ds.mlp import MLP
from nanomoe_ds.moe import MoE, init_moe_
from ranks import free_port

VARIANTS = ("dense", "ours", "seed", "ds")


class SeedMoE(nn.Module):
    """The nanoGPT-MoE seed's layer, faithfully small: every token copied k times, then
    one boolean mask per expert selects its rows (a gather, a matmul and a scatter each)."""

    def __init__(self, d: int, num_experts: int, k: int, hidden: int):
        super().__init__()
        self.k = k
        self.gate = nn.Linear(d, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(num_experts))

    def forward(self, x):
        B, T, C = x.shape
        x = x.view(-1, C)
        weights, idx = torch.topk(self.gate(x), self.k, dim=-1)
        weights = F.softmax(weights, dim=-1, dtype=torch.float32)
        x_rep = x.repeat_interleave(self.k, dim=0)
        flat_idx = idx.view(-1)
        y = torch.empty_like(x_rep)
        for i, expert in enumerate(self.experts):
            mask = flat_idx == i
            y[mask] = expert(x_rep[mask]).to(y.dtype)
        y = (y.view(-1, self.k, C) * weights.unsqueeze(-1)).sum(dim=1)
        return y.view(B, T, C)


class OursMoE(nn.Module):
    """nanomoe_ds's MoE as a layer on its own: the output, with the routing recorded as GPT.forward does."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        out, routing = self.moe(x)
        self.moe.record(routing)
        return out


class DeepSpeedMoE(nn.Module):
    """deepspeed.moe.layer.MoE returns (out, l_aux, counts); keep the output only."""

    def __init__(self, d: int, num_experts: int, k: int, hidden: int):
        super().__init__()
        from deepspeed.moe.layer import MoE as DSMoE
        expert = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.moe = DSMoE(hidden_size=d, expert=expert, num_experts=num_experts, ep_size=1, k=k,
                         drop_tokens=False)
        self.moe.set_deepspeed_parallelism()  # normally done by deepspeed.initialize

    def forward(self, x):
        return self.moe(x)[0]


def init_deepspeed(device: str):
    """A world-size-1 process group for DeepSpeed's MoE (its gate all-reduces the capacity)."""
    if device == "cpu":
        # Skip the shared-memory all-reduce extension: a ~20 s JIT build we never use.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed
    port = free_port()
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")


def machine_name(device: str) -> str:
    """The GPU's name, or the CPU's model name plus the flags that change bf16/fp16 speed (benchmarks name it)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    name, flags = platform.processor() or platform.machine(), set()
    if os.path.exists("/proc/cpuinfo"):
        lines = open("/proc/cpuinfo").read().splitlines()
        name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), name)
        flags = set(next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), []))
    extras = [f for f in ("amx_bf16", "avx512_bf16", "avx512_fp16") if f in flags]
    return f"{name}, {', '.join(extras)}" if extras else name


def parse_shape(s: str):
    E, k, h = (int(v) for v in s.lower().split("x"))
    return E, k, h


def build(name: str, impl: str, E: int, k: int, h: int, d: int, device: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "dense":
        m = MLP(d, k * h, bias=True)
    elif name == "ours":
        cfg = GPTConfig(use_moe=True, n_embd=d, n_head=1, num_experts=E, num_experts_per_tok=k,
                        expert_hidden=h, moe_impl=impl, dropout=0.0, bias=True)
        validate_model(cfg)
        moe = MoE(cfg)
        init_moe_(moe, n_layer=12)
        m = OursMoE(moe)
    elif name == "seed":
        m = SeedMoE(d, E, k, h)
    else:
        m = DeepSpeedMoE(d, E, k, h)
    return m.to(device).train()


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step(model: nn.Module, x: torch.Tensor, g: torch.Tensor, autocast_dtype) -> None:
    """One forward+backward of the layer (the timed unit)."""
    for p in model.parameters():
        p.grad = None
    x.grad = None
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(x)
    out.backward(g.to(out.dtype))


def peak_bytes(model, x, g, autocast_dtype, device: str) -> int:
    """Extra memory one step allocates at its peak, above what is live before it."""
    for p in model.parameters():
        p.grad = None
    x.grad = None
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(model, x, g, autocast_dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    act = torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[act], profile_memory=True) as prof:
        step(model, x, g, autocast_dtype)
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()) == "DeviceType.CPU")
    cur = peak = 0
    for _, nbytes in deltas:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def profile_ours(model, x, g, autocast_dtype, rows: int = 25):
    step(model, x, g, autocast_dtype)
    act = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        act.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=act) as prof:
        step(model, x, g, autocast_dtype)
    sort = "self_cuda_time_total" if x.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))


def moe_parts(moe: MoE, x: torch.Tensor) -> dict:
    """Closures that each run one part of a dropless MoE layer's forward+backward, as MoE.forward does,
    on fixed inputs: where a layer's time goes, besides the whole (--parts)."""
    xt = x.detach().reshape(-1, x.shape[-1]).requires_grad_()
    idx, w, _, _ = moe.router(xt)
    perm = permute(idx, w, moe.num_experts)
    xs = gather_tokens(xt, perm).detach().requires_grad_()
    ys = moe.experts(xs, perm.counts).detach().requires_grad_()
    weights = w.detach().requires_grad_()

    def route():
        topk_idx, topk_w, _, _ = moe.router(xt)
        (gather_tokens(xt, permute(topk_idx, topk_w, moe.num_experts)).sum() + topk_w.sum()).backward()

    return {"router+permute+gather": route, "experts": lambda: moe.experts(xs, perm.counts).sum().backward(),
            "combine": lambda: unpermute(ys, perm, weights).sum().backward()}


def time_interleaved(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds of each closure, one call of each per round, rotating the order; round 0 warms up."""
    times = {name: [] for name in fns}
    order = list(fns)
    for r in range(repeats + 1):
        for name in order[r % len(order):] + order[:r % len(order)]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            if r > 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    ap.add_argument("--repeats", type=int, default=4, help="timed rounds after one warmup round")
    ap.add_argument("--shapes", default="8x2x1536,64x8x192", help="comma list of ExKxexpert_hidden")
    ap.add_argument("--impls", default="grouped_mm,bmm,loop", help="forced moe_impl rows besides auto ('' for none)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--tokens", type=int, default=8192, help="a multiple of 8 (batch 8 x tokens/8)")
    ap.add_argument("--n_embd", type=int, default=384)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table for our auto layer")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile every layer (inductor then fuses the grouped GEMM's bias with the activation)")
    ap.add_argument("--parts", action="store_true",
                    help="fp32: also time our auto layer's parts (router+permute+gather, experts, combine)")
    args = ap.parse_args()
    if args.tokens % 8 or not set(args.dtype.split(",")) <= {"fp32", "bf16"}:
        ap.error("--tokens must be a multiple of 8 and --dtype a comma list of fp32, bf16")
    if args.parts and args.compile:
        ap.error("--parts times the layer's parts eagerly: leave out --compile")

    t_start = time.perf_counter()
    device, d, T = args.device, args.n_embd, args.tokens
    variants = [v for v in args.variants.split(",") if v]
    impls = [i for i in args.impls.split(",") if i]
    if "ds" in variants:
        if device == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is imported
        init_deepspeed(device)
    torch.set_num_threads(args.threads)  # after DeepSpeed, which may set its own

    print(f"# {datetime.date.today()}  torch {torch.__version__}  device {device} ({machine_name(device)})  threads "
          f"{torch.get_num_threads()}  tokens {T}  n_embd {d}  median of {args.repeats}"
          + ("  torch.compile" if args.compile else ""))
    print(f"# {' '.join([os.path.basename(sys.argv[0])] + sys.argv[1:])}")
    header = f"| {'shape':<14} | {'dtype':<5} | {'layer':<22} | {'ms':>8} | {'x dense':>7} | {'peak MB':>8} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")

    for shape in args.shapes.split(","):
        E, k, h = parse_shape(shape)
        for dt_name in args.dtype.split(","):
            ac = {"fp32": None, "bf16": torch.bfloat16}[dt_name]
            # (row label, variant, moe_impl)
            rows = [("dense", "dense", None)] if "dense" in variants else []
            if "ours" in variants:  # auto first; a forced row for each other impl (auto's twin is skipped)
                target = kernels.target_of(torch.empty(0, device=device), ac or torch.float32)
                balanced = kernels.Load(T * k, -(-T * k // E), E)  # the label assumes balanced routing
                picked = kernels.choose("auto", target, (d, h), balanced)
                rows.append((f"ours (auto: {picked})", "ours", "auto"))
                rows += [(f"ours {i}", "ours", i) for i in impls if i != picked and kernels.runs(i, target, (d, h))]
            rows += [(v, v, None) for v in ("seed", "ds") if v in variants]
            models = {label: build(v, impl or "auto", E, k, h, d, device) for label, v, impl in rows}
            if args.compile:  # each layer as torch.compile captures it; compiling happens in the warmup round
                models = {label: torch.compile(model) for label, model in models.items()}
            torch.manual_seed(1)
            x = torch.randn(8, T // 8, d, device=device, requires_grad=True)
            g = torch.randn(8, T // 8, d, device=device)
            med = time_interleaved({label: (lambda m=model: step(m, x, g, ac)) for label, model in models.items()},
                                   args.repeats, device)
            ref = med.get("dense")
            for label, model in models.items():
                mb = peak_bytes(model, x, g, ac, device) / 2**20
                ratio = f"{med[label] / ref:.2f}" if ref else "-"
                print(f"| {shape:<14} | {dt_name:<5} | {label:<22} | {med[label] * 1e3:8.1f} | {ratio:>7} | {mb:8.0f} |",
                      flush=True)
            if "ours" in variants:
                ours = next(m for label, m in models.items() if label.startswith("ours (auto"))  # OursMoE
                c = ours.moe.stats["tokens_per_expert"].float()
                print(f"#   ours: tokens per expert max/mean {(c.max() / c.mean()).item():.3f}")
                if args.profile:
                    profile_ours(ours, x, g, ac)
                if args.parts and ac is None:
                    parts = {"layer": lambda: step(ours, x, g, None), **moe_parts(ours.moe, x)}
                    part_s = time_interleaved(parts, args.repeats, device)
                    rest = part_s["layer"] - sum(v for name, v in part_s.items() if name != "layer")
                    print("#   ours, ms forward+backward: " + ", ".join(f"{name} {v * 1e3:.2f}" for name, v in
                                                                       part_s.items()) + f", the rest {rest * 1e3:.2f}")
    print(f"# total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
