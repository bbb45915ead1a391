"""`--profile=True`: where a training step's time goes, from torch.profiler ranges.

The model and the exchange mark their parts with `torch.profiler.record_function`
(a few microseconds each when no profiler runs): attention, the MoE router + permutation, the experts,
the un-permutation and the all-to-all. The loop marks forward, backward and the
optimizer step. After warm-up the loop profiles a few steps and `report` turns the
ranges into a table: the forward's parts, the whole backward (autograd runs the
backward outside the forward's ranges, so it is one row), the optimizer and the rest.
Times are CPU time on the CPU and device time on a GPU, per step.
"""
from __future__ import annotations

import json
import os

import torch

# Range names, in table order. Nested ranges: "moe.experts" holds "moe.all_to_all".
FORWARD_PARTS = ("attention", "moe.router+permute", "moe.experts", "moe.all_to_all", "moe.unpermute")
STEP_PARTS = ("forward", "backward", "optimizer")
STEPS = 3  # profiled steps, after the loop's warm-up
WARM_UP = 5  # steps before the window opens: past compilation and the allocator's first growth


def totals(prof, device_kind: str) -> dict[str, float]:
    """Milliseconds spent in each named range over the profiled steps."""
    out = {}
    for event in prof.key_averages():
        if event.key in FORWARD_PARTS + STEP_PARTS:
            us = event.device_time_total if device_kind == "cuda" else event.cpu_time_total
            out[event.key] = out.get(event.key, 0.0) + us / 1e3
    return out


def report(ranges: dict[str, float], wall_ms: float, steps: int) -> list[dict]:
    """Per-step rows: the forward's parts (experts without the all-to-all inside it), the rest of the
    forward, backward, optimizer, and what the step spent outside all of them."""
    per = {k: v / steps for k, v in ranges.items()}
    rows = []
    experts = per.get("moe.experts", 0.0) - per.get("moe.all_to_all", 0.0)
    for name in FORWARD_PARTS:
        ms = experts if name == "moe.experts" else per.get(name, 0.0)
        if name in per:
            rows.append({"part": name, "ms": ms})
    forward = per.get("forward", 0.0)
    rows.append({"part": "forward, other", "ms": forward - sum(r["ms"] for r in rows)})
    rows.append({"part": "backward", "ms": per.get("backward", 0.0)})
    rows.append({"part": "optimizer", "ms": per.get("optimizer", 0.0)})
    step = wall_ms / steps
    rows.append({"part": "other (data, all-reduce, logging)", "ms": step - forward - rows[-2]["ms"] - rows[-1]["ms"]})
    for row in rows:
        row["share"] = row["ms"] / step if step > 0 else 0.0
    return rows


def write(rows: list[dict], out_dir: str, wall_ms: float, steps: int) -> str:
    """The table as text (for stdout) and out_dir/profile.json."""
    with open(os.path.join(out_dir, "profile.json"), "w") as f:
        json.dump({"steps": steps, "step_ms": wall_ms / steps, "parts": rows}, f, indent=1)
    lines = [f"profile of {steps} steps, {wall_ms / steps:.1f} ms each (out_dir/profile.json):",
             f"  {'part':<36} {'ms/step':>9} {'share':>7}"]
    lines += [f"  {r['part']:<36} {r['ms']:9.2f} {r['share'] * 100:6.1f}%" for r in rows]
    return "\n".join(lines)


def profiler(device_kind: str):
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device_kind == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


class Window:
    """The loop's --profile window: after WARM_UP steps, profile STEPS steps, then print the table (`say`,
    rank 0's printer, or None on the other ranks) and write out_dir/profile.json."""

    def __init__(self, enabled: bool, device_kind: str, out_dir: str, say):
        self.enabled, self.device_kind, self.out_dir, self.say = enabled, device_kind, out_dir, say
        self.prof, self.wall_ms = None, 0.0

    def step_begins(self, local_iter: int):
        if self.enabled and local_iter == WARM_UP:
            self.prof = profiler(self.device_kind)
            self.prof.start()

    def step_ended(self, local_iter: int, seconds: float):
        if self.prof is None or not WARM_UP <= local_iter < WARM_UP + STEPS:
            return
        self.wall_ms += seconds * 1000
        if local_iter == WARM_UP + STEPS - 1:
            self.prof.stop()
            if self.say is not None:
                rows = report(totals(self.prof, self.device_kind), self.wall_ms, STEPS)
                self.say(write(rows, self.out_dir, self.wall_ms, STEPS))
