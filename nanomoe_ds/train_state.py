"""What a checkpoint carries beside the model's tensors: the run's state, and the rules both engines follow.

`TrainState` is the loop's state and its one writer and reader of the checkpoint's metadata;
the rest are the one rule for each piece of state that the single-device engine and the
DeepSpeed engine both save or restore: which buffers, AdamW's state, RNG, the topology record.
The format they are written in is checkpoint.py's.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .config import GPTConfig, TrainConfig, to_dict
from .model import GPT

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per tensor; checkpoints name them so


@dataclass
class TrainState:
    """The loop's state, which a checkpoint carries on beside the engine's tensors."""
    iter_num: int = 0
    best_val: float = 1e9
    # seconds spent in training steps (evaluation and checkpoints excluded), carried across
    # resumes in the checkpoint: runs compare on it
    train_s: float = 0.0

    def record(self, model_cfg: GPTConfig, train_cfg: TrainConfig) -> dict:
        """The checkpoint's metadata of the run (the engine adds its tensors' layout: checkpoint.py)."""
        return {"iter_num": self.iter_num, "best_val_loss": self.best_val, "train_s": self.train_s,
                "model_args": asdict(model_cfg), "config": to_dict(model_cfg, train_cfg)}

    @classmethod
    def from_record(cls, meta: dict) -> "TrainState":
        """The one reader of record(); train_s is absent from checkpoints written before it was recorded."""
        return cls(meta["iter_num"], meta["best_val_loss"], meta.get("train_s", 0.0))


def state_buffers(model: GPT):
    """(name, buffer) of the buffers a checkpoint holds: the router biases that aux-loss-free balancing
    learns. The one rule, for every engine; other buffers (the causal mask) are rebuilt from the config."""
    return ((name, buffer) for name, buffer in model.named_buffers() if name.endswith("score_bias"))


def adamw_step(step: int, param: torch.Tensor, group: dict) -> torch.Tensor:
    """AdamW's `step` state as torch keeps it: a float32 tensor, on the parameter's device for the fused
    or capturable kernels, else on the CPU (a restore creates it before AdamW's first step would)."""
    device = param.device if group.get("fused") or group.get("capturable") else "cpu"
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def ensure_adamw_state(state: dict, tensor: torch.Tensor, step: int, group: dict):
    """AdamW's state for `tensor` (a parameter, or a ZeRO rank's flat fp32 partition), made as torch makes it
    at its first step, so that a restore can read into it: both moments, and the step. The one place that
    creates it, for every engine."""
    for kind in MOMENTS:
        state.setdefault(kind, torch.zeros_like(tensor, memory_format=torch.preserve_format))
    state["step"] = adamw_step(step, tensor, group)


def rng_state() -> dict:
    """This process's RNG states; on CUDA, only its current device's (each rank has its own)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if torch.cuda.is_available():
        if "cuda_device" in state:
            torch.cuda.set_rng_state(state["cuda_device"])
        elif len(state.get("cuda", ())) == torch.cuda.device_count():  # ckpt.pt: every device it saw
            torch.cuda.set_rng_state_all(state["cuda"])


def topology(engine: str, world_size: int, ep_size: int, zero_stage: int | None, dtype: str) -> dict:
    """What a run's layout depends on; recorded in every checkpoint, compared on load."""
    return {"engine": engine, "world_size": world_size, "ep_size": ep_size, "zero_stage": zero_stage,
            "dtype": dtype}


def describe(topo: dict) -> str:
    stage = f", ZeRO-{topo['zero_stage']}" if topo["zero_stage"] is not None else ""
    return f"{topo['engine']} world {topo['world_size']}, ep_size {topo['ep_size']}{stage}, {topo['dtype']}"
