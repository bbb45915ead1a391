"""Which floating-point precisions a device can train in: one rule for every path.

The single-device trainer (`--dtype`) and the DeepSpeed path (the JSON's `bf16` /
`fp16` blocks) both ask `supports()` and both refuse through `check()`, so a
precision is accepted or refused the same way whichever command runs it.

The rule asks the hardware rather than assuming by device kind. On a CPU, fp16 is
real only where oneDNN has native fp16 kernels (AVX512-FP16 or AMX-FP16, e.g. Intel
Sapphire Rapids); that is also the question DeepSpeed's CPU accelerator asks
(`torch.ops.mkldnn._is_mkldnn_fp16_supported`). Elsewhere, e.g. on AMD EPYC, fp16
would be emulated, slow and untested, so it is refused.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .config import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


class Support(NamedTuple):
    """What a device can compute in, besides float32 (which every device can)."""

    bfloat16: bool
    float16: bool


def _cpu_has(query: str) -> bool:
    try:
        return bool(getattr(torch.ops.mkldnn, query)())
    except (AttributeError, RuntimeError):  # an older torch without the query: assume no native support
        return False


def supports(device_kind: str) -> Support:
    """Ask torch what this machine's `cpu`, `cuda` or `mps` device can do."""
    if device_kind == "cuda":
        # Every CUDA GPU torch still supports has fp16; bf16 needs Ampere (SM80) or newer.
        return Support(bfloat16=torch.cuda.is_bf16_supported(), float16=True)
    if device_kind == "mps":
        return Support(bfloat16=True, float16=True)
    # bf16 autocast runs on every x86/Arm CPU (emulated where there is no AVX512-BF16/AMX),
    # and is numerically the same either way; fp16 is refused unless the CPU has it natively.
    return Support(bfloat16=True, float16=_cpu_has("_is_mkldnn_fp16_supported"))


def default_dtype(device_kind: str, support: Support) -> str:
    """`--dtype=auto`: bf16 on GPUs that have it, else fp16 there; fp32 on CPU and MPS (as nanoGPT)."""
    if device_kind == "cuda":
        return "bfloat16" if support.bfloat16 else "float16"
    return "float32"


def check(dtype_name: str, device_kind: str, support: Support, source: str = "--dtype") -> str:
    """Refuse a precision the device can't train in, in one line; return the dtype name.

    `source` names where the request came from (`--dtype` or the DeepSpeed JSON) so
    the message points at the thing to change.
    """
    if dtype_name == "float16" and not support.float16:
        what = "this CPU has no native float16 (it needs AVX512-FP16 or AMX-FP16)" if device_kind == "cpu" \
            else f"this {device_kind} device has no float16"
        fix = "use a bf16 config such as ds_configs/zero2.json" if source != "--dtype" \
            else "use --dtype=bfloat16 or --dtype=float32"
        raise ConfigError(f"{source} asks for float16, but {what}; {fix}")
    if dtype_name == "bfloat16" and not support.bfloat16:
        fix = "use ds_configs/fp16.json" if source != "--dtype" else "use --dtype=float16"
        raise ConfigError(f"{source} asks for bfloat16, but this {device_kind} device has no bfloat16; {fix}")
    return dtype_name
