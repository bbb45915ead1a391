# GPT-2 small with an MoE MLP in every block: 8 experts, top-2 (about 2x the MLP FLOPs of GPT-2 small).
include("train_gpt2.py")
out_dir = "out-gpt2-moe"
wandb_run_name = "gpt2-124M-moe-8x2"
use_moe = True
num_experts = 8
num_experts_per_tok = 2
aux_loss_coef = 0.01
z_loss_coef = 0.001
