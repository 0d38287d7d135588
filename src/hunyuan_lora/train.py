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
import math
import platform
import time
from pathlib import Path

import torch

from . import scale
from .atomic import staging_dir, write_json
from .callbacks import EndIfComplete, ResumedComplete, SaveOnSignal, swanlab_callbacks
from .checkpoints import (
    check_optimizer_layout,
    published_from,
    require_finite_adapter,
    set_aside,
    set_aside_previous_run,
    whole_run_loss,
)
from .config import Config
from .loss_plot import plot_loss
from .modeling import load_base_model, load_tokenizer
from .preflight import preflight
from .runtime import Placement, git_commit, is_main_process, mask_git_remote, package_versions
from .tracking import finish_crashed, swanlab_mode
from .training import TrainingDiverged, attach_lora, build_trainer, training_arguments


def run(cfg: Config) -> Path:
    from datasets import load_from_disk
    from transformers import set_seed
    from transformers.trainer_utils import TrainOutput

    out = cfg.output_dir
    # ---- fail fast: everything cheap before the weights load (`make check`'s table) -------------
    plan = preflight(cfg, stage="train")
    where = plan.placement  # device, dtype, launcher, device_map: decided there, used everywhere below
    if finished(cfg, plan):
        print(
            f"already complete: {plan.resume.path} is the last step ({plan.steps}) and {out / 'adapter'} is "
            "published; nothing changed (train.resume=never starts over, the earlier run set aside)"
        )
        return out / "adapter"
    resume = prepare_output(cfg, plan.resume)
    set_seed(cfg.run.seed)
    started = time.time()

    # ---- data and tokenizer --------------------------------------------------------------------
    splits = load_from_disk(str(out / "data"))
    stats = json.loads((out / "data" / "stats.json").read_text(encoding="utf-8"))
    tokenizer = load_tokenizer(cfg.model.dir)

    # ---- arguments BEFORE the model: under ZeRO-3 they make from_pretrained load sharded --------
    args = training_arguments(cfg, where)
    main_process = args.process_index == 0  # one process unless `accelerate launch` started several

    # ---- model + LoRA, Trainer -----------------------------------------------------------------
    model = attach_lora(cfg, load_base_model(cfg, where).model, where)
    if resume:
        check_optimizer_layout(resume, model)
    trainable, total = model.get_nb_trainable_parameters()
    print(
        f"LoRA {cfg.lora.targets()} r={cfg.lora.r}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.3f} %), {where.device}, {where.dtype}, quantization {cfg.model.quantization}, "
        f"process {args.process_index + 1} of {args.world_size}"
    )
    stop = SaveOnSignal()  # Ctrl-C / SIGTERM: checkpoint, then stop
    mode = swanlab_mode(cfg) if main_process else "disabled"  # one SwanLab experiment per run
    callbacks = [EndIfComplete(), stop, *swanlab_callbacks(cfg, mode, stats, trainable, total, tokenizer)]
    trainer = build_trainer(cfg, model, tokenizer, splits, args, callbacks)

    # ---- train -----------------------------------------------------------------------------------
    if resume:
        print(f"resuming from {resume}")
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except ResumedComplete:  # killed after its last checkpoint, before publishing: publish that checkpoint
        print(f"{resume} is the run's last step: publishing it, no step trained")
        result = TrainOutput(trainer.state.global_step, math.nan, {})
    except TrainingDiverged as e:
        if main_process:  # the log up to the step before, and the experiment closed with the reason
            write_json(out / "log_history.json", trainer.state.log_history)
            plot_loss(trainer.state.log_history, out / "loss.png")
            finish_crashed(out, e.what)
        raise
    if main_process:
        write_json(out / "log_history.json", trainer.state.log_history)
        plot_loss(trainer.state.log_history, out / "loss.png")
    if stop.received:
        raise SystemExit(
            f"stopped by {stop.received} at step {trainer.state.global_step}; the checkpoint is "
            f"{out / f'checkpoint-{trainer.state.global_step}'}: rerun the same `make train` to "
            "continue from it"
        )

    # ---- publish: adapter + its manifest and config in one rename, then the top-level copies ----
    manifest = run_manifest(cfg, stats, where, args, trainable, total, resume, plan.resume.step, trainer, result, mode)
    manifest["wall_time_s"] = round(time.time() - started, 1)
    adapter = publish_adapter(cfg, model, tokenizer, manifest, main_process)
    if main_process:
        print(
            f"adapter saved to {adapter}; train_loss {manifest['train_loss']:.4f} over "
            f"{trainer.state.global_step} steps; SwanLab ({mode}): "
            + (f"{out / 'swanlog'} (`make watch`)" if mode == "local" else mode)
        )
    return adapter


def finished(cfg: Config, plan) -> bool:
    """The resume point is the run's last step and its adapter was published: nothing to do."""
    point = plan.resume
    return bool(
        point.path and plan.steps is not None and point.step >= plan.steps and published_from(cfg.output_dir, point)
    )


def prepare_output(cfg: Config, point) -> str | None:
    """Act on what the preflight reported (main process only; the others read): an earlier run set
    aside when this one starts over, incomplete checkpoints set aside, a credential in the git
    remote URL masked for this process and its children. Returns the checkpoint to resume from."""
    if is_main_process():
        if cfg.train.resume == "never":
            aside = set_aside_previous_run(cfg.output_dir)
            if aside:
                print(
                    f"train.resume: never: the earlier run's checkpoints and log are set aside in {aside}; its "
                    "adapter stays until this run publishes its own"
                )
        for line in set_aside(point.incomplete):
            print(line)
        masked = mask_git_remote()
        if masked:
            print(f"the git remote URL carries a credential: masked for this run as {masked}")
    return point.path


def run_manifest(
    cfg: Config,
    stats: dict,
    where: Placement,
    args,
    trainable: int,
    total: int,
    resume: str | None,
    resumed_at: int,
    trainer,
    result,
    mode: str,
) -> dict:
    """What made this adapter: versions, commit, model revision, data, placement, LoRA, outcome."""
    download_info = Path(cfg.model.dir) / "download.json"
    return {
        "run": cfg.run.name,
        "config_file": cfg.source,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": package_versions(),
        "model_dir": str(cfg.model.dir),
        "model_revision": (
            json.loads(download_info.read_text())
            if download_info.is_file()
            else {"requested": cfg.model.revision, "note": "no download.json in the model folder"}
        ),
        "dataset": {"path": stats["source"], "sha256": stats["sha256"], "examples": stats["examples"]},
        "seed": cfg.run.seed,
        "device": where.device,
        "gpus": (
            [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if where.device == "cuda" else []
        ),
        "dtype": str(where.dtype),
        "quantization": cfg.model.quantization,
        "processes": args.world_size,
        "deepspeed_zero_stage": where.launch.zero_stage,
        "lora": {
            "targets": cfg.lora.targets(),
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "trainable_params": trainable,
            "total_params": total,
        },
        "resumed_from": resume,
        "global_step": trainer.state.global_step,
        "train_loss": whole_run_loss(
            trainer.state.log_history, resumed_at, result.training_loss, trainer.state.global_step
        ),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "swanlab_mode": mode,
    }


def publish_adapter(cfg: Config, model, tokenizer, manifest: dict, main_process: bool) -> Path:
    """<output_dir>/adapter with its own resolved.yaml and manifest.json (one rename), then the
    top-level copies. Every process must call it: under ZeRO-3 gathering the LoRA weights is collective."""
    out = cfg.output_dir
    adapter = out / "adapter"
    with scale.gathered_trainable(model):  # ZeRO-3: the LoRA weights made whole; every rank joins
        if main_process:
            with staging_dir(adapter) as tmp:
                model.save_pretrained(str(tmp))
                require_finite_adapter(tmp, what="the adapter this run trained")  # else nothing is published
                tokenizer.save_pretrained(str(tmp))
                # inside the adapter too: a kill before the top-level copies below (or an adapter
                # folder copied elsewhere alone) still says which run, config and data made it
                cfg.dump(tmp / "resolved.yaml")
                write_json(tmp / "manifest.json", manifest)
    if main_process:
        cfg.dump(out / "resolved.yaml")
        write_json(out / "manifest.json", manifest)
    return adapter
