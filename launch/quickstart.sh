#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare shakespeare_char, train a small MoE
# on the CPU for a few minutes, then sample from it.
#   bash launch/quickstart.sh                 # downloads Tiny Shakespeare
#   bash launch/quickstart.sh path/input.txt  # or uses a local copy
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -c .ci/constraints.txt -e .
if [ $# -ge 1 ]; then
    python data/shakespeare_char/prepare.py --input "$1"
else
    python data/shakespeare_char/prepare.py
fi
python launch/train.py launch/config/train_shakespeare_char_moe.py --device=cpu --compile=False \
    --eval_iters=20 --log_interval=50 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 \
    --max_iters=1000 --lr_decay_iters=1000 --dropout=0.0 --num_experts=8 --num_experts_per_tok=2 \
    --init_from=auto  # run again, it continues (or finds the run finished) instead of being refused
python launch/sample.py --out_dir=out-shakespeare-char-moe --device=cpu --num_samples=2 --max_new_tokens=300
