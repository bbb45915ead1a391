"""How long an elastic restart takes: from a node's kill -9 to the first training step after it.

Two torchrun agents on this machine (loopback), one rank each, `--nnodes=1:2 --max-restarts=3`,
c10d rendezvous, a tiny MoE on ZeRO-2 with ep_size 2, `--init_from=auto`, a checkpoint every
10 iterations. When rank 0 has logged --kill_after iterations, the node that does not host the
rendezvous (its agent and its worker) is killed with SIGKILL. The survivor's timeline, polled
every 20 ms from its log and metrics.jsonl:
  detected   its rank printed the one-line "lost the rank at ..." error;
  resumed    its restarted worker logged the resume record (world size 2 -> 1);
  stepping   the first training step after that record.
For each --rdzv_conf (torchrun's defaults, and the settings tests/dist_utils.py uses), with the
resume record's redone_iters (work lost since the checkpoint). The tests' agent helpers
(tests/dist_utils.py) start and kill the nodes, so this measures what the tests run.

    python bench/bench_elastic.py
    python bench/bench_elastic.py --rdzv_conf "" --rdzv_conf last_call_timeout=5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the tests' torchrun-agent helpers: one way to start and kill a node

from bench import machine_name  # noqa: E402
from dist_utils import FAST_RDZV, free_port, kill_node, loopback_env, records, start_agent  # noqa: E402

DATA = REPO / "data" / "shakespeare_char"


def tiny_run(out_dir: Path, ds_json: Path, data_dir: Path) -> list[str]:
    return ["--deepspeed_config", str(ds_json), "--dataset=shakespeare_char", f"--data_dir={data_dir}",
            f"--out_dir={out_dir}", "--device=cpu", "--compile=False", "--n_layer=2", "--n_head=2", "--n_embd=32",
            "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--max_iters=100000",
            "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--use_moe=True", "--num_experts=4",
            "--num_experts_per_tok=2", "--ep_size=2", "--init_from=auto", "--dist_timeout=30"]


def wait_until(condition, timeout: float, step: float = 0.02) -> float:
    """The time at which `condition()` first held (polling), or raise after `timeout` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return time.time()
        time.sleep(step)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {condition.__doc__}")


def one_restart(rdzv_conf: str, kill_after: int, work: Path, ds_json: Path, data_dir: Path) -> dict:
    out = work / "run"
    endpoint = f"127.0.0.1:{free_port()}"
    args = tiny_run(out, ds_json, data_dir)
    env = loopback_env(NODE_ADDR="127.0.0.1")
    host = start_agent([], env, endpoint, args, work / "host.log", hosts_store=True, rdzv_conf=rdzv_conf)
    other = start_agent([], env, endpoint, args, work / "other.log", hosts_store=False, rdzv_conf=rdzv_conf)
    try:
        def trained():
            """iteration --kill_after at world size 2"""
            return (out / "metrics.jsonl").exists() and any(r.get("iter", 0) >= kill_after for r in records(out))
        wait_until(trained, 300)
        killed = time.time()
        kill_node(other)

        def detected():
            """the survivor's one-line error"""
            return "error: rank 0: lost the rank at" in (work / "host.log").read_text()

        def resumed():
            """the resume record"""
            return any(r.get("event") == "resume" for r in records(out))

        def stepping():
            """a training step after the resume record"""
            recs = records(out)
            at = max((i for i, r in enumerate(recs) if r.get("event") == "resume"), default=None)
            return at is not None and any("loss" in r for r in recs[at + 1:])
        times = [wait_until(c, 300) - killed for c in (detected, resumed, stepping)]
        event = [r for r in records(out) if r.get("event") == "resume"][-1]
    finally:
        for agent in (host, other):
            if agent.poll() is None:
                kill_node(agent)
    return {"rdzv_conf": rdzv_conf or "(torchrun's defaults)", "detected_s": times[0], "resumed_s": times[1],
            "stepping_s": times[2], "redone_iters": event["redone_iters"], "lost_s": event["lost_s"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rdzv_conf", action="append", help="torchrun --rdzv-conf (repeat; default: '' and the tests')")
    ap.add_argument("--kill_after", type=int, default=25, help="iteration after which the node is killed")
    a = ap.parse_args()
    confs = a.rdzv_conf if a.rdzv_conf is not None else ["", FAST_RDZV]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_elastic_") as tmp:
        cfg = json.load(open(REPO / "ds_configs" / "zero2.json"))
        cfg["bf16"] = {"enabled": False}
        ds_json = Path(tmp) / "zero2_fp32.json"
        ds_json.write_text(json.dumps(cfg))
        if not (DATA / "train.bin").exists():
            raise SystemExit(f"prepare the data first: python data/shakespeare_char/prepare.py (expects {DATA})")
        for i, conf in enumerate(confs):
            work = Path(tmp) / f"run{i}"
            work.mkdir()
            rows.append(one_restart(conf, a.kill_after, work, ds_json, DATA))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| rendezvous settings | detected | resumed | first step | iterations redone |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['rdzv_conf']}` | {r['detected_s']:.1f} s | {r['resumed_s']:.1f} s | {r['stepping_s']:.1f} s | "
              f"{r['redone_iters']} |")
    print(f"\nmachine: {machine_name('cpu')}; {datetime.date.today()}; command: python bench/bench_elastic.py "
          + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    os.chdir(REPO)
    main()
