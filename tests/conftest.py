"""Shared fixtures: the stand-in model folder, built once per test session."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "huanhuan.json"

# Tests never reach a hub or a SwanLab server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="The pynvml package is deprecated")


@pytest.fixture(scope="session")
def stand_in_dir(tmp_path_factory) -> Path:
    """A pristine stand-in folder (unpatched hunyuan.py). Copy it before modifying it."""
    from hunyuan_lora import stand_in

    return stand_in.build(tmp_path_factory.mktemp("models") / "stand-in-pristine", seed=0)


@pytest.fixture
def model_copy(stand_in_dir, tmp_path) -> Path:
    """A private copy of the stand-in a test may modify (patch, delete files, ...).

    transformers caches remote code by the folder's name (transformers_modules.<name>), so every
    copy gets a name of its own: a patched and an unpatched folder must never share one.
    """
    dst = tmp_path / f"stand-in-{tmp_path.name}"
    shutil.copytree(stand_in_dir, dst)
    return dst


@pytest.fixture(scope="session")
def patched_stand_in(stand_in_dir, tmp_path_factory) -> Path:
    """The stand-in with the logger fix applied by the patch stage (what training needs)."""
    from hunyuan_lora import patch

    dst = tmp_path_factory.mktemp("models") / "stand-in-patched"
    shutil.copytree(stand_in_dir, dst)
    patch.patch_folder(dst)
    return dst


@pytest.fixture(scope="session")
def lora_run(stand_in_dir, tmp_path_factory):
    """configs/demo.yaml on the stand-in with an untrained, seeded LoRA adapter whose B matrices are
    random (PEFT's init_lora_weights=False), so base and adapter answer differently: for the stages
    that generate (infer, chat, eval, serve). Loaded with config.load(...), like a user's run."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hunyuan_lora import config

    out = tmp_path_factory.mktemp("lora-run")
    cfg = config.load(REPO / "configs/demo.yaml", model_dir=str(stand_in_dir), output_dir=str(out))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(stand_in_dir, trust_remote_code=True, torch_dtype=torch.float32)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.targets(), init_lora_weights=False
    )
    get_peft_model(model, lora).save_pretrained(str(out / "adapter"))
    return cfg


# ---------------------------------------------------------------------------------------------
# The four layers of the suite, one marker each (`pytest -m unit` runs the fast ones):
#   unit   no stage runs: config, estimates, layout, records, prompts, patching, the model code
#   stage  one stage (or two) on the stand-in, checking the content of what it wrote
#   e2e    the README's path end to end (make demo's stages in order)
#   infra  make, the container, the browser dashboard, the README itself
LAYERS = {
    "unit": [
        "config",
        "estimate",
        "layout",
        "layer_checkpoint",
        "records",
        "prompt",
        "patch",
        "fast_moe",
        "hunyuan_model",
        "lm_head_padding",
        "moe_impl",
        "nf4_moe",
        "nf4_products",
        "step_graphs",
        "fast_linear",
        "bench_cases",
        "tokenizer_and_stand_in",
        "decode",
    ],
    "stage": [
        "atomic",
        "chat",
        "check",
        "checkpoints",
        "data",
        "divergence",
        "download",
        "evaluate",
        "generation",
        "infer",
        "interrupts",
        "merge",
        "nf4_load",
        "output_folders",
        "packing",
        "probe",
        "resume",
        "scale",
        "secrets",
        "serve",
        "stage_inputs",
        "swanlab_preflight",
        "tracking",
        "train_optim",
        "umask",
    ],
    "e2e": ["pipeline"],
    "infra": ["container", "dashboard", "readme", "user_values"],
}
LAYER_OF = {f"test_{name}": layer for layer, names in LAYERS.items() for name in names}


def pytest_collection_modifyitems(config, items):
    for item in items:
        layer = LAYER_OF.get(item.module.__name__.rsplit(".", 1)[-1])
        if layer:
            item.add_marker(layer)
