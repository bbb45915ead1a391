"""What an export to transformers costs (launch/export.py --format=hf, issue 26): memory added, bytes, wall time.

Builds bench_ckpt.py's model (GPT(model_cfg) seeded: 4 layers, n_embd 768, 8 experts top-2,
167M parameters), writes its weights as a single-device checkpoint (the sharded format, one
shard, records of checkpoint.RECORD_BYTES), and exports it in this process, one thread:
  hf          hf_export.export_hf with the default --max_shard_size (5GB: one file);
  hf-sharded  the same with --max_shard_size (default 200MB: several files and the index);
  pt          launch/export.py's .pt export, --weights_only (whole tensors in one file), for contrast.
Each is measured around its call with bench_ckpt.PeakRSS: the peak resident set (the kernel's
VmHWM, reset just before) minus the resident set just before. Beside them: the model's weights
in bytes and its largest tensor; issue 26's bound is about one tensor plus one output shard.

    python bench/bench_export.py                       # the 167M-parameter model
    python bench/bench_export.py --tiny                # a smoke test, seconds
    python bench/bench_export.py --n_embd=1024         # --key=value: model overrides
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench_ckpt import MODEL, REPO, TINY, PeakRSS, tree_bytes  # noqa: E402  (pins nanomoe_ds to this tree)
from ranks import lscpu_model  # noqa: E402

MIB = 2 ** 20


def save_weights(model, out_dir: Path):
    """The single-device trainer's checkpoint of `model`'s weights (no AdamW state: an export reads none)."""
    from nanomoe_ds import checkpoint, train_state
    from nanomoe_ds.checkpoint_dir import save
    from nanomoe_ds.config import TrainConfig
    named = [*model.named_parameters(), *train_state.state_buffers(model)]
    tensors = {checkpoint.tensor_key("model", n): v.detach() for n, v in named}
    meta = {**train_state.TrainState(iter_num=1).record(model.config, TrainConfig(out_dir=str(out_dir))),
            "optimizer_step": 0, "topology": train_state.topology("local", 1, 1, None, "float32"), "loss_scale": None,
            "tensors": {k: list(v.shape) for k, v in tensors.items()}}
    save(str(out_dir), meta, [(k, 0, v.reshape(-1)) for k, v in tensors.items()], rank=0, keep_last=1)


def measure(name: str, fn, dest: Path) -> dict:
    start = time.perf_counter()
    with PeakRSS() as peak:
        fn()
    seconds = time.perf_counter() - start
    return {"name": name, "s": seconds, **peak.result(), **tree_bytes(dest)} if dest.is_dir() else \
        {"name": name, "s": seconds, **peak.result(), "bytes_written": dest.stat().st_size}


def run(overrides: list[str], shard_bytes: int, base: Path) -> tuple[list[dict], dict]:
    import torch
    from nanomoe_ds import hf_export
    from nanomoe_ds.checkpoint_dir import open_checkpoint
    from nanomoe_ds.config import from_argv
    from nanomoe_ds.model import GPT
    torch.set_num_threads(1)
    model_cfg, _ = from_argv(overrides)
    torch.manual_seed(0)
    save_weights(GPT(model_cfg), base / "run")
    ckpt = open_checkpoint(str(base / "run"))
    shapes = [torch.Size(s).numel() * 4 for s in ckpt.meta["tensors"].values()]
    model = {"params": sum(shapes) // 4, "weights_mib": sum(shapes) / MIB, "largest_mib": max(shapes) / MIB}
    spec = importlib.util.spec_from_file_location("export_script", REPO / "launch/export.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [measure("hf", lambda: hf_export.export_hf(ckpt, str(base / "hf"), None), base / "hf"),
            measure("hf-sharded", lambda: hf_export.export_hf(ckpt, str(base / "hf2"), None,
                                                              max_shard_bytes=shard_bytes), base / "hf2"),
            measure("pt", lambda: script.export(str(base / "run"), str(base / "model.pt"), weights_only=True),
                    base / "model.pt")]
    return rows, model


def report(cmd: str, rows: list[dict], model: dict, shard_bytes: int) -> str:
    lines = [f"model: {model['params'] / 1e6:.1f}M parameters, weights {model['weights_mib']:.0f} MiB (fp32), "
             f"largest tensor {model['largest_mib']:.1f} MiB; hf-sharded: --max_shard_size={shard_bytes / 1e6:g}MB",
             "", "| export | added peak, MiB | x largest tensor | x weights | files | bytes written, MiB | wall s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        files = len(r.get("bytes_by_entry", {"": 0}))
        lines.append(f"| {r['name']} | {r['added_peak_mib']:.0f} | {r['added_peak_mib'] / model['largest_mib']:.2f} | "
                     f"{r['added_peak_mib'] / model['weights_mib']:.2f} | {files} | {r['bytes_written'] / MIB:.0f} | "
                     f"{r['s']:.2f} |")
    lines += ["", f"- command: `{cmd}`", f"- machine: {lscpu_model()}, {os.cpu_count()} logical CPUs, one thread; "
              f"{platform.platform()}",
              f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
              "- added peak: VmHWM during the call minus the resident set before it (bench_ckpt.PeakRSS)"]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="bench_ckpt.py's tiny model: a smoke test")
    ap.add_argument("--shard_mb", type=float, default=200, help="hf-sharded's --max_shard_size, in MB")
    a, overrides = ap.parse_known_args()
    cmd = " ".join(["python bench/bench_export.py"] + [shlex.quote(x) for x in sys.argv[1:]])
    shard_bytes = int(a.shard_mb * 10**6)
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        rows, model = run([*(TINY if a.tiny else MODEL), *overrides], shard_bytes, Path(tmp))
    print(report(cmd, rows, model, shard_bytes))


if __name__ == "__main__":
    main()
