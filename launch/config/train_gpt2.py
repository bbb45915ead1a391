# GPT-2 (124M) on OpenWebText, as nanoGPT: ~2.5 days on 8x A100 40GB in the original.
# Single node:  python launch/train.py launch/config/train_gpt2.py
# DeepSpeed:    deepspeed launch/train.py --deepspeed_config ds_configs/zero1.json launch/config/train_gpt2.py
wandb_log = False
wandb_project = "owt"
wandb_run_name = "gpt2-124M"

dataset = "openwebtext"
out_dir = "out-gpt2"
# 12 batch size * 1024 block size * 40 grad accum = 491,520 tokens per step
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 40

max_iters = 600000
lr_decay_iters = 600000

eval_interval = 1000
eval_iters = 200
log_interval = 10

weight_decay = 1e-1
