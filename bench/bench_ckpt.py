"""What a checkpoint costs under DeepSpeed: memory added per rank, bytes written, wall time (issue 17).

For each world size W in --worlds the driver runs two sets of W fresh rank processes on gloo
over loopback (the variables DeepSpeed's launcher sets: RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT, GLOO_SOCKET_IFNAME=lo), one thread each:
  save  W ranks build the model and engine as the trainer does (GPT(model_cfg) seeded, then
        ds_engine.make_engine_factory on the shipped ds_configs/zero2.json with
        bf16 off: fp32, ZeRO-2, ep_size 2), take one training step (trainer.train_step over a
        fixed micro-batch, bench_step.one_step) so AdamW's moments exist, then time
        trainer.save(engine, t, TrainState(iter_num=1, ...)) into a fresh out_dir;
  load  the ranks of another world size (--load_worlds; default the next entry of --worlds,
        so 2 -> 4 and 4 -> 2) build the same model and engine, take no step, and restore that
        checkpoint: engine.load(checkpoint_dir.open_checkpoint(out_dir)) where the library has it, else (the code
        before issue 17) checkpoint.load(out_dir) and engine.load(out_dir, ckpt), both timed.
        The restored iter_num must be 1. With no step before it, the load itself creates
        this rank's AdamW moments (8 of the share's 12 bytes per parameter): counted in its
        memory. The checkpoint was just written, so it is read from the page cache (warm).
Measured on each rank around the operation, between two barriers:
  added peak   the peak resident set during the operation minus the resident set just before
               it (after gc and malloc_trim, so freed heap from the step is not reused
               unseen). The peak is the kernel's VmHWM, reset just before through
               /proc/self/clear_refs; a thread also samples /proc/self/statm every 2 ms (its
               peak is kept as a cross-check, and split into anonymous memory and file pages:
               an mmap'd checkpoint's pages count as resident while they are mapped and read);
  wall         from the first barrier to the end of the operation on that rank; the table
               gives the maximum over ranks;
  bytes        (save) the size of every file under the fresh out_dir afterwards.
Next to them: the training state, 12 bytes per parameter (fp32 weights and AdamW's two
moments), and one rank's share of it (the state / W: ZeRO-2 partitions the dense parameters
over all ranks and each expert over its expert-data-parallel group, W / ep_size ranks, each
of which holds 1 / ep_size of the experts; `--zero 3` runs a dense model under ZeRO-3, which
partitions the weights themselves too). Issue 17's targets: added peak <= 1.25x the share
(plus a small constant), bytes <= 1.1x the state, a save at 4 ranks <= 0.65x the time at 2.

The library is imported from this repository, or from $NANOMOE_SRC if set (the ranks inherit
it), so the same script measures another tree (e.g. a worktree of the commit before); the bench
helpers (bench_step, bench_engine) and ds_configs/ always come from this repository:

    python bench/bench_ckpt.py                        # 4 layers, n_embd 768, 8 experts (167M params); 2 and 4 ranks
    NANOMOE_SRC=/path/to/old/tree python bench/bench_ckpt.py --worlds 2,4
    python bench/bench_ckpt.py --tiny --worlds 2      # ~1M params, a smoke test (load at 2 ranks: same topology)
    python bench/bench_ckpt.py --worlds 2 --load_worlds 4 --vocab_size=50304   # --key=value: model/train overrides
    python bench/bench_ckpt.py --zero 3 --ep_size 1 --use_moe=False          # a dense model under ZeRO-3
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SRC = Path(os.environ.get("NANOMOE_SRC") or REPO).resolve()
sys.path.insert(0, str(SRC))
import nanomoe_ds  # noqa: E402  a namespace package (no __init__.py): its __path__ follows sys.path, which the
nanomoe_ds.__path__ = [str(SRC / "nanomoe_ds")]  # bench helpers change (the repo first): pin it to SRC
from ranks import free_port, lscpu_model, rank_env, wait_all  # noqa: E402  (the script's own directory is on sys.path)

MARKER = "BENCH_CKPT_RESULT "
TAG = "bench_ckpt"

# The model of issue 17's "Measure it": 4 layers, n_embd 768, 8 experts top-2 as wide as GPT-2's MLP.
MODEL = ["--n_layer=4", "--n_head=12", "--n_embd=768", "--block_size=64", "--vocab_size=8192", "--use_moe=True",
         "--num_experts=8", "--num_experts_per_tok=2"]
TINY = ["--n_layer=2", "--n_head=4", "--n_embd=96", "--block_size=32", "--vocab_size=512", "--use_moe=True",
        "--num_experts=8", "--num_experts_per_tok=2"]


# ---------------------------------------------------------------- worker (one rank)
class PeakRSS:
    """Peak resident memory of this process during a `with` block, above what it was just before."""

    page = os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        gc.collect()
        try:  # give freed heap back, so the operation's allocations show up as new pages
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.before_rss, self.before_anon = self._statm()
        self.peak_rss, self.peak_anon = self.before_rss, self.before_anon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _statm(self) -> tuple[int, int]:
        with open("/proc/self/statm") as f:
            _, resident, shared = (int(v) for v in f.read().split()[:3])
        return resident * self.page, (resident - shared) * self.page

    def _sample(self):
        while not self._stop.is_set():
            rss, anon = self._statm()
            self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        rss, anon = self._statm()
        self.peak_rss, self.peak_anon = max(self.peak_rss, rss), max(self.peak_anon, anon)
        self.hwm = None
        if self.hwm_reset:
            with open("/proc/self/status") as f:
                self.hwm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

    def result(self) -> dict:
        mib = 2 ** 20
        peak = self.hwm if self.hwm is not None else self.peak_rss
        return {"rss_before_mib": self.before_rss / mib, "added_peak_mib": (peak - self.before_rss) / mib,
                "added_peak_source": "VmHWM" if self.hwm is not None else "statm samples",
                "sampled_added_rss_mib": (self.peak_rss - self.before_rss) / mib,
                "sampled_added_anon_mib": (self.peak_anon - self.before_anon) / mib}


def tree_bytes(path: Path) -> dict:
    """Bytes of every file under `path`, in total and per top-level entry."""
    parts = {}
    for p in path.rglob("*"):
        if p.is_file():
            top = p.relative_to(path).parts[0]
            parts[top] = parts.get(top, 0) + p.stat().st_size
    return {"bytes_written": sum(parts.values()), "bytes_by_entry": parts}


def worker(args, overrides: list[str]):
    import torch
    import torch.distributed as dist
    sys.path.insert(0, str(HERE))  # bench helpers; nanomoe_ds is already imported from SRC
    from bench_engine import ds_json
    from bench_step import SEED_LINE, FixedBatches, one_step
    from nanomoe_ds import trainer
    from nanomoe_ds.config import from_argv
    from nanomoe_ds.ds_engine import make_engine_factory, shutdown
    from nanomoe_ds.model import GPT

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    rank_tmp = os.path.join(args.tmp, f"{args.phase}_w{world}_rank{os.environ['RANK']}")  # its own JSON copy
    os.makedirs(rank_tmp, exist_ok=True)
    code = 0
    try:
        argv = SEED_LINE + (TINY if args.tiny else MODEL) + [
            "--dtype=float32", "--batch_size=1", f"--gradient_accumulation_steps={world}", f"--ep_size={args.ep_size}",
            f"--deepspeed_config={ds_json(f'zero{args.zero}', 'fp32', None, rank_tmp)}", f"--out_dir={args.out_dir}"
        ] + overrides
        model_cfg, train_cfg = from_argv(argv)
        factory = make_engine_factory(model_cfg, train_cfg)
        torch.manual_seed(train_cfg.seed)  # as start.build_model (which would also take the data's vocab)
        model = GPT(model_cfg)
        params = sum(p.numel() for p in model.parameters())  # the whole model: the engine keeps local experts only
        expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
        engine = factory(model, train_cfg)
        del model
        rank = engine.rank
        stepped = False
        if args.phase == "save":
            cfg = engine.module.config
            x = torch.randint(0, cfg.vocab_size, (train_cfg.batch_size, cfg.block_size),
                              generator=torch.Generator().manual_seed(0)).to(engine.device)
            one_step(engine, FixedBatches(x), lr=1e-4)
            stepped = True
        from nanomoe_ds import checkpoint
        try:  # the sharded format's reader: checkpoint_dir.py since issue 25's split, checkpoint.py from issue 17
            from nanomoe_ds.checkpoint_dir import open_checkpoint
        except ImportError:
            open_checkpoint = getattr(checkpoint, "open_checkpoint", None)
        sharded = open_checkpoint is not None
        api = "engine.load(open_checkpoint)" if sharded else "checkpoint.load + engine.load"
        dist.barrier()
        t0 = time.perf_counter()
        with PeakRSS() as mem:
            if args.phase == "save":
                trainer.save(engine, train_cfg, trainer.TrainState(1, 9.99, 1.0))
                state = None
            elif sharded:
                state = engine.load(open_checkpoint(args.out_dir))
            else:  # the code before issue 17: ckpt.pt, read by the trainer, then the engine's load
                ckpt = checkpoint.load(args.out_dir)
                state = engine.load(args.out_dir, ckpt)
        op_s = time.perf_counter() - t0
        dist.barrier()
        if state is not None:
            assert int(state["iter_num"]) == 1, f"restored iter_num {state['iter_num']}, expected 1"
        out = {"rank": rank, "world": world, "phase": args.phase, "op_s": op_s,
               "op_barrier_s": time.perf_counter() - t0, "params": params, "expert_params": expert,
               "state_bytes": 12 * params, "share_bytes": 12 * params / world, "stepped_before": stepped,
               "api": "trainer.save" if args.phase == "save" else api, "nanomoe_ds": os.path.dirname(trainer.__file__),
               "torch": torch.__version__, "zero_stage": int(engine.engine.zero_optimization_stage()),
               **mem.result()}
        if args.phase == "save" and rank == 0:
            out.update(tree_bytes(Path(args.out_dir)))
        print(MARKER + json.dumps(out), flush=True)
    except BaseException:
        import traceback
        traceback.print_exc()
        code = 1
    shutdown(code)


# ---------------------------------------------------------------- driver
def run_ranks(world: int, phase: str, out_dir: Path, run_dir: Path, a, overrides: list[str]) -> list[dict]:
    """`world` rank processes of this script in worker mode; their result lines."""
    port = free_port()
    procs = []
    for r in range(world):
        env = rank_env(r, world, port, NANOMOE_SRC=SRC)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--out_dir", str(out_dir),
               "--tmp", str(run_dir), "--ep_size", str(a.ep_size), "--zero", str(a.zero)] + (["--tiny"] if a.tiny else [])
        cmd += overrides
        log = run_dir / f"{phase}_w{world}_rank{r}.log"
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT), log))
    label = f"{phase} at {world} ranks"
    wait_all([p for p, _ in procs], a.timeout, label, run_dir)
    results, notes = [], []
    for r, (p, log) in enumerate(procs):
        text = log.read_text()
        if p.returncode != 0:
            raise SystemExit(f"{label}: rank {r} exited with {p.returncode}; log tail:\n{text[-4000:]}")
        results += [json.loads(l[len(MARKER):]) for l in text.splitlines() if l.startswith(MARKER)]
        notes += [l.strip() for l in text.splitlines() if l.startswith("resuming")]
    if len(results) != world:
        raise SystemExit(f"{label}: {len(results)} result lines from {world} ranks; logs in {run_dir}")
    results.sort(key=lambda x: x["rank"])
    results[0]["notes"] = notes
    return results


def git_commit(path: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def row(op: str, res: list[dict]) -> str:
    mib, gib = 2 ** 20, 2 ** 30
    added = max(x["added_peak_mib"] for x in res)
    share = res[0]["share_bytes"] / mib
    written = res[0].get("bytes_written")
    state = res[0]["state_bytes"]
    wrote = "-" if written is None else f"{written / gib:.2f} ({written / state:.2f}x)"
    each = ", ".join(f"{x['added_peak_mib']:.0f}" for x in res)
    return (f"| {res[0]['world']} | {op} | {added:.0f} ({each}) | "
            f"{share:.0f} | {added / share:.2f}x | "
            f"{wrote} | "
            f"{res[0]['state_bytes'] / gib:.2f} | {max(x['op_s'] for x in res):.2f} |")


def report(a, cmd: str, runs: list[tuple[str, list[dict]]], elapsed: float) -> str:
    first = runs[0][1][0]
    from importlib.metadata import version
    L = [f"## Checkpoint cost: save, and load at another world size (fp32, ZeRO-{a.zero}, ep_size {a.ep_size}, CPU ranks, "
         "gloo)",
         "",
         f"Model: {'--tiny ' if a.tiny else ''}{' '.join((TINY if a.tiny else MODEL) + a.overrides)}: "
         f"{first['params'] / 1e6:.1f}M parameters ({first['expert_params'] / 1e6:.1f}M in experts); state "
         f"(12 bytes/param: fp32 weights + AdamW's two moments) {first['state_bytes'] / 2 ** 20:.0f} MiB.", "",
         "| world | op | added peak RSS per rank, MiB: max (each rank) | share MiB | max / share | bytes written GiB "
         "(x state) | state GiB | wall s (max over ranks) |",
         "|---:|---|---|---:|---:|---:|---:|---:|"]
    L += [row(op, res) for op, res in runs]
    L += ["", "Cross-check, the 2 ms statm samples (max over ranks): added RSS / added anonymous memory, MiB: " +
          "; ".join(f"{op} at {res[0]['world']}: {max(x['sampled_added_rss_mib'] for x in res):.0f} / "
                    f"{max(x['sampled_added_anon_mib'] for x in res):.0f}" for op, res in runs) + ".",
          "Resident before each op (rank 0), MiB: " +
          "; ".join(f"{op} at {res[0]['world']}: {res[0]['rss_before_mib']:.0f}" for op, res in runs) + "."]
    saves = [res for op, res in runs if op == "save"]
    for res in saves:
        L.append(f"Files written by the save at {res[0]['world']} ranks (bytes by top-level entry of out_dir): "
                 + ", ".join(f"{k} {v / 2 ** 20:.0f} MiB" for k, v in sorted(res[0]["bytes_by_entry"].items())) + ".")
    by_world = {res[0]["world"]: max(x["op_s"] for x in res) for res in saves}
    if 2 in by_world and 4 in by_world:
        L.append(f"Save wall time at 4 ranks / at 2 ranks: {by_world[4] / by_world[2]:.2f}x (target <= 0.65x).")
    for op, res in runs:
        if op != "save":
            how = "; ".join(res[0]["notes"]) or "no line printed"
            L.append(f"{op}: {res[0]['api']}, {'after one training step' if res[0]['stepped_before'] else 'no training step before it'}; "
                     f"the library said: {how}")
    L += ["", f"- command: `{cmd}`",
          f"- code measured: nanomoe_ds from `{first['nanomoe_ds']}`, commit {git_commit(SRC)} "
          f"(script from commit {git_commit(REPO)})",
          f"- machine: {lscpu_model()}, {os.cpu_count()} logical CPUs, one thread per rank; {platform.platform()}",
          f"- software: torch {first['torch']}, deepspeed {version('deepspeed')}, Python {platform.python_version()}",
          f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; total {elapsed:.0f} s"]
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="2,4", help="world sizes to save at (comma list)")
    ap.add_argument("--load_worlds", default="",
                    help="world size to load each save at (comma list, same length; default: the next entry of "
                         "--worlds, cyclically, or the same world if there is one)")
    ap.add_argument("--ep_size", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2, choices=(1, 2, 3),
                    help="the shipped ds_configs/zero<N>.json (bf16 off); ZeRO-3 needs --use_moe=False")
    ap.add_argument("--tiny", action="store_true", help="a ~1M-parameter model: a smoke test, well under a minute")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for each set of ranks")
    ap.add_argument("--keep", default="", help="keep the checkpoints and rank logs in this directory")
    ap.add_argument("--json", default="", help="also write every rank's measurements to this file (for tests)")
    ap.add_argument("--phase", choices=("save", "load"), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--out_dir", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a, overrides = ap.parse_known_args()
    a.overrides = overrides
    if a.phase:
        worker(a, overrides)
        return
    worlds = [int(w) for w in a.worlds.split(",")]
    loads = ([int(w) for w in a.load_worlds.split(",")] if a.load_worlds else worlds[1:] + worlds[:1])
    if len(loads) != len(worlds):
        ap.error("--load_worlds needs one entry per --worlds entry")
    cmd = " ".join(["python bench/bench_ckpt.py"] + [shlex.quote(x) for x in sys.argv[1:]])
    if os.environ.get("NANOMOE_SRC"):
        cmd = f"NANOMOE_SRC={shlex.quote(os.environ['NANOMOE_SRC'])} {cmd}"
    start = time.time()
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        base = Path(a.keep or tmp)
        base.mkdir(parents=True, exist_ok=True)
        for w, lw in zip(worlds, loads):
            out_dir = base / f"ckpt_saved_at_{w}"
            if out_dir.exists():
                raise SystemExit(f"{out_dir} exists: a save must go to a fresh out_dir")
            out_dir.mkdir()
            res = run_ranks(w, "save", out_dir, base, a, overrides)
            runs.append(("save", res))
            print(f"save at {w}: {max(x['op_s'] for x in res):.1f} s, added peak "
                  f"{max(x['added_peak_mib'] for x in res):.0f} MiB", flush=True)
            res = run_ranks(lw, "load", out_dir, base, a, overrides)
            runs.append((f"load {w}->{lw}", res))
            print(f"load {w}->{lw}: {max(x['op_s'] for x in res):.1f} s, added peak "
                  f"{max(x['added_peak_mib'] for x in res):.0f} MiB", flush=True)
            if not a.keep:
                import shutil
                shutil.rmtree(out_dir)
    if a.json:
        Path(a.json).write_text(json.dumps(runs))
    print()
    print(report(a, cmd, runs, time.time() - start))


if __name__ == "__main__":
    main()
