"""Real scale: DeepSpeed ZeRO-3 over several GPUs (via `accelerate launch`) and QLoRA (NF4) on one.

    make train LAUNCH=zero3 NPROC=4 [CONFIG=...]         # accelerate launch + configs/accelerate/zero3.yaml
    make train CONFIG=configs/huanhuan_qlora.yaml        # one process, bitsandbytes NF4 base weights

Three ways to place the 80 B model (README "Which GPUs do I need"):
    device_map   one process, the layers split over the visible GPUs (the tutorial; model.device_map: auto)
    ZeRO-3       one process per GPU, every weight sharded 1/N per GPU and gathered layer by layer
    QLoRA nf4    one process, base weights 4-bit (0.5 byte/param), router and lm_head kept in bf16

`accelerate launch` describes the run to each process through environment variables
(ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_ZERO_STAGE, ..., WORLD_SIZE); everything here reads
them, so the single-process path is untouched when they are absent.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .config import Config
from .errors import UserError

# Linear layers NF4 must leave alone, by the name transformers matches in `llm_int8_skip_modules`
# (a module's own name, or its full dotted path): the router `mlp.gate.wg` (float32 top-8 routing;
# 4-bit noise there changes which experts a token reaches) and the tied lm_head (embedding weights).
QUANT_SKIP_MODULES = ["wg", "lm_head"]
# The decoder's MoE block, by class name: the model folder's remote code and this project's
# hunyuan/ each define their own class object, so the class is found on the loaded model.
MOE_CLASS_NAME = "HunYuanMoE"


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
        raise UserError(f"accelerate config {path} does not exist", where="LAUNCH",
                        fix="use LAUNCH=zero3 or LAUNCH=zero3_offload (configs/accelerate/*.yaml)")
    c = load_config_from_file(path)
    ds = c.deepspeed_config or {}
    return Launch(deepspeed=str(c.distributed_type).endswith("DEEPSPEED"),
                  zero_stage=int(ds["zero_stage"]) if "zero_stage" in ds else None,
                  processes=int(c.num_processes or 1),
                  offload_param=ds.get("offload_param_device", "none") not in ("none", None))


def launch(env: dict[str, str] | None = None) -> Launch:
    """From accelerate launch's environment; else (make check) HL_ACCELERATE_CONFIG + HL_NPROC."""
    env = os.environ if env is None else env
    if "ACCELERATE_USE_DEEPSPEED" not in env and env.get("HL_ACCELERATE_CONFIG"):
        from dataclasses import replace

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
        raise UserError(f"DeepSpeed ZeRO stage {run.zero_stage} is not supported: stages 1-2 keep a full bf16 copy "
                        "of the 160 GB model on every GPU", where="accelerate config (deepspeed_config.zero_stage)",
                        fix="use LAUNCH=zero3 (configs/accelerate/zero3.yaml)")
    if cfg.model.quantization == "nf4" and run.deepspeed:
        raise UserError("model.quantization nf4 under DeepSpeed is not supported here (QLoRA + ZeRO-3 needs "
                        "bnb_4bit_quant_storage and a different loading path)", where="model.quantization",
                        fix="QLoRA runs as one process (`make train CONFIG=configs/huanhuan_qlora.yaml`, no LAUNCH); "
                            "for several GPUs use ZeRO-3 in bf16 (model.quantization: none)")


# ---------------------------------------------------------------------------------------------
# QLoRA


def bnb_config(cfg: Config):
    """The BitsAndBytesConfig for model.quantization (None for none)."""
    if cfg.model.quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,  # the per-block scales quantised too: ~0.127 bit/param saved
        llm_int8_skip_modules=list(QUANT_SKIP_MODULES),  # the name applies to 4-bit too
    )


def skipped_by_quantization(name: str, skip: list[str] | None = None) -> bool:
    """transformers 4.51's rule (integrations/bitsandbytes.py, _replace_with_bnb_linear): a Linear
    stays unquantised when its own name is in the list, or a listed key is its full path or a
    dotted prefix of it."""
    skip = QUANT_SKIP_MODULES if skip is None else skip
    own = name.rsplit(".", 1)[-1]
    return own in skip or any(name == key or (key + ".") in name for key in skip)


# NF4 storage per quantised parameter: 4 bits + one 8-bit absmax per 64-value block + (double
# quantisation) one fp32 scale per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


# ---------------------------------------------------------------------------------------------
# ZeRO-3


def moe_classes(model) -> list[type]:
    """The MoE block class(es) of this model object, found by name (remote code has its own classes)."""
    return sorted({type(m) for m in model.modules() if type(m).__name__ == MOE_CLASS_NAME},
                  key=lambda c: c.__module__)


def set_moe_leaf_modules(model) -> int:
    """Mark every MoE block a ZeRO-3 leaf: its parameters (64 experts + shared + router) are gathered
    together when the block runs, instead of expert by expert as each is called.

    Why: ZeRO-3 gathers a module's parameters with a collective that every rank must join. Ranks
    route their tokens to different experts, so expert-by-expert gathering makes rank 0 wait on
    expert 5 while rank 1 waits on expert 9: a hang. As a leaf, the block's gather is one call on
    every rank. Returns how many modules were marked."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = moe_classes(model)
    if not classes:
        raise UserError(f"no {MOE_CLASS_NAME} module in the loaded model ({type(model).__name__}): ZeRO-3 needs the "
                        "MoE block marked as a leaf, or ranks routing to different experts hang",
                        where="model.dir", fix="load the Hunyuan-A13B folder (auto_map code) or model.moe_impl: fast")
    marked = set_z3_leaf_modules(model, classes)
    return len(marked)


def gathered_trainable(model):
    """Context in which the trainable (LoRA) parameters are whole on every rank under ZeRO-3, so the
    adapter can be saved; a no-op otherwise. Every rank must enter it (it is a collective)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in model.parameters() if p.requires_grad], modifier_rank=None)
