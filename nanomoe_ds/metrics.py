"""What the run reports: MFU against this device's peak, routing statistics over all ranks, and the log sinks.

metrics.jsonl in out_dir is the source of truth; wandb and TensorBoard get the
same numbers (scalars only). Everything here runs on rank 0 except the routing
tally, whose `reduce` is a collective every rank calls.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from typing import Protocol

import torch

from .config import ConfigError, TrainConfig
from .moe import routing_stats

# ---------------------------------------------------------------- MFU
# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, per GPU: (bf16, fp16, tf32, fp32).
# None: the card has no such unit. fp32 is the plain CUDA-core rate; tf32 applies to fp32
# matmuls only when torch allows it (torch.set_float32_matmul_precision("high")).
# Sources: NVIDIA datasheets (the "with sparsity" figures halved): A100 (2021), H100 SXM/PCIe/NVL
# (2023), H200 SXM/NVL (2024), L4, L40S, A10, V100 (SXM2, PCIe), T4. The A10G (AWS G5) has no
# NVIDIA datasheet; its figures are the ones AWS-oriented guides commonly quote, so treat
# them as approximate and pass peak_tflops= when it matters.
# The first pattern that matches the device name (torch.cuda.get_device_name) wins.
PEAK_TFLOPS: list[tuple[str, tuple[float | None, float | None, float | None, float | None]]] = [
    (r"H200 NVL", (835.5, 835.5, 417.5, 60.0)),
    (r"H200", (989.5, 989.5, 494.5, 67.0)),
    (r"H100 NVL", (835.5, 835.5, 417.5, 60.0)),
    (r"H100 PCIe", (756.5, 756.5, 378.0, 51.0)),
    (r"H100", (989.5, 989.5, 494.5, 67.0)),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    (r"A100", (312.0, 312.0, 156.0, 19.5)),
    (r"A10G", (70.0, 70.0, 35.0, 31.2)),
    (r"\bA10\b", (125.0, 125.0, 62.5, 31.2)),
    (r"L40S", (366.0, 366.0, 183.0, 91.6)),
    (r"\bL4\b", (121.0, 121.0, 60.0, 30.3)),
    (r"V100-PCIE", (None, 112.0, None, 14.0)),
    (r"V100", (None, 125.0, None, 15.7)),  # SXM2
    (r"\bT4\b", (None, 65.0, None, 8.1)),
]
_COLUMN = {"bfloat16": 0, "float16": 1, "tf32": 2, "float32": 3}


def peak_flops(device_name: str, dtype: str, tf32: bool = False, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device in `dtype` ("bfloat16", "float16", "float32"); None when unknown.

    `override_tflops` > 0 (the peak_tflops key) wins over the table. With `tf32`, fp32 matmuls
    run on tensor cores where the card has them.
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    column = _COLUMN["tf32" if dtype == "float32" and tf32 else dtype]
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            peak = peaks[column]
            if peak is None and column == _COLUMN["tf32"]:  # no TF32 units (V100, T4): fp32 matmuls stay fp32
                peak = peaks[_COLUMN["float32"]]
            return None if peak is None else peak * 1e12
    return None


def device_name(device: str) -> str:
    """What the peak table is matched against: the GPU's marketing name, or the device kind."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return str(device).split(":")[0]


def device_peak_flops(device: str, compute_dtype: torch.dtype, override_tflops: float) -> float | None:
    """peak_flops for this process's device and dtype, asking torch whether fp32 matmuls use TF32."""
    tf32 = torch.get_float32_matmul_precision() != "highest"
    return peak_flops(device_name(device), str(compute_dtype).removeprefix("torch."), tf32, override_tflops)


def mfu(flops_per_token: float, tokens_per_sec_per_rank: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation of one rank: achieved model FLOP/s over the device's peak; None if unknown."""
    if peak is None:
        return None
    return flops_per_token * tokens_per_sec_per_rank / peak


# ---------------------------------------------------------------- routing statistics
class RoutingTally:
    """Per-layer routing of one training step, summed over its micro-batches and then over all ranks.

    Each rank routes its own micro-batches over all E experts (the tokens are permuted
    by global expert id before any exchange), so the sum over ranks is the routing of
    the global batch: the same numbers a single device reports for the same step.
    """

    def __init__(self, layers: list):
        self.layers = layers  # read in `reduce` only, for each router's score_bias (bias_spread)
        # per layer: [counts (E) | dropped, assignments, aux_loss sum, z_loss sum]
        self.sums = None

    def add(self, routings: list):
        """After a training micro-batch's forward: add its per-layer Routing records (the forward's
        ForwardReport.routings, in layer order; no host sync)."""
        rows = []
        for routing in routings:
            counts = routing.kept
            extra = torch.tensor([float(routing.dropped), float(routing.assignments)], dtype=torch.float64,
                                 device=counts.device)
            aux = torch.stack([routing.aux_loss.detach().double(), routing.z_loss.detach().double()])
            rows.append(torch.cat([counts.double(), extra, aux]))
        step = torch.stack(rows)
        self.sums = step if self.sums is None else self.sums + step

    def reduce(self, all_reduce, total_micro: int, bias_balancing: bool) -> list[dict]:
        """Sum over ranks (every rank must call this) and derive each layer's statistics; resets the tally."""
        sums = all_reduce(self.sums).cpu()
        self.sums = None
        out = []
        for layer, row in zip(self.layers, sums):
            E = row.numel() - 4
            s = routing_stats(row[:E].round().long(), float(row[E]), float(row[E + 1]))
            stats = {"tokens_per_expert": s["tokens_per_expert"].tolist(), "load_cv": float(s["load_cv"]),
                     "load_max_over_mean": float(s["load_max_over_mean"]),
                     "dead_experts": int(s["dead_experts"]), "drop_frac": float(s["drop_frac"])}
            stats.update(aux_loss=float(row[E + 2]) / total_micro, z_loss=float(row[E + 3]) / total_micro)
            if bias_balancing:  # the selection bias is the same on every rank (updated from the reduced load)
                bias = layer.router.score_bias
                stats["bias_spread"] = float(bias.max() - bias.min())
            out.append(stats)
        return out


# ---------------------------------------------------------------- sinks
def scalars(record: dict) -> dict:
    """The record's numbers, MoE layers flattened to moe/layer<i>/<name> (expert lists left out)."""
    out = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for i, layer in enumerate(record.get("moe", [])):
        out.update({f"moe/layer{i}/{k}": v for k, v in layer.items() if isinstance(v, (int, float))})
    return out


class Sink(Protocol):
    """Somewhere records go. `close` must flush: the DeepSpeed path ends the process with os._exit."""

    def log(self, record: dict) -> None: ...

    def close(self, failed: bool) -> None: ...


class JsonlSink:
    def __init__(self, out_dir: str):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "metrics.jsonl")
        # A previous run's last line cut by a full disk: end it, so this run's first record is a line of its own.
        self.cut = _ends_mid_line(self.path)

    def log(self, record: dict):
        data = (("\n" if self.cut else "") + json.dumps(record) + "\n").encode()
        with open(self.path, "ab", buffering=0) as f:  # open per record: the file is complete whenever the run stops
            start = f.seek(0, os.SEEK_END)
            try:
                written = 0
                while written < len(data):  # a raw write may take part of the line before the disk fills
                    written += f.write(data[written:])
            except OSError:
                f.truncate(start)  # a full disk took part of the line: give it back, so the file stays whole
                raise
        self.cut = False

    def close(self, failed: bool):
        pass


def _ends_mid_line(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:  # no file yet
        return False


def records(lines) -> list[dict]:
    """The records of metrics.jsonl's lines, without a line cut by a kill or a full disk."""
    found = []
    for line in lines:
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


class WandbSink:
    def __init__(self, train_cfg: TrainConfig, config: dict):
        import wandb
        self.wandb = wandb
        self.run = wandb.init(project=train_cfg.wandb_project, name=train_cfg.wandb_run_name, config=config,
                              dir=train_cfg.out_dir)

    def log(self, record: dict):
        self.run.log(scalars(record), step=record["iter"])

    def close(self, failed: bool):
        self.run.finish(exit_code=1 if failed else 0)
        # finish() can return before wandb's service process has written the run file; teardown
        # waits for it. wandb registers teardown with atexit, which os._exit (DeepSpeed path) skips.
        self.wandb.teardown()


class TensorBoardSink:
    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, record: dict):
        for key, value in scalars(record).items():
            if key != "iter":
                self.writer.add_scalar(key, value, global_step=record["iter"])

    def close(self, failed: bool):
        self.writer.close()


def check_sinks(train_cfg: TrainConfig):
    """Refuse, before any compute, a sink whose package is missing."""
    if train_cfg.wandb_log and importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb_log=True but wandb is not installed; pip install -e .[wandb] (or wandb_log=False)")
    if train_cfg.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard_dir is set but tensorboard is not installed; pip install -e .[tensorboard]")


def make_sinks(train_cfg: TrainConfig, config: dict) -> list[Sink]:
    """Where records go. An eval_only run is a reader: it holds no lock and writes nothing into out_dir,
    whose metrics.jsonl belongs to the run (its eval lines go to stdout and the other sinks)."""
    sinks: list[Sink] = [] if train_cfg.eval_only else [JsonlSink(train_cfg.out_dir)]
    if train_cfg.wandb_log:
        sinks.append(WandbSink(train_cfg, config))
    if train_cfg.tensorboard_dir:
        sinks.append(TensorBoardSink(train_cfg.tensorboard_dir))
    return sinks


class MetricsLog:
    """A human line on stdout (through the progress bar, if any) and the record to every sink.

    Ranks other than 0 get one with no sinks and echo=False: they call it like rank 0 does.
    """

    def __init__(self, sinks: list[Sink], bar=None, echo: bool = True):
        self.sinks, self.bar, self.echo = sinks, bar, echo

    def __call__(self, record: dict, line: str | None = None):
        if line:
            self.print(line)
        for sink in self.sinks:
            sink.log(record)

    def event(self, record: dict, line: str | None = None):
        """Something that happened to the run, not a measurement (a restart): metrics.jsonl only."""
        if line:
            self.print(line)
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                sink.log(record)

    def print(self, line: str):
        if not self.echo:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def advance(self, postfix: dict):
        """One iteration done: move the bar, if there is one."""
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self, failed: bool = False):
        if self.bar is not None:
            self.bar.close()
        for sink in self.sinks:
            sink.close(failed)


def progress_bar(train_cfg: TrainConfig, start: int):
    """A tqdm bar over the run's iterations, or None: only where asked for and stdout is a terminal."""
    if not (train_cfg.progress and sys.stdout.isatty()) or train_cfg.eval_only:
        return None
    from tqdm import tqdm
    return tqdm(total=train_cfg.max_iters + 1, initial=start, unit="it", dynamic_ncols=True, file=sys.stdout)


# ---------------------------------------------------------------- reading a run back
def last_record(out_dir: str) -> tuple[dict | None, float | None]:
    """The last record of out_dir/metrics.jsonl and when the file was last written (None, None if none)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))  # the tail is enough for the last line
            lines = f.read().splitlines()
            written = os.fstat(f.fileno()).st_mtime
    except OSError:
        return None, None
    found = records(lines)  # without a last line cut by a kill mid-write
    return (found[-1] if found else None), written


def resume_record(out_dir: str, iter_num: int, saved: dict, now: dict) -> dict:
    """metrics.jsonl's record of a restart: from which topology to which, and what it cost.

    lost_s is the wall time since the previous run last wrote a record (its last step or
    eval, so it includes the time it took to fail and restart), redone_iters how many of
    its logged iterations come again because they were after the checkpoint.
    """
    last, written = last_record(out_dir)
    record = {"event": "resume", "iter": iter_num,
              "from": {"world_size": saved["world_size"], "ep_size": saved["ep_size"]},
              "to": {"world_size": now["world_size"], "ep_size": now["ep_size"]},
              "lost_s": None if written is None else round(time.time() - written, 3),
              "redone_iters": 0}
    if last is not None and "iter" in last:  # a train record's iteration was trained; an eval's was not yet
        record["redone_iters"] = max(0, last["iter"] + ("loss" in last) - iter_num)
    return record


def describe_resume(record: dict) -> str:
    lost = "" if record["lost_s"] is None else f"; {record['lost_s']:.1f} s since the previous run's last record"
    return (f"resumed at iteration {record['iter']}: world size {record['from']['world_size']} -> "
            f"{record['to']['world_size']}, ep_size {record['from']['ep_size']} -> {record['to']['ep_size']}{lost}, "
            f"{record['redone_iters']} iterations to train again")


def read_run(out_dir: str) -> tuple[list[dict], list[dict]]:
    """(training-step records, eval records) of out_dir/metrics.jsonl, each in iteration order.

    The one reader for launch/plot.py and the reports in bench/. A resumed run logs
    the iterations after its checkpoint again: the later record of an iteration wins, since
    that run is the one that went on.
    """
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ConfigError(f"no metrics.jsonl in {out_dir}; train first or check --out_dir")
    train, evals = {}, {}
    with open(path) as f:
        for record in records(f):
            if "event" not in record:  # a restart's record (resume_record) is neither
                (train if "loss" in record else evals)[record["iter"]] = record
    return [train[i] for i in sorted(train)], [evals[i] for i in sorted(evals)]

