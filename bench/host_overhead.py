"""Host overhead per decoder layer: the real topology at a tiny width, so the GPU has nothing to do.

    .venv/bin/python bench/host_overhead.py [--device cpu|cuda] [--quant nf4|none] [--depths 2 6]
        [--tokens 1024] [--steps 10] [--profile] [--config configs/huanhuan_qlora.yaml] [--stash-gib 8]

Every decoder layer keeps the real model's module tree (32 heads / 8 KV heads, 64 experts, top-8,
shared expert, the tutorial's LoRA on the 7 names over all experts), only its widths shrink (hidden
128, expert width 128, head dim 16, vocab 1,024). What remains per layer is what the host does:
Python, autograd, PEFT and bitsandbytes plumbing, launches. The full-width cost per layer is this
plus the GPU's own time (make probe measures both together). One optimizer step = forward with
gradient checkpointing (non-reentrant, as training.attach_lora sets it; with --stash-gib through the Trainer's
layer_checkpoint.LayerCheckpoint and that expert stash), backward, gradient clipping
at 1.0 and AdamW (fused on CUDA), under bf16 autocast as Trainer(bf16=True) runs it. Per layer = the
slope of the median step time over the depths.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hunyuan_lora import config as config_mod
from hunyuan_lora.hunyuan.random_init import build_random_model, real_or_folder_config
from hunyuan_lora.runtime import placement
from hunyuan_lora.scale import QUANT_SKIP_MODULES
from hunyuan_lora.training import attach_lora

TINY = {
    "hidden_size": 128,
    "intermediate_size": 128,
    "attention_head_dim": 16,
    "vocab_size": 1024,
    "pad_token_id": 1023,
    "eos_token_id": 1022,
    "eod_token_id": 1021,
    "sep_token_id": 1020,
    "bos_token_id": 1,
}


def real_topology(layers: int, tiny: bool = True) -> dict:
    cfg, _ = real_or_folder_config(None)
    cfg = {**cfg, **(TINY if tiny else {}), "num_hidden_layers": layers}
    for key, value in list(cfg.items()):
        if isinstance(value, list) and key != "architectures":
            cfg[key] = value[:layers]
    if tiny:
        cfg["moe_intermediate_size"] = [128] * layers
    return cfg


def packed_batch(tokens: int, device: str, seed: int = 0) -> dict:
    """One packed row of ~16 samples (position ids restart per sample), as train.packing builds it."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(tokens - 1, generator=g)[:15].add(1).tolist())
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    input_ids = torch.randint(2, 1000, (1, tokens), generator=g)
    return {"input_ids": input_ids.to(device), "position_ids": position_ids.to(device), "labels": input_ids.to(device)}


def build(cfg, layers: int, device: str, quant: str, variant: str = "all", tiny: bool = True, stash_gib=None):
    """variant: "all" (the code as it is), "no-dense" (attention and shared expert through PEFT's modules),
    "no-stack" (PEFT's 2 x 64 LoRA leaves per expert projection)."""
    run_cfg = config_mod.load(cfg)
    run_cfg.model.quantization = quant
    run_cfg.model.moe_impl = "fast"
    model, _ = build_random_model(
        real_topology(layers, tiny),
        moe_impl="fast",
        quantization=quant,
        device=device,
        dtype=torch.bfloat16,
        skip=QUANT_SKIP_MODULES,
    )
    if quant == "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if variant == "no-dense":
        for m in model.modules():
            if hasattr(m, "fast_linears"):
                m.fast_linears = False
    if variant == "no-stack":
        from hunyuan_lora.hunyuan import fast_moe

        fast_moe.stack_expert_lora = lambda model: 0
    model = attach_lora(run_cfg, model, placement(run_cfg))
    if stash_gib is not None:
        from hunyuan_lora.layer_checkpoint import LayerCheckpoint

        LayerCheckpoint(int(stash_gib * 2**30)).install(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    return model, params, optimizer


def step(model, params, optimizer, batch, device: str) -> None:
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_depth(args, layers: int) -> dict:
    model, params, optimizer = build(
        args.config, layers, args.device, args.quant, args.variant, not args.real_width, args.stash_gib
    )
    batch = packed_batch(args.tokens, args.device)
    for _ in range(3):
        step(model, params, optimizer, batch, args.device)
    if args.sync_debug:  # every host-device synchronisation of one step, with where it comes from
        torch.cuda.set_sync_debug_mode("warn")
        step(model, params, optimizer, batch, args.device)
        torch.cuda.set_sync_debug_mode(0)
    times = []
    for _ in range(args.steps):
        sync(args.device)
        t0 = time.perf_counter()
        step(model, params, optimizer, batch, args.device)
        sync(args.device)
        times.append(time.perf_counter() - t0)
    out = {"layers": layers, "median_ms": 1000 * statistics.median(times), "trainable_tensors": len(params)}
    if args.cprofile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            step(model, params, optimizer, batch, args.device)
        sync(args.device)
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(args.cprofile)
        stats.sort_stats("cumulative").print_stats(args.cprofile)
        out["cprofile"] = text.getvalue()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=acts) as prof:
            step(model, params, optimizer, batch, args.device)
            sync(args.device)
        events = prof.key_averages()
        out["ops"] = sum(e.count for e in events if e.key.startswith("aten::"))
        out["gpu_busy_ms"] = sum(e.self_device_time_total for e in events) / 1000
        out["top"] = [
            (e.key, round(e.self_cpu_time_total / 1000, 2), e.count)
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:25]
        ]
    del model, optimizer
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    parser.add_argument("--config", default="configs/huanhuan_qlora.yaml")
    parser.add_argument("--depths", type=int, nargs=2, default=[2, 6])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--real-width", action="store_true", help="the real widths (the GPU's time included)")
    parser.add_argument("--sync-debug", action="store_true", help="warn at every device sync of one step")
    parser.add_argument(
        "--variant",
        default="all",
        choices=["all", "no-dense", "no-stack"],
        help="leave one of this session's host-time changes out, for its share",
    )
    parser.add_argument(
        "--stash-gib",
        type=float,
        default=None,
        help="checkpoint through LayerCheckpoint with this expert stash (0: installed, stash off; unset: torch's)",
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--profile", action="store_true", help="operator table of one step at the larger depth")
    parser.add_argument(
        "--cprofile",
        type=int,
        default=0,
        metavar="N",
        help="Python functions (cProfile) over 3 steps at the larger depth: the top N by own time",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    lo = time_depth(argparse.Namespace(**{**vars(args), "profile": False, "cprofile": 0}), args.depths[0])
    hi = time_depth(args, args.depths[1])
    per_layer = (hi["median_ms"] - lo["median_ms"]) / (args.depths[1] - args.depths[0])
    print(
        f"device {args.device} quant {args.quant} variant {args.variant} stash {args.stash_gib} tokens {args.tokens}: "
        f"depth {lo['layers']} {lo['median_ms']:.1f} ms, "
        f"depth {hi['layers']} {hi['median_ms']:.1f} ms per optimizer step -> {per_layer:.2f} ms per layer; "
        f"trainable tensors {lo['trainable_tensors']} / {hi['trainable_tensors']}"
    )
    if args.profile:
        print(
            f"aten ops in one step at depth {hi['layers']}: {hi['ops']} ({hi['ops'] / hi['layers']:.0f} per layer); "
            f"GPU busy {hi['gpu_busy_ms']:.1f} ms of the profiled step"
        )
        for key, ms, count in hi["top"]:
            print(f"  {ms:8.2f} ms self CPU  {count:6d}x  {key}")
    if args.cprofile:
        print(hi["cprofile"])


if __name__ == "__main__":
    main()
