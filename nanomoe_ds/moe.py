"""The Mixture-of-Experts MLP: router, stacked experts and the layer that joins them.

One implementation serves every path. Under expert parallelism,
expert_parallel.py swaps a layer's `experts` for a sharded module with the same
`forward(xs, counts)` that moves the permuted tokens to the ranks owning their
experts and back. Nothing else changes, which is what the EP-vs-single-device
equivalence tests check. The experts' math is here; the kernels that run it fast
(and their hand-written backwards) are in kernels.py.

Ideas credited to: Switch Transformer (aux loss, jitter, capacity), ST-MoE
(z-loss), Mixtral (softmax-then-top-k), DeepSeekMoE/V3 (shared experts, sigmoid
gate, aux-loss-free bias balancing), Megatron-Core and torchtitan (stacked
experts with a grouped GEMM over expert-sorted tokens).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from . import kernels
from .config import GPTConfig
from .dispatch import capacity, gather_tokens, permute, unpermute
from .mlp import MLP, gelu, gelu_approximate


class Router(nn.Module):
    """Scores tokens against experts in float32 and picks the top-k.

    The router runs in fp32 even under autocast or a bf16 engine: top-k choices
    and the softmax are sensitive to rounding, and its cost is negligible.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.num_experts, self.k, self.gate = cfg.num_experts, cfg.num_experts_per_tok, cfg.gate
        self.jitter = cfg.router_jitter
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.n_embd))
        # Aux-loss-free balancing: added to the scores for *selection only*.
        self.register_buffer("score_bias", torch.zeros(cfg.num_experts))

    def forward(self, x: torch.Tensor):
        """x: [T, d] -> (topk_idx [T, k], topk_weight [T, k] fp32, logits [T, E] fp32, probs [T, E])."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits = F.linear(x, self.weight.float())
            if self.gate == "sigmoid":
                scores = torch.sigmoid(logits)
                probs = scores / scores.sum(-1, keepdim=True)
            else:
                scores = probs = torch.softmax(logits, dim=-1)
            select = scores + self.score_bias if self.gate != "topk_softmax" else logits + self.score_bias
            topk_idx = torch.topk(select, self.k, dim=-1, sorted=True).indices
            if self.gate == "topk_softmax":
                w = torch.softmax(logits.gather(-1, topk_idx), dim=-1)
            else:
                w = scores.gather(-1, topk_idx)
                w = w / w.sum(-1, keepdim=True)
        return topk_idx, w, logits, probs


EXPERT_PARAMS = ("w_in", "w_gate", "w_out", "b_in", "b_out")  # stacked [E, ...]; absent ones are None


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on x runs in: autocast's where autocast is on for x's device, else x's own."""
    device_kind = x.device.type
    return torch.get_autocast_dtype(device_kind) if torch.is_autocast_enabled(device_kind) else x.dtype


class Experts(Protocol):
    """What MoE.forward calls: rows grouped by expert in, one output row per input row out.

    Implemented by GroupedExperts (all experts here) and
    expert_parallel.ExpertParallelExperts (experts sharded over ranks).
    """

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor: ...


class GroupedExperts(nn.Module):
    """E GPT-2 MLPs stored as stacked tensors, applied to rows already sorted by expert.

    `_mlp` is the experts' math. Three kernels (kernels.py) compute it and differ only
    in how each row meets its expert's weights (tests hold them equal); `impl` picks
    one, and `auto` asks kernels.choose (by device, dtype, torch version and, on a CPU,
    rows per expert):
      - grouped_mm: one grouped GEMM over variable-size groups (fast on Hopper);
      - bmm: pad every group to the largest count, then batched matmuls;
      - loop: one matmul per expert over its contiguous rows (fastest on a CPU when
        experts get many rows), with its backward written out (kernels.LoopExperts).
    """

    def __init__(self, num_experts: int, d: int, hidden: int, gated: bool = False, bias: bool = True,
                 impl: str = "auto", gelu_variant: str = "gelu"):
        super().__init__()
        self.num_experts, self.impl = num_experts, impl
        self.gated = gated  # SwiGLU experts (expert_act=swiglu) rather than GPT-2's GELU MLP
        self.gelu_variant = gelu_variant  # which GELU a non-gated expert uses: the config's `activation`
        self.w_in = nn.Parameter(torch.empty(num_experts, d, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d, hidden)) if gated else None
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d)) if bias else None

    def kernel_for(self, x: torch.Tensor, compute_dtype: torch.dtype, sizes: list[int] | None = None) -> str:
        """The kernel for this device, dtype and (on a CPU) these rows per expert: kernels.choose.

        A forced kernel that can't run here is refused in one line (the check is a few
        comparisons). `sizes` (rows per expert, on the host) only matter on a CPU,
        where reading them costs nothing.
        """
        target = kernels.target_of(x, compute_dtype)
        widths = (self.w_in.shape[1], self.w_in.shape[2])
        kernels.check(self.impl, target, widths)
        load = None
        if self.impl == "auto" and target.device_kind == "cpu" and sizes is not None:
            load = kernels.Load(x.shape[0], max(sizes), len(sizes))
        return kernels.choose(self.impl, target, widths, load)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, d] rows grouped by expert, counts: [E] rows per expert -> [N, d]."""
        if x.shape[0] == 0:
            # A rank can receive no tokens under expert parallelism. Keep the input
            # and every weight in the graph anyway: the backward all-to-all must run
            # on every rank (or the others hang), and each weight gets a zero gradient.
            touch = x.sum() + sum(p.sum() for p in self.parameters())
            return x.new_zeros(0, self.w_out.shape[-1]) + 0 * touch
        # Grouped GEMM is not on autocast's list, so pick the compute dtype once,
        # explicitly, for every kernel: they then round identically. (`.to` returns
        # the tensor itself when it already has that dtype: no copy in fp32.)
        compute_dtype = matmul_dtype(x)
        params = [None if p is None else p.to(compute_dtype) for p in (getattr(self, n) for n in EXPERT_PARAMS)]
        x = x.to(compute_dtype)
        if self.kernel_for(x, compute_dtype) != "grouped_mm":
            return self._host_sized(x, counts, params)
        # grouped_mm reads nothing on the host: torch.compile traces this path whole.
        return self._mlp(x, params, kernels.grouped_linear(counts, x.shape[0]))

    @torch.compiler.disable  # traced, every step's new counts would be a recompilation
    def _host_sized(self, x: torch.Tensor, counts: torch.Tensor, params: list) -> torch.Tensor:
        """The kernels that need the rows per expert on the host: loop and bmm.

        One read of the counts (free on a CPU, a sync on a GPU); on a CPU they also
        pick the kernel. Under torch.compile this call is the layer's one graph break.
        """
        sizes = counts.tolist()
        if self.kernel_for(x, x.dtype, sizes) == "loop":
            return kernels.loop_experts(x, sizes, gelu_approximate(self.gelu_variant), params)
        padded, slot = kernels.pad_by_expert(x, counts, sizes)
        return kernels.unpad(self._mlp(padded, params, kernels.padded_linear), slot)

    def _mlp(self, x: torch.Tensor, params: list, linear) -> torch.Tensor:
        """The experts' math: `linear(x, w, b)` applies each row's expert (grouped_mm's or bmm's).

        kernels.LoopExperts computes the same function expert by expert (its bias inside the GEMM).
        """
        w_in, w_gate, w_out, b_in, b_out = params
        h = linear(x, w_in, b_in)
        if self.gated:
            h = F.silu(linear(x, w_gate, None)) * h
        else:
            h = gelu(h, self.gelu_variant)
        return linear(h, w_out, b_out)


class Routing(NamedTuple):
    """What one forward of an MoE layer did besides its output: MoE.forward returns it and GPT.forward
    passes it on in its ForwardReport (model.py), to the loss, the logs and the bias update."""

    aux_loss: torch.Tensor | None  # Switch load-balancing loss (training only)
    z_loss: torch.Tensor | None  # router z-loss (training only)
    routed: torch.Tensor  # [E] assignments the router made per expert, before any capacity drop
    kept: torch.Tensor  # [E] assignments each expert computed
    dropped: int  # assignments over capacity
    assignments: int  # tokens * k


class MoE(nn.Module):
    """Top-k routed experts (+ optional shared experts) in place of a block's MLP."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts, self.k = cfg.num_experts, cfg.num_experts_per_tok
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.n_embd, cfg.expert_hidden, gated=cfg.expert_act == "swiglu",
                                      bias=cfg.bias, impl=cfg.moe_impl, gelu_variant=cfg.activation)
        self.shared_mlp = (MLP(cfg.n_embd, cfg.num_shared_experts * cfg.expert_hidden, cfg.bias,
                               gelu_variant=cfg.activation) if cfg.num_shared_experts else None)
        self.dropout = nn.Dropout(cfg.dropout)
        # Kept by `record` only, for a layer driven on its own (tests, bench.py); GPT.forward returns
        # the Routing instead, and the trainer sums the load it balances on.
        self.aux_loss = self.z_loss = None
        self.last_routing = None  # (kept tokens per expert, dropped, all assignments) of the last recorded forward
        # Token counts per expert recorded since the last bias update (aux-loss-free balancing).
        self.register_buffer("load", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)

    def capacity_factor(self) -> float:
        c = self.cfg
        if self.training or c.eval_capacity_factor < 0:
            return c.capacity_factor
        return c.eval_capacity_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """[B, T, C] -> (output, what the routing did), changing no state. GPT.forward collects the
        Routing after its blocks: a block that activation checkpointing recomputes in backward is
        then free of side effects (it reports nothing twice, and torch.compile can capture it with
        its checkpoint)."""
        B, T, C = x.shape
        xt = x.reshape(-1, C)
        with record_function("moe.router+permute"):  # named ranges for --profile (a few µs without one)
            topk_idx, topk_w, logits, probs = self.router(xt)
            cap = capacity(xt.shape[0], self.k, self.num_experts, self.capacity_factor())
            perm = permute(topk_idx, topk_w, self.num_experts, cap, self.cfg.capacity_priority)
            # Cast before the gather: each token is copied k times, so under autocast
            # the copies (and an expert-parallel exchange) move half the bytes.
            xs = gather_tokens(xt.to(matmul_dtype(xt)), perm)
        with record_function("moe.experts"):
            ys = self.experts(xs, perm.counts)  # local, or sharded over ranks (expert_parallel.py): the same call
        with record_function("moe.unpermute"):
            out = unpermute(ys, perm, topk_w).to(x.dtype)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(xt)
        aux_loss, z_loss = self._aux_terms(perm.routed, logits, probs) if self.training else (None, None)
        routing = Routing(aux_loss, z_loss, perm.routed, perm.counts.detach(), perm.dropped, perm.num_assignments)
        return self.dropout(out.view(B, T, C)), routing

    def _aux_terms(self, routed: torch.Tensor, logits: torch.Tensor, probs: torch.Tensor):
        """(Switch aux loss, z-loss) of one training forward."""
        # Switch aux loss, normalised by k so a perfectly balanced layer scores exactly
        # 1.0: f_i is the fraction of the T*k assignments sent to expert i (sum f = 1),
        # P_i the mean router probability. E * sum(f * P) = 1 when both are uniform.
        # (Megatron counts f_i over T, so its value is k times ours.)
        f = routed.float() / (logits.shape[0] * self.k)
        # A term that is not in the loss (coefficient 0) is computed for the logs only,
        # without a graph: its backward would cost a step time and add nothing.
        grad = torch.is_grad_enabled()
        with torch.set_grad_enabled(grad and self.cfg.aux_loss_coef != 0):
            aux_loss = self.num_experts * torch.sum(f * probs.mean(0))
        with torch.set_grad_enabled(grad and self.cfg.z_loss_coef != 0):
            z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        return aux_loss, z_loss

    def record(self, routing: Routing):
        """Keep one forward's routing on the layer: the aux terms, the load for `update_bias` (training
        only) and what `stats` derives. For a layer driven on its own (tests, bench.py); GPT.forward
        records nothing and returns the Routing in its report."""
        if self.training:
            self.aux_loss, self.z_loss = routing.aux_loss, routing.z_loss
            self.load += routing.routed
        self.last_routing = (routing.kept, routing.dropped, routing.assignments)

    @property
    def stats(self) -> dict:
        """Routing statistics of the last recorded forward, derived only when someone reads them."""
        return routing_stats(*self.last_routing)

    @torch.no_grad()
    def update_bias(self, rate: float, load: torch.Tensor | None = None):
        """After an optimizer step: raise under-loaded experts' bias and lower over-loaded ones' (sign rule).

        `load`: routed tokens per expert since the last update (the trainer's sum over micro-batches and
        ranks); None takes the load `record` kept.
        """
        load = (self.load if load is None else load).float()
        err = load.mean() - load  # all zero when nothing was routed: sign 0, no change (and no host read)
        self.router.score_bias += rate * torch.sign(err).to(self.router.score_bias)
        self.load.zero_()


def routing_stats(counts: torch.Tensor, dropped: float, assignments: float) -> dict:
    """Load statistics from kept tokens per expert [E] and dropped / all (token, slot) assignments.

    The trainer calls it on counts summed over a step's micro-batches and all ranks.
    """
    load = counts.float()
    mean = load.mean().clamp(min=1e-9)
    return {"tokens_per_expert": counts, "load_cv": load.std(unbiased=False) / mean,
            "load_max_over_mean": load.max() / mean, "dead_experts": (counts == 0).sum(),
            "drop_frac": dropped / max(assignments, 1)}


def init_moe_(moe: MoE, n_layer: int, std: float = 0.02):
    """GPT-2 init: N(0, 0.02), residual-output projections scaled by 1/sqrt(2 * n_layer)."""
    torch.nn.init.normal_(moe.router.weight, 0.0, std)
    ex = moe.experts
    for w in (ex.w_in, ex.w_gate):
        if w is not None:
            torch.nn.init.normal_(w, 0.0, std)
    torch.nn.init.normal_(ex.w_out, 0.0, std / math.sqrt(2 * n_layer))
    for b in (ex.b_in, ex.b_out):
        if b is not None:
            torch.nn.init.zeros_(b)
