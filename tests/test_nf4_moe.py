"""The fast MoE path on NF4 experts (QLoRA) against PEFT on bitsandbytes' Linear4bit, on the CPU.

    .venv/bin/python -m pytest tests/test_nf4_moe.py             # CPU (bitsandbytes' CPU backend), float32
    python3 -m pytest tests/test_nf4_moe.py -m gpu                # CUDA: bnb's kernel, bf16, grouped_mm

Both sides hold the SAME quantised weights (one quantisation, then a deep copy), so the only
difference is how the product is computed: per-expert Linear4bit modules (bitsandbytes' matmul_4bit
under PEFT) vs one dequantisation per projection + grouped products. Float32 on the CPU: 1e-5.
"""

from __future__ import annotations

import copy
import shutil
import weakref
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from peft import LoraConfig, get_peft_model
from tensor_helpers import moe_forward_backward, randomise_lora, rel

from hunyuan_lora import config
from hunyuan_lora.hunyuan import fast_linear, fast_moe, grouped_moe
from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.hunyuan.random_init import quantize_linears_
from hunyuan_lora.modeling import load_with_adapter
from hunyuan_lora.runtime import placement
from hunyuan_lora.stand_in import stand_in_config

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SKIP = ("wg", "lm_head")


def tiny_config(**overrides) -> HunYuanConfig:
    cfg = stand_in_config()  # hidden 64, 8 experts top-2, expert width 48: 48 blocks per expert (unaligned)
    cfg.update(
        attention_dropout=0.0,
        vocab_size=1024,
        pad_token_id=1023,
        eos_token_id=1022,
        eod_token_id=1021,
        sep_token_id=1020,
    )
    cfg.update(overrides)
    return HunYuanConfig(**cfg)


ALIGNED = {"hidden_size": 128, "intermediate_size": 128, "moe_intermediate_size": [128] * 2, "attention_head_dim": 32}


def nf4_model(config: HunYuanConfig, double_quant: bool = True, seed: int = 0) -> HunYuanMoEV1ForCausalLM:
    torch.manual_seed(seed)
    model = HunYuanMoEV1ForCausalLM(config).float()
    for layer in model.model.layers:
        quantize_linears_(layer, skip=SKIP, compute_dtype=torch.float32, double_quant=double_quant)
    model.is_loaded_in_4bit = True  # what PEFT reads to wrap Linear4bit with its bnb LoRA layer
    return model


def peft_pair(config: HunYuanConfig, double_quant: bool = True, dropout: float = 0.0):
    """(upstream, fast) PEFT models on the same NF4 base and the same LoRA weights."""
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    ref = get_peft_model(nf4_model(config, double_quant), lora)
    randomise_lora(ref, 1)
    fast = copy.deepcopy(ref)
    for m in fast.modules():
        if type(m).__name__ == "HunYuanMoE":
            m.moe_impl = "fast"
    return ref, fast


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def expert_4bit(moe, name):
    return [fast_moe._base_linear(getattr(e, name)) for e in moe.experts]


def per_expert_dequantised(moe, name) -> torch.Tensor:
    """(E, out, in): bitsandbytes' dequantize_4bit of each expert's own weight, stacked."""
    return torch.stack([bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) for m in expert_4bit(moe, name)])


@pytest.mark.parametrize(
    ("overrides", "double_quant"),
    [({}, True), (ALIGNED, True), ({}, False)],
    ids=["unaligned-nested", "aligned-nested", "plain-absmax"],
)
def test_packed_dequantisation_is_bitsandbytes_per_expert(overrides, double_quant):
    """One dequantisation of the packed projection == bitsandbytes' dequantize_4bit of each expert, bit for bit."""
    model = nf4_model(tiny_config(**overrides), double_quant)
    moe = model.model.layers[1].mlp
    assert fast_moe._is_4bit(moe.experts[0].down_proj)
    assert not fast_moe._is_4bit(moe.gate.wg)
    want = {name: per_expert_dequantised(moe, name) for name in fast_moe.PROJECTIONS}
    projs = fast_moe.projections(moe)
    for name in fast_moe.PROJECTIONS:
        source = projs[name].weight
        assert isinstance(source, fast_moe.NF4Experts)
        assert source.nested is double_quant
        got = source.materialize()
        assert got.shape == want[name].shape, name
        assert torch.equal(got, want[name]), name
        # packed: every expert's codes are its slice of one buffer, read in place (no copy of the 4-bit data)
        codes = [m.weight.data for m in expert_4bit(moe, name)]
        assert fast_moe._is_packed(codes), name
        assert source.data.data_ptr() == codes[0].data_ptr(), name
    # after packing, PEFT-style per-expert dequantisation still sees the same weights
    again = per_expert_dequantised(moe, "up_proj")
    assert torch.equal(again, want["up_proj"])


def test_no_dequantised_weight_is_saved_for_backward():
    """Autograd keeps activations only: no tensor of a projection's E x out x in dequantised values."""
    config = tiny_config()
    _, fast = peft_pair(config)
    moe = fast.base_model.model.model.layers[0].mlp
    weight_size = config.num_experts * config.moe_intermediate_size[0] * config.hidden_size
    saved = []
    x = torch.randn(1, 20, config.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = moe(x)
    assert saved
    assert weight_size not in saved
    y.sum().backward()


@pytest.mark.parametrize("tokens", [3, 40])
def test_moe_layer_matches_peft_on_linear4bit(tokens):
    config = tiny_config()
    ref, fast = peft_pair(config)
    moe_ref = ref.base_model.model.model.layers[0].mlp
    moe_fast = fast.base_model.model.model.layers[0].mlp
    assert type(moe_ref.experts[0].gate_proj).__module__ == "peft.tuners.lora.bnb"
    y_ref, y_fast, x_ref, x_fast = moe_forward_backward(moe_ref, moe_fast, tokens, config.hidden_size)
    assert rel(y_fast, y_ref) < 1e-5
    assert rel(x_fast.grad, x_ref.grad) < 1e-5
    g_ref, g_fast = lora_grads(moe_ref), lora_grads(moe_fast)
    assert g_ref.keys() == g_fast.keys()
    assert len(g_ref) == 8 * 3 * 2 + 3 * 2
    nonzero = 0
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name
        nonzero += bool(g_ref[name].norm() > 0)
    assert nonzero >= 3 * 2 + 2 * 3 * 2


def test_weights_never_saved_for_backward(monkeypatch):
    """Forward and backward each dequantise every projection once; nothing dequantised is kept."""
    config = tiny_config()
    _, fast = peft_pair(config)
    moe = fast.base_model.model.model.layers[0].mlp
    calls = []
    real = fast_moe.NF4Experts.materialize
    monkeypatch.setattr(fast_moe.NF4Experts, "materialize", lambda self: calls.append(1) or real(self))
    x = torch.randn(1, 20, config.hidden_size, requires_grad=True)
    y = moe(x)
    assert len(calls) == 3
    y.sum().backward()
    assert len(calls) == 6


def test_model_with_padding_and_checkpointing_matches_peft():
    config = tiny_config(**ALIGNED)
    ref, fast = peft_pair(config, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[mask == 0] = config.pad_token_id
    labels = ids.masked_fill(mask == 0, -100)
    out = {}
    for name, model in (("ref", ref), ("fast", fast)):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        o = model(input_ids=ids, attention_mask=mask, labels=labels)
        o.loss.backward()
        out[name] = o
    assert rel(out["fast"].logits, out["ref"].logits) < 1e-5
    g_ref, g_fast = lora_grads(ref), lora_grads(fast)
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_decode_each_projection_twice(monkeypatch, reentrant):
    """Under gradient checkpointing the recompute's dequantised expert weights serve the layer's backward:
    forward and recompute decode each projection, the backward none (it decoded a third time before), and
    loss and LoRA gradients equal PEFT's on Linear4bit."""
    config = tiny_config(**ALIGNED)
    ref, fast = peft_pair(config, dropout=0.0)
    calls = []  # a weak reference to each decoded weight
    real = fast_moe.NF4Experts.materialize

    def materialize(self):
        w = real(self)
        calls.append(weakref.ref(w))
        return w

    monkeypatch.setattr(fast_moe.NF4Experts, "materialize", materialize)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    losses = {}
    for name, model in (("ref", ref), ("fast", fast)):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.config.use_cache = False
        loss = model(input_ids=ids, labels=ids).loss
        # the first forward keeps none of them (the checkpoint drops what it saves)
        assert all(w() is None for w in calls)
        loss.backward()
        losses[name] = loss.detach()
    layers = config.num_hidden_layers
    assert len(calls) == 2 * 3 * layers
    assert rel(losses["fast"], losses["ref"]) < 1e-5
    g_ref, g_fast = lora_grads(ref), lora_grads(fast)
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name


def test_adapter_from_nf4_fast_loads_on_the_bf16_model(tmp_path, stand_in_dir):
    """Train a step on fast-NF4, save the adapter, load it as `make infer` / `make merge` do
    (modeling.load_with_adapter) on an unquantised model folder holding the dequantised weights, with the
    folder's own code and with the project's fast code: the same logits."""
    from transformers import AutoModelForCausalLM

    folder = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, torch_dtype=torch.float32)
    base = copy.deepcopy(folder)
    for layer in base.model.layers:
        quantize_linears_(layer, skip=SKIP, compute_dtype=torch.float32)
        layer.mlp.moe_impl = "fast"
    base.is_loaded_in_4bit = True
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    randomise_lora(model, 2)
    ids = torch.tensor([[815, 300, 301, 302, 819, 400, 401]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")

    # the unquantised model holding exactly the weights the NF4 model computed with
    dequantised = {}
    for name, m in base.named_modules():
        if fast_moe._is_4bit(m):
            dequantised[name.replace("base_layer", "").replace("..", ".").rstrip(".") + ".weight"] = (
                bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state)
            )
    plain = copy.deepcopy(folder)
    missing, unexpected = plain.load_state_dict(dequantised, strict=False)
    assert not unexpected
    assert len(dequantised) == 2 * (4 + 3 + 8 * 3)
    # a model folder holding those weights, loaded the way `make infer` / `make merge` load (modeling.load_with_adapter)
    dequantised_dir = tmp_path / "dequantised-folder"
    shutil.copytree(stand_in_dir, dequantised_dir, ignore=shutil.ignore_patterns("*.safetensors*"))
    plain.save_pretrained(dequantised_dir)
    for impl in ("upstream", "fast"):
        cfg = config.load(
            REPO / "configs/demo.yaml",
            [f"model.moe_impl={impl}", "model.device=cpu"],
            model_dir=str(dequantised_dir),
            output_dir=str(tmp_path / "run"),
        )
        loaded = load_with_adapter(cfg, placement(cfg), tmp_path / "adapter").model
        assert type(loaded.get_base_model()).__module__.startswith("hunyuan_lora.") is (impl == "fast")
        with torch.no_grad():
            got = loaded(input_ids=ids).logits
        assert rel(got, want) < 1e-5, impl
    b = loaded.base_model.model.model.layers[1].mlp.experts[3].up_proj.lora_B["default"].weight
    assert b.abs().max() > 0


def test_fast_path_uses_the_compute_dtype_of_the_4bit_weights():
    """A float32 residual stream (prepare_model_for_kbit_training) meets bf16 NF4 weights: the grouped
    products run in bf16 (the weights' dtype), the result comes back in float32."""
    config = tiny_config()
    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(config).to(torch.bfloat16)
    moe = model.model.layers[0].mlp
    quantize_linears_(moe, skip=SKIP, compute_dtype=torch.bfloat16)
    projs = fast_moe.projections(moe)
    assert projs["gate_proj"].dtype == torch.bfloat16
    x = torch.randn(7, config.hidden_size)
    weights, experts = moe.gate(x)
    y = grouped_moe.routed_experts(x, weights, experts, moe.num_experts, projs, moe.experts[0].act_fn)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    want = moe.routed_experts(x.to(torch.bfloat16), weights, experts)  # per-expert bnb Linear4bit, bf16
    assert rel(y, want.float()) < 2e-2


# ---------------------------------------------------------------------------------------------
# GPU: bitsandbytes' CUDA kernel and grouped_mm in bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_dequantisation_is_bitsandbytes_per_expert():
    config = tiny_config(
        hidden_size=256,
        intermediate_size=256,
        moe_intermediate_size=[256] * 2,
        num_experts=16,
        moe_topk=[4] * 2,
        num_attention_heads=4,
        attention_head_dim=64,
    )
    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(config).to("cuda", torch.bfloat16)
    moe = model.model.layers[0].mlp
    quantize_linears_(moe, skip=SKIP, compute_dtype=torch.bfloat16)
    for name in fast_moe.PROJECTIONS:
        want = per_expert_dequantised(moe, name)
        got = fast_moe.projections(moe)[name].weight.materialize()
        assert got.dtype == torch.bfloat16, name
        assert torch.equal(got, want), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [5, 300])
def test_cuda_fast_nf4_matches_peft_linear4bit(tokens):
    """bf16 under autocast, grouped_mm: outputs, input grads and every LoRA grad within 1e-2 of PEFT on Linear4bit."""
    if not grouped_moe.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs compute capability 9.0")
    config = tiny_config(
        hidden_size=256,
        intermediate_size=128,
        moe_intermediate_size=[128] * 2,
        num_experts=16,
        moe_topk=[4] * 2,
        num_attention_heads=4,
        attention_head_dim=64,
    )
    torch.manual_seed(0)
    base = HunYuanMoEV1ForCausalLM(config).to("cuda", torch.bfloat16)
    for layer in base.model.layers:
        quantize_linears_(layer, skip=SKIP, compute_dtype=torch.bfloat16)
    base.is_loaded_in_4bit = True
    ref = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS))
    randomise_lora(ref, 1)
    fast = copy.deepcopy(ref)
    for m in fast.modules():
        if type(m).__name__ == "HunYuanMoE":
            m.moe_impl = "fast"
    x = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, model in (("ref", ref), ("fast", fast)):
        moe = model.base_model.model.model.layers[0].mlp
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            y = moe(xi)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        results[name] = (y.float(), xi.grad.float(), {k: v.float() for k, v in lora_grads(moe).items()})
    (y_r, dx_r, g_r), (y_f, dx_f, g_f) = results["ref"], results["fast"]
    assert rel(y_f, y_r) < 1e-2
    assert rel(dx_f, dx_r) < 1e-2
    for k in g_r:
        if g_r[k].norm() > 0:
            assert rel(g_f[k], g_r[k]) < 1e-2, k
        else:
            assert g_f[k].abs().max() == 0, k


@pytest.mark.parametrize("quantized", [True, False])
def test_pack_experts_before_the_first_forward(quantized):
    """fast_moe.pack_experts (what model loading calls): every projection packed, no forward needed."""
    config = tiny_config()
    model = nf4_model(config) if quantized else HunYuanMoEV1ForCausalLM(config).float()
    for layer in model.model.layers:
        layer.mlp.moe_impl = "fast"
    assert fast_moe.pack_experts(model) == config.num_hidden_layers
    for layer in model.model.layers:
        for name in fast_moe.PROJECTIONS:
            linears = expert_4bit(layer.mlp, name)
            tensors = [m.weight.data for m in linears]
            assert fast_moe._is_packed(tensors), name
            if quantized:
                assert fast_moe._is_packed([m.weight.quant_state.absmax for m in linears]), name


def fully_fast(model):
    """The fast path everywhere: grouped MoE and the packed dense products (attention, shared expert)."""
    for m in model.modules():
        name = type(m).__name__
        if name == "HunYuanMoE":
            m.moe_impl = "fast"
            if m.shared_mlp is not None:
                m.shared_mlp.fast_linears = True
        elif name == "HunYuanAttention":
            m.fast_linears = True
    return model


def decode_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ids[:, prefill:], one token at a time through a DynamicCache after a prefill."""
    from transformers.cache_utils import DynamicCache

    cache, out = DynamicCache(), []
    with torch.no_grad():
        model(input_ids=ids[:, :prefill], past_key_values=cache, use_cache=True)
        for t in range(prefill, ids.shape[1]):
            out.append(model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    return torch.cat(out, dim=1)


def test_one_token_decode_from_the_routed_experts_codes_matches_peft(monkeypatch):
    """Batch-1 decode steps: the k routed experts' codes gathered into bitsandbytes' gemv (fast_moe.
    one_token_experts), dense NF4 products by gemv (PackedNF4.row_product): the logits of PEFT on Linear4bit."""
    ref, fast = peft_pair(tiny_config(**ALIGNED))
    fully_fast(fast)
    calls = {"experts": 0, "dense": 0}
    one_token, row_product = fast_moe.one_token_experts, fast_linear.PackedNF4.row_product

    def spy_experts(*args):
        y = one_token(*args)
        calls["experts"] += y is not None
        return y

    def spy_dense(self, x):
        calls["dense"] += 1
        return row_product(self, x)

    monkeypatch.setattr(fast_moe, "one_token_experts", spy_experts)
    monkeypatch.setattr(fast_linear.PackedNF4, "row_product", spy_dense)
    ids = torch.randint(0, 1000, (1, 9), generator=torch.Generator().manual_seed(3))
    y_ref, y_fast = decode_logits(ref, ids, 5), decode_logits(fast, ids, 5)
    assert rel(y_fast, y_ref) < 1e-5
    layers = fast.config.num_hidden_layers
    assert calls == {"experts": 4 * layers, "dense": 4 * layers * 4}  # q/k/v, o, shared gate/up, shared down
