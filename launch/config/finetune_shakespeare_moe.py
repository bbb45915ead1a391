# Upcycle GPT-2 (124M) into an MoE (top-2 of 8 experts in every other block) and fine-tune it on
# Shakespeare (GPT-2 BPE): run data/shakespeare/prepare.py first. Its first forward equals GPT-2's;
# see docs/training.md, "Where a run starts, and upcycling a dense model".
include("finetune_shakespeare.py")
out_dir = "out-shakespeare-moe"
wandb_run_name = "ft-moe"

init_from = "gpt2"  # any dense source works: a GPT-2 name, a local HF directory, a dense run's out_dir
use_moe = True
num_experts = 8
num_experts_per_tok = 2
moe_every = 2  # as in Sparse Upcycling (Komatsuzaki et al. 2022): every other MLP becomes an MoE
aux_loss_coef = 0.01

# fresh routers learn more slowly than fine-tuning's usual 3e-5 allows
max_iters = 100
learning_rate = 1e-4
