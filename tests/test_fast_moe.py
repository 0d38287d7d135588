"""The fast MoE path (grouped expert products + grouped LoRA) against the reference loop + PEFT.

    .venv/bin/python -m pytest tests/test_fast_moe.py            # CPU, float32, a few seconds
    python3 -m pytest tests/test_fast_moe.py -m gpu               # CUDA sm90, bf16 grouped_mm

Float32 on the CPU: outputs and every LoRA gradient within 1e-5 relative (norm-wise). Random
weights and random LoRA A/B (PEFT's zero-initialised B would hide errors in the A gradient).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from tensor_helpers import moe_forward_backward, randomise_lora, rel

from hunyuan_lora.hunyuan import fast_moe, grouped_moe
from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.hunyuan.modeling_hunyuan import MOE_IMPLS, HunYuanMoE
from hunyuan_lora.stand_in import stand_in_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def set_moe_impl(model: torch.nn.Module, impl: str) -> int:
    """Switch every HunYuanMoE in `model` (PEFT-wrapped or not) to `impl`; returns how many."""
    assert impl in MOE_IMPLS, impl
    n = 0
    for module in model.modules():
        if isinstance(module, HunYuanMoE):
            module.moe_impl = impl
            n += 1
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_experts"):
            config.moe_impl = impl
    return n


def tiny_config(**overrides) -> HunYuanConfig:
    cfg = stand_in_config()  # hidden 64, 8 experts, top-2, expert width 48, 2 layers
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


def peft_pair(config: HunYuanConfig, dropout: float = 0.0, seed: int = 0):
    """(reference, fast) PEFT models with identical base and LoRA weights."""
    torch.manual_seed(seed)
    base = HunYuanMoEV1ForCausalLM(config).float()
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM")
    ref = get_peft_model(base, lora)
    randomise_lora(ref, seed + 1)
    fast = copy.deepcopy(ref)
    assert set_moe_impl(fast, "fast") == config.num_hidden_layers
    return ref, fast


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def batch_with_padding(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 1000, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    ids[mask == 0] = config.pad_token_id
    return ids, mask


# ---------------------------------------------------------------------------------------------
# one MoE layer


@pytest.mark.parametrize("tokens", [3, 50])  # 3 tokens x top-2 leave >= 2 of 8 experts without tokens
def test_moe_layer_matches_reference(tokens):
    config = tiny_config()
    ref, fast = peft_pair(config)
    moe_ref = ref.base_model.model.model.layers[0].mlp
    moe_fast = fast.base_model.model.model.layers[0].mlp
    y_ref, y_fast, x_ref, x_fast = moe_forward_backward(moe_ref, moe_fast, tokens, config.hidden_size)
    assert rel(y_fast, y_ref) < 1e-5
    assert rel(x_fast.grad, x_ref.grad) < 1e-5
    g_ref, g_fast = lora_grads(moe_ref), lora_grads(moe_fast)
    assert g_ref.keys() == g_fast.keys()
    assert len(g_ref) == 8 * 3 * 2 + 3 * 2
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name
    if tokens == 3:  # experts without tokens: reference grad None, fast grad exactly zero
        unused = [i for i in range(8) if moe_ref.experts[i].gate_proj.lora_A["default"].weight.grad is None]
        assert unused
        for i in unused:
            assert moe_fast.experts[i].gate_proj.lora_A["default"].weight.grad.abs().max() == 0


def test_plain_moe_without_peft_and_full_finetune_grads():
    """No PEFT, base weights trainable: the stacked (differentiable) path gives the same weight grads."""
    torch.manual_seed(0)
    config = tiny_config()
    moe_ref = HunYuanMoE(config, 0)
    moe_fast = copy.deepcopy(moe_ref)
    moe_fast.moe_impl = "fast"
    x = torch.randn(2, 9, config.hidden_size)
    (moe_ref(x) ** 2).sum().backward()
    (moe_fast(x) ** 2).sum().backward()
    for (n, p), q in zip(moe_ref.named_parameters(), moe_fast.parameters()):
        a = p.grad if p.grad is not None else torch.zeros_like(p)
        b = q.grad if q.grad is not None else torch.zeros_like(q)
        assert rel(b, a) < 1e-5 or a.norm() == b.norm() == 0, n


# ---------------------------------------------------------------------------------------------
# the whole model: padding, gradient checkpointing, adapter round trip


def test_model_with_padding_and_checkpointing_matches_reference():
    config = tiny_config()
    ref, fast = peft_pair(config)
    ids, mask = batch_with_padding(config)
    labels = ids.masked_fill(mask == 0, -100)
    losses = {}
    for name, model in (("ref", ref), ("fast", fast)):
        model.train()
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        losses[name] = out
    assert rel(losses["fast"].logits, losses["ref"].logits) < 1e-5
    g_ref, g_fast = lora_grads(ref), lora_grads(fast)
    assert g_ref.keys() == g_fast.keys()
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name


def test_checkpoint_recompute_replays_lora_dropout():
    """With LoRA dropout on, checkpointed and plain backward give the same grads (same masks)."""
    config = tiny_config()
    _, fast = peft_pair(config, dropout=0.3)
    other = copy.deepcopy(fast)
    ids, mask = batch_with_padding(config, seed=1)
    grads = []
    for model, ckpt in ((fast, True), (other, False)):
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model.config.use_cache = False
        torch.manual_seed(123)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(lora_grads(model))
    for name in grads[0]:
        assert rel(grads[0][name], grads[1][name]) < 1e-5 or grads[1][name].norm() == 0, name


def test_adapter_round_trip_to_reference(tmp_path):
    """Train a step on the fast path, save the PEFT adapter, load it on the reference: same logits."""
    config = tiny_config()
    _, fast = peft_pair(config)
    ids, mask = batch_with_padding(config, seed=2)
    fast.train()
    opt = torch.optim.AdamW([p for p in fast.parameters() if p.requires_grad], lr=1e-2)
    fast(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    opt.step()
    fast.eval()
    with torch.no_grad():
        logits_fast = fast(input_ids=ids, attention_mask=mask).logits

    adapter = tmp_path / "adapter"
    fast.save_pretrained(adapter)
    base_dir = tmp_path / "base"
    torch.manual_seed(0)  # the base weights peft_pair built (frozen, so unchanged by the step)
    HunYuanMoEV1ForCausalLM(config).float().save_pretrained(base_dir)
    from safetensors.torch import load_file

    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.mlp.experts.7.down_proj.lora_B.weight" in keys
    assert len([k for k in keys if ".mlp.experts." in k]) == 2 * 8 * 3 * 2

    base = HunYuanMoEV1ForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    base.config.moe_impl = "upstream"
    set_moe_impl(base, "upstream")
    ref = PeftModel.from_pretrained(base, adapter)
    ref.eval()
    with torch.no_grad():
        logits_ref = ref(input_ids=ids, attention_mask=mask).logits
    assert rel(logits_fast, logits_ref) < 1e-5
    # the loaded adapter really is the trained one (not PEFT's zero-B init)
    b = ref.base_model.model.model.layers[0].mlp.experts[3].up_proj.lora_B["default"].weight
    assert b.abs().max() > 0


def test_packing_keeps_state_dict_and_follows_reloads(tmp_path):
    config = tiny_config()
    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(config).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    keys_before = list(model.state_dict())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    set_moe_impl(model, "fast")
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        first = model(ids).logits
    moe = model.model.layers[0].mlp
    assert fast_moe._is_packed([e.gate_proj.weight for e in moe.experts])
    assert list(model.state_dict()) == keys_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # load_state_dict copies in place into the packed storage: the fast path sees new weights
    sd2 = {k: (v * 1.5 if ".experts." in k else v) for k, v in sd.items()}
    model.load_state_dict(sd2)
    assert fast_moe._is_packed([e.gate_proj.weight for e in moe.experts])
    set_moe_impl(model, "upstream")
    with torch.no_grad():
        want = model(ids).logits
    set_moe_impl(model, "fast")
    with torch.no_grad():
        got = model(ids).logits
    assert rel(got, want) < 1e-5
    assert rel(got, first) > 1e-3
    # save_pretrained of a packed model: transformers clones the disjoint views; reload is exact
    model.save_pretrained(tmp_path / "packed")
    reloaded = HunYuanMoEV1ForCausalLM.from_pretrained(tmp_path / "packed", torch_dtype=torch.float32)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # a conversion replaces the tensors: the next forward re-packs
    model.double()
    assert not fast_moe._is_packed([e.gate_proj.weight for e in moe.experts])
    with torch.no_grad():
        again = model(ids).logits
    assert fast_moe._is_packed([e.gate_proj.weight for e in moe.experts])
    assert rel(again, want) < 1e-5


def test_disabled_and_merged_adapters_follow_peft():
    """disable_adapter() and merge_adapter() change what PEFT computes: the cached plan follows."""
    config = tiny_config(num_hidden_layers=1)
    ref, fast = peft_pair(config)
    ref.eval(), fast.eval()
    ids = torch.randint(0, 1000, (2, 6))
    with torch.no_grad():
        assert rel(fast(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
        with ref.disable_adapter(), fast.disable_adapter():
            off_ref, off_fast = ref(input_ids=ids).logits, fast(input_ids=ids).logits
        assert rel(off_fast, off_ref) < 1e-5
        assert rel(off_fast, ref(input_ids=ids).logits) > 1e-3
        ref.merge_adapter(), fast.merge_adapter()  # in-place into the packed expert weights
        assert rel(fast(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5
        ref.unmerge_adapter(), fast.unmerge_adapter()
        assert rel(fast(input_ids=ids).logits, ref(input_ids=ids).logits) < 1e-5


def test_unsupported_peft_feature_falls_back():
    config = tiny_config()
    torch.manual_seed(0)
    base = HunYuanMoEV1ForCausalLM(config).float()
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], use_dora=True))
    randomise_lora(model, 3)
    fast = copy.deepcopy(model)
    set_moe_impl(fast, "fast")
    ids = torch.randint(0, 1000, (2, 5))
    with torch.no_grad(), pytest.warns(UserWarning, match="DoRA"):
        got = fast(input_ids=ids).logits
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert rel(got, want) < 1e-6


def test_bad_moe_impl_is_rejected():
    with pytest.raises(ValueError, match="moe_impl"):
        HunYuanMoE(tiny_config(moe_impl="fsat"), 0)


# ---------------------------------------------------------------------------------------------
# packing: one (E, out, in) buffer per projection, and what happens to it afterwards


def expert_linears(moe, name):
    """The E base nn.Linear of one projection (under PEFT's wrapper, if any)."""
    return [fast_moe._base_linear(getattr(e, name)) for e in moe.experts]


def assert_packed(moe):
    """Each projection's E expert weights are the slices, in order, of one (E, out, in) buffer of
    their own, and the grouped product's operand is a view of that buffer (no copy)."""
    for name in fast_moe.PROJECTIONS:
        weights = [m.weight for m in expert_linears(moe, name)]
        E, (out, inn) = len(weights), weights[0].shape
        step = out * inn * weights[0].element_size()
        base, storage = weights[0].data_ptr(), weights[0].untyped_storage()
        assert storage.nbytes() == E * step, name
        for i, w in enumerate(weights):
            assert w.untyped_storage().data_ptr() == storage.data_ptr(), name
            assert w.data_ptr() == base + i * step, name
            assert w.shape == (out, inn), name
            assert w.is_contiguous(), name
        assert fast_moe._is_packed(weights), name
        operand = fast_moe.projections(moe)[name].weight
        assert operand.data_ptr() == base, name
        assert operand.shape == (E, out, inn), name
        assert torch.equal(operand, torch.stack(weights)), name


def test_peft_model_packed_per_projection_state_dict_unchanged():
    config = tiny_config()
    ref, fast = peft_pair(config)
    ids, mask = batch_with_padding(config)
    with torch.no_grad():
        fast(input_ids=ids, attention_mask=mask)
    for layer in fast.base_model.model.model.layers:
        assert_packed(layer.mlp)
    want, got = ref.state_dict(), fast.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


def test_load_state_dict_writes_into_packed_buffers():
    config = tiny_config()
    ref, fast = peft_pair(config)
    ref.eval(), fast.eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = fast(input_ids=ids).logits
    moe = fast.base_model.model.model.layers[1].mlp
    buffers = {name: expert_linears(moe, name)[0].weight.data_ptr() for name in fast_moe.PROJECTIONS}
    g = torch.Generator().manual_seed(9)
    sd = {
        k: (v + 0.05 * torch.randn(v.shape, generator=g) if ".experts." in k and "base_layer" in k else v)
        for k, v in ref.state_dict().items()
    }
    ref.load_state_dict(sd)
    fast.load_state_dict(sd)
    assert_packed(moe)  # copied in place: still one buffer per projection,
    for name in fast_moe.PROJECTIONS:
        assert expert_linears(moe, name)[0].weight.data_ptr() == buffers[name], name  # the same ones
        operand = fast_moe.projections(moe)[name].weight
        assert torch.equal(operand[5], sd[f"base_model.model.model.layers.1.mlp.experts.5.{name}.base_layer.weight"])
    with torch.no_grad():
        got, want = fast(input_ids=ids).logits, ref(input_ids=ids).logits
    assert rel(got, want) < 1e-5
    assert rel(got, before) > 1e-3


@pytest.mark.parametrize("change", ["to_dtype", "new_parameter"])
def test_replaced_weights_are_repacked(change):
    config = tiny_config()
    ref, fast = peft_pair(config)
    ref.eval(), fast.eval()
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        fast(input_ids=ids)
    moe = fast.base_model.model.model.layers[0].mlp
    assert_packed(moe)
    if change == "to_dtype":
        ref.double(), fast.double()
    else:  # a new Parameter object for one expert's up_proj (as load_state_dict(assign=True) makes)
        new = torch.randn(expert_linears(moe, "up_proj")[2].weight.shape, generator=torch.Generator().manual_seed(8))
        for model in (ref, fast):
            linear = expert_linears(model.base_model.model.model.layers[0].mlp, "up_proj")[2]
            linear.weight = torch.nn.Parameter(new.clone(), requires_grad=False)
    with torch.no_grad():
        got, want = fast(input_ids=ids).logits, ref(input_ids=ids).logits
    assert_packed(moe)
    assert got.dtype == want.dtype
    assert rel(got, want) < 1e-5
    if change == "new_parameter":
        assert torch.equal(fast_moe.projections(moe)["up_proj"].weight[2], new)


def test_grouped_path_operands_pass_grouped_mm_checks(monkeypatch):
    """The grouped (CUDA) branch on the meta device: torch._grouped_mm's meta kernel runs the CUDA
    kernel's dtype and stride checks on every operand, forward and backward."""
    monkeypatch.setattr(grouped_moe, "grouped_mm_available", lambda device, dtype: True)
    calls = []
    real = torch._grouped_mm

    def grouped_mm(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    config = tiny_config()
    with torch.device("meta"):
        moe = HunYuanMoE(config, 0).to(torch.bfloat16)
    lora = LoraConfig(r=8, lora_dropout=0.1, target_modules=["gate_proj", "up_proj", "down_proj"])
    moe = inject_adapter_in_model(lora, moe)
    for name, p in moe.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()  # float32 adapters on a bf16 model, as get_peft_model leaves them
    N, k = 13, config.moe_topk[0]
    x = torch.empty(N, config.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    experts = torch.empty(N, k, device="meta", dtype=torch.int64)
    y = fast_moe.routed_experts_fast(moe, x, torch.empty(N, k, device="meta"), experts)
    assert len(calls) == 9  # forward: base gate, up, down + 2 per LoRA projection
    y.sum().backward()
    assert y.shape == x.grad.shape == (N, config.hidden_size)
    assert moe.experts[0].up_proj.lora_B["default"].weight.grad.shape == (config.moe_intermediate_size[0], 8)


# ---------------------------------------------------------------------------------------------
# GPU: the real grouped_mm kernel in bf16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [5, 300])  # 5 tokens x top-4 of 16 experts: some experts get none
def test_grouped_mm_bf16_matches_reference(tokens):
    """bf16 under autocast (as Trainer(bf16=True)): grouped_mm path vs the reference loop, 1e-2.

    Both run the same router on the same bf16 input, so they route identically; a float32 model
    would route some tokens differently and is no reference for per-expert gradients.
    """
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
    ref = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS))
    randomise_lora(ref, 1)
    fast = copy.deepcopy(ref)
    set_moe_impl(fast, "fast")
    x = torch.randn(1, tokens, config.hidden_size, device="cuda", dtype=torch.bfloat16)
    results = {}
    for name, model in (("ref", ref), ("fast", fast)):
        moe = model.base_model.model.model.layers[0].mlp
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            y = moe(xi)
        (y.float() * torch.linspace(-1, 1, y.numel(), device="cuda").view_as(y)).sum().backward()
        if name == "fast":
            assert_packed(moe)  # on CUDA in bf16 too: the operands are views of the packed buffers
        results[name] = (y.float(), xi.grad.float(), {k: v.float() for k, v in lora_grads(moe).items()})
    (y_r, dx_r, g_r), (y_f, dx_f, g_f) = results["ref"], results["fast"]
    assert rel(y_f, y_r) < 1e-2
    assert rel(dx_f, dx_r) < 1e-2
    empty = 0
    for k in g_r:
        if g_r[k].norm() > 0:
            assert rel(g_f[k], g_r[k]) < 1e-2, k
        else:
            empty += 1
            assert g_f[k].abs().max() == 0, k  # experts without tokens: exactly zero, not garbage
    assert empty > 0 or tokens > 5
