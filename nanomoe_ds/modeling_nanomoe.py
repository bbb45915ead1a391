"""A GPT-2 whose MLPs are Mixture-of-Experts layers, for `transformers` (trust_remote_code=True).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("DIR", trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained("DIR")

Written by nanomoe_ds's `launch/export.py --format=hf` into every MoE export. It needs only
torch and transformers: people who load the model from the Hub don't have nanomoe_ds.
So this file is a second copy of the trainer's forward (nanomoe_ds/model.py, moe.py,
dispatch.py), written for reading instead of speed: the experts run one after the
other, and a token's outputs are summed with an index_add. tests/test_export.py pins
the two together: for random configs covering every gate, SwiGLU and GELU experts,
shared experts, `moe_every`, biases, the router's score bias and capacity at eval, the
logits of this file equal the trainer's to 1e-5 in fp32, and greedy generation equals
the project's sampler at temperature 0.

What a forward computes, per block: x + attn(ln_1(x)), then + mlp(ln_2(x)), where the MLP
is GPT-2's in dense blocks and, in every `moe_every`-th block, an MoE layer:

  - the router scores each token against the experts in fp32 (`gate`: softmax then
    top-k, top-k then softmax, or DeepSeek-V3's sigmoid), picks the top k (`score_bias`,
    learnt by aux-loss-free balancing, shifts the choice but not the weights) and
    renormalises the k weights to sum to 1;
  - with a capacity factor, an expert keeps at most ceil(factor * tokens * k / E)
    assignments of the batch, by gate weight or by position; the rest add nothing;
  - each expert is a GPT-2 MLP (GELU) or a SwiGLU MLP; shared experts, which every
    token passes through, are one GPT-2 MLP as wide as all of them together.

The training-only parts of nanomoe_ds (router jitter, the load-balancing and z-losses, the
bias update) are not here: `labels` gives the plain next-token cross-entropy. Generation
recomputes the whole context at each step (no KV cache): with a capacity factor, which
tokens an expert keeps depends on all the tokens of the forward, as in the trainer's sampler.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

GATES = ("softmax_topk", "topk_softmax", "sigmoid")
EXPERT_ACTS = ("gelu", "swiglu")
ACTIVATIONS = ("gelu", "gelu_tanh")
CAPACITY_PRIORITIES = ("score", "position")


class NanoMoEConfig(PretrainedConfig):
    """nanomoe_ds's model keys, with its names and defaults (nanomoe_ds/config.py, GPTConfig)."""

    model_type = "nanomoe"
    attribute_map = {"hidden_size": "n_embd", "num_attention_heads": "n_head", "num_hidden_layers": "n_layer",
                     "max_position_embeddings": "block_size"}

    def __init__(self, block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, dropout=0.0,
                 bias=True, activation="gelu", use_moe=True, num_experts=8, num_experts_per_tok=2, moe_every=1,
                 num_shared_experts=0, expert_hidden=0, expert_act="gelu", gate="softmax_topk",
                 capacity_factor=0.0, eval_capacity_factor=-1.0, capacity_priority="score", **kwargs):
        self.block_size, self.vocab_size, self.n_layer, self.n_head, self.n_embd = (
            block_size, vocab_size, n_layer, n_head, n_embd)
        self.dropout, self.bias, self.activation = dropout, bias, activation
        self.use_moe, self.num_experts, self.num_experts_per_tok, self.moe_every = (
            use_moe, num_experts, num_experts_per_tok, moe_every)
        self.num_shared_experts, self.expert_hidden = num_shared_experts, expert_hidden or 4 * n_embd
        self.expert_act, self.gate = expert_act, gate
        self.capacity_factor, self.eval_capacity_factor, self.capacity_priority = (
            capacity_factor, eval_capacity_factor, capacity_priority)
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return self.use_moe and (layer_idx + 1) % self.moe_every == 0


def gelu(h: torch.Tensor, activation: str) -> torch.Tensor:
    """Exact GELU, or the tanh approximation GPT-2 was trained with (`gelu_tanh`, HF's gelu_new)."""
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanoMoEConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """`allowed`: [B, 1, T, T] which keys each query may see, or None for plain causal attention."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        if allowed is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The GPT-2 MLP: dense blocks (with dropout), and the shared experts (without: the MoE layer's output has it)."""

    def __init__(self, d: int, hidden: int, config: NanoMoEConfig, dropout: float):
        super().__init__()
        self.c_fc = nn.Linear(d, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, d, bias=config.bias)
        self.dropout = nn.Dropout(dropout)
        self.activation = config.activation

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x), self.activation)))


class Router(nn.Module):
    """Picks each token's k experts and their weights, in fp32."""

    def __init__(self, config: NanoMoEConfig):
        super().__init__()
        self.k, self.gate = config.num_experts_per_tok, config.gate
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.n_embd))
        self.register_buffer("score_bias", torch.zeros(config.num_experts))  # for choosing only

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (experts [N, k], weights [N, k] fp32 summing to 1 per token)."""
        logits = F.linear(x.float(), self.weight.float())
        if self.gate == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        by = logits if self.gate == "topk_softmax" else scores
        experts = torch.topk(by + self.score_bias, self.k, dim=-1, sorted=True).indices
        if self.gate == "topk_softmax":
            return experts, torch.softmax(logits.gather(-1, experts), dim=-1)
        weights = scores.gather(-1, experts)
        return experts, weights / weights.sum(-1, keepdim=True)


class Experts(nn.Module):
    """E MLPs stored as stacked tensors: w_in, w_gate (SwiGLU only) [E, d, h], w_out [E, h, d]; biases [E, ...]."""

    def __init__(self, config: NanoMoEConfig):
        super().__init__()
        E, d, h = config.num_experts, config.n_embd, config.expert_hidden
        self.gated, self.activation = config.expert_act == "swiglu", config.activation
        self.w_in = nn.Parameter(torch.empty(E, d, h))
        self.w_gate = nn.Parameter(torch.empty(E, d, h)) if self.gated else None
        self.w_out = nn.Parameter(torch.empty(E, h, d))
        self.b_in = nn.Parameter(torch.zeros(E, h)) if config.bias else None
        self.b_out = nn.Parameter(torch.zeros(E, d)) if config.bias else None

    def forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on its rows x [n, d]."""
        h = x @ self.w_in[e]
        if self.b_in is not None:
            h = h + self.b_in[e]
        if self.gated:
            h = F.silu(x @ self.w_gate[e]) * h
        else:
            h = gelu(h, self.activation)
        y = h @ self.w_out[e]
        return y if self.b_out is None else y + self.b_out[e]


def kept_assignments(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int | None,
                     priority: str) -> torch.Tensor:
    """[N, k] bool: which (token, slot) assignments their expert computes. Dropless (capacity None): all.

    An over-full expert keeps its first `capacity` assignments in priority order: by gate
    weight ("score", larger first), or "position" (every token's first choice before any
    second choice, earlier tokens first). Ties keep the earlier assignment.
    """
    N, k = experts.shape
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    if priority == "score":
        order = torch.argsort(weights.reshape(-1), descending=True, stable=True)
    else:
        order = torch.arange(N * k, device=experts.device).view(N, k).t().reshape(-1)
    flat = experts.reshape(-1)
    kept = torch.zeros(N * k, dtype=torch.bool, device=experts.device)
    for e in range(num_experts):
        mine = order[flat[order] == e]  # expert e's assignments, in priority order
        kept[mine[:capacity]] = True
    return kept.view(N, k)


class MoE(nn.Module):
    """Routed experts (+ shared experts) in place of a block's MLP."""

    def __init__(self, config: NanoMoEConfig):
        super().__init__()
        self.config = config
        self.router = Router(config)
        self.experts = Experts(config)
        hidden = config.num_shared_experts * config.expert_hidden
        self.shared_mlp = MLP(config.n_embd, hidden, config, 0.0) if config.num_shared_experts else None
        self.dropout = nn.Dropout(config.dropout)

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments an expert may take in this forward; None is dropless (a factor of 0)."""
        c = self.config
        factor = c.capacity_factor if self.training or c.eval_capacity_factor < 0 else c.eval_capacity_factor
        if factor <= 0:
            return None
        return math.ceil(factor * num_tokens * c.num_experts_per_tok / c.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        tokens = x.reshape(-1, C)  # every token of the batch: capacity counts them all
        experts, weights = self.router(tokens)
        kept = kept_assignments(experts, weights, self.config.num_experts, self.capacity(tokens.shape[0]),
                                self.config.capacity_priority)
        out = torch.zeros(tokens.shape, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        for e in range(self.config.num_experts):
            token, slot = torch.where((experts == e) & kept)
            if token.numel():
                y = self.experts(e, tokens[token])
                out.index_add_(0, token, y.to(out.dtype) * weights[token, slot].unsqueeze(-1))
        out = out.to(x.dtype)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(tokens)
        return self.dropout(out.view(B, T, C))


class Block(nn.Module):
    def __init__(self, config: NanoMoEConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
        else:
            self.mlp = MLP(config.n_embd, 4 * config.n_embd, config, config.dropout)

    def forward(self, x, allowed):
        x = x + self.attn(self.ln_1(x), allowed)
        return x + self.mlp(self.ln_2(x))


def attention_allowed(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """[B, 1, T, T] bool from a padding mask [B, T] (1 = a real token), or None when nothing is padded.
    Each query sees the real tokens up to itself, and always itself: a padding query is not left with
    no key at all (its softmax would be NaN)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    allowed = causal & attention_mask.bool()[:, None, None, :]
    return allowed | torch.eye(T, dtype=torch.bool, device=attention_mask.device)


class NanoMoEPreTrainedModel(PreTrainedModel):
    config_class = NanoMoEConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        """GPT-2's init (N(0, 0.02)), for weights a checkpoint does not hold; loading overwrites the rest."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Router):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            nn.init.zeros_(module.score_bias)
        elif isinstance(module, Experts):
            for w in (module.w_in, module.w_gate, module.w_out):
                if w is not None:
                    nn.init.normal_(w, mean=0.0, std=0.02)
            for b in (module.b_in, module.b_out):
                if b is not None:
                    nn.init.zeros_(b)


class NanoMoEForCausalLM(NanoMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config: NanoMoEConfig):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, labels: torch.LongTensor | None = None,
                **kwargs) -> CausalLMOutput:
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise ValueError(f"a sequence of {T} tokens exceeds this model's context of {self.config.block_size}")
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        allowed = attention_allowed(attention_mask, T)
        for block in self.transformer.h:
            x = block(x, allowed)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """The whole context at every step (no cache), cropped to the last block_size tokens as the
        trainer's sampler does; positions skip left padding."""
        input_ids = input_ids[:, -self.config.block_size:]
        position_ids = None
        if attention_mask is not None:
            attention_mask = attention_mask[:, -self.config.block_size:]
            if not bool(attention_mask.all()):
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
