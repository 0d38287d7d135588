"""The run config: defaults reproduce the tutorial, typos and wrong types fail with the nearest name."""

from __future__ import annotations

from pathlib import Path

import pytest

from hunyuan_lora import config
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.source == str(path)


def test_huanhuan_config_reproduces_the_tutorial():
    cfg = config.load(REPO / "configs/huanhuan.yaml")
    assert cfg.data.system_prompt == "现在你要扮演皇帝身边的女人--甄嬛"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.1)
    assert cfg.lora.targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (4, 4, 1)
    assert (t.learning_rate, t.logging_steps, t.save_steps) == (1e-4, 10, 100)
    assert t.gradient_checkpointing and t.bf16 and cfg.data.max_length == 1024
    assert cfg.swanlab.project == "Hunyuan-A13B-Instruct-Lora"
    assert cfg.data.sha256 == "1a0172c731eee506fb58f888f5efd953f7bb183f416affecbe3f93dbb9596a34"
    assert "84c3486aeee22cd6585c21771924cd538a081295" in cfg.data.url


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 1e-4\nlora:\n  rank: 8\nswanlb:\n  mode: local\n")
    with pytest.raises(UserError) as e:
        config.load(bad)
    message = str(e.value)
    assert "'train.learning_rat'" in message and "did you mean 'learning_rate'" in message
    assert "'lora.rank'" in message and "'swanlb'" in message and "did you mean 'swanlab'" in message


def test_wrong_types_and_values_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  per_device_train_batch_size: four\nswanlab:\n  mode: offline\n")
    with pytest.raises(UserError, match=r"per_device_train_batch_size' is 'four', expected int.*mode' is 'offline'"):
        config.load(bad)


def test_gate_is_never_a_lora_target():
    with pytest.raises(UserError, match="matches the router"):
        config.load(overrides=["lora.preset=custom", "lora.target_modules=[q_proj, gate]"])


def test_overrides_and_path_arguments_take_precedence(tmp_path):
    cfg = config.load(REPO / "configs/huanhuan.yaml", overrides=["train.learning_rate=2e-4", "lora.r=16"],
                      model_dir="/root/autodl-tmp/m", data="my.jsonl", output_dir="out/x")
    assert cfg.train.learning_rate == 2e-4 and cfg.lora.r == 16
    assert (cfg.model.dir, cfg.data.path, cfg.run.output_dir) == ("/root/autodl-tmp/m", "my.jsonl", "out/x")
    assert cfg.data.url is None and cfg.data.sha256 is None  # a user's own file is not checked against the pin


def test_malformed_yaml_says_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        config.load(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(REPO / "configs/demo.yaml")
    again = config.load(cfg.dump(tmp_path / "resolved.yaml"))
    assert again.to_dict() == cfg.to_dict()
