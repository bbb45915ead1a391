"""GPT with optional Mixture-of-Experts MLPs, after Karpathy's nanoGPT model.py.

References: GPT-2 (OpenAI), nanoGPT, and HuggingFace's GPT-2 for `from_pretrained`.
This file knows nothing of process groups or DeepSpeed.
"""
from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from .config import HF_ACTIVATIONS, HF_CONV1D_WEIGHTS, ConfigError, GPTConfig
from .mlp import MLP
from .moe import MoE, Routing, init_moe_


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout = cfg.n_head, cfg.n_embd, cfg.dropout

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = LayerNorm(cfg.n_embd, bias=cfg.bias)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd, cfg.bias, cfg.dropout, gelu_variant=cfg.activation)

    def forward(self, x) -> tuple[torch.Tensor, Routing | None]:
        """-> (output, the MoE layer's Routing, or None in a dense block). GPT.forward records the
        Routing, outside the block: a block is then a pure function, which activation checkpointing
        may recompute and torch.compile may capture with its checkpoint."""
        with record_function("attention"):  # a named range for --profile
            x = x + self.attn(self.ln_1(x))
        if isinstance(self.mlp, MoE):
            out, routing = self.mlp(self.ln_2(x))
            return x + out, routing
        return x + self.mlp(self.ln_2(x)), None  # the residual the seed dropped


def fused_adamw_supported(device_type: str) -> bool:
    """torch's fused AdamW: one kernel over all parameters instead of a loop of foreach ops.

    It exists for CUDA and, since torch 2.4, for the CPU; elsewhere (MPS, older torch)
    the default implementation runs.
    """
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")


class ForwardReport(NamedTuple):
    """What a forward did besides its logits and loss (GPT.forward with report=True), for the loop's
    logs and aux-loss-free balancing. Returned, not kept on the model: a forward changes no state."""

    ce: torch.Tensor | None  # cross-entropy, detached (None without targets)
    aux_loss: torch.Tensor | None  # Switch loss, mean over MoE layers, detached (training with targets only)
    z_loss: torch.Tensor | None  # router z-loss, the same way
    routings: list[Routing]  # one per MoE layer, in block order (aux terms with their graphs)


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.vocab_size is not None and cfg.block_size is not None
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
            ln_f=LayerNorm(cfg.n_embd, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):  # GPT-2: scale residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        self._moe_layers = [m for m in self.modules() if isinstance(m, MoE)]
        for m in self._moe_layers:
            init_moe_(m, cfg.n_layer)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def moe_layers(self) -> list[MoE]:
        return self._moe_layers

    def get_num_params(self, non_embedding: bool = True, active: bool = False) -> int:
        """Parameter count; with active=True, count only the k routed experts a token uses."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        if active:
            for m in self.moe_layers():
                per_expert = sum(p.numel() for p in m.experts.parameters()) // m.experts.num_experts
                n -= per_expert * (m.experts.num_experts - m.k)
        return n

    def forward(self, idx, targets=None, report: bool = False):
        """Returns (logits, loss), or (logits, loss, ForwardReport) with report=True.

        While training, loss = cross-entropy + the MoE auxiliary terms. In eval
        mode it is the pure cross-entropy. The report carries the detached parts
        for logging and each MoE layer's Routing; without it the caller (sampling,
        eval) gets the plain pair.
        """
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"sequence of {t} exceeds block_size {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        routings = []  # collected here, outside the blocks: a recomputed block (activation checkpointing) adds none
        for block in self.transformer.h:
            x, routing = block(x)
            if routing is not None:
                routings.append(routing)
        x = self.transformer.ln_f(x)
        if targets is None:
            logits, loss, ce, aux, z = self.lm_head(x[:, [-1], :]), None, None, None, None  # only the last position
        else:
            logits = self.lm_head(x)
            ce = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-1)
            loss, aux, z = self._with_router_losses(ce, routings)
        if not report:
            return logits, loss
        return logits, loss, ForwardReport(_detached(ce), _detached(aux), _detached(z), routings)

    def _with_router_losses(self, ce: torch.Tensor, routings: list[Routing]):
        """(loss, aux, z): ce plus the MoE layers' mean aux terms while training; aux and z are None otherwise."""
        if not (self.training and routings):
            return ce, None, None
        aux = torch.stack([r.aux_loss for r in routings]).mean()
        z = torch.stack([r.z_loss for r in routings]).mean()
        loss = ce
        # A term whose coefficient is 0 is logged, not added: it has no graph (MoE._aux_terms)
        # and 0 * inf would turn the loss into NaN.
        for coef, term in ((self.config.aux_loss_coef, aux), (self.config.z_loss_coef, z)):
            if coef:
                loss = loss + coef * term
        return loss, aux, z

    def crop_block_size(self, block_size: int):
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    @classmethod
    def from_pretrained(cls, model_type_or_path: str, override_args: dict | None = None):
        """Load GPT-2 weights from HuggingFace (a hub name or a local directory) into a dense GPT."""
        from transformers import GPT2LMHeadModel

        override_args = override_args or {}
        assert all(k == "dropout" for k in override_args), "only dropout can be overridden"
        try:
            hf = GPT2LMHeadModel.from_pretrained(model_type_or_path)
        except OSError as e:  # no network, no cache, a damaged file: say so in one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"cannot load GPT-2 '{model_type_or_path}' with transformers: {first}") from None
        cfg = GPTConfig(**gpt_config_from_hf(hf.config), **override_args)
        model = cls(cfg)
        sd = model.state_dict()
        sd_hf = {k: v for k, v in hf.state_dict().items()
                 if not k.endswith(".attn.masked_bias") and not k.endswith(".attn.bias")}
        assert set(sd_hf) == set(sd), f"mismatched keys: {set(sd_hf) ^ set(sd)}"
        with torch.no_grad():
            for k, v in sd_hf.items():
                src = v.t() if k.endswith(HF_CONV1D_WEIGHTS) else v
                assert src.shape == sd[k].shape, f"shape mismatch for {k}: {src.shape} vs {sd[k].shape}"
                sd[k].copy_(src)
        return model

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW with decay on weight matrices (experts and router included), none on biases/norms."""
        groups = self.optimizer_groups(weight_decay)
        fused = fused_adamw_supported(device_type)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def optimizer_groups(self, weight_decay: float) -> list[dict]:
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        # Stacked expert biases are 2-D ([E, h]) but are still biases.
        is_decayed = {n: p.dim() >= 2 and not n.endswith(("b_in", "b_out")) for n, p in params.items()}
        decay = [p for n, p in params.items() if is_decayed[n]]
        no_decay = [p for n, p in params.items() if not is_decayed[n]]
        return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
                {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token on *active* parameters: PaLM appendix B."""
        cfg = self.config
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        return 6 * self.get_num_params(active=True) + 12 * L * H * Q * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Append max_new_tokens tokens, each sampled at `temperature` from the top_k; temperature 0 is
        greedy (the most likely token: what transformers' generate does without do_sample)."""
        for _ in range(max_new_tokens):
            idx_cond = idx if idx.size(1) <= self.config.block_size else idx[:, -self.config.block_size:]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :]
            if temperature == 0:
                idx = torch.cat((idx, logits.argmax(dim=-1, keepdim=True)), dim=1)
                continue
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
        return idx


def gpt_config_from_hf(hc) -> dict:
    """GPTConfig keys for a transformers GPT2Config; variants this model can't reproduce are refused in one line."""
    unsupported = {
        "activation_function": (hc.activation_function not in HF_ACTIVATIONS,
                                f"one of {', '.join(HF_ACTIVATIONS)}"),
        "n_inner": (hc.n_inner not in (None, 4 * hc.n_embd), f"None or 4 * n_embd ({4 * hc.n_embd})"),
        "layer_norm_epsilon": (hc.layer_norm_epsilon != 1e-5, "1e-5"),
        "scale_attn_weights": (not hc.scale_attn_weights, "True"),
        "scale_attn_by_inverse_layer_idx": (hc.scale_attn_by_inverse_layer_idx, "False"),
        "add_cross_attention": (hc.add_cross_attention, "False"),
    }
    for key, (bad, want) in unsupported.items():
        if bad:
            raise ConfigError(f"this GPT-2 has {key}={getattr(hc, key)!r}, which this model does not implement "
                              f"(it needs {want})")
    return dict(n_layer=hc.n_layer, n_head=hc.n_head, n_embd=hc.n_embd, vocab_size=hc.vocab_size,
                block_size=hc.n_positions, bias=True, activation=HF_ACTIVATIONS[hc.activation_function])
