"""Typed configuration: a preset file plus --key=value overrides, validated early.

Like nanoGPT's configurator, a preset is a plain Python file whose top-level
assignments override the defaults, and `--key=value` arguments override the
preset. Unlike it, every key is checked against the typed dataclasses below, so
a typo or an impossible value stops the run with one line before any compute.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass


class ConfigError(ValueError):
    """A bad configuration value; its message is a single actionable line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the side scripts (sample, benchmarks): a bad argument is one `error: ...` line, exit 2,
    like every other refusal, instead of a usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message):
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


GATES = ("softmax_topk", "topk_softmax", "sigmoid")
EXPERT_ACTS = ("gelu", "swiglu")
MOE_IMPLS = ("auto", "grouped_mm", "bmm", "loop")
CAPACITY_PRIORITIES = ("score", "position")
# The MLP nonlinearity: exact GELU, or the tanh approximation GPT-2 was trained with
# (Hugging Face's `gelu_new`). Dense MLPs, shared and routed experts all follow it.
ACTIVATIONS = ("gelu", "gelu_tanh")
# Hugging Face `activation_function` values -> ours (anything else is refused on loading).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
# Hugging Face's GPT-2 stores these weights transposed (Conv1D modules); every other name is ours as it is.
HF_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# The published GPT-2 checkpoints init_from accepts by name (fetched by transformers).
HF_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
                 "openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
                 "openai-community/gpt2-xl", "distilbert/distilgpt2")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
CKPT_NAME = "ckpt.pt"  # the single-file checkpoint of versions before the sharded format (still read)


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"  # gelu | gelu_tanh; set from the checkpoint when loading GPT-2
    # --- Mixture of Experts (names of the first three follow the nanoGPT-MoE seed) ---
    use_moe: bool = False
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_every: int = 1  # an MoE MLP in every Nth block, dense elsewhere
    num_shared_experts: int = 0  # DeepSeekMoE: experts every token passes through
    expert_hidden: int = 0  # 0 means 4 * n_embd, like a GPT-2 MLP
    expert_act: str = "gelu"
    gate: str = "softmax_topk"
    router_jitter: float = 0.0  # multiplicative input noise while training (Switch)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    bias_update_rate: float = 0.0  # > 0 turns on aux-loss-free balancing (DeepSeek-V3)
    capacity_factor: float = 0.0  # 0 is dropless
    eval_capacity_factor: float = -1.0  # -1 means: the same as capacity_factor
    capacity_priority: str = "score"
    moe_impl: str = "auto"

    def __post_init__(self):
        if self.expert_hidden == 0:
            self.expert_hidden = 4 * self.n_embd

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.use_moe and (layer_idx + 1) % self.moe_every == 0


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False
    always_save_checkpoint: bool = True
    keep_last: int = 2  # committed checkpoints (iter_N/) kept: the newest and one before it, to fall back on
    resume_iter: int = -1  # init_from=resume: the newest committed checkpoint (-1), or iter_N for N
    # scratch | resume | auto (resume if out_dir holds a checkpoint, else scratch: one command for the first
    # start and every restart) | a GPT-2 name (HF_GPT2_NAMES) | a local HF GPT-2 dir | the out_dir of a dense
    # run | an MoE exported by launch/export.py --format=hf (it continues as it is). A dense source with
    # use_moe=True is upcycled (upcycle.py).
    init_from: str = "scratch"
    upcycle_router_std: float = 0.02  # fresh router init when upcycling: its randomness breaks expert symmetry
    upcycle_noise: float = 0.0  # > 0 perturbs expert copies multiplicatively (gives up the exact step-0 start)
    log_moe_stats: bool = True
    # wandb
    wandb_log: bool = False
    wandb_project: str = "nanomoe"
    wandb_run_name: str = "run"
    # monitoring (metrics.py; docs/training.md, "Monitoring")
    tensorboard_dir: str = ""  # TensorBoard event files go here when set
    progress: bool = True  # a tqdm bar on rank 0, only when stdout is a terminal
    profile: bool = False  # after 5 warm-up steps, time 3 steps by part (attention, router, experts, ...)
    peak_tflops: float = 0.0  # the device's peak for MFU; 0 looks it up in metrics.PEAK_TFLOPS
    # data
    dataset: str = "openwebtext"
    data_dir: str = ""  # default: data/<dataset> in the repository
    gradient_accumulation_steps: int = 40  # global micro-batches per step, split over ranks
    batch_size: int = 12  # micro-batch size per rank
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # learning-rate schedule: linear warmup, cosine decay to min_lr
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000
    min_lr: float = 6e-5
    # system
    device: str = "cuda"
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = True
    # Recompute each transformer block in backward instead of keeping its activations:
    # less memory for about one more forward per step (activation_checkpoint.py).
    activation_checkpointing: bool = False
    seed: int = 1337
    # DeepSpeed (the JSON owns precision, ZeRO, clipping and batch sizes)
    deepspeed_config: str = ""
    ep_size: int = 1
    # On 1 rank ZeRO-1/2/3 partition nothing: run ZeRO-0 instead (same update, no per-step
    # copies; ds_config.drop_idle_zero). False keeps the JSON's stage, e.g. to debug it.
    zero_single_rank_as_stage0: bool = True
    local_rank: int = -1  # set by the deepspeed launcher; otherwise unused
    # Seconds a collective may wait for the other ranks before the job fails. A hung rank
    # ends the run after this long (a dead one at once), and an elastic restart follows:
    # keep it short. It must outlast the longest time one rank works while the others
    # wait: a save of its share, the first start's data check, an eval (docs/elastic.md).
    dist_timeout: int = 600
    # Runtime guards (guards.py, grad_order.py; docs/equivalence.md). Every this many
    # iterations the ranks that hold copies of a tensor compare a fingerprint of it
    # (Megatron-Core's --check-weight-hash-across-dp-replicas-interval): -1 at every
    # eval_interval, before the save; 0 never.
    replica_check_interval: int = -1
    # Compare, once per step, the order in which each rank handed its gradients to ZeRO's
    # reduction (one tiny all-reduce a step; on in the tests, as DDP's DETAIL debug mode).
    check_grad_order: bool = False


MODEL_KEYS = {f.name for f in dataclasses.fields(GPTConfig)}
TRAIN_KEYS = {f.name for f in dataclasses.fields(TrainConfig)}
assert not MODEL_KEYS & TRAIN_KEYS, "a key must belong to exactly one config"
ALL_KEYS = MODEL_KEYS | TRAIN_KEYS


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


FIELD_TYPES = {**_field_types(GPTConfig), **_field_types(TrainConfig)}


def _unknown(key: str) -> ConfigError:
    near = difflib.get_close_matches(key, sorted(ALL_KEYS), n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(near)}?" if near else "; see nanomoe_ds/config.py for the keys"
    return ConfigError(f"unknown config key '{key}'{hint}")


def coerce(key: str, value):
    """Convert a string (from the command line) or a Python value (from a preset) to the key's type."""
    if key not in FIELD_TYPES:
        raise _unknown(key)
    want = FIELD_TYPES[key]
    if isinstance(value, str) and want is not str:
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ConfigError(f"--{key}: cannot parse {value!r} as {want.__name__}") from None
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not want:  # bool is an int subclass: be strict on purpose
        raise ConfigError(f"--{key}: expected {want.__name__}, got {type(value).__name__} {value!r}")
    if want is float and not math.isfinite(value):  # 1e999 parses as inf; no setting means infinity or NaN
        raise ConfigError(f"--{key}: {value!r} is not a finite number")
    return value


def parse_args(argv: list[str]) -> dict:
    """Collect overrides from `preset.py` files and `--key=value` / `--key value` args, in order."""
    overrides: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            overrides.update(load_preset(arg))
        else:
            key, eq, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in FIELD_TYPES:
                raise _unknown(key)
            if not eq:
                if FIELD_TYPES[key] is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                    value = "True"  # a bare flag
                elif i + 1 < len(argv):
                    i += 1
                    value = argv[i]
                else:
                    raise ConfigError(f"--{key} needs a value, e.g. --{key}=...")
            overrides[key] = coerce(key, value)
        i += 1
    return overrides


def load_preset(path: str) -> dict:
    try:
        src = open(path).read()
    except OSError as e:
        raise ConfigError(f"cannot read preset file '{path}': {e.strerror}") from None
    scope: dict = {}

    def include(name: str):  # a preset can build on another: include("train_gpt2.py")
        base = os.path.join(os.path.dirname(path), name)
        scope.update(load_preset(base))

    scope["include"] = include
    try:
        exec(compile(src, path, "exec"), scope)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"preset '{path}' failed: {type(e).__name__}: {e}") from None
    return {k: coerce(k, v) for k, v in scope.items()
            if not k.startswith("_") and not callable(v) and not isinstance(v, type(sys))}


def build(overrides: dict) -> tuple[GPTConfig, TrainConfig]:
    model = GPTConfig(**{k: v for k, v in overrides.items() if k in MODEL_KEYS})
    train = TrainConfig(**{k: v for k, v in overrides.items() if k in TRAIN_KEYS})
    validate_model(model)
    validate_train(train)
    validate_parallelism(model, train)
    return model, train


def from_argv(argv: list[str]) -> tuple[GPTConfig, TrainConfig]:
    return build(parse_args(argv))


def _check(cond: bool, msg: str):
    if not cond:
        raise ConfigError(msg)


def validate_model(c: GPTConfig):
    for k in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
        _check(getattr(c, k) > 0, f"{k} must be positive, got {getattr(c, k)}")
    _check(c.n_embd % c.n_head == 0, f"n_embd ({c.n_embd}) must be divisible by n_head ({c.n_head})")
    _check(0.0 <= c.dropout < 1.0, f"dropout must be in [0, 1), got {c.dropout}")
    _check(c.activation in ACTIVATIONS, f"unknown activation '{c.activation}'; choose one of {', '.join(ACTIVATIONS)}")
    if not c.use_moe:
        return
    _check(c.num_experts >= 1, f"num_experts must be at least 1, got {c.num_experts}")
    _check(1 <= c.num_experts_per_tok <= c.num_experts,
           f"num_experts_per_tok must be between 1 and num_experts ({c.num_experts}), got {c.num_experts_per_tok}")
    _check(c.moe_every >= 1, f"moe_every must be at least 1, got {c.moe_every}")
    _check(c.num_shared_experts >= 0, f"num_shared_experts must be >= 0, got {c.num_shared_experts}")
    _check(c.expert_hidden > 0, f"expert_hidden must be a positive integer, got {c.expert_hidden}")
    _check(c.gate in GATES, f"unknown gate '{c.gate}'; choose one of {', '.join(GATES)}")
    _check(c.expert_act in EXPERT_ACTS, f"unknown expert_act '{c.expert_act}'; choose one of {', '.join(EXPERT_ACTS)}")
    _check(c.moe_impl in MOE_IMPLS, f"unknown moe_impl '{c.moe_impl}'; choose one of {', '.join(MOE_IMPLS)}")
    _check(c.capacity_priority in CAPACITY_PRIORITIES,
           f"unknown capacity_priority '{c.capacity_priority}'; choose one of {', '.join(CAPACITY_PRIORITIES)}")
    _check(c.capacity_factor >= 0, f"capacity_factor must be >= 0 (0 is dropless), got {c.capacity_factor}")
    _check(c.eval_capacity_factor >= 0 or c.eval_capacity_factor == -1,
           f"eval_capacity_factor must be >= 0, or -1 for 'same as capacity_factor', got {c.eval_capacity_factor}")
    for k in ("router_jitter", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        _check(getattr(c, k) >= 0 and math.isfinite(getattr(c, k)), f"{k} must be >= 0, got {getattr(c, k)}")


def validate_train(train_cfg: TrainConfig):
    for k in ("batch_size", "gradient_accumulation_steps", "eval_iters", "log_interval", "eval_interval", "ep_size",
              "dist_timeout", "keep_last"):
        _check(getattr(train_cfg, k) >= 1, f"{k} must be at least 1, got {getattr(train_cfg, k)}")
    for k in ("max_iters", "warmup_iters", "lr_decay_iters", "weight_decay", "seed"):  # numpy refuses negative seeds
        _check(getattr(train_cfg, k) >= 0, f"{k} must be >= 0, got {getattr(train_cfg, k)}")
    for k in ("beta1", "beta2"):  # AdamW's moving averages: a coefficient of 1 or more never forgets, and diverges
        _check(0 <= getattr(train_cfg, k) < 1, f"{k} must be in [0, 1), got {getattr(train_cfg, k)}")
    blocker = _file_in_the_way(train_cfg.out_dir)
    _check(blocker is None, f"out_dir '{train_cfg.out_dir}' cannot be made: '{blocker}' is a file, not a directory; "
                            "choose another --out_dir")
    _check(train_cfg.resume_iter >= -1,
           f"resume_iter must be -1 (the newest checkpoint) or an iteration, got {train_cfg.resume_iter}")
    _check(train_cfg.resume_iter == -1 or train_cfg.init_from == "resume",
           f"resume_iter={train_cfg.resume_iter} picks a checkpoint to resume once; it needs --init_from=resume" +
           (" (init_from=auto is the command every restart repeats: with resume_iter it would rewind to "
            f"iteration {train_cfg.resume_iter} again at each one)" if train_cfg.init_from == "auto" else ""))
    _check(train_cfg.dtype in ("auto", "float32", "bfloat16", "float16"),
           f"unknown dtype '{train_cfg.dtype}'; choose auto, float32, bfloat16 or float16")
    if init_source(train_cfg.init_from) in ("run", "export"):
        _check(os.path.realpath(train_cfg.init_from) != os.path.realpath(train_cfg.out_dir),
               f"init_from and out_dir are the same directory ('{train_cfg.out_dir}'): the new run would overwrite its "
               "source; choose another out_dir, or init_from=resume to continue that run")
    for k in ("upcycle_router_std", "upcycle_noise"):
        value = getattr(train_cfg, k)
        _check(value >= 0 and math.isfinite(value), f"{k} must be >= 0, got {value}")
    _check(train_cfg.learning_rate > 0, f"learning_rate must be positive, got {train_cfg.learning_rate}")
    _check(not train_cfg.decay_lr or 0 <= train_cfg.min_lr <= train_cfg.learning_rate,
           f"need 0 <= min_lr ({train_cfg.min_lr}) <= learning_rate ({train_cfg.learning_rate}) when decay_lr=True")
    _check(train_cfg.peak_tflops >= 0, f"peak_tflops must be >= 0 (0 looks the device up), got {train_cfg.peak_tflops}")
    _check(train_cfg.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables it), got {train_cfg.grad_clip}")
    _check(train_cfg.replica_check_interval >= -1,
           f"replica_check_interval must be -1 (every eval_interval), 0 (never) or a number of iterations, "
           f"got {train_cfg.replica_check_interval}")
    dev = train_cfg.device
    _check(dev in ("cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit()),
           f"unknown device '{dev}'; use cpu, cuda, cuda:N or mps")


def validate_parallelism(model_cfg: GPTConfig, train_cfg: TrainConfig):
    """Settings that only make sense together; the world size is checked once the ranks exist."""
    if train_cfg.ep_size == 1:
        return
    _check(model_cfg.use_moe, f"ep_size={train_cfg.ep_size} needs use_moe=True")
    _check(bool(train_cfg.deepspeed_config),
           f"ep_size={train_cfg.ep_size} needs DeepSpeed: expert parallelism spreads experts over "
           "ranks; add --deepspeed_config ds_configs/zero2.json and start it with a launcher")
    _check(model_cfg.num_experts % train_cfg.ep_size == 0,
           f"num_experts ({model_cfg.num_experts}) must be divisible by ep_size ({train_cfg.ep_size})")


def _file_in_the_way(path: str) -> str | None:
    """The existing non-directory that would stop `os.makedirs(path)`, if there is one."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return None if os.path.isdir(path) else path


def is_run_dir(path: str) -> bool:
    """A run of ours: a committed checkpoint (iter_N/metadata.json) or an older version's ckpt.pt.
    (checkpoint.py owns the format; this is its cheap test, here to keep config free of torch.)"""
    import glob
    found = glob.glob(os.path.join(glob.escape(path), "iter_*", "metadata.json"))
    return any(os.path.basename(os.path.dirname(f))[5:].isdigit() for f in found) or \
        os.path.isfile(os.path.join(path, CKPT_NAME))


def resolve_init_from(init_from: str, out_dir_has_checkpoint: bool, out_dir: str = "out") -> str:
    """init_from=auto, the same command for a first start and every restart: resume if out_dir holds
    a checkpoint, else start from scratch. Anything else is returned as given, except a new start
    (scratch, GPT-2, upcycling) over a run: its first save would prune that run's checkpoints, and
    a restart command that forgot --init_from=auto would erase the job it should continue."""
    if init_from == "auto":
        return "resume" if out_dir_has_checkpoint else "scratch"
    if init_from != "resume" and out_dir_has_checkpoint:
        raise ConfigError(f"out_dir '{out_dir}' already holds a run, which --init_from={init_from} would overwrite; "
                          "continue it with --init_from=auto, or start over in another --out_dir "
                          "(or move this one aside)")
    return init_from


def init_source(init_from: str) -> str:
    """What `init_from` names, checked without loading any weights.

    Returns "scratch", "resume", "auto", "hf" (a GPT-2 name, or a local Hugging Face GPT-2
    directory), "export" (an MoE that `launch/export.py --format=hf` wrote: it continues as it
    is) or "run" (the out_dir of a run of ours: a committed iter_N/, or an older version's
    ckpt.pt). Anything else is refused in one line that says what was expected.
    """
    if init_from in ("scratch", "resume", "auto"):
        return init_from
    if os.path.isdir(init_from):
        if is_run_dir(init_from):
            return "run"
        hf_config = os.path.join(init_from, "config.json")
        _check(os.path.isfile(hf_config), f"init_from '{init_from}' is a directory with neither a run of ours "
                                          "(iter_N/metadata.json) nor a Hugging Face GPT-2 (config.json)")
        try:
            with open(hf_config) as f:
                model_type = json.load(f).get("model_type")
        except (OSError, ValueError, AttributeError):
            raise ConfigError(f"init_from '{hf_config}' is not a readable JSON object") from None
        _check(model_type in ("gpt2", "nanomoe"), f"init_from '{init_from}' holds a Hugging Face '{model_type}' "
               "model; only GPT-2 (model_type gpt2) can be loaded, or an MoE exported by launch/export.py (nanomoe)")
        _check(any(os.path.isfile(os.path.join(init_from, w)) for w in HF_WEIGHT_FILES),
               f"init_from '{init_from}' has a {'GPT-2' if model_type == 'gpt2' else 'nanomoe'} config.json but no "
               f"weights ({' or '.join(HF_WEIGHT_FILES[:2])})")
        return "hf" if model_type == "gpt2" else "export"
    _check(init_from in HF_GPT2_NAMES,
           f"unknown init_from '{init_from}'; expected scratch, resume, auto, a GPT-2 name ({', '.join(HF_GPT2_NAMES[:5])}, "
           f"or openai-community/ forms), a local Hugging Face GPT-2 directory, or the out_dir of a run of ours "
           "(holding iter_N/metadata.json)")
    return "hf"


def to_dict(model: GPTConfig, train: TrainConfig) -> dict:
    return {**dataclasses.asdict(model), **dataclasses.asdict(train)}

