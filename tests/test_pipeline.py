"""End to end: the README's `make demo` on the stand-in, then infer batch mode and merge on its output."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from hunyuan_lora import config, infer, merge

REPO = Path(__file__).resolve().parents[1]
# The demo's first logged loss (mean over its first 2 steps) from seed 0: it depends only on the
# stand-in weights and the sample data. Tolerance covers CPU kernel differences between machines.
GOLDEN_FIRST_LOSS = 7.59
GOLDEN_TOLERANCE = 0.05


def _pinned_versions() -> dict[str, str]:
    lock = (REPO / "requirements.lock").read_text()
    return dict(re.findall(r"^([a-z0-9_.-]+)==([^\s\\]+)", lock, flags=re.M))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    out, stand_in = root / "outputs", root / "stand-in-demo"
    proc = subprocess.run(
        ["make", "demo", f"OUTPUT_DIR={out}", f"STAND_IN_DIR={stand_in}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cfg = config.load(REPO / "configs/demo.yaml", model_dir=str(stand_in), output_dir=str(out))
    return cfg, proc.stdout


def test_demo_loss_goes_down_from_the_golden_start(demo):
    cfg, _ = demo
    losses = [row["loss"] for row in json.loads((cfg.output_dir / "log_history.json").read_text()) if "loss" in row]
    assert len(losses) == 20
    assert losses[0] == pytest.approx(GOLDEN_FIRST_LOSS, abs=GOLDEN_TOLERANCE)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5


def test_demo_prints_answers_and_the_swanlab_location(demo):
    cfg, stdout = demo
    assert re.search(r"Q: 你是谁？\nA: \S+", stdout)
    assert "swanlog" in stdout
    rows = [json.loads(line) for line in (cfg.output_dir / "infer/answers.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == cfg.infer.prompts
    assert all(r["answer"].strip() for r in rows)


def test_demo_writes_adapter_resolved_config_and_manifest(demo):
    cfg, _ = demo
    out = cfg.output_dir
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == sorted(cfg.lora.targets())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 32)
    from safetensors import safe_open

    with safe_open(str(out / "adapter/adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(".mlp.experts.7.down_proj.lora_B" in k for k in keys)
    assert not any("mlp.gate.lora" in k or ".wg." in k for k in keys)
    resolved = yaml.safe_load((out / "resolved.yaml").read_text())
    assert resolved["train"]["resume"] == "never"
    assert resolved["model"]["dir"] == cfg.model.dir
    manifest = json.loads((out / "manifest.json").read_text())
    pins = _pinned_versions()
    for name, version in manifest["packages"].items():
        assert pins[name] == version.split("+")[0], name
    sample = REPO / cfg.data.path
    import hashlib

    assert manifest["dataset"]["sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert manifest["global_step"] == 40
    assert manifest["seed"] == cfg.run.seed
    assert manifest["train_samples_per_second"] > 0
    assert manifest["git_commit"]
    # the adapter folder carries the same two files (published with it in one rename)
    assert json.loads((out / "adapter/manifest.json").read_text()) == manifest
    assert (out / "adapter/resolved.yaml").read_text() == (out / "resolved.yaml").read_text()


def test_infer_batch_mode_writes_one_answer_per_line(demo, tmp_path):
    cfg, _ = demo
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"instruction": "你是谁？"}\n\n{"instruction": "你会弹琴吗？", "system": "S"}\n')
    cfg.infer.input_jsonl, cfg.infer.output_jsonl = str(questions), str(tmp_path / "a.jsonl")
    out = infer.run(cfg)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["你是谁？", "你会弹琴吗？"]
    assert all(isinstance(r["answer"], str) and r["raw"] for r in rows)


def test_merged_model_equals_base_plus_adapter(demo):
    """The demo's adapter merged into the bf16 shards loads like the original folder and answers like
    PEFT's own merge of base + adapter in bf16, logit for logit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, _ = demo
    merged_dir = merge.run(cfg)
    assert {
        "config.json",
        "hunyuan.py",
        "modeling_hunyuan.py",
        "configuration_hunyuan.py",
        "tokenization_hy.py",
        "hy.tiktoken",
        "tokenizer_config.json",
        "generation_config.json",
    } <= {p.name for p in merged_dir.iterdir()}
    ids = torch.tensor([[815, 300, 301, 302, 819, 500]])
    with torch.no_grad():
        merged, info = AutoModelForCausalLM.from_pretrained(
            merged_dir, trust_remote_code=True, torch_dtype=torch.bfloat16, output_loading_info=True
        )
        merged_logits = merged.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(cfg.model.dir, trust_remote_code=True, torch_dtype=torch.bfloat16)
        base_logits = base.eval()(input_ids=ids).logits
        peft_merged = PeftModel.from_pretrained(base, str(cfg.output_dir / "adapter")).merge_and_unload()
        peft_logits = peft_merged.eval()(input_ids=ids).logits
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert torch.equal(merged_logits, peft_logits)
    assert (merged_logits.float() - base_logits.float()).abs().max() > 1e-3  # the merge really changed the weights


def test_infer_without_adapter_is_a_clear_error(tmp_path):
    cfg = config.load(REPO / "configs/demo.yaml", output_dir=str(tmp_path / "none"))
    with pytest.raises(Exception, match="no LoRA adapter in"):
        infer.run(cfg)
