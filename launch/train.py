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
from nanomoe_ds.launch_env import os_error_line, report_error  # noqa: E402
from nanomoe_ds.preemption import Preemption  # noqa: E402


def main(argv):
    try:
        overrides = parse_args(argv)
        model_cfg, train_cfg = build(overrides)
    except ConfigError as e:
        report_error(e)
        sys.exit(2)
    given = frozenset(overrides)  # what the preset and command line set, checked against a resumed checkpoint
    Preemption.install()  # before the slow imports and start-up: a signal from now on stops cleanly
    from nanomoe_ds import deepspeed_integration
    from nanomoe_ds.trainer import Diverged, train
    if train_cfg.deepspeed_config:
        code = deepspeed_integration.run(model_cfg, train_cfg, given)
        deepspeed_integration.shutdown(code)  # ends the process without gloo's exit-time abort
    try:
        train(model_cfg, train_cfg, given=given)
    except ConfigError as e:
        report_error(e)
        sys.exit(2)
    except Diverged as e:
        report_error(e)
        sys.exit(3)
    except OSError as e:  # a disk that fills or goes away mid-run: one line, not a traceback
        report_error(os_error_line(e))
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
