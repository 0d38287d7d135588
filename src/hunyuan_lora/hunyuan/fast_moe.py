"""Fast routed experts: a HunYuanMoE's expert modules as the stacked operands of grouped_moe.py.

`HunYuanMoE.forward` calls `routed_experts_fast(moe, x, weights, experts)` when its `moe_impl` is
"fast" (set `config.moe_impl = "fast"` before building the model); the router
(`HunYuanTopKGate`: float32 softmax -> top-k -> renormalise) and the shared expert are the
model's own code, untouched. The result is the model's dropless `HunYuanMoE.routed_experts`
(every (token, expert) pair computed), up to summation order. The grouped math itself is in
grouped_moe.py; this file is the plumbing between it and the module tree (PEFT, packing, NF4).

Why this layout (the design point): the model keeps the checkpoint's module tree,
`mlp.experts.{i}.{gate,up,down}_proj` as `nn.Linear` (or bitsandbytes' `Linear4bit` under NF4), so
  * the same safetensors load with the same state-dict keys (nothing to remap);
  * `get_peft_model` wraps each expert projection exactly as on the per-expert loop, and the
    adapter it saves is PEFT's standard per-expert format
    (`base_model.model.model.layers.N.mlp.experts.{i}.gate_proj.lora_A.weight` ...), loadable by
    `PeftModel` on the bf16 model, on the project's code and on Tencent's. No conversion step
    exists to get wrong.
  The grouped products need each projection's E weights as one (E, out, in) tensor. Frozen base
  weights are PACKED once, on the first fast forward: one (E, out, in) buffer is allocated, the E
  weights copied in, and each expert's `weight.data` re-pointed to its slice, so the module tree,
  the `Parameter` objects, `state_dict()` / `load_state_dict()` (which copy in place) and PEFT all
  see the same tensors, and the stacked operand is a free `as_strided` view of the shared storage.
  Every forward checks the cached plan's `Snapshot` (the module-tree entries it read, its tensors'
  data pointers) and re-plans (re-packs) if something replaced the tensors (`model.to(...)`, a loader
  that assigns new parameters). Base weights that require grad (full fine-tuning) are instead
  stacked with `torch.stack` each forward (differentiable, slow). LoRA A/B (about 11 M parameters a
  layer at r=8): for training, `stack_expert_lora` (training.attach_lora calls it) makes each
  projection's E pairs ONE trainable (E, r, in) / (E, out, r) parameter whose per-expert views PEFT
  saves and loads; otherwise they are stacked with `torch.stack` on each forward, a differentiable
  copy whose backward hands each expert's own leaf parameter its gradient.
  `save_pretrained` of a packed full model still works: transformers clones disjoint views of one
  storage before writing safetensors.

NF4 (QLoRA, bitsandbytes `Linear4bit` experts): the experts stay 4-bit. Their quantised codes
and block scales are packed the same way (each `Params4bit.data` and `quant_state.absmax`
re-pointed to its slice of one buffer per projection), so ONE `bitsandbytes.functional.
dequantize_4bit` call per projection per pass writes all E experts' bf16 weights (`NF4Experts`;
1.5 GiB on the real model), used by one grouped product and released: the caching allocator
hands the same block to the next projection and layer, so one such block is all the scratch
there is. The double-quantised scales (one offset per expert) are
dequantised with bitsandbytes' `dequantize_blockwise` over all experts, then each expert's offset
added, the arithmetic bitsandbytes does per tensor. Nothing dequantised is kept for backward; under
gradient checkpointing two decodes per projection and step instead of three: the forward's products are
handed to the recompute (grouped_moe.RecomputeStash) and the backward decodes once, or, past the stash's
budget, the recompute's weights serve the layer's backward (grouped_moe._FrozenProduct).

Works with gradient checkpointing (the packing check is idempotent; dropout masks are replayed
by checkpoint's RNG restore) and bf16.

Differences from PEFT on the per-expert modules, all deliberate:
  * an expert that received no token in a step gets a ZERO gradient on its LoRA A/B instead of
    PEFT's `None`; AdamW then still applies its momentum to that expert (as every grouped MoE
    implementation does);
  * LoRA dropout draws one mask per (token, expert) pair per projection, as PEFT does, but from
    a different random stream, so dropout-on results match in distribution only;
  * on the grouped (bf16 CUDA) path the LoRA products run in the activations' dtype (bf16) even
    when PEFT keeps the adapter weights in float32 (PEFT's default `autocast_adapter_dtype`);
    this is what PEFT itself does under `torch.autocast(bf16)`, i.e. under `Trainer(bf16=True)`.
    The loop path (CPU, float32) follows PEFT exactly (input cast to the adapter dtype);
  * under NF4 the expert MLP's elementwise part (SiLU, product) runs in the compute dtype (bf16),
    where bitsandbytes' layers hand float32 back to a float32 residual stream.
Not supported (falls back to the per-expert loop, with a warning once): DoRA, LoRA bias, mixed
adapter batches (`adapter_names`), experts whose ranks / scalings / dropouts differ, base biases,
4-bit formats other than bitsandbytes' NF4/FP4 with uint8 storage.
"""

from __future__ import annotations

import operator
import os
import warnings

import torch
from torch import nn

from .grouped_moe import LoraTerm, Projection, routed_experts

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class Unsupported(Exception):
    """This MoE's expert modules use a feature the fast path does not implement."""


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


def _is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(module.weight, "quant_state")


def _base_linear(module: nn.Module) -> nn.Module:
    """The base layer under PEFT's wrapper: an nn.Linear, or bitsandbytes' Linear4bit."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    if not (isinstance(module, nn.Linear) or _is_4bit(module)):
        raise Unsupported(f"expert projection is {type(module).__name__}, not nn.Linear or bitsandbytes Linear4bit")
    if module.bias is not None:
        raise Unsupported("expert projections with a bias")
    return module


# ---------------------------------------------------------------------------------------------
# packing: the E experts' tensors of one projection as slices of one buffer


def _is_packed(weights: list[torch.Tensor]) -> bool:
    """True when weights[i] is slice i of one contiguous (E, ...) block of one storage.

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
    return (
        wl.untyped_storage().data_ptr() == storage.data_ptr()
        and storage.data_ptr() + storage.nbytes() >= ptr0 + len(weights) * nbytes
    )


@torch.no_grad()
def _pack(params: list[nn.Parameter]) -> None:
    """Copy the E weights into one (E, out, in) buffer and point each parameter at its slice."""
    stacked = torch.empty((len(params),) + tuple(params[0].shape), dtype=params[0].dtype, device=params[0].device)
    for i, p in enumerate(params):
        stacked[i].copy_(p)
        p.data = stacked[i]  # same Parameter object: optimiser, PEFT and state_dict keep working


def _stacked_view(tensors: list[torch.Tensor]) -> torch.Tensor:
    """(E, ...) view of packed slices (no copy)."""
    t0 = tensors[0].detach()
    return t0.as_strided((len(tensors),) + tuple(t0.shape), (t0.numel(),) + tuple(t0.stride()), t0.storage_offset())


def stacked_weight(params: list[nn.Parameter]) -> torch.Tensor:
    """The E experts' weights of one projection as an (E, out, in) tensor."""
    if any(p.requires_grad for p in params):
        return torch.stack(params)  # full fine-tuning: differentiable copy
    if not _is_packed(params):
        _pack(params)
    return _stacked_view(params)


# model.nf4_products: auto reads the codes up to this many routed (token, expert) rows per product. One H200,
# the real model's gate and down shapes (bench/results/nf4-products-2026-12-03.json): from the codes 0.48 /
# 0.66 ms at 128 / 512 rows against 1.31 / 1.37 ms dequantising all 64 experts, 5.6 against 1.56 ms at 8,192
# (a training step's 16 samples): the crossover lies between 1,024 and 2,048.
CODES_MAX_ROWS = 1024


class NF4Experts:
    """The E experts' bitsandbytes 4-bit weights of one projection as ONE quantised tensor.

    data: the E experts' packed 4-bit codes back to back ((E * out * in / 2, 1) uint8, each
    expert's `Params4bit.data` a slice of it); absmax: per 64-value block, either float32 or (double
    quantisation) uint8 codes of `absmax - offset` under a second-level blockwise state, whose
    per-expert pieces are stacked here. `materialize()` writes all E bf16 weights with one
    `dequantize_4bit` call.
    """

    def __init__(self, linears: list[nn.Module], products: str = "dequantize"):
        params = [m.weight for m in linears]
        states = [p.quant_state for p in params]
        s0 = states[0]
        if s0.quant_type not in ("nf4", "fp4") or params[0].dtype != torch.uint8:
            raise Unsupported(f"4-bit storage {params[0].dtype} / {s0.quant_type}")
        for p, s in zip(params, states):
            if (
                tuple(s.shape) != tuple(s0.shape)
                or s.dtype != s0.dtype
                or s.blocksize != s0.blocksize
                or s.quant_type != s0.quant_type
                or s.nested != s0.nested
                or p.shape != params[0].shape
            ):
                raise Unsupported("experts differ in 4-bit shape, dtype or quantisation state")
        self.params, self.states = params, states
        self.products = products  # model.nf4_products (set_nf4_products)
        E, (out_f, in_f) = len(params), tuple(s0.shape)
        self.shape, self.dtype = (E, out_f, in_f), s0.dtype
        self.device = params[0].device
        self.blocksize, self.quant_type, self.nested = s0.blocksize, s0.quant_type, s0.nested
        self.table = s0.code.float()  # the 16 values a 4-bit code stands for
        if self.nested:
            s2 = s0.state2
            self.blocks = s0.absmax.numel()  # 64-value blocks per expert
            self.blocksize2, self.code2 = s2.blocksize, s2.code
            self.absmax2 = torch.cat([s.state2.absmax for s in states])  # (E * ceil(blocks / blocksize2),)
            self.offsets = torch.stack([s.offset.reshape(()) for s in states]).float()  # (E,)
        self.repack()

    @torch.no_grad()
    def repack(self) -> None:
        """Point every expert's codes (and block scales) at its slice of one buffer per kind."""
        if not _is_packed([p.data for p in self.params]):
            _pack(self.params)
        scales = [s.absmax for s in self.states]
        if not _is_packed(scales):
            stacked = torch.stack(scales)
            for s, row in zip(self.states, stacked):
                s.absmax = row
        self.data = _stacked_view([p.data for p in self.params]).reshape(-1, 1)
        absmax = _stacked_view([s.absmax for s in self.states])  # (E, blocks)
        if self.nested:
            # the second-level blocks must not straddle two experts: pad each expert's row to whole blocks
            whole = -(-self.blocks // self.blocksize2) * self.blocksize2
            if whole != self.blocks:
                absmax = torch.nn.functional.pad(absmax, (0, whole - self.blocks))
        self.absmax = absmax
        self._scales = None
        E, out_f, in_f = self.shape
        # the one-token products gather whole experts (rows) or whole rows of experts (columns): both need
        # every 64-value block inside one expert's row; gathered as 8-byte words where they align
        self.one_token = in_f % self.blocksize == 0 and in_f % 2 == 0
        codes = self.data.view(-1)
        word = torch.int64 if in_f % 16 == 0 and codes.data_ptr() % 8 == 0 else torch.uint8
        self._codes = codes.view(word).view(E, out_f, -1)  # (E, out, in / 2 bytes as words)

    def scales(self) -> torch.Tensor:
        """(E * blocks,) float32 absmax of every 64-value block, as bitsandbytes computes it per tensor.

        Decoded once and kept (the base is frozen; a changed one is a new plan): 4 bytes per 64 weights,
        4.8 GB for the real model's 77 G expert weights, against a decode of the double-quantised scales
        in every pass (three per layer and step under checkpointing)."""
        import bitsandbytes.functional as bnbf

        if not self.nested:
            return self.absmax.reshape(-1)
        if self._scales is None:
            E = self.shape[0]
            a = bnbf.dequantize_blockwise(
                self.absmax.reshape(-1), absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2
            )  # (E * whole,) float32
            self._scales = (a.view(E, -1)[:, : self.blocks] + self.offsets[:, None]).reshape(-1)
        return self._scales

    def materialize(self) -> torch.Tensor:
        """(E, out, in) dequantised weights: a fresh tensor that nothing keeps after the product using it,
        so the caching allocator hands the same block to the next projection and layer."""
        return dequantize_4bit(
            self.data, self.scales(), self.blocksize, self.quant_type, self.shape, self.dtype, self.table
        )

    def reads_codes(self, xs: torch.Tensor) -> bool:
        """The grouped products read the 4-bit codes (nf4_products.py) instead of a dequantised weight: with
        model.nf4_products: triton always, with auto for at most CODES_MAX_ROWS routed rows; for NF4 in
        64-value blocks, activations in bf16 on CUDA (or any float dtype on the CPU under Triton's
        interpreter, which is how the tests run it)."""
        in_f = self.shape[2]
        if self.products == "dequantize" or self.quant_type != "nf4" or self.blocksize != 64 or in_f % 64:
            return False
        if self.products == "auto" and xs.shape[0] > CODES_MAX_ROWS:
            return False
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return xs.device.type == "cpu"
        return xs.is_cuda and xs.dtype == torch.bfloat16

    def _operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """codes (E, out, in / 2) uint8, scales (E, out, in / 64) float32, table (16,): bitsandbytes' own bytes."""
        E, out_f, in_f = self.shape
        codes = self._codes.view(torch.uint8).view(E, out_f, in_f // 2)
        return codes, self.scales().view(E, out_f, -1), self.table.to(codes.device)

    def product(self, xs: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        from . import nf4_products

        return nf4_products.grouped_product(xs.contiguous(), *self._operands(), offs)

    def input_grad(self, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        from . import nf4_products

        return nf4_products.grouped_input_grad(grad.to(self.dtype).contiguous(), *self._operands(), offs)

    def rows_product(self, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x (1, in) times the weights of `experts` (k,) one above the other: (1, k * out). Only the k experts'
        codes and scales are gathered (on the device) and multiplied by bitsandbytes' 4-bit matrix-vector
        kernel; nothing is dequantised to memory."""
        E, out_f, in_f = self.shape
        codes = self._codes.index_select(0, experts).view(torch.uint8).view(-1, 1)
        absmax = self.scales().view(E, -1).index_select(0, experts).view(-1)
        return _gemv_4bit(x, codes, [len(experts) * out_f, in_f], absmax, self.table, self.blocksize)

    def columns_product(self, z: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """z (1, k * in), expert j's input in slice j, times [W_e1 | ... | W_ek]: (1, out), the sum of the k
        experts' products, as one matrix-vector product over their gathered rows."""
        E, out_f, in_f = self.shape
        codes = self._codes.transpose(0, 1)[:, experts]  # (out, k, in / 2 bytes): row o of every expert side by side
        absmax = self.scales().view(E, out_f, -1).transpose(0, 1)[:, experts]  # (out, k, in / blocksize)
        return _gemv_4bit(
            z,
            codes.reshape(-1).view(torch.uint8).view(-1, 1),
            [out_f, len(experts) * in_f],
            absmax.reshape(-1),
            self.table,
            self.blocksize,
        )


def _gemv_4bit(
    x: torch.Tensor, codes: torch.Tensor, shape: list[int], absmax: torch.Tensor, table: torch.Tensor, blocksize: int
) -> torch.Tensor:
    """bitsandbytes' 4-bit matrix-vector product, x (1, in) @ W^T with W (out, in) given by its codes."""
    return torch.ops.bitsandbytes.gemv_4bit.default(x, codes, shape, absmax, table.to(x.device), blocksize)


def decode_products() -> bool:
    """The one-token products (gemv over gathered codes) for decode steps; HUNYUAN_DECODE_GEMV=0 dequantises
    whole weights as for many tokens (for A/B timing and debugging)."""
    return os.environ.get("HUNYUAN_DECODE_GEMV", "1") != "0"


def one_token_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, projs: dict[str, Projection], act_fn
) -> torch.Tensor | None:
    """The routed experts of ONE token without gradients (a decode step at batch 1), from the 4-bit codes of
    its k experts only; None where this does not apply (more tokens, gradients, not NF4 experts).

    All k experts see the same x, so gate and up are one matrix-vector product each over the k experts'
    gathered rows; the routing weights scale each expert's hidden vector before down (linear), which is
    then one product over the k experts' rows side by side. LoRA as the grouped path computes it (the k
    experts' A / B gathered, in the activations' dtype). Fixed shapes, no host synchronisation.
    """
    if x.shape[0] != 1 or torch.is_grad_enabled() or not decode_products():
        return None
    gate, up, down = (projs[name] for name in PROJECTIONS)
    if not all(isinstance(p.weight, NF4Experts) and p.weight.one_token for p in (gate, up, down)):
        return None
    e = experts[0]  # (k,)
    k = e.shape[0]
    xc = x.to(gate.dtype)  # (1, H)
    g = gate.weight.rows_product(xc, e).view(k, -1) + _lora_rows(xc.expand(k, -1), gate.lora, e)  # (k, I)
    u = up.weight.rows_product(xc, e).view(k, -1) + _lora_rows(xc.expand(k, -1), up.lora, e)
    z = act_fn(g) * u * weights[0].to(g.dtype)[:, None]  # (k, I): each expert's input to down, weighted
    y = down.weight.columns_product(z.reshape(1, -1), e) + _lora_rows(z, down.lora, e).sum(0, keepdim=True)
    return y.to(x.dtype)  # (1, H)


def _lora_rows(xs: torch.Tensor, terms: list, experts: torch.Tensor) -> torch.Tensor | float:
    """Row j of xs (k, in) through expert experts[j]'s LoRA terms: (k, out), or 0 without LoRA."""
    total = 0.0
    for t in terms:
        A = t.A.index_select(0, experts).to(xs.dtype)  # (k, r, in)
        B = (t.B.index_select(0, experts) * t.scaling).to(xs.dtype)  # (k, out, r)
        total = total + torch.bmm(B, torch.bmm(A, t.dropout(xs).unsqueeze(-1))).squeeze(-1)
    return total


def dequantize_4bit(
    data: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    shape: tuple,
    dtype: torch.dtype,
    table: torch.Tensor,
) -> torch.Tensor:
    """bitsandbytes' 4-bit decode with float32 block scales, without `functional.dequantize_4bit`'s Python (a
    QuantState per call, the scale decode this module did once). NF4 in blocks of 64 on CUDA: the same bits from
    nf4_products.dequantize, table the 16 code values (see nf4_dequantizer); otherwise bitsandbytes' op."""
    if quant_type == "nf4" and blocksize == 64 and data.is_cuda and nf4_dequantizer() == "triton":
        from . import nf4_products

        return nf4_products.dequantize(data, absmax, table, shape, dtype)
    return torch.ops.bitsandbytes.dequantize_4bit.default(data, absmax, blocksize, quant_type, list(shape), dtype)


def nf4_dequantizer() -> str:
    """The kernel that dequantises NF4 weights on CUDA: "triton" (nf4_products.dequantize) or "bitsandbytes"
    (HUNYUAN_NF4_DEQUANT=bitsandbytes, for A/B timing). Both write the same bits; a training step at 32 layers
    dequantises ~400 GB, which bitsandbytes' op writes at about half the H200's bandwidth (bench/NOTES.md)."""
    return os.environ.get("HUNYUAN_NF4_DEQUANT", "triton")


def _lora_plan(mods: list[nn.Module]) -> list[tuple[str, list[nn.Linear], list[nn.Linear], float, nn.Module]]:
    """Per active adapter: (name, the E lora_A modules, the E lora_B modules, scaling, dropout), validated."""
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
            if (
                m.scaling[name] != scaling
                or getattr(m.lora_dropout[name], "p", 0.0) != p
                or m.lora_A[name].weight.shape != first.lora_A[name].weight.shape
                or m.active_adapters != first.active_adapters
                or m.disable_adapters
                or m.merged
                or m.use_dora.get(name, False)
            ):
                raise Unsupported("experts differ in LoRA rank, scaling, dropout or state")
        plan.append((name, [m.lora_A[name] for m in mods], [m.lora_B[name] for m in mods], scaling, drop))
    return plan


class Snapshot:
    """What a cached plan was built from, checked cheaply on every forward (twice a step under
    checkpointing, so it must cost microseconds, not the plan's milliseconds).

    holders: (dict, key, value) triples, the `_modules` / `_parameters` / `_buffers` / `__dict__` entries
    the plan read: a re-wrapped module, a replaced Parameter (load_state_dict(assign=True), PEFT's
    low_cpu_mem_usage loading), a new quant_state fail the identity check. pointers: (tensor, data
    pointer) of what conversions re-point in place (`model.to(...)`, `.double()` set every `.data`). states:
    the adapter state PEFT switches (active adapters, merged, disabled). bitsandbytes' Params4bit answers
    every tensor attribute through `__torch_function__` (~3 us), so of those only the first and last
    pointer is read: a conversion moves them all. ~0.2 ms for a real MoE block's 192 expert projections
    (a 2-core CPU; the plan it guards takes milliseconds to build).
    """

    def __init__(self, modules: list[nn.Module], owners: list[tuple[dict, str, nn.Module]]):
        """modules: the projections the plan reads; owners: the (`_modules`, name, module) entries holding them."""
        self.holders, self.pointers, self.states = list(owners), [], []
        # PEFT switches adapters on every module at once and the plan checked they agree: the ends suffice
        self.states = [
            (m, _adapter_state(m)) for m in {id(m): m for m in modules[:1] + modules[-1:]}.values() if _is_lora(m)
        ]
        for m in modules:
            if _is_lora(m):
                for kind in ("lora_A", "lora_B"):
                    table = m._modules[kind]._modules
                    for adapter in m.active_adapters:
                        if adapter in table:
                            self.holders.append((table, adapter, table[adapter]))
                            self._tensor(table[adapter], "weight", plain=True)
            while "base_layer" in m._modules:
                self.holders.append((m._modules, "base_layer", m._modules["base_layer"]))
                m = m._modules["base_layer"]
            self._tensor(m, "weight", plain=not hasattr(m._parameters.get("weight"), "quant_state"))
        four_bit = [h[2] for h in self.holders if isinstance(h[2], torch.Tensor) and hasattr(h[2], "quant_state")]
        for w in four_bit[:1] + four_bit[-1:]:
            self.pointers.append((w, w.data_ptr()))
        for w in four_bit:
            self.holders.append((w.__dict__, "quant_state", w.quant_state))
            self.holders.append((w.quant_state.__dict__, "absmax", w.quant_state.absmax))
        self.columns = tuple(zip(*self.holders)) or ((), (), ())

    def _tensor(self, module: nn.Module, name: str, plain: bool) -> None:
        table = module._parameters if name in module._parameters else module._buffers
        t = table.get(name)
        self.holders.append((table, name, t))
        if plain and t is not None:
            self.pointers.append((t, t.data_ptr()))

    def holds(self) -> bool:
        tables, keys, values = self.columns
        return (
            all(map(operator.is_, map(dict.get, tables, keys), values))
            and all(t.data_ptr() == p for t, p in self.pointers)
            and all(_adapter_state(m) == s for m, s in self.states)
        )


def _adapter_state(m: nn.Module) -> tuple:
    return tuple(m.active_adapters), m.merged, m.disable_adapters


def _snapshot(moe: nn.Module) -> Snapshot:
    """The plan's inputs: each expert's projection modules (as `moe.experts[i]` holds them) and below."""
    experts = [e._modules for e in moe.experts._modules.values()]
    owners = [(e, name, e[name]) for name in PROJECTIONS for e in experts]
    return Snapshot([m for _, _, m in owners], owners)


def _plan(moe: nn.Module) -> dict:
    """Module lists (base layer, LoRA) of the three expert projections, validated once and cached on `moe`
    with a `Snapshot` of what it was built from: re-wrapping, set_adapter, merge, disable or replaced
    tensors re-plan. Under NF4 the plan holds the packed `NF4Experts`; the snapshot is taken after packing."""
    cached = moe.__dict__.get("_fast_moe_plan")
    if cached is not None and cached[0].holds():
        return cached[1]
    mods = {name: [getattr(expert, name) for expert in moe.experts] for name in PROJECTIONS}
    plan = {}
    for name, ms in mods.items():
        linears = [_base_linear(m) for m in ms]
        n4 = sum(_is_4bit(m) for m in linears)
        if n4 not in (0, len(linears)):
            raise Unsupported("some experts of a projection are 4-bit and some are not")
        if not n4 and not any(m.weight.requires_grad for m in linears):
            params = [m.weight for m in linears]
            if not _is_packed(params):
                _pack(params)
        lora = [
            (
                A,
                B,
                scaling,
                drop,
                _stacked_lora(moe, name, "lora_A", adapter, A),
                _stacked_lora(moe, name, "lora_B", adapter, B),
            )
            for adapter, A, B, scaling, drop in _lora_plan(ms)
        ]
        products = moe.__dict__.get("nf4_products", "dequantize")
        plan[name] = (NF4Experts(linears, products) if n4 else linears, lora)
    moe.__dict__["_fast_moe_plan"] = (_snapshot(moe), plan)
    return plan


STACKED_PREFIX = "stacked_"  # the name of every (E, ...) LoRA parameter stack_expert_lora registers


def _stack_name(projection: str, kind: str, adapter: str) -> str:
    # no "lora_" in the name: PEFT saves the per-expert views below, never these
    return f"{STACKED_PREFIX}{projection}_{kind[-1]}_{adapter}"


def _stacked_lora(
    moe: nn.Module, projection: str, kind: str, adapter: str, mods: list[nn.Linear]
) -> torch.Tensor | None:
    """The trainable (E, ...) leaf `stack_expert_lora` made, while the experts' weights are still its views."""
    stacked = moe._parameters.get(_stack_name(projection, kind, adapter))
    if stacked is None or len(stacked) != len(mods):
        return None
    size = stacked[0].numel() * stacked.element_size()
    views = all(m.weight.data_ptr() == stacked.data_ptr() + i * size for i, m in enumerate(mods))
    return stacked if views else None


def projections(moe: nn.Module) -> dict[str, Projection]:
    """Stacked base weights (or the NF4 source) and LoRA terms of the three expert projections of `moe`."""
    out = {}
    for name, (base, lora) in _plan(moe).items():
        terms = []
        for A, B, scaling, drop, a, b in lora:
            # without stack_expert_lora: differentiable copies (E x (r x in + out x r)), each expert's grad
            # flows back to its own leaf
            terms.append(
                LoraTerm(
                    a if a is not None else torch.stack([m.weight for m in A]),
                    b if b is not None else torch.stack([m.weight for m in B]),
                    scaling,
                    drop,
                )
            )
        weight = base if isinstance(base, NF4Experts) else stacked_weight([m.weight for m in base])
        out[name] = Projection(weight, terms)
    return out


def _fast_moes(model: nn.Module):
    """(moe, plan) of every HunYuanMoE running the fast path; a block the fast path does not support is
    skipped (it runs the per-expert loop, with its warning)."""
    for moe in model.modules():
        if type(moe).__name__ != "HunYuanMoE" or getattr(moe, "moe_impl", None) != "fast":
            continue
        try:
            yield moe, _plan(moe)
        except Unsupported:
            continue


@torch.no_grad()
def stack_expert_lora(model: nn.Module) -> int:
    """Train each expert projection's LoRA as ONE (E, r, in) and ONE (E, out, r) parameter; returns how many.

    PEFT makes 2 x E leaf parameters per projection (384 a layer on the real model), each its own
    autograd leaf, gradient-accumulation node, clipping and optimizer tensor, and the grouped products
    need them stacked on every forward. After this call the stacked tensor is the trainable parameter
    (registered on the HunYuanMoE) and every expert's `lora_A/B[adapter].weight` is a buffer holding its
    view (`stacked[e]`), so PEFT's state dict, saving, loading (in place) and the per-expert forward see
    the same numbers: the adapter stays PEFT's per-expert format. For training only (a model that is
    moved or converted afterwards gets copies, and the fast path falls back to stacking per forward);
    not under ZeRO-3, whose parameters are shards.
    """
    n = 0
    for moe, plan in _fast_moes(model):
        for projection in plan:
            adapters = _lora_plan([getattr(expert, projection) for expert in moe.experts])
            for adapter, A, B, _, _ in adapters:
                for kind, mods in (("lora_A", A), ("lora_B", B)):
                    if _stacked_lora(moe, projection, kind, adapter, mods) is not None:
                        continue
                    weights = [m.weight for m in mods]
                    stacked = nn.Parameter(torch.stack(weights), requires_grad=weights[0].requires_grad)
                    moe.register_parameter(_stack_name(projection, kind, adapter), stacked)
                    with torch.enable_grad():
                        for i, m in enumerate(mods):
                            del m._parameters["weight"]
                            m.register_buffer("weight", stacked[i])  # a view: grads reach the stacked leaf
                    n += 1
        moe.__dict__.pop("_fast_moe_plan", None)
    return n


@torch.no_grad()
def renew_expert_lora_views(model: nn.Module) -> int:
    """Make every per-expert LoRA weight that stack_expert_lora left (a view of the stacked trainable tensor) anew,
    on the current CUDA stream; returns how many.

    Those views keep the stacked tensor's gradient-accumulation node alive, and autograd binds that node to
    the stream it was made on: a CUDA graph captured on another stream would have to wait on it, which
    capture forbids. The cached plans that hold the old views go too, so the node dies with them and the new
    views make a new one here (the plans are rebuilt at the next forward)."""
    taken = []
    for moe, plan in list(_fast_moes(model)):
        moe.__dict__.pop("_fast_moe_plan", None)
        for projection in plan:
            for _, A, B, _, _ in _lora_plan([getattr(expert, projection) for expert in moe.experts]):
                taken += filter(None, map(_take_view, A + B))
    with torch.enable_grad():  # every old view is gone by now
        for linear, base, size, stride, offset in taken:
            linear._buffers["weight"] = base.as_strided(size, stride, offset)
    return len(taken)


def _take_view(linear: nn.Module) -> tuple | None:
    """Remove `linear`'s weight if it is a differentiable view; what it was a view of, and how."""
    view = linear._buffers.get("weight")
    if view is None or view.grad_fn is None or view._base is None:
        return None
    linear._buffers["weight"] = None
    return linear, view._base, view.size(), view.stride(), view.storage_offset()


def set_nf4_products(model: nn.Module, mode: str) -> int:
    """model.nf4_products for every fast HunYuanMoE of `model`: "triton" multiplies its NF4 experts straight from
    the 4-bit codes, "dequantize" dequantises them first, "auto" reads the codes for at most CODES_MAX_ROWS
    routed rows (decoding) and dequantises for more (training, prefill). Returns how many blocks were set."""
    if mode not in ("dequantize", "triton", "auto"):
        raise ValueError(f"nf4_products must be 'dequantize', 'triton' or 'auto', got {mode!r}")
    n = 0
    for moe in model.modules():
        if type(moe).__name__ == "HunYuanMoE" and getattr(moe, "moe_impl", None) == "fast":
            moe.__dict__["nf4_products"] = mode
            moe.__dict__.pop("_fast_moe_plan", None)  # the next forward re-plans (packing is kept)
            n += 1
    return n


@torch.no_grad()
def pack_experts(model: nn.Module) -> int:
    """Pack every fast HunYuanMoE's expert weights now rather than on its first forward, then return
    the freed per-expert blocks to the driver; returns how many MoE blocks were packed.

    Why now: packing allocates each projection's (E, ...) buffer and frees E per-expert tensors. Done
    lazily, layer by layer between activations, the freed blocks stay cached in pieces too small for
    the activations (measured: 86 GiB reserved for 50 GiB allocated, NF4 at 32 layers); done here,
    before training, the whole per-expert memory goes back in one `empty_cache`.
    """
    n = 0
    for _, plan in _fast_moes(model):
        for base, _ in plan.values():
            if not isinstance(base, NF4Experts):
                params = [m.weight for m in base]
                if not _is_packed(params):
                    _pack(params)  # also while the weights still require grad (before LoRA freezes them)
        n += 1
    if n and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return n


_warned: set[str] = set()


def routed_experts_fast(moe: nn.Module, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Drop-in for `HunYuanMoE.routed_experts`: x (N, H), weights (N, k) float32, experts (N, k) int64."""
    try:
        projs = projections(moe)
    except Unsupported as e:
        if str(e) not in _warned:
            _warned.add(str(e))
            warnings.warn(f"fast MoE falls back to the per-expert loop: {e}", stacklevel=2)
        return moe.routed_experts(x, weights, experts)
    y = one_token_experts(x, weights, experts, projs, moe.experts[0].act_fn)
    if y is not None:
        return y
    # transformers' gradient_checkpointing_enable sets the flag on every module that has it; the decoder
    # layers run under the checkpoint exactly when the model trains with it on (HunYuanModel.forward)
    keep = moe.training and getattr(moe, "gradient_checkpointing", False)
    return routed_experts(x, weights, experts, moe.num_experts, projs, moe.experts[0].act_fn, keep)
