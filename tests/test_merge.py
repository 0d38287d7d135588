"""make merge: the adapter streamed into the bf16 shards equals PEFT's merge_and_unload, bit for bit;
every other byte is the base's; the merge check counts every expert delta and stops a merge that drops
one, with nothing published; a merged folder is used as is."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from hunyuan_lora import config, merge, modeling, runtime, training
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(lora_run, tmp_path):
    return dataclasses.replace(
        lora_run,
        run=dataclasses.replace(lora_run.run, output_dir=str(tmp_path / "run")),
        infer=dataclasses.replace(lora_run.infer, adapter=str(lora_run.output_dir / "adapter")),
    )


def _a_keys(adapter) -> list[str]:
    with safe_open(f"{adapter}/adapter_model.safetensors", "pt") as f:
        return sorted(k for k in f.keys() if k.endswith("lora_A.weight"))


def _tensors(folder) -> dict[str, torch.Tensor]:
    folder, out = Path(folder), {}
    for shard in sorted(set(merge.weight_files(folder).values())):
        with safe_open(str(folder / shard), "pt") as f:
            out |= {k: f.get_tensor(k) for k in f.keys()}
    return out


def test_streamed_merge_equals_peft_merge_and_unload_in_bf16(cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = merge.run(cfg)
    base_dir, merged, base = cfg.model.dir, _tensors(out), _tensors(cfg.model.dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=True, torch_dtype=torch.bfloat16)
    peft_merged = PeftModel.from_pretrained(model, cfg.infer.adapter).merge_and_unload()
    expected = peft_merged.state_dict()
    adapted = {
        k.removeprefix(merge.PEFT_PREFIX).removesuffix(".lora_A.weight") + ".weight" for k in _a_keys(cfg.infer.adapter)
    }
    assert merged.keys() == base.keys()
    assert adapted <= merged.keys()
    assert sum(".experts." in k for k in adapted) == 2 * 8 * 3  # 2 layers x 8 experts x 3 projections
    for key, tensor in merged.items():
        assert tensor.dtype == base[key].dtype, key
        if key in adapted:
            assert torch.equal(tensor, expected[key]), key
            assert not torch.equal(tensor, base[key]), key
        else:
            assert torch.equal(tensor, base[key]), key
    # the folder is the base folder's, shard for shard: same index, same files, same sizes
    for p in Path(base_dir).iterdir():
        if p.is_file() and p.name != "download.json":
            assert (out / p.name).is_file(), p.name
            if p.suffix == ".safetensors" or p.name == "model.safetensors.index.json":
                assert (out / p.name).stat().st_size == p.stat().st_size, p.name
    # it loads like the original folder and answers like base + adapter merged by PEFT
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, peft_merged(ids).logits)


def test_fast_path_adapter_has_the_per_expert_keys_and_merges_the_same(cfg, tmp_path):
    """An adapter saved by the fast path (stacked expert LoRA) carries PEFT's per-expert keys, so the
    streamed merge finds each expert's base tensor: same merged shards as the folder code's adapter."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    fast_cfg = config.load(
        REPO / "configs/demo.yaml",
        ["model.moe_impl=fast", "model.device=cpu"],
        model_dir=cfg.model.dir,
        output_dir=str(tmp_path / "fast"),
    )
    where = runtime.placement(fast_cfg)
    model = training.attach_lora(fast_cfg, modeling.load_base_model(fast_cfg, where).model, where)
    set_peft_model_state_dict(model, load_file(f"{cfg.infer.adapter}/adapter_model.safetensors"))
    model.save_pretrained(str(tmp_path / "fast-adapter"))
    assert _a_keys(tmp_path / "fast-adapter") == _a_keys(cfg.infer.adapter)

    from_folder_code = merge.run(cfg)
    fast = merge.run(
        dataclasses.replace(
            cfg,
            run=dataclasses.replace(cfg.run, output_dir=str(tmp_path / "run2")),
            infer=dataclasses.replace(cfg.infer, adapter=str(tmp_path / "fast-adapter")),
        )
    )
    for shard in sorted(set(merge.weight_files(fast).values())):
        assert (fast / shard).read_bytes() == (from_folder_code / shard).read_bytes(), shard


def test_merge_counts_every_expert_delta_and_marks_the_folder(cfg, capsys):
    out = merge.run(cfg)
    a_keys = _a_keys(cfg.infer.adapter)
    experts = sum(".experts." in k for k in a_keys)
    other = len(a_keys) - experts
    model_config = json.loads((out / "config.json").read_text())
    assert experts == model_config["num_hidden_layers"] * model_config["num_experts"] * 3 > 0
    printed = capsys.readouterr().out
    assert (
        f"merge check: {experts} of {experts} expert tensors and {other} of {other} other adapted tensors "
        "carry their LoRA delta"
    ) in printed
    assert "model-00001-of-00002.safetensors (1/2)" in printed
    marker = json.loads((out / modeling.MERGED_MARKER).read_text())
    assert marker["merge_check"]["expert_tensors"] == {"with_delta": experts, "adapted": experts}
    assert marker["tensors_merged"] == len(a_keys)
    assert marker["device"] == "cpu"
    # a merged folder is used as it is: infer/chat/eval/serve load no adapter on top, merge refuses it
    merged_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dir=str(out)))
    loaded, _ = modeling.load_for_generation(merged_cfg)
    assert loaded.adapter is None
    with pytest.raises(UserError, match="already hold an adapter"):
        merge.run(merged_cfg)


def test_a_dropped_expert_delta_stops_the_merge_before_publishing(cfg, monkeypatch):
    read = merge.read_adapter

    def lose_one_expert(adapter):
        deltas = read(adapter)
        del deltas["model.layers.1.mlp.experts.0.up_proj.weight"]  # as a broken merge would
        return deltas

    monkeypatch.setattr(merge, "read_adapter", lose_one_expert)
    with pytest.raises(
        UserError,
        match=r"1 adapted tensor\(s\) do not carry their LoRA delta.*"
        r"layers\.1\.mlp\.experts\.0\.up_proj\.weight",
    ):
        merge.run(cfg)
    assert not (cfg.output_dir / "merged").exists()
    assert not [p for p in cfg.output_dir.iterdir() if p.name.startswith(".merged.tmp-")]


def test_an_adapter_of_another_model_is_refused_before_anything_is_written(cfg, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-adapter"
    shutil.copytree(cfg.infer.adapter, other)
    tensors = load_file(str(other / "adapter_model.safetensors"))
    tensors = {k.replace("layers.1.", "layers.7."): v for k, v in tensors.items()}  # the stand-in has 2 layers
    save_file(tensors, str(other / "adapter_model.safetensors"))
    bad = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, adapter=str(other)))
    with pytest.raises(UserError, match=r"tensor\(s\) the adapter changes are not in the base model.*layers\.7\."):
        merge.run(bad)
    assert not cfg.output_dir.exists() or not any(cfg.output_dir.iterdir())

    settings = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(UserError, match="use_dora: True"):
        merge.read_adapter(other)
