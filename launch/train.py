"""Train a GPT / MoE GPT.

Single device (CPU, MPS or one GPU), plain PyTorch:
    python launch/train.py launch/config/train_shakespeare_char.py --device=cpu --compile=False
Multi-rank with DeepSpeed (ZeRO, bf16 and batch sizes come from the JSON):
    deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json launch/config/train_shakespeare_char_moe.py --ep_size=2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Only the config, the launcher's variables and the signal handlers here: none imports torch, so a
# bad argument is refused in a fraction of a second rather than after torch's import.
from nanomoe_ds.config import ConfigError, build, parse_args  # noqa: E402
from nanomoe_ds.launch_env import exit_status  # noqa: E402
from nanomoe_ds.preemption import Preemption  # noqa: E402


def main(argv):
    try:
        overrides = parse_args(argv)
        model_cfg, train_cfg = build(overrides)
    except ConfigError as e:
        sys.exit(exit_status(e))
    given = frozenset(overrides)  # what the preset and command line set, checked against a resumed checkpoint
    Preemption.install()  # before the slow imports and start-up: a signal from now on stops cleanly
    from nanomoe_ds import ds_engine
    from nanomoe_ds.trainer import train
    if train_cfg.deepspeed_config:
        ds_engine.shutdown(ds_engine.run(model_cfg, train_cfg, given))  # ends the process, without gloo's abort
        return
    try:
        train(model_cfg, train_cfg, given=given)
    except Exception as e:
        status = exit_status(e)
        if status is None:  # a bug: its traceback is the report
            raise
        sys.exit(status)


if __name__ == "__main__":
    main(sys.argv[1:])
