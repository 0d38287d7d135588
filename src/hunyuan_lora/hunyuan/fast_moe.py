"""Fast routed experts: all experts' projections (base + LoRA) as grouped matrix products.

    model.config.moe_impl = "fast"          # before building the model, or:
    fast_moe.set_moe_impl(model, "fast")    # on a built (PEFT-wrapped or plain) model

`HunYuanMoE.forward` calls `routed_experts_fast(moe, x, weights, experts)` when its `moe_impl` is
"fast"; the router (`HunYuanTopKGate`: float32 softmax -> top-k -> renormalise) and the shared
expert are the reference code, untouched. The result is the reference's dropless
`HunYuanMoE.routed_experts` (every (token, expert) pair computed), up to summation order.

How (shapes: N tokens, k experts per token, M = N*k pairs, E experts, H hidden, I expert width, r rank)
  1. sort the M (token, expert) pairs by expert -> `offs` (E,) int32, the end row of each expert's
     group in the sorted order; gather xs = x[token_of_pair] (M, H);
  2. gate = xs @ Wg[e]^T, up = xs @ Wu[e]^T, y = (silu(gate) * up) @ Wd[e]^T, each ONE grouped
     product over all experts (`torch._grouped_mm(a (M, K), b (E, K, N), offs)` on CUDA sm90 in
     bf16; elsewhere a loop over the experts that received tokens, same arithmetic);
  3. LoRA on every expert projection the same way: + scaling * ((dropout(xs) @ A[e]^T) @ B[e]^T),
     two more grouped products of width r per projection;
  4. undo the sort and weight: out[n] = sum_j w[n, j] * y[pair (n, j)] as one batched product
     (deterministic, no atomics; the gathers of steps 1 and 4 back-propagate as gathers, `_Rows`).

Why this layout (the design point): the model keeps the checkpoint's module tree,
`mlp.experts.{i}.{gate,up,down}_proj` as `nn.Linear`, so
  * the same safetensors load with the same state-dict keys (nothing to remap);
  * `get_peft_model` wraps each expert projection exactly as on the reference, and the adapter
    it saves is PEFT's standard per-expert format
    (`base_model.model.model.layers.N.mlp.experts.{i}.gate_proj.lora_A.weight` ...), loadable by
    `PeftModel` on the reference implementation and by Tencent's code. No conversion step exists
    to get wrong.
  The grouped products need each projection's E weights as one (E, out, in) tensor. Frozen base
  weights are PACKED once, on the first fast forward: one (E, out, in) buffer is allocated, the E
  weights copied in, and each expert's `weight.data` re-pointed to its slice, so the module tree,
  the `Parameter` objects, `state_dict()` / `load_state_dict()` (which copy in place) and PEFT all
  see the same tensors, and the stacked operand is a free `as_strided` view of the shared storage.
  Every forward checks that the layout still holds (one storage, slices in order) and re-packs if
  something replaced the tensors (`model.to(...)`, a loader that assigns new parameters). Base
  weights that require grad (full fine-tuning) are instead stacked with `torch.stack` each forward
  (differentiable, slow). LoRA A/B (about 11 M parameters a layer at r=8) are stacked with
  `torch.stack` on each forward: a ~44 MB copy whose backward hands each expert's own leaf
  parameter its gradient, so optimiser, gradient clipping and PEFT saving are unchanged.
  `save_pretrained` of a packed full model still works: transformers clones disjoint views of one
  storage before writing safetensors.

Works with gradient checkpointing (the packing check is idempotent; dropout masks are replayed
by checkpoint's RNG restore) and bf16.

Differences from the reference, all deliberate:
  * an expert that received no token in a step gets a ZERO gradient on its LoRA A/B instead of
    PEFT's `None`; AdamW then still applies its momentum to that expert (as every grouped MoE
    implementation does);
  * LoRA dropout draws one mask per (token, expert) pair per projection, as PEFT does, but from
    a different random stream, so dropout-on results match the reference in distribution only;
  * on the grouped (bf16 CUDA) path the LoRA products run in the activations' dtype (bf16) even
    when PEFT keeps the adapter weights in float32 (PEFT's default `autocast_adapter_dtype`);
    this is what PEFT itself does under `torch.autocast(bf16)`, i.e. under `Trainer(bf16=True)`.
    The loop path (CPU, float32) follows PEFT exactly (input cast to the adapter dtype).
Gate and up stay two grouped products: one product over a fused (E, 2I, H) gate+up buffer was
tried and measured slower on an H200 (about 2 % at 16K tokens, 20-40 % at 1.5K tokens).
Not supported (falls back to the reference loop, with a warning once): DoRA, LoRA bias, mixed
adapter batches (`adapter_names`), experts whose ranks / scalings / dropouts differ, base biases.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
IMPLS = ("reference", "fast")


def set_moe_impl(model: nn.Module, impl: str) -> int:
    """Switch every HunYuanMoE in `model` (PEFT-wrapped or not) to `impl`; returns how many."""
    if impl not in IMPLS:
        raise ValueError(f"moe_impl must be one of {IMPLS}, got {impl!r}")
    n = 0
    for module in model.modules():
        if type(module).__name__ == "HunYuanMoE":
            module.moe_impl = impl
            n += 1
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_experts"):
            config.moe_impl = impl
    return n


# ---------------------------------------------------------------------------------------------
# grouped product


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm: CUDA, bf16, compute capability 9.0 (torch 2.8 accepts only sm90).

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
            pieces.append(a[start:start + n] @ b[e])
        start += n
    if not pieces:
        return a.new_zeros(a.shape[0], b.shape[-1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


# ---------------------------------------------------------------------------------------------
# the experts' weights as stacked operands


@dataclass
class LoraTerm:
    A: torch.Tensor  # (E, r, in), differentiable stack of the experts' lora_A weights
    B: torch.Tensor  # (E, out, r)
    scaling: float
    dropout: nn.Module  # one expert's Dropout / Identity: all experts' are checked equal


@dataclass
class Projection:
    weight: torch.Tensor  # (E, out, in)
    lora: list[LoraTerm] = field(default_factory=list)


class Unsupported(Exception):
    """This MoE's expert modules use a feature the fast path does not implement."""


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _base_linear(module: nn.Module) -> nn.Linear:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if not isinstance(module, nn.Linear):
        raise Unsupported(f"expert projection is {type(module).__name__}, not nn.Linear")
    if module.bias is not None:
        raise Unsupported("expert projections with a bias")
    return module


def _is_packed(weights: list[torch.Tensor]) -> bool:
    """True when weights[i] is slice i of one contiguous (E, out, in) block of one storage.

    Consecutive data pointers plus first and last slice inside one storage suffice: live
    allocations never overlap, so every slice in between lies in that storage too.
    """
    w0, wl = weights[0], weights[-1]
    if not (w0.is_contiguous() and wl.is_contiguous()):
        return False
    nbytes = w0.numel() * w0.element_size()
    ptr0 = w0.data_ptr()
    for i, w in enumerate(weights):
        if w.data_ptr() != ptr0 + i * nbytes or w.shape != w0.shape or w.dtype != w0.dtype:
            return False
    storage = w0.untyped_storage()
    return (wl.untyped_storage().data_ptr() == storage.data_ptr()
            and storage.data_ptr() + storage.nbytes() >= ptr0 + len(weights) * nbytes)


@torch.no_grad()
def _pack(params: list[nn.Parameter]) -> None:
    """Copy the E weights into one (E, out, in) buffer and point each parameter at its slice."""
    stacked = torch.empty((len(params),) + tuple(params[0].shape), dtype=params[0].dtype, device=params[0].device)
    for i, p in enumerate(params):
        stacked[i].copy_(p)
        p.data = stacked[i]  # same Parameter object: optimiser, PEFT and state_dict keep working


def stacked_weight(params: list[nn.Parameter]) -> torch.Tensor:
    """The E experts' weights of one projection as an (E, out, in) tensor."""
    if any(p.requires_grad for p in params):
        return torch.stack(params)  # full fine-tuning: differentiable copy
    if not _is_packed(params):
        _pack(params)
    w0 = params[0].detach()
    return w0.as_strided((len(params),) + tuple(w0.shape), (w0.numel(),) + tuple(w0.stride()), w0.storage_offset())


def _lora_plan(mods: list[nn.Module]) -> list[tuple[list[nn.Linear], list[nn.Linear], float, nn.Module]]:
    """Per active adapter: (the E lora_A modules, the E lora_B modules, scaling, dropout), validated."""
    first = mods[0]
    if not _is_lora(first):
        if any(_is_lora(m) for m in mods):
            raise Unsupported("some experts of a projection have LoRA and some do not")
        return []
    if any(not _is_lora(m) for m in mods):
        raise Unsupported("some experts of a projection have LoRA and some do not")
    if first.disable_adapters or first.merged:
        return []  # PEFT computes the base layer alone in both cases
    plan = []
    for name in first.active_adapters:
        if name not in first.lora_A:
            continue
        if first.use_dora.get(name, False) or getattr(first, "lora_bias", {}).get(name, False):
            raise Unsupported("DoRA / LoRA bias")
        drop = first.lora_dropout[name]
        p = getattr(drop, "p", 0.0)
        scaling = first.scaling[name]
        for m in mods:
            if (m.scaling[name] != scaling or getattr(m.lora_dropout[name], "p", 0.0) != p
                    or m.lora_A[name].weight.shape != first.lora_A[name].weight.shape
                    or m.active_adapters != first.active_adapters or m.disable_adapters or m.merged
                    or m.use_dora.get(name, False)):
                raise Unsupported("experts differ in LoRA rank, scaling, dropout or state")
        plan.append(([m.lora_A[name] for m in mods], [m.lora_B[name] for m in mods], scaling, drop))
    return plan


def _plan(moe: nn.Module) -> dict:
    """Module lists (base nn.Linear, LoRA) of the three expert projections, validated once and cached on `moe`.

    The cache key holds every expert projection module and the adapter state PEFT can switch
    (active adapters, merged, disabled), so re-wrapping, set_adapter, merge or disable re-plans.
    Modules, not Parameters: their weights are read on every forward, so a Parameter replaced
    since (load_state_dict(assign=True), PEFT's low_cpu_mem_usage loading) is the one used.
    """
    mods = {name: [getattr(expert, name) for expert in moe.experts] for name in PROJECTIONS}
    key = tuple(id(m) for ms in mods.values() for m in ms)
    key += tuple((tuple(ms[0].active_adapters), ms[0].merged, ms[0].disable_adapters)
                 for ms in mods.values() if _is_lora(ms[0]))
    cached = moe.__dict__.get("_fast_moe_plan")
    if cached is not None and cached[0] == key:
        return cached[1]
    plan = {name: ([_base_linear(m) for m in ms], _lora_plan(ms)) for name, ms in mods.items()}
    moe.__dict__["_fast_moe_plan"] = (key, plan)
    return plan


def projections(moe: nn.Module) -> dict[str, Projection]:
    """Stacked base weights and LoRA terms of the three expert projections of `moe`."""
    out = {}
    for name, (linears, lora) in _plan(moe).items():
        # LoRA stacks: differentiable copies (E x (r x in + out x r)), each expert's grad flows back to its leaf
        terms = [LoraTerm(torch.stack([a.weight for a in A]), torch.stack([b.weight for b in B]), scaling, drop)
                 for A, B, scaling, drop in lora]
        out[name] = Projection(stacked_weight([m.weight for m in linears]), terms)
    return out


# ---------------------------------------------------------------------------------------------
# forward


def _project(xs: torch.Tensor, proj: Projection, offs: torch.Tensor, counts: list[int] | None) -> torch.Tensor:
    """Per pair: xs @ W[e]^T + sum over adapters of scaling * B[e] A[e] dropout(xs); (M, in) -> (M, out)."""
    y = gmm(xs, proj.weight.transpose(1, 2), offs, counts)  # (M, out); W^T is a column-major view
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


_warned: set[str] = set()


def routed_experts_fast(moe: nn.Module, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Drop-in for `HunYuanMoE.routed_experts`: x (N, H), weights (N, k) float32, experts (N, k) int64."""
    try:
        projs = projections(moe)
    except Unsupported as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            warnings.warn(f"fast MoE falls back to the reference loop: {e}", stacklevel=2)
        return moe.routed_experts(x, weights, experts)

    N, k = experts.shape
    E = moe.num_experts
    flat = experts.reshape(-1)  # (M,) expert of each (token, slot) pair, pair p = token * k + slot
    order = flat.argsort(stable=True)  # (M,) pairs grouped by expert
    # (E,) end row of each expert's group; searchsorted, not bincount: CUDA bincount syncs the host
    ends = torch.searchsorted(flat[order], torch.arange(E, device=flat.device), right=True)
    offs = ends.to(torch.int32)
    grouped = grouped_mm_available(x.device, x.dtype)
    counts = None if grouped else ends.diff(prepend=ends.new_zeros(1)).tolist()  # the loop needs sizes on the host

    inverse = torch.empty_like(order)  # inverse[p] = sorted position of pair p
    inverse[order] = torch.arange(order.numel(), device=order.device)
    xs = _Rows.apply(x, order // k, inverse, k)  # (M, H) each pair's token, sorted by expert
    gate = _project(xs, projs["gate_proj"], offs, counts)  # (M, I)
    up = _project(xs, projs["up_proj"], offs, counts)  # (M, I)
    h = moe.experts[0].act_fn(gate) * up  # (M, I)
    y = _project(h, projs["down_proj"], offs, counts)  # (M, H), sorted order

    y = _Rows.apply(y, inverse, order, 1).view(N, k, -1)  # (N, k, H) back in (token, slot) order
    # out[n] = sum_j w[n, j] * y[n, j]: a (1, k) @ (k, H) product per token, no atomics
    return torch.bmm(weights.to(y.dtype).unsqueeze(1), y).squeeze(1)  # (N, H)
