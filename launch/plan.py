"""Plan a run before renting the GPUs: memory per rank, bytes per collective, a step-time bound, what fits.

The same preset and --key=value overrides as launch/train.py, and --deepspeed_config; plus
    --world_size=N     ranks (default 1; more needs --deepspeed_config)
    --gpu_mem_gb=G     each GPU's memory in GiB (80 for an 80 GB H100): checks the fit, suggests batch and ep_size
    --tflops=T         peak TFLOPS in the run's dtype (989 for an H100 SXM in bf16)   } a lower bound on
    --link_gbps=B      gigabits per second a rank sends (400 for 400 Gb/s InfiniBand) } the step time

    python launch/plan.py launch/config/train_gpt2_moe.py --deepspeed_config=ds_configs/zero1.json \\
        --world_size=8 --ep_size=8 --gpu_mem_gb=80 --tflops=989 --link_gbps=400

How each number is computed: docs/plan.md. Nothing is allocated: the model is built on the meta device.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_ds.config import ConfigError, build, parse_args  # noqa: E402
from nanomoe_ds.launch_env import run_script  # noqa: E402

DEVICE_FLAGS = {"world_size": int, "gpu_mem_gb": float, "tflops": float, "link_gbps": float}


def split_device_flags(argv: list[str]) -> tuple[dict, list[str]]:
    """(this script's own --key=value flags, the rest for the trainer's config)."""
    flags, rest = {}, []
    for arg in argv:
        key, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if key.replace("-", "_") not in DEVICE_FLAGS:
            rest.append(arg)
            continue
        try:
            flags[key.replace("-", "_")] = DEVICE_FLAGS[key.replace("-", "_")](value)
        except ValueError:
            raise ConfigError(f"--{key}: expected a number, got {value!r}") from None
    if flags.get("world_size", 1) < 1 or any(flags.get(k, 0) < 0 for k in ("gpu_mem_gb", "tflops", "link_gbps")):
        raise ConfigError("--world_size must be at least 1, and --gpu_mem_gb, --tflops, --link_gbps >= 0")
    return flags, rest


def main(argv: list[str]):
    flags, rest = split_device_flags(argv)
    model_cfg, train_cfg = build(parse_args(rest))
    from nanomoe_ds import plan
    from nanomoe_ds.data import choose_vocab, load_meta, resolve_data_dir
    from nanomoe_ds.ds_config import load_ds_config
    from nanomoe_ds.config import GPTConfig
    # The vocabulary the trainer would take: the data's meta.pkl where it has one (start.build_model).
    data_dir = resolve_data_dir(train_cfg.dataset, train_cfg.data_dir)
    meta = load_meta(data_dir) if data_dir.is_dir() else None
    model_cfg.vocab_size, _ = choose_vocab(meta, model_cfg.vocab_size, GPTConfig.vocab_size)
    ds = load_ds_config(train_cfg.deepspeed_config) if train_cfg.deepspeed_config else None
    device = plan.Device(int(flags.get("gpu_mem_gb", 0) * plan.GIB), flags.get("tflops", train_cfg.peak_tflops),
                         flags.get("link_gbps", 0.0))
    kind = train_cfg.device.split(":")[0]
    result = plan.make_plan(model_cfg, train_cfg, flags.get("world_size", 1), ds, device, kind)
    print("\n".join(plan.describe(result)))


if __name__ == "__main__":
    run_script(main, sys.argv[1:])
