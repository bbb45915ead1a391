"""Sparse upcycling: turn a dense GPT into an MoE GPT whose first forward equals the dense one's.

After Komatsuzaki et al. 2022 ("Sparse Upcycling") and He et al. 2024 ("Upcycling
Large Language Models into Mixture of Experts"). Everything but the MLPs of the MoE
blocks is copied unchanged (blocks that stay dense under moe_every > 1 included).
In an MoE block:

- every routed expert is a copy of the block's dense MLP. All three gates
  renormalise the k chosen weights to sum to 1, so sum_k w_k * MLP(x) = MLP(x)
  whatever the router picks;
- with shared experts, the shared MLP and the routed experts each carry the dense
  MLP with its output halved (the routed half still sums over weights that add up
  to 1): half + half = dense, and both parts receive gradient from step 1 on;
- experts wider than the dense MLP (expert_hidden > 4 * n_embd) hold the dense MLP
  in their first hidden units; the extra units keep their fresh input weights and
  get zero output weights, so they add nothing until they learn to;
- routers are freshly initialised, N(0, upcycle_router_std), 0.02 by default like
  a model trained from scratch. A random router is what breaks the symmetry
  between identical experts: tokens are spread over experts, so the copies receive
  different gradients and drift apart. (A zero router would tie every score, and
  since identical experts give the cross-entropy no reason to prefer any of them,
  the router would get no signal from it.)
- upcycle_noise (default 0) multiplies expert weights by 1 + noise * N(0, 1). It
  breaks the symmetry faster but gives up the exact start, so it is off by default.

Refused in one line, because no rule reproduces the dense output for every routing:
- expert_hidden < 4 * n_embd ("granular" upcycling). Slicing the dense MLP's hidden
  units across g fine-grained experts reproduces it only if every token picks one
  copy of every slice with equal weight. He et al. initialise the router so that
  copies of a slice tie ("virtual groups"); that holds only through exact ties in
  the top-k, which floating point and torch.topk's tie order don't guarantee;
- SwiGLU experts (the dense GPT-2 MLP has no gate to copy);
- capacity_factor > 0 (or eval_capacity_factor > 0): dropped tokens skip the MLP.
"""
from __future__ import annotations

import dataclasses

import torch

from .config import ConfigError, GPTConfig, validate_model
from .model import GPT

# What the dense source decides: the MoE model must have its shape and nonlinearity.
ARCH_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "block_size", "bias", "activation")
SHARED_SHARE = 0.5  # with shared experts, the part of the dense output the shared MLP carries


def upcycled_config(dense_cfg: GPTConfig, moe_cfg: GPTConfig) -> GPTConfig:
    """The MoE model's config: the dense model's architecture with the user's MoE keys; refusals in one line."""
    expert_hidden = moe_cfg.expert_hidden
    if expert_hidden == 4 * moe_cfg.n_embd:
        # The default (expert_hidden=0 -> 4 * n_embd) was resolved against the user's n_embd;
        # it means "as wide as the dense MLP", so it follows the source's width.
        expert_hidden = 4 * dense_cfg.n_embd
    cfg = dataclasses.replace(moe_cfg, **{k: getattr(dense_cfg, k) for k in ARCH_KEYS}, expert_hidden=expert_hidden)
    validate_model(cfg)
    check_upcyclable(cfg)
    return cfg


def check_upcyclable(cfg: GPTConfig):
    """Refuse MoE settings under which the upcycled model could not start where the dense one left off."""
    dense_hidden = 4 * cfg.n_embd
    if cfg.expert_act != "gelu":
        raise ConfigError(f"expert_act={cfg.expert_act} experts have a gate the dense GPT-2 MLP lacks, so they "
                          "can't start as copies of it; upcycle with expert_act=gelu")
    if cfg.expert_hidden < dense_hidden:
        raise ConfigError(f"expert_hidden ({cfg.expert_hidden}) is narrower than the dense MLP ({dense_hidden}): "
                          "a top-k router can't guarantee each token gets every slice of it, so the MoE would not "
                          f"start where the dense model left off; upcycle with expert_hidden >= {dense_hidden}")
    if cfg.capacity_factor > 0 or cfg.eval_capacity_factor > 0:
        raise ConfigError("capacity_factor/eval_capacity_factor > 0 drop tokens, which would then skip the MLP, "
                          "so the MoE would not start where the dense model left off; upcycle dropless "
                          "(capacity_factor=0, eval_capacity_factor=-1)")


def embed_dense_mlp(fresh: dict, dense: dict, scale: float) -> dict:
    """An MLP of hidden width >= the dense one's, whose first units are the dense MLP with its output scaled.

    Tensors in x @ w orientation: w_in [..., d, h], b_in [..., h], w_out [..., h, d],
    b_out [..., d]; a leading expert dimension in `fresh` is broadcast over. Units
    past the dense width keep their fresh input weights and get zero output weights.
    """
    H = dense["w_in"].shape[-1]
    out = {k: v.clone() for k, v in fresh.items()}
    out["w_in"][..., :H] = dense["w_in"]
    out["w_out"][..., :H, :] = scale * dense["w_out"]
    out["w_out"][..., H:, :] = 0
    if "b_in" in dense:
        out["b_in"][..., :H] = dense["b_in"]
        out["b_out"][...] = scale * dense["b_out"]
    return out


def _linear_pair(sd: dict, prefix: str) -> dict:
    """An nn.Linear MLP (c_fc, c_proj) of a state dict in x @ w orientation."""
    out = {"w_in": sd[prefix + "c_fc.weight"].t(), "w_out": sd[prefix + "c_proj.weight"].t()}
    if prefix + "c_fc.bias" in sd:
        out.update(b_in=sd[prefix + "c_fc.bias"], b_out=sd[prefix + "c_proj.bias"])
    return out


def upcycle_state_dict(dense_sd: dict, moe_sd: dict, cfg: GPTConfig) -> dict:
    """`moe_sd` (a freshly initialised MoE GPT) with the dense weights copied in by the module's rules."""
    out = dict(moe_sd)
    moe_prefixes = tuple(f"transformer.h.{i}.mlp." for i in range(cfg.n_layer) if cfg.is_moe_layer(i))
    for k, v in dense_sd.items():
        if not k.startswith(moe_prefixes):
            out[k] = v
    routed_share = 1.0 - SHARED_SHARE if cfg.num_shared_experts else 1.0
    for p in moe_prefixes:
        dense = _linear_pair(dense_sd, p)
        experts = {n: moe_sd[f"{p}experts.{n}"] for n in dense}
        out.update({f"{p}experts.{n}": v for n, v in embed_dense_mlp(experts, dense, routed_share).items()})
        if cfg.num_shared_experts:
            shared = embed_dense_mlp(_linear_pair(moe_sd, p + "shared_mlp."), dense, SHARED_SHARE)
            out[p + "shared_mlp.c_fc.weight"] = shared["w_in"].t().contiguous()
            out[p + "shared_mlp.c_proj.weight"] = shared["w_out"].t().contiguous()
            if "b_in" in shared:
                out[p + "shared_mlp.c_fc.bias"], out[p + "shared_mlp.c_proj.bias"] = shared["b_in"], shared["b_out"]
    return out


def upcycle(dense: GPT, moe_cfg: GPTConfig, router_std: float = 0.02, noise: float = 0.0, seed: int = 1337) -> GPT:
    """A new MoE GPT started from `dense` (see the module docstring for the rules and the defaults)."""
    if dense.config.use_moe:
        raise ConfigError("the source is already an MoE model; upcycling starts from a dense one")
    cfg = upcycled_config(dense.config, moe_cfg)
    torch.manual_seed(seed)
    moe = GPT(cfg)
    moe.load_state_dict(upcycle_state_dict(dense.state_dict(), moe.state_dict(), cfg))
    with torch.no_grad():
        for layer in moe.moe_layers():
            torch.nn.init.normal_(layer.router.weight, 0.0, router_std)
            if noise > 0:
                for w in (layer.experts.w_in, layer.experts.w_out):
                    w.mul_(1.0 + noise * torch.randn_like(w))
    return moe


def expert_spread(w: torch.Tensor) -> float:
    """How far apart the experts of a stacked weight [E, ...] are: the mean pairwise distance
    relative to the mean expert norm. 0 for exact copies; about sqrt(2) for independent random ones."""
    flat = w.detach().reshape(w.shape[0], -1).double()
    E = flat.shape[0]
    pairwise = torch.cdist(flat[None], flat[None])[0].sum() / (E * (E - 1))
    return float(pairwise / flat.norm(dim=1).mean())
