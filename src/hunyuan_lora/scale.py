"""Real scale: QLoRA (NF4) on one GPU, and the model-side pieces of DeepSpeed ZeRO-3 over several.

    make train LAUNCH=zero3 NPROC=4 [CONFIG=...]         # accelerate launch + configs/accelerate/zero3.yaml
    make train CONFIG=configs/huanhuan_qlora.yaml        # one process, bitsandbytes NF4 base weights

Three ways to place the 80 B model (README "Which GPUs do I need"):
    device_map   one process, the layers split over the visible GPUs (the tutorial; model.device_map: auto)
    ZeRO-3       one process per GPU, every weight sharded 1/N per GPU and gathered layer by layer
    QLoRA nf4    one process, base weights 4-bit (0.5 byte/param), router and lm_head kept in bf16

How the process was launched (accelerate's environment) is runtime.launch().
"""

from __future__ import annotations

import contextlib

from .config import Config
from .errors import UserError

# Linear layers NF4 must leave alone, by the name transformers matches in `llm_int8_skip_modules`
# (a module's own name, or its full dotted path): the router `mlp.gate.wg` (float32 top-8 routing;
# 4-bit noise there changes which experts a token reaches) and the tied lm_head (embedding weights).
QUANT_SKIP_MODULES = ["wg", "lm_head"]
# The decoder's MoE block, by class name: the model folder's remote code and this project's
# hunyuan/ each define their own class object, so the class is found on the loaded model.
MOE_CLASS_NAME = "HunYuanMoE"


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
    return sorted({type(m) for m in model.modules() if type(m).__name__ == MOE_CLASS_NAME}, key=lambda c: c.__module__)


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
        raise UserError(
            f"no {MOE_CLASS_NAME} module in the loaded model ({type(model).__name__}): ZeRO-3 needs the "
            "MoE block marked as a leaf, or ranks routing to different experts hang",
            where="model.dir",
            fix="load the Hunyuan-A13B folder (auto_map code) or model.moe_impl: fast",
        )
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
