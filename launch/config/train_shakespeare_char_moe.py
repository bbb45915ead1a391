# The baby GPT with every MLP replaced by a Mixture of Experts (top-2 of 8).
include("train_shakespeare_char.py")
out_dir = "out-shakespeare-char-moe"
wandb_run_name = "mini-moe"
use_moe = True
num_experts = 8
num_experts_per_tok = 2
aux_loss_coef = 0.01
z_loss_coef = 0.001
