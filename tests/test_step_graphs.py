"""train.cuda_graphs (step_graphs.py): the 4-D mask the graphed step hands the model, the checkpoint whose
recompute repeats the forward's dropout inside a CUDA graph, and graphed training steps against eager ones.

    .venv/bin/python -m pytest tests/test_step_graphs.py          # CPU: the mask, the config check
    python3 -m pytest tests/test_step_graphs.py -m gpu             # CUDA: capture and replay
"""

from __future__ import annotations

import contextlib
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from tensor_helpers import randomise_lora, rel
from test_fast_moe import TARGETS, set_moe_impl, tiny_config

from hunyuan_lora import config as config_mod
from hunyuan_lora.callbacks import BatchCounter
from hunyuan_lora.errors import UserError
from hunyuan_lora.hunyuan import fast_moe
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.layer_checkpoint import LayerCheckpoint
from hunyuan_lora.step_graphs import StepGraphs, count_batch, with_4d_mask
from hunyuan_lora.training import walk_trainable_only

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def packed_batch(lengths: list[int], pad: int, device: str, seed: int = 0) -> dict:
    """One packed row as train.packing + pad_to_multiple_of build it: samples back to back, a padding block."""
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths) + pad
    ids = torch.randint(0, 1000, (1, total), generator=g)
    positions = torch.cat([torch.arange(n) for n in [*lengths, pad] if n])[None]
    mask = torch.ones(1, total, dtype=torch.long)
    labels = ids.clone()
    if pad:
        mask[:, -pad:] = 0
        labels[:, -pad:] = -100
        ids[:, -pad:] = 1023
    batch = {"input_ids": ids, "position_ids": positions, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def fast_model(device: str, dtype: torch.dtype, dropout: float = 0.0, attention_dropout: float = 0.0):
    torch.manual_seed(0)
    base = HunYuanMoEV1ForCausalLM(tiny_config(attention_dropout=attention_dropout)).to(device, dtype)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=32, lora_dropout=dropout, target_modules=TARGETS))
    randomise_lora(model, 1)
    set_moe_impl(model, "fast")
    fast_moe.stack_expert_lora(model)  # as training.attach_lora: its per-expert views must not pin a stream
    model.config.use_cache = False
    model.train()
    return model


def test_the_graphed_steps_mask_gives_the_models_own_result():
    """The 4-D mask built outside the graph (causal, packed samples, the padding block) is the one the model
    builds itself from the 2-D mask and the position ids: the same logits."""
    model = fast_model("cpu", torch.float32).eval()
    batch = packed_batch([7, 12, 5], pad=8, device="cpu")
    graphed = with_4d_mask(batch)
    assert graphed["attention_mask"].shape == (1, 1, 32, 32)
    with torch.no_grad():
        own = model(**batch).logits
        given = model(**graphed).logits
    assert torch.equal(own, given)
    # not vacuous: without the packed samples' blocks the logits differ
    causal = with_4d_mask({k: v for k, v in batch.items() if k not in ("position_ids", "attention_mask")})
    with torch.no_grad():
        assert not torch.allclose(model(**{**batch, "attention_mask": causal["attention_mask"]}).logits, own)


def test_the_training_mask_built_without_host_checks_is_the_checked_one():
    """In training the mask is built without asking the host whether the rows are packed or padded (that reads
    the ids, a sync on a GPU): for packed, padded and plain rows it allows exactly what the checked mask allows
    (None: plain causal)."""
    from hunyuan_lora.hunyuan.modeling_hunyuan import attention_mask_4d

    packed = packed_batch([7, 12, 5], pad=8, device="cpu")
    T = 32
    plain = torch.arange(T)[None].expand(2, -1)
    padded = torch.ones(2, T, dtype=torch.long)
    padded[1, 20:] = 0
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    cases = [
        (packed["attention_mask"], packed["position_ids"]),
        (None, plain),
        (padded, plain),
        (padded.clone().fill_(1), plain),
    ]
    for mask, positions in cases:
        checked = attention_mask_4d(mask, positions, T, 0)
        built = attention_mask_4d(mask, positions, T, 0, without_sync=True)
        assert torch.equal(built, (causal if checked is None else checked).expand_as(built))
    assert not torch.equal(attention_mask_4d(*cases[0], T, 0, without_sync=True), causal.expand(1, 1, T, T))


def test_renewed_expert_lora_views_are_still_the_stacked_parameters():
    """Before its first step a graphed run makes the per-expert LoRA weights anew (fast_moe.renew_expert_lora_views):
    each is again a view of its stacked trainable tensor, so the adapter's state dict and the gradients that reach
    the stacked tensors are what they were."""
    model = fast_model("cpu", torch.float32)
    batch = packed_batch([7, 12, 5], pad=8, device="cpu")
    before = {k: v.clone() for k, v in model.state_dict().items() if "lora" in k}

    def stacked_grads():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if fast_moe.STACKED_PREFIX in n}

    grads = stacked_grads()
    layers = model.config.num_hidden_layers
    assert fast_moe.renew_expert_lora_views(model) == layers * 3 * 2 * model.config.num_experts
    moe = model.base_model.model.model.layers[0].mlp
    view = moe.experts[2].down_proj.lora_B["default"].weight
    assert view._base is moe.stacked_down_proj_B_default
    assert view.grad_fn is not None  # still differentiable: the per-expert path (a fallback) trains through it
    assert view.data_ptr() == moe.stacked_down_proj_B_default[2].data_ptr()
    after = {k: v for k, v in model.state_dict().items() if "lora" in k}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    renewed = stacked_grads()
    assert renewed.keys() == grads.keys()
    assert all(torch.equal(renewed[n], grads[n]) for n in grads)


def test_replayed_steps_reach_the_batch_counters():
    """A replayed step runs no forward hook; step_graphs.count_batch hands its micro-batch to the counters the
    model carries, which count it as the hook would, and a detached counter is no longer called."""
    model = fast_model("cpu", torch.float32)
    batch = packed_batch([7, 12, 5], pad=8, device="cpu")
    counter = BatchCounter()
    counter.attach(model)
    count_batch(model, {k: v for k, v in batch.items() if k != "labels"})
    assert counter.take() == (3, 24)  # 3 packed samples, 24 real tokens (the 8 padding ones masked)
    counter.detach()
    count_batch(model, batch)
    assert counter.take() == (0, 0)


def test_zeroing_keeps_the_gradient_tensors_for_the_graphs():
    """With train.cuda_graphs the Trainer's zero_grad zeroes the gradients in place (the graphs add into those very
    tensors); without it they are set to None as before."""
    for keep in (True, False):
        model = fast_model("cpu", torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params)
        accelerator = SimpleNamespace(clip_grad_norm_=lambda *a, **k: None)
        assert walk_trainable_only(model, optimizer, accelerator, keep_grads=keep) == params
        model(**packed_batch([7, 12, 5], pad=8, device="cpu")).loss.backward()
        grads = [p.grad for p in params]
        model.zero_grad()
        if keep:
            assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
        else:
            assert all(p.grad is None for p in params)


def test_cuda_graphs_needs_the_fast_moe():
    with pytest.raises(UserError, match="train.cuda_graphs needs model.moe_impl: fast"):
        config_mod.load(None, overrides=["train.cuda_graphs=true", "model.moe_impl=upstream"])


@pytest.mark.gpu
@cuda
def test_a_captured_checkpoint_recomputes_the_forwards_dropout():
    """y = dropout(x) * w under the checkpoint: d sum(y) / dw = sum(y) at w = 1 exactly when the recompute drew
    the forward's mask. Eager, then captured and replayed: a new mask every replay, always the same twice."""
    states = LayerCheckpoint(0)
    states.use_generator_states(torch.device("cuda"))
    w = torch.nn.Parameter(torch.ones((), device="cuda"))
    x = torch.ones(1 << 16, device="cuda")

    def layer(inputs):
        return F.dropout(inputs, 0.5, training=True) * w

    def step():
        loss = states(layer, x).sum()
        loss.backward()
        return loss.detach()

    eager = step()
    assert torch.equal(w.grad, eager)
    graph = torch.cuda.CUDAGraph()
    for state in states.states():
        graph.register_generator_state(state)
    w.grad.zero_()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        loss = step()
    seen = []
    for _ in range(3):
        w.grad.zero_()
        graph.replay()
        assert torch.equal(w.grad, loss), (w.grad.item(), loss.item())
        seen.append(loss.item())
    assert len(set(seen + [eager.item()])) == 4, seen  # a fresh mask each time
    assert abs(seen[0] / x.numel() - 1) < 0.05  # dropout at 0.5, rescaled by 2


def _step(model):
    def step(batch, items):
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(**batch, num_items_in_batch=items).loss
        loss.backward()
        return loss.detach()

    return step


@pytest.mark.gpu
@cuda
def test_graphed_training_steps_match_eager_ones():
    """Without dropout the micro-steps are deterministic: graphed (the first shape warmed up, the second captured
    at first sight, replays) and eager give the same loss and the same LoRA gradients."""
    from hunyuan_lora.hunyuan import grouped_moe

    if not grouped_moe.grouped_mm_available(torch.device("cuda"), torch.bfloat16):
        pytest.skip("torch._grouped_mm needs compute capability 9.0")
    model = fast_model("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    checkpoint = LayerCheckpoint(1 << 40)  # the stash recorded and taken back inside the graphs too
    checkpoint.install(model)
    graphs = StepGraphs(model, params, checkpoint)
    step = _step(model)
    shapes = [([20, 30, 14], 0), ([50, 40, 20], 18)]  # 64 and 128 tokens
    for i, s in enumerate([0, 0, 1, 0, 1, 1, 0]):
        batch = packed_batch(*shapes[s], device="cuda", seed=i)
        items = (batch["labels"] != -100).sum()
        results = []
        for run in (step, partial(graphs.run, step)):
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()
            loss = run(batch, items)
            results.append((loss.float(), [p.grad.float().clone() for p in params]))
        (loss_e, grads_e), (loss_g, grads_g) = results
        assert rel(loss_g, loss_e) < 1e-3, (i, loss_g, loss_e)
        for g_e, g_g in zip(grads_e, grads_g):
            assert rel(g_g, g_e) < 1e-2 or g_e.norm() == g_g.norm() == 0, i
    assert graphs.failed is None
    assert graphs.cold_failures == {}
    assert len(graphs.graphs) == 2
    assert graphs.replays == 6  # the first shape from its second micro-step on, the second from its first


class _ReplayedStep:
    """What StepGraphs keeps of a capture, where no GPU exists: the model's loss computed again on the static inputs."""

    def __init__(self, model, inputs: dict):
        self.model, self.inputs = model, {k: v.clone() for k, v in inputs.items()}
        self.loss = torch.zeros(())

    def replay(self) -> None:
        self.loss.copy_(self.model(**self.inputs).loss.detach())


def test_later_shapes_are_captured_at_first_sight_and_warmed_up_where_that_fails(monkeypatch):
    """The capture order, with the capture itself replaced (it needs a GPU): the first shape runs one eager warm-up
    step, then is captured; a later shape is captured at its first micro-step; one whose capture fails there runs
    eagerly that once and is captured at its next; a first shape that fails to capture leaves the run eager."""
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    model = fast_model("cpu", torch.float32)
    fails: set[int] = set()
    attempts: list[int] = []

    def capture(self, step, inputs, num_items):
        length = inputs["input_ids"].shape[1]
        attempts.append(length)
        if length in fails:
            fails.discard(length)
            raise RuntimeError(f"capture of {length} failed")
        replayed = _ReplayedStep(model, inputs)
        return replayed, replayed.inputs, num_items.clone(), replayed.loss

    monkeypatch.setattr(StepGraphs, "_capture", capture)
    eager: list[int] = []

    def step(batch, items):
        eager.append(batch["input_ids"].shape[1])
        return model(**batch).loss.detach()

    def run(graphs, lengths):
        eager.clear()
        for i, n in enumerate(lengths):
            batch = packed_batch([n - 4], pad=4, device="cpu", seed=i)
            loss = graphs.run(step, batch, torch.tensor(n))
            assert torch.equal(loss, model(**batch).loss.detach())  # replayed or not, this micro-batch's loss
        return eager[:]

    fails.add(24)
    graphs = StepGraphs(model, [], None)
    assert run(graphs, [16, 16, 24, 24, 32, 16, 24, 32]) == [16, 24]  # 16's warm-up, 24's failed capture
    assert attempts == [16, 24, 24, 32]
    assert list(graphs.cold_failures.values()) == ["RuntimeError: capture of 24 failed"]
    assert graphs.failed is None
    assert graphs.replays == 6

    attempts.clear()
    fails.add(16)
    graphs = StepGraphs(model, [], None)
    assert run(graphs, [16, 16, 16, 24]) == [16, 16, 16, 24]
    assert attempts == [16]
    assert graphs.failed == "RuntimeError: capture of 16 failed"
    assert graphs.replays == 0
