"""The tied lm_head computed with its weight padded to a multiple of 64 rows (hunyuan.py, `lm_logits`).

On CUDA the padding turns on by itself (training, frozen weight); here it is forced on with
`model.pad_lm_head = True` and compared with the plain lm_head in float32.
"""

from __future__ import annotations

import copy
import pickle

import torch
from peft import LoraConfig, get_peft_model

from hunyuan_lora.hunyuan import hunyuan
from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.stand_in import stand_in_config

VOCAB = 1000  # not a multiple of 64: padded to 1024 rows


def tiny_model(seed: int = 0, frozen: bool = True) -> HunYuanMoEV1ForCausalLM:
    cfg = stand_in_config()
    cfg.update(
        attention_dropout=0.0, vocab_size=VOCAB, pad_token_id=999, eos_token_id=998, eod_token_id=997, sep_token_id=996
    )
    torch.manual_seed(seed)
    model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**cfg)).float()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the real model
    model.lm_head.weight.requires_grad_(not frozen)
    return model


IDS = torch.tensor([[5, 300, 301, 302, 819, 7], [9, 8, 7, 6, 5, 4]])


def logits(model, padded: bool, **kw) -> torch.Tensor:
    model.pad_lm_head = padded
    return model(input_ids=IDS, **kw).logits


def test_padded_logits_equal_the_plain_ones_and_the_copy_is_cached():
    model = tiny_model().eval()
    with torch.no_grad():
        plain = logits(model, False)
        padded = logits(model, True)
        cached = model._lm_head_cache.padded
        again = logits(model, True)
    assert padded.shape == plain.shape == (2, 6, VOCAB)
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
    assert cached.shape == (1024, 64)
    assert cached[VOCAB:].abs().max() == 0
    assert model._lm_head_cache.padded is cached  # the second call reused the copy
    assert torch.equal(again, padded)


def test_changing_the_weight_invalidates_the_cache():
    model = tiny_model().eval()
    with torch.no_grad():
        logits(model, True)
        first = model._lm_head_cache.padded
        model.lm_head.weight.mul_(2.0)  # in place (what a merge or copy_ does)
        torch.testing.assert_close(logits(model, True), logits(model, False), rtol=1e-6, atol=1e-6)
        assert model._lm_head_cache.padded is not first

        other = tiny_model(seed=1).state_dict()
        model.load_state_dict(other)
        torch.testing.assert_close(logits(model, True), logits(model, False), rtol=1e-6, atol=1e-6)

        model.double()  # dtype change: `.data =` under the hood
        assert logits(model, True).dtype == torch.float64
        assert model._lm_head_cache.padded.dtype == torch.float64

        model.lm_head.weight.data.add_(1.0)  # bypasses the version counter: documented, reset by hand
        model.reset_lm_head_cache()
        torch.testing.assert_close(logits(model, True), logits(model, False), rtol=1e-10, atol=1e-10)


def test_state_dict_keys_and_shapes_do_not_change(tmp_path):
    model = tiny_model().eval()
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits(model, True)
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert after == before
    assert after["model.embed_tokens.weight"] == (VOCAB, 64)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(before) - {"lm_head.weight"}  # tied: stored once, as the real files
    reloaded = HunYuanMoEV1ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded, True), logits(model, False), rtol=1e-6, atol=1e-6)


def test_trainable_weight_gets_the_right_gradients_and_no_cache():
    grads = {}
    for padded in (False, True):
        model = tiny_model(frozen=False).train()
        model.pad_lm_head = padded
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        grads[padded] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert model._lm_head_cache.padded is None  # never a cached copy of a trainable weight
        assert out.logits.shape == (2, 6, VOCAB)
    assert grads[True].keys() == grads[False].keys()
    assert "model.embed_tokens.weight" in grads[True]
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7, msg=name)


def test_lora_training_with_the_padded_head_matches_the_plain_one():
    """The real setting: PEFT freezes the tied weight, so the cached copy is used under autograd."""
    results = {}
    for padded in (False, True):
        model = tiny_model(frozen=False)
        model.pad_lm_head = padded
        peft = get_peft_model(
            model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        peft.train()
        peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss = peft(input_ids=IDS, labels=IDS).loss
        loss.backward()
        assert (model._lm_head_cache.padded is not None) is padded
        results[padded] = (loss.detach(), {n: p.grad.clone() for n, p in peft.named_parameters() if p.requires_grad})
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-6, atol=1e-6)
    for name, g in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_automatic_mode_stays_off_on_the_cpu():
    model = tiny_model().train()
    assert HunYuanMoEV1ForCausalLM.pad_lm_head is None
    model(input_ids=IDS, labels=IDS)
    assert model._lm_head_cache.padded is None


def test_copies_of_the_model_do_not_share_or_pickle_the_cache():
    model = tiny_model().eval()
    with torch.no_grad():
        logits(model, True)
    twin = copy.deepcopy(model)
    assert twin._lm_head_cache.padded is None
    restored = pickle.loads(pickle.dumps(model))
    assert restored._lm_head_cache.padded is None
    with torch.no_grad():
        torch.testing.assert_close(logits(twin, True), logits(model, False), rtol=1e-6, atol=1e-6)


def test_helper_alone():
    w = torch.randn(130, 16)
    h = torch.randn(3, 5, 16)
    cache = hunyuan._PaddedWeightCache()
    out = hunyuan.padded_lm_logits(h, w, 64, cache)
    assert out.shape == (3, 5, 130)
    assert cache.padded.shape == (192, 16)
    torch.testing.assert_close(out, torch.nn.functional.linear(h, w), rtol=1e-6, atol=1e-6)


def test_the_stand_in_folder_copy_pads_too(stand_in_dir, monkeypatch):
    """hunyuan.py is copied into model folders: the padding must work from there (self-contained)."""
    import sys

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, torch_dtype=torch.float32)
    model.eval().lm_head.weight.requires_grad_(False)
    assert not type(model).__module__.startswith("hunyuan_lora.")
    assert model.config.vocab_size == 1024  # a multiple of 64: pad to a multiple of 48 (1056) instead
    monkeypatch.setattr(sys.modules[type(model).__module__], "LM_HEAD_PAD_MULTIPLE", 48)
    ids = torch.tensor([[815, 300, 301, 302, 819]])
    with torch.no_grad():
        model.pad_lm_head = False
        plain = model(input_ids=ids).logits
        model.pad_lm_head = True
        padded = model(input_ids=ids).logits
    assert model._lm_head_cache.padded.shape == (1056, model.config.hidden_size)
    torch.testing.assert_close(padded, plain, rtol=1e-6, atol=1e-6)
