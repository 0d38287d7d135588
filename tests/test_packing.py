"""Sequence packing: one concatenated row per micro-batch gives the same loss as the padded batch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from hunyuan_lora import checkpoints, config, data, train, training

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(patched_stand_in, tmp_path_factory):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("packing")
    cfg = config.load(REPO / "configs/demo.yaml", model_dir=str(patched_stand_in), output_dir=str(out))
    features = list(load_from_disk(str(data.run(cfg)))["train"].select(range(5)))
    model = AutoModelForCausalLM.from_pretrained(patched_stand_in, trust_remote_code=True, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(patched_stand_in, trust_remote_code=True)
    return cfg, features, model.eval(), tokenizer


def loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()


def test_packed_and_padded_batches_give_the_same_loss_and_gradients(setup):
    cfg, features, model, tokenizer = setup
    padded = training.make_collator(cfg, tokenizer)(features)
    cfg.train.packing = True
    packed = training.make_collator(cfg, tokenizer)(features)
    assert packed["input_ids"].shape[0] == 1
    assert "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features) < padded["input_ids"].numel()
    assert (packed["position_ids"] == 0).sum() == len(features)

    loss_padded, grad_padded = loss_and_grads(model, padded)
    loss_packed, grad_packed = loss_and_grads(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_packed, grad_padded, rtol=1e-4, atol=1e-7)


def test_packing_without_boundaries_would_differ(setup):
    """The check above can fail: the same row with one running position sequence mixes samples."""
    cfg, features, model, tokenizer = setup
    cfg.train.packing = True
    packed = training.make_collator(cfg, tokenizer)(features)
    padded = training.make_collator(config.load(REPO / "configs/demo.yaml"), tokenizer)(features)
    leaky = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        assert abs(model(**leaky).loss - model(**padded).loss) > 1e-3


def test_training_runs_with_packing(setup, tmp_path):
    cfg, _, _, _ = setup
    run_cfg = config.load(
        REPO / "configs/demo.yaml",
        [
            "train.packing=true",
            "model.moe_impl=fast",
            "train.max_steps=2",
            "train.per_device_train_batch_size=8",
            "swanlab.mode=disabled",
            "train.resume=never",
        ],
        model_dir=cfg.model.dir,
        output_dir=str(tmp_path / "run"),
    )
    import shutil

    shutil.copytree(cfg.output_dir / "data", run_cfg.output_dir / "data")
    train.run(run_cfg)
    history = json.loads((run_cfg.output_dir / "log_history.json").read_text())
    assert history[-1]["step"] == 2
    assert history[-1]["train_loss"] > 0


def test_fast_preset_trains_on_the_stand_in_with_16_samples_per_step(setup, tmp_path):
    """configs/huanhuan_fast.yaml's speed switches (fast MoE + packing + fused AdamW, 16 samples in one
    micro-batch) on the stand-in: they combine, train, and save PEFT's standard per-expert adapter."""
    import shutil

    import yaml
    from safetensors.torch import load_file

    cfg, _, _, _ = setup
    preset = yaml.safe_load((REPO / "configs/huanhuan_fast.yaml").read_text())
    switches = {
        "model": ("moe_impl", "quantization"),
        "train": (
            "packing",
            "pad_to_multiple_of",
            "optim",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
        ),
        "lora": ("preset", "r", "alpha", "dropout"),
    }
    overrides = [f"{section}.{key}={preset[section][key]}" for section, keys in switches.items() for key in keys]
    assert preset["train"]["per_device_train_batch_size"] * preset["train"]["gradient_accumulation_steps"] == 16
    run_cfg = config.load(
        REPO / "configs/demo.yaml",
        [*overrides, "train.max_steps=2", "train.logging_steps=1", "swanlab.mode=disabled", "train.resume=never"],
        model_dir=cfg.model.dir,
        output_dir=str(tmp_path / "run"),
    )
    assert (run_cfg.model.moe_impl, run_cfg.train.packing, run_cfg.train.optim) == ("fast", True, "adamw_torch_fused")
    shutil.copytree(cfg.output_dir / "data", run_cfg.output_dir / "data")
    train.run(run_cfg)
    history = json.loads((run_cfg.output_dir / "log_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 2
    assert all(0 < loss < 20 for loss in losses)
    adapter = load_file(str(run_cfg.output_dir / "adapter" / "adapter_model.safetensors"))
    assert any(".mlp.experts.0.gate_proj.lora_A.weight" in k for k in adapter)  # PEFT's per-expert format
    assert "moe_impl: fast" in (run_cfg.output_dir / "resolved.yaml").read_text()


def test_packing_with_the_folders_own_code_is_refused():
    """With moe_impl upstream the model folder's hunyuan.py (Tencent's, for the real model) runs; nothing
    says it keeps packed samples apart, so packing there could train on cross-sample attention."""
    from hunyuan_lora.errors import UserError

    with pytest.raises(UserError, match="train.packing needs model.moe_impl: fast") as e:
        config.load(REPO / "configs/huanhuan.yaml", ["train.packing=true"])
    assert "attend to each other" in str(e.value)
    assert config.load(REPO / "configs/huanhuan.yaml", ["train.packing=true", "model.moe_impl=fast"]).train.packing


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_rounding_the_length_up_keeps_loss_gradients_and_the_throughput_count(setup, packing):
    """train.pad_to_multiple_of bounds the number of distinct shapes; the extra positions change nothing:
    padded batches get masked padding, packed rows a masked block of their own (labels -100)."""
    import copy

    from hunyuan_lora.callbacks import BatchCounter

    base, features, model, tokenizer = setup
    cfg = copy.deepcopy(base)
    cfg.train.packing, cfg.train.pad_to_multiple_of = packing, None
    plain = training.make_collator(cfg, tokenizer)(features)
    length = plain["input_ids"].shape[1]
    cfg.train.pad_to_multiple_of = multiple = next(m for m in (64, 48, 40) if length % m)
    rounded = training.make_collator(cfg, tokenizer)(features)
    assert rounded["input_ids"].shape[1] == -(-length // multiple) * multiple > length
    extra = (slice(None), slice(length, None))
    assert (rounded["labels"][extra] == -100).all()
    assert rounded["attention_mask"][extra].sum() == 0
    if packing:
        assert rounded["position_ids"][0, length] == 0  # the block starts a "sample" of its own

    loss_plain, grad_plain = loss_and_grads(model, plain)
    loss_rounded, grad_rounded = loss_and_grads(model, rounded)
    torch.testing.assert_close(loss_rounded, loss_plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_rounded, grad_plain, rtol=1e-4, atol=1e-7)

    counter = BatchCounter()  # SwanLab's and the probe's tokens/s and samples/s count real ones only
    model.train()
    try:
        counter.count(model, (), rounded)
    finally:
        model.eval()
    assert counter.take() == (len(features), sum(len(f["input_ids"]) for f in features))
    assert counter.take() == (0, 0)  # taken: the next window starts from zero


def test_fast_run_resumes_and_a_checkpoint_of_the_per_expert_layout_is_refused(setup, tmp_path, monkeypatch):
    """The fast path's stacked expert LoRA resumes from its own checkpoints; a checkpoint written with PEFT's
    2 x E tensors per expert projection (the fast path before stack_expert_lora) is refused in one
    paragraph before training, and left as it was."""
    import shutil

    from hunyuan_lora.errors import UserError
    from hunyuan_lora.hunyuan import fast_moe

    cfg, _, _, _ = setup

    def run(out, steps, resume, stacked=True):
        run_cfg = config.load(
            REPO / "configs/demo.yaml",
            [
                "model.moe_impl=fast",
                f"train.max_steps={steps}",
                "train.save_steps=2",
                "train.logging_steps=1",
                "swanlab.mode=disabled",
                f"train.resume={resume}",
            ],
            model_dir=cfg.model.dir,
            output_dir=str(out),
        )
        if not (out / "data").exists():
            shutil.copytree(cfg.output_dir / "data", out / "data")
        with monkeypatch.context() as m:
            if not stacked:
                m.setattr(fast_moe, "stack_expert_lora", lambda model: 0)
            train.run(run_cfg)
        return json.loads((out / "log_history.json").read_text())

    run(tmp_path / "stacked", 2, "never")
    history = run(tmp_path / "stacked", 3, "auto")
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]  # resumed: steps 1-2 from the checkpoint

    run(tmp_path / "per-expert", 2, "never", stacked=False)
    checkpoint = tmp_path / "per-expert" / "checkpoint-2"
    before = {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"optimizer state for (\d+) tensors, this run trains (\d+)") as e:
        run(tmp_path / "per-expert", 3, "auto")
    assert (
        f"written with LoRA layout 1 ({checkpoints.LORA_LAYOUTS[1]}), this run trains layout 2 "
        f"({checkpoints.LORA_LAYOUTS[2]})"
    ) in str(e.value)
    assert "train.resume=never" in str(e.value.fix)
    assert {p.name: p.read_bytes() for p in checkpoint.iterdir() if p.is_file()} == before


def test_packed_rows_are_level_and_hold_every_sample_once():
    lengths = [241, 30, 61, 200, 45, 45, 120, 8, 77, 150]
    assert training.packed_rows(lengths, 0) == [list(range(10))]  # one row, the batch's order
    groups = training.packed_rows(lengths, 300)  # 977 tokens: ceil(977 / 300) = 4 rows
    assert len(groups) == 4
    assert sorted(i for g in groups for i in g) == list(range(10))
    assert all(g == sorted(g) for g in groups)
    fills = [sum(lengths[i] for i in g) for g in groups]
    assert max(fills) - min(fills) <= max(lengths)  # longest first into the emptiest: level to one sample
    assert max(fills) <= 300
    # rows shorter than the longest sample are widened to it: 977 / 241 -> 5 rows, not 977 / 100 -> 10
    assert len(training.packed_rows(lengths, 100)) == 5
    assert training.packed_rows([50], 10) == [[0]]


def test_rows_of_packed_row_tokens_give_the_same_loss_gradients_and_count(setup):
    """Several packed rows (train.packed_row_tokens): each sample whole in one row, positions restarting per
    sample, the rows padded to one width with masked blocks; loss, gradients and the throughput count those
    of the one-row packing."""
    import copy

    from hunyuan_lora.callbacks import BatchCounter

    base, features, model, tokenizer = setup
    cfg = copy.deepcopy(base)
    cfg.train.packing, cfg.train.pad_to_multiple_of = True, 8
    one_row = training.make_collator(cfg, tokenizer)(features)
    lengths = [len(f["input_ids"]) for f in features]
    cfg.train.packed_row_tokens = max(lengths)
    rows = training.make_collator(cfg, tokenizer)(features)
    groups = training.packed_rows(lengths, max(lengths))
    width = -(-max(sum(lengths[i] for i in g) for g in groups) // 8) * 8
    assert rows["input_ids"].shape == (len(groups), width)
    assert len(groups) > 1
    for r, group in enumerate(groups):
        used = sum(lengths[i] for i in group)
        want = torch.cat([torch.tensor(features[i]["input_ids"]) for i in group])
        assert torch.equal(rows["input_ids"][r, :used], want)  # whole samples, in the batch's order
        assert (rows["position_ids"][r, :used] == 0).sum() == len(group)
        assert rows["attention_mask"][r, :used].all()
        assert rows["attention_mask"][r, used:].sum() == 0
        assert (rows["labels"][r, used:] == -100).all()

    loss_one, grad_one = loss_and_grads(model, one_row)
    loss_rows, grad_rows = loss_and_grads(model, rows)
    torch.testing.assert_close(loss_rows, loss_one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_rows, grad_one, rtol=1e-4, atol=1e-7)

    counter = BatchCounter()
    model.train()
    try:
        counter.count(model, (), rows)
    finally:
        model.eval()
    assert counter.take() == (len(features), sum(lengths))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.packed_row_tokens=-1"], "train.packed_row_tokens is -1: 0 (one row) or more"),
        (["train.packed_row_tokens=512"], "train.packed_row_tokens splits packed micro-batches into rows"),
    ],
)
def test_packed_row_tokens_is_checked(overrides, message):
    from hunyuan_lora.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        config.load(REPO / "configs/demo.yaml", ["train.packing=false", *overrides])
