"""Helpers the MoE tests share (bf16 and NF4 paths)."""

from __future__ import annotations

import torch

# A small model that still takes CUDA's fast kernels (grouped products, tensor-core tiles): the CUDA tests' widths
CUDA_WIDTHS = {
    "hidden_size": 256,
    "intermediate_size": 128,
    "moe_intermediate_size": [128] * 2,
    "num_experts": 16,
    "moe_topk": [4] * 2,
    "num_attention_heads": 4,
    "attention_head_dim": 64,
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error |a - b| / |b| in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Seeded non-zero LoRA weights (PEFT starts B at zero, which would make every delta vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def moe_forward_backward(moe_ref: torch.nn.Module, moe_fast: torch.nn.Module, tokens: int, hidden: int):
    """The same seeded input through two MoE blocks, then the same random output gradient back.

    Returns (y_ref, y_fast, x_ref, x_fast): outputs and the inputs whose .grad the backward filled."""
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(5))
    x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y_fast = moe_ref(x_ref), moe_fast(x_fast)
    probe = torch.randn_like(y_ref)
    (y_ref * probe).sum().backward()
    (y_fast * probe).sum().backward()
    return y_ref, y_fast, x_ref, x_fast
