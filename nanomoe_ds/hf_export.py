"""Export a checkpoint as a directory that `transformers` loads (`launch/export.py --format=hf`).

    DIR/config.json               the model's keys; an MoE's names its code (auto_map)
    DIR/modeling_nanomoe.py       that code (MoE only): AutoModelForCausalLM(..., trust_remote_code=True)
    DIR/model.safetensors         the weights; past --max_shard_size, model-0000i-of-0000n.safetensors
                                  and model.safetensors.index.json (transformers' standard index)
    DIR/generation_config.json    launch/sample.py's defaults (temperature 0.8, top_k 200)
    DIR/tokenizer.json, ...       the run's tokenizer, where this machine has it
    DIR/README.md                 a model card: the config, tokens seen, val loss, the experts' load

A dense run exports as a stock GPT2LMHeadModel (Conv1D weights transposed, absent biases as
zeros), with no code. An MoE has no stock class, so modeling_nanomoe.py travels with it.

The export streams: it reads the checkpoint a chunk at a time (Checkpoint.read_into, into one
reused buffer) and writes each chunk into the shard where its tensor lies, so it holds that chunk
and the reader's record (two while it moves to the next), whatever the model's size, and no rank
or GPU. (A dense export's transposed matrices are the exception: each is read whole, and held with
its transpose.) The safetensors
header is written first, from the shapes in the checkpoint's index. Everything is written into
DIR.partial and renamed to DIR at the end: a killed export leaves no DIR that looks complete.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import modeling_nanomoe as modeling
from .checkpoint import RECORD_BYTES, CheckpointError, tensor_key
from .config import HF_CONV1D_WEIGHTS, ConfigError, GPTConfig
from .data import load_meta, resolve_data_dir
from .metrics import records
from .model import GPT
from .train_state import state_buffers

MODELING_FILE = Path(__file__).with_name("modeling_nanomoe.py")
# GPTConfig keys that change only how a model trains or which kernel runs it: an export leaves them out.
# Every other key must be one that modeling_nanomoe.NanoMoEConfig takes (model_keys), or the export is refused.
TRAINING_ONLY_KEYS = ("router_jitter", "aux_loss_coef", "z_loss_coef", "bias_update_rate", "moe_impl")
# Keys whose value is a choice, and the modeling file's tuple of the choices it implements.
CHOICE_KEYS = {"gate": "GATES", "expert_act": "EXPERT_ACTS", "activation": "ACTIVATIONS",
               "capacity_priority": "CAPACITY_PRIORITIES"}
GPT2_GELU = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # ours -> GPT2Config.activation_function
DTYPES = {"float32": (torch.float32, "F32"), "bfloat16": (torch.bfloat16, "BF16"), "float16": (torch.float16, "F16")}
GPT2_EOS = 50256  # <|endoftext|>, GPT-2's only special token
# GPT-2's BPE files as tiktoken fetches (and caches) them: name in a transformers directory, URL, SHA-256.
TIKTOKEN_GPT2 = {
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
}


# ---------------------------------------------------------------- what to write (decided before writing)
def model_keys() -> tuple[str, ...]:
    """The model keys the exported MoE implements: the parameters of the modeling file's NanoMoEConfig."""
    names = inspect.signature(modeling.NanoMoEConfig.__init__).parameters
    return tuple(n for n, p in names.items() if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD)


def implemented_choices(key: str) -> tuple[str, ...]:
    """The values of a choice key (CHOICE_KEYS) that the modeling file implements."""
    return getattr(modeling, CHOICE_KEYS[key])


def exportable_config(model_args: dict) -> GPTConfig:
    """The checkpoint's model config, or a one-line refusal naming a key or value the export cannot carry."""
    known = set(model_keys()) | set(TRAINING_ONLY_KEYS)
    for key, value in model_args.items():
        if key not in known:
            raise ConfigError(f"the checkpoint's model key {key}={value!r} is not implemented by the exported model "
                              f"({MODELING_FILE.name}); export it with --format=pt, or with the nanomoe_ds that "
                              "trained it")
        if key in CHOICE_KEYS and value not in implemented_choices(key):
            raise ConfigError(f"the checkpoint's {key}={value!r} is not implemented by the exported model "
                              f"({MODELING_FILE.name} implements {', '.join(implemented_choices(key))}); "
                              "export it with --format=pt")
    return GPTConfig(**model_args)


@dataclass(frozen=True)
class OutTensor:
    """One tensor of the export: its name and shape there, and where it comes from in the checkpoint."""
    name: str
    shape: tuple
    key: str | None  # the checkpoint's tensor; None: zeros (a bias GPT-2 has and a bias=False run lacks)
    transpose: bool = False  # GPT-2's Conv1D weights are stored [in, out]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())


def meta_model(model_cfg: GPTConfig) -> GPT:
    """The model's structure without its memory: built on the meta device."""
    with torch.device("meta"):
        return GPT(model_cfg)


def saved_shapes(model_cfg: GPTConfig) -> dict[str, tuple]:
    """Name -> shape of every tensor a checkpoint of this model holds, in state_dict order. A tied weight
    appears once, by its first name."""
    model = meta_model(model_cfg)
    return {**{n: tuple(p.shape) for n, p in model.named_parameters()},
            **{n: tuple(b.shape) for n, b in state_buffers(model)}}


def tensor_plan(ckpt, model_cfg: GPTConfig) -> list[OutTensor]:
    """Every tensor of the export, checked against the checkpoint's index (a missing one or another shape
    is refused in one line). An MoE keeps our names; a dense model takes GPT-2's layout."""
    ours = saved_shapes(model_cfg)
    for name, shape in ours.items():
        key = tensor_key("model", name)
        if not ckpt.has(key) or ckpt.shape(key) != shape:
            found = f"has shape {list(ckpt.shape(key))}" if ckpt.has(key) else "is missing"
            raise CheckpointError(f"{ckpt.directory}: {key} {found}, but its model_args make it {list(shape)}; "
                                  "the checkpoint is inconsistent")
    if model_cfg.use_moe:
        return [OutTensor(name, shape, tensor_key("model", name)) for name, shape in ours.items()]
    plan = []
    for name, shape in saved_shapes(replace(model_cfg, bias=True)).items():  # GPT-2 always has biases
        transpose = name.endswith(HF_CONV1D_WEIGHTS)
        plan.append(OutTensor(name, shape[::-1] if transpose else shape,
                              tensor_key("model", name) if name in ours else None, transpose))
    return plan


def plan_shards(tensors: list[OutTensor], itemsize: int, max_bytes: int) -> list[list[OutTensor]]:
    """Tensors in order, cut into shards of at most max_bytes (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for t in tensors:
        nbytes = t.numel * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def check_dest(dest: str) -> Path:
    """The directory to write: new, or empty (an export never overwrites)."""
    target = Path(dest)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{dest} already exists and is not an empty directory; export into a new directory "
                          "(an export never overwrites)")
    return target


# ---------------------------------------------------------------- the tokenizer
@dataclass
class Tokenizer:
    """The run's tokenizer as this machine has it: a char vocabulary, GPT-2 BPE files, or nothing (and why)."""
    kind: str  # "char", "gpt2" or "none"
    stoi: dict = field(default_factory=dict)  # char: character -> id
    files: dict = field(default_factory=dict)  # gpt2: name in the export -> where it is here
    why: str = ""  # none: why not, for the export's line and the model card

    @property
    def eos(self) -> int | None:
        return GPT2_EOS if self.kind == "gpt2" else None


def find_tokenizer(run_config: dict, vocab_size: int) -> Tokenizer:
    """The tokenizer of the run: the data's meta.pkl vocabulary (char-level data), else GPT-2 BPE
    (as launch/sample.py decodes), whose files come from wherever this machine already has them."""
    data_dir = resolve_data_dir(run_config.get("dataset", ""), run_config.get("data_dir", ""))
    meta = load_meta(data_dir) if run_config.get("dataset") else None
    if meta is not None and "stoi" in meta:
        return Tokenizer("char", stoi=meta["stoi"])
    if vocab_size < GPT2_EOS + 1:
        return Tokenizer("none", why=f"no tokenizer: the run's {data_dir / 'meta.pkl'} is not here and vocab_size "
                                     f"{vocab_size} is not GPT-2's; copy that meta.pkl back and export again")
    files = gpt2_files(run_config.get("init_from", ""))
    if files is None:
        return Tokenizer("none", why="no tokenizer: GPT-2's BPE files are not on this machine; add them with "
                                     "AutoTokenizer.from_pretrained('openai-community/gpt2').save_pretrained(DIR)")
    return Tokenizer("gpt2", files=files)


def gpt2_files(init_from: str) -> dict | None:
    """GPT-2's vocab.json and merges.txt (and tokenizer.json where there is one) from, in order: the run's
    init_from directory, the Hugging Face cache, tiktoken's cache (checked against GPT-2's hashes); None."""
    names = ("vocab.json", "merges.txt", "tokenizer.json")
    if init_from and os.path.isdir(init_from):
        found = {n: Path(init_from) / n for n in names if (Path(init_from) / n).is_file()}
        if {"vocab.json", "merges.txt"} <= set(found):
            return found
    from huggingface_hub import try_to_load_from_cache
    for repo in ("openai-community/gpt2", "gpt2"):
        found = {n: try_to_load_from_cache(repo, n) for n in names}
        found = {n: Path(p) for n, p in found.items() if isinstance(p, str)}
        if {"vocab.json", "merges.txt"} <= set(found):
            return found
    cache = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR",
                                                                 os.path.join(tempfile.gettempdir(), "data-gym-cache")))
    found = {n: Path(cache) / hashlib.sha1(url.encode()).hexdigest() for n, (url, _) in TIKTOKEN_GPT2.items()}
    if all(p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest() == TIKTOKEN_GPT2[n][1] for n, p in found.items()):
        return found
    return None


def write_tokenizer(directory: Path, tokenizer: Tokenizer, block_size: int):
    """The tokenizer files AutoTokenizer loads: a char vocabulary as a tokenizers WordLevel model (each
    character one token, decoded by joining), or GPT-2's BPE files."""
    settings = {"model_max_length": block_size, "clean_up_tokenization_spaces": False}
    if tokenizer.kind == "char":
        from tokenizers import Regex, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as Tok
        tok = Tok(models.WordLevel(vocab=tokenizer.stoi, unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        tok.decoder = decoders.Fuse()
        tok.save(str(directory / "tokenizer.json"))
        write_json(directory / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", **settings})
    elif tokenizer.kind == "gpt2":
        for name, path in tokenizer.files.items():
            shutil.copyfile(path, directory / name)
        special = "<|endoftext|>"
        write_json(directory / "tokenizer_config.json", {"tokenizer_class": "GPT2Tokenizer", "bos_token": special,
                                                         "eos_token": special, "unk_token": special, **settings})


# ---------------------------------------------------------------- writing
def write_json(path: Path, obj: dict):
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def chunks(ckpt, tensor: OutTensor, buffer: torch.Tensor):
    """The tensor's values in the export's layout, fp32, as 1-D pieces read into `buffer` (reused: the export
    holds one chunk, whatever the tensor's size)."""
    size = buffer.numel()
    whole = ckpt.whole(tensor.key).t().contiguous().view(-1) if tensor.transpose else None  # not a range of it
    for start in range(0, tensor.numel, size):
        piece = buffer[:min(size, tensor.numel - start)]
        if whole is not None:
            piece.copy_(whole[start:start + piece.numel()])
        elif tensor.key is None:
            piece.zero_()
        else:
            ckpt.read_into(tensor.key, start, piece)
        yield piece


def write_safetensors(path: Path, tensors: list[OutTensor], ckpt, dtype: str, chunk_elems: int):
    """One safetensors file, streamed: the header (from the shapes), then each tensor chunk by chunk."""
    torch_dtype, code = DTYPES[dtype]
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    header, offset = {}, 0
    for t in tensors:
        header[t.name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + t.numel * itemsize]}
        offset += t.numel * itemsize
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does
    buffer = torch.empty(min(chunk_elems, max(t.numel for t in tensors)))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            for piece in chunks(ckpt, t, buffer):
                piece = piece.to(torch_dtype)
                f.write(memoryview((piece.view(torch.int16) if itemsize == 2 else piece).numpy()).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def write_weights(directory: Path, tensors: list[OutTensor], ckpt, dtype: str, max_shard_bytes: int,
                  chunk_elems: int) -> list[str]:
    """The safetensors shards, and the index transformers reads when there are several; their names."""
    itemsize = torch.empty(0, dtype=DTYPES[dtype][0]).element_size()
    shards = plan_shards(tensors, itemsize, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for name, shard in zip(names, shards):
        write_safetensors(directory / name, shard, ckpt, dtype, chunk_elems)
    if len(shards) > 1:
        write_json(directory / "model.safetensors.index.json", {
            "metadata": {"total_size": sum(t.numel for t in tensors) * itemsize},
            "weight_map": {t.name: name for name, shard in zip(names, shards) for t in shard}})
    return names


def hf_config(model_cfg: GPTConfig, dtype: str, eos: int | None) -> dict:
    """config.json: a stock GPT-2's for a dense model; else the modeling file's keys and where its code is."""
    common = {"vocab_size": model_cfg.vocab_size, "n_layer": model_cfg.n_layer, "n_head": model_cfg.n_head,
              "n_embd": model_cfg.n_embd, "tie_word_embeddings": True, "dtype": dtype,
              "bos_token_id": eos, "eos_token_id": eos}
    if not model_cfg.use_moe:
        drop = model_cfg.dropout
        return {**common, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                "n_positions": model_cfg.block_size, "n_inner": None, "layer_norm_epsilon": 1e-5,
                "activation_function": GPT2_GELU[model_cfg.activation], "resid_pdrop": drop, "embd_pdrop": drop,
                "attn_pdrop": drop, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True}
    args = asdict(model_cfg)
    return {**{k: args[k] for k in model_keys()}, **common, "architectures": ["NanoMoEForCausalLM"],
            "model_type": "nanomoe", "use_cache": False,
            "auto_map": {"AutoConfig": "modeling_nanomoe.NanoMoEConfig",
                         "AutoModelForCausalLM": "modeling_nanomoe.NanoMoEForCausalLM"}}


def generation_config(eos: int | None) -> dict:
    """launch/sample.py's defaults; greedy decoding is do_sample=False (sample.py's --temperature=0)."""
    return {"do_sample": True, "temperature": 0.8, "top_k": 200, "bos_token_id": eos, "eos_token_id": eos,
            "pad_token_id": eos}


# ---------------------------------------------------------------- the model card
def training_summary(rows: list[dict], iter_num: int, window: int = 50) -> dict:
    """What the model card says of the run up to the checkpoint's iteration, from metrics.jsonl's records:
    the tokens seen, the last evaluation at or before it, and each MoE layer's load summed over the last
    `window` logged steps before it. A record of an iteration logged twice (a run resumed from an older
    checkpoint) counts as its last copy."""
    steps = {r["iter"]: r for r in rows if "loss" in r and r.get("iter", iter_num) < iter_num}
    evals = {r["iter"]: r for r in rows if "val_loss" in r and r.get("iter", iter_num + 1) <= iter_num}
    last_eval = evals[max(evals)] if evals else None
    tokens = [r["tokens"] for r in (*steps.values(), *evals.values()) if "tokens" in r]
    recent = [steps[i] for i in sorted(steps)[-window:] if steps[i].get("moe")]
    layers = []
    for per_step in zip(*(r["moe"] for r in recent)):  # one tuple per MoE layer
        load = torch.tensor([s["tokens_per_expert"] for s in per_step]).sum(0).double()
        layers.append({"tokens_per_expert": load.long().tolist(), "load_cv": float(load.std(unbiased=False) / load.mean()),
                       "max_over_mean": float(load.max() / load.mean()), "dead_experts": int((load == 0).sum()),
                       "drop_frac": sum(s["drop_frac"] for s in per_step) / len(per_step)})
    return {"tokens": max(tokens) if tokens else None, "eval": last_eval, "layers": layers,
            "window": (min(r["iter"] for r in recent), max(r["iter"] for r in recent)) if recent else None}


def model_card(model_cfg: GPTConfig, meta: dict, summary: dict, tokenizer: Tokenizer) -> str:
    """README.md: what the model is, how to load it, how it was trained, and its experts' load."""
    model = meta_model(model_cfg)
    total, active = model.get_num_params(non_embedding=False), model.get_num_params(non_embedding=False, active=True)
    kind = (f"a GPT-2 whose MLPs are Mixture-of-Experts layers ({model_cfg.num_experts} experts, top-"
            f"{model_cfg.num_experts_per_tok}), {total / 1e6:.2f}M parameters, {active / 1e6:.2f}M active per token"
            if model_cfg.use_moe else f"a GPT-2 (a stock GPT2LMHeadModel), {total / 1e6:.2f}M parameters")
    remote = ", trust_remote_code=True" if model_cfg.use_moe else ""
    lines = ["---", "library_name: transformers",
             f"tags: [nanomoe_ds, {'mixture-of-experts' if model_cfg.use_moe else 'gpt2'}]", "---", "",
             f"# A nanomoe_ds model, iteration {meta['iter_num']}", "",
             f"This is {kind}, trained with nanomoe_ds and exported by `launch/export.py --format=hf`.", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             'path = "path/to/this/directory"  # or its Hub id, user/name',
             f"model = AutoModelForCausalLM.from_pretrained(path{remote})",
             f"tokenizer = AutoTokenizer.from_pretrained(path{remote})",
             'ids = tokenizer("ROMEO:", return_tensors="pt").input_ids',
             "print(tokenizer.decode(model.generate(ids, max_new_tokens=100, do_sample=False)[0]))", "```", "",
             f"Tokenizer: {tokenizer_phrase(tokenizer)}.", ""]
    lines += training_section(meta, summary) + config_section(model_cfg) + load_section(model_cfg, summary)
    return "\n".join(lines) + "\n"


def tokenizer_phrase(tokenizer: Tokenizer) -> str:
    """What the export holds for a tokenizer, in a few words (the export's line and the model card)."""
    if tokenizer.kind == "char":
        return f"a character tokenizer ({len(tokenizer.stoi)} characters, one token each; any other is refused)"
    if tokenizer.kind == "gpt2":
        return "GPT-2's BPE tokenizer"
    return tokenizer.why


def training_section(meta: dict, summary: dict) -> list[str]:
    config, evaluation = meta.get("config", {}), summary["eval"]
    rows = [("iterations", meta["iter_num"]),
            ("tokens seen", f"{summary['tokens']:,}" if summary["tokens"] is not None else "not logged"),
            ("val loss (cross-entropy)", f"{evaluation['val_loss']:.4f} at iteration {evaluation['iter']}"
             if evaluation else "not evaluated"),
            ("train loss", f"{evaluation['train_loss']:.4f}" if evaluation and "train_loss" in evaluation else "-"),
            ("dataset", config.get("dataset", "-")), ("trained on", describe_topology(meta.get("topology"))),
            ("batch", f"{config.get('batch_size')} x {config.get('block_size')} tokens, "
                      f"{config.get('gradient_accumulation_steps')} micro-batches a step"),
            ("learning rate", config.get("learning_rate", "-"))]
    return ["## Training", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def describe_topology(topology: dict | None) -> str:
    if not topology:
        return "-"
    stage = f", ZeRO-{topology['zero_stage']}" if topology.get("zero_stage") is not None else ""
    return f"{topology['engine']}, {topology['world_size']} rank(s), ep_size {topology['ep_size']}{stage}, " \
           f"{topology['dtype']}"


def config_section(model_cfg: GPTConfig) -> list[str]:
    """The model keys, as `launch/train.py --key=value` takes them (a dense model's: up to use_moe)."""
    args = asdict(model_cfg)
    keys = (*model_keys(), *TRAINING_ONLY_KEYS) if model_cfg.use_moe else model_keys()[:model_keys().index("use_moe") + 1]
    return ["## Model config", "", "| key | value |", "|---|---|", *[f"| `{k}` | {args[k]} |" for k in keys], ""]


def load_section(model_cfg: GPTConfig, summary: dict) -> list[str]:
    if not model_cfg.use_moe:
        return []
    if not summary["layers"]:
        return ["## Experts' load", "", "Not logged (metrics.jsonl was not found or has no MoE statistics).", ""]
    first, last = summary["window"]
    blocks = [i for i in range(model_cfg.n_layer) if model_cfg.is_moe_layer(i)]
    lines = ["## Experts' load", "",
             f"Tokens routed to each expert, summed over the logged steps {first}-{last} (before the checkpoint):",
             "", "| block | share of tokens per expert, % | load CV | max/mean | dead experts | dropped |",
             "|---:|---|---:|---:|---:|---:|"]
    for block, layer in zip(blocks, summary["layers"]):
        shares = " ".join(f"{100 * n / max(sum(layer['tokens_per_expert']), 1):.1f}" for n in layer["tokens_per_expert"])
        lines.append(f"| {block} | {shares} | {layer['load_cv']:.3f} | {layer['max_over_mean']:.2f} | "
                     f"{layer['dead_experts']} | {100 * layer['drop_frac']:.2f}% |")
    return lines + [""]


# ---------------------------------------------------------------- the export
def export_hf(ckpt, dest: str, metrics_path: Path | None, dtype: str = "float32",
              max_shard_bytes: int = 5 * 10**9, chunk_elems: int = RECORD_BYTES // 4) -> str:
    """Write the checkpoint `ckpt` (a checkpoint.Checkpoint) as a transformers directory `dest`; return the
    line to print. Every refusal comes before anything is written."""
    model_cfg = exportable_config(ckpt.meta["model_args"])
    plan = tensor_plan(ckpt, model_cfg)
    target = check_dest(dest)
    tokenizer = find_tokenizer(ckpt.meta.get("config", {}), model_cfg.vocab_size)
    rows = records(open(metrics_path)) if metrics_path is not None and metrics_path.is_file() else []
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a killed export's
    staging.mkdir(parents=True)
    try:
        shards = write_weights(staging, plan, ckpt, dtype, max_shard_bytes, chunk_elems)
        write_json(staging / "config.json", hf_config(model_cfg, dtype, tokenizer.eos))
        write_json(staging / "generation_config.json", generation_config(tokenizer.eos))
        if model_cfg.use_moe:
            shutil.copyfile(MODELING_FILE, staging / MODELING_FILE.name)
        write_tokenizer(staging, tokenizer, model_cfg.block_size)
        summary = training_summary(rows, ckpt.meta["iter_num"])
        (staging / "README.md").write_text(model_card(model_cfg, ckpt.meta, summary, tokenizer))
        if target.exists():
            target.rmdir()  # empty (check_dest)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    load = "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)" if model_cfg.use_moe else \
        "GPT2LMHeadModel.from_pretrained(DIR)"
    return (f"wrote {target}: iteration {ckpt.meta['iter_num']} of {ckpt.directory}, {len(plan)} tensors "
            f"({dtype}) in {len(shards)} file(s); {tokenizer_phrase(tokenizer)}; load it with {load}")


# ---------------------------------------------------------------- back: an exported MoE to train on (init_from)
def load_export(directory: str, run_cfg: GPTConfig) -> GPT:
    """An MoE this module exported, as a model to train (init_from=DIR): its shape from config.json, the run's
    dropout and training-only keys, its weights read from the safetensors files a tensor at a time."""
    from safetensors import safe_open
    path = Path(directory)
    config = json.loads((path / "config.json").read_text())
    lacking = [k for k in model_keys() if k not in config]
    if lacking:
        raise ConfigError(f"init_from '{directory}': its config.json has no {', '.join(lacking)}; export the run "
                          "again with launch/export.py --format=hf")
    model = GPT(exportable_config({**{k: config[k] for k in model_keys()}, "dropout": run_cfg.dropout,
                                   **{k: getattr(run_cfg, k) for k in TRAINING_ONLY_KEYS}}))
    wanted, targets = saved_shapes(model.config), {**dict(model.named_parameters()), **dict(model.named_buffers())}
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    loaded = set()
    with torch.no_grad():
        for name in files:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if wanted.get(key) != tuple(tensor.shape):
                        raise ConfigError(f"init_from '{directory}': {name} holds {key} {list(tensor.shape)}, which "
                                          "its config.json does not make; export the run again")
                    targets[key].copy_(tensor)
                    loaded.add(key)
    if set(wanted) - loaded:
        raise ConfigError(f"init_from '{directory}' has no {', '.join(sorted(set(wanted) - loaded)[:3])}; "
                          "export the run again")
    return model
