# Upcycle the dense baby GPT (train it first with the README's CPU line, into out-shakespeare-char)
# into top-2 of 8 experts and keep training on the CPU. The shape (layers, width, vocabulary)
# comes from the dense run; this file sets the MoE and training keys.
include("train_shakespeare_char.py")
init_from = "out-shakespeare-char"
out_dir = "out-shakespeare-char-upcycled"
wandb_run_name = "mini-upcycled"
always_save_checkpoint = True

use_moe = True
num_experts = 8
num_experts_per_tok = 2
aux_loss_coef = 0.01

# CPU-sized, like the README's CPU line
device = "cpu"
compile = False
block_size = 64
batch_size = 12
dropout = 0.0
eval_interval = 100
eval_iters = 20
log_interval = 10
# a fresh optimizer: re-warm, then decay again
max_iters = 1000
lr_decay_iters = 1000
learning_rate = 5e-4
min_lr = 5e-5
warmup_iters = 50
