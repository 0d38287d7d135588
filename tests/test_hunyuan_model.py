"""The project's HunYuan implementation against the published facts of Hunyuan-A13B-Instruct."""

from __future__ import annotations

import re

import pytest
import torch

from hunyuan_lora.config import LORA_PRESETS
from hunyuan_lora.hunyuan.a13b import real_config
from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.hunyuan.modeling_hunyuan import HunYuanMoE, HunYuanRMSNorm, HunYuanRotaryEmbedding
from hunyuan_lora.stand_in import stand_in_config

REAL_TOTAL_PARAMS = 80_393_183_232
REAL_LORA_TRAINABLE = 364_642_304


@pytest.fixture(scope="module")
def real_meta_model():
    """The real 80 B architecture on the meta device: shapes only, no memory."""
    with torch.device("meta"):
        return HunYuanMoEV1ForCausalLM(HunYuanConfig(**real_config()))


def test_real_config_builds_the_real_parameter_count(real_meta_model):
    assert sum(p.numel() for p in real_meta_model.parameters()) == REAL_TOTAL_PARAMS
    assert real_meta_model.lm_head.weight is real_meta_model.model.embed_tokens.weight  # tied


def test_real_config_builds_the_real_module_tree_and_shapes(real_meta_model):
    shapes = {k: tuple(v.shape) for k, v in real_meta_model.state_dict().items()}
    layer = "model.layers.31."
    expected = {
        "model.embed_tokens.weight": (128167, 4096),
        "model.norm.weight": (4096,),
        layer + "input_layernorm.weight": (4096,),
        layer + "post_attention_layernorm.weight": (4096,),
        layer + "self_attn.q_proj.weight": (4096, 4096),
        layer + "self_attn.k_proj.weight": (1024, 4096),
        layer + "self_attn.v_proj.weight": (1024, 4096),
        layer + "self_attn.o_proj.weight": (4096, 4096),
        layer + "self_attn.query_layernorm.weight": (128,),
        layer + "self_attn.key_layernorm.weight": (128,),
        layer + "mlp.gate.wg.weight": (64, 4096),
        layer + "mlp.shared_mlp.gate_proj.weight": (3072, 4096),
        layer + "mlp.shared_mlp.up_proj.weight": (3072, 4096),
        layer + "mlp.shared_mlp.down_proj.weight": (4096, 3072),
        layer + "mlp.experts.63.gate_proj.weight": (3072, 4096),
        layer + "mlp.experts.63.down_proj.weight": (4096, 3072),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    per_layer = [k for k in shapes if k.startswith(layer)]
    assert len(per_layer) == 4 + 2 + 2 + 1 + 3 + 64 * 3  # attn, qk norms, layer norms, router, shared, experts
    assert not any(k.startswith("model.layers.32.") for k in shapes)
    assert real_meta_model.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32
    # The router is a module named `gate` holding a Linear `wg` -- never a Linear called `gate`.
    assert not isinstance(real_meta_model.model.layers[0].mlp.gate, torch.nn.Linear)


def test_tutorial_lora_targets_give_the_published_trainable_count_and_skip_the_router():
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**real_config()))
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=LORA_PRESETS["tutorial"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == REAL_LORA_TRAINABLE
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    assert not any(n.endswith("mlp.gate") or ".wg" in n for n in wrapped)
    assert sum(".mlp.experts." in n for n in wrapped) == 32 * 64 * 3


def test_stand_in_has_the_real_key_pattern():
    def pattern(cfg):
        with torch.device("meta"):
            keys = HunYuanMoEV1ForCausalLM(HunYuanConfig(**cfg)).state_dict()
        return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}

    assert pattern(stand_in_config()) == pattern(real_config())


def test_stand_in_config_keeps_every_real_key():
    real, tiny = real_config(), stand_in_config()
    assert real.keys() == tiny.keys()
    assert tiny["auto_map"] == real["auto_map"]
    assert tiny["model_type"] == "hunyuan"
    for key in ("moe_topk", "num_shared_expert", "moe_intermediate_size"):
        assert isinstance(tiny[key], list)
        assert len(tiny[key]) == tiny["num_hidden_layers"]


def test_rotary_base_uses_ntk_alpha():
    rope = HunYuanRotaryEmbedding(HunYuanConfig(**real_config()))
    base = 10000.0 * 1000.0 ** (128 / 126)
    assert base == pytest.approx(1.116e7, rel=1e-3)
    expected = 1.0 / base ** (torch.arange(0, 128, 2).double() / 128)
    torch.testing.assert_close(rope.inv_freq.double(), expected, rtol=1e-5, atol=0)


def reference_moe(moe: HunYuanMoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE written per token: softmax over all experts, top-k, renormalise, weighted sum."""
    out = []
    for token in x:
        probs = torch.softmax(moe.gate.wg.weight.double() @ token.double(), dim=-1)
        weights, experts = probs.topk(moe.gate.top_k)
        weights = weights / weights.sum()
        y = moe.shared_mlp(token[None])[0]
        for w, e in zip(weights, experts):
            y = y + w * moe.experts[int(e)](token[None])[0]
        out.append(y)
    return torch.stack(out)


def tiny_moe(seed: int) -> HunYuanMoE:
    torch.manual_seed(seed)
    cfg = HunYuanConfig(**stand_in_config())
    moe = HunYuanMoE(cfg, layer_idx=0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe.double()  # float64: differences are the implementation's, not summation order's


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dropless_moe_equals_per_token_reference(seed):
    moe = tiny_moe(seed)
    x = torch.randn(3, 7, 64, dtype=torch.float64)
    torch.testing.assert_close(moe(x), reference_moe(moe, x.view(-1, 64)).view(3, 7, 64), rtol=1e-10, atol=1e-12)


def test_moe_drops_nothing_when_every_token_picks_the_same_experts():
    """Upstream's capacity max(k, k*N/E) would drop most pairs here; the dropless MoE drops none."""
    moe = tiny_moe(3)
    with torch.no_grad():
        moe.gate.wg.weight.zero_()
        moe.gate.wg.weight[0] = 5.0  # all tokens route to experts 0 and 1 (the rest tie at 0)
        moe.gate.wg.weight[1] = 4.0
    x = torch.rand(64, 64, dtype=torch.float64) + 0.1  # positive, so every token prefers experts 0 then 1
    used = moe.gate(x)[1]
    assert set(used.flatten().tolist()) == {0, 1}
    torch.testing.assert_close(moe(x[None])[0], reference_moe(moe, x), rtol=1e-10, atol=1e-12)


def test_moe_gradients_match_reference():
    moe = tiny_moe(4)
    x = torch.randn(10, 64, dtype=torch.float64, requires_grad=True)
    moe(x[None]).sum().backward()
    fast = {n: p.grad.clone() for n, p in moe.named_parameters() if p.grad is not None}
    moe.zero_grad()
    reference_moe(moe, x.detach()).sum().backward()
    for name, p in moe.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fast[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_padding_does_not_change_real_tokens(stand_in_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[815, 300, 301, 302, 819]])
    alone = model(input_ids=ids).logits
    pad = model.config.pad_token_id
    batch = torch.tensor([[pad, pad, 815, 300, 301, 302, 819], [815, 300, 301, 302, 819, 400, 401]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    padded = model(input_ids=batch, attention_mask=mask, position_ids=position_ids).logits
    torch.testing.assert_close(padded[0, 2:], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[1, :5], alone[0], rtol=1e-4, atol=1e-5)


def test_packed_samples_do_not_attend_across_boundaries(stand_in_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, torch_dtype=torch.float32)
    model.eval()
    a, b = torch.tensor([[815, 300, 301]]), torch.tensor([[815, 500, 501, 502]])
    packed = model(input_ids=torch.cat([a, b], 1), position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3]])).logits
    torch.testing.assert_close(packed[:, :3], model(input_ids=a).logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[:, 3:], model(input_ids=b).logits, rtol=1e-4, atol=1e-5)


def test_kv_cache_generation_matches_full_forward(stand_in_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, torch_dtype=torch.float32)
    model.eval()
    ids = torch.tensor([[815, 300, 301, 302, 819]])
    out = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    # Greedy decoding with the cache must pick the argmax of a full, cache-free forward each step.
    full = model(input_ids=out[:, :-1], use_cache=False).logits
    assert torch.equal(full[0, ids.shape[1] - 1 :].argmax(-1), out[0, ids.shape[1] :])


def test_router_stays_float32_under_bf16_autocast():
    moe = HunYuanMoE(HunYuanConfig(**stand_in_config()), layer_idx=0)
    x = torch.randn(5, 64)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        weights, _ = moe.gate(x)
        assert weights.dtype == torch.float32
        logits = torch.nn.functional.linear(x.float(), moe.gate.wg.weight.float())  # what autocast would do
    exact = torch.softmax(x.float() @ moe.gate.wg.weight.float().T, -1).topk(2).values
    torch.testing.assert_close(weights, exact / exact.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)
    assert logits.dtype == torch.bfloat16  # the check above would fail without the autocast guard


def spelled_out_rms_norm(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """The published formula: normalised in float32, rounded to x's dtype, then times the weight."""
    h = x.float()
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
        ),
    ],
)
@pytest.mark.parametrize(
    ("x_dtype", "w_dtype"),
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
)
def test_rms_norm_is_the_published_formula_with_its_rounding(device, x_dtype, w_dtype):
    """HunYuanRMSNorm (torch's fused RMSNorm) against the formula spelled out, the weight in bf16 or in float32
    (what k-bit preparation leaves), under bf16 autocast too, values and input gradients: bit for bit on the
    CPU; on CUDA the fused kernel sums in another order, so within one unit of the last place."""
    torch.manual_seed(0)
    norm = HunYuanRMSNorm(128, eps=1e-5).to(device)
    norm.weight.data = (torch.rand(128) + 0.5).to(device, w_dtype)
    x = (torch.randn(3, 7, 128) * 3).to(device, x_dtype).requires_grad_(True)
    for autocast in (False, True):
        with torch.autocast(device, torch.bfloat16, enabled=autocast):
            got = norm(x)
            want = spelled_out_rms_norm(norm.weight, x, 1e-5)
        assert got.dtype == want.dtype
        (got_grad,) = torch.autograd.grad(got.float().square().sum(), x)
        (want_grad,) = torch.autograd.grad(want.float().square().sum(), x)
        if device == "cpu":
            assert torch.equal(got, want)
            assert torch.equal(got_grad, want_grad)
        else:
            ulp = torch.finfo(got.dtype).eps * want.abs().float()
            assert ((got.float() - want.float()).abs() <= ulp).all()
            assert torch.allclose(got_grad, want_grad, rtol=2e-2, atol=1e-3)
