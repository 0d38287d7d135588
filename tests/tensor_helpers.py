"""Helpers the MoE tests share (bf16 and NF4 paths)."""

from __future__ import annotations

import torch


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
