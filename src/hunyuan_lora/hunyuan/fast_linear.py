"""Fast dense projections: attention's q/k/v and o, the shared expert's gate/up and down, as few products.

`HunYuanAttention` and `HunYuanMLP` call `linears_fast(owner, names, x)` when the model runs
`moe_impl: fast`. The projections named read the same input x, so
  * their frozen base weights are PACKED into one (sum of outs, in) matrix, computed by one product:
    bf16 weights re-pointed to row slices of one buffer (as fast_moe.py packs the experts), NF4
    weights' 4-bit codes re-pointed to slices of one code buffer with their block scales dequantised
    once to float32 (a frozen base does not change), so ONE bitsandbytes `dequantize_4bit` writes the
    whole matrix per pass, and it is not saved for backward (dequantised again there);
  * each projection's LoRA runs as PEFT computes it (its own dropout module, so its own mask), its
    result added to that projection's slice.
What this replaces: PEFT's LoRA layer over bitsandbytes' `Linear4bit` per projection, about 1 ms of
host time per call (PEFT and bitsandbytes' Python, a double-quantised scale decode and a 4-bit
decode each call, ~8 autograd nodes), seven per layer, three passes under gradient checkpointing.
Results equal PEFT's up to summation order: the module tree, the state dict and the adapter
format are untouched, and anything this path does not implement (DoRA, LoRA or base biases,
mixed adapter batches, 4-bit formats other than bitsandbytes' NF4/FP4 with whole 64-value blocks)
runs the modules themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .fast_moe import (
    Snapshot,
    Unsupported,
    _base_linear,
    _gemv_4bit,
    _is_4bit,
    _lora_plan,
    decode_products,
    dequantize_4bit,
)


@dataclass
class _Lora:
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    scaling: float
    dropout: nn.Module


class PackedNF4:
    """Several bitsandbytes 4-bit weights of one input width as ONE quantised (sum of outs, in) matrix."""

    def __init__(self, linears: list[nn.Module]):
        import bitsandbytes.functional as bnbf

        params = [m.weight for m in linears]
        states = [p.quant_state for p in params]
        s0 = states[0]
        for p, s in zip(params, states):
            if (
                s.quant_type not in ("nf4", "fp4")
                or p.dtype != torch.uint8
                or s.dtype != s0.dtype
                or s.blocksize != s0.blocksize
                or s.quant_type != s0.quant_type
                or s.shape[1] != s0.shape[1]
                or s.shape.numel() % s.blocksize
            ):
                raise Unsupported("4-bit weights of one input differ in format, or end in a partial block")
        self.shape = (sum(s.shape[0] for s in states), s0.shape[1])
        self.dtype, self.blocksize, self.quant_type = s0.dtype, s0.blocksize, s0.quant_type
        _pack_rows(params)
        self.data = _joined([p.data for p in params])
        self.compute_dtype = linears[0].compute_dtype or s0.dtype
        self.table = s0.code.float()  # the 16 values a 4-bit code stands for
        # float32 scales of every 64-value block, as bitsandbytes decodes them per call (frozen: once here)
        self.absmax = torch.cat(
            [bnbf.dequantize_blockwise(s.absmax, s.state2) + s.offset if s.nested else s.absmax.float() for s in states]
        )

    def materialize(self) -> torch.Tensor:
        """(sum of outs, in) in the compute dtype: a fresh tensor nobody keeps after its product."""
        w = dequantize_4bit(self.data, self.absmax, self.blocksize, self.quant_type, self.shape, self.dtype, self.table)
        return w.to(self.compute_dtype)

    def row_product(self, x: torch.Tensor) -> torch.Tensor:
        """ONE row x (1, in) @ W^T by bitsandbytes' 4-bit matrix-vector kernel (a decode step at batch 1:
        2.7-3x faster than dequantise + multiply at these shapes on an H200), in the compute dtype."""
        return _gemv_4bit(x, self.data, list(self.shape), self.absmax, self.table, self.blocksize)


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Consecutive slices of one buffer (see _pack_rows) as one tensor, without a copy."""
    t0 = tensors[0]
    rows = sum(t.shape[0] for t in tensors)
    return t0.as_strided((rows,) + tuple(t0.shape[1:]), t0.stride(), t0.storage_offset())


def _is_joined(tensors: list[torch.Tensor]) -> bool:
    """Consecutive slices of ONE storage (neighbouring allocations can be consecutive too)."""
    t0 = tensors[0]
    ptr = t0.data_ptr()
    for t in tensors:
        if not t.is_contiguous() or t.data_ptr() != ptr or t.shape[1:] != t0.shape[1:] or t.dtype != t0.dtype:
            return False
        ptr += t.numel() * t.element_size()
    storage = t0.untyped_storage()
    return (
        tensors[-1].untyped_storage().data_ptr() == storage.data_ptr() and storage.data_ptr() + storage.nbytes() >= ptr
    )


@torch.no_grad()
def _pack_rows(params: list[nn.Parameter]) -> None:
    """Point each parameter at consecutive row slices of one buffer (same Parameter objects)."""
    if len(params) == 1 or _is_joined([p.data for p in params]):
        return
    joined = torch.cat([p.data for p in params])
    start = 0
    for p in params:
        rows = p.data.shape[0]
        p.data = joined[start : start + rows]
        start += rows


class _SourcedLinear(torch.autograd.Function):
    """x @ W^T for a frozen W that a source writes on demand; W is not saved for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, source: PackedNF4) -> torch.Tensor:
        ctx.source = source
        return x @ source.materialize().t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.source.materialize()
        return grad.to(w.dtype) @ w, None


def _plan(owner: nn.Module, names: tuple[str, ...]) -> tuple:
    """(base: a (sum of outs, in) weight view or PackedNF4, outs, per projection its LoRA terms), cached."""
    cache = owner.__dict__.setdefault("_fast_linear_plans", {})
    cached = cache.get(names)
    if cached is not None and cached[0].holds():
        return cached[1]
    mods = [getattr(owner, n) for n in names]
    linears = [_base_linear(m) for m in mods]
    n4 = sum(_is_4bit(m) for m in linears)
    if n4 not in (0, len(linears)):
        raise Unsupported("some projections of one input are 4-bit and some are not")
    if n4:
        base = PackedNF4(linears)
        outs = [m.weight.quant_state.shape[0] for m in linears]
    else:
        params = [m.weight for m in linears]
        if any(p.requires_grad for p in params) or len({(p.shape[1], p.dtype, p.device) for p in params}) != 1:
            raise Unsupported("trainable or mismatched base weights")
        _pack_rows(params)
        base = None  # read from the modules each call: _joined over their (packed) weights
        outs = [p.shape[0] for p in params]
    lora = [
        [_Lora(A[0].weight, B[0].weight, scaling, drop) for _, A, B, scaling, drop in _lora_plan([m])] for m in mods
    ]
    plan = (base, outs, lora, linears)
    cache[names] = (Snapshot(mods, [(owner._modules, n, m) for n, m in zip(names, mods)]), plan)  # after packing
    return plan


def linears_fast(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """[owner.<name>(x) for name in names], computed with one base product (see the module docstring)."""
    try:
        base, outs, lora, linears = _plan(owner, names)
    except Unsupported:
        return [getattr(owner, n)(x) for n in names]
    if base is not None:  # NF4: bitsandbytes computes in its compute dtype and hands back x's dtype
        xc = x.to(base.compute_dtype)
        if x.numel() == x.shape[-1] and not torch.is_grad_enabled() and decode_products():  # a decode step
            y = base.row_product(xc.reshape(1, -1)).view(*x.shape[:-1], -1).to(x.dtype)
        else:
            y = _SourcedLinear.apply(xc, base).to(x.dtype)
    else:
        y = nn.functional.linear(x, _joined([m.weight for m in linears]))  # autocast applies, as in nn.Linear
    autocast = torch.is_autocast_enabled(x.device.type)
    if autocast:  # PEFT's LoRA under autocast: the products in the autocast dtype
        xa = x.to(torch.get_autocast_dtype(x.device.type))
    results, start = [], 0
    for out, terms in zip(outs, lora):
        r = y[..., start : start + out] if len(outs) > 1 else y
        start += out
        for t in terms:
            if autocast:
                A, B = t.A.to(xa.dtype), t.B.to(xa.dtype)
            else:  # PEFT: the input cast to the adapter's dtype, the result to the base's
                xa, A, B = x.to(t.A.dtype), t.A, t.B
            delta = (t.dropout(xa) @ A.t()) @ (B * t.scaling).t()
            r = r + (delta if autocast else delta.to(y.dtype))
        results.append(r)
    return results
