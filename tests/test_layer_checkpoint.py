"""The fast path's layer checkpoint (layer_checkpoint.py) and its RecomputeStash (grouped_moe.py): the recompute
takes the forward's frozen expert products back instead of multiplying and dequantising again, and training
gives the same loss and LoRA gradients as before.

    .venv/bin/python -m pytest tests/test_layer_checkpoint.py
"""

from __future__ import annotations

import weakref

import pytest
import torch
from tensor_helpers import rel
from test_nf4_moe import ALIGNED, lora_grads, peft_pair
from test_nf4_moe import tiny_config as nf4_config
from test_step_graphs import fast_model, packed_batch

from hunyuan_lora import config, training
from hunyuan_lora.hunyuan import fast_moe, grouped_moe
from hunyuan_lora.layer_checkpoint import LayerCheckpoint

EVERYTHING = 1 << 40  # bytes: a budget nothing reaches


def phase() -> str:
    stash = grouped_moe._ACTIVE_STASH.get()
    if stash is None:
        return "backward"
    return "forward" if stash.recording else "recompute"


@pytest.mark.parametrize("budget", ["all", "some", "none"])
def test_nf4_recompute_takes_the_forwards_products(monkeypatch, budget):
    """NF4 experts under the layer checkpoint: with the whole stash the recompute dequantises nothing and the
    backward once per projection; with none the recompute dequantises and the backward reuses it (as before);
    with a budget for some products, some of each. Loss and LoRA gradients equal PEFT's on Linear4bit every way,
    the forward keeps no dequantised weight, and the budget is all given back after the backward."""
    cfg = nf4_config(**ALIGNED)
    ref, fast = peft_pair(cfg, dropout=0.0)
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    pairs = ids.numel() * cfg.moe_topk[0]
    one_gate_output = pairs * ALIGNED["moe_intermediate_size"][0] * 4  # float32 on the CPU
    limit = {"all": EVERYTHING, "some": 3 * one_gate_output, "none": 0}[budget]
    decoded: list[tuple[str, weakref.ref]] = []
    real = fast_moe.NF4Experts.materialize

    def materialize(self):
        w = real(self)
        decoded.append((phase(), weakref.ref(w)))
        return w

    monkeypatch.setattr(fast_moe.NF4Experts, "materialize", materialize)
    ref.train()
    ref.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref.config.use_cache = False
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    decoded.clear()

    fast.train()
    fast.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fast.config.use_cache = False
    checkpoint = LayerCheckpoint(limit)
    assert checkpoint.install(fast) == 1 + cfg.num_hidden_layers  # the model, each MoE
    assert checkpoint.installed()
    loss = fast(input_ids=ids, labels=ids).loss
    assert all(w() is None for _, w in decoded)  # the forward keeps no dequantised weight
    assert (checkpoint.budget.held > 0) == (budget != "none")
    loss.backward()

    layers = cfg.num_hidden_layers
    phases = [p for p, _ in decoded]
    assert phases.count("forward") == 3 * layers
    assert len(phases) == 2 * 3 * layers  # two dequantisations per projection and step every way
    recomputed = phases.count("recompute")
    assert recomputed == {"all": 0, "some": 3 * layers - 3, "none": 3 * layers}[budget], phases
    assert checkpoint.budget.held == 0
    assert rel(loss, ref_loss) < 1e-5
    g_ref, g_fast = lora_grads(ref), lora_grads(fast)
    for name in g_ref:
        assert rel(g_fast[name], g_ref[name]) < 1e-5 or g_ref[name].norm() == g_fast[name].norm() == 0, name


def test_with_dropout_the_stashed_recompute_trains_as_without_checkpointing(monkeypatch):
    """Tensor (unquantised) experts, LoRA and attention dropout on: the same seed gives the same loss and LoRA
    gradients with the stashing checkpoint as with no checkpointing at all, and the recompute runs no base
    expert product (only LoRA's rank-8 ones)."""
    batch = packed_batch([7, 12, 5], pad=8, device="cpu")
    rank = 8
    products: list[tuple[str, tuple]] = []
    real = grouped_moe.gmm

    def gmm(a, b, offs, counts):
        products.append((phase(), tuple(b.shape)))
        return real(a, b, offs, counts)

    monkeypatch.setattr(grouped_moe, "gmm", gmm)
    results = {}
    for name in ("plain", "stashed"):
        model = fast_model("cpu", torch.float32, dropout=0.1, attention_dropout=0.1)
        if name == "stashed":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            LayerCheckpoint(EVERYTHING).install(model)
        products.clear()
        torch.manual_seed(5)
        loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[name] = (loss.detach(), grads)
    recompute = [shape for p, shape in products if p == "recompute"]
    assert recompute
    assert all(rank in shape[1:] for shape in recompute), recompute
    base_forward = [shape for p, shape in products if p == "forward" and rank not in shape[1:]]
    assert len(base_forward) == 3 * model.config.num_hidden_layers
    (loss_p, grads_p), (loss_s, grads_s) = results["plain"], results["stashed"]
    assert rel(loss_s, loss_p) < 1e-6
    assert grads_p.keys() == grads_s.keys()
    for name in grads_p:
        assert rel(grads_s[name], grads_p[name]) < 1e-5 or grads_p[name].norm() == grads_s[name].norm() == 0, name


def test_a_forward_without_backward_gives_its_stash_back():
    """A forward whose recompute never comes (an aborted step) holds nothing once its graph is gone."""
    model = fast_model("cpu", torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpoint = LayerCheckpoint(EVERYTHING)
    checkpoint.install(model)
    loss = model(**packed_batch([7, 12, 5], pad=8, device="cpu")).loss
    assert checkpoint.budget.held > 0
    del loss
    assert checkpoint.budget.held == 0


def test_the_trainer_checkpoints_the_fast_path_through_the_stash(patched_stand_in, tmp_path, monkeypatch):
    """build_trainer gives a fast-path run the layer checkpoint with train.expert_stash_gib as its budget; the
    Trainer enables checkpointing anew when it starts and the first micro-step installs it again, so the
    recomputes take stashed products; with expert_stash_gib 0 none."""
    from datasets import Dataset

    from hunyuan_lora.modeling import load_base_model, load_tokenizer
    from hunyuan_lora.runtime import placement

    taken = []
    real = grouped_moe.RecomputeStash.take
    monkeypatch.setattr(grouped_moe.RecomputeStash, "take", lambda self: taken.append(real(self)) or taken[-1])
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 900, (8, 12), generator=g).tolist()]
    for gib in (1.0, 0.0):
        cfg = config.load(
            "configs/demo.yaml",
            overrides=["model.moe_impl=fast", f"train.expert_stash_gib={gib}"],
            model_dir=str(patched_stand_in),
        )
        where = placement(cfg)
        model = training.attach_lora(cfg, load_base_model(cfg, where).model, where)
        args = training.training_arguments(cfg, where, output_dir=tmp_path / str(gib), max_steps=2)
        splits = {"train": Dataset.from_list(rows)}
        trainer = training.build_trainer(cfg, model, load_tokenizer(patched_stand_in), splits, args, [])
        assert trainer.layer_checkpoint.budget.limit == int(gib * 2**30)
        taken.clear()
        trainer.train()
        assert trainer.layer_checkpoint.installed()
        layers = model.config.num_hidden_layers
        assert len(taken) == 2 * 3 * layers  # two steps, three base products per layer
        assert all((t is not None) == (gib > 0) for t in taken)


def test_a_negative_stash_is_refused_naming_the_key():
    from hunyuan_lora.errors import UserError

    with pytest.raises(UserError, match=r"train.expert_stash_gib is -2.0: 0 \(recompute all\) or more"):
        config.load(None, overrides=["train.expert_stash_gib=-2"])
    assert config.load(None, overrides=["train.expert_stash_gib=0"]).train.expert_stash_gib == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stashed_products_give_the_recomputed_gradients():
    """bf16 on the GPU (torch._grouped_mm where there is one): the LoRA gradients with the whole stash equal those
    with none, where the recompute multiplies again."""
    batch = packed_batch([20, 30, 14], pad=0, device="cuda")
    results = []
    for limit in (EVERYTHING, 0):
        model = fast_model("cuda", torch.bfloat16)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        checkpoint = LayerCheckpoint(limit)
        checkpoint.install(model)
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(**batch).loss
        assert (checkpoint.budget.held > 0) == (limit > 0)
        loss.backward()
        assert checkpoint.budget.held == 0
        results.append((loss.float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_s, grads_s), (loss_r, grads_r) = results
    assert rel(loss_s, loss_r) < 1e-3
    for name in grads_r:
        assert rel(grads_s[name], grads_r[name]) < 1e-2 or grads_r[name].norm() == grads_s[name].norm() == 0, name
