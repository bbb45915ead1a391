"""`out_dir/ckpt.pt`: the topology-free training state, and loading a model back for sampling.

Every path writes it: the single-device trainer as its only checkpoint (as nanoGPT),
the DeepSpeed path next to DeepSpeed's own per-rank files, as the last step of a save.
It holds whole tensors keyed by parameter name: the fp32 weights, AdamW's moments and
step, the router bias, plus the iteration, the config and the topology it was saved
at. So any engine at any world size, `ep_size` or ZeRO stage can resume from it.
docs/checkpoints.md has the design.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import CKPT_NAME, ConfigError, GPTConfig, init_source
from .model import GPT


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: str, payload: dict):
    """Write atomically: a crash mid-save must not destroy the previous checkpoint."""
    os.makedirs(out_dir, exist_ok=True)
    path = Path(out_dir) / CKPT_NAME
    tmp = path.with_suffix(".pt.tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:  # on disk before it replaces the old one
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_partial_save(out_dir: str):
    """Delete a ckpt.pt.tmp left by a killed save. Only the run that owns out_dir calls it (on
    resume): a reader (sample.py, init_from) must not, as the run may be writing it right now."""
    (Path(out_dir) / CKPT_NAME).with_suffix(".pt.tmp").unlink(missing_ok=True)


def load(out_dir: str, map_location="cpu") -> dict:
    path = Path(out_dir) / CKPT_NAME
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}; train first, or check --out_dir")
    try:
        # mmap: a DeepSpeed resume at the same topology reads DeepSpeed's own files and only
        # ckpt.pt's small entries; every rank reads this file, so nothing is copied until used.
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    except Exception as e:  # a truncated or overwritten file: zip, pickle or storage errors
        raise ConfigError(f"cannot read {path}: it is truncated or corrupt ({str(e).splitlines()[0][:120]}); "
                          "restore it from a copy, or start again with init_from=scratch") from None


def topology(engine: str, world_size: int, ep_size: int, zero_stage: int | None, dtype: str) -> dict:
    """What a checkpoint's layout on disk depends on; recorded in every checkpoint, compared on load."""
    return {"engine": engine, "world_size": world_size, "ep_size": ep_size, "zero_stage": zero_stage,
            "dtype": dtype}


def describe(topo: dict) -> str:
    stage = f", ZeRO-{topo['zero_stage']}" if topo["zero_stage"] is not None else ""
    return f"{topo['engine']} world {topo['world_size']}, ep_size {topo['ep_size']}{stage}, {topo['dtype']}"


# Model keys that fix the parameters' shapes, and the MLP nonlinearity the weights were trained
# with: on resume they follow the checkpoint. The others (dropout, aux-loss weights, capacity,
# kernel, ...) follow the command line.
SHAPE_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "use_moe", "num_experts",
              "moe_every", "num_shared_experts", "expert_hidden", "expert_act", "activation")


def resume_model_config(saved_args: dict, model_cfg: GPTConfig, given: set[str]) -> GPTConfig:
    """The model config to resume with: shape keys from the checkpoint, refusing any that was given otherwise."""
    saved_args = {"activation": "gelu", **saved_args}  # saved before the key existed: exact GELU
    differ = [k for k in SHAPE_KEYS if k in given and getattr(model_cfg, k) != saved_args[k]]
    if differ:
        listed = ", ".join(f"{k}={getattr(model_cfg, k)} (checkpoint: {saved_args[k]})" for k in differ)
        raise ConfigError(f"init_from=resume: {listed} contradict the checkpoint's model; drop them to resume, "
                          "or train a new model in another out_dir")
    return GPTConfig(**{**vars(model_cfg), **{k: saved_args[k] for k in SHAPE_KEYS}})


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """AdamW's moments as whole tensors keyed by parameter name, and its step count."""
    names = {id(p): n for n, p in model.named_parameters()}
    moments, step = {}, 0
    for p, st in optimizer.state.items():
        if "exp_avg" in st:
            moments[names[id(p)]] = {"exp_avg": st["exp_avg"].detach().float().cpu().clone(),
                                 "exp_avg_sq": st["exp_avg_sq"].detach().float().cpu().clone()}
            step = int(st["step"])
    return {"step": step, "moments": moments}


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict):
    """The inverse of optimizer_state_by_name, for a torch AdamW over `model`'s parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name not in state["moments"]:
                continue
            m = state["moments"][name]
            # torch keeps `step` as a float32 tensor: on the parameter's device for fused AdamW, else on the CPU.
            step_device = p.device if group.get("fused") else "cpu"
            optimizer.state[p] = {"step": torch.tensor(float(state["step"]), dtype=torch.float32, device=step_device),
                                  "exp_avg": m["exp_avg"].to(p.device, p.dtype).clone(),
                                  "exp_avg_sq": m["exp_avg_sq"].to(p.device, p.dtype).clone()}


def model_from_checkpoint(ckpt: dict, dropout: float | None = None) -> GPT:
    """The model a checkpoint holds; checkpoints older than the `activation` key get its default, exact GELU."""
    args = ckpt["model_args"] if dropout is None else {**ckpt["model_args"], "dropout": dropout}
    model = GPT(GPTConfig(**args))
    sd = ckpt["model"]
    prefix = "_orig_mod."  # left by torch.compile
    model.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()})
    return model


def load_source(init_from: str, dropout: float) -> GPT:
    """The model an init_from source names (config.init_source): GPT-2 through transformers, or a run's ckpt.pt."""
    if init_source(init_from) == "hf":
        return GPT.from_pretrained(init_from, {"dropout": dropout})
    return model_from_checkpoint(load(init_from), dropout=dropout)
