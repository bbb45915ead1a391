"""Single-device checkpoints (`out_dir/ckpt.pt`) and loading a model back for sampling."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, GPTConfig
from .model import GPT

CKPT_NAME = "ckpt.pt"


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
    os.replace(tmp, path)


def load(out_dir: str, map_location="cpu") -> dict:
    path = Path(out_dir) / CKPT_NAME
    if not path.exists():
        raise ConfigError(f"no checkpoint at {path}; train first, or check --out_dir")
    return torch.load(path, map_location=map_location, weights_only=False)


def model_from_checkpoint(ckpt: dict) -> GPT:
    model = GPT(GPTConfig(**ckpt["model_args"]))
    sd = ckpt["model"]
    prefix = "_orig_mod."  # left by torch.compile
    model.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()})
    return model
