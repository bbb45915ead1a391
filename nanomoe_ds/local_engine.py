"""One device, plain PyTorch (CPU, MPS or one GPU): the Engine (engine.py) of `python launch/train.py`."""
from __future__ import annotations

from contextlib import nullcontext

import torch

from . import checkpoint, checkpoint_dir, precision, train_state
from .config import ConfigError, TrainConfig
from .model import GPT


def resolve_device(train_cfg: TrainConfig, support: precision.Support | None = None) -> tuple[str, torch.dtype]:
    """Check the device and pick a dtype it can run; refuse impossible pairs in one line.

    `support` defaults to asking this machine (precision.supports); tests pass one in.
    """
    kind = train_cfg.device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device={train_cfg.device} but CUDA is not available here; use --device=cpu")
    if kind == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError("--device=mps but MPS is not available here; use --device=cpu")
    support = support or precision.supports(kind)
    name = precision.default_dtype(kind, support) if train_cfg.dtype == "auto" else train_cfg.dtype
    return train_cfg.device, getattr(torch, precision.check(name, kind, support))


class LocalEngine:
    """One device, plain PyTorch: autocast, GradScaler for fp16, AdamW and clipping."""

    rank, world_size = 0, 1

    def __init__(self, model: GPT, train_cfg: TrainConfig, device: str, dtype: torch.dtype):
        self.module, self.train_cfg, self.device, self.compute_dtype = model.to(device), train_cfg, device, dtype
        kind = device.split(":")[0]
        if kind == "cuda":  # the current device is the one whose RNG state checkpoints save (cuda:1 too)
            torch.cuda.set_device(torch.device(device))
        self.ctx = nullcontext() if dtype == torch.float32 else torch.autocast(device_type=kind, dtype=dtype)
        # fp16 needs loss scaling against gradient underflow: a GradScaler on CUDA and on
        # CPUs with native fp16; MPS fp16 runs without (no scaler support there).
        self.scaler = torch.amp.GradScaler(kind, enabled=(dtype == torch.float16 and kind != "mps"))
        self.optimizer = model.configure_optimizers(train_cfg.weight_decay, train_cfg.learning_rate,
                                                    (train_cfg.beta1, train_cfg.beta2), kind)
        self.forward_module = torch.compile(model) if train_cfg.compile else model
        self.micro_batches = train_cfg.gradient_accumulation_steps  # one rank: nothing to fit

    def forward(self, x, y, **kwargs):
        with self.ctx:
            return self.forward_module(x, y, **kwargs)  # compiled or not: torch.compile passes keywords on

    def backward(self, loss):
        self.scaler.scale(loss / self.micro_batches).backward()

    def step(self, lr: float) -> torch.Tensor | None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        clip = self.train_cfg.grad_clip if self.train_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if scale is not None and self.scaler.get_scale() < scale:  # (fp16 only: get_scale reads the host)
            return None  # fp16 overflow: the scaler skipped this step and lowered the scale (not divergence)
        return norm

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def check_replicas(self, iter_num: int):
        pass  # one device: one copy of everything

    def topology(self) -> dict:
        return train_state.topology("local", 1, 1, None, str(self.compute_dtype).removeprefix("torch."))

    def save(self, out_dir: str, state: dict):
        """The same format as every path: one shard holding every tensor whole."""
        tensors = {checkpoint.tensor_key(kind, n): value.detach()
                   for kind in ("model", *train_state.MOMENTS) for n, value in self._tensors(kind)}
        steps = [int(st["step"]) for st in self.optimizer.state.values() if "step" in st]
        scale = None
        if self.scaler.is_enabled():
            scale = {"scale": self.scaler.get_scale(), "torch": self.scaler.state_dict()}
        meta = {**state, "topology": self.topology(), "optimizer_step": steps[0] if steps else 0,
                "loss_scale": scale, "tensors": {key: list(value.shape) for key, value in tensors.items()}}
        pieces = [(key, 0, value.view(-1)) for key, value in tensors.items()]
        checkpoint_dir.save(out_dir, meta, pieces, rank=0, keep_last=self.train_cfg.keep_last)

    def _tensors(self, kind: str):
        """(name, tensor) of the weights and router biases (kind "model"), or of an AdamW moment."""
        if kind == "model":
            yield from self.module.named_parameters()
            yield from train_state.state_buffers(self.module)
            return
        for n, p in self.module.named_parameters():
            if kind in self.optimizer.state.get(p, {}):
                yield n, self.optimizer.state[p][kind]

    @torch.no_grad()
    def load(self, ckpt: checkpoint.Checkpoint) -> dict:
        """Restore from a checkpoint saved by any engine at any topology; return its training state."""
        for n, value in self._tensors("model"):
            ckpt.read_into(checkpoint.tensor_key("model", n), 0, value.data.view(-1))
        params = list(self.module.named_parameters())
        if ckpt.has(checkpoint.tensor_key(train_state.MOMENTS[0], params[0][0])):
            group = self.optimizer.param_groups[0]  # fused or not: the same for every group
            for n, p in params:
                train_state.ensure_adamw_state(self.optimizer.state[p], p, ckpt.meta["optimizer_step"], group)
                for kind in train_state.MOMENTS:
                    ckpt.read_into(checkpoint.tensor_key(kind, n), 0, self.optimizer.state[p][kind].view(-1))
        scale = ckpt.meta.get("loss_scale")
        if scale is not None and self.scaler.is_enabled():  # from another engine: its scale only
            self.scaler.load_state_dict(scale.get("torch", {**self.scaler.state_dict(), "scale": scale["scale"]}))
        rng = ckpt.rng(0)
        if rng is not None:
            train_state.set_rng_state(rng)
        return ckpt.meta
