"""Every refusal the project makes, through its real entry point: one `error: ...` line, exit 2, nothing trained.

ROWS below is the one source of docs/errors.md: `python tests/test_errors.py` rewrites that file,
and test_docs_list_exactly_these_rows fails when the two differ. Placeholders in `args`:
<tiny> a seconds-long tiny MoE run (on <data>, into <tmp>), <data> the prepared shakespeare_char,
<tmp> the row's own empty folder, <ckpt> an out_dir holding a tiny trained checkpoint.
"""
from __future__ import annotations

import json
import pickle
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, tiny_args
from dist_utils import free_port, loopback_env

DOC = REPO / "docs/errors.md"
SCRIPTS = {"train": "launch/train.py", "sample": "launch/sample.py", "export": "launch/export.py",
           "char": "data/shakespeare_char/prepare.py",
           "bpe": "data/shakespeare/prepare.py", "owt": "data/openwebtext/prepare.py"}
SKIPS = {"cuda": ("CUDA is available here", lambda: __import__("torch").cuda.is_available())}


@dataclass(frozen=True)
class Row:
    script: str  # a key of SCRIPTS
    args: str  # shell words, with the placeholders of the module docstring
    message: str  # how the one stderr line starts, after "error: " (placeholders allowed)
    trigger: str  # what the user did, in words
    files: tuple = ()  # (path under <tmp>, str or bytes content) written before the run
    copy_data: bool = False  # copy <data> to <tmp>/data first (then `files` may overwrite some of it)
    one_rank: bool = False  # run as rank 0 of 1, with a launcher's variables (DeepSpeed's process group)
    skip: str = ""  # a key of SKIPS


TINY_DS = "<tiny> --deepspeed_config=<tmp>/ds.json"
META_10 = pickle.dumps({"vocab_size": 10})
TOKENS_MAX_70 = json.dumps({split: {"tokens": n, "max_token": 70, "dtype": "uint16"}
                            for split, n in (("train", 1_003_854), ("val", 111_540))})  # shakespeare_char's counts
WIDE = "".join(chr(c) for c in range(0x20, 0x20 + 65537 + 2048) if not 0xD800 <= c < 0xE000)[:65537]  # no surrogates

ROWS = [
    # ------------------------------------------------ launch/train.py: the command line and presets
    Row("train", "<tiny> --n_layers=2", "unknown config key 'n_layers'; did you mean n_layer", "a misspelt key"),
    Row("train", "<tiny> --batch_size", "--batch_size needs a value, e.g. --batch_size=...",
        "a non-flag key with no value"),
    Row("train", "<tiny> --batch_size=twelve", "--batch_size: cannot parse 'twelve' as int", "a value that is not one"),
    Row("train", "<tiny> --batch_size=1.5", "--batch_size: expected int, got float 1.5", "a value of the wrong type"),
    Row("train", "<tiny> --learning_rate=1e999", "--learning_rate: inf is not a finite number",
        "an infinite (or NaN) float, for any float key"),
    Row("train", "<tmp>/nosuch.py <tiny>", "cannot read preset file '<tmp>/nosuch.py': No such file or directory",
        "a preset file that is not there"),
    Row("train", "<tmp>/bad.py <tiny>", "preset '<tmp>/bad.py' failed: ZeroDivisionError: division by zero",
        "a preset that raises (here `1/0`)", files=(("bad.py", "x = 1/0\n"),)),
    Row("train", "<tmp>/typo.py <tiny>", "unknown config key 'learnig_rate'; did you mean learning_rate",
        "a misspelt key in a preset", files=(("typo.py", "learnig_rate = 1e-3\n"),)),
    # ------------------------------------------------ model shape and MoE settings
    Row("train", "<tiny> --block_size=0", "block_size must be positive, got 0",
        "block_size, vocab_size, n_layer, n_head or n_embd below 1"),
    Row("train", "<tiny> --n_embd=30 --n_head=4", "n_embd (30) must be divisible by n_head (4)",
        "heads that do not split the width"),
    Row("train", "<tiny> --dropout=1.0", "dropout must be in [0, 1), got 1.0", "a dropout of 1 or more"),
    Row("train", "<tiny> --num_experts=0", "num_experts must be at least 1, got 0", "no experts"),
    Row("train", "<tiny> --num_experts_per_tok=5", "num_experts_per_tok must be between 1 and num_experts (4), got 5",
        "more experts per token than experts"),
    Row("train", "<tiny> --moe_every=0", "moe_every must be at least 1, got 0", "moe_every below 1"),
    Row("train", "<tiny> --num_shared_experts=-1", "num_shared_experts must be >= 0, got -1",
        "a negative number of shared experts"),
    Row("train", "<tiny> --expert_hidden=-1", "expert_hidden must be a positive integer, got -1",
        "a negative expert width (0 means 4*n_embd)"),
    Row("train", "<tiny> --gate=top1", "unknown gate 'top1'; choose one of softmax_topk, topk_softmax, sigmoid",
        "an unknown router"),
    Row("train", "<tiny> --expert_act=relu", "unknown expert_act 'relu'; choose one of gelu, swiglu",
        "an unknown expert activation"),
    Row("train", "<tiny> --activation=relu", "unknown activation 'relu'; choose one of gelu, gelu_tanh",
        "an unknown MLP nonlinearity"),
    Row("train", "<tiny> --moe_impl=triton", "unknown moe_impl 'triton'; choose one of auto, grouped_mm, bmm, loop",
        "an unknown expert kernel"),
    Row("train", "<tiny> --capacity_priority=random",
        "unknown capacity_priority 'random'; choose one of score, position", "an unknown drop order"),
    Row("train", "<tiny> --capacity_factor=-1", "capacity_factor must be >= 0 (0 is dropless), got -1.0",
        "a negative capacity factor"),
    Row("train", "<tiny> --eval_capacity_factor=-2",
        "eval_capacity_factor must be >= 0, or -1 for 'same as capacity_factor', got -2.0",
        "a negative eval capacity factor other than -1"),
    Row("train", "<tiny> --aux_loss_coef=-0.1", "aux_loss_coef must be >= 0, got -0.1",
        "a negative router_jitter, aux_loss_coef, z_loss_coef or bias_update_rate"),
    # ------------------------------------------------ training settings
    Row("train", "<tiny> --batch_size=0", "batch_size must be at least 1, got 0",
        "batch_size, gradient_accumulation_steps, eval_iters, log_interval, eval_interval, ep_size or "
        "dist_timeout below 1"),
    Row("train", "<tiny> --dist_timeout=0", "dist_timeout must be at least 1, got 0", "a zero collective timeout"),
    Row("train", "<tiny> --max_iters=-1", "max_iters must be >= 0, got -1",
        "a negative max_iters, warmup_iters, lr_decay_iters, weight_decay or seed"),
    Row("train", "<tiny> --warmup_iters=-1", "warmup_iters must be >= 0, got -1", "a negative warmup"),
    Row("train", "<tiny> --weight_decay=-0.1", "weight_decay must be >= 0, got -0.1", "a negative weight decay"),
    Row("train", "<tiny> --seed=-1", "seed must be >= 0, got -1", "a negative seed (numpy refuses it)"),
    Row("train", "<tiny> --beta1=5.0", "beta1 must be in [0, 1), got 5.0", "an AdamW beta1 outside [0, 1)"),
    Row("train", "<tiny> --beta2=1.0", "beta2 must be in [0, 1), got 1.0", "an AdamW beta2 outside [0, 1)"),
    Row("train", "<tiny> --learning_rate=0", "learning_rate must be positive, got 0.0", "a zero or negative LR"),
    Row("train", "<tiny> --min_lr=0.01", "need 0 <= min_lr (0.01) <= learning_rate (0.001) when decay_lr=True",
        "a floor above the peak LR"),
    Row("train", "<tiny> --grad_clip=-1", "grad_clip must be >= 0 (0 disables it), got -1.0", "a negative clip"),
    Row("train", "<tiny> --replica_check_interval=-5",
        "replica_check_interval must be -1 (every eval_interval), 0 (never) or a number of iterations, got -5",
        "a replica-guard interval below -1"),
    Row("train", "<tiny> --dtype=float17", "unknown dtype 'float17'; choose auto, float32, bfloat16 or float16",
        "an unknown dtype"),
    Row("train", "<tiny> --device=tpu", "unknown device 'tpu'; use cpu, cuda, cuda:N or mps", "an unknown device"),
    Row("train", "<tiny> --out_dir=<tmp>/f", "out_dir '<tmp>/f' cannot be made: '<tmp>/f' is a file, not a directory",
        "an out_dir that is an existing file", files=(("f", "x"),)),
    Row("train", "<tiny> --out_dir=<tmp>/f/run", "out_dir '<tmp>/f/run' cannot be made: '<tmp>/f' is a file",
        "an out_dir under a file", files=(("f", "x"),)),
    Row("train", "<tiny> --ep_size=2 --use_moe=False", "ep_size=2 needs use_moe=True", "expert parallelism, no experts"),
    Row("train", "<tiny> --ep_size=2", "ep_size=2 needs DeepSpeed: expert parallelism spreads experts over ranks",
        "expert parallelism without --deepspeed_config (it used to be ignored)"),
    Row("train", "<tiny> --ep_size=2 --num_experts=3 --deepspeed_config=ds_configs/zero2.json",
        "num_experts (3) must be divisible by ep_size (2)", "experts that do not split over the EP group"),
    # ------------------------------------------------ the device and the data (after torch is imported)
    Row("train", "<tiny> --device=cuda", "--device=cuda but CUDA is not available here; use --device=cpu",
        "a GPU run on a machine without one", skip="cuda"),
    Row("train", "<tiny> --moe_impl=grouped_mm --n_embd=34 --n_head=2",
        "moe_impl=grouped_mm cannot run on cpu with float32",
        "a forced kernel this device cannot run (here: widths not 16-byte aligned)"),
    Row("train", "<tiny> --data_dir=<tmp>/none", "missing <tmp>/none/train.bin; run data/none/prepare.py first",
        "data not prepared"),
    Row("train", "<tiny> --data_dir=<tmp>/data", "<tmp>/data/train.bin holds 10 tokens, fewer than block_size+2 (34)",
        "a train.bin or val.bin shorter than a block", files=(("data/train.bin", bytes(20)),), copy_data=True),
    Row("train", "<tiny> --data_dir=<tmp>/data",
        "<tmp>/data/train.bin has an odd number of bytes (2,001), so it is not uint16 token ids",
        "a truncated or foreign token file", files=(("data/train.bin", bytes(2001)),), copy_data=True),
    Row("train", "<tiny> --data_dir=<tmp>/data", "<tmp>/data/train.bin holds 1,000 tokens, but tokens.json records "
        "1,003,854: it was truncated or replaced since; re-run data/data/prepare.py",
        "a token file truncated or replaced since prepare.py recorded it in tokens.json",
        files=(("data/train.bin", bytes(2000)),), copy_data=True),
    Row("train", "<tiny> --data_dir=<tmp>/data", "cannot read <tmp>/data/tokens.json (JSONDecodeError: ",
        "a tokens.json that is not JSON", files=(("data/tokens.json", "{not json"),), copy_data=True),
    Row("train", "<tiny> --data_dir=<tmp>/data", "cannot read <tmp>/data/meta.pkl (UnpicklingError",
        "a meta.pkl that is not a pickle", files=(("data/meta.pkl", b"not a pickle"),), copy_data=True),
    Row("train", "<tiny> --data_dir=<tmp>/data", "<tmp>/data/meta.pkl has no positive integer vocab_size (got None)",
        "a meta.pkl without vocab_size", files=(("data/meta.pkl", pickle.dumps({"stoi": {}})),), copy_data=True),
    Row("train", "<tiny> --data_dir=<tmp>/data", "<tmp>/data/train.bin holds token id 64, but vocab_size is 10",
        "a meta.pkl whose vocab is smaller than the data's largest token", files=(("data/meta.pkl", META_10),),
        copy_data=True),
    Row("train", "<tiny> --vocab_size=10", "<data>/train.bin holds token id 64, but vocab_size is 10",
        "a --vocab_size smaller than the data's largest token"),
    Row("train", "<tiny> --data_dir=<tmp>/data", "<tmp>/data/train.bin holds token id 70, but vocab_size is 65",
        "a tokens.json whose largest id has no row in the embedding (it is trusted: the .bin files are not read)",
        files=(("data/tokens.json", TOKENS_MAX_70),), copy_data=True),
    Row("train", "<tiny> --init_from=resume", "no checkpoint in <tmp> (no iter_N/metadata.json); train first, or check --out_dir",
        "resuming where nothing was saved"),
    # ------------------------------------------------ init_from: what to start from (checked before loading)
    Row("train", "<tiny> --init_from=gpt3",
        "unknown init_from 'gpt3'; expected scratch, resume, auto, a GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
        "distilgpt2, or openai-community/ forms), a local Hugging Face GPT-2 directory, or the out_dir of a run of ours "
        "(holding iter_N/metadata.json)", "a name that is not a listed GPT-2 nor a directory"),
    Row("train", "<tiny> --init_from=<tmp>/src",
        "init_from '<tmp>/src' is a directory with neither a run of ours (iter_N/metadata.json) nor a Hugging Face GPT-2 "
        "(config.json)", "a directory holding no model", files=(("src/notes.txt", "x"),)),
    Row("train", "<tiny> --init_from=<tmp>/bert",
        "init_from '<tmp>/bert' holds a Hugging Face 'bert' model; only GPT-2 (model_type gpt2) can be loaded",
        "a Hugging Face directory of another model", files=(("bert/config.json", '{"model_type": "bert"}'),)),
    Row("train", "<tiny> --init_from=<tmp>/hf",
        "init_from '<tmp>/hf' has a GPT-2 config.json but no weights (model.safetensors or pytorch_model.bin)",
        "a Hugging Face GPT-2 directory without weights", files=(("hf/config.json", '{"model_type": "gpt2"}'),)),
    Row("train", "<tiny> --init_from=<ckpt> --out_dir=<ckpt>",
        "init_from and out_dir are the same directory ('<ckpt>'): the new run would overwrite its source",
        "starting from a run into its own out_dir"),
    Row("train", "<tiny> --init_from=<ckpt>", "init_from '<ckpt>' is an MoE run; init_from=resume continues it",
        "an MoE run as the dense source (upcycling starts from a dense model)"),
    Row("train", "<tiny> --init_from=auto --resume_iter=3",
        "resume_iter=3 picks a checkpoint to resume once; it needs --init_from=resume (init_from=auto is the command "
        "every restart repeats: with resume_iter it would rewind to iteration 3 again at each one)",
        "resume_iter in a restart command (init_from=auto)"),
    Row("train", "<tiny> --out_dir=<ckpt>",
        "out_dir '<ckpt>' already holds a run, which --init_from=scratch would overwrite; continue it with "
        "--init_from=auto, or start over in another --out_dir", "a finished run's command run again (a new start "
        "over a run: its first save would prune the run's checkpoints)"),
    Row("train", "<tiny> --upcycle_noise=-1", "upcycle_noise must be >= 0, got -1.0",
        "a negative upcycle_noise or upcycle_router_std"),
    # ------------------------------------------------ the DeepSpeed JSON (read before any process group)
    Row("train", "<tiny> --deepspeed_config=<tmp>/nope.json",
        "--deepspeed_config: no such file '<tmp>/nope.json'; see ds_configs/", "a JSON path that is not there"),
    Row("train", "<tiny> --deepspeed_config=<tmp>", "--deepspeed_config: '<tmp>' is a directory",
        "a directory as the JSON path"),
    Row("train", TINY_DS, "--deepspeed_config: '<tmp>/ds.json' is not valid JSON (", "a JSON syntax error",
        files=(("ds.json", "{'stage': 2}"),)),
    Row("train", TINY_DS, "--deepspeed_config: the top level of '<tmp>/ds.json' must be a JSON object {...}, got list",
        "a JSON whose top level is not an object", files=(("ds.json", "[1]"),)),
    Row("train", TINY_DS, '--deepspeed_config: "zero_optimization" of \'<tmp>/ds.json\' must be a JSON object',
        "a block that is not an object: zero_optimization, optimizer(.params), scheduler(.params), bf16, fp16",
        files=(("ds.json", '{"zero_optimization": 2}'),)),
    Row("train", TINY_DS, '--deepspeed_config: "optimizer.params" of \'<tmp>/ds.json\' must be a JSON object',
        "optimizer.params as a list", files=(("ds.json", '{"optimizer": {"type": "AdamW", "params": [0.1]}}'),)),
    # ------------------------------------------------ the DeepSpeed JSON against the config (one rank here)
    Row("train", TINY_DS, "DeepSpeed JSON train_micro_batch_size_per_gpu=8 contradicts batch_size=4",
        "a JSON value that contradicts the config (any non-\"auto\" batch, clip, lr, betas, decay or schedule key)",
        files=(("ds.json", '{"train_micro_batch_size_per_gpu": 8}'),), one_rank=True),
    Row("train", TINY_DS, "optimizer type 'SGD' is not supported; use AdamW", "an optimizer other than AdamW",
        files=(("ds.json", '{"optimizer": {"type": "SGD"}}'),), one_rank=True),
    Row("train", TINY_DS, "scheduler type 'OneCycle' is not supported; use WarmupCosineLR",
        "a scheduler other than WarmupCosineLR", files=(("ds.json", '{"scheduler": {"type": "OneCycle"}}'),),
        one_rank=True),
    Row("train", TINY_DS, "the DeepSpeed JSON enables both bf16 and fp16",
        "bf16 and fp16 both enabled", files=(("ds.json", '{"bf16": {"enabled": true}, "fp16": {"enabled": true}}'),),
        one_rank=True),
    Row("train", TINY_DS + " --dtype=float32", "--dtype=float32 contradicts the DeepSpeed JSON (bfloat16)",
        "a --dtype other than the JSON's", files=(("ds.json", '{"bf16": {"enabled": true}}'),), one_rank=True),
    Row("train", TINY_DS, "ZeRO-3 does not support native MoE layers in DeepSpeed; use ZeRO-1 or ZeRO-2",
        "ZeRO-3 with use_moe=True", files=(("ds.json", '{"zero_optimization": {"stage": 3}}'),), one_rank=True),
    Row("train", TINY_DS + " --use_moe=False", "ZeRO-3 with offload_optimizer to NVMe is not supported: this "
        "trainer's checkpoints read and write the partitions in memory; offload to \"cpu\" instead",
        "ZeRO-3 with an optimizer offloaded to NVMe",
        files=(("ds.json", '{"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}}'),),
        one_rank=True),
    Row("train", TINY_DS, "the DeepSpeed JSON's \"activation_checkpointing\" sets cpu_checkpointing, which this "
        "trainer does not implement", "a DeepSpeed activation-checkpointing option other than recomputing blocks",
        files=(("ds.json", '{"activation_checkpointing": {"cpu_checkpointing": true}}'),), one_rank=True),
    Row("train", TINY_DS, "the DeepSpeed JSON's activation_checkpointing.number_checkpoints=1, but this trainer "
        "checkpoints every block (n_layer=2)", "checkpointing only some blocks",
        files=(("ds.json", '{"activation_checkpointing": {"number_checkpoints": 1}}'),), one_rank=True),
    Row("train", "<tiny> --deepspeed_config=ds_configs/zero2.json --init_from=resume",
        "no checkpoint in <tmp> (no iter_N/metadata.json); train first, or check --out_dir", "resuming where DeepSpeed saved nothing",
        one_rank=True),
    # ------------------------------------------------ launch/sample.py
    Row("sample", "--temperature=inf", "--temperature must be a number >= 0, got inf",
        "an infinite temperature (0 is greedy, not refused)"),
    Row("sample", "--temperature=-1", "--temperature must be a number >= 0, got -1.0", "a negative temperature"),
    Row("sample", "--top_k=0", "--top_k must be at least 1, got 0", "a top_k below 1"),
    Row("sample", "--start=", "--start is empty; give a prompt", "an empty prompt"),
    Row("sample", "--num_samples=0", "--num_samples must be at least 1, got 0", "num_samples or max_new_tokens below 1"),
    Row("sample", "--dtype=float8", "argument --dtype: invalid choice: 'float8'", "a dtype argparse does not offer"),
    Row("sample", "--top_k=all", "argument --top_k: invalid int value: 'all'", "a value of the wrong type"),
    Row("sample", "--temprature=1", "unrecognized arguments: --temprature=1", "an unknown argument"),
    Row("sample", "--out_dir=<tmp> --device=cpu", "no checkpoint in <tmp> (no iter_N/metadata.json); train first, or check --out_dir",
        "an out_dir with no checkpoint"),
    Row("sample", "--out_dir=<ckpt> --device=cpu --start=FILE:<tmp>/nope.txt",
        "--start=FILE:<tmp>/nope.txt: cannot read it as UTF-8 text (No such file or directory)",
        "a prompt file that is not there"),
    Row("sample", "--out_dir=<ckpt> --device=cpu --start=FILE:<tmp>/empty.txt",
        "--start=FILE:<tmp>/empty.txt: the file is empty", "an empty prompt file", files=(("empty.txt", ""),)),
    Row("sample", "--out_dir=<ckpt> --device=cpu --start=Ω", "--start has characters not in the vocabulary: ['Ω']",
        "a prompt a char-level model cannot encode"),
    Row("sample", "--out_dir=<tmp> --device=cuda", "--device=cuda but CUDA is not available here; use --device=cpu",
        "a GPU on a machine without one", skip="cuda"),
    # ------------------------------------------------ data/*/prepare.py
    Row("char", "--input <tmp>/nope.txt --out_dir <tmp>/out", "input file not found: <tmp>/nope.txt",
        "an --input that is not there"),
    Row("char", "--input <tmp> --out_dir <tmp>/out", "input path is not a file: <tmp>", "a directory as --input"),
    Row("char", "--input <tmp>/empty.txt --out_dir <tmp>/out", "input file is empty: <tmp>/empty.txt",
        "an empty --input", files=(("empty.txt", ""),)),
    Row("char", "--input <tmp>/latin1.txt --out_dir <tmp>/out", "could not read <tmp>/latin1.txt as UTF-8 text (",
        "an --input that is not UTF-8", files=(("latin1.txt", "caf\xe9".encode("latin-1")),)),
    Row("char", "--input <tmp>/a.txt --out_dir <tmp>/out",
        "input has only 1 characters, too few for a 90/10 train/val split", "a text too short to split",
        files=(("a.txt", "a"),)),
    Row("char", "--input <tmp>/wide.txt --out_dir <tmp>/out", "65,537 distinct characters do not fit in uint16",
        "more distinct characters than uint16 ids",
        files=(("wide.txt", WIDE),)),
    Row("char", "--input <tmp>/a.txt --out_dir <tmp>/f", "--out_dir <tmp>/f cannot be made: <tmp>/f is a file",
        "an --out_dir that is a file", files=(("a.txt", "hello world"), ("f", "x"))),
    Row("char", "--inptu x", "unrecognized arguments: --inptu x", "an unknown argument"),
    Row("bpe", "--input <tmp>/a.txt --out_dir <tmp>/out",
        "input has only 1 characters, too few for a 90/10 train/val split", "a text too short to split",
        files=(("a.txt", "a"),)),
    Row("bpe", "--input <tmp>/a.txt --out_dir <tmp>/f/sub", "--out_dir <tmp>/f/sub cannot be made: <tmp>/f is a file",
        "an --out_dir under a file", files=(("a.txt", "hello world"), ("f", "x"))),
    Row("owt", "--input <tmp>/one.txt --out_dir <tmp>/out", "<tmp>/one.txt holds 1 document(s); need at least 2",
        "a local text with one document", files=(("one.txt", "just one paragraph\n"),)),
    Row("owt", "--input <tmp>/one.txt --test_size 0", "--test_size must be a fraction between 0 and 1, got 0.0",
        "a val fraction outside (0, 1)"),
    Row("owt", "--out_dir <tmp>/f", "--out_dir <tmp>/f cannot be made: <tmp>/f is a file",
        "an --out_dir that is a file", files=(("f", "x"),)),
    Row("owt", "--split_on word", "argument --split_on: invalid choice: 'word'", "an unknown --split_on"),
    # ------------------------------------------------ launch/export.py
    Row("export", "<ckpt> <tmp>/hf --format=onnx", "argument --format: invalid choice: 'onnx'", "an unknown format"),
    Row("export", "<ckpt> <tmp>/hf --format=hf --weights_only",
        "--weights_only is for --format=pt; --format=hf writes the weights alone", "--weights_only with --format=hf"),
    Row("export", "<ckpt> <tmp>/model.pt --max_shard_size=1GB",
        "--max_shard_size is for --format=hf; the .pt format keeps the checkpoint's fp32 in one file",
        "an option of --format=hf (--dtype, --max_shard_size) with the .pt format"),
    Row("export", "<ckpt> <tmp>/hf --format=hf --max_shard_size=5XB",
        "argument --max_shard_size: expected a positive size such as 5GB, 500MB or 2GiB, got '5XB'",
        "a shard size that is not one"),
    Row("export", "<ckpt> <tmp>/hf --format=hf", "<tmp>/hf already exists and is not an empty directory; export into "
        "a new directory (an export never overwrites)", "an export directory that holds files",
        files=(("hf/keep.txt", "mine"),)),
]


def expand(text: str, where: dict) -> str:
    for name, value in where.items():
        text = text.replace(f"<{name}>", str(value))
    return text


@pytest.fixture(scope="session")
def trained(char_data, tmp_path_factory, forkserver) -> Path:
    """A tiny char-level checkpoint for the sample.py rows that get past loading it."""
    out = tmp_path_factory.mktemp("trained")
    r = forkserver.run(["launch/train.py", *tiny_args(char_data, out, max_iters=1, eval_interval=1)],
                       env=loopback_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.mark.parametrize("row", ROWS, ids=[f"row{i}-{r.script}" for i, r in enumerate(ROWS, 1)])  # the doc's "#"
def test_refused_in_one_line_before_compute(row, char_data, tmp_path, request, forkserver):
    """The row's script in a process of its own (forked: tests/forkserver.py), as a user would run it."""
    if row.skip and SKIPS[row.skip][1]():
        pytest.skip(SKIPS[row.skip][0])
    where = {"tmp": tmp_path, "data": char_data}
    if "<ckpt>" in row.args:
        where["ckpt"] = request.getfixturevalue("trained")
    if row.copy_data:
        shutil.copytree(char_data, tmp_path / "data")
    for name, content in row.files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    args = []
    for word in shlex.split(row.args):
        args += tiny_args(char_data, tmp_path) if word == "<tiny>" else [expand(word, where)]
    env = loopback_env(**(dict(RANK=0, LOCAL_RANK=0, WORLD_SIZE=1, MASTER_PORT=free_port()) if row.one_rank else {}))
    r = forkserver.run([SCRIPTS[row.script], *args], env=env, timeout=180)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: " + expand(row.message, where)), r.stderr[-3000:]
    assert not list(tmp_path.rglob("metrics.jsonl")), "training started"


def test_missing_meta_says_which_vocab_it_assumed(char_data, tmp_path, forkserver):
    """Not a refusal: without meta.pkl the GPT-2 vocab is right for GPT-2-token data, so it is said, not refused."""
    shutil.copytree(char_data, tmp_path / "data")
    (tmp_path / "data/meta.pkl").unlink()
    r = forkserver.run(["launch/train.py", *tiny_args(tmp_path / "data", tmp_path / "out"), "--eval_only=True",
                        "--eval_iters=1"], env=loopback_env(), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    said = [line for line in r.stdout.splitlines() if "meta.pkl" in line]
    assert said == ["no meta.pkl with the data: assuming GPT-2 tokens, vocab_size 50304 (50257 rounded up to a "
                    "multiple of 64); pass --vocab_size to change it"], r.stdout


# ---------------------------------------------------------------- docs/errors.md, made from ROWS
def cell(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = ["# Errors: every refusal, and what triggers it", "",
             "Bad input stops a run before any compute with one line on stderr, `error: ...`, and exit status 2",
             "(in a multi-rank run, every rank that has the error prints it, as `error: rank R: ...`).",
             "Each row below is run as written by",
             "`tests/test_errors.py`, which checks that line, the exit status and that no training started;",
             "this page is generated from that test's table (`python tests/test_errors.py`), so the two cannot drift.",
             "", "Placeholders: `<tiny>` is the tests' seconds-long tiny MoE run, `<data>` prepared shakespeare_char,",
             "`<tmp>` an empty folder (the row's files are written into it first), `<ckpt>` an out_dir with a trained",
             "checkpoint. The message column is how the line starts; most are whole, some go on with details",
             "(a JSON parser's position, an exception's text, the rest of the advice).", "",
             "| # | Entry point | Arguments | Trigger | Message |", "|---|---|---|---|---|"]
    for i, row in enumerate(ROWS, 1):
        flags = [" (as rank 0 of 1)" if row.one_rank else "", f" (skipped where {SKIPS[row.skip][0]})" if row.skip else ""]
        lines.append(f"| {i} | `{SCRIPTS[row.script]}` | `{cell(row.args)}` | {cell(row.trigger)}{''.join(flags)} "
                     f"| `error: {cell(row.message)}` |")
    lines += ["", "Not refused: a dataset without `meta.pkl` trains with GPT-2's vocab (50304), which is right for",
              "GPT-2-token data such as openwebtext, and says so in one line on stdout "
              "(`test_missing_meta_says_which_vocab_it_assumed`).",
              "Nor is a `data_dir` without `tokens.json` (data from an older prepare.py): rank 0 scans train.bin and",
              "val.bin once, writes `tokens.json` so that later starts check it instead, and says so in one line on",
              "stdout (tests/test_data.py).", "",
              "Refusals not in the table, because a machine-independent run cannot trigger them:",
              "- a precision the device lacks (`--dtype` or the JSON asks for float16 on a CPU without native fp16,",
              "  bfloat16 on an old GPU): depends on the hardware; tested in-process with every answer the device",
              "  may give (tests/test_precision.py, tests/test_deepspeed.py); likewise fp16 with ZeRO-0 and MoE",
              "  (the exact MoE clip would see loss-scaled gradients), tested in tests/test_ds_config.py;",
              "- a failed download or checksum of Tiny Shakespeare, tiktoken's BPE file or the Hugging Face hub",
              "  in the prepare scripts: need the network; the checksum and download refusals are tested in",
              "  tests/test_prepare.py;",
              "- upcycling settings that can't start where the dense model left off (expert_hidden narrower than",
              "  the dense MLP, swiglu experts, capacity_factor > 0) and GPT-2 variants this model does not implement",
              "  (another activation_function, n_inner, layer_norm_epsilon): they need a dense source; tested",
              "  in-process in tests/test_upcycle.py and tests/test_model.py;",
              "- a GPT-2 name with no network and no cache: tested in-process in tests/test_model.py;",
              "- an export (`launch/export.py --format=hf`) of a checkpoint with a model key or value the exported",
              "  model does not implement, or whose index disagrees with its model_args: need a checkpoint edited",
              "  by hand; tested in-process in tests/test_export.py;",
              "- the benchmark scripts' argument checks (bench/*.py), which are not part of training.", "",
              "Stops during training, exit status 3 and nothing of the bad state saved (not input errors, so not",
              "in the table): a non-finite loss or gradient norm (tests/test_checkpoint.py); replicas of a weight that",
              "differ between ranks, and ranks that reduced their gradients in different orders",
              "(docs/equivalence.md; tests/test_guards.py, tests/test_grad_order.py).", ""]
    return "\n".join(lines)


def test_docs_list_exactly_these_rows():
    assert DOC.read_text() == render(), "docs/errors.md is out of date: run `python tests/test_errors.py`"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"wrote {DOC.relative_to(REPO)} ({len(ROWS)} rows)")
