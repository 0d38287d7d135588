"""Activation checkpointing of the decoder layers on the fast path, installed as the model's
`_gradient_checkpointing_func` (what transformers' gradient_checkpointing_enable sets; HunYuanModel calls it with
each decoder layer's bound `__call__`).

It is torch's non-reentrant checkpoint, with two additions:
  * each call of a layer has a `RecomputeStash` (grouped_moe.py): the forward records its frozen expert
    products' outputs, the recompute takes them back instead of multiplying (and, under NF4, dequantising)
    again. train.expert_stash_gib bounds what all layers hold at once;
  * under train.cuda_graphs, the layer's random numbers (LoRA and attention dropout) come from generator states
    of its own: torch's checkpoint saves the generator's seed to repeat them at the recompute, which capture
    forbids. Each layer gets two states, equal at creation, one for the forward and one for the recompute; early
    stopping of the recompute is off, so it consumes as many numbers as the forward did and they stay in step.
    StepGraphs registers the states with every graph (the scheme of torch.compile's CUDA graphs).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.utils.checkpoint as torch_checkpoint

from .hunyuan.grouped_moe import RecomputeStash, StashBudget


class LayerCheckpoint:
    def __init__(self, stash_bytes: int):
        self.budget = StashBudget(stash_bytes)
        self.generator: torch.Generator | None = None
        self.pairs: dict[int, tuple[torch.Generator, torch.Generator]] = {}
        self.made = 0  # pairs made so far, new ones after use_generator_states too: each its own seed
        self.modules: list[torch.nn.Module] = []  # where install put it

    def use_generator_states(self, device: torch.device) -> None:
        """Draw each layer's random numbers from states of its own (train.cuda_graphs), new ones from now on."""
        self.generator = torch.cuda.default_generators[device.index if device.index is not None else 0]
        self.pairs = {}

    def states(self) -> list[torch.Generator]:
        return [state for pair in self.pairs.values() for state in pair]

    def install(self, model: torch.nn.Module) -> int:
        """Replace the checkpoint function of every module that checkpoints its layers; returns how many."""
        self.modules = [
            module
            for module in model.modules()
            if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func")
        ]
        for module in self.modules:
            module._gradient_checkpointing_func = self
        return len(self.modules)

    def installed(self) -> bool:
        """Whether the layers still checkpoint through this (Trainer.train enables checkpointing anew)."""
        return bool(self.modules) and all(m.__dict__.get("_gradient_checkpointing_func") is self for m in self.modules)

    def _pair(self, owner: object) -> tuple[torch.Generator, torch.Generator]:
        pair = self.pairs.get(id(owner))
        if pair is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("a checkpointed layer ran for the first time inside a CUDA graph capture")
            # distinct per layer, reproducible from the run's seed, drawing nothing from any generator
            seed = self.generator.initial_seed() + 1 + self.made
            self.made += 1
            pair = tuple(self.generator.clone_state().manual_seed(seed) for _ in range(2))
            self.pairs[id(owner)] = pair
        return pair

    @contextmanager
    def _drawing_from(self, state: torch.Generator | None):
        if state is None:
            yield
            return
        previous = self.generator.graphsafe_get_state()
        self.generator.graphsafe_set_state(state)
        try:
            yield
        finally:
            self.generator.graphsafe_set_state(previous)

    def __call__(self, function, *args, **kwargs):
        stash = RecomputeStash(self.budget)
        pair = self._pair(getattr(function, "__self__", function)) if self.generator is not None else None
        calls = [0]

        def run(*inner_args, **inner_kwargs):
            recompute = calls[0] > 0  # the first call is the forward, every later one a recompute
            calls[0] += 1
            with stash.active(recording=not recompute), self._drawing_from(pair and pair[recompute]):
                return function(*inner_args, **inner_kwargs)

        if pair is None:
            return torch_checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
        with torch_checkpoint.set_checkpoint_early_stop(False):
            return torch_checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
