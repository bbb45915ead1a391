# Fine-tune pretrained GPT-2 on Shakespeare (GPT-2 BPE): run data/shakespeare/prepare.py first.
out_dir = "out-shakespeare"
eval_interval = 5
eval_iters = 40
wandb_log = False
wandb_project = "shakespeare"
wandb_run_name = "ft"

dataset = "shakespeare"
init_from = "gpt2-xl"  # the largest GPT-2 model

always_save_checkpoint = False  # only save when val improves

# 1 batch_size * 32 grad_accum * 1024 tokens = 32,768 tokens/iter
batch_size = 1
gradient_accumulation_steps = 32
max_iters = 20

learning_rate = 3e-5  # finetune at constant LR
decay_lr = False
