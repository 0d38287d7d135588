"""Stage 4, train: LoRA on the model folder with HF Trainer, tracked in SwanLab.

    make train [CONFIG=configs/huanhuan.yaml] [MODEL_DIR=...] [OUTPUT_DIR=...]

Reads <output_dir>/data (from `make dataset`); writes to <output_dir>/:
    checkpoint-*/        Trainer checkpoints (resume: auto continues from the last one)
    adapter/             the final LoRA adapter (PEFT format) + tokenizer files + its own copies of
                         resolved.yaml and manifest.json, published together in one rename
    resolved.yaml        the config this run used
    manifest.json        versions, git commit, model revision, dataset sha256, seed, time, speed
    log_history.json     the Trainer's log (loss per logging step)
    swanlog/             SwanLab's local store (when not in cloud mode)
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

from . import check, scale, tracking
from .atomic import staging_dir, write_json
from .config import Config
from .errors import UserError

PINNED_PACKAGES = ["torch", "transformers", "peft", "accelerate", "datasets", "modelscope", "swanlab", "tiktoken",
                   "deepspeed", "bitsandbytes"]


# ---------------------------------------------------------------------------------------------
# pieces other stages share


def pick_device(cfg: Config) -> str:
    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is 'cuda' but no CUDA GPU is visible", where="model.device",
                        fix="check `nvidia-smi` / CUDA_VISIBLE_DEVICES, or set model.device: auto")
    if cfg.model.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.model.device


def pick_dtype(cfg: Config, device: str) -> torch.dtype:
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    return torch.bfloat16 if device == "cuda" and cfg.train.bf16 else torch.float32


def load_base_model(cfg: Config, device: str, dtype: torch.dtype):
    """The folder's own code (model.moe_impl: upstream) or the project's fast implementation.

    Under `accelerate launch` with ZeRO-3 (scale.launch()) no device_map: TrainingArguments, built
    before this call, has told from_pretrained to load inside deepspeed.zero.Init, which shards every
    weight 1/N over the processes; the MoE blocks are then marked ZeRO-3 leaf modules."""
    from transformers import AutoModelForCausalLM

    launch = scale.launch()
    kwargs = {"torch_dtype": dtype}
    quantization = scale.bnb_config(cfg)
    if quantization is not None:
        kwargs["quantization_config"] = quantization  # NF4 weights are placed at load; no .to() after
    if device == "cuda" and not launch.deepspeed and (cfg.model.device_map or quantization is not None):
        kwargs["device_map"] = cfg.model.device_map or {"": torch.cuda.current_device()}
    if cfg.model.moe_impl == "fast":
        from .hunyuan.configuration_hunyuan import HunYuanConfig
        from .hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

        config = HunYuanConfig.from_pretrained(cfg.model.dir)
        config.moe_impl = "fast"  # read by HunYuanMoE; same state-dict keys as the folder's code
        model = HunYuanMoEV1ForCausalLM.from_pretrained(cfg.model.dir, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.dir, trust_remote_code=True, **kwargs)
    if launch.zero3:
        scale.set_moe_leaf_modules(model)  # without it, ranks routing to different experts hang
        return model  # sharded by zero.Init; the DeepSpeed engine places it
    return model if "device_map" in kwargs else model.to(device)


def swanlab_mode(cfg: Config) -> str:
    """auto: SWANLAB_MODE if set, else cloud with SWANLAB_API_KEY, else local (never a login prompt)."""
    if cfg.swanlab.mode != "auto":
        return cfg.swanlab.mode
    env = os.environ.get("SWANLAB_MODE")
    if env in ("cloud", "local", "disabled"):
        return env
    return "cloud" if os.environ.get("SWANLAB_API_KEY") else "local"


def package_versions() -> dict[str, str]:
    """The pinned stack as installed (the manifest and SwanLab's config both record it)."""
    versions = {}
    for name in PINNED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------


def lora_config(cfg: Config):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=cfg.lora.targets(), r=cfg.lora.r,
                      lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout)


def make_collator(cfg: Config, tokenizer):
    """Pad to the longest sample, or (train.packing) concatenate the micro-batch into one row;
    either rounded up to a multiple of train.pad_to_multiple_of when set."""
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
    """HF Trainer whose optimizer has no empty parameter group.

    Trainer splits the trainable tensors into weight-decay and no-decay groups; under LoRA every one
    decays, so the no-decay group is empty. DeepSpeed drops empty groups from the optimizer it wraps
    while the LR scheduler keeps one learning rate per original group; torch >= 2.9's scheduler zips
    the two strictly and ZeRO-3 runs failed at the first step ("zip() argument 2 is longer than
    argument 1", torch 2.11 on 2 H200s). Dropping them here keeps optimizer and scheduler in step.
    Only under DeepSpeed (whose checkpoints never held the empty group): elsewhere the optimizer
    state of checkpoints written before this fix must still load.
    """
    from transformers import Trainer

    class LoraTrainer(Trainer):
        def create_optimizer(self):
            optimizer = super().create_optimizer()
            if self.is_deepspeed_enabled:
                optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            return optimizer

    return LoraTrainer


def resume_checkpoint(cfg: Config) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if cfg.train.resume == "never":
        return None
    if cfg.train.resume == "auto":
        return get_last_checkpoint(str(cfg.output_dir)) if cfg.output_dir.is_dir() else None
    if not Path(cfg.train.resume).is_dir():
        raise UserError(f"checkpoint {cfg.train.resume} does not exist", where="train.resume",
                        fix="use auto, never, or the path of a checkpoint-* folder")
    return cfg.train.resume


def run(cfg: Config) -> Path:
    from datasets import load_from_disk
    from peft import get_peft_model
    from transformers import AutoTokenizer, TrainingArguments, set_seed

    out = cfg.output_dir
    data_dir = out / "data"
    # ---- fail fast: everything cheap before the weights load (`make check`'s table) -------------
    plan = check.preflight(cfg, stage="train")
    device, dtype, resume = plan.device, plan.dtype, plan.resume
    set_seed(cfg.run.seed)
    started = time.time()

    # ---- data, tokenizer, model + LoRA ---------------------------------------------------------
    splits = load_from_disk(str(data_dir))
    stats = json.loads((data_dir / "stats.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.dir, trust_remote_code=True)

    # ---- trainer arguments BEFORE the model: under accelerate + ZeRO-3 they make from_pretrained
    # load inside deepspeed.zero.Init (sharded), instead of a full 160 GB copy per process -----------
    has_eval = "eval" in splits
    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=cfg.train.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.train.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        num_train_epochs=cfg.train.num_train_epochs,
        max_steps=cfg.train.max_steps,
        learning_rate=cfg.train.learning_rate,
        lr_scheduler_type=cfg.train.lr_scheduler_type,
        optim=cfg.train.optim,  # adamw_torch_fused: up to 2x at micro-batch 4 (config.py, bench/NOTES.md)
        warmup_ratio=cfg.train.warmup_ratio,
        logging_steps=cfg.train.logging_steps,
        save_steps=cfg.train.save_steps,
        save_total_limit=cfg.train.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.train.logging_steps if has_eval else None,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        # ZeRO-3 releases each layer's gathered weights after use; non-reentrant checkpointing then finds
        # them empty on recompute (CheckpointError, shape [0]), so reentrant there.
        gradient_checkpointing_kwargs={"use_reentrant": scale.launch().zero3},
        bf16=dtype == torch.bfloat16,
        use_cpu=device == "cpu",
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        dataloader_num_workers=cfg.train.dataloader_num_workers,
        label_names=["labels"],
        report_to="none",  # SwanLab comes as our own callback; "all" would add a second one
        save_safetensors=True,
        disable_tqdm=False,
    )
    main_process = args.process_index == 0  # one process unless `accelerate launch` started several

    model = load_base_model(cfg, device, dtype)
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
    trainable, total = model.get_nb_trainable_parameters()
    print(f"LoRA {cfg.lora.targets()} r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters "
          f"({100 * trainable / total:.3f} %), {device}, {dtype}, quantization {cfg.model.quantization}, "
          f"process {args.process_index + 1} of {args.world_size}")

    callbacks = [make_sigterm_callback()]
    mode = swanlab_mode(cfg) if main_process else "disabled"  # one SwanLab experiment per run, not per GPU
    # SwanLab: config, throughput, GPU memory, before/after samples ([] when disabled)
    callbacks += tracking.callbacks(cfg, mode, stats, trainable, total, tokenizer)
    trainer = trainer_class()(
        model=model,
        args=args,
        train_dataset=splits["train"],
        eval_dataset=splits["eval"] if has_eval else None,
        data_collator=make_collator(cfg, tokenizer),
        callbacks=callbacks,
    )
    if resume:
        print(f"resuming from {resume}")
    result = trainer.train(resume_from_checkpoint=resume)
    if main_process:
        write_json(out / "log_history.json", trainer.state.log_history)
        tracking.plot_loss(trainer.state.log_history, out / "loss.png")
    if callbacks[0].received:
        raise SystemExit(f"stopped by SIGTERM at step {trainer.state.global_step}; the checkpoint is in {out}; "
                         "rerun `make train` to continue")

    # ---- outputs (the main process writes them): adapter, resolved config, manifest --------------
    adapter = out / "adapter"
    download_info = Path(cfg.model.dir) / "download.json"
    manifest = {
        "run": cfg.run.name,
        "config_file": cfg.source,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "model_dir": str(cfg.model.dir),
        "model_revision": (json.loads(download_info.read_text()) if download_info.is_file()
                           else {"requested": cfg.model.revision, "note": "no download.json in the model folder"}),
        "dataset": {"path": stats["source"], "sha256": stats["sha256"], "examples": stats["examples"]},
        "seed": cfg.run.seed,
        "device": device,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if device == "cuda" else [],
        "dtype": str(dtype),
        "quantization": cfg.model.quantization,
        "processes": args.world_size,
        "deepspeed_zero_stage": scale.launch().zero_stage,
        "lora": {"targets": cfg.lora.targets(), "r": cfg.lora.r, "alpha": cfg.lora.alpha,
                 "dropout": cfg.lora.dropout, "trainable_params": trainable, "total_params": total},
        "resumed_from": resume,
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss,
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "wall_time_s": round(time.time() - started, 1),
        "swanlab_mode": mode,
    }
    with scale.gathered_trainable(model):  # ZeRO-3: the LoRA weights made whole; every rank joins
        if main_process:
            with staging_dir(adapter) as tmp:
                model.save_pretrained(str(tmp))
                tokenizer.save_pretrained(str(tmp))
                # inside the adapter too: a kill before the top-level copies below (or an adapter
                # folder copied elsewhere alone) still says which run, config and data made it
                cfg.dump(tmp / "resolved.yaml")
                write_json(tmp / "manifest.json", manifest)
    if not main_process:
        return adapter
    cfg.dump(out / "resolved.yaml")
    write_json(out / "manifest.json", manifest)
    print(f"adapter saved to {adapter}; train_loss {result.training_loss:.4f} over {trainer.state.global_step} "
          f"steps; SwanLab ({mode}): " + (f"{out / 'swanlog'} (`make watch`)" if mode == "local" else mode))
    return adapter
