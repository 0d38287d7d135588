"""Every model and tokenizer load, for every stage: the base model in its placement, the base model
with a trained adapter, a `make merge` folder, and the real architecture with random weights.

    where = runtime.placement(cfg)                                  # decided once, passed down
    loaded = load_base_model(cfg, where)                            # the model folder's weights (train)
    loaded = load_with_adapter(cfg, where, adapter_dir(cfg))        # + <output_dir>/adapter, eval mode (merge)
    loaded, tokenizer = load_for_generation(cfg)                    # adapter or merged folder (infer, chat, ...)
    loaded = load_random_model(cfg, where, num_layers=2)            # shapes only, no weights read (probe)
    tokenizer = load_tokenizer(cfg.model.dir)

Each load returns a LoadedModel: the model and the facts of its load (which adapter, what the random
build made). The base model is built in one place, `_from_pretrained`.

Placements (scale.py says when each applies): device_map over the visible GPUs, one device, ZeRO-3
under `accelerate launch` (TrainingArguments, built before this call, makes from_pretrained load
inside deepspeed.zero.Init, which shards every weight 1/N over the processes), NF4 (QLoRA): built
layer by layer by nf4.py, from its cache (model.nf4_cache) when it matches the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import scale
from .config import Config
from .errors import UserError
from .model_folder import TOKENIZER_FILES, check_model_folder
from .runtime import Placement, placement

MERGED_MARKER = "merged_from.json"  # written by `make merge` into the folder it writes


@dataclass(frozen=True)
class LoadedModel:
    """A loaded model and the facts of its load, for the stage to act on or report."""

    model: Any
    adapter: Path | None = None  # the LoRA adapter loaded on top of the base weights
    source: str | None = None  # where the weights came from, when it is worth saying (NF4: checkpoint or cache)
    # load_random_model: what was built (random_init.build_random_model's info + architecture_from)
    random_init: dict | None = None


# ---------------------------------------------------------------------------------------------
# the tokenizer


def load_tokenizer(folder: str | Path):
    """The model folder's tokenizer (Tencent's code through auto_map); UserError when it cannot load."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    missing = [name for name in TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"no tokenizer in {folder} ({', '.join(missing)} missing)",
            where="model.dir",
            fix="run `make download` first (or use CONFIG=configs/demo.yaml for the stand-in demo), "
            "or pass MODEL_DIR=<the model folder>",
        )
    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
    except (OSError, ValueError, ImportError) as e:
        raise UserError(
            f"the tokenizer in {folder} does not load ({type(e).__name__}: {e})",
            where="model.dir",
            fix="download the folder again (`make download`), or pass MODEL_DIR=<the model folder>",
        ) from e


# ---------------------------------------------------------------------------------------------
# the base model


def _from_pretrained(cfg: Config, where: Placement):
    """The model folder's unquantised weights in the folder's own code (model.moe_impl: upstream) or the
    project's implementation (fast), placed as `where` says."""
    from transformers import AutoModelForCausalLM

    kwargs = {"torch_dtype": where.dtype}
    if where.device_map is not None:
        kwargs["device_map"] = where.device_map
    if cfg.model.moe_impl == "fast":
        lm_cls, config = _model_classes(cfg)
        return lm_cls.from_pretrained(cfg.model.dir, config=config, **kwargs)
    return AutoModelForCausalLM.from_pretrained(cfg.model.dir, trust_remote_code=True, **kwargs)


def _model_classes(cfg: Config):
    """(causal-LM class, its config): the project's implementation (moe_impl fast) or the folder's code."""
    if cfg.model.moe_impl == "fast":
        from .hunyuan.configuration_hunyuan import HunYuanConfig
        from .hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

        config = HunYuanConfig.from_pretrained(cfg.model.dir)
        config.moe_impl = "fast"  # read by HunYuanMoE; same state-dict keys as the folder's code
        return HunYuanMoEV1ForCausalLM, config
    from transformers import AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    config = AutoConfig.from_pretrained(cfg.model.dir, trust_remote_code=True)
    return get_class_from_dynamic_module(config.auto_map["AutoModelForCausalLM"], str(cfg.model.dir)), config


def _load_nf4(cfg: Config, where: Placement) -> LoadedModel:
    """NF4, one device: quantised layer by layer from the checkpoint, or read from the NF4 cache."""
    from . import nf4

    lm_cls, config = _model_classes(cfg)
    model, source = nf4.load(
        cfg.model.dir,
        lm_cls,
        config,
        where.device,
        where.dtype,
        scale.bnb_config(cfg),
        cache=nf4.cache_dir(cfg.model.nf4_cache, cfg.model.dir),
    )
    print(f"NF4 model: {source}", flush=True)
    return LoadedModel(_runtime_setup(cfg, model, where), source=source)


def load_base_model(cfg: Config, where: Placement) -> LoadedModel:
    """The model folder's weights, placed (or, under ZeRO-3, sharded and left to the DeepSpeed engine)."""
    if cfg.model.quantization == "nf4":
        return _load_nf4(cfg, where)  # packed as it loads (QLoRA under DeepSpeed is refused by the preflight)
    model = _from_pretrained(cfg, where)
    if where.zero3:
        scale.set_moe_leaf_modules(model)  # without it, ranks routing to different experts hang
        return LoadedModel(model)  # sharded by zero.Init; the DeepSpeed engine places it
    if where.device_map is None:
        model = model.to(where.device)
    if cfg.model.moe_impl == "fast":
        from .hunyuan.fast_moe import pack_experts

        pack_experts(model)  # now, not on the first forward: the per-expert blocks go back to the driver whole
    return LoadedModel(_runtime_setup(cfg, model, where))


def load_random_model(cfg: Config, where: Placement, num_layers: int | None = None) -> LoadedModel:
    """The architecture of the folder's config.json (else the real Hunyuan-A13B) with random weights,
    optionally only its first num_layers decoder layers; no weights are read."""
    from .hunyuan.random_init import build_random_model, real_or_folder_config

    config, architecture_from = real_or_folder_config(cfg.model.dir)
    folder = Path(cfg.model.dir) if (Path(cfg.model.dir) / "config.json").is_file() else None
    model, info = build_random_model(
        config,
        moe_impl=cfg.model.moe_impl,
        quantization=cfg.model.quantization,
        device=where.device,
        dtype=where.dtype,
        num_layers=num_layers,
        model_dir=folder,
        skip=scale.QUANT_SKIP_MODULES,
        seed=cfg.run.seed,
    )
    return LoadedModel(_runtime_setup(cfg, model, where), random_init={**info, "architecture_from": architecture_from})


def _runtime_setup(cfg: Config, model, where: Placement):
    """The project's code: its NF4 experts multiply as model.nf4_products says; on CUDA it generates through a
    StaticCache with its decode steps as CUDA graphs."""
    if cfg.model.moe_impl == "fast":
        from .hunyuan.fast_moe import set_nf4_products

        set_nf4_products(model, cfg.model.nf4_products)
    if cfg.model.moe_impl == "fast" and where.device == "cuda" and hasattr(model, "prefer_static_decode"):
        model.prefer_static_decode()
    return model


# ---------------------------------------------------------------------------------------------
# with an adapter, or merged


def adapter_dir(cfg: Config) -> Path:
    """infer.adapter, or <output_dir>/adapter; UserError when it holds no adapter."""
    path = Path(cfg.infer.adapter) if cfg.infer.adapter else cfg.output_dir / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise UserError(
            f"no LoRA adapter in {path}",
            where="infer.adapter",
            fix="run `make train` with the same CONFIG / OUTPUT_DIR, or set infer.adapter",
        )
    return path


def is_merged(model_dir: str | Path) -> bool:
    return (Path(model_dir) / MERGED_MARKER).is_file()


def load_with_adapter(cfg: Config, where: Placement, path: Path) -> LoadedModel:
    """Base model + adapter, in eval mode; fails loudly if any adapter tensor did not land in the model."""
    from peft import PeftModel
    from safetensors import safe_open

    base = load_base_model(cfg, where)
    model = PeftModel.from_pretrained(base.model, str(path))
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    # PEFT's saved keys drop the adapter name: ...lora_A.weight <-> ...lora_A.default.weight
    loaded = {n.replace(".default", "") for n, _ in model.named_parameters() if "lora_" in n}
    missing = saved - loaded
    if missing or not saved:
        raise UserError(
            f"{len(missing)} of {len(saved)} adapter tensors match no module of the model, e.g. {sorted(missing)[:2]}",
            where=str(path),
            fix="use the adapter trained on this model folder (same architecture and targets)",
        )
    model.eval()
    return LoadedModel(model, adapter=path, source=base.source)


def load_for_generation(cfg: Config, *, require_adapter: bool = True) -> tuple[LoadedModel, Any]:
    """(loaded, tokenizer): the base model + the run's adapter, or a `make merge` folder as it is (its
    adapter is already in the weights: applying it again would double it; loaded.adapter is None);
    require_adapter=False allows the bare base model."""
    check_model_folder(Path(cfg.model.dir))  # a missing, partial or damaged folder: in words, before loading
    adapter = None
    if not is_merged(cfg.model.dir):
        try:
            adapter = adapter_dir(cfg)
        except UserError:
            if require_adapter:
                raise
    tokenizer = load_tokenizer(cfg.model.dir)
    where = placement(cfg)
    if adapter is not None:
        return load_with_adapter(cfg, where, adapter), tokenizer
    base = load_base_model(cfg, where)
    return LoadedModel(base.model.eval(), source=base.source), tokenizer
