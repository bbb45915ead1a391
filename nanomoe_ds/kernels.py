"""The MoE layer's fast kernels, and which expert kernel `moe_impl=auto` runs.

moe.py and dispatch.py say what is computed (the experts' MLP, the permutation);
this file holds how it runs fast, in three parts:
  - the choice: a pure function of the device, the compute dtype, the torch version
    and the layer's widths, so tests can ask it about any GPU without having one;
  - the expert kernels (grouped_mm, bmm, loop), which tests hold equal to a
    per-token reference;
  - the permutation's gathers: dispatch.py's row gathers and its combine, with
    backwards that avoid a scatter-add.

What the choice rests on (measurements are in docs/benchmarks.md):
  - `torch._grouped_mm` is absent before torch 2.8. Its fused kernel (no host sync)
    is bf16 on CUDA compute capability 9.0+ only (Hopper, Blackwell). From 2.9 other
    dtypes, SM80 and the CPU take a per-group fallback with a device-to-host sync
    (PyTorch PRs #161407, #161717), and the CPU kernel needs 16-byte-aligned
    strides. So auto uses it only on the fused path.
  - Everywhere else auto takes one of the two kernels built from plain matmuls,
    which run on every device, dtype and torch version: `bmm` on GPUs (one padded
    batched matmul rather than E small launches) and, on the CPU, by size: `loop`
    where experts get many rows each, `bmm` where they get few (a few hundred rows
    keep neither core busy through a per-expert matmul, and the loop's per-expert
    overhead dominates) unless padding every expert to the busiest one would add
    more than half the rows again.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
import torch.nn.functional as F

from .config import ConfigError

if TYPE_CHECKING:
    from .dispatch import Permutation

# ---------------------------------------------------------------- the choice
IMPLS = ("grouped_mm", "bmm", "loop")

# The CPU's size rule (measured on a 2-core Xeon, docs/benchmarks.md): bmm below this
# many rows per expert on average, if the padding stays within CPU_BMM_MAX_PADDING.
CPU_BMM_MAX_ROWS_PER_EXPERT = 320
CPU_BMM_MAX_PADDING = 1.5  # padded rows (experts x busiest expert's rows) / rows


class Target(NamedTuple):
    """Where the experts run: everything the choice depends on besides the model's widths."""

    device_kind: str  # "cpu", "cuda" or "mps"
    dtype: torch.dtype  # the compute dtype (autocast's, or the parameters')
    capability: tuple[int, int] | None  # CUDA compute capability, None elsewhere
    torch_version: tuple[int, int]


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


class Load(NamedTuple):
    """The rows one call brings: all of them, the busiest expert's, and how many experts share them."""

    rows: int
    busiest: int
    experts: int


def cpu_prefers_bmm(load: Load) -> bool:
    """The CPU's size rule: few rows per expert, and padding to the busiest expert stays cheap."""
    few = load.rows < CPU_BMM_MAX_ROWS_PER_EXPERT * load.experts
    return few and load.busiest * load.experts <= CPU_BMM_MAX_PADDING * load.rows


def target_of(x: torch.Tensor, dtype: torch.dtype) -> Target:
    """The Target of a tensor's device on this machine."""
    cap = torch.cuda.get_device_capability(x.device) if x.device.type == "cuda" else None
    return Target(x.device.type, dtype, cap, torch_version())


def _aligned(target: Target, widths: tuple[int, ...]) -> bool:
    """Rows of these widths start on 16-byte boundaries in the compute dtype (the grouped GEMM needs it)."""
    return all(w * target.dtype.itemsize % 16 == 0 for w in widths)


def grouped_mm_fused(target: Target, widths: tuple[int, ...]) -> bool:
    """True where torch._grouped_mm runs its fused kernel: bf16, CUDA SM90+, torch 2.8+, aligned rows."""
    aligned = _aligned(target, widths)
    return (target.device_kind == "cuda" and target.capability is not None and target.capability >= (9, 0)
            and target.dtype == torch.bfloat16 and target.torch_version >= (2, 8) and aligned)


def grouped_mm_runs(target: Target, widths: tuple[int, ...]) -> bool:
    """True where torch._grouped_mm runs at all, fused or through its per-group fallback."""
    if grouped_mm_fused(target, widths):
        return True
    if target.torch_version < (2, 9):  # 2.8 has the fused CUDA kernel only
        return False
    if target.device_kind == "cpu":
        return _aligned(target, widths)
    return target.device_kind == "cuda" and target.capability is not None and target.capability >= (8, 0)


def choose(impl: str, target: Target, widths: tuple[int, ...], load: Load | None = None) -> str:
    """The kernel to run: `impl` itself if forced, else auto's pick for this target.

    `widths` are the expert GEMMs' row widths (n_embd and expert_hidden); `load`, the
    call's rows, matters on the CPU only (without it the CPU gets `loop`).
    """
    if impl != "auto":
        return impl
    if grouped_mm_fused(target, widths):
        return "grouped_mm"
    if target.device_kind != "cpu":
        return "bmm"
    return "bmm" if load is not None and cpu_prefers_bmm(load) else "loop"


def runs(impl: str, target: Target, widths: tuple[int, ...]) -> bool:
    """Whether a kernel can run on this target at all (loop and bmm run everywhere)."""
    return impl != "grouped_mm" or grouped_mm_runs(target, widths)


def check(impl: str, target: Target, widths: tuple[int, ...]):
    """Refuse, in one line, a forced kernel that cannot run on this target."""
    if not runs(impl, target, widths):
        where = f"{target.device_kind}" + (f" (compute capability {target.capability[0]}.{target.capability[1]})"
                                           if target.capability else "")
        raise ConfigError(f"moe_impl=grouped_mm cannot run on {where} with {str(target.dtype).removeprefix('torch.')}, "
                          f"torch {target.torch_version[0]}.{target.torch_version[1]} and widths {widths}; "
                          "use moe_impl=auto (or bmm / loop)")


# ---------------------------------------------------------------- the expert kernels
# Rows arrive grouped by expert: counts[e] contiguous rows of expert e. grouped_mm and
# bmm supply the `linear(x, w, b)` that GroupedExperts._mlp (the experts' math) calls for
# each projection; loop runs the whole MLP itself, expert by expert.
#
# bmm adds the bias after the matmul, as grouped_mm must (the grouped GEMM has no
# bias): both round the product to the compute dtype first, so their outputs agree bit
# for bit when their GEMMs do. The loop kernel adds it inside the GEMM (addmm), one call
# per expert instead of two; its outputs can differ from theirs in the last bit.

def grouped_linear(counts: torch.Tensor, num_rows: int) -> Callable:
    """grouped_mm's linear: one grouped GEMM over the rows where they lie, plus each row's expert bias.

    Nothing here reads the counts on the host, so torch.compile traces it whole.
    """
    offs = torch.cumsum(counts, 0).to(torch.int32)
    experts = torch.arange(counts.numel(), device=counts.device)
    expert_of_row = torch.repeat_interleave(experts, counts, output_size=num_rows)

    def linear(x, w, b):
        y = torch._grouped_mm(x, w, offs=offs)
        return y if b is None else AddGroupedBias.apply(y, b, counts, expert_of_row)

    return linear


class AddGroupedBias(torch.autograd.Function):
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


def pad_by_expert(x: torch.Tensor, counts: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """bmm's layout: (expert e's rows in block e of a zero [E, busiest, d] buffer, each row's place in it).

    Padded once: the whole MLP runs on the blocks (each block's bias is a broadcast
    add, no per-row copy) and `unpad` brings the rows back once at the end. Padding
    rows are zeros and their outputs are never read, so they add nothing to any gradient.
    """
    E, N, cap = len(sizes), x.shape[0], max(sizes)
    starts = torch.cumsum(counts, 0) - counts
    shift = torch.arange(E, device=x.device) * cap - starts  # row i of expert e -> e*cap + (i - start_e)
    slot = torch.arange(N, device=x.device) + torch.repeat_interleave(shift, counts, output_size=N)
    return x.new_zeros(E * cap, x.shape[-1]).index_copy_(0, slot, x).view(E, cap, -1), slot


def padded_linear(x, w, b):
    """bmm's linear: [E, cap, d_in] @ [E, d_in, d_out] + b[E, d_out], the bias broadcast over each block's rows."""
    y = torch.bmm(x, w)
    return y if b is None else y + b.unsqueeze(1)


def unpad(y: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """The rows pad_by_expert placed, back in their order: [E, cap, d] -> [N, d]."""
    return gather_rows(y.view(-1, y.shape[-1]), slot)


def loop_experts(x: torch.Tensor, sizes: list[int], approximate: str, params: list) -> torch.Tensor:
    """The loop kernel: the expert MLP, expert by expert. `params` in moe.EXPERT_PARAMS order
    (w_gate None for a GELU expert), `approximate` F.gelu's."""
    return LoopExperts.apply(x, sizes, approximate, *params)


class LoopExperts(torch.autograd.Function):
    """The loop kernel: one expert at a time, its whole MLP on its contiguous rows, backward by hand.

    Composed from autograd ops, this kernel built a graph of about ten nodes per
    expert per layer and joined the pieces again: a `cat` of the outputs, a `cat` of
    the input gradients (split's backward) and a `stack` of the weight gradients
    (unbind's backward). At nanoGPT sizes, a few hundred rows per expert on a CPU,
    that bookkeeping cost as much as the matmuls. Here autograd sees one node; each
    expert's results go straight into its rows of preallocated buffers (`out=`), and
    the expert's whole chain (matmul, activation, matmul, and back) runs while its
    rows are still in cache. The arithmetic is GroupedExperts._mlp's; tests hold every
    kernel to a per-token reference.
    """

    @staticmethod
    def forward(ctx, x, sizes, approximate, w_in, w_gate, w_out, b_in, b_out):
        N, hidden = x.shape[0], w_in.shape[-1]
        h = x.new_empty(N, hidden)  # pre-activation (the activation's backward needs it)
        gate = x.new_empty(N, hidden) if w_gate is not None else None
        h_act = x.new_empty(N, hidden)
        y = x.new_empty(N, w_out.shape[-1])
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
        return grad_x, None, None, grad_w_in, grad_w_gate, grad_w_out, grad_b_in, grad_b_out


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


# ---------------------------------------------------------------- the permutation's gathers
# dispatch.py's gathers of rows by index, and its dropless combine.

class GatherRows(torch.autograd.Function):
    """src[idx] where idx takes each row of src at most once.

    A general gather's backward is a scatter-add (index_add_), which is slow and
    serial on CPU; with no repeated rows it is a plain scatter (index_copy_).
    """

    @staticmethod
    def forward(ctx, src, idx):
        ctx.save_for_backward(idx)
        ctx.num_rows = src.shape[0]
        return src.index_select(0, idx)

    @staticmethod
    def backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return grad.new_zeros(ctx.num_rows, *grad.shape[1:]).index_copy_(0, idx, grad), None


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[idx] along dim 0 for an index without repeats (a permutation or part of one)."""
    return GatherRows.apply(src, idx)


class GatherTokens(torch.autograd.Function):
    """x[token_idx]: the token row of each kept assignment, in expert order.

    A token appears once per kept slot, so autograd's backward of this gather is a
    scatter-add (index_put_ with accumulate), which runs serially on a CPU. Through
    the inverse permutation each token sums its own k rows instead, a chunk of
    tokens at a time as in the combine: gathers and a sum, deterministic, with the
    sum in at least fp32. Dropped slots read an appended zero row.
    """

    @staticmethod
    def forward(ctx, x, perm: Permutation):
        ctx.inv, ctx.dropped = perm.inv, perm.dropped
        ctx.num_tokens, ctx.k = x.shape[0], perm.num_assignments // max(x.shape[0], 1)
        return x.index_select(0, perm.token_idx)

    @staticmethod
    def backward(ctx, grad):
        inv, k, T = ctx.inv, ctx.k, ctx.num_tokens
        if ctx.dropped:
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[-1])])
        acc = torch.promote_types(grad.dtype, torch.float32)
        grad_x = grad.new_empty(T, grad.shape[-1])
        for t in _chunks(T, k * grad.shape[-1], grad.device):
            if acc == grad.dtype:
                _sum_slots(_slot_rows(grad, inv, t, k), None, grad_x[t])
            else:  # sum in the wider dtype, then one rounding
                grad_x[t] = _sum_slots(_slot_rows(grad, inv, t, k), None, grad.new_empty(t.stop - t.start,
                                                                                          grad.shape[-1], dtype=acc))
        return grad_x, None


class Combine(torch.autograd.Function):
    """Dropless unpermute: out[t] = sum_j w[t, j] * y[inv[t*k + j]], a chunk of tokens at a time.

    The arithmetic of (y[inv].view(T, k, d).to(acc) * w[..., None]).sum(1), summed in
    slot order, and its autograd backward, without materialising [T*k, d] copies
    (gathered rows, their fp32 cast, the weighted products): at 8k tokens x k=8 x
    d=384 each is 50-100 MB, which costs more to allocate and stream through memory
    than the math. The gradient of y is gathered row by row in expert order
    (grad[token of row] * its gate weight) rather than scattered through inv: a
    gather is several times faster than index_copy_ on a CPU.
    """

    @staticmethod
    def forward(ctx, y, w, perm: Permutation, acc):
        T, k = w.shape
        out = y.new_empty(T, y.shape[-1], dtype=torch.promote_types(acc, w.dtype))
        for t in _chunks(T, k * y.shape[-1], y.device):
            _sum_slots(_slot_rows(y, perm.inv, t, k), w[t], out[t])
        ctx.save_for_backward(y, w)
        ctx.perm = perm
        return out

    @staticmethod
    def backward(ctx, grad):
        y, w = ctx.saved_tensors
        perm = ctx.perm
        T, k = w.shape
        grad_w = torch.empty_like(w)
        for t in _chunks(T, k * y.shape[-1], y.device):  # (type promotion reads bf16 rows as fp32: no copy)
            grad_w[t] = (grad[t].unsqueeze(1) * _slot_rows(y, perm.inv, t, k)).sum(-1)
        grad_y = torch.empty_like(y)  # row r belongs to assignment order[r]: token order[r] // k
        w_of_row = w.reshape(-1).index_select(0, perm.order).unsqueeze(-1)
        for r in _chunks(y.shape[0], y.shape[-1], y.device):
            # The product in grad's dtype, then one rounding to y's (autograd's casts, in order).
            rows = grad_y[r] if grad.dtype == y.dtype else None
            rows = torch.index_select(grad, 0, perm.token_idx[r], out=rows).mul_(w_of_row[r])
            if rows.dtype != y.dtype:
                grad_y[r] = rows
        return grad_y, grad_w, None, None


def _slot_rows(y, inv, t: slice, k: int):
    """[tokens in t, k, d]: the expert output row of each of their slots."""
    return y.index_select(0, inv[t.start * k:t.stop * k]).view(t.stop - t.start, k, -1)


def _sum_slots(rows: torch.Tensor, weight: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weight[t, j] * rows[t, j] (the plain sum when weight is None), in out's dtype.

    Slot by slot, in slot order: one multiply-add per slot over contiguous rows. On a
    CPU a reduction over the middle dimension of [tokens, k, d] is several times
    slower than that, and casting rows to the wider dtype first would be a copy.
    """
    for j in range(rows.shape[1]):
        row, w = rows[:, j], None if weight is None else weight[:, j:j + 1]
        if j == 0:
            out.copy_(row) if w is None else torch.mul(row, w, out=out)
        else:
            out.add_(row) if w is None else out.addcmul_(row, w)
    return out


def _chunks(n: int, row_size: int, device: torch.device):
    """Slices of range(n) of a bounded number of elements each.

    On a CPU a few MB, so each chunk's temporaries are reused and stay in cache. On a
    GPU each chunk costs several kernel launches, so chunks are large (hundreds of
    MB): one or two for a typical batch, and still a cap on the temporaries.
    """
    elems = 1 << 27 if device.type == "cuda" else 1 << 21
    step = max(1, elems // max(row_size, 1))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]
