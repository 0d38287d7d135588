"""A HunYuan model with the real architecture and random weights, created where it will live.

    model, info = build_random_model(config_dict, moe_impl="fast", quantization="nf4", device="cuda",
                                     dtype=torch.bfloat16, num_layers=8)

What `make probe` trains: the shapes, placement and code of the real run without its 160 GB of
weights. The model is built layer by layer on `device`: first everything outside the decoder layers
(embedding, final norm, tied lm_head, rotary), then each decoder layer in `dtype`; under
quantization "nf4" every layer's Linear weights (all but `skip`: the router `wg`) are quantised to
bitsandbytes NF4 (double quantisation, as scale.bnb_config) the moment the layer exists, so the
bf16 model never exists as a whole: the peak is the 4-bit model plus one bf16 layer (2.5 B
parameters, 5 GB). Random values: normal(0, initializer_range) for Linear and Embedding weights
(what the model's `_init_weights` does), norms at one; drawn on the device, so an 80 B model takes
seconds to a minute, not the hour a CPU init would.

Code: moe_impl "fast" is the project's implementation (hunyuan.py here) with grouped experts.
moe_impl "upstream" is the model folder's own code (its auto_map) when `model_dir` is given, else
the project's implementation with the per-expert loop, which `info["code"]` names as such.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn


def quantize_linears_(
    root: nn.Module,
    *,
    skip: tuple[str, ...] | list[str],
    compute_dtype: torch.dtype,
    double_quant: bool = True,
    quant_type: str = "nf4",
    prefix: str = "",
) -> int:
    """Replace every nn.Linear under `root` by bitsandbytes' Linear4bit holding its weight quantised
    on the weight's own device; returns how many. `skip`: transformers' rule (scale.skipped_by_quantization):
    a Linear whose own name, full path or a dotted prefix of it is listed stays as it is."""
    import bitsandbytes as bnb

    n = 0
    for name, child in list(root.named_children()):
        path = f"{prefix}{name}"
        if any(name == key or path == key or path.startswith(key + ".") for key in skip):
            continue
        if type(child) is nn.Linear:
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=double_quant,
                quant_type=quant_type,
                device="meta",
            )
            weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                compress_statistics=double_quant,
                quant_type=quant_type,
                module=q,
            )
            q.weight = weight.to(child.weight.device)  # quantises (Params4bit._quantize) on that device
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(root, name, q)
            n += 1
        else:
            n += quantize_linears_(
                child,
                skip=skip,
                compute_dtype=compute_dtype,
                double_quant=double_quant,
                quant_type=quant_type,
                prefix=path + ".",
            )
    return n


def _classes(moe_impl: str, model_dir: Path | None):
    """(config class, causal-LM class, decoder-layer class, description of the code)."""
    if moe_impl == "upstream" and model_dir is not None:
        from transformers import AutoConfig
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        folder_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
        config_cls, auto_map = type(folder_config), folder_config.auto_map
        lm_cls = get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], str(model_dir))
        layer_cls = sys.modules[lm_cls.__module__].HunYuanDecoderLayer
        file = f"{model_dir}/{lm_cls.__module__.rsplit('.', 1)[-1]}.py"
        return config_cls, lm_cls, layer_cls, f"the model folder's own code ({file})"
    from .configuration_hunyuan import HunYuanConfig
    from .hunyuan import HunYuanMoEV1ForCausalLM
    from .modeling_hunyuan import HunYuanDecoderLayer

    what = (
        "the project's implementation, grouped experts (hunyuan_lora/hunyuan, moe_impl fast)"
        if moe_impl == "fast"
        else "the project's reference implementation, per-expert loop (hunyuan_lora/hunyuan; no model folder)"
    )
    return HunYuanConfig, HunYuanMoEV1ForCausalLM, HunYuanDecoderLayer, what


@torch.no_grad()
def _init_(module: nn.Module, std: float, generator: torch.Generator | None) -> None:
    """normal(0, std) for Linear / Embedding weights, zero biases; norms keep their ones."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std, generator=generator)
            if getattr(m, "bias", None) is not None:
                m.bias.zero_()


def build_random_model(
    config: dict,
    *,
    moe_impl: str,
    quantization: str,
    device: str | torch.device,
    dtype: torch.dtype,
    num_layers: int | None = None,
    model_dir: str | Path | None = None,
    skip: tuple[str, ...] | list[str] = ("wg", "lm_head"),
    seed: int = 0,
) -> tuple[nn.Module, dict]:
    """The causal LM of `config` (a config.json dict) with random weights; returns (model, info).

    num_layers keeps only the first num_layers decoder layers (per-layer lists cut to match).
    info: code (which implementation), layers, quantized Linear count, init seconds.
    """
    if moe_impl not in ("upstream", "fast"):
        raise ValueError(f"moe_impl must be 'upstream' or 'fast', got {moe_impl!r}")
    if quantization not in ("none", "nf4"):
        raise ValueError(f"quantization must be 'none' or 'nf4', got {quantization!r}")
    t0 = time.perf_counter()
    device = torch.device(device)
    cfg = dict(config)
    layers = cfg["num_hidden_layers"] if num_layers is None else min(num_layers, cfg["num_hidden_layers"])
    for key, value in cfg.items():  # per-layer lists (moe_topk, num_shared_expert, ...)
        if isinstance(value, list) and len(value) == cfg["num_hidden_layers"] and key != "architectures":
            cfg[key] = value[:layers]
    cfg["num_hidden_layers"] = layers
    cfg["moe_impl"] = moe_impl
    cfg["use_cache"] = False
    config_cls, lm_cls, layer_cls, code = _classes(moe_impl, Path(model_dir) if model_dir else None)
    hf_config = config_cls(**{k: v for k, v in cfg.items() if k not in ("auto_map", "architectures")})
    hf_config.moe_impl = moe_impl
    std = hf_config.initializer_range
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(seed)  # meta: shapes only

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # everything but the decoder layers: the model built with one layer (post_init looks for the
        # float32 router inside the layers), which is then dropped
        shell_config = config_cls(**{**hf_config.to_dict(), "num_hidden_layers": 1})
        with torch.device(device):
            model = lm_cls(shell_config)
        model.model.layers = nn.ModuleList()
        _init_(model, std, generator)
        model.config = hf_config
        model.model.config = hf_config
        quantized = 0
        for i in range(layers):
            with torch.device(device):
                layer = layer_cls(hf_config, i)
            _init_(layer, std, generator)
            for m in layer.modules():  # the router: float32 as the checkpoint keeps it
                if hasattr(m, "wg") and isinstance(m.wg, nn.Linear):
                    m.wg.to(torch.float32)
            if quantization == "nf4":
                quantized += quantize_linears_(layer, skip=skip, compute_dtype=dtype, prefix=f"model.layers.{i}.")
            model.model.layers.append(layer)
    finally:
        torch.set_default_dtype(default)
    if quantization == "nf4":
        # what transformers sets on a bitsandbytes-loaded model: PEFT and Trainer read these
        model.is_loaded_in_4bit = True
        model.quantization_method = "bitsandbytes"
    model.tie_weights()
    if moe_impl == "fast":
        from .fast_moe import pack_experts

        pack_experts(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    info = {
        "code": code,
        "moe_impl": moe_impl,
        "quantization": quantization,
        "layers": layers,
        "layers_in_config": config["num_hidden_layers"],
        "quantized_linears": quantized,
        "init_s": round(time.perf_counter() - t0, 2),
        "parameters": sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters()),
    }
    return model, info


def real_or_folder_config(model_dir: str | Path | None) -> tuple[dict, str]:
    """(config dict, where from): the model folder's config.json if it has one, else the real
    Hunyuan-A13B config the project knows (a13b.real_config)."""
    import json

    from .a13b import real_config

    if model_dir is not None and (Path(model_dir) / "config.json").is_file():
        path = Path(model_dir) / "config.json"
        return json.loads(path.read_text(encoding="utf-8")), str(path)
    return real_config(), "the real Hunyuan-A13B config.json (hunyuan/a13b.py)"
