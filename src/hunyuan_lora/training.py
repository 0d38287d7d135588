"""The Trainer's pieces, shared by the train stage and the probe: arguments, LoRA, collator, Trainer.

where = runtime.placement(cfg)             # or the preflight's plan.placement
args = training_arguments(cfg, where)      # BEFORE the model: under ZeRO-3 it makes from_pretrained shard
model = attach_lora(cfg, load_base_model(cfg, where).model, where)
trainer = build_trainer(cfg, model, tokenizer, splits, args, callbacks)
"""

from __future__ import annotations

import heapq
import json
import math
from pathlib import Path

from .callbacks import CheckpointModes
from .config import Config
from .errors import UserError
from .runtime import Placement


def training_arguments(
    cfg: Config, where: Placement, *, output_dir: str | Path | None = None, max_steps: int | None = None
):
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
    # batches copied to the GPU without waiting for it (from pinned memory, dataloader_pin_memory): a blocking
    # copy waits for the previous step's kernels, and the GPU then idles while the host queues the next step
    accelerator = given.get("accelerator_config")
    if isinstance(accelerator, str) and accelerator.lstrip().startswith("{"):  # --set gives JSON text
        accelerator = json.loads(accelerator)
    if where.device == "cuda" and (accelerator is None or isinstance(accelerator, dict)):  # else a file's path
        given["accelerator_config"] = {"non_blocking": True, **(accelerator or {})}
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
        logging_nan_inf_filter=False,  # its check waits for the GPU every micro-step; DivergenceWatch stops instead
    )


def lora_config(cfg: Config):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        target_modules=cfg.lora.targets(),
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
    )


def attach_lora(cfg: Config, model, where: Placement):
    """The PEFT model: LoRA on lora.targets(), the base frozen (QLoRA: prepared for k-bit training first)."""
    from peft import get_peft_model

    model.config.use_cache = False  # no KV cache while training (and gradient checkpointing needs none)
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # QLoRA: freezes the 4-bit base, casts the unquantised rest (norms, embedding/lm_head, router)
        # to fp32 for stable gradients, enables input gradients for checkpointing.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    model = get_peft_model(model, lora_config(cfg))
    wrapped_router = [n for n, _ in model.named_modules() if n.endswith("mlp.gate.lora_A")]
    assert not wrapped_router, f"LoRA must never wrap the router: {wrapped_router[:3]}"
    if cfg.model.moe_impl == "fast" and not where.zero3:
        from .hunyuan.fast_moe import stack_expert_lora

        stack_expert_lora(model)  # one trainable tensor per expert projection, not 2 x 64 (host time per step)
    return model


def make_collator(cfg: Config, tokenizer):
    """Pad to the longest sample, or (train.packing) concatenate the micro-batch into rows: one, or with
    train.packed_row_tokens as many as that many tokens each need; either rounded up to a multiple of
    train.pad_to_multiple_of when set."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    multiple = cfg.train.pad_to_multiple_of or 1
    if not cfg.train.packing:
        return DataCollatorForSeq2Seq(
            tokenizer, padding=True, pad_to_multiple_of=cfg.train.pad_to_multiple_of, label_pad_token_id=-100
        )
    # position_ids restart at 0 per sample; the model turns that into a block-diagonal mask.
    flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=-100)

    def padded(row: dict, width: int) -> dict:
        pad = width - row["input_ids"].shape[1]
        if pad:
            # a block of its own (positions restart at 0), masked out and never a label
            row["input_ids"] = torch.cat([row["input_ids"], torch.full((1, pad), tokenizer.pad_token_id)], 1)
            row["labels"] = torch.cat([row["labels"], torch.full((1, pad), -100)], 1)
            row["position_ids"] = torch.cat([row["position_ids"], torch.arange(pad)[None]], 1)
        row["attention_mask"] = torch.ones(1, width, dtype=torch.long)
        row["attention_mask"][:, width - pad :] = 0
        return row

    def pack(features):
        groups = packed_rows([len(f["input_ids"]) for f in features], cfg.train.packed_row_tokens)
        rows = [flatten([features[i] for i in group]) for group in groups]
        longest = max(row["input_ids"].shape[1] for row in rows)
        width = -(-longest // multiple) * multiple
        if len(rows) == 1 and width == longest:
            return rows[0]  # nothing padded: no mask needed
        rows = [padded(row, width) for row in rows]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    return pack


def packed_rows(lengths: list[int], row_tokens: int) -> list[list[int]]:
    """The samples of each packed row (indices, in their order): one row for row_tokens 0, else
    ceil(total / max(row_tokens, longest)) rows, filled longest first into the emptiest so they end level.

    Packed attention costs the square of a row's length, masked or not: at 64 samples (~3,900 tokens) per step
    on an H200, one row spent 210 ms in attention, eight rows of ~490 tokens 30 ms (bench/NOTES.md)."""
    rows = 1 if not row_tokens else max(1, -(-sum(lengths) // max(row_tokens, max(lengths))))
    if rows == 1:
        return [list(range(len(lengths)))]
    fill = [(0, r) for r in range(rows)]  # a heap of (tokens so far, row)
    groups: list[list[int]] = [[] for _ in range(rows)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        tokens, r = heapq.heappop(fill)
        groups[r].append(i)
        heapq.heappush(fill, (tokens + lengths[i], r))
    return [sorted(g) for g in groups if g]


def trainer_class():
    """HF Trainer with three changes.

    * No empty parameter group under DeepSpeed. Trainer splits the trainable tensors into weight-decay
      and no-decay groups; under LoRA every one decays, so the no-decay group is empty. DeepSpeed drops
      empty groups from the optimizer it wraps while the LR scheduler keeps one learning rate per
      original group, and torch >= 2.9's scheduler zips the two strictly (fails at the first step).
      Only under DeepSpeed, whose checkpoints never held the empty group: elsewhere the optimizer
      state of existing checkpoints must still load.
    * Its per-step bookkeeping walks the trainable tensors, not the whole model (`walk_trainable_only`).
    * A non-finite loss or gradient norm stops training before anything of that step is logged or saved:
      TrainingDiverged (a UserError) says where and why. The stock Trainer logs a NaN loss as the mean of the
      earlier ones (logging_nan_inf_filter, off here) and carries on. The values are checked on the GPU
      (DivergenceWatch), so no step waits for the GPU to finish.
    * train.cuda_graphs: micro-steps replayed from CUDA graphs (step_graphs.py).
    * On the fast path the decoder layers checkpoint through layer_checkpoint.LayerCheckpoint, installed at the
      first micro-step (Trainer.train enables checkpointing anew, after the optimizer is made).
    """
    from transformers import Trainer

    class LoraTrainer(Trainer):
        flos_per_token: int | None = None
        divergence: DivergenceWatch | None = None  # made at first use (watch())
        cuda_graphs = False  # train.cuda_graphs, where it applies (build_trainer)
        step_graphs = None  # its StepGraphs, made with the optimizer
        layer_checkpoint = None  # the fast path's LayerCheckpoint, where it applies (build_trainer)

        def training_step(self, model, inputs, num_items_in_batch=None):
            if self.layer_checkpoint is not None and not self.layer_checkpoint.installed():
                self.layer_checkpoint.install(self.model)
            if self.step_graphs is not None:
                eager = super().training_step
                loss = self.step_graphs.run(
                    lambda batch, items: eager(model, batch, items), self._prepare_inputs(inputs), num_items_in_batch
                )
            else:
                loss = super().training_step(model, inputs, num_items_in_batch)
            self.watch().note(self.state.global_step + 1, "the loss", loss)
            return loss

        def watch(self) -> DivergenceWatch:
            if self.divergence is None:
                self.divergence = DivergenceWatch()
            return self.divergence

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
            # called once per optimizer step, after it and before its log, evaluation and checkpoint
            if grad_norm is not None and not self.args.fp16:  # fp16's loss scaler skips inf steps itself
                self.watch().note(self.state.global_step, "the gradient norm", grad_norm)
            c = self.control
            if c.should_log or c.should_save or c.should_evaluate or c.should_training_stop:
                found = detect_divergence(self.watch(), self.args)
                if found:
                    step, what = found
                    raise diverged(step, self.state.global_step, self.state.max_steps, what, self.args)
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

        def create_optimizer(self):
            optimizer = super().create_optimizer()
            if self.is_deepspeed_enabled:
                optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            else:
                trainable = walk_trainable_only(self.model, optimizer, self.accelerator, keep_grads=self.cuda_graphs)
                if self.cuda_graphs:
                    from .step_graphs import StepGraphs

                    self.step_graphs = StepGraphs(self.model, trainable, self.layer_checkpoint)
            return optimizer

        def floating_point_ops(self, inputs):
            # Trainer asks every micro-step, and the model counts its parameters anew each time
            if not hasattr(self.model, "floating_point_ops"):
                return 0
            if self.flos_per_token is None:
                self.flos_per_token = 6 * self.model.num_parameters(exclude_embeddings=True)
            return self.flos_per_token * self.model.estimate_tokens(inputs)

    return LoraTrainer


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm: training stopped at the first step from there that logs or saves,
    nothing of those steps kept."""


class DivergenceWatch:
    """The first non-finite loss or gradient norm of a run and its step, kept on the values' device: noting one
    is a few kernels and no host sync, so the host keeps queueing the next steps while the GPU works. read()
    syncs once; the Trainer reads where a step is about to be logged, saved or evaluated, and at the last one."""

    KINDS = ("the loss", "the gradient norm")

    def __init__(self):
        self.device_first = None  # (step, kind, value) tensors: step 0 while everything was finite
        self.found: tuple[int, str] | None = None  # what read() found

    def note(self, step: int, kind: str, value) -> None:
        import torch

        if self.found is not None:
            return
        if not torch.is_tensor(value):  # DeepSpeed's norm is a float, for which the host has waited already
            if not math.isfinite(value):
                self.found = self.read() or (step, f"{kind} is {value}")
            return
        value = value.detach().float().sum()
        if self.device_first is None:
            zero = torch.zeros((), device=value.device)
            self.device_first = (zero.long(), zero.long(), zero)
        first_step, first_kind, first_value = self.device_first
        new = ~torch.isfinite(value) & (first_step == 0)
        self.device_first = (
            torch.where(new, step, first_step),
            torch.where(new, self.KINDS.index(kind), first_kind),
            torch.where(new, value, first_value),
        )

    def read(self) -> tuple[int, str] | None:
        """(step, what was not finite) of the first non-finite value noted, or None."""
        import torch

        if self.found is None and self.device_first is not None:
            step, kind, value = torch.stack([t.double() for t in self.device_first]).tolist()
            if step:
                self.found = (int(step), f"{self.KINDS[int(kind)]} is {value}")
        return self.found


def detect_divergence(watch: DivergenceWatch, args) -> tuple[int, str] | None:
    """(step, what) of the first non-finite loss or gradient norm, agreed by every process (they must all stop
    at the same step: a checkpoint under ZeRO-3 is collective); None when all is finite."""
    import torch

    found = watch.read()
    if args.world_size > 1:
        import torch.distributed as dist

        first = torch.tensor([float(found[0]) if found else math.inf], device=args.device)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = first.item()
        if math.isfinite(step) and (found is None or step < found[0]):
            found = (int(step), "the loss or gradient norm of another process is not finite")
    return found


def diverged(step: int, stopped: int, max_steps: int, what: str, args) -> TrainingDiverged:
    """The error for a run that diverged at `step` and stopped at `stopped` (the first step after it to log, save
    or evaluate): the likely cause, the last checkpoint saved before it."""
    from .checkpoints import checkpoints, nonfinite_tensors

    lr = args.learning_rate
    weights = "adapter_model.safetensors"
    good = [
        p
        for p in checkpoints(Path(args.output_dir))
        if int(p.name.split("-")[1]) < step and not ((p / weights).is_file() and nonfinite_tensors(p / weights))
    ]
    last = (
        f"the last checkpoint with finite weights before it is {good[0]} (its adapter loads with "
        f"SET=infer.adapter={good[0]})"
        if good
        else "no checkpoint with finite weights was saved before it"
    )
    return TrainingDiverged(
        f"training diverged at step {step} of {max_steps}: {what}. It stopped "
        + ("there" if stopped == step else f"at step {stopped}, the first after it to log or save")
        + ": nothing of that step or later was logged or saved, no adapter was published (an earlier one stays "
        f"as it was), and {last}",
        fix=f"the likely cause is the learning rate: train.learning_rate={lr:g} is too high for this run (try "
        f"{lr / 10:g} or lower); otherwise the data (look for empty, garbled or extremely long answers in "
        "`make dataset`'s stats.json). Then start over with train.resume=never (a resume would restore the "
        "learning rate saved in the checkpoint)",
    )


def walk_trainable_only(model, optimizer, accelerator, keep_grads: bool = False) -> list:
    """Make Trainer's per-step `model.train()`, gradient clipping over `model.parameters()` and
    `model.zero_grad()` touch what can have a gradient.

    Each walks the whole module tree every step: under PEFT on the real model about 2,300 modules and
    600 bitsandbytes parameters a layer (each attribute of a Params4bit goes through its
    `__torch_function__`, ~3 us). Measured with the FLOP count: ~20 ms of host time per layer and step,
    as long as the fast path's whole layer (bench/NOTES.md). Frozen tensors never get a gradient, so
    clipping and zeroing the optimizer's tensors is the same work; `train()` walks the tree when the
    mode changes (the first call, after `eval()`), not again while already training. keep_grads: zeroing
    keeps the gradient tensors (CUDA graphs add into them). Returns the trainable tensors.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    clip = accelerator.clip_grad_norm_
    accelerator.clip_grad_norm_ = lambda parameters, max_norm, norm_type=2: clip(trainable, max_norm, norm_type)
    model.zero_grad = lambda set_to_none=True: optimizer.zero_grad(set_to_none=set_to_none and not keep_grads)
    module_train, training = model.train, {"all": False}

    def train(mode: bool = True):
        if not (mode and training["all"]):
            module_train(mode)
        training["all"] = bool(mode)
        return model

    model.train = train
    return trainable


def build_trainer(cfg: Config, model, tokenizer, splits, args, callbacks: list):
    """The Trainer over the tokenized splits (eval when the dataset has one)."""
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval", None),
        data_collator=make_collator(cfg, tokenizer),
        callbacks=[*callbacks, CheckpointModes()],
    )
    reentrant = args.gradient_checkpointing_kwargs["use_reentrant"]  # ZeRO-3's (training_arguments)
    if cfg.model.moe_impl == "fast" and args.gradient_checkpointing and not reentrant:
        from .layer_checkpoint import LayerCheckpoint

        trainer.layer_checkpoint = LayerCheckpoint(int(cfg.train.expert_stash_gib * 2**30))
    if cfg.train.cuda_graphs:
        if args.device.type == "cuda" and not args.deepspeed and args.world_size == 1:
            trainer.cuda_graphs = True
        else:
            print("train.cuda_graphs applies to one CUDA GPU without DeepSpeed: this run trains without", flush=True)
    return trainer
