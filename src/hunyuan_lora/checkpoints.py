"""The Trainer's checkpoint-N folders: list them, tell complete from cut short, choose the resume point.

    point = resume_point(cfg)          # read-only; `make check` reports it, train.run acts on it
    set_aside(point.incomplete)        # train.run only: newer incomplete checkpoints out of the Trainer's way
    set_aside_previous_run(out)        # train.run, resume: never: the earlier run's outputs out of the way
    whole_run_loss(log_history, ...)   # the run's train_loss, also when it was resumed
    check_optimizer_layout(ckpt, model)  # train.run, once the model is built: its optimizer state fits
    require_finite_adapter(folder)     # train before publishing an adapter, merge before using one

resume: auto continues from the newest COMPLETE checkpoint of run.output_dir; never starts at
step 0; a path continues from that checkpoint. A checkpoint trained with other LoRA settings or
another micro-batch size is refused (the Trainer would load it, or skip to the wrong example).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import UserError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a checkpoint of a LoRA run holds when the Trainer finished writing it. trainer_state.json is
# written last (Trainer._save_checkpoint), so a kill while saving leaves it missing or cut short.
CHECKPOINT_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "trainer_state.json",
)
INCOMPLETE_PREFIX = "incomplete-"  # not "checkpoint-*": the Trainer neither resumes from nor rotates it
# What train writes into the output folder (next to data/, the input, and swanlog/, every run's log):
# the published adapter with its config and manifest, replaced only by the next publish (atomic.py),
# and the run's log.
PUBLISHED = ("adapter", "resolved.yaml", "manifest.json")
RUN_LOG = ("log_history.json", "loss.png")
PREVIOUS_RUNS = "previous-runs"  # <output_dir>/previous-runs/<time>/: earlier runs a fresh one set aside
# How a run's trainable LoRA tensors are laid out in its checkpoints' optimizer state; a checkpoint
# resumes only into a run of its own layout (the Trainer fails loading another). The upstream path
# and ZeRO-3 train layout 1; the fast path trains layout 2.
LORA_LAYOUTS = {
    1: "PEFT's own, one A and one B tensor per expert of each expert projection (2 x 64 a projection)",
    2: "one stacked A and one stacked B tensor per expert projection (fast_moe.stack_expert_lora)",
}


@dataclass
class ResumePoint:
    path: str | None  # the checkpoint to continue from; None: step 0
    step: int  # its global_step (0 for none)
    detail: str  # one line for the preflight table
    incomplete: list[Path] = field(default_factory=list)  # newer checkpoints cut short (auto only)


def checkpoint_problem(path: Path) -> str | None:
    """Why a checkpoint-N folder cannot be resumed from, or None when it is complete."""
    expected = CHECKPOINT_FILES
    if (path / "latest").is_file():  # a DeepSpeed checkpoint: weights + optimizer sharded in global_step*/
        tag = (path / "latest").read_text(encoding="utf-8").strip()
        expected = ("adapter_config.json", "trainer_state.json", *([f"{tag}/"] if tag else []))
    missing = [f for f in expected if not ((path / f).is_dir() if f.endswith("/") else (path / f).is_file())]
    if missing:
        return f"{', '.join(missing)} missing"
    try:
        step = int(read_state(path)["global_step"])
    except (ValueError, KeyError, TypeError, OSError):
        return "trainer_state.json is cut short or not valid"
    m = CHECKPOINT_RE.match(path.name)
    if m and int(m[1]) != step:
        return f"trainer_state.json says step {step}"
    return None


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name)[1]), reverse=True)


def settings_mismatch(checkpoint: Path, cfg: Config) -> list[str]:
    """The settings a checkpoint was trained with that differ from the config's."""
    saved = json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))
    problems = []
    if saved.get("r") != cfg.lora.r:
        problems.append(f"r={saved.get('r')} (config: {cfg.lora.r})")
    if saved.get("lora_alpha") != cfg.lora.alpha:
        problems.append(f"alpha={saved.get('lora_alpha')} (config: {cfg.lora.alpha})")
    if sorted(saved.get("target_modules") or []) != sorted(cfg.lora.targets()):
        problems.append(f"targets {sorted(saved.get('target_modules') or [])} (config: {sorted(cfg.lora.targets())})")
    batch = read_state(checkpoint).get("train_batch_size")
    if batch not in (None, cfg.train.per_device_train_batch_size):
        # The Trainer finds its place in the data by counting batches: another batch size resumes
        # at the wrong example (it only warns).
        problems.append(f"per_device_train_batch_size={batch} (config: {cfg.train.per_device_train_batch_size})")
    return problems


def lora_layouts(model) -> dict[int, int]:
    """The LORA_LAYOUTS versions whose tensor count this model's trainable parameters tell, and that count;
    the model's own layout first."""
    from .hunyuan.fast_moe import STACKED_PREFIX

    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    stacked = [p for name, p in trained if name.rpartition(".")[2].startswith(STACKED_PREFIX)]
    if not stacked:
        return {1: len(trained)}
    return {2: len(trained), 1: len(trained) - len(stacked) + sum(len(p) for p in stacked)}


def check_optimizer_layout(checkpoint: str | Path, model) -> None:
    """UserError when the checkpoint's optimizer state holds another number of tensors than the model
    trains (another LORA_LAYOUTS version): the Trainer would fail on loading it. A DeepSpeed checkpoint
    (optimizer sharded in global_step*/) is not checked."""
    path = Path(checkpoint) / "optimizer.pt"
    if not path.is_file():
        return
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    saved = sum(len(group["params"]) for group in state.get("param_groups", []))
    counts = lora_layouts(model)
    layout, trains = next(iter(counts.items()))
    if saved != trains:
        written = next((v for v, n in counts.items() if n == saved), None)
        how = f"LoRA layout {written} ({LORA_LAYOUTS[written]})" if written else "another layout of the LoRA tensors"
        raise UserError(
            f"checkpoint {checkpoint} holds optimizer state for {saved} tensors, this run trains {trains}: it was "
            f"written with {how}, this run trains layout {layout} ({LORA_LAYOUTS[layout]})",
            where="train.resume",
            fix="continue it with the version of the kit (or the model.moe_impl) that wrote it, or set "
            "train.resume=never to start over (the earlier run is set aside, not deleted); its adapter "
            "(infer.adapter=<checkpoint>) loads either way",
        )


def resume_point(cfg: Config) -> ResumePoint:
    """Where training continues from, by train.resume; reads only. UserError for a checkpoint that
    is incomplete (an explicit path) or was trained with other settings."""
    if cfg.train.resume == "never":
        earlier = previous_run(cfg.output_dir)
        return ResumePoint(
            None,
            0,
            "train.resume: never (starts at step 0)"
            + (
                f"; `make train` sets the earlier run's {', '.join(p.name for p in earlier)} aside in "
                f"{cfg.output_dir / PREVIOUS_RUNS}/ (its published adapter stays until this run publishes)"
                if earlier
                else ""
            ),
        )
    incomplete: list[Path] = []
    if cfg.train.resume == "auto":
        chosen = None
        for ckpt in checkpoints(cfg.output_dir):
            if checkpoint_problem(ckpt) is None:
                chosen = ckpt
                break
            incomplete.append(ckpt)
        if chosen is None:
            return ResumePoint(
                None, 0, "auto: no complete checkpoint in the output folder, starts at step 0", incomplete
            )
    else:
        chosen = Path(cfg.train.resume)
        if not chosen.is_dir():
            raise UserError(
                f"checkpoint {chosen} does not exist",
                where="train.resume",
                fix="use auto, never, or the path of a checkpoint-* folder",
            )
        problem = checkpoint_problem(chosen)
        if problem:
            raise UserError(
                f"checkpoint {chosen} is incomplete ({problem}): it was being written when the run was killed",
                where="train.resume",
                fix="point train.resume at a complete checkpoint-N, or use auto (the newest complete one)",
            )
    mismatch = settings_mismatch(chosen, cfg)
    if mismatch:
        raise UserError(
            f"checkpoint {chosen} was trained with other settings: " + ", ".join(mismatch),
            where="train.resume",
            fix="use the settings it was trained with, set train.resume=never to start over, or give the "
            "run another OUTPUT_DIR",
        )
    step = int(read_state(chosen)["global_step"])
    return ResumePoint(str(chosen), step, f"continues from {chosen} (step {step})", incomplete)


def incomplete_notes(point: ResumePoint) -> list[str]:
    """One line per incomplete checkpoint and what `make train` does with it."""
    return [
        f"{p.name} is incomplete ({checkpoint_problem(p)}; killed while saving?): `make train` sets it aside as "
        f"{aside_name(p).name}"
        for p in point.incomplete
    ]


def aside_name(ckpt: Path) -> Path:
    """incomplete-checkpoint-N (.1, .2, ... when that exists already)."""
    dest, n = ckpt.with_name(INCOMPLETE_PREFIX + ckpt.name), 1
    while dest.exists():
        dest, n = ckpt.with_name(f"{INCOMPLETE_PREFIX}{ckpt.name}.{n}"), n + 1
    return dest


def set_aside(incomplete: list[Path]) -> list[str]:
    """Rename each incomplete checkpoint out of the Trainer's way (it neither resumes from nor
    rotates incomplete-checkpoint-N); returns one line per rename."""
    lines = []
    for ckpt in incomplete:
        problem, dest = checkpoint_problem(ckpt), aside_name(ckpt)
        os.replace(ckpt, dest)
        lines.append(f"{ckpt.name} is incomplete ({problem}; killed while saving?): set aside as {dest.name}")
    return lines


# ---------------------------------------------------------------------------------------------
# an adapter's values


def nonfinite_tensors(weights: Path) -> dict[str, int]:
    """Tensor name -> how many of its values are inf or nan, for the tensors of one safetensors file
    that have any (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    found = {}
    with safe_open(str(weights), "pt") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            if tensor.is_floating_point():
                bad = int(tensor.numel() - torch.isfinite(tensor).sum())
                if bad:
                    found[name] = bad
    return found


def require_finite_adapter(folder: Path, what: str | None = None) -> None:
    """UserError when the adapter in `folder` holds an inf or nan: what a diverged run saves, and what
    makes every answer of the model garbage (NUL characters). `what` names it in the message."""
    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a sharded or DeepSpeed-only folder: the loaders name what is missing
    bad = nonfinite_tensors(weights)
    if bad:
        names = sorted(bad, key=bad.get, reverse=True)
        raise UserError(
            f"{what or weights} holds non-finite values (inf or nan) in {len(bad)} tensor(s), e.g. "
            f"{names[0]} ({bad[names[0]]:,} values): the training that made it diverged",
            where=str(folder),
            fix="train again with a lower train.learning_rate and train.resume=never; `make train` stops "
            "at the step where the loss or gradient norm stops being finite and names it",
        )


# ---------------------------------------------------------------------------------------------
# a fresh run in a used output folder


def previous_run(out: Path) -> list[Path]:
    """What a fresh run sets aside of an earlier one: its checkpoints and log. Its published adapter
    (PUBLISHED) stays where `make infer` finds it until the new run's publish replaces it in one rename."""
    if not out.is_dir():
        return []
    found = [
        p
        for p in out.iterdir()
        if CHECKPOINT_RE.match(p.name) or p.name.startswith(INCOMPLETE_PREFIX) or p.name in RUN_LOG
    ]
    return sorted(found, key=lambda p: p.name)


def set_aside_previous_run(out: Path) -> Path | None:
    """Move an earlier run's checkpoints and log into <out>/previous-runs/<time>/, so a fresh run
    neither resumes from nor rotates them; None when there was nothing."""
    import time

    earlier = previous_run(out)
    if not earlier:
        return None
    dest = out / PREVIOUS_RUNS / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():
        dest, n = dest.with_name(f"{dest.name.split('.')[0]}.{n}"), n + 1
    dest.mkdir(parents=True)
    for p in earlier:
        os.replace(p, dest / p.name)
    return dest


def published_from(out: Path, point: ResumePoint) -> bool:
    """The adapter in <out> was published from this checkpoint's run: its manifest is at the same
    step and newer than the checkpoint (a fresh run's checkpoints are newer than an earlier adapter)."""
    manifest = out / "adapter" / "manifest.json"
    if not (point.path and manifest.is_file()):
        return False
    state = Path(point.path) / "trainer_state.json"
    try:
        step = json.loads(manifest.read_text(encoding="utf-8")).get("global_step")
    except (OSError, ValueError):
        return False
    return step == point.step and manifest.stat().st_mtime >= state.stat().st_mtime


# ---------------------------------------------------------------------------------------------
# the run's loss


def whole_run_loss(log_history: list[dict], resumed_at: int, session_loss: float, global_step: int) -> float:
    """The mean training loss over the whole run, also when it resumed at step resumed_at.

    The Trainer's own train_loss divides the loss of THIS process's steps by all steps, so after a
    resume it is too low. Its log history (restored from the checkpoint) holds the mean loss of
    every logging interval of the run; the steps this session ran after its last log are what its
    session_loss (x global_step: this session's summed step losses) has beyond its logged intervals.
    Steps before the resume point that no log covered are left out of the mean."""
    total = covered = 0.0
    session_logged = 0.0
    last = 0
    for entry in sorted((e for e in log_history if "loss" in e and "step" in e), key=lambda e: e["step"]):
        start = resumed_at if last < resumed_at < entry["step"] else last  # the first log after the resume
        steps = entry["step"] - start
        total, covered = total + entry["loss"] * steps, covered + steps
        if entry["step"] > resumed_at:
            session_logged += entry["loss"] * steps
        last = entry["step"]
    tail = global_step - max(last, resumed_at)
    if tail > 0:
        total += session_loss * global_step - session_logged
        covered += tail
    return total / covered if covered else session_loss
