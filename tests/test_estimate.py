"""estimate.py's arithmetic against golden values worked out by hand from its formulas and the
Trainer's (transformers 4.51): each case is one a plausible wrong change gets wrong."""

from __future__ import annotations

import pytest

from hunyuan_lora import config, estimate
from hunyuan_lora.hunyuan.a13b import real_config


@pytest.mark.parametrize(
    ("examples", "batch", "accumulation", "epochs", "steps"),
    [
        (3729, 4, 4, 1, 233),  # the tutorial: ceil(3729 / 4) = 933 batches, // 4 = 233
        (41, 4, 1, 1, 11),  # the last, short batch is a step of its own: ceil, not floor (10)
        (41, 4, 2, 1, 5),  # 11 batches // 2: the Trainer drops the incomplete accumulation
        (41, 4, 1, 1.5, 17),  # ceil(1.5 x 11): a fraction of an epoch rounds up
        (3, 4, 4, 1, 1),  # fewer batches than one accumulation: still one step
    ],
)
def test_expected_steps_is_the_trainers_count(examples, batch, accumulation, epochs, steps):
    cfg = config.load(
        overrides=[
            f"train.per_device_train_batch_size={batch}",
            f"train.gradient_accumulation_steps={accumulation}",
            f"train.num_train_epochs={epochs}",
        ]
    )
    assert estimate.expected_steps(cfg, examples) == steps


def test_max_steps_overrides_the_count():
    assert estimate.expected_steps(config.load(overrides=["train.max_steps=7"]), 3729) == 7


def test_active_parameters_of_the_real_model():
    """Per token: the embedding-sized lm_head + per layer attention (q/o 32 heads, k/v 8) + the shared
    expert + 8 of the 64 routed experts (the MFU figures' 6 x this per token)."""
    layer = 4096 * 128 * (32 * 2 + 8 * 2) + 3 * 4096 * 3072 + 8 * 3 * 4096 * 3072
    assert estimate.active_parameters(real_config()) == 128_167 * 4096 + 32 * layer == 12_738_785_280


def test_memory_estimate_of_the_real_model_one_gpu():
    """bf16, micro-batch 4 x 1024 tokens, gradient checkpointing, the tutorial's 7 targets at r=8."""
    model = real_config()  # hidden 4096, 32 layers, vocab 128167
    params = estimate.count_parameters(model, config.LORA_PRESETS["tutorial"], 8)
    assert (params.total, params.lora) == (80_393_183_232, 364_642_304)
    m = estimate.estimate_memory(model, params, 2, 4 * 1024, True, 1)
    assert m.weights == 80_393_183_232 * 2
    assert m.lora_and_optimizer == 364_642_304 * 4 * 4  # fp32 weights, grads, Adam m and v
    assert m.activations == 4096 * 4096 * 32 * 2  # hidden x tokens x layers x bf16
    assert m.logits == 4096 * 128_167 * 4 * 2  # tokens x vocab, fp32 logits and their gradient
    assert m.overhead == 2**30
    assert m.total == 172_967_903_232


def test_human_bytes_uses_decimal_units():
    assert [estimate.human_bytes(n) for n in (160.8e9, 5.8e6, 1000)] == ["160.8 GB", "5.8 MB", "1.0 kB"]
