"""Which expert kernel `moe_impl=auto` runs, and which forced kernels can run at all.

A pure function of the device, the compute dtype, the torch version and the
layer's widths, so tests can ask it about any GPU without having one.

What the choice rests on (measurements are in docs/benchmarks.md):
  - `torch._grouped_mm` is absent before torch 2.8. Its fused kernel (no host sync)
    is bf16 on CUDA compute capability 9.0+ only (Hopper, Blackwell). From 2.9 other
    dtypes, SM80 and the CPU take a per-group fallback with a device-to-host sync
    (PyTorch PRs #161407, #161717), and the CPU kernel needs 16-byte-aligned
    strides. So auto uses it only on the fused path.
  - Everywhere else auto takes one of the two kernels built from plain matmuls,
    which run on every device, dtype and torch version: `bmm` on GPUs (one padded
    batched matmul rather than E small launches) and, on the CPU, by size: `loop`
    where experts get many rows each, `bmm` where they get few (a few hundred rows
    keep neither core busy through a per-expert matmul, and the loop's per-expert
    overhead dominates) unless padding every expert to the busiest one would add
    more than half the rows again.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import ConfigError

IMPLS = ("grouped_mm", "bmm", "loop")

# The CPU's size rule (measured on a 2-core Xeon, docs/benchmarks.md): bmm below this
# many rows per expert on average, if the padding stays within CPU_BMM_MAX_PADDING.
CPU_BMM_MAX_ROWS_PER_EXPERT = 320
CPU_BMM_MAX_PADDING = 1.5  # padded rows (experts x busiest expert's rows) / rows


class Target(NamedTuple):
    """Where the experts run: everything the choice depends on besides the model's widths."""

    device_kind: str  # "cpu", "cuda" or "mps"
    dtype: torch.dtype  # the compute dtype (autocast's, or the parameters')
    capability: tuple[int, int] | None  # CUDA compute capability, None elsewhere
    torch_version: tuple[int, int]


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


class Load(NamedTuple):
    """The rows one call brings: all of them, the busiest expert's, and how many experts share them."""

    rows: int
    busiest: int
    experts: int


def cpu_prefers_bmm(load: Load) -> bool:
    """The CPU's size rule: few rows per expert, and padding to the busiest expert stays cheap."""
    few = load.rows < CPU_BMM_MAX_ROWS_PER_EXPERT * load.experts
    return few and load.busiest * load.experts <= CPU_BMM_MAX_PADDING * load.rows


def target_of(x: torch.Tensor, dtype: torch.dtype) -> Target:
    """The Target of a tensor's device on this machine."""
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    return Target(x.device.type, dtype, cap, torch_version())


def _aligned(target: Target, widths: tuple[int, ...]) -> bool:
    """Rows of these widths start on 16-byte boundaries in the compute dtype (the grouped GEMM needs it)."""
    return all(w * target.dtype.itemsize % 16 == 0 for w in widths)


def grouped_mm_fused(target: Target, widths: tuple[int, ...]) -> bool:
    """True where torch._grouped_mm runs its fused kernel: bf16, CUDA SM90+, torch 2.8+, aligned rows."""
    aligned = _aligned(target, widths)
    return (target.device_kind == "cuda" and target.capability is not None and target.capability >= (9, 0)
            and target.dtype == torch.bfloat16 and target.torch_version >= (2, 8) and aligned)


def grouped_mm_runs(target: Target, widths: tuple[int, ...]) -> bool:
    """True where torch._grouped_mm runs at all, fused or through its per-group fallback."""
    if grouped_mm_fused(target, widths):
        return True
    if target.torch_version < (2, 9):  # 2.8 has the fused CUDA kernel only
        return False
    if target.device_kind == "cpu":
        return _aligned(target, widths)
    return target.device_kind == "cuda" and target.capability is not None and target.capability >= (8, 0)


def choose(impl: str, target: Target, widths: tuple[int, ...], load: Load | None = None) -> str:
    """The kernel to run: `impl` itself if forced, else auto's pick for this target.

    `widths` are the expert GEMMs' row widths (n_embd and expert_hidden); `load`, the
    call's rows, matters on the CPU only (without it the CPU gets `loop`).
    """
    if impl != "auto":
        return impl
    if grouped_mm_fused(target, widths):
        return "grouped_mm"
    if target.device_kind != "cpu":
        return "bmm"
    return "bmm" if load is not None and cpu_prefers_bmm(load) else "loop"


def runs(impl: str, target: Target, widths: tuple[int, ...]) -> bool:
    """Whether a kernel can run on this target at all (loop and bmm run everywhere)."""
    return impl != "grouped_mm" or grouped_mm_runs(target, widths)


def check(impl: str, target: Target, widths: tuple[int, ...]):
    """Refuse, in one line, a forced kernel that cannot run on this target."""
    if not runs(impl, target, widths):
        where = f"{target.device_kind}" + (f" (compute capability {target.capability[0]}.{target.capability[1]})"
                                           if target.capability else "")
        raise ConfigError(f"moe_impl=grouped_mm cannot run on {where} with {str(target.dtype).removeprefix('torch.')}, "
                          f"torch {target.torch_version[0]}.{target.torch_version[1]} and widths {widths}; "
                          "use moe_impl=auto (or bmm / loop)")
