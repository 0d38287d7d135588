"""make merge's check: every adapted tensor (all experts included) carries its LoRA delta in the merged
files, counted; a dropped delta stops the merge with nothing published; a merged folder is used as is."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from hunyuan_lora import merge, modeling
from hunyuan_lora.errors import UserError


@pytest.fixture
def cfg(lora_run, tmp_path):
    return dataclasses.replace(lora_run, run=dataclasses.replace(lora_run.run, output_dir=str(tmp_path / "run")),
                               infer=dataclasses.replace(lora_run.infer, adapter=str(lora_run.output_dir / "adapter")))


def _expected(cfg) -> tuple[int, int]:
    """(expert, other) tensors the adapter file adapts, counted from its keys."""
    from safetensors import safe_open

    with safe_open(f"{cfg.infer.adapter}/adapter_model.safetensors", "pt") as f:
        a_keys = [k for k in f.keys() if k.endswith("lora_A.weight")]
    experts = sum(".experts." in k for k in a_keys)
    return experts, len(a_keys) - experts


def test_merge_counts_every_expert_delta_and_marks_the_folder(cfg, capsys):
    out = merge.run(cfg)
    experts, other = _expected(cfg)
    model_config = json.loads((out / "config.json").read_text())
    assert experts == model_config["num_hidden_layers"] * model_config["num_experts"] * 3 > 0
    assert (f"merge check: {experts} of {experts} expert tensors and {other} of {other} other adapted tensors "
            "carry their LoRA delta") in capsys.readouterr().out
    marker = json.loads((out / modeling.MERGED_MARKER).read_text())
    assert marker["merge_check"]["expert_tensors"] == {"with_delta": experts, "adapted": experts}
    # a merged folder is used as it is: infer/chat/eval/serve load no adapter on top, merge refuses it
    merged_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dir=str(out)))
    loaded, _ = modeling.load_for_generation(merged_cfg)
    assert loaded.adapter is None
    with pytest.raises(UserError, match="already hold an adapter"):
        merge.run(merged_cfg)


def test_a_dropped_expert_delta_stops_the_merge_before_publishing(cfg, monkeypatch):
    def load_and_lose_one_expert(cfg, where, path):
        loaded = modeling.load_with_adapter(cfg, where, path)
        lost = loaded.model.base_model.model.model.layers[1].mlp.experts[0].up_proj  # as a broken merge would
        with torch.no_grad():
            lost.lora_B["default"].weight.zero_()
        return loaded

    monkeypatch.setattr(merge, "load_with_adapter", load_and_lose_one_expert)
    with pytest.raises(UserError, match=r"1 adapted tensor\(s\) do not carry their LoRA delta.*"
                                        r"layers\.1\.mlp\.experts\.0\.up_proj\.weight"):
        merge.run(cfg)
    assert not (cfg.output_dir / "merged").exists()
    assert not [p for p in cfg.output_dir.iterdir() if p.name.startswith(".merged-")]
