"""Train a GPT / MoE GPT.

Single device (CPU, MPS or one GPU), plain PyTorch:
    python launch/train.py launch/config/train_shakespeare_char.py --device=cpu --compile=False
Multi-rank with DeepSpeed (ZeRO, bf16 and batch sizes come from the JSON):
    deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json launch/config/train_shakespeare_char_moe.py --ep_size=2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanomoe_ds.config import ConfigError, from_argv  # noqa: E402
from nanomoe_ds.trainer import train  # noqa: E402


def main(argv):
    try:
        model_cfg, train_cfg = from_argv(argv)
        if not train_cfg.deepspeed_config:
            train(model_cfg, train_cfg)
            return
        from nanomoe_ds import deepspeed_integration
        deepspeed_integration.main(model_cfg, train_cfg)  # exits the process itself
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
