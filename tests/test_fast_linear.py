"""The fast path's dense projections (fast_linear.py) and stacked expert LoRA (fast_moe.stack_expert_lora)
against PEFT on the modules themselves, on the CPU in float32 (bitsandbytes' CPU backend for NF4).

    .venv/bin/python -m pytest tests/test_fast_linear.py

A model built with config.moe_impl "fast" runs attention's q/k/v as one product (and o, the shared
expert's gate/up and down) over packed base weights; training additionally trains each expert
projection's LoRA as one stacked parameter. The reference is the same model, same weights, with every
module called as PEFT wraps it (moe_impl "upstream", fast_linears off): outputs, every LoRA gradient,
an optimizer step, the saved adapter and its reload must agree.
"""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from tensor_helpers import CUDA_WIDTHS, randomise_lora, rel
from test_nf4_moe import ALIGNED, TARGETS, nf4_model, tiny_config

from hunyuan_lora.hunyuan import fast_linear, fast_moe
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM


def set_fast(model: torch.nn.Module, fast: bool) -> None:
    for m in model.modules():
        if type(m).__name__ == "HunYuanMoE":
            m.moe_impl = "fast" if fast else "upstream"
        if hasattr(m, "fast_linears"):
            m.fast_linears = fast


def base_model(quant: str, seed: int = 0, **overrides) -> HunYuanMoEV1ForCausalLM:
    config = tiny_config(**overrides)
    if quant == "nf4":
        return nf4_model(config, seed=seed)
    torch.manual_seed(seed)
    return HunYuanMoEV1ForCausalLM(config).float()


def pair(quant: str, stacked: bool, dropout: float = 0.0, **overrides):
    """(reference: PEFT's modules, fast: the fast path) on the same base and LoRA weights."""
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    ref = get_peft_model(base_model(quant, **overrides), lora)
    randomise_lora(ref, 1)
    fast = copy.deepcopy(ref)
    set_fast(ref, False)
    set_fast(fast, True)
    if stacked:
        assert fast_moe.stack_expert_lora(fast) == 2 * 3 * fast.config.num_hidden_layers
    return ref, fast


def per_expert_grads(model) -> dict[str, torch.Tensor]:
    """Every LoRA gradient under PEFT's per-expert names, read from the stacked parameters where they exist."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if ".stacked_" not in name:
            out[name] = g
            continue
        prefix, stack = name.rsplit(".stacked_", 1)
        projection, kind, adapter = stack.rsplit("_", 2)
        for e in range(p.shape[0]):
            out[f"{prefix}.experts.{e}.{projection}.lora_{kind}.{adapter}.weight"] = g[e]
    return out


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (2, 13), generator=g)
    return {"input_ids": ids, "labels": ids}


def forward_backward(model, checkpointing: bool):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    out = model(**batch())
    out.loss.backward()
    return out


@pytest.mark.parametrize(
    ("quant", "stacked", "overrides"),
    [("nf4", True, {}), ("nf4", False, ALIGNED), ("bf16", True, ALIGNED), ("bf16", False, {})],
    ids=["nf4-stacked", "nf4-per-expert-aligned", "plain-stacked-aligned", "plain-per-expert"],
)
def test_fast_model_matches_peft_modules(quant, stacked, overrides):
    ref, fast = pair(quant, stacked, **overrides)
    out_ref = forward_backward(ref, checkpointing=True)
    out_fast = forward_backward(fast, checkpointing=True)
    assert fast.base_model.model.model.layers[0].self_attn.__dict__["_fast_linear_plans"]  # the dense path ran
    assert rel(out_fast.logits, out_ref.logits) < 1e-5
    g_ref, g_fast = per_expert_grads(ref), per_expert_grads(fast)
    assert g_ref.keys() == g_fast.keys()
    assert len(g_ref) == 2 * (4 + 3 + 8 * 3) * 2
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name
    assert sum(bool(g.norm() > 0) for g in g_ref.values()) > len(g_ref) // 2


def test_packed_nf4_is_bitsandbytes_per_module():
    """q/k/v's codes become slices of one buffer; its one decode == bitsandbytes' decode of each, bit for bit."""
    model = nf4_model(tiny_config())
    attn = model.model.layers[0].self_attn
    want = torch.cat(
        [bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    )
    packed = fast_linear.PackedNF4([attn.q_proj, attn.k_proj, attn.v_proj])
    got = packed.materialize()
    assert got.shape == want.shape
    assert torch.equal(got, want)
    codes = [m.weight.data for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    assert fast_linear._is_joined(codes)
    assert packed.data.data_ptr() == codes[0].data_ptr()
    again = bnbf.dequantize_4bit(attn.k_proj.weight.data, attn.k_proj.weight.quant_state)  # the module's own view
    assert torch.equal(again, want[attn.q_proj.out_features :][: attn.k_proj.out_features])


def test_fast_dense_never_keeps_a_dequantised_weight():
    """Activations only: no saved tensor of q/k/v's (sum of outs) x in dequantised values."""
    _, model = pair("nf4", stacked=False)
    attn = model.base_model.model.model.layers[0].self_attn
    weight_size = (attn.q_proj.out_features + 2 * attn.k_proj.out_features) * attn.q_proj.in_features
    saved = []
    x = torch.randn(1, 7, attn.q_proj.in_features, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        q, _, _ = fast_linear.linears_fast(attn, ("q_proj", "k_proj", "v_proj"), x)
    assert saved
    assert weight_size not in saved
    q.sum().backward()
    assert x.grad is not None
    assert x.grad.norm() > 0


def test_dense_plan_follows_a_conversion():
    """model.double() re-points every weight: the next call re-plans (re-packs) and matches PEFT again."""
    ref, fast = pair("bf16", stacked=False)
    ids = batch()["input_ids"]
    with torch.no_grad():
        fast(input_ids=ids)
        ref.double(), fast.double()
        got, want = fast(input_ids=ids).logits, ref(input_ids=ids).logits
    assert got.dtype == want.dtype == torch.float64
    assert rel(got, want) < 1e-10


def test_unsupported_lora_falls_back_to_the_modules():
    """LoRA with a bias is not on the fast path: PEFT's modules compute it, with the same result."""
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)
    ref = get_peft_model(base_model("bf16"), lora)
    randomise_lora(ref, 2)
    fast = copy.deepcopy(ref)
    set_fast(fast, True)
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert rel(fast(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-6
    plans = fast.base_model.model.model.layers[0].self_attn.__dict__["_fast_linear_plans"]
    assert ("q_proj", "k_proj", "v_proj") not in plans
    assert ("o_proj",) in plans


def test_stacked_lora_keeps_peft_format(tmp_path):
    """Stacking changes the trainable tensors, not the state dict, the saved adapter or its reload."""
    ref, fast = pair("bf16", stacked=False)
    before = {k: v.clone() for k, v in get_peft_model_state_dict(fast).items()}
    count = sum(p.numel() for p in fast.parameters() if p.requires_grad)
    tensors = sum(p.requires_grad for p in fast.parameters())
    fast_moe.stack_expert_lora(fast)
    layers = fast.config.num_hidden_layers
    assert sum(p.requires_grad for p in fast.parameters()) == tensors - layers * 3 * 2 * (8 - 1)
    assert sum(p.numel() for p in fast.parameters() if p.requires_grad) == count
    after = get_peft_model_state_dict(fast)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    fast.save_pretrained(tmp_path / "stacked")
    ref.save_pretrained(tmp_path / "plain")
    saved, plain = (
        load_file(tmp_path / "stacked" / "adapter_model.safetensors"),
        load_file(tmp_path / "plain" / "adapter_model.safetensors"),
    )
    assert saved.keys() == plain.keys()
    assert all(torch.equal(saved[k], plain[k]) for k in plain)
    # the adapter loads on a plain model (PEFT's modules) with the same outputs
    reloaded = PeftModel.from_pretrained(base_model("bf16"), tmp_path / "stacked")
    ids = batch()["input_ids"]
    with torch.no_grad():
        assert rel(reloaded(input_ids=ids).logits, fast(input_ids=ids).logits) < 1e-5
    # loading into the stacked model (Trainer's resume) writes into the stacked parameters
    moe = fast.base_model.model.model.layers[1].mlp
    stacked = moe.stacked_up_proj_B_default
    doubled = {k: v * 2 for k, v in saved.items()}
    set_peft_model_state_dict(fast, doubled)
    key = "base_model.model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight"
    assert torch.equal(stacked[3], doubled[key])
    assert moe.stacked_up_proj_B_default is stacked


def test_stacked_lora_trains_as_per_expert_leaves():
    """One AdamW step with gradient clipping: stacked parameters and PEFT's per-expert leaves end equal;
    afterwards the per-expert modules (the loop path) still train the stacked parameters."""
    _, per_expert = pair("bf16", stacked=False)
    stacked = copy.deepcopy(per_expert)
    fast_moe.stack_expert_lora(stacked)
    for model in (per_expert, stacked):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        forward_backward(model, checkpointing=True)
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad()
    want, got = get_peft_model_state_dict(per_expert), get_peft_model_state_dict(stacked)
    moved = 0
    for k in want:
        assert rel(got[k], want[k]) < 1e-6, k
        moved += ".experts." in k
    assert moved == 2 * 8 * 3 * 2
    set_fast(stacked, False)
    forward_backward(stacked, checkpointing=False)
    grad = stacked.base_model.model.model.layers[0].mlp.stacked_gate_proj_A_default.grad
    assert grad is not None
    assert grad.norm() > 0


def cuda_pair(quant: str, dtype: torch.dtype, **overrides):
    """(reference, fast) on CUDA: a small model in `dtype`, NF4 (bitsandbytes' CUDA kernel) or not."""
    from hunyuan_lora.hunyuan.random_init import quantize_linears_

    config = tiny_config(**{**CUDA_WIDTHS, **overrides})
    torch.manual_seed(0)
    base = HunYuanMoEV1ForCausalLM(config).to("cuda", dtype)
    if quant == "nf4":
        for layer in base.model.layers:
            quantize_linears_(layer, skip=("wg", "lm_head"), compute_dtype=dtype)
        base.is_loaded_in_4bit = True
    ref = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS))
    randomise_lora(ref, 1)
    fast = copy.deepcopy(ref)
    set_fast(ref, False)
    set_fast(fast, True)
    fast_moe.stack_expert_lora(fast)
    return ref, fast


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_cuda_fast_model_matches_peft_modules_in_float32(quant):
    """The whole fast model on CUDA (dense packing with bitsandbytes' CUDA decode, stacked LoRA; the experts
    on the loop, grouped_mm being bf16-only) against PEFT's modules in float32: loss, logits, every LoRA grad."""
    ref, fast = cuda_pair(quant, torch.float32)
    ids = torch.randint(0, 1000, (2, 150), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    out = {name: forward_backward_ids(model, ids) for name, model in (("ref", ref), ("fast", fast))}
    assert fast.base_model.model.model.layers[0].self_attn.__dict__["_fast_linear_plans"]
    assert rel(out["fast"].logits, out["ref"].logits) < 1e-4
    g_ref, g_fast = per_expert_grads(ref), per_expert_grads(fast)
    assert g_ref.keys() == g_fast.keys()
    for k in g_ref:
        assert rel(g_fast[k], g_ref[k]) < 1e-4 or g_ref[k].norm() == g_fast[k].norm() == 0, k


def forward_backward_ids(model, ids):
    model.train()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant", ["nf4", "bf16"])
def test_cuda_fast_attention_and_shared_expert_match_peft_in_bf16(quant):
    """bf16 under autocast, as Trainer(bf16=True) runs it: attention and the shared expert of one layer on
    the same input, fast vs PEFT's modules: outputs, input gradients and every LoRA gradient within 1e-2.
    (Whole bf16 models are not compared: a rounding difference flips a near-tie in the router, and the
    experts' gradients then differ by design.)"""
    ref, fast = cuda_pair(quant, torch.bfloat16)
    hidden = ref.config.hidden_size
    x = torch.randn(2, 40, hidden, device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    rotary = ref.base_model.model.model.rotary_emb
    results = {}
    for name, model in (("ref", ref), ("fast", fast)):
        layer = model.base_model.model.model.layers[0]
        xa, xm = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            cos, sin = rotary(xa, torch.arange(40, device="cuda")[None].expand(2, -1))
            ya = layer.self_attn(xa, cos, sin)
            ym = layer.mlp.shared_mlp(xm)
        probe = torch.linspace(-1, 1, ya.numel(), device="cuda").view_as(ya)
        ((ya.float() * probe).sum() + (ym.float() * probe).sum()).backward()
        grads = {k: v for k, v in per_expert_grads(layer).items() if ".experts." not in k}
        results[name] = (ya.float(), ym.float(), xa.grad, xm.grad, grads)
    (*r_out, r_grads), (*f_out, f_grads) = results["ref"], results["fast"]
    for got, want in zip(f_out, r_out):
        assert rel(got, want) < 1e-2
    assert r_grads.keys() == f_grads.keys()
    assert len(r_grads) == 2 * 7
    for k in r_grads:
        assert rel(f_grads[k].float(), r_grads[k].float()) < 1e-2, k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("width", ["tiny", "real"])
def test_cuda_every_4bit_weight_dequantises_to_the_same_bits_both_ways(width, monkeypatch):
    """Every 4-bit weight a fast training step materialises (packed q/k/v, o, the shared expert's gate/up and
    down, the routed experts' three projections), written by the Triton dequantisation and by bitsandbytes' op:
    the same bits, at the tiny width and at the real model's (hidden 4,096, expert width 3,072, 64 experts,
    double quantisation). The 2-layer loss probe differed by up to 0.0029 between the two (bench/NOTES.md)."""
    overrides = (
        {}
        if width == "tiny"
        else {
            "hidden_size": 4096,
            "intermediate_size": 3072,
            "moe_intermediate_size": [3072],
            "num_experts": 64,
            "moe_topk": [8],
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "attention_head_dim": 128,
            "num_hidden_layers": 1,
            "num_shared_expert": [1],
        }
    )
    _, fast = cuda_pair("nf4", torch.bfloat16, **overrides)
    ids = torch.randint(0, 1000, (1, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        fast(input_ids=ids)  # makes the packed plans
    sources = [
        plan[0]
        for module in fast.modules()
        for _, plan in module.__dict__.get("_fast_linear_plans", {}).values()
        if isinstance(plan[0], fast_linear.PackedNF4)
    ]
    layers = fast.base_model.model.model.layers
    assert len(sources) == 4 * len(layers)  # q/k/v, o, the shared expert's gate/up and its down
    for layer in layers:
        sources += [p.weight for p in fast_moe.projections(layer.mlp).values()]
    for source in sources:
        monkeypatch.setenv("HUNYUAN_NF4_DEQUANT", "triton")
        triton_bits = source.materialize()
        monkeypatch.setenv("HUNYUAN_NF4_DEQUANT", "bitsandbytes")
        assert torch.equal(source.materialize(), triton_bits), tuple(source.shape)
