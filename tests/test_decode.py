"""The decode path: one token at a time through the KV cache (static or dynamic) gives the logits of the
full-sequence forward, and greedy generation gives the same tokens batched (left padding) as one prompt at
a time. CPU, float32, the stand-in architecture with the LoRA attached; the CUDA tests (gpu marker) check
the 4-bit decode kernel, the CUDA graphs and bf16."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tensor_helpers import CUDA_WIDTHS, randomise_lora, rel
from transformers.cache_utils import DynamicCache, StaticCache

from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.stand_in import stand_in_config

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(moe_impl: str, dtype=torch.float32, device="cpu", **sizes):
    torch.manual_seed(0)
    config = HunYuanConfig(**(stand_in_config() | sizes))
    config.moe_impl = moe_impl
    model = HunYuanMoEV1ForCausalLM(config).to(device=device, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    randomise_lora(model, seed=1)
    return model.eval()


def prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, vocab - 300, (n,), generator=g).tolist() for n in lengths]


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


@pytest.mark.parametrize("moe_impl", ["fast", "upstream"])
@pytest.mark.parametrize("cache_kind", ["static", "dynamic"])
def test_decode_logits_equal_the_full_forward_at_every_position(moe_impl, cache_kind):
    model = lora_model(moe_impl)
    base = model.get_base_model()
    ids, mask = left_padded(prompts(base.config.vocab_size, [13, 9]), base.config.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits  # (B, T, V)
        T, prefill = ids.shape[1], 5
        cache = (
            StaticCache(base.config, max_batch_size=2, max_cache_len=T + 3, device="cpu", dtype=torch.float32)
            if cache_kind == "static"
            else DynamicCache()
        )
        steps = [
            model(
                input_ids=ids[:, :prefill],
                attention_mask=mask[:, :prefill],
                position_ids=positions[:, :prefill],
                past_key_values=cache,
                cache_position=torch.arange(prefill),
                use_cache=True,
            ).logits
        ]
        for t in range(prefill, T):
            steps.append(
                model(
                    input_ids=ids[:, t : t + 1],
                    attention_mask=mask[:, : t + 1],
                    position_ids=positions[:, t : t + 1],
                    past_key_values=cache,
                    cache_position=torch.tensor([t]),
                    use_cache=True,
                ).logits
            )
    decoded = torch.cat(steps, dim=1)
    real = mask.bool()  # a left-pad position's logits are not defined by anything
    assert decoded.shape == full.shape
    assert rel(decoded[real], full[real]) < 1e-5
    for t in range(prefill, T):  # every decoded position on its own, not only on average
        assert rel(decoded[:, t][real[:, t]], full[:, t][real[:, t]]) < 1e-5, t


@pytest.mark.parametrize("cache_implementation", ["static", None])
def test_greedy_tokens_batched_with_left_padding_equal_one_prompt_at_a_time(cache_implementation):
    model = lora_model("fast")
    base = model.get_base_model()
    rows = prompts(base.config.vocab_size, [3, 11, 7, 1])
    kwargs = {
        "max_new_tokens": 9,
        "do_sample": False,
        "pad_token_id": base.config.pad_token_id,
        "eos_token_id": None,
        "cache_implementation": cache_implementation,
    }
    with torch.no_grad():
        alone = [
            model.generate(
                input_ids=torch.tensor([r]), attention_mask=torch.ones(1, len(r), dtype=torch.long), **kwargs
            )[0, len(r) :].tolist()
            for r in rows
        ]
        ids, mask = left_padded(rows, base.config.pad_token_id)
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :].tolist()
    assert all(len(a) == 9 for a in alone)
    assert batched == alone
    if cache_implementation == "static":
        assert isinstance(base._cache, StaticCache)  # generate really decoded through the static cache


def cuda_nf4_model(dtype):
    """A small NF4 model on CUDA (widths that whole 64-value blocks and the gemv kernel take), fast path, LoRA."""
    from hunyuan_lora.hunyuan.random_init import quantize_linears_

    torch.manual_seed(0)
    config = HunYuanConfig(**(stand_in_config() | CUDA_WIDTHS | {"num_key_value_heads": 2, "attention_dropout": 0.0}))
    config.moe_impl = "fast"
    base = HunYuanMoEV1ForCausalLM(config).to("cuda", dtype)
    for layer in base.model.layers:
        quantize_linears_(layer, skip=("wg", "lm_head"), compute_dtype=dtype)
    base.is_loaded_in_4bit = True
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    randomise_lora(model, seed=1)
    return model.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    ("dtype", "lengths", "tolerance"), [(torch.float32, [12], 1e-4), (torch.bfloat16, [12, 7], 5e-2)]
)
def test_cuda_decode_graphs_give_the_full_forward_logits(dtype, lengths, tolerance):
    """generate with the StaticCache: decode steps replayed as CUDA graphs (batch 1: the one-token NF4 path;
    batch 2, left padding: the grouped path) against one full-sequence forward over the same tokens."""
    model = cuda_nf4_model(dtype)
    base = model.get_base_model()
    ids, mask = left_padded(prompts(base.config.vocab_size, lengths), base.config.pad_token_id)
    ids, mask = ids.cuda(), mask.cuda()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=base.config.pad_token_id,
            cache_implementation="static",
            disable_compile=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
        seq = out.sequences
        full_mask = torch.cat([mask, torch.ones_like(seq[:, ids.shape[1] :])], dim=1)
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        full = model(input_ids=seq, attention_mask=full_mask, position_ids=positions).logits.float()
    decoded = torch.stack(out.logits, dim=1).float()  # (B, 6, V): the prefill's last position, then 5 decode steps
    expected = full[:, ids.shape[1] - 1 : -1]
    assert base._decode_graphs.graphs.captures >= 1  # the decode steps ran as graphs
    assert rel(decoded, expected) < tolerance
