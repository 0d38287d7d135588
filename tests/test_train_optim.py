"""train.optim: the config value reaches TrainingArguments(optim=...) and the optimizer Trainer builds.

transformers 4.51.3 accepts adamw_torch_fused on the CPU (its only checks are torch >= 2.0 and no
fp16 on torch 2.0.0) and torch 2.8 has a fused CPU AdamW, so the fused run below really steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hunyuan_lora import config, data, train
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_default_is_the_tutorial_optimizer_and_typos_are_rejected():
    assert config.load(REPO / "configs/huanhuan.yaml").train.optim == "adamw_torch"
    assert config.load(overrides=["train.optim=adamw_torch_fused"]).train.optim == "adamw_torch_fused"
    assert config.load(overrides=["train.optim=adafactor"]).train.optim == "adafactor"
    with pytest.raises(UserError, match=r"train.optim 'adamw_torch_fuse' is not a Trainer optimizer.*adamw_torch_fused"):
        config.load(overrides=["train.optim=adamw_torch_fuse"])


def test_fused_adamw_reaches_the_trainer_and_trains(patched_stand_in, tmp_path, monkeypatch):
    from transformers import Trainer

    seen = {}
    create = Trainer.create_optimizer

    def spy(self):
        optimizer = create(self)
        seen.update(args_optim=str(getattr(self.args.optim, "value", self.args.optim)),
                    cls=type(optimizer).__name__, fused=optimizer.defaults.get("fused"))
        return optimizer

    monkeypatch.setattr(Trainer, "create_optimizer", spy)
    cfg = config.load(REPO / "configs/demo.yaml", ["train.optim=adamw_torch_fused", "train.max_steps=2",
                                                  "swanlab.mode=disabled", "train.resume=never"],
                      model_dir=str(patched_stand_in), output_dir=str(tmp_path / "run"))
    data.run(cfg)
    train.run(cfg)
    assert seen == {"args_optim": "adamw_torch_fused", "cls": "AdamW", "fused": True}
    history = json.loads((cfg.output_dir / "log_history.json").read_text())
    assert history[-1]["step"] == 2 and history[-1]["train_loss"] > 0
    assert "optim: adamw_torch_fused" in (cfg.output_dir / "resolved.yaml").read_text()
    shutil.rmtree(cfg.output_dir / "data", ignore_errors=True)
