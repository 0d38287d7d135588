"""The grouped math of the fast MoE path: routed experts (base + LoRA) as grouped matrix products.

Pure tensor code: it knows nothing of PEFT, module trees or quantisation formats. fast_moe.py
turns a HunYuanMoE's expert modules into the stacked operands below and calls `routed_experts`.

Shapes: N tokens, k experts per token, M = N*k (token, expert) pairs, E experts, H hidden,
I expert width, r LoRA rank.
  1. sort the M pairs by expert -> `offs` (E,) int32, the end row of each expert's group in the
     sorted order; gather xs = x[token_of_pair] (M, H);
  2. gate = xs @ Wg[e]^T, up = xs @ Wu[e]^T, y = (silu(gate) * up) @ Wd[e]^T, each ONE grouped
     product over all experts (`torch._grouped_mm(a (M, K), b (E, K, N), offs)` on CUDA sm90 in
     bf16; elsewhere a loop over the experts that received tokens, same arithmetic);
  3. LoRA on every expert projection the same way: + scaling * ((dropout(xs) @ A[e]^T) @ B[e]^T),
     two more grouped products of width r per projection;
  4. undo the sort and weight: out[n] = sum_j w[n, j] * y[pair (n, j)] as one batched product
     (deterministic, no atomics; the gathers of steps 1 and 4 back-propagate as gathers, `_Rows`).

A base weight is either a tensor (E, out, in) or a `WeightSource`: something that writes the
(E, out, in) weight on demand (NF4 experts: bitsandbytes' dequantisation). A source's weight is
saved for backward only under gradient checkpointing (`keep_weights`); otherwise the backward pass
asks for it again. Inside a checkpointed layer that runs with a `RecomputeStash`, the base products'
outputs are recorded at the forward and handed back at the recompute instead.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn


class WeightSource(Protocol):
    """A frozen (E, out, in) weight materialised on demand, or multiplied without materialising it."""

    shape: tuple[int, int, int]
    dtype: torch.dtype

    def materialize(self) -> torch.Tensor: ...

    def reads_codes(self, xs: torch.Tensor) -> bool:
        """True when `product` and `input_grad` apply to these activations (no weight is materialised)."""

    def product(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """xs (M, in) sorted by expert, offs (E,) end rows: xs[m] @ W[e(m)]^T, (M, out)."""

    def input_grad(self, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        """grad (M, out) sorted by expert: grad[m] @ W[e(m)], (M, in)."""


@dataclass
class LoraTerm:
    A: torch.Tensor  # (E, r, in), differentiable stack of the experts' lora_A weights
    B: torch.Tensor  # (E, out, r)
    scaling: float
    dropout: nn.Module  # one expert's Dropout / Identity: all experts' are checked equal


@dataclass
class Projection:
    weight: torch.Tensor | WeightSource  # (E, out, in)
    lora: list[LoraTerm] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm: CUDA, bf16, compute capability 9.0 (Hopper, where it was measured; other cards
    multiply group by group, gmm's loop).

    HUNYUAN_FAST_MOE_GROUPED=0 forces the loop (for A/B timing and debugging).
    """
    if os.environ.get("HUNYUAN_FAST_MOE_GROUPED", "1") == "0":
        return False
    if device.type != "cuda" or dtype != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def gmm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """Grouped product: rows offs[e-1]:offs[e] of a (M, K) times b[e] (K, N) -> (M, N).

    counts is None -> torch._grouped_mm (one kernel, no host sync); else a loop over the groups
    with rows (counts = rows per group, on the host), the same arithmetic.
    """
    if counts is None:
        return torch._grouped_mm(a, b, offs=offs)
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n:
            pieces.append(a[start : start + n] @ b[e])
        start += n
    if not pieces:
        return a.new_zeros(a.shape[0], b.shape[-1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class StashBudget:
    """Bytes that the RecomputeStashes sharing it may hold at once (train.expert_stash_gib)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def take(self, nbytes: int) -> bool:
        if self.held + nbytes > self.limit:
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        self.held -= nbytes


class RecomputeStash:
    """The frozen base products' outputs of one checkpointed call of a decoder layer: recorded by its forward,
    taken back in the same order by its recompute, which then multiplies only the LoRA terms.

    A frozen weight's product is the same numbers at the recompute (which repeats the forward's inputs: the
    premise of checkpointing), so recording it saves one grouped product per projection and step, and for NF4
    the recompute's dequantisation: the backward writes the weight once, for the input gradient. The price is
    the outputs' memory from forward to backward, (pairs x (2 x expert width + hidden)) per layer in bf16,
    bounded by `budget`: a product past it is recomputed as before (and its weight kept for the backward).
    """

    def __init__(self, budget: StashBudget):
        self.budget = budget
        self.outputs: deque[torch.Tensor | None] = deque()
        self.recording = True

    @contextmanager
    def active(self, recording: bool) -> Iterator[None]:
        """The layer's forward (recording) or its recompute runs inside."""
        self.recording = recording
        token = _ACTIVE_STASH.set(self)
        try:
            yield
        finally:
            _ACTIVE_STASH.reset(token)

    def reserve(self, rows: int, out_features: int, dtype: torch.dtype) -> bool:
        """At the forward: whether the product about to run is recorded (the budget allows its output)."""
        return self.budget.take(rows * out_features * dtype.itemsize)

    def record(self, y: torch.Tensor | None) -> None:
        """At the forward, per base product in order: its output, or None (recomputed)."""
        self.outputs.append(None if y is None else y.detach())

    def take(self) -> torch.Tensor | None:
        """At the recompute: the next base product's recorded output, or None."""
        if not self.outputs:
            raise RuntimeError("the recompute of a checkpointed layer ran more expert products than its forward")
        y = self.outputs.popleft()
        self._give_back([y])
        return y

    def __del__(self) -> None:  # a forward without a recompute (or one stopped early) leaves outputs behind
        self._give_back(self.outputs)

    def _give_back(self, outputs) -> None:
        self.budget.give(sum(y.numel() * y.element_size() for y in outputs if y is not None))


_ACTIVE_STASH: ContextVar[RecomputeStash | None] = ContextVar("recompute_stash", default=None)


class _FrozenProduct(torch.autograd.Function):
    """xs @ W[e]^T per group for a frozen W: a tensor, or a WeightSource that writes it.

    keep=False: a source's W is not saved; backward materialises it again (the input gradient grad @ W[e]),
    and no layer's weight outlives its product: one weight-sized block of memory serves every layer in turn.
    keep=True, for a layer under gradient checkpointing: W is saved for backward. The checkpoint drops what
    the first forward saves and keeps what the recompute saves until this product's backward, which comes
    right after it, so W is written twice per step (forward, recompute) instead of three times.
    stashed: the output the forward recorded (RecomputeStash), at the recompute: returned as it is, nothing
    multiplied or written; what is saved for backward matches what the forward saved (the checkpoint pairs
    them by order).
    """

    @staticmethod
    def forward(ctx, xs, weight, offs, counts, keep: bool, stashed: torch.Tensor | None):
        ctx.counts = counts
        ctx.source = None if isinstance(weight, torch.Tensor) else weight
        ctx.reads_codes = ctx.source is not None and ctx.source.reads_codes(xs)
        if ctx.source is None:
            ctx.save_for_backward(offs, weight)  # a view of the frozen parameter: saving it costs nothing
            return stashed if stashed is not None else gmm(xs, weight.transpose(1, 2), offs, counts)
        if stashed is not None or ctx.reads_codes:  # nothing materialised, nothing to keep
            ctx.save_for_backward(offs)
            return stashed if stashed is not None else ctx.source.product(xs, offs)
        w = ctx.source.materialize()
        if keep:
            ctx.save_for_backward(offs, w)  # through the checkpoint's hooks, which decide what is kept
        else:
            ctx.save_for_backward(offs)
        return gmm(xs, w.transpose(1, 2), offs, counts)  # W^T: a column-major view

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        offs, *kept = ctx.saved_tensors
        if ctx.reads_codes:
            return ctx.source.input_grad(grad.contiguous(), offs), None, None, None, None, None
        w = kept[0] if kept else ctx.source.materialize()  # (E, out, in)
        return gmm(grad.to(w.dtype).contiguous(), w, offs, ctx.counts), None, None, None, None, None


def _base_product(
    xs: torch.Tensor, weight, offs: torch.Tensor, counts: list[int] | None, keep_weights: bool
) -> torch.Tensor:
    training = torch.is_grad_enabled() and xs.requires_grad
    stash = _ACTIVE_STASH.get() if training else None
    if stash is None:
        if isinstance(weight, torch.Tensor):
            return gmm(xs, weight.transpose(1, 2), offs, counts)  # (M, out); W^T is a column-major view
        return _FrozenProduct.apply(xs, weight, offs, counts, keep_weights and training, None)
    if not stash.recording:
        stashed = stash.take()
        return _FrozenProduct.apply(xs, weight, offs, counts, stashed is None, stashed)
    recorded = stash.reserve(xs.shape[0], weight.shape[1], xs.dtype)
    y = _FrozenProduct.apply(xs, weight, offs, counts, not recorded, None)
    stash.record(y if recorded else None)
    return y


def project(
    xs: torch.Tensor, proj: Projection, offs: torch.Tensor, counts: list[int] | None, keep_weights: bool = False
) -> torch.Tensor:
    """Per pair: xs @ W[e]^T + sum over adapters of scaling * B[e] A[e] dropout(xs); (M, in) -> (M, out)."""
    y = _base_product(xs, proj.weight, offs, counts, keep_weights)
    if not proj.lora:
        return y
    result_dtype = y.dtype
    for t in proj.lora:
        if counts is None:
            # grouped_mm is bf16-only: run the adapter in the activations' dtype (what autocast does)
            A, B, xa = t.A.to(xs.dtype), t.B.to(xs.dtype), xs
        else:
            A, B, xa = t.A, t.B, xs.to(t.A.dtype)  # PEFT: input cast to the adapter's dtype
        h = gmm(t.dropout(xa), A.transpose(1, 2), offs, counts)  # (M, r)
        # scaling folded into the small B (one pass less over (M, out)); B^T made row-major (E, r, out):
        # its leading dimension `out` meets grouped_mm's 16-byte rule for any r
        y = y + gmm(h, (B * t.scaling).transpose(1, 2).contiguous(), offs, counts)
    return y.to(result_dtype)


class _Rows(torch.autograd.Function):
    """out = src[index] whose backward is a gather too: grad_src = grad[back].view(-1, group, H).sum(1).

    Valid when `index` hits every row of src exactly `group` times and back lists, row by row, where
    those hits landed. Plain indexing would back-propagate with a sorted scatter-add (index_put with
    accumulate), several passes and a sort over M rows.
    """

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor, back: torch.Tensor, group: int) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.group = group
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back,) = ctx.saved_tensors
        g = grad.index_select(0, back)
        if ctx.group > 1:
            g = g.view(-1, ctx.group, g.shape[-1]).sum(1)
        return g, None, None, None


def routed_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    projs: dict[str, Projection],
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    keep_weights: bool = False,
) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{experts[n, j]}(x[n]), dropless: x (N, H), weights (N, k), experts (N, k).

    projs: "gate_proj", "up_proj", "down_proj". The products run in the base weights' dtype (the
    dtype NF4 weights dequantise to, bf16 under Trainer(bf16=True)); the result has x's dtype.
    keep_weights: the caller runs under gradient checkpointing (see _FrozenProduct).
    """
    N, k = experts.shape
    compute_dtype = projs["gate_proj"].dtype
    xc = x.to(compute_dtype)  # before the gather: k times fewer rows to convert
    flat = experts.reshape(-1)  # (M,) expert of each (token, slot) pair, pair p = token * k + slot
    order = flat.argsort(stable=True)  # (M,) pairs grouped by expert
    # (E,) end row of each expert's group; searchsorted, not bincount: CUDA bincount syncs the host
    ends = torch.searchsorted(flat[order], torch.arange(num_experts, device=flat.device), right=True)
    offs = ends.to(torch.int32)
    grouped = grouped_mm_available(x.device, compute_dtype)
    counts = None if grouped else ends.diff(prepend=ends.new_zeros(1)).tolist()  # the loop needs sizes on the host

    inverse = torch.empty_like(order)  # inverse[p] = sorted position of pair p
    inverse[order] = torch.arange(order.numel(), device=order.device)
    xs = _Rows.apply(xc, order // k, inverse, k)  # (M, H) each pair's token, sorted by expert
    gate = project(xs, projs["gate_proj"], offs, counts, keep_weights)  # (M, I)
    up = project(xs, projs["up_proj"], offs, counts, keep_weights)  # (M, I)
    h = act_fn(gate) * up  # (M, I)
    y = project(h, projs["down_proj"], offs, counts, keep_weights)  # (M, H), sorted order

    y = _Rows.apply(y, inverse, order, 1).view(N, k, -1)  # (N, k, H) back in (token, slot) order
    # out[n] = sum_j w[n, j] * y[n, j]: a (1, k) @ (k, H) product per token, no atomics
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1).to(x.dtype)  # (N, H)
