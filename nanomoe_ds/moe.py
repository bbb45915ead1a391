"""The Mixture-of-Experts MLP: router, stacked experts and the layer that joins them.

One implementation serves every path. Under expert parallelism,
expert_parallel.py swaps a layer's `experts` for a sharded module with the same
`forward(xs, counts)` that moves the permuted tokens to the ranks owning their
experts and back. Nothing else changes, which is what the EP-vs-single-device
equivalence tests check.

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
from .dispatch import capacity, gather_rows, gather_tokens, permute, unpermute


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

    Three kernels compute the same thing (tests hold them equal); `impl` picks one,
    and `auto` asks kernels.choose (by device, dtype, torch version and, on a CPU, rows
    per expert):
      - grouped_mm: one grouped GEMM over variable-size groups (fast on Hopper);
      - bmm: pad every group to the largest count, then batched matmuls;
      - loop: one matmul per expert over its contiguous rows (fastest on a CPU when
        experts get many rows), with its backward written out (_LoopExperts).
    """

    def __init__(self, num_experts: int, d: int, hidden: int, act: str = "gelu", bias: bool = True,
                 impl: str = "auto", activation: str = "gelu"):
        super().__init__()
        self.num_experts, self.act, self.impl = num_experts, act, impl
        self.activation = activation  # which GELU a non-gated expert uses (config.ACTIVATIONS)
        self.w_in = nn.Parameter(torch.empty(num_experts, d, hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, d))
        self.w_gate = nn.Parameter(torch.empty(num_experts, d, hidden)) if act == "swiglu" else None
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
        # grouped_mm: the rows stay put; one grouped GEMM per projection, bias rows gathered.
        # Nothing here reads the counts on the host, so torch.compile traces it whole.
        E, N = self.num_experts, x.shape[0]
        offs = torch.cumsum(counts, 0).to(torch.int32)
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=N)

        def grouped_linear(a, w, b):
            y = torch._grouped_mm(a, w, offs=offs)
            return y if b is None else _AddGroupedBias.apply(y, b, counts, expert_of_row)

        return self._mlp(x, *params, linear=grouped_linear)

    @torch.compiler.disable  # traced, every step's new counts would be a recompilation
    def _host_sized(self, x: torch.Tensor, counts: torch.Tensor, params: list) -> torch.Tensor:
        """The kernels that need the rows per expert on the host: loop and bmm.

        One read of the counts (free on a CPU, a sync on a GPU); on a CPU they also
        pick the kernel. Under torch.compile this call is the layer's one graph break.
        """
        sizes = counts.tolist()
        impl = self.kernel_for(x, x.dtype, sizes)
        if impl == "loop":
            return _LoopExperts.apply(x, sizes, self.act, self.activation, *params)
        # bmm. Pad once: expert e's rows go to block e of an [E, max_count, d] buffer,
        # the whole MLP runs there (each block's bias is a broadcast add, no per-row
        # copy) and the rows come back once at the end. Padding rows are zeros and
        # their outputs are never read, so they add nothing to any gradient.
        E, N, cap = self.num_experts, x.shape[0], max(sizes)
        starts = torch.cumsum(counts, 0) - counts
        shift = torch.arange(E, device=x.device) * cap - starts  # row i of expert e -> e*cap + (i - start_e)
        slot = torch.arange(N, device=x.device) + torch.repeat_interleave(shift, counts, output_size=N)
        padded = x.new_zeros(E * cap, x.shape[-1]).index_copy_(0, slot, x).view(E, cap, -1)
        y = self._mlp(padded, *params, linear=_padded_linear)
        return gather_rows(y.view(E * cap, -1), slot)

    def _mlp(self, x, w_in, w_gate, w_out, b_in, b_out, *, linear):
        """The expert MLP for bmm and grouped_mm: `linear(x, w, b)` applies each row's expert.

        _LoopExperts computes the same function expert by expert (its bias inside the GEMM).
        """
        h = linear(x, w_in, b_in)
        if self.act == "swiglu":
            h = F.silu(linear(x, w_gate, None)) * h
        else:
            h = gelu(h, self.activation)
        return linear(h, w_out, b_out)


# bmm adds the bias after the matmul, as grouped_mm must (the grouped GEMM has no
# bias): both round the product to the compute dtype first, so their outputs agree bit
# for bit when their GEMMs do. The loop kernel adds it inside the GEMM (addmm), one call
# per expert instead of two; its outputs can differ from theirs in the last bit.
def _padded_linear(x, w, b):
    """[E, cap, d_in] @ [E, d_in, d_out] + b[E, d_out], the bias broadcast over each block's rows."""
    y = torch.bmm(x, w)
    return y if b is None else y + b.unsqueeze(1)


class _LoopExperts(torch.autograd.Function):
    """The loop kernel: one expert at a time, its whole MLP on its contiguous rows, backward by hand.

    Composed from autograd ops, this kernel built a graph of about ten nodes per
    expert per layer and joined the pieces again: a `cat` of the outputs, a `cat` of
    the input gradients (split's backward) and a `stack` of the weight gradients
    (unbind's backward). At nanoGPT sizes, a few hundred rows per expert on a CPU,
    that bookkeeping cost as much as the matmuls. Here autograd sees one node; each
    expert's results go straight into its rows of preallocated buffers (`out=`), and
    the expert's whole chain (matmul, activation, matmul, and back) runs while its
    rows are still in cache. The arithmetic is _mlp's; tests hold every kernel to a
    per-token reference.
    """

    @staticmethod
    def forward(ctx, x, sizes, act, activation, w_in, w_gate, w_out, b_in, b_out):
        N, hidden = x.shape[0], w_in.shape[-1]
        h = x.new_empty(N, hidden)  # pre-activation (the activation's backward needs it)
        gate = x.new_empty(N, hidden) if act == "swiglu" else None
        h_act = x.new_empty(N, hidden)
        y = x.new_empty(N, w_out.shape[-1])
        approximate = gelu_approximate(activation)
        for e, (x_e, h_e, gate_e, act_e, y_e) in _blocks(sizes, x, h, gate, h_act, y):
            _linear_into(h_e, x_e, w_in[e], b_in, e)
            if gate is None:
                torch.ops.aten.gelu.out(h_e, approximate=approximate, out=act_e)
            else:
                _linear_into(gate_e, x_e, w_gate[e], None, e)
                torch.mul(F.silu(gate_e), h_e, out=act_e)
            _linear_into(y_e, act_e, w_out[e], b_out, e)
        ctx.save_for_backward(x, h, gate, h_act, w_in, w_gate, w_out)
        ctx.sizes, ctx.approximate, ctx.biased = sizes, approximate, b_in is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, h, gate, h_act, w_in, w_gate, w_out = ctx.saved_tensors
        sizes, biased = ctx.sizes, ctx.biased
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x)
        empty_expert = 0 in sizes  # its weights get zero gradients; the others are overwritten
        new = torch.zeros_like if empty_expert else torch.empty_like
        grad_w_in, grad_w_out = new(w_in), new(w_out)
        grad_w_gate = new(w_gate) if gate is not None else None
        grad_b_in = new(w_in[:, 0]) if biased else None
        grad_b_out = new(w_out[:, 0]) if biased else None
        for e, (x_e, h_e, gate_e, act_e, gy_e, gx_e) in _blocks(sizes, x, h, gate, h_act, grad_y, grad_x):
            grad_act = torch.mm(gy_e, w_out[e].t())
            torch.mm(act_e.t(), gy_e, out=grad_w_out[e])
            if gate is None:
                grad_h = torch.ops.aten.gelu_backward(grad_act, h_e, approximate=ctx.approximate)
            else:  # act = silu(gate) * h
                grad_h = grad_act * F.silu(gate_e)
                grad_gate = torch.ops.aten.silu_backward(grad_act * h_e, gate_e)
            torch.mm(grad_h, w_in[e].t(), out=gx_e)
            torch.mm(x_e.t(), grad_h, out=grad_w_in[e])
            if gate is not None:  # x feeds both projections: its gradient is the sum
                gx_e.addmm_(grad_gate, w_gate[e].t())
                torch.mm(x_e.t(), grad_gate, out=grad_w_gate[e])
            if biased:  # column sums, accumulated in fp32 by torch.sum also for bf16 rows
                torch.sum(gy_e, 0, out=grad_b_out[e])
                torch.sum(grad_h, 0, out=grad_b_in[e])
        return grad_x, None, None, None, grad_w_in, grad_w_gate, grad_w_out, grad_b_in, grad_b_out


def _blocks(sizes: list[int], *tensors):
    """(e, [each tensor's rows of expert e]) for every expert with rows; None tensors give None."""
    views = [t.split(sizes) if t is not None else [None] * len(sizes) for t in tensors]
    for e, n in enumerate(sizes):
        if n:
            yield e, [v[e] for v in views]


def _linear_into(out, x, w, b, e):
    """out = x @ w (+ b[e]) for one expert's rows, the bias inside the GEMM (addmm)."""
    if b is None:
        torch.mm(x, w, out=out)
    else:
        torch.addmm(b[e], x, w, out=out)


class _AddGroupedBias(torch.autograd.Function):
    """y + b[expert of each row], for rows grouped by expert.

    Autograd's backward of that index_select is an index_add: on a GPU every row of
    an expert adds atomically into the same bias row, which serialises (and in bf16
    runs as compare-and-swap loops). The rows of an expert are contiguous, so the
    bias gradient is a segment sum instead, accumulated in fp32.

    torch._grouped_mm takes no bias. Eager, the forward gathers an [N, d_out] bias
    tensor. Under torch.compile, inductor computes the gather, the add and the
    activation after it in one elementwise pass over the GEMM's output, so the bias
    is an epilogue and is never gathered into memory (a test in test_moe checks the
    generated code).
    """

    @staticmethod
    def forward(ctx, y, b, counts, expert_of_row):
        ctx.save_for_backward(counts)
        return y + b.index_select(0, expert_of_row)

    @staticmethod
    def backward(ctx, grad):
        (counts,) = ctx.saved_tensors
        grad_b = torch.segment_reduce(grad.float(), "sum", lengths=counts).to(grad.dtype)
        return grad, grad_b, None, None


def gelu_approximate(activation: str) -> str:
    """F.gelu's `approximate` for an activation name: "tanh" for gelu_tanh (GPT-2's), else "none"."""
    return "tanh" if activation == "gelu_tanh" else "none"


def gelu(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP nonlinearity: exact GELU, or the tanh approximation GPT-2 was trained with ("gelu_tanh")."""
    return F.gelu(h, approximate=gelu_approximate(activation))


class MLP(nn.Module):
    """The GPT-2 MLP: also the dense block and the shared experts of DeepSeekMoE."""

    def __init__(self, d: int, hidden: int, bias: bool, dropout: float = 0.0, activation: str = "gelu"):
        super().__init__()
        self.c_fc = nn.Linear(d, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, d, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x):
        return self.dropout(self.c_proj(gelu(self.c_fc(x), self.activation)))


class Routing(NamedTuple):
    """What one forward of an MoE layer did besides its output (MoE.forward returns it, MoE.record keeps it)."""

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
        self.experts = GroupedExperts(cfg.num_experts, cfg.n_embd, cfg.expert_hidden, cfg.expert_act,
                                      cfg.bias, cfg.moe_impl, cfg.activation)
        self.shared_mlp = (MLP(cfg.n_embd, cfg.num_shared_experts * cfg.expert_hidden, cfg.bias,
                               activation=cfg.activation) if cfg.num_shared_experts else None)
        self.dropout = nn.Dropout(cfg.dropout)
        self.aux_loss = self.z_loss = None  # set by each training forward
        self.last_routing = None  # (kept tokens per expert, dropped, all assignments) of the last forward
        # Token counts per expert since the last bias update (aux-loss-free balancing).
        self.register_buffer("load", torch.zeros(cfg.num_experts, dtype=torch.long), persistent=False)

    def capacity_factor(self) -> float:
        c = self.cfg
        if self.training or c.eval_capacity_factor < 0:
            return c.capacity_factor
        return c.eval_capacity_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """[B, T, C] -> (output, what the routing did), changing no state. The caller keeps the Routing
        with `record` (GPT.forward does, after its blocks): a block that activation checkpointing
        recomputes in backward is then free of side effects (it records nothing twice, and
        torch.compile can capture it with its checkpoint)."""
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
        """Keep one forward's routing: the aux terms for the loss, the load for bias balancing (training
        only), and what the routing statistics are derived from."""
        if self.training:
            self.aux_loss, self.z_loss = routing.aux_loss, routing.z_loss
            self.load += routing.routed
        self.last_routing = (routing.kept, routing.dropped, routing.assignments)

    @property
    def stats(self) -> dict:
        """Routing statistics of the last forward, derived only when someone logs them."""
        return routing_stats(*self.last_routing)

    @torch.no_grad()
    def update_bias(self, rate: float, load: torch.Tensor | None = None):
        """After an optimizer step: raise under-loaded experts' bias and lower over-loaded ones' (sign rule)."""
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
