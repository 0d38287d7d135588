"""Outputs get the user's umask: a published folder is 0755 and its files 0644 under umask 022.

tempfile.mkdtemp makes 0700 folders and safetensors writes 0600 files regardless of the umask; a
container running as another uid could then not read the dataset, the adapter or the merged model.
The Trainer's checkpoints likewise (safetensors again). The real scripts run in subprocesses under
a chosen umask (022, and 027 to show the modes follow the umask rather than a fixed 0755).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import stage_args

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"


def run_script(script: str, umask: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("CONFIG", "MODEL_DIR", "DATA", "OUTPUT_DIR", "SET"):
        env.pop(f"HL_{name}", None)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: os.umask(umask),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def modes(root: Path) -> dict[str, int]:
    """Permission bits of root and every folder and file under it, by path relative to root."""
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        out[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return out


def assert_modes(root: Path, umask: int) -> None:
    found = modes(root)
    assert len(found) > 3, found
    wrong = {p: oct(m) for p, m in found.items() if m != ((0o777 if (root / p).is_dir() else 0o666) & ~umask)}
    assert not wrong, f"expected folders {oct(0o777 & ~umask)}, files {oct(0o666 & ~umask)}: {wrong}"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_the_tokenized_dataset_follows_the_umask(stand_in_dir, tmp_path, umask):
    out = tmp_path / "out"
    run_script("dataset.py", umask, *stage_args(DEMO, stand_in_dir, out, SAMPLE))
    assert (out / "data" / "stats.json").is_file()
    assert list((out / "data" / "train").glob("*.arrow"))
    assert_modes(out / "data", umask)


def test_the_merged_model_follows_the_umask(lora_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(lora_run.output_dir / "adapter", out / "adapter")
    run_script("merge.py", 0o022, *stage_args(DEMO, lora_run.model.dir, out))
    shards = list((out / "merged").glob("*.safetensors"))
    assert shards
    assert (out / "merged" / "config.json").is_file()
    assert_modes(out / "merged", 0o022)


def test_checkpoints_and_the_adapter_follow_the_umask(patched_stand_in, tmp_path):
    from hunyuan_lora import config, data

    out = tmp_path / "out"
    data.run(config.load(DEMO, model_dir=str(patched_stand_in), output_dir=str(out), data=str(SAMPLE)))
    sets = ["train.max_steps=2", "train.save_steps=1", "swanlab.mode=disabled", "train.resume=never"]
    run_script("train.py", 0o022, *stage_args(DEMO, patched_stand_in, out, SAMPLE, sets))
    for folder in ("checkpoint-1", "checkpoint-2", "adapter"):
        assert (out / folder / "adapter_model.safetensors").is_file(), folder
        assert_modes(out / folder, 0o022)


def test_a_staged_folder_with_safetensors_and_an_executable_is_published_with_the_umask(tmp_path):
    """The adapter (train) and the stand-in go through the same staging_dir; an executable stays one."""
    import torch
    from safetensors.torch import save_file

    from hunyuan_lora.atomic import staging_dir

    final = tmp_path / "adapter"
    old = os.umask(0o022)
    try:
        with staging_dir(final) as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
            (tmp / "sub").mkdir()
            (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
            os.chmod(tmp / "sub" / "run.sh", 0o700)
    finally:
        os.umask(old)
    assert modes(final) == {
        ".": 0o755,
        "adapter_model.safetensors": 0o644,
        "sub": 0o755,
        "sub/run.sh": 0o755,
        ".hunyuan-lora": 0o644,
    }
