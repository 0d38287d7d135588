"""train.cuda_graphs: a training micro-step's forward and backward captured as one CUDA graph per input shape.

At 16 samples per step the NF4 step can be host-bound: ~430 kernels a layer, launched through Python, autograd
and PEFT, took twice as long to issue as the GPU took to run them on slower hosts (bench/NOTES.md). A captured
step issues them all with one launch. What capture needs, and how it is met here:
  * fixed shapes: one graph per input shape (train.pad_to_multiple_of keeps them few). The first `warmup`
    micro-steps of a shape run eagerly (lazy initialisation, cuDNN plans, the model's caches), the next one
    is captured and every later one replayed;
  * no host synchronisation inside: the packed-attention mask reads the position ids on the host, so it is
    built before the graph and handed to the model as a 4-D mask;
  * gradients that outlive the graph: they are allocated before the capture and the graph adds into them;
    the Trainer zeroes them after each optimizer step and must never set them to None (training.py);
  * one capture stream for all graphs, on which the per-expert LoRA views are made anew before the first
    step (fast_moe.renew_expert_lora_views: autograd would otherwise tie the capture to the default stream);
  * a recompute that draws the forward's random numbers (LoRA and attention dropout under activation
    checkpointing): torch's checkpoint saves the generator's seed for that, which capture forbids, so each
    checkpointed layer draws from generator states of its own (layer_checkpoint.py), registered with every graph;
  * Python that runs once per micro-step (the model's forward pre-hooks: callbacks.BatchCounter) runs at
    capture only, so a replayed step calls the counters itself.
A capture that fails (an operation that synchronises, a kernel that cannot be captured) is reported once and
the run continues eagerly.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable

import torch

from .layer_checkpoint import LayerCheckpoint

Step = Callable[[dict, torch.Tensor], torch.Tensor]  # (inputs, num_items_in_batch) -> loss, after backward


def with_4d_mask(inputs: dict) -> dict:
    """The micro-batch with its attention mask as the (B, 1, T, T) boolean the model builds from it in training
    (causal, padding, packed samples), built here, outside the graph."""
    from .hunyuan.modeling_hunyuan import attention_mask_4d

    ids = inputs["input_ids"]
    B, T = ids.shape
    positions = inputs.get("position_ids")
    if positions is None:
        positions = torch.arange(T, device=ids.device)[None].expand(B, -1)
    return {
        **inputs,
        "attention_mask": attention_mask_4d(inputs.get("attention_mask"), positions, T, 0, without_sync=True),
    }


class StepGraphs:
    """The micro-steps of one training run, replayed from CUDA graphs where their shapes repeat."""

    def __init__(
        self, model: torch.nn.Module, params: list[torch.Tensor], checkpoint: LayerCheckpoint | None, warmup: int = 1
    ):
        """checkpoint: the layers' checkpoint function, when the model trains with gradient checkpointing."""
        self.model, self.params, self.checkpoint, self.warmup = model, list(params), checkpoint, warmup
        self.graphs: dict[tuple, tuple] = {}
        self.seen: Counter = Counter()
        self.pool = None  # one memory pool for all graphs: they never run at the same time
        self.failed: str | None = None
        self.cold_failures: dict[tuple, str] = {}  # shapes whose capture without a warm-up failed, and why
        self.replays = 0
        self.stream = None  # the capture stream

    def run(self, step: Step, inputs: dict, num_items: torch.Tensor | None) -> torch.Tensor:
        """The micro-step `step` on `inputs` (on the GPU), eager, captured or replayed; returns its loss."""
        if self.stream is None:
            from .hunyuan.fast_moe import renew_expert_lora_views

            self.stream = torch.cuda.Stream(inputs["input_ids"].device)
            with torch.cuda.stream(self.stream):
                renew_expert_lora_views(self.model)
            self._new_generator_states(inputs["input_ids"].device)
        graphable = torch.is_tensor(num_items) and all(torch.is_tensor(t) for t in inputs.values())
        if self.failed is not None or not graphable:
            return step(inputs, num_items)
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        entry = self.graphs.get(key)
        if entry is None:
            self.seen[key] += 1
            # the first shape warms up eagerly (lazy set-up: library handles, caches, compiled kernels); later shapes
            # are captured at first sight, so no eager step's memory ever sits beside the graphs' pool
            cold = bool(self.graphs) and key not in self.cold_failures
            if not cold and self.seen[key] <= self.warmup:
                return step(inputs, num_items)
            try:
                entry = self.graphs[key] = self._capture(step, with_4d_mask(inputs), num_items)
            except Exception as e:  # any failure to capture leaves eager training, which works
                torch.cuda.synchronize()
                # the generator states the failed capture registered are unusable outside it: fresh ones
                self._new_generator_states(inputs["input_ids"].device)
                if cold:  # this shape needed its warm-up after all: this eager step is it, capture next time
                    self.cold_failures[key] = f"{type(e).__name__}: {e}"
                    self.seen[key] = self.warmup
                    return step(inputs, num_items)
                self.failed = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"train.cuda_graphs: capturing a training step failed ({self.failed}); this run continues "
                    "without CUDA graphs (set train.cuda_graphs: false to skip the attempt)",
                    stacklevel=2,
                )
                return step(inputs, num_items)
        graph, static_inputs, static_items, loss = entry
        count_batch(self.model, inputs)
        for name, tensor in with_4d_mask(inputs).items():
            static_inputs[name].copy_(tensor)
        static_items.copy_(num_items)
        graph.replay()
        self.replays += 1
        return loss.clone()  # the graph's own loss is overwritten by the next replay

    def _new_generator_states(self, device: torch.device) -> None:
        if self.checkpoint is not None:
            self.checkpoint.use_generator_states(device)

    def _capture(self, step: Step, inputs: dict, num_items: torch.Tensor) -> tuple:
        static_inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        static_items = num_items.clone()
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph's own pool holds its activations
        for state in self.checkpoint.states() if self.checkpoint is not None else ():
            graph.register_generator_state(state)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            loss = step(static_inputs, static_items)
        self.pool = graph.pool()
        return graph, static_inputs, static_items, loss.detach()


def count_batch(model: torch.nn.Module, inputs: dict) -> None:
    """What the model's batch counters (callbacks.BatchCounter) count at a forward, for a replayed step."""
    for counter in model.__dict__.get("batch_counters", ()):
        counter.count(model, (), inputs)
