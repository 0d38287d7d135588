"""Decode steps as CUDA graphs: one captured forward per (StaticCache, batch size, adapter state), replayed for
every later token, so the host launches one graph instead of ~40 kernels per layer through Python, PEFT
and bitsandbytes.

`HunYuanMoEV1ForCausalLM.forward` hands a step here when `generate` runs with a StaticCache on CUDA
(cache_implementation="static": every tensor then has a fixed shape and address), one new token per row,
no gradients, eval mode. `generate` stays in charge of everything else (sampling, stopping criteria,
streamers), so stop strings, streaming and cancel behave as in eager decoding.

Capture: two eager warm-up steps on a side stream (plans, packing, Triton compilation, cuBLAS workspaces;
they write the same keys and values into the cache as the step itself), then the capture. What a graph
holds: the addresses of the cache, the weights, the plans' tensors. It is rebuilt when the cache is a new
one (generate allocates one per batch size, and a longer one when needed), when the adapter state changes
(PEFT switches every LoRA layer at once: set_adapter, disable_adapter, merge; one layer is checked), or
when the lm_head or the first layer's weights are replaced; `reset()` drops all graphs. The graphs share
one memory pool.
"""

from __future__ import annotations

import os
import weakref
from collections import OrderedDict

import torch
from torch import nn

MAX_GRAPHS = 8  # (cache, batch, adapter state) combinations kept; the oldest goes first


def enabled() -> bool:
    """HUNYUAN_DECODE_GRAPHS=0 decodes eagerly (for A/B timing and debugging)."""
    return os.environ.get("HUNYUAN_DECODE_GRAPHS", "1") != "0"


class _Graph:
    def __init__(self, cache, inputs: dict[str, torch.Tensor]):
        self.cache = weakref.ref(cache)
        self.inputs = inputs
        self.graph = torch.cuda.CUDAGraph()
        self.logits: torch.Tensor | None = None


class DecodeGraphs:
    """The captured decode steps of one model."""

    def __init__(self):
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None
        self.probes: list[nn.Module] | None = None
        self.captures = 0  # how many graphs were captured (the probe reports it)

    def reset(self) -> None:
        self.graphs.clear()
        self.pool = None
        self.probes = None

    def _state(self, model: nn.Module) -> tuple:
        """What a graph baked in and PEFT or a loader can change: the adapter state of the first and last LoRA
        layer, the data pointers of the lm_head and of the first decoder layer's parameters."""
        if self.probes is None:
            lora = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "disable_adapters")]
            self.probes = lora[:1] + lora[-1:]
        adapters = tuple((tuple(m.active_adapters), m.merged, m.disable_adapters) for m in self.probes)
        first = next(iter(model.model.layers[0].parameters()), None)
        head = model.lm_head.weight
        return adapters + (head.data_ptr(), first.data_ptr() if first is not None else 0)

    def step(
        self,
        model: nn.Module,
        cache,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache_position: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """Logits (B, 1, V) of one decode step, from a graph captured for this cache, batch and state."""
        for key in [k for k, g in self.graphs.items() if g.cache() is None]:
            del self.graphs[key]  # generate made a new cache: the old one's graphs can never run again
        if not self.graphs:
            self.pool = None  # the last graph of the shared pool is gone, and the pool with it
        key = (id(cache), cache.key_cache[0].data_ptr(), tuple(input_ids.shape), tuple(mask.shape), self._state(model))
        graph = self.graphs.get(key)
        inputs = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "cache_position": cache_position,
            "attention_mask": mask,
        }
        if graph is None:
            graph = self._capture(model, cache, inputs)
            self.graphs[key] = graph
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
            for name, t in inputs.items():
                graph.inputs[name].copy_(t)
        graph.graph.replay()
        return graph.logits

    def _capture(self, model: nn.Module, cache, inputs: dict[str, torch.Tensor]) -> _Graph:
        static = {name: t.clone() for name, t in inputs.items()}
        graph = _Graph(cache, static)

        def forward():
            return model.decode_logits(past_key_values=cache, **static)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph.graph, pool=self.pool):
            graph.logits = forward()
        self.pool = graph.graph.pool()
        self.captures += 1
        return graph
