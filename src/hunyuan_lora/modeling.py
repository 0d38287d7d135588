"""Loading the model: the base model in every placement, and the base model with a trained adapter.

    model = load_base_model(cfg, device, dtype)                     # the model folder's weights
    model = load_base_model(cfg, device, dtype, weights="random", num_layers=2)   # shapes only (probe)
    model = load_with_adapter(cfg, adapter_dir(cfg))                # base + <output_dir>/adapter, eval mode

Placements (scale.py says when each applies): device_map over the visible GPUs, one device, ZeRO-3
under `accelerate launch` (TrainingArguments, built before this call, makes from_pretrained load
inside deepspeed.zero.Init, which shards every weight 1/N over the processes), NF4 (QLoRA).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from . import scale
from .config import Config
from .errors import UserError
from .runtime import launch, pick_device, pick_dtype


def load_base_model(cfg: Config, device: str, dtype, *, weights: Literal["checkpoint", "random"] = "checkpoint",
                    num_layers: int | None = None):
    """The folder's own code (model.moe_impl: upstream) or the project's implementation (fast).

    weights="random": the architecture of the folder's config.json with random weights, optionally
    only its first num_layers decoder layers (no weights are read)."""
    if weights == "random":
        from .hunyuan.random_init import build_random_model, real_or_folder_config

        # the folder's config.json when there is a folder, else the real Hunyuan-A13B architecture
        config, config_source = real_or_folder_config(cfg.model.dir)
        folder = Path(cfg.model.dir) if (Path(cfg.model.dir) / "config.json").is_file() else None
        model, info = build_random_model(config, moe_impl=cfg.model.moe_impl, quantization=cfg.model.quantization,
                                         device=device, dtype=dtype, num_layers=num_layers, model_dir=folder,
                                         skip=scale.QUANT_SKIP_MODULES, seed=cfg.run.seed)
        model.random_init = {**info, "config_source": config_source}  # what the probe reports
        return model
    if num_layers is not None:
        raise ValueError("num_layers applies to weights='random' only")
    from transformers import AutoModelForCausalLM

    run = launch()
    kwargs = {"torch_dtype": dtype}
    quantization = scale.bnb_config(cfg)
    if quantization is not None:
        kwargs["quantization_config"] = quantization  # NF4 weights are placed at load; no .to() after
    if device == "cuda" and not run.deepspeed and (cfg.model.device_map or quantization is not None):
        import torch

        kwargs["device_map"] = cfg.model.device_map or {"": torch.cuda.current_device()}
    if cfg.model.moe_impl == "fast":
        from .hunyuan.configuration_hunyuan import HunYuanConfig
        from .hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

        config = HunYuanConfig.from_pretrained(cfg.model.dir)
        config.moe_impl = "fast"  # read by HunYuanMoE; same state-dict keys as the folder's code
        model = HunYuanMoEV1ForCausalLM.from_pretrained(cfg.model.dir, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model.dir, trust_remote_code=True, **kwargs)
    if run.zero3:
        scale.set_moe_leaf_modules(model)  # without it, ranks routing to different experts hang
        return model  # sharded by zero.Init; the DeepSpeed engine places it
    model = model if "device_map" in kwargs else model.to(device)
    if cfg.model.moe_impl == "fast":
        from .hunyuan.fast_moe import pack_experts

        pack_experts(model)  # now, not on the first forward: the per-expert blocks go back to the driver whole
    return model


def adapter_dir(cfg: Config) -> Path:
    """infer.adapter, or <output_dir>/adapter; UserError when it holds no adapter."""
    path = Path(cfg.infer.adapter) if cfg.infer.adapter else cfg.output_dir / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise UserError(f"no LoRA adapter in {path}", where="infer.adapter",
                        fix="run `make train` with the same CONFIG / OUTPUT_DIR, or set infer.adapter")
    return path


def load_with_adapter(cfg: Config, path: Path):
    """Base model + adapter, in eval mode; fails loudly if any adapter tensor did not land in the model."""
    from peft import PeftModel
    from safetensors import safe_open

    device = pick_device(cfg)
    model = load_base_model(cfg, device, pick_dtype(cfg, device))
    model = PeftModel.from_pretrained(model, str(path))
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    # PEFT's saved keys drop the adapter name: ...lora_A.weight <-> ...lora_A.default.weight
    loaded = {n.replace(".default", "") for n, _ in model.named_parameters() if "lora_" in n}
    missing = saved - loaded
    if missing or not saved:
        raise UserError(f"{len(missing)} of {len(saved)} adapter tensors match no module of the model, "
                        f"e.g. {sorted(missing)[:2]}", where=str(path),
                        fix="use the adapter trained on this model folder (same architecture and targets)")
    model.eval()
    return model
