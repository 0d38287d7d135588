"""The Trainer's pieces, shared by the train stage and the probe: arguments, LoRA, collator, Trainer.

    where = runtime.placement(cfg)             # or the preflight's plan.placement
    args = training_arguments(cfg, where)      # BEFORE the model: under ZeRO-3 it makes from_pretrained shard
    model = attach_lora(cfg, load_base_model(cfg, where).model, where)
    trainer = build_trainer(cfg, model, tokenizer, splits, args, callbacks)
"""

from __future__ import annotations

from pathlib import Path

from .callbacks import CheckpointModes
from .config import Config
from .runtime import Placement


def training_arguments(cfg: Config, where: Placement, *, output_dir: str | Path | None = None,
                       max_steps: int | None = None):
    """TrainingArguments: the train: section's fields as given, plus what the project derives from
    its other settings (config.DERIVED_TRAINING_ARGS) and the placement; output_dir / max_steps
    override run.output_dir / train.max_steps."""
    import torch
    from transformers import TrainingArguments

    has_eval = cfg.data.eval_ratio > 0  # the dataset has an eval split exactly then (preflight.check_tokenized)
    given = dict(cfg.train.args)
    given.pop("bf16", None)  # train.bf16 chooses the dtype on a GPU (runtime.placement); the flag follows it
    if max_steps is not None:
        given["max_steps"] = max_steps
    given.setdefault("per_device_eval_batch_size", cfg.train.per_device_train_batch_size)
    given.setdefault("eval_strategy", "steps" if has_eval else "no")
    if has_eval:
        given.setdefault("eval_steps", cfg.train.logging_steps)
    given.setdefault("save_safetensors", True)
    given.setdefault("disable_tqdm", False)
    return TrainingArguments(
        **given,
        output_dir=str(output_dir or cfg.output_dir),
        bf16=where.dtype == torch.bfloat16,
        use_cpu=where.device == "cpu",
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        # ZeRO-3 releases each layer's gathered weights after use; non-reentrant checkpointing then finds
        # them empty on recompute (CheckpointError, shape [0]), so reentrant there.
        gradient_checkpointing_kwargs={"use_reentrant": where.zero3},
        label_names=["labels"],
        report_to="none",  # SwanLab comes as our own callback; "all" would add a second one
    )


def lora_config(cfg: Config):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=cfg.lora.targets(), r=cfg.lora.r,
                      lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)


def attach_lora(cfg: Config, model, where: Placement):
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
    if cfg.model.moe_impl == "fast" and not where.zero3:
        from .hunyuan.fast_moe import stack_expert_lora

        stack_expert_lora(model)  # one trainable tensor per expert projection, not 2 x 64 (host time per step)
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


def trainer_class():
    """HF Trainer with two changes.

    * No empty parameter group under DeepSpeed. Trainer splits the trainable tensors into weight-decay
      and no-decay groups; under LoRA every one decays, so the no-decay group is empty. DeepSpeed drops
      empty groups from the optimizer it wraps while the LR scheduler keeps one learning rate per
      original group, and torch >= 2.9's scheduler zips the two strictly (fails at the first step).
      Only under DeepSpeed, whose checkpoints never held the empty group: elsewhere the optimizer
      state of existing checkpoints must still load.
    * Its per-step bookkeeping walks the trainable tensors, not the whole model (`walk_trainable_only`).
    """
    from transformers import Trainer

    class LoraTrainer(Trainer):
        flos_per_token: int | None = None

        def create_optimizer(self):
            optimizer = super().create_optimizer()
            if self.is_deepspeed_enabled:
                optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            else:
                walk_trainable_only(self.model, optimizer, self.accelerator)
            return optimizer

        def floating_point_ops(self, inputs):
            # Trainer asks every micro-step, and the model counts its parameters anew each time
            if not hasattr(self.model, "floating_point_ops"):
                return 0
            if self.flos_per_token is None:
                self.flos_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return self.flos_per_token * self.model.estimate_tokens(inputs)

    return LoraTrainer


def walk_trainable_only(model, optimizer, accelerator) -> None:
    """Make Trainer's per-step `model.train()`, gradient clipping over `model.parameters()` and
    `model.zero_grad()` touch what can have a gradient.

    Each walks the whole module tree every step: under PEFT on the real model about 2,300 modules and
    600 bitsandbytes parameters a layer (each attribute of a Params4bit goes through its
    `__torch_function__`, ~3 us). Measured with the FLOP count: ~20 ms of host time per layer and step,
    as long as the fast path's whole layer (bench/NOTES.md). Frozen tensors never get a gradient, so
    clipping and zeroing the optimizer's tensors is the same work; `train()` walks the tree when the
    mode changes (the first call, after `eval()`), not again while already training.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = accelerator.clip_grad_norm_
    accelerator.clip_grad_norm_ = lambda parameters, max_norm, norm_type=2: clip(trainable, max_norm, norm_type)
    model.zero_grad = lambda set_to_none=True: optimizer.zero_grad(set_to_none=set_to_none)
    module_train, training = model.train, {"all": False}

    def train(mode: bool = True):
        if not (mode and training["all"]):
            module_train(mode)
        training["all"] = bool(mode)
        return model

    model.train = train


def build_trainer(cfg: Config, model, tokenizer, splits, args, callbacks: list):
    """The Trainer over the tokenized splits (eval when the dataset has one)."""
    return trainer_class()(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"] if "eval" in splits else None,
        data_collator=make_collator(cfg, tokenizer),
        callbacks=[*callbacks, CheckpointModes()],
    )
