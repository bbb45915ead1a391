"""The DeepSpeed JSON: loading it and reconciling it with the trainer's config, as pure functions.

The JSON owns precision, ZeRO, clipping, micro-batch and accumulation; "auto" values
are filled from the preset and the command line, and a number that contradicts the
trainer's is refused in one line naming both. Nothing here imports DeepSpeed or
touches a process group, so tests call it in-process with any world size or device.
"""
from __future__ import annotations

import copy
import json
import math

from . import precision
from .config import ConfigError, GPTConfig, TrainConfig
from .model import fused_adamw_supported

def load_ds_config(path: str) -> dict:
    """The JSON as a dict, its blocks checked to be objects (reconcile reads into them)."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"--deepspeed_config: no such file '{path}'; see ds_configs/") from None
    except IsADirectoryError:
        raise ConfigError(f"--deepspeed_config: '{path}' is a directory; give a JSON file such as "
                          "ds_configs/zero2.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--deepspeed_config: '{path}' is not valid JSON ({e})") from None
    for block in ("", "zero_optimization", "optimizer", "optimizer.params", "scheduler", "scheduler.params",
                  "bf16", "fp16", "activation_checkpointing"):
        value = ds
        for key in filter(None, block.split(".")):
            value = value.get(key, {})
        if not isinstance(value, dict):
            where = f'"{block}"' if block else "the top level"
            raise ConfigError(f"--deepspeed_config: {where} of '{path}' must be a JSON object {{...}}, "
                              f"got {type(value).__name__} {json.dumps(value)[:40]}")
    return ds


def _refuse_zero3_layouts(zero: dict):
    """ZeRO-3 settings that put a rank's partitions where the checkpoint code does not read and write them."""
    for block in ("offload_optimizer", "offload_param"):
        if zero.get(block, {}).get("device") == "nvme":
            raise ConfigError(f"ZeRO-3 with {block} to NVMe is not supported: this trainer's checkpoints read and "
                              "write the partitions in memory; offload to \"cpu\" instead")
    if zero.get("offload_optimizer", {}).get("ratio", 1.0) < 1.0:
        raise ConfigError("ZeRO-3 with a partial offload_optimizer \"ratio\" is not supported (its sub-groups kept on "
                          "the GPU step through another optimizer); remove \"ratio\" to offload it all")
    if zero.get("mics_shard_size", -1) > 0:
        raise ConfigError("ZeRO-3 with MiCS (mics_shard_size) is not supported: its replica groups would each write "
                          "the same partitions; remove mics_shard_size")


def reconcile(ds: dict, model_cfg: GPTConfig, train_cfg: TrainConfig, world_size: int, device_kind: str,
              support: precision.Support) -> dict:
    """Fill "auto" values from the preset/command line; refuse contradictions in one line.

    The JSON owns precision, ZeRO, clipping, micro-batch and accumulation. The LR
    schedule is nanoGPT's get_lr on both paths (so they match exactly); a
    WarmupCosineLR block is checked against it and then driven by the trainer.
    `device_kind` and `support` say what the ranks' device can compute in (the
    caller asks precision.supports; tests pass any answer).
    """
    ds = copy.deepcopy(ds)
    _refuse_monitors(ds)
    if train_cfg.gradient_accumulation_steps % world_size:
        raise ConfigError(f"gradient_accumulation_steps ({train_cfg.gradient_accumulation_steps}) must be divisible by "
                          f"the number of ranks ({world_size})")
    gas = train_cfg.gradient_accumulation_steps // world_size
    want = {"train_micro_batch_size_per_gpu": (train_cfg.batch_size, "batch_size"),
            "gradient_accumulation_steps": (gas, "gradient_accumulation_steps/world_size "
                                                 f"({train_cfg.gradient_accumulation_steps}/{world_size})"),
            "train_batch_size": (train_cfg.batch_size * train_cfg.gradient_accumulation_steps,
                                 "batch_size*gradient_accumulation_steps"),
            "gradient_clipping": (train_cfg.grad_clip, "grad_clip")}
    for key, (value, ours) in want.items():
        _fill(ds, key, value, ours)
    opt = ds.setdefault("optimizer", {"type": "AdamW", "params": {}})
    if opt.get("type", "").lower() not in ("adamw", "adam"):
        raise ConfigError(f"optimizer type '{opt.get('type')}' is not supported; use AdamW")
    params = opt.setdefault("params", {})
    params.setdefault("torch_adam", True)  # no JIT-built C++ op
    if params.get("torch_adam") and params.get("fused", "auto") == "auto":
        # torch's fused AdamW, as on the plain path: one kernel over each of ZeRO's flat fp32
        # partitions, where the default (single-tensor on a CPU) makes several passes over them.
        params["fused"] = fused_adamw_supported(device_kind)
    for key, value, ours in (("lr", train_cfg.learning_rate, "learning_rate"),
                             ("betas", [train_cfg.beta1, train_cfg.beta2], "beta1/beta2"),
                             ("weight_decay", train_cfg.weight_decay, "weight_decay")):
        _fill(params, key, value, ours, where="optimizer.params.")
    _check_scheduler(ds.pop("scheduler", None), train_cfg)
    dtype = json_dtype(ds)
    precision.check(dtype, device_kind, support, source="the DeepSpeed JSON")
    if train_cfg.dtype not in ("auto", dtype):
        raise ConfigError(f"--dtype={train_cfg.dtype} contradicts the DeepSpeed JSON ({dtype}); "
                          "the JSON owns precision: leave dtype=auto")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if model_cfg.use_moe and stage == 3:
        raise ConfigError("ZeRO-3 does not support native MoE layers in DeepSpeed; use ZeRO-1 or ZeRO-2 "
                          "(ds_configs/zero1.json, zero2.json)")
    if stage == 3:
        _refuse_zero3_layouts(ds["zero_optimization"])
    if model_cfg.use_moe and stage == 0 and dtype == "float16":
        raise ConfigError("fp16 with ZeRO-0 and use_moe=True is not supported: the exact MoE gradient clip on "
                          "ZeRO-0 would see loss-scaled gradients; use ZeRO-1 (ds_configs/fp16.json) or bf16")
    if model_cfg.use_moe and stage in (1, 2):
        # DeepSpeed asserts these for MoE parameter groups.
        ds["zero_optimization"].update(contiguous_gradients=True, reduce_scatter=True)
    return ds


def _check_scheduler(sched: dict | None, train_cfg: TrainConfig):
    """A WarmupCosineLR block must agree with nanoGPT's schedule, which the trainer drives on both paths."""
    if sched is None:
        return
    if sched.get("type") != "WarmupCosineLR":
        raise ConfigError(f"scheduler type '{sched.get('type')}' is not supported; use WarmupCosineLR "
                          "(nanoGPT's warmup + cosine) or remove the block")
    sp = sched.get("params", {})
    for key, value, ours in (("total_num_steps", train_cfg.lr_decay_iters, "lr_decay_iters"),
                             ("warmup_num_steps", train_cfg.warmup_iters, "warmup_iters"),
                             ("cos_min_ratio", train_cfg.min_lr / train_cfg.learning_rate, "min_lr/learning_rate")):
        _fill(sp, key, value, ours, where="scheduler.params.")


# DeepSpeed's activation-checkpointing options that work only where model code calls
# deepspeed.checkpointing.checkpoint; this trainer recomputes whole blocks with torch's.
AC_OPTIONS_NOT_HONOURED = ("partition_activations", "cpu_checkpointing", "contiguous_memory_optimization",
                           "synchronize_checkpoint_boundary", "profile")


def activation_checkpointing(ds: dict, model_cfg: GPTConfig, train_cfg: TrainConfig) -> bool:
    """Whether to recompute blocks: --activation_checkpointing, or the JSON's "activation_checkpointing" block.

    The block turns it on; an option of it that this trainer cannot honour is refused in one line.
    """
    block = ds.get("activation_checkpointing")
    if block is None:
        return train_cfg.activation_checkpointing
    for key in AC_OPTIONS_NOT_HONOURED:
        if block.get(key):
            raise ConfigError(f'the DeepSpeed JSON\'s "activation_checkpointing" sets {key}, which this trainer does '
                              f'not implement (it recomputes every block with torch.utils.checkpoint); set {key} '
                              'to false, or remove the block and use --activation_checkpointing=True')
    number = block.get("number_checkpoints")
    if number not in (None, model_cfg.n_layer):
        raise ConfigError(f'the DeepSpeed JSON\'s activation_checkpointing.number_checkpoints={number}, but this '
                          f'trainer checkpoints every block (n_layer={model_cfg.n_layer}); remove number_checkpoints')
    return True


def fit_ep_size(requested: int, world_size: int, num_experts: int) -> tuple[int, str | None]:
    """The expert-parallel size to run: the requested one if it divides the ranks, else the largest
    that divides both the ranks and the experts, and a note saying so.

    An elastic restart on fewer (or more) ranks keeps training instead of stopping; the
    requested size comes from the command line again at every start, so it returns as
    soon as the ranks allow it. (Its dividing num_experts is checked with the config.)
    """
    if world_size % requested == 0:
        return requested, None
    fitted = max(d for d in range(1, requested + 1) if world_size % d == 0 and num_experts % d == 0)
    return fitted, (f"note: ep_size {requested} does not divide the {world_size} ranks; running ep_size {fitted} "
                    f"(ep_size {requested} returns when the ranks allow it)")


def as_run(ds: dict, model_cfg: GPTConfig, train_cfg: TrainConfig, world_size: int, device_kind: str,
           support: precision.Support) -> tuple[dict, str | None]:
    """The JSON these ranks run, and a note to print (or None): `reconcile`, then ZeRO dropped where it
    would partition over one rank, when the config asks (drop_idle_zero). train_cfg's
    gradient_accumulation_steps is already this world's per-rank count (data.fit_accumulation).
    The trainer (ds_engine.reconcile_for) and the planner (plan.layout_of) both take this path."""
    ds = reconcile(ds, model_cfg, train_cfg, world_size, device_kind, support)
    if not train_cfg.zero_single_rank_as_stage0:
        return ds, None
    return drop_idle_zero(ds, world_size)


def drop_idle_zero(ds: dict, data_parallel_size: int) -> tuple[dict, str | None]:
    """ZeRO-0 where ZeRO-1/2/3 would partition over a single rank; returns (ds, a note to print, or None).

    With one data-parallel rank there is nothing to partition, and stages 1-3 compute the
    same update as stage 0 (tests/test_deepspeed.py: both match one device to 1e-5) while
    paying their machinery every step: each gradient copied into a bucket, "reduced", copied
    into the partition, the norm taken parameter by parameter, the fp32 partition copied
    back into the weights (docs/benchmarks.md measures it). Only in fp32: bf16 and fp16 at
    ZeRO-0 take DeepSpeed's separate mixed-precision wrapper (other data_types rules, loss
    scaling outside the trainer's clip), so they keep their stage. An offload block keeps it
    too: moving optimizer state off the GPU is a memory choice, not a partition.
    """
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    offload = any(zero.get(key, {}).get("device", "none") not in ("none", None)
                  for key in ("offload_optimizer", "offload_param"))
    if data_parallel_size != 1 or stage == 0 or offload or json_dtype(ds) != "float32":
        return ds, None
    ds = copy.deepcopy(ds)
    ds["zero_optimization"] = {"stage": 0}
    return ds, (f"note: ZeRO-{stage} on 1 rank partitions nothing; running ZeRO-0, which computes the same "
                f"update without ZeRO-{stage}'s per-step copies")


# DeepSpeed's monitor blocks would log the engine's own view (loss of its last micro-batch, rank 0's
# samples); the trainer logs the global numbers itself, to these keys instead.
OUR_MONITOR_KEYS = {"wandb": "--wandb_log=True (with --wandb_project, --wandb_run_name)",
                    "tensorboard": "--tensorboard_dir=DIR",
                    "csv_monitor": "out_dir/metrics.jsonl, always written (plot it with launch/plot.py)",
                    "comet": "--wandb_log=True or --tensorboard_dir=DIR"}


def _refuse_monitors(ds: dict):
    for block, ours in OUR_MONITOR_KEYS.items():
        if ds.get(block, {}).get("enabled", False):
            raise ConfigError(f"the DeepSpeed JSON's \"{block}\" block is not used by this trainer; remove it "
                              f"and use {ours}")


def json_dtype(ds: dict) -> str:
    """The compute dtype the JSON asks for: "bfloat16", "float16" or "float32" (both enabled is refused)."""
    bf16, fp16 = ds.get("bf16", {}).get("enabled", False), ds.get("fp16", {}).get("enabled", False)
    if bf16 and fp16:  # DeepSpeed would stop on an assertion deep inside initialize
        raise ConfigError("the DeepSpeed JSON enables both bf16 and fp16; set one of bf16.enabled / fp16.enabled "
                          "to false")
    return "bfloat16" if bf16 else "float16" if fp16 else "float32"


def _fill(block: dict, key: str, value, ours: str, where: str = ""):
    have = block.get(key, "auto")
    if have == "auto":
        block[key] = value
    elif not _same(have, value):
        raise ConfigError(f"DeepSpeed JSON {where}{key}={have} contradicts {ours}={value}; set one of them to match "
                          f"(or use \"auto\" in the JSON)")


def _same(a, b) -> bool:
    """JSON vs config value: lists compare as lists, numbers up to float rounding (min_lr/lr)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b
