"""A diverged run is never published: not by train, not by merge.

The runs are the real training of the stand-in through scripts/train.py. A learning rate of 1e30 is
finite (the config takes it) but makes the run diverge: AdamW moves every LoRA weight by about the
learning rate at step 1, so step 2's loss overflows. The config refuses a non-finite learning rate,
and one past float32's range, itself (test_config.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import stage_args

from hunyuan_lora import config, data, train
from hunyuan_lora.errors import UserError
from hunyuan_lora.tracking import local_experiments

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_script(script: str, model: Path, out: Path, *sets: str, swanlab: str = "disabled"):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL_")}
    env.update(OMP_NUM_THREADS="1", SWANLAB_MODE=swanlab)
    args = [sys.executable, str(REPO / "scripts" / script), *stage_args(DEMO, model, out, SAMPLE, sets)]
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def paragraph(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-3000:]
    return " ".join(stderr[stderr.index("error:") :].split())


def diverge(model: Path, out: Path, *sets: str, swanlab: str = "disabled"):
    """train.py on `out` with a learning rate of 1e30 over 6 steps: it fails (exit 2) and its error paragraph
    names the step it diverged at; returns (paragraph, that step)."""
    proc = run_script(
        "train.py",
        model,
        out,
        "train.learning_rate=1e30",
        "train.max_steps=6",
        "train.resume=never",
        *sets,
        swanlab=swanlab,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    text = paragraph(proc.stderr)
    return text, int(text.split("training diverged at step ")[1].split(" of 6:")[0])


@pytest.fixture(scope="module")
def trained(patched_stand_in, tmp_path_factory):
    """A run folder with a good adapter published (2 steps)."""
    out = tmp_path_factory.mktemp("divergence") / "run"
    cfg = config.load(
        DEMO,
        ["train.max_steps=2", "train.save_steps=1", "swanlab.mode=disabled", "train.resume=never"],
        model_dir=str(patched_stand_in),
        output_dir=str(out),
        data=str(SAMPLE),
    )
    data.run(cfg)
    train.run(cfg)
    return out


def test_a_diverging_run_stops_at_the_step_and_publishes_nothing(trained, patched_stand_in, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    before = {name: tree_digest(out / name) for name in ("adapter",)} | {
        name: (out / name).read_bytes() for name in ("manifest.json", "resolved.yaml")
    }
    text, step = diverge(patched_stand_in, out, "train.save_steps=1", "train.logging_steps=1", swanlab="local")
    assert 1 < step < 6, text
    assert "is not finite" not in text, text
    assert "the loss is nan" in text or "the gradient norm is" in text, text
    assert "train.learning_rate=1e+30 is too high" in text, text
    assert "the data" in text, text
    # the last checkpoint before the divergence, and none of the diverged steps
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert saved == list(range(1, step)), saved
    assert f"the last checkpoint with finite weights before it is {out / f'checkpoint-{step - 1}'}" in text, text
    # nothing published: the earlier run's adapter, manifest and config are byte for byte as they were
    assert tree_digest(out / "adapter") == before["adapter"]
    assert all((out / name).read_bytes() == before[name] for name in ("manifest.json", "resolved.yaml"))
    assert not list(out.glob(".adapter*"))
    # nothing of the diverged step is in the log either
    history = json.loads((out / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, step))
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]) for e in history if "loss" in e)
    # its SwanLab experiment is closed as crashed, with the reason (left open, swanlab marks it finished)
    [experiment] = local_experiments(out / "swanlog")
    assert experiment["status"] == "crashed"
    console = "".join(p.read_text() for p in (out / "swanlog").glob(f"{experiment['run_id']}/console/*"))
    assert f"training diverged at step {step} of 6" in console


def test_a_divergence_between_logs_stops_at_the_next_log_and_names_its_own_step(trained, patched_stand_in, tmp_path):
    """The losses and gradient norms are checked where they are (no step waits for the GPU) and read where a step
    logs or saves: diverging at step 2 with a log every 4 steps, the run stops at step 4, names the step it
    diverged at, and neither logged nor saved anything."""
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    text, step = diverge(patched_stand_in, out, "train.save_steps=100", "train.logging_steps=4")
    assert step in (2, 3), text
    assert "It stopped at step 4, the first after it to log or save: nothing of that step or later" in text, text
    assert "the loss is nan" in text or "the gradient norm is" in text, text
    assert not [e for e in json.loads((out / "log_history.json").read_text()) if "loss" in e]


def test_a_run_resumed_from_a_non_finite_checkpoint_names_the_last_finite_one(trained, patched_stand_in, tmp_path):
    """checkpoint-2 with a NaN weight (what a diverged run of an earlier version saved): the resumed run
    stops at its first step, and the checkpoint it names to go back to is checkpoint-1."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    poison(out / "checkpoint-2" / "adapter_model.safetensors", load_file, save_file)
    proc = run_script("train.py", patched_stand_in, out, "train.max_steps=4", "train.save_steps=1")
    assert proc.returncode == 2, proc.stderr[-3000:]
    text = paragraph(proc.stderr)
    assert "training diverged at step 3 of 4: the loss is nan" in text, text
    assert f"the last checkpoint with finite weights before it is {out / 'checkpoint-1'}" in text, text
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_an_adapter_with_non_finite_values_is_never_published(trained, patched_stand_in, tmp_path):
    """The last check before the rename: a LoRA weight that is NaN (a divergence in the last step's
    update, after its loss and gradient norm were seen) stops the publish; the earlier adapter stays."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    shutil.copytree(trained / "adapter", out / "adapter")
    before = tree_digest(out / "adapter")
    cfg = config.load(DEMO, model_dir=str(patched_stand_in), output_dir=str(out))
    base = AutoModelForCausalLM.from_pretrained(cfg.model.dir, trust_remote_code=True, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out / "adapter"), is_trainable=True)
    name, weight = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        weight[0, 0] = float("inf")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.dir, trust_remote_code=True)
    with pytest.raises(UserError) as e:
        train.publish_adapter(cfg, model, tokenizer, {"seed": 0}, main_process=True)
    assert "the adapter this run trained holds non-finite values (inf or nan) in 1 tensor(s)" in str(e.value)
    assert tree_digest(out / "adapter") == before
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]  # no manifest, no temporary folder


def poison(weights: Path, load_file, save_file) -> str:
    """One NaN in the first lora_B tensor of a safetensors file; returns that tensor's name."""
    tensors = load_file(str(weights))
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return name


def test_merge_refuses_an_adapter_with_non_finite_values(trained, patched_stand_in, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    shutil.copytree(trained / "adapter", out / "adapter")
    weights = out / "adapter" / "adapter_model.safetensors"
    name = poison(weights, load_file, save_file)
    proc = run_script("merge.py", patched_stand_in, out)
    assert proc.returncode == 2, proc.stderr[-3000:]
    text = paragraph(proc.stderr)
    assert "holds non-finite values (inf or nan) in 1 tensor(s)" in text, text
    assert name in text, text
    assert not (out / "merged").exists()
    assert not list(out.glob(".merged*"))
    assert torch.isnan(load_file(str(weights))[name]).sum() == 1  # the adapter itself is left as it was
