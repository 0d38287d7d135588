"""How this process runs: device, dtype, launcher (accelerate / DeepSpeed ZeRO-3), which process
it is, and the versions and commit the outputs record.

    where = placement(cfg)    # device, dtype, launcher, device_map: decided once, passed down
    run = launch()            # accelerate launch's environment (or `make check LAUNCH=zero3 NPROC=4`)
    is_main_process()         # rank 0 of `accelerate launch`, or the only process

`accelerate launch` describes the run to each process through environment variables
(ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ..., WORLD_SIZE, RANK); everything here
reads them, so the single-process path is untouched when they are absent.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .config import Config
from .errors import UserError

# What the manifest and SwanLab's config record as the stack of a run.
PINNED_PACKAGES = [
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "modelscope",
    "swanlab",
    "tiktoken",
    "deepspeed",
    "bitsandbytes",
]


# The oldest Linux driver of each CUDA release torch may be built for (NVIDIA's CUDA Toolkit release
# notes, "CUDA Toolkit and Corresponding Driver Versions"): what the message names as the fix.
MIN_DRIVER = {"12.8": "570.26", "12.9": "575.51.03", "13.0": "580.65.06"}


@dataclass(frozen=True)
class Driver:
    """The machine's NVIDIA driver, as NVML reports it."""

    version: str  # e.g. 580.95.05
    cuda: tuple[int, int]  # the newest CUDA it runs, e.g. (13, 0)


def nvidia_driver() -> Driver | None:
    """The NVIDIA driver of this machine (NVML), None on a machine without one."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no libnvidia-ml / no driver loaded: a CPU machine
        return None
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()  # 13000 for CUDA 13.0
    finally:
        pynvml.nvmlShutdown()
    return Driver(version.decode() if isinstance(version, bytes) else version, (cuda // 1000, cuda % 1000 // 10))


def is_main_process() -> bool:
    """The process that prints, writes the outputs and talks to SwanLab (accelerate sets RANK)."""
    return os.environ.get("RANK", "0") == "0"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PINNED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------
# secrets: SwanLab records the git remote URL


def _strip_userinfo(url: str) -> str | None:
    """The URL without user:password@ when it has one (https, http); None when there is none."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or "@" not in parts.netloc:
        return None
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def mask_git_remote(cwd: str | Path | None = None, apply: bool = True) -> str | None:
    """SwanLab stores `git config --get remote.origin.url` of the working folder in its metadata (and
    uploads it in cloud mode). When that URL carries a credential (https://user:TOKEN@host/...),
    override it for this process and its children through git's GIT_CONFIG_COUNT variables (highest
    precedence, nothing written to .git/config). Returns the masked URL, or None when nothing to mask."""
    try:
        url = subprocess.run(
            ["git", "config", "--get", "remote.origin.url"], capture_output=True, text=True, timeout=10, cwd=cwd
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    masked = _strip_userinfo(url) if url else None
    if masked and apply:
        n = int(os.environ.get("GIT_CONFIG_COUNT", "0") or 0)
        os.environ.update(
            {
                "GIT_CONFIG_COUNT": str(n + 1),
                f"GIT_CONFIG_KEY_{n}": "remote.origin.url",
                f"GIT_CONFIG_VALUE_{n}": masked,
            }
        )
    return masked


# ---------------------------------------------------------------------------------------------
# the launcher


@dataclass(frozen=True)
class Launch:
    """How this process was started (from accelerate launch's environment)."""

    deepspeed: bool
    zero_stage: int | None
    processes: int  # WORLD_SIZE: all processes of the run, every machine
    offload_param: bool  # ZeRO-3 keeps the sharded weights in host RAM

    @property
    def zero3(self) -> bool:
        return self.deepspeed and self.zero_stage == 3


def accelerate_config(path: str) -> Launch:
    """What `accelerate launch --config_file path` would tell each process, read with accelerate's own
    loader (for `make check LAUNCH=zero3 NPROC=4`, which runs one process and launches nothing)."""
    from accelerate.commands.config.config_args import load_config_from_file

    if not os.path.isfile(path):
        raise UserError(
            f"accelerate config {path} does not exist",
            where="LAUNCH",
            fix="use LAUNCH=zero3 or LAUNCH=zero3_offload (configs/accelerate/*.yaml)",
        )
    c = load_config_from_file(path)
    ds = c.deepspeed_config or {}
    return Launch(
        deepspeed=str(c.distributed_type).endswith("DEEPSPEED"),
        zero_stage=int(ds["zero_stage"]) if "zero_stage" in ds else None,
        processes=int(c.num_processes or 1),
        offload_param=ds.get("offload_param_device", "none") not in ("none", None),
    )


def launch(env: dict[str, str] | None = None) -> Launch:
    """From accelerate launch's environment; else (make check) HL_ACCELERATE_CONFIG + HL_NPROC."""
    env = os.environ if env is None else env
    if "ACCELERATE_USE_DEEPSPEED" not in env and env.get("HL_ACCELERATE_CONFIG"):
        planned = accelerate_config(env["HL_ACCELERATE_CONFIG"])
        return replace(planned, processes=int(env.get("HL_NPROC") or planned.processes))
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return Launch(
        deepspeed=deepspeed,
        zero_stage=int(stage) if deepspeed and stage else None,
        processes=int(env.get("WORLD_SIZE", "1") or 1),
        offload_param=deepspeed and env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none") not in ("none", ""),
    )


def check_combination(cfg: Config, run: Launch) -> None:
    """The combinations this project supports; UserError naming the fix for the rest."""
    if run.deepspeed and run.zero_stage != 3:
        raise UserError(
            f"DeepSpeed ZeRO stage {run.zero_stage} is not supported: stages 1-2 keep a full bf16 copy "
            "of the 160 GB model on every GPU",
            where="accelerate config (deepspeed_config.zero_stage)",
            fix="use LAUNCH=zero3 (configs/accelerate/zero3.yaml)",
        )
    if cfg.model.quantization == "nf4" and run.deepspeed:
        raise UserError(
            "model.quantization nf4 under DeepSpeed is not supported here (QLoRA + ZeRO-3 needs "
            "bnb_4bit_quant_storage and a different loading path)",
            where="model.quantization",
            fix="QLoRA runs as one process (`make train CONFIG=configs/huanhuan_qlora.yaml`, no LAUNCH); "
            "for several GPUs use ZeRO-3 in bf16 (model.quantization: none)",
        )


# ---------------------------------------------------------------------------------------------
# the placement


@dataclass(frozen=True)
class Placement:
    """Where the model goes and in which dtype: decided once per process (placement(cfg)) and passed
    to everything that builds TrainingArguments, loads a model or checks memory."""

    device: str  # "cuda" or "cpu" (model.device with auto resolved)
    dtype: Any  # torch.dtype of the weights that are not quantised, and of the compute
    launch: Launch
    device_map: str | dict | None  # from_pretrained's device_map; None: loaded whole, then .to(device) (or ZeRO-3)

    @property
    def zero3(self) -> bool:
        return self.launch.zero3


def placement(cfg: Config, run: Launch | None = None) -> Placement:
    """model.device (auto: a GPU when one is visible), model.dtype (auto: bfloat16 on a GPU with
    train.bf16, float32 elsewhere), the launcher (launch() unless given) and the device_map: the
    config's over the visible GPUs, the current GPU for NF4 (4-bit weights are placed at load), none
    under DeepSpeed (ZeRO-3 shards) or on the CPU."""
    import torch

    if cfg.model.device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "model.device is 'cuda' but no CUDA GPU is visible",
            where="model.device",
            fix="check `nvidia-smi` / CUDA_VISIBLE_DEVICES, or set model.device: auto",
        )
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.model.device == "auto" else cfg.model.device
    if cfg.model.dtype != "auto":
        dtype = getattr(torch, cfg.model.dtype)
    else:
        dtype = torch.bfloat16 if device == "cuda" and cfg.train.bf16 else torch.float32
    run = launch() if run is None else run
    device_map = None
    if device == "cuda" and not run.deepspeed and (cfg.model.device_map or cfg.model.quantization != "none"):
        device_map = cfg.model.device_map or {"": torch.cuda.current_device()}
    return Placement(device=device, dtype=dtype, launch=run, device_map=device_map)
