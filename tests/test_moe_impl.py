"""model.moe_impl: the same checkpoint in the folder's code (upstream) or the project's fast path."""

from __future__ import annotations

from pathlib import Path

import torch

from hunyuan_lora import config, modeling, runtime

REPO = Path(__file__).resolve().parents[1]


def test_fast_impl_loads_the_same_checkpoint_and_computes_the_same_logits(patched_stand_in):
    logits = {}
    for impl in ("upstream", "fast"):
        cfg = config.load(REPO / "configs/demo.yaml", [f"model.moe_impl={impl}"], model_dir=str(patched_stand_in))
        model = modeling.load_base_model(cfg, runtime.placement(cfg)).model.eval()
        assert model.model.layers[0].mlp.moe_impl == impl
        assert (type(model).__module__.startswith("hunyuan_lora.")) is (impl == "fast")
        with torch.no_grad():
            logits[impl] = model(input_ids=torch.tensor([[815, 300, 301, 302, 819, 400]])).logits
    torch.testing.assert_close(logits["fast"], logits["upstream"], rtol=1e-5, atol=1e-5)
