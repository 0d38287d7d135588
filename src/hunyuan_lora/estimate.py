"""What a run will need, from the config and config.json alone: parameter counts, steps, disk, memory.

    params = count_parameters(model_config, cfg.lora.targets(), cfg.lora.r)     # meta device, no weights
    active = active_parameters(model_config)                                    # per token (MFU)
    steps = expected_steps(cfg, examples)
    mem = estimate_memory(model_config, params, dtype_bytes=2, tokens=4 * 1024, gradient_checkpointing=True, gpus=1)

Arithmetic only (the meta-device model gives the shapes); check.py compares it with the machine.

Estimates (deliberately simple; the numbers appear in the table):
    checkpoint  = adapter (LoRA params x 4 B, fp32) + optimizer (LoRA params x 4 B x 3: fp32 weights,
                  Adam m and v) + the tokenizer files the Trainer copies; x checkpoints kept
                  (save_total_limit + 1 while the next one is written) or expected (steps / save_steps
                  + 1 for a SIGTERM save), + the final adapter
    memory      = weights (params x dtype bytes) + LoRA, grads, Adam (LoRA params x 4 B x 4)
                  + activations: hidden x tokens x layers x dtype bytes with gradient checkpointing
                  (a rough 37 x that without it) + logits (tokens x vocab x 4 B x 2)
                  + 1 GiB per GPU (CUDA context, allocator), where tokens = micro-batch x longest sample
                  ZeRO-3 (accelerate launch, N processes), per GPU: weights / N + LoRA, grads, Adam / N
                  + activations + logits + two MoE blocks gathered whole (leaf modules: the one running,
                  the next prefetched) + 1 GiB; with param offload the weights / N live in host RAM
                  nf4 (QLoRA): the Linear weights NF4 quantises x 0.516 B (4 bit + block scales, double
                  quantised) + everything else (embedding/lm_head, norms, router) x 4 B (peft's
                  prepare_model_for_kbit_training casts it to fp32)
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from functools import lru_cache

from .config import Config
from .errors import UserError
from .scale import NF4_BYTES_PER_PARAM, skipped_by_quantization

GIB = 2**30
CUDA_OVERHEAD_BYTES = GIB  # per GPU: context + allocator slack


def human_bytes(n: float) -> str:
    """Decimal units, as disks and GPU specs are quoted: 160.8 GB, 5.8 MB, 1.0 kB."""
    if n >= 1e9:
        return f"{n / 1e9:.1f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def active_parameters(model_config: dict) -> int:
    """Parameters one token passes through: per layer attention + shared expert + top-k routed experts,
    plus the lm_head (6x this per token = training FLOPs with frozen base weights and recompute)."""
    c = model_config
    H, hd = c["hidden_size"], c["attention_head_dim"]

    def at(key: str, i: int, default=None):  # a per-layer list's entry, or the one value for every layer
        v = c.get(key, default)
        return v[i] if isinstance(v, list) else v

    total = c["vocab_size"] * H
    for i in range(c["num_hidden_layers"]):
        attn = H * c["num_attention_heads"] * hd * 2 + H * c["num_key_value_heads"] * hd * 2
        shared = 3 * H * c["intermediate_size"] * (at("num_shared_expert", i, 1) if c["use_mixed_mlp_moe"] else 0)
        routed = at("moe_topk", i) * 3 * H * at("moe_intermediate_size", i) if c["num_experts"] > 1 else 0
        total += attn + shared + routed
    return total


@dataclass
class ParamCount:
    total: int  # every parameter once (lm_head is tied to the embedding)
    lora: int  # LoRA A + B parameters the targets add: r x (in + out) per wrapped Linear
    per_target: dict[str, int]  # target -> Linear modules it wraps
    quantizable: int = 0  # parameters in the Linear layers NF4 quantises (all but the router and lm_head)
    moe_block: int = 0  # parameters of one decoder layer's MoE block (what ZeRO-3 gathers at once)


@dataclass
class MemoryEstimate:
    weights: int
    lora_and_optimizer: int  # LoRA weights, their grads, Adam m and v: all fp32
    activations: int
    logits: int
    overhead: int  # per-GPU CUDA context / allocator slack, summed
    gathered: int = 0  # ZeRO-3: MoE blocks gathered whole on each GPU
    per_gpu_of: int = 0  # ZeRO-3: the processes the estimate is one share of (0: not sharded)

    @property
    def total(self) -> int:
        return self.weights + self.lora_and_optimizer + self.activations + self.logits + self.overhead + self.gathered

    def describe(self) -> str:
        return (
            f"~{human_bytes(self.total)} (weights {human_bytes(self.weights)}"
            f" + LoRA/grads/Adam {human_bytes(self.lora_and_optimizer)}"
            f" + activations {human_bytes(self.activations)} + logits {human_bytes(self.logits)}"
            + (f" + ZeRO-3 gathered MoE blocks {human_bytes(self.gathered)}" if self.gathered else "")
            + (f" + CUDA overhead {human_bytes(self.overhead)}" if self.overhead else "")
            + ")"
            + (f" per GPU, ZeRO-3 over {self.per_gpu_of} processes" if self.per_gpu_of else "")
        )


# ---------------------------------------------------------------------------------------------
# parameters, from config.json alone


@lru_cache(maxsize=8)
def _meta_linears(config_json: str) -> tuple[int, tuple[tuple[str, int, int], ...], tuple[str, ...]]:
    """(total params, (name, in, out) of every nn.Linear, names of every other module) on the meta device."""
    import torch

    from .hunyuan.configuration_hunyuan import HunYuanConfig
    from .hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

    with torch.device("meta"):  # shapes only: the 80 B model costs no memory and ~4 s
        model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**json.loads(config_json)))
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    linears, others = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
        elif name:
            others.append(name)
    return total, tuple(linears), tuple(others)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's name is the target or ends in '.target'."""
    return name == target or name.endswith("." + target)


def count_parameters(model_config: dict, targets: list[str], r: int) -> ParamCount:
    try:
        total, linears, others = _meta_linears(json.dumps(model_config, sort_keys=True))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(
            f"the model cannot be built from config.json ({type(e).__name__}: {e})",
            where="config.json",
            fix="restore the model folder's original config.json",
        ) from e
    lora, per_target, not_linear = 0, {}, []
    for target in targets:
        hits = [(n, i, o) for n, i, o in linears if _matches(n, target)]
        per_target[target] = len(hits)
        lora += sum(r * (i + o) for _, i, o in hits)
        if not hits and any(_matches(n, target) for n in others):
            not_linear.append(target)
    unmatched = [t for t, n in per_target.items() if n == 0]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _, _ in linears})
        hints = []
        for t in unmatched:
            kind = "matches modules that are not nn.Linear" if t in not_linear else "matches no module"
            close = difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=1)
            hints.append(f"'{t}' {kind}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UserError(
            "LoRA target(s) " + "; ".join(hints) + f"; the model's Linear layers are named {', '.join(suffixes)}",
            where="lora.target_modules",
            fix="correct lora.target_modules (or pick lora.preset: tutorial / attention / attention_shared)",
        )
    quantizable = sum(i * o for n, i, o in linears if not skipped_by_quantization(n))
    moe_block = sum(i * o for n, i, o in linears if ".layers.0.mlp." in n)
    return ParamCount(total=total, lora=lora, per_target=per_target, quantizable=quantizable, moe_block=moe_block)


# ---------------------------------------------------------------------------------------------
# disk and memory estimates


def expected_steps(cfg: Config, examples: int | None) -> int | None:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if examples is None:
        return None
    # The Trainer's count (4.51): optimizer steps per epoch = batches // accumulation, at least 1.
    batches = math.ceil(examples / cfg.train.per_device_train_batch_size)
    return math.ceil(max(batches // cfg.train.gradient_accumulation_steps, 1) * cfg.train.num_train_epochs)


def checkpoint_bytes(params: ParamCount, tokenizer_bytes: int) -> int:
    adapter = params.lora * 4  # PEFT keeps (and saves) LoRA weights in fp32
    optimizer = params.lora * 4 * 3  # fp32 weights + Adam m, v
    return adapter + optimizer + tokenizer_bytes


def disk_needed(cfg: Config, per_checkpoint: int, adapter_bytes: int, steps: int | None) -> tuple[int, int]:
    """(bytes, checkpoints counted)."""
    expected = steps // cfg.train.save_steps + 1 if steps is not None else 1  # + 1: a SIGTERM save
    kept = cfg.train.save_total_limit
    n = min(expected, kept + 1) if kept else expected  # the Trainer deletes the oldest after writing the next
    return n * per_checkpoint + adapter_bytes, n


def estimate_memory(
    model_config: dict,
    params: ParamCount,
    dtype_bytes: int,
    tokens: int,
    gradient_checkpointing: bool,
    gpus: int,
    *,
    zero3_processes: int = 0,
    offload_param: bool = False,
    nf4: bool = False,
) -> MemoryEstimate:
    """The whole run's memory; with zero3_processes, what ONE of those processes' GPU holds."""
    hidden, layers = model_config["hidden_size"], model_config["num_hidden_layers"]
    per_layer = hidden * tokens * dtype_bytes  # the layer input kept for recomputation
    if not gradient_checkpointing:
        per_layer *= 37  # rough: attention + the 8 routed and the shared expert's intermediates
    if nf4:
        weights = params.quantizable * NF4_BYTES_PER_PARAM + (params.total - params.quantizable) * 4
    else:
        weights = params.total * dtype_bytes
    shards = max(zero3_processes, 1)
    return MemoryEstimate(
        weights=0 if offload_param else math.ceil(weights / shards),  # ZeRO-3: 1/N of every tensor per GPU
        lora_and_optimizer=math.ceil(params.lora * 4 * 4 / shards),  # fp32 weights, grads, Adam m, v
        activations=per_layer * layers,
        logits=tokens * model_config["vocab_size"] * 4 * 2,  # fp32 logits and their gradient
        overhead=CUDA_OVERHEAD_BYTES * gpus,
        gathered=2 * params.moe_block * dtype_bytes if zero3_processes else 0,
        per_gpu_of=zero3_processes,
    )
