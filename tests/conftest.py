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
