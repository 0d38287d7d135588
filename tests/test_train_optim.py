"""train.optim: the config value reaches TrainingArguments(optim=...) and the optimizer Trainer builds.

transformers 4.51.3 accepts adamw_torch_fused on the CPU (its only checks are torch >= 2.0 and no
fp16 on torch 2.0.0) and torch (2.4 and later) has a fused CPU AdamW, so the fused run below really steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hunyuan_lora import config, data, train, training
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_default_is_the_tutorial_optimizer_and_typos_are_rejected():
    assert config.load(REPO / "configs/huanhuan.yaml").train.optim == "adamw_torch"
    assert config.load(overrides=["train.optim=adamw_torch_fused"]).train.optim == "adamw_torch_fused"
    assert config.load(overrides=["train.optim=adafactor"]).train.optim == "adafactor"
    with pytest.raises(
        UserError,
        match=r"'train.optim' is 'adamw_torch_fuse', not one of TrainingArguments' "
        r"choices \(did you mean 'adamw_torch_fused'\?\)",
    ):
        config.load(overrides=["train.optim=adamw_torch_fuse"])


def test_fused_adamw_reaches_the_trainer_and_trains(patched_stand_in, tmp_path, monkeypatch):
    from transformers import Trainer

    seen = {}
    create = Trainer.create_optimizer

    def spy(self):
        optimizer = create(self)
        seen.update(
            args_optim=str(getattr(self.args.optim, "value", self.args.optim)),
            cls=type(optimizer).__name__,
            fused=optimizer.defaults.get("fused"),
        )
        return optimizer

    monkeypatch.setattr(Trainer, "create_optimizer", spy)
    cfg = config.load(
        REPO / "configs/demo.yaml",
        ["train.optim=adamw_torch_fused", "train.max_steps=2", "swanlab.mode=disabled", "train.resume=never"],
        model_dir=str(patched_stand_in),
        output_dir=str(tmp_path / "run"),
    )
    data.run(cfg)
    train.run(cfg)
    assert seen == {"args_optim": "adamw_torch_fused", "cls": "AdamW", "fused": True}
    history = json.loads((cfg.output_dir / "log_history.json").read_text())
    assert history[-1]["step"] == 2
    assert history[-1]["train_loss"] > 0
    assert "optim: adamw_torch_fused" in (cfg.output_dir / "resolved.yaml").read_text()
    shutil.rmtree(cfg.output_dir / "data", ignore_errors=True)


def test_no_empty_parameter_group_so_deepspeed_and_the_lr_scheduler_agree(patched_stand_in, tmp_path):
    """Under LoRA every trainable tensor gets weight decay, so Trainer's no-decay group is empty.
    DeepSpeed's engine drops empty groups in place (`param_groups[:] = [pg ... if len(pg["params"]) != 0]`)
    after the scheduler took one learning rate per group; torch >= 2.9 zips them strictly and a ZeRO-3
    run failed at step 1 on the GPU machine. The project's Trainer builds no empty group."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    cfg = config.load(REPO / "configs/demo.yaml", model_dir=str(patched_stand_in))

    def optimizer_and_scheduler(trainer_cls, deepspeed: bool):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(patched_stand_in), trust_remote_code=True),
            training.lora_config(cfg),
        )
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, weight_decay=0.01)
        trainer = trainer_cls(model=model, args=args)
        trainer.is_deepspeed_enabled = deepspeed  # what `accelerate launch` with a DeepSpeed config sets
        trainer.create_optimizer_and_scheduler(num_training_steps=4)
        return trainer.optimizer, trainer.lr_scheduler

    stock, _ = optimizer_and_scheduler(Trainer, True)
    assert [len(g["params"]) for g in stock.param_groups][-1] == 0  # the precondition this guards against
    # without DeepSpeed the groups stay as Trainer makes them: older checkpoints' optimizer state loads
    plain, _ = optimizer_and_scheduler(training.trainer_class(), False)
    assert [len(g["params"]) for g in plain.param_groups] == [len(g["params"]) for g in stock.param_groups]

    optimizer, scheduler = optimizer_and_scheduler(training.trainer_class(), True)
    assert all(g["params"] for g in optimizer.param_groups)
    n_trainable = sum(len(g["params"]) for g in optimizer.param_groups)
    assert n_trainable == sum(len(g["params"]) for g in stock.param_groups)  # nothing trainable lost
    optimizer.param_groups[:] = [pg for pg in optimizer.param_groups if len(pg["params"]) != 0]  # DeepSpeed's filter
    assert len(list(zip(optimizer.param_groups, scheduler.base_lrs, strict=True))) == len(scheduler.base_lrs)


def test_trainer_bookkeeping_over_trainable_tensors_trains_as_the_stock_trainer(patched_stand_in, tmp_path):
    """LoraTrainer clips, zeroes and counts FLOPs without walking the frozen model each step
    (training.walk_trainable_only): the same losses, gradient norms, total FLOPs and LoRA weights as
    transformers' Trainer on the same seed, and after an evaluation (model.eval()) every module trains again."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    cfg = config.load(REPO / "configs/demo.yaml", model_dir=str(patched_stand_in))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 900, (16, 12), generator=g).tolist()]

    def run(trainer_cls):
        torch.manual_seed(0)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(patched_stand_in), trust_remote_code=True),
            training.lora_config(cfg),
        )
        args = TrainingArguments(
            output_dir=str(tmp_path / trainer_cls.__name__),
            report_to=[],
            use_cpu=True,
            per_device_train_batch_size=4,
            max_steps=4,
            logging_steps=1,
            learning_rate=1e-2,
            max_grad_norm=0.5,
            lr_scheduler_type="constant",
            save_strategy="no",
            seed=0,
        )
        trainer = trainer_cls(
            model=model, args=args, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:4])
        )
        trainer.train()
        trainer.evaluate()
        trainer.model.train()
        states = [m.training for m in trainer.model.modules()]
        lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        return trainer.state, lora, states

    stock, stock_lora, _ = run(Trainer)
    ours, our_lora, states = run(training.trainer_class())
    steps = [(h["loss"], h["grad_norm"]) for h in stock.log_history if "loss" in h]
    assert len(steps) == 4
    assert steps == [(h["loss"], h["grad_norm"]) for h in ours.log_history if "loss" in h]
    assert max(norm for _, norm in steps) > 0.5  # the clipping did something
    assert ours.total_flos == stock.total_flos > 0
    assert our_lora.keys() == stock_lora.keys()
    assert all(torch.equal(our_lora[k], stock_lora[k]) for k in our_lora)
    assert all(states)
