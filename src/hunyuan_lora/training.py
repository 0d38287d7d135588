"""The Trainer's pieces, shared by the train stage and the probe: arguments, LoRA, collator, Trainer.

    args = training_arguments(cfg)             # BEFORE the model: under ZeRO-3 it makes from_pretrained shard
    model = attach_lora(cfg, load_base_model(cfg, device, dtype))
    trainer = build_trainer(cfg, model, tokenizer, splits, args, callbacks)
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .config import Config
from .runtime import launch, pick_device, pick_dtype


def training_arguments(cfg: Config, *, output_dir: str | Path | None = None, max_steps: int | None = None):
    """TrainingArguments from the config; output_dir / max_steps override run.output_dir / train.max_steps."""
    import torch
    from transformers import TrainingArguments

    device = pick_device(cfg)
    has_eval = cfg.data.eval_ratio > 0  # the dataset has an eval split exactly then (check.check_tokenized)
    return TrainingArguments(
        output_dir=str(output_dir or cfg.output_dir),
        per_device_train_batch_size=cfg.train.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.train.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        num_train_epochs=cfg.train.num_train_epochs,
        max_steps=cfg.train.max_steps if max_steps is None else max_steps,
        learning_rate=cfg.train.learning_rate,
        lr_scheduler_type=cfg.train.lr_scheduler_type,
        optim=cfg.train.optim,
        warmup_ratio=cfg.train.warmup_ratio,
        logging_steps=cfg.train.logging_steps,
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.train.logging_steps if has_eval else None,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        # ZeRO-3 releases each layer's gathered weights after use; non-reentrant checkpointing then finds
        # them empty on recompute (CheckpointError, shape [0]), so reentrant there.
        gradient_checkpointing_kwargs={"use_reentrant": launch().zero3},
        bf16=pick_dtype(cfg, device) == torch.bfloat16,
        use_cpu=device == "cpu",
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        dataloader_num_workers=cfg.train.dataloader_num_workers,
        label_names=["labels"],
        report_to="none",  # SwanLab comes as our own callback; "all" would add a second one
        save_safetensors=True,
        disable_tqdm=False,
    )


def lora_config(cfg: Config):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=cfg.lora.targets(), r=cfg.lora.r,
                      lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)


def attach_lora(cfg: Config, model):
    """The PEFT model: LoRA on lora.targets(), the base frozen (QLoRA: prepared for k-bit training first)."""
    from peft import get_peft_model

    model.config.use_cache = False  # no KV cache while training (and gradient checkpointing needs none)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # QLoRA: freezes the 4-bit base, casts the unquantised rest (norms, embedding/lm_head, router)
        # to fp32 for stable gradients, enables input gradients for checkpointing.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, lora_config(cfg))
    wrapped_router = [n for n, _ in model.named_modules() if n.endswith("mlp.gate.lora_A")]
    assert not wrapped_router, f"LoRA must never wrap the router: {wrapped_router[:3]}"
    return model


def make_collator(cfg: Config, tokenizer):
    """Pad to the longest sample, or (train.packing) concatenate the micro-batch into one row;
    either rounded up to a multiple of train.pad_to_multiple_of when set."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    multiple = cfg.train.pad_to_multiple_of
    if not cfg.train.packing:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=multiple, label_pad_token_id=-100)
    # position_ids restart at 0 per sample; the model turns that into a block-diagonal mask.
    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)
    if not multiple:
        return flatten

    def pack_and_pad(features):
        batch = flatten(features)
        length = batch["input_ids"].shape[1]
        pad = -length % multiple
        if pad:
            # a block of its own (positions restart at 0), masked out and never a label
            batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, pad), tokenizer.pad_token_id)], 1)
            batch["labels"] = torch.cat([batch["labels"], torch.full((1, pad), -100)], 1)
            batch["position_ids"] = torch.cat([batch["position_ids"], torch.arange(pad)[None]], 1)
            batch["attention_mask"] = torch.cat([torch.ones(1, length, dtype=torch.long),
                                                 torch.zeros(1, pad, dtype=torch.long)], 1)
        return batch

    return pack_and_pad


def make_sigterm_callback():
    """`docker stop` and cloud pre-emption send SIGTERM: save a checkpoint, then stop."""
    from transformers import TrainerCallback

    class SaveOnSigterm(TrainerCallback):
        received = False

        def __init__(self):
            signal.signal(signal.SIGTERM, self._on_signal)

        def _on_signal(self, signum, frame):
            # Flag first, and no print(): the handler runs inside whatever the main thread is doing,
            # and a print() landing inside another print() raises "reentrant call" (run lost, no save).
            self.received = True
            os.write(2, b"SIGTERM received: saving a checkpoint after this step, then stopping\n")

        def on_step_end(self, args, state, control, **kwargs):
            if self.received:
                control.should_save = True
                control.should_training_stop = True

    return SaveOnSigterm()


def trainer_class():
    """HF Trainer whose optimizer has no empty parameter group under DeepSpeed.

    Trainer splits the trainable tensors into weight-decay and no-decay groups; under LoRA every one
    decays, so the no-decay group is empty. DeepSpeed drops empty groups from the optimizer it wraps
    while the LR scheduler keeps one learning rate per original group, and torch >= 2.9's scheduler
    zips the two strictly (fails at the first step). Only under DeepSpeed, whose checkpoints never
    held the empty group: elsewhere the optimizer state of existing checkpoints must still load.
    """
    from transformers import Trainer

    class LoraTrainer(Trainer):
        def create_optimizer(self):
            optimizer = super().create_optimizer()
            if self.is_deepspeed_enabled:
                optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            return optimizer

    return LoraTrainer


def build_trainer(cfg: Config, model, tokenizer, splits, args, callbacks: list):
    """The Trainer over the tokenized splits (eval when the dataset has one)."""
    return trainer_class()(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"] if "eval" in splits else None,
        data_collator=make_collator(cfg, tokenizer),
        callbacks=callbacks,
    )
