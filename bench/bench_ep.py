"""Training step time with expert parallelism (ep_size=2) against plain data parallelism (ep_size=1).

Both sides run the DeepSpeed engine path on 2 gloo ranks over loopback (the environment
DeepSpeed's launcher sets: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, ...), with
the same model, the same seeded initialisation and the same global batch of every step.
Two ways to put them side by side:

  --mode interleaved (default)  one pair of rank processes builds both engines with
      nanomoe_ds.ds_engine.make_engine_factory (ep_size=1 and ep_size=2) and
      alternates training steps ABBA (ep1 ep2 | ep2 ep1 | ...). Each step is the trainer's
      loop body (Batches.get of this rank's micro-batches, engine.forward, engine.backward,
      engine.step, the loss all-reduce, the routing tally): a burst of load from other work on a
      shared machine hits both sides alike. Both engines see the same data, so their
      losses must agree step by step; the report prints the largest difference.
  --mode processes  the real loop, nanomoe_ds.trainer.train, in a fresh pair of processes
      per run, runs alternating ABBA (--rounds); the step time is the trainer's own
      `time_ms` from out_dir/metrics.jsonl (rank 0). Slower (a start-up per run) and more
      exposed to drift between runs.

The reported step time is the median over every timed step (after --warmup).

Inside each rank (this script's worker mode; no library code is touched) the collectives
are wrapped with timers:
  a2a   torch.distributed.all_to_all_single, which every exchange of
        nanomoe_ds/expert_parallel.py ends in: the counts and the token rows and results in
        forward, and the autograd all_to_all_single of the backward; split by phase
        (forward / backward) and kind (counts / rows). A blocking all-to-all also waits for
        the peer to arrive; "per call min over ranks" sums, call by call, the smaller of the
        two ranks' times: the exchange without the waiting for a late peer;
  coll  every other torch.distributed collective (ZeRO's gradient reduce-scatter /
        all-reduce, the parameter all-gather, the loss all-reduce); async ones count
        their launch only;
and the engine adapter's forward, backward and step are timed, as is the process CPU time
per step (all threads, summed over the ranks), which waiting does not inflate.

    python bench/bench_ep.py                           # defaults: well under 2 min on 2 CPU cores
    python bench/bench_ep.py --dtype bf16 --zero zero1 --iters 40
    python bench/bench_ep.py --mode processes --rounds 2 --iters 15
    python bench/bench_ep.py --profile 3               # + torch.profiler top ops per ep_size (rank 0)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ranks import free_port, lscpu_model, rank_env, wait_all  # noqa: E402  (the script's own directory is on sys.path)


# ---------------------------------------------------------------- worker (one rank)
class Timers:
    """Per-step timings of one engine on this rank; a step ends when engine.step returns."""

    def __init__(self):
        self.phase = "other"
        self.iters: list[dict] = []
        self.cur = self._new()

    @staticmethod
    def _new() -> dict:
        return {"fwd_ms": 0.0, "bwd_ms": 0.0, "step_ms": 0.0, "a2a": [], "coll_ms": {}}

    def end_iter(self):
        self.iters.append(self.cur)
        self.cur = self._new()


class Recorder:
    """Which engine's Timers the collective wrappers charge."""
    active: Timers = Timers()


def _install_timers():
    """Wrap torch.distributed collectives with wall-clock timers (this process only)."""
    import torch
    import torch.distributed as dist

    a2a = dist.all_to_all_single

    def timed_a2a(output, input, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return a2a(output, input, *args, **kwargs)
        finally:
            tm = Recorder.active
            kind = "counts" if input.dtype in (torch.int64, torch.int32) else "rows"
            tm.cur["a2a"].append([tm.phase, kind, (time.perf_counter() - t0) * 1e3, output.shape[0]])

    dist.all_to_all_single = timed_a2a  # expert_parallel.py and torch.distributed.nn both look it up here

    def wrap(name):
        fn = getattr(dist, name, None)
        if fn is None:
            return

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                tm = Recorder.active
                tm.cur["coll_ms"][tm.phase] = tm.cur["coll_ms"].get(tm.phase, 0.0) + (time.perf_counter() - t0) * 1e3
        timed.__name__ = fn.__name__
        setattr(dist, name, timed)

    for name in ("all_reduce", "reduce_scatter_tensor", "reduce_scatter", "all_gather_into_tensor", "all_gather",
                 "broadcast", "reduce", "all_reduce_coalesced", "_reduce_scatter_base", "_all_gather_base"):
        wrap(name)


class Profile:
    """torch.profiler over a window of steps of one engine; writes the top ops by self CPU time."""

    def __init__(self, path: Path | None, start: int, n: int):
        self.path, self.start, self.n, self.prof = path, start, n, None

    def before(self, it: int):
        if self.path is not None and self.n and it == self.start:
            import torch
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.start()

    def after(self, done: int):
        if self.prof is not None and done == self.start + self.n:
            self.prof.stop()
            table = self.prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
            self.path.write_text(f"# {self.n} steps from step {self.start}\n{table}\n")
            self.prof = None


def _wrap_engine(engine, timers: Timers, prof: Profile):
    """Time the engine adapter's forward / backward / step (and charge collectives to this engine)."""

    def timed(fn, key, phase, end=False):
        def inner(*args, **kwargs):
            Recorder.active = timers
            if key == "fwd_ms" and not timers.cur["fwd_ms"]:
                prof.before(len(timers.iters))
            timers.phase = phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.cur[key] += (time.perf_counter() - t0) * 1e3
                timers.phase = "other"
                if end:
                    timers.cur["cpu_end"] = time.process_time() * 1e3
                    timers.end_iter()
                    prof.after(len(timers.iters))
        return inner

    engine.forward = timed(engine.forward, "fwd_ms", "fwd")
    engine.backward = timed(engine.backward, "bwd_ms", "bwd")
    engine.step = timed(engine.step, "step_ms", "step", end=True)
    return engine


def _finish(code: int):
    from nanomoe_ds.ds_engine import shutdown
    shutdown(code)


def worker_processes(args, train_argv: list[str]):
    """One ep_size, the real loop (nanomoe_ds.trainer.train)."""
    _install_timers()  # before DeepSpeed's comm backend caches function references
    from nanomoe_ds.config import from_argv
    from nanomoe_ds.ds_engine import make_engine_factory
    from nanomoe_ds.trainer import train

    rank = int(os.environ["RANK"])
    timers = Timers()
    m, t = from_argv(train_argv)
    factory = make_engine_factory(m, t)
    prof = Profile(Path(args.result_dir) / "profile_rank0.txt" if rank == 0 else None,
                   args.warmup + args.iters, args.profile)
    code = 0
    try:
        train(m, t, lambda model, t_: _wrap_engine(factory(model, t_), timers, prof))
        with open(Path(args.result_dir) / f"rank{rank}.json", "w") as f:
            json.dump({"iters": timers.iters}, f)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    _finish(code)


def _isolated_exchange(model, t, repeats: int = 30) -> float:
    """Median ms of one step's exchanges alone (no model around them): per MoE layer one counts
    all-to-all and four of the token rows (dispatch, combine, and both again in backward),
    at this run's sizes with an even split. The floor the exchange could cost here."""
    import torch
    import torch.distributed as dist
    from nanomoe_ds import ds_groups
    layers = model.moe_layers()
    group = ds_groups.expert_parallel_group(t.ep_size)
    rows = t.batch_size * model.config.block_size * model.config.num_experts_per_tok
    dtype = next(model.parameters()).dtype
    x = torch.randn(rows, model.config.n_embd).to(dtype)
    y = torch.empty_like(x)
    counts = torch.ones(model.config.num_experts, dtype=torch.long)
    recv = torch.empty_like(counts)
    Recorder.active = Timers()  # not charged to either side
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in layers:
            dist.all_to_all_single(recv, counts, group=group)
            for _ in range(4):
                dist.all_to_all_single(y, x, group=group)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def worker_interleaved(args, train_argv: list[str]):
    """Both ep_sizes in one pair of processes, steps alternated ABBA; each step is the trainer's loop body."""
    _install_timers()
    from nanomoe_ds.config import from_argv
    from nanomoe_ds.data import Batches, resolve_data_dir
    from nanomoe_ds.ds_engine import make_engine_factory
    from nanomoe_ds.metrics import RoutingTally
    from nanomoe_ds.start import build_model
    from nanomoe_ds.trainer import get_lr, train_step

    rank = int(os.environ["RANK"])
    code = 0
    try:
        sides = {}
        for ep in (1, 2):
            m, t = from_argv(train_argv + [f"--ep_size={ep}"])
            factory = make_engine_factory(m, t)
            model = build_model(m, t)  # seeded: both sides start from the same weights
            timers = Timers()
            prof = Profile(Path(args.result_dir) / f"profile_ep{ep}_rank0.txt" if rank == 0 else None,
                           args.warmup + args.iters, args.profile)
            engine = _wrap_engine(factory(model, t), timers, prof)
            batches = Batches(resolve_data_dir(t.dataset, t.data_dir), m.block_size, t.batch_size, engine.device,
                              t.seed)
            sides[ep] = dict(engine=engine, model=model, t=t, batches=batches, timers=timers, wall=[], cpu=[],
                             loss=[], tally=RoutingTally(model.moe_layers()))

        def one_step(s, it):
            """The trainer's own step (trainer.train_step) and its routing log, timed."""
            engine, t = s["engine"], s["t"]
            t0, c0 = time.perf_counter(), time.process_time()
            Recorder.active = s["timers"]  # the step's collectives count for this side
            losses, _, _ = train_step(engine, s["batches"], it, get_lr(it, t), lambda: False, s["tally"])
            s["tally"].reduce(engine.all_reduce, t.gradient_accumulation_steps, False)  # the trainer logs it
            s["wall"].append((time.perf_counter() - t0) * 1e3)
            s["cpu"].append((time.process_time() - c0) * 1e3)
            s["loss"].append(float(losses[0]))

        n = args.warmup + args.iters
        for it in range(n):
            for ep in ((1, 2) if it % 2 == 0 else (2, 1)):  # ABBA
                one_step(sides[ep], it)
        for ep in (1, 2):  # profiled steps, not timed: one side at a time so the profiles do not mix
            for it in range(n, n + args.profile):
                one_step(sides[ep], it)
        out = {ep: {"iters": s["timers"].iters, "wall": s["wall"], "cpu": s["cpu"], "loss": s["loss"]}
               for ep, s in sides.items()}
        out["isolated_a2a_ms"] = _isolated_exchange(sides[2]["model"], sides[2]["t"])
        with open(Path(args.result_dir) / f"rank{rank}.json", "w") as f:
            json.dump(out, f)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    _finish(code)


# ---------------------------------------------------------------- driver
def _ensure_data():
    d = REPO / "data" / "shakespeare_char"
    if (d / "train.bin").exists() and (d / "val.bin").exists():
        return
    cmd = [sys.executable, str(d / "prepare.py")]  # downloads, or reads $SHAKESPEARE_INPUT as test_data.sh does
    if os.environ.get("SHAKESPEARE_INPUT"):
        cmd += ["--input", os.environ["SHAKESPEARE_INPUT"]]
    subprocess.run(cmd, check=True, cwd=REPO)


def _ds_json(tmp: Path, zero: str, dtype: str) -> Path:
    cfg = json.load(open(REPO / "ds_configs" / f"{zero}.json"))
    cfg["bf16"] = {"enabled": dtype == "bf16"}
    cfg.pop("fp16", None)
    path = tmp / f"{zero}_{dtype}.json"
    path.write_text(json.dumps(cfg, indent=1))
    return path


def _train_argv(a, ds_json: Path, out_dir: Path) -> list[str]:
    max_iters = a.warmup + a.iters + a.profile - 1  # the loop runs iterations 0..max_iters
    kv = dict(deepspeed_config=ds_json, out_dir=out_dir, device="cpu", compile=False,
              dataset="shakespeare_char", n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd,
              block_size=a.block_size, batch_size=a.batch_size, gradient_accumulation_steps=a.grad_accum,
              num_experts=a.num_experts, num_experts_per_tok=a.num_experts_per_tok, dropout=0.0,
              max_iters=max_iters, lr_decay_iters=max(max_iters, 1), warmup_iters=0,
              eval_interval=100000, eval_iters=1, log_interval=1, always_save_checkpoint=False,
              log_moe_stats=True, wandb_log=False)
    return ["launch/config/train_shakespeare_char_moe.py"] + [f"--{k}={v}" for k, v in kv.items()]


def _spawn(a, run_dir: Path, worker_args: list[str], label: str):
    port = free_port()
    procs = []
    for r in range(a.ranks):
        env = rank_env(r, a.ranks, port, a.threads)
        cmd = [sys.executable, str(Path(__file__).resolve()), *worker_args, "--result_dir", str(run_dir),
               "--warmup", str(a.warmup), "--iters", str(a.iters), "--profile", str(a.profile), "--",
               *_train_argv(a, a.ds_json, run_dir / "out")]
        log = open(run_dir / f"rank{r}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        wait_all([p for p, _ in procs], a.timeout, label, run_dir)
    finally:
        for _, log in procs:
            log.close()
    for r, (p, _) in enumerate(procs):
        if p.returncode != 0:
            tail = (run_dir / f"rank{r}.log").read_text()[-3000:]
            raise SystemExit(f"{label}: rank {r} exited with {p.returncode}; log tail:\n{tail}")


def _cpu_steps(ranks_iters: list[list[dict]]) -> list[float]:
    """Process CPU ms per step summed over ranks, from step end to step end (processes mode)."""
    out = []
    for i in range(len(ranks_iters[0])):
        out.append(sum(it[i]["cpu_end"] - it[i - 1]["cpu_end"] if i else float("nan") for it in ranks_iters))
    return out


def run_processes(a, tmp: Path) -> list[dict]:
    order = []
    for r in range(a.rounds):
        order += [1, 2] if r % 2 == 0 else [2, 1]  # ABBA
    runs = []
    for n, ep in enumerate(order):
        t0 = time.time()
        run_dir = tmp / f"run{n}_ep{ep}"
        run_dir.mkdir(parents=True)
        _spawn(a, run_dir, ["--_worker", "processes", f"--ep_size={ep}"], f"ep_size={ep}")
        rows = [json.loads(line) for line in open(run_dir / "out" / "metrics.jsonl")]
        time_ms = {r["iter"]: r["time_ms"] for r in rows if "time_ms" in r}
        ranks = [json.load(open(run_dir / f"rank{r}.json"))["iters"] for r in range(a.ranks)]
        prof = run_dir / "profile_rank0.txt"
        n_it = len(ranks[0])
        runs.append({"ep": ep, "tag": f"ep{ep}", "wall": [time_ms[i] for i in range(n_it)], "cpu": _cpu_steps(ranks),
                     "ranks": ranks, "profile": prof.read_text() if prof.exists() else None})
        med = _med(runs[-1]["wall"][a.warmup:a.warmup + a.iters])
        print(f"run {n + 1}/{len(order)} ep_size={ep}: median step {med:.1f} ms ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    return runs


def run_interleaved(a, tmp: Path) -> list[dict]:
    t0 = time.time()
    run_dir = tmp / "interleaved"
    run_dir.mkdir(parents=True)
    _spawn(a, run_dir, ["--_worker", "interleaved"], "interleaved")
    per_rank = [json.load(open(run_dir / f"rank{r}.json")) for r in range(a.ranks)]
    runs = []
    for ep in (1, 2):
        d = [pr[str(ep)] for pr in per_rank]
        prof = run_dir / f"profile_ep{ep}_rank0.txt"
        runs.append({"ep": ep, "tag": f"ep{ep}", "wall": d[0]["wall"],  # rank 0's clock, as the trainer's time_ms
                     "cpu": [sum(x) for x in zip(*(r["cpu"] for r in d))], "loss": d[0]["loss"],
                     "ranks": [r["iters"] for r in d], "profile": prof.read_text() if prof.exists() else None})
    runs[1]["isolated_a2a_ms"] = per_rank[0]["isolated_a2a_ms"]
    print(f"interleaved: {a.warmup + a.iters} steps per side ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    return runs


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def summarize(a, runs: list[dict], ep_size: int) -> dict:
    """Medians over the timed steps of every run of this ep_size (engine timers: mean over the ranks)."""
    timed = range(a.warmup, a.warmup + a.iters)
    cols = {k: [] for k in ("step", "cpu", "fwd", "bwd", "opt", "other", "coll", "a2a_total", "a2a_fwd", "a2a_bwd",
                            "a2a_counts", "a2a_rows", "a2a_min", "a2a_calls", "a2a_share", "rows_max_over_mean")}
    round_medians = []
    for run in (r for r in runs if r["ep"] == ep_size):
        round_medians.append(_med([run["wall"][i] for i in timed]))
        for i in timed:
            per_rank = [ranks[i] for ranks in run["ranks"]]

            def mean(f):
                return sum(map(f, per_rank)) / len(per_rank)

            def a2a(pred):
                return mean(lambda x: sum(c[2] for c in x["a2a"] if pred(c)))

            step = run["wall"][i]
            c = {"step": step, "cpu": run["cpu"][i], "fwd": mean(lambda x: x["fwd_ms"]),
                 "bwd": mean(lambda x: x["bwd_ms"]), "opt": mean(lambda x: x["step_ms"]),
                 "coll": mean(lambda x: sum(x["coll_ms"].values())), "a2a_total": a2a(lambda _: True),
                 "a2a_fwd": a2a(lambda c: c[0] == "fwd"), "a2a_bwd": a2a(lambda c: c[0] == "bwd"),
                 "a2a_counts": a2a(lambda c: c[1] == "counts"), "a2a_rows": a2a(lambda c: c[1] == "rows"),
                 "a2a_calls": mean(lambda x: len(x["a2a"])),
                 # the same sequence of exchanges on every rank: pair them call by call
                 "a2a_min": sum(min(cl[2] for cl in call) for call in zip(*(x["a2a"] for x in per_rank)))}
            if ep_size > 1:  # rows each rank's experts received: the forward rows exchange right after a counts one
                rows = [sum(x["a2a"][j][3] for j in range(1, len(x["a2a"]))
                            if x["a2a"][j - 1][1] == "counts" and x["a2a"][j][0] == "fwd") for x in per_rank]
                c["rows_max_over_mean"] = max(rows) / max(sum(rows) / len(rows), 1e-9)
            c["other"] = step - c["fwd"] - c["bwd"] - c["opt"]  # per step, so the parts add up
            c["a2a_share"] = c["a2a_total"] / step
            for k, v in c.items():
                cols[k].append(v)
    out = {k: _med(v) for k, v in cols.items()}
    out.update(rounds=round_medians, n=len(cols["step"]))
    return out


def report(a, runs, s1, s2, elapsed: float, load: tuple) -> str:
    from importlib.metadata import version
    import torch
    ratio = s2["step"] / s1["step"]
    cfg = (f"L{a.n_layer} d{a.n_embd} h{a.n_head} T{a.block_size}, E{a.num_experts} k{a.num_experts_per_tok}, "
           f"micro-batch {a.batch_size}, global accum {a.grad_accum}, {a.zero} {a.dtype}")
    verdict = ("met" if ratio <= a.target else f"missed by {ratio - a.target:.2f}x "
               f"({(ratio / a.target - 1) * 100:.0f}% over the target)")
    cmd = "python bench/bench_ep.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    how = ("steps of both engines alternated ABBA in one pair of rank processes" if a.mode == "interleaved" else
           f"nanomoe_ds.trainer.train in fresh processes per run, runs alternated ABBA ({a.rounds} per side)")
    L = [f"## Expert-parallel step time: ep_size=2 vs ep_size=1 ({a.ranks} CPU ranks, gloo, {a.mode})", "",
         "| config | ep1 step ms | ep2 step ms | ratio ep2/ep1 | a2a ms/step (ep2) | a2a share (ep2) |",
         "|---|---:|---:|---:|---:|---:|",
         f"| {cfg} | {s1['step']:.1f} | {s2['step']:.1f} | **{ratio:.2f}x** | {s2['a2a_total']:.1f} | "
         f"{s2['a2a_share'] * 100:.1f}% |", "",
         f"Target ep2/ep1 <= {a.target}x: **{verdict}**. Medians of {s1['n']} timed steps per side after "
         f"{a.warmup} warm-up steps; {how}. ep1 has no exchange (0 all-to-all calls); ep2 makes "
         f"{s2['a2a_calls']:.0f} all-to-all calls per step per rank (a2a = mean of the ranks; share = median of "
         f"per-step a2a / step). Expert work per rank at ep2: the busiest rank's experts receive "
         f"{s2['rows_max_over_mean']:.2f}x the mean (token, expert) rows (median over steps); the other rank waits "
         f"for it in the exchange.", ""]
    if a.mode == "interleaved" and runs[0].get("loss"):
        l1, l2 = runs[0]["loss"], runs[1]["loss"]
        diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(l1, l2))
        L += [f"The same exchanges alone (same sizes, even split, {runs[1]['isolated_a2a_ms']:.1f} ms per step, "
              f"median) are the floor of the a2a cost on this machine; the rest of the measured a2a time is "
              f"waiting for the peer (routing imbalance, OS scheduling).", "",
              f"Both sides train the same model on the same data: largest relative difference of the step "
              f"losses {diff:.1e} "
              f"over {len(l1)} steps (last loss {l1[-1]:.4f} / {l2[-1]:.4f}).", ""]
    L += ["Breakdown, median per step in ms (fwd / bwd / optimizer step = the engine adapter's calls, mean of the "
          "ranks; other = step minus those, per step: data, loss all-reduce, routing tally, Python; medians of parts "
          "do not add up exactly):", "",
          "| part | ep1 | ep2 | ep2 - ep1 |", "|---|---:|---:|---:|"]
    for key, name in (("step", "step, wall (rank 0)"), ("cpu", "step, process CPU time summed over ranks"),
                      ("fwd", "forward"), ("bwd", "backward"), ("opt", "optimizer step"), ("other", "other"),
                      ("a2a_total", "a2a total (inside forward + backward)"),
                      ("a2a_fwd", "&nbsp;&nbsp;a2a in forward"), ("a2a_bwd", "&nbsp;&nbsp;a2a in backward"),
                      ("a2a_counts", "&nbsp;&nbsp;a2a of counts"), ("a2a_rows", "&nbsp;&nbsp;a2a of token rows"),
                      ("a2a_min", "&nbsp;&nbsp;a2a, per call min over ranks (no wait for the peer)"),
                      ("coll", "other collectives (ZeRO grads/params, loss; launch time)")):
        L.append(f"| {name} | {s1[key]:.1f} | {s2[key]:.1f} | {s2[key] - s1[key]:+.1f} |")
    L += [""]
    if a.mode == "processes":
        L += [f"Per-run medians (ms), run order {' '.join(r['tag'] for r in runs)}: "
              f"ep1 {', '.join(f'{x:.1f}' for x in s1['rounds'])}; ep2 {', '.join(f'{x:.1f}' for x in s2['rounds'])}.",
              ""]
    L += [f"- command: `{cmd}`",
          f"- machine: {lscpu_model()}, {os.cpu_count()} logical CPUs, {a.threads} thread(s) per rank "
          f"(OMP_NUM_THREADS); load average {load[0]:.2f} before, {load[1]:.2f} after; {platform.platform()}",
          f"- software: torch {torch.__version__}, deepspeed {version('deepspeed')}, "
          f"Python {platform.python_version()}",
          f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; wall time {elapsed:.0f} s"]
    for ep in (1, 2):
        run = next((r for r in runs if r["ep"] == ep and r["profile"]), None)
        if run is not None:
            L += ["", f"<details><summary>torch.profiler, ep_size={ep}, rank 0</summary>", "",
                  "```", run["profile"].strip(), "```", "</details>"]
    return "\n".join(L) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", default="interleaved", choices=("interleaved", "processes"))
    p.add_argument("--iters", type=int, default=30, help="timed steps per side (per run in processes mode)")
    p.add_argument("--warmup", type=int, default=5, help="steps dropped at the start")
    p.add_argument("--rounds", type=int, default=2, help="processes mode: runs per ep_size, alternated ABBA")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=12, help="micro-batch per rank")
    p.add_argument("--grad_accum", type=int, default=2, help="global micro-batches per step (over all ranks)")
    p.add_argument("--num_experts", type=int, default=8)
    p.add_argument("--num_experts_per_tok", type=int, default=2)
    p.add_argument("--zero", default="zero2", choices=("zero0", "zero1", "zero2"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    p.add_argument("--profile", type=int, default=0, help="profile N extra steps per side after the timed ones")
    p.add_argument("--target", type=float, default=1.3)
    p.add_argument("--timeout", type=float, default=600, help="seconds before a run counts as hung")
    p.add_argument("--md_out", default="", help="also write the markdown report here")
    p.add_argument("--keep", action="store_true", help="keep the run directories (logs, metrics, raw timings)")
    p.add_argument("--_worker", choices=("processes", "interleaved"), help=argparse.SUPPRESS)
    p.add_argument("--ep_size", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result_dir", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    train_argv = []
    if "--" in argv:
        i = argv.index("--")
        argv, train_argv = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    if a._worker == "processes":
        return worker_processes(a, train_argv + [f"--ep_size={a.ep_size}"])
    if a._worker == "interleaved":
        return worker_interleaved(a, train_argv)
    if a.ranks % 2 or a.num_experts % 2 or a.grad_accum % a.ranks:
        p.error("needs an even number of ranks and of experts, and --grad_accum divisible by --ranks")

    _ensure_data()
    t_start, load0 = time.time(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench_ep_"))
    a.ds_json = _ds_json(tmp, a.zero, a.dtype)
    runs = run_interleaved(a, tmp) if a.mode == "interleaved" else run_processes(a, tmp)
    s1, s2 = summarize(a, runs, 1), summarize(a, runs, 2)
    md = report(a, runs, s1, s2, time.time() - t_start, (load0, os.getloadavg()[0]))
    print(md)
    if a.md_out:
        Path(a.md_out).write_text(md)
    if a.keep:
        print(f"run directories: {tmp}", file=sys.stderr)
    else:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
