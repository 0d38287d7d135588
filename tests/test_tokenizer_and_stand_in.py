"""The stand-in folder: layout, determinism, tokenizer ids, chat template, loading, the logger defect."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from hunyuan_lora import stand_in
from hunyuan_lora.hunyuan.tokenization_hy import SPECIAL_TOKENS

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
REAL_FILES = {
    "config.json",
    "configuration_hunyuan.py",
    "hunyuan.py",
    "modeling_hunyuan.py",
    "generation_config.json",
    "hy.tiktoken",
    "tokenization_hy.py",
    "tokenizer_config.json",
    "model.safetensors.index.json",
}


@pytest.fixture(scope="module")
def tokenizer(stand_in_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(stand_in_dir, trust_remote_code=True)


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_folder_is_laid_out_like_the_real_download(stand_in_dir):
    names = {p.name for p in stand_in_dir.iterdir()}
    assert names >= REAL_FILES
    index = json.loads((stand_in_dir / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {n for n in names if n.endswith(".safetensors")}
    assert sum(p.stat().st_size for p in stand_in_dir.iterdir()) < 5 * 1024 * 1024
    config = json.loads((stand_in_dir / "config.json").read_text())
    assert config["model_type"] == "hunyuan"
    assert "head_dim" not in config
    assert config["auto_map"]["AutoModelForCausalLM"] == "hunyuan.HunYuanMoEV1ForCausalLM"
    tok_config = json.loads((stand_in_dir / "tokenizer_config.json").read_text())
    assert tok_config["auto_map"]["AutoTokenizer"][0] == "tokenization_hy.HYTokenizer"


def test_same_seed_gives_byte_identical_folder(stand_in_dir, tmp_path):
    again = stand_in.build(tmp_path / "again", seed=0)
    assert _digests(again) == _digests(stand_in_dir)
    other = _digests(stand_in.build(tmp_path / "other", seed=1))
    assert other["model-00001-of-00002.safetensors"] != _digests(stand_in_dir)["model-00001-of-00002.safetensors"]


def test_generated_hunyuan_py_uses_logger_without_defining_it(stand_in_dir):
    from hunyuan_lora.patch import undefined_uses

    source = (stand_in_dir / "hunyuan.py").read_text()
    assert undefined_uses(source), "the stand-in must carry the real file's logger defect"
    assert "logger" not in [line.split("=")[0].strip() for line in source.splitlines() if "=" in line]


def test_special_tokens_sit_at_the_top_of_the_vocabulary(tokenizer, stand_in_dir):
    config = json.loads((stand_in_dir / "config.json").read_text())
    first = stand_in.BPE_SIZE
    assert len(tokenizer) == config["vocab_size"] == first + len(SPECIAL_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)
    assert ids == list(range(first, config["vocab_size"]))
    assert tokenizer.eos_token == "<|eos|>"
    assert tokenizer.eos_token_id == config["eos_token_id"] == first + 3
    assert tokenizer.pad_token == "<|pad|>"
    assert tokenizer.pad_token_id == config["pad_token_id"] == first + 4
    assert tokenizer.bos_token is None
    assert config["eod_token_id"] == tokenizer.convert_tokens_to_ids("<|extra_5|>")
    assert config["sep_token_id"] == tokenizer.convert_tokens_to_ids("<|extra_0|>")
    gen = json.loads((stand_in_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|extra_5|>")]
    assert gen["pad_token_id"] == tokenizer.pad_token_id


def test_tokenizer_adds_no_special_tokens_and_round_trips(tokenizer):
    text = "臣妾甄嬛 says: who are you? 123"
    ids = tokenizer(text)["input_ids"]
    assert all(i < stand_in.BPE_SIZE for i in ids)
    assert tokenizer.decode(ids) == text
    # Qwen markers are plain text for this tokenizer (the tutorial's first bug).
    assert len(tokenizer("<|im_start|>")["input_ids"]) > 1
    assert tokenizer("<|startoftext|>hi<|extra_0|>")["input_ids"][0] == tokenizer.convert_tokens_to_ids(
        "<|startoftext|>"
    )
    assert tokenizer.decode(tokenizer("<|eos|>")["input_ids"], skip_special_tokens=True) == ""


@pytest.mark.parametrize(
    ("messages", "kwargs", "expected"),
    [
        (
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "你父亲是谁？"}],
            {"enable_thinking": False},
            f"<|startoftext|>{SYSTEM}<|extra_4|>你父亲是谁？<|extra_0|><think>\n\n</think>\n",
        ),
        (
            [{"role": "user", "content": "who are you?"}],
            {"enable_thinking": False},
            "<|startoftext|>who are you?<|extra_0|><think>\n\n</think>\n",
        ),
        ([{"role": "user", "content": "who are you?"}], {}, "<|startoftext|>who are you?<|extra_0|>"),
        (
            [{"role": "user", "content": "who are you?"}],
            {"enable_thinking": True},
            "<|startoftext|>who are you?<|extra_0|>",
        ),
        (
            [{"role": "user", "content": "who are you?"}],
            {"add_generation_prompt": True},
            "<|startoftext|>who are you?<|extra_0|>",
        ),
        (
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "a1"},
                {"role": "user", "content": "u2"},
            ],
            {"enable_thinking": False},
            "<|startoftext|>S<|extra_4|>u1<|extra_0|>a1<|eos|><|startoftext|>u2<|extra_0|><think>\n\n</think>\n",
        ),
        (
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": "你父亲是谁？"},
                {"role": "assistant", "content": "家父是大理寺少卿甄远道。"},
            ],
            {"enable_thinking": False},
            f"<|startoftext|>{SYSTEM}<|extra_4|>你父亲是谁？<|extra_0|>家父是大理寺少卿甄远道。<|eos|><think>\n\n</think>\n",
        ),
        (
            [{"role": "user", "content": "/no_think hi"}],
            {},
            "<|startoftext|>/no_think hi<|extra_0|><think>\n\n</think>\n",
        ),
        ([{"role": "user", "content": "/think hi"}], {"enable_thinking": False}, "<|startoftext|>/think hi<|extra_0|>"),
    ],
    ids=[
        "system+user",
        "user-only-off",
        "default-thinking",
        "thinking-on",
        "generation-prompt-ignored",
        "multi-turn",
        "assistant-turn-then-think-block",
        "no_think-prefix",
        "think-prefix",
    ],
)
def test_chat_template_renders_the_documented_strings(tokenizer, messages, kwargs, expected):
    assert tokenizer.apply_chat_template(messages, tokenize=False, **kwargs) == expected


def test_chat_template_ids_match_the_reference_example_structure(tokenizer):
    """The reference's `who are you?` example: startoftext, text, extra_0, then the think block."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "who are you?"}], enable_thinking=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|startoftext|>")
    sep = ids.index(tokenizer.convert_tokens_to_ids("<|extra_0|>"))
    assert tokenizer.decode(ids[1:sep]) == "who are you?"
    assert tokenizer.decode(ids[sep + 1 :]) == "<think>\n\n</think>\n"


def test_loads_like_the_real_model_with_every_weight(stand_in_dir):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        stand_in_dir, trust_remote_code=True, torch_dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    assert type(model).__name__ == "HunYuanMoEV1ForCausalLM"
    assert model.model.layers[0].mlp.gate.wg.weight.dtype == torch.float32  # router kept in fp32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    out = model.generate(
        torch.tensor([[stand_in.BPE_SIZE + 1, 300, 301]]),
        max_new_tokens=4,
        do_sample=False,
        min_new_tokens=4,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    assert out.shape == (1, 7)


def _train_step(folder, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32)
    model.train()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ids = torch.tensor([[stand_in.BPE_SIZE + 1, 300, 301, 302]])
    loss = model(input_ids=ids, labels=ids).loss  # use_cache comes from config.json (true), as in the tutorial
    loss.backward()
    return loss.item()


def test_unpatched_stand_in_trains_only_without_gradient_checkpointing(stand_in_dir):
    assert _train_step(stand_in_dir, gradient_checkpointing=False) > 0
    with pytest.raises(NameError, match="name 'logger' is not defined"):
        _train_step(stand_in_dir, gradient_checkpointing=True)


def test_patched_stand_in_trains_with_gradient_checkpointing(patched_stand_in):
    assert _train_step(patched_stand_in, gradient_checkpointing=True) > 0


def test_bpe_training_is_a_pure_function_of_the_text():
    text = stand_in.tokenizer_corpus()
    assert stand_in.train_bpe(text, 300) == stand_in.train_bpe(text, 300)
    ranks = stand_in.train_bpe(text, 300)
    assert sorted(ranks.values()) == list(range(300))
    with pytest.raises(ValueError, match="supports only"):
        stand_in.train_bpe("ab", 300)
