"""Time LoRA training steps of Hunyuan-A13B layers: the per-expert loop (upstream) vs the fast path, kernel work.

The published speed and memory figures come from `make probe` (the Trainer path, full depth); this
bench is for kernel work on the MoE layer.

    # once, on a machine that has the data (writes token-length estimates, not the data itself):
    .venv/bin/python bench/run.py --write-lengths ../shared/data/huanhuan.json .bench_data/lengths.json
    # on a GPU (real width, random weights, depths 4 and 8, every impl, every case):
    .venv/bin/python bench/run.py --real-config --depths 4 8 --impls upstream-gshard upstream fast fast-plainlm \
        --cases mb4x4 mb16x1 cat16x1 pack4096x1 pack16384x1 --profile --lengths .bench_data/lengths.json \
        --out-dir bench/results

What one measurement is: a model of `depth` decoder layers at the real width (hidden 4096, 64
experts top-8 + shared expert, attention 32/8 heads) with the real embedding and tied 128,167-token
lm_head, random weights built directly on the GPU in bf16 (router float32), PEFT LoRA (r, alpha,
dropout as the tutorial: 8 / 32 / 0.1) on `--targets`, gradient checkpointing, `torch.autocast(bf16)`
as `Trainer(bf16=True)` does, AdamW on the LoRA parameters.

One timed unit = one OPTIMIZER step: `accum` micro-steps (forward + loss + backward, gradient
accumulation as the tutorial's 4) then AdamW (foreach, Trainer's default) + zero_grad, timed with
host clocks around device synchronisations. Median of `--steps` optimizer steps after `--warmup`,
and after one untimed micro-step per distinct sequence length (plan building for a new length,
e.g. cuDNN attention, is paid once per length in a real run). Every impl sees the same batches.

Per layer = (median step at the deeper depth - at the shallower) / their difference (depths at least 4
apart, default 4 and 8); the rest is the fixed cost
(embedding, lm_head, loss, optimizer). "At 32 layers" = fixed + 32 x per layer, which is what one
GPU would take if the 32 layers were there (the real model does not fit one GPU: 160 GB of weights).
MFU = non-pad tokens/s x 6 x active parameters per token (estimate.active_parameters of the real
config, 12.74e9: 32 layers + lm_head) / the bf16 GEMM rate measured in the same run (frozen base
weights + recompute: forward, recompute and input-gradient passes = 6 x active parameters).

Impls:
  upstream-gshard  the tutorial's structure: GShard capacity dispatch (capacity max(k, k*S/E), top-1 slot
             first, overflow dropped), dense one-hot einsums [S, E, C], a Python loop over all 64
             PEFT-wrapped experts (written here from the documented structure, not Tencent's code)
  upstream   the project's dropless loop over experts with tokens (HunYuanMoE.routed_experts, the model's
             moe_impl "upstream"; what `make probe` runs for model.moe_impl: upstream without a model folder)
  fast       config.moe_impl = "fast" (hunyuan_lora/hunyuan/fast_moe.py), and the model's own lm_head
             padding (hunyuan.py `lm_logits`: training, CUDA, frozen tied weight -> logits from a cached
             copy padded to 128,192 rows, sliced to 128,167; the odd vocabulary otherwise sends cuBLAS
             to slow align-1 kernels)
  fast-plainlm  fast with the model's padding switched off (pad_lm_head=False), to measure what the
             padding is worth in the same run
  upstream-gshard and the tutorial never pad (Tencent's hunyuan.py has no padding); upstream pads as fast.
  upstream-gshard measured 1.9x slower than Tencent's own code (issue 13): quote ratios against Tencent's
  0.81 samples/s @32 layers or a `make probe` run instead.
Cases:
  mb<B>      micro-batch of B samples padded to the longest (the tutorial: mb4)
  pack<T>    T tokens per micro-batch: rows of --row-len tokens filled with whole samples,
             position ids restarting per sample (the model masks attention per sample)
  cat<S>     S whole samples concatenated into ONE row, position ids restarting per sample, no
             padding: what `train.packing: true` does with per_device_train_batch_size S
             (cat16x1 = the tutorial's 16 samples per optimizer step in one micro-batch)
Token lengths: estimated from characters, see `estimate_tokens` (no real tokenizer here).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hunyuan_lora.estimate import GIB, active_parameters
from hunyuan_lora.hunyuan import grouped_moe
from hunyuan_lora.hunyuan.a13b import real_config
from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
from hunyuan_lora.hunyuan.modeling_hunyuan import HunYuanMoE

REPO = Path(__file__).resolve().parents[1]
TUTORIAL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ACTIVE_PARAMS = active_parameters(real_config())  # per token, 32 layers + lm_head
FIRST_SPECIAL = 127957  # random token ids stay below the special tokens


# ---------------------------------------------------------------------------------------------
# data: token lengths


def estimate_tokens(record: dict) -> int:
    """Tokens of one tutorial sample, estimated: 52 + 0.75 x characters of instruction + input + output.

    52 tokens = the tutorial's text markers (`<s><|im_start|>system\\n...<|im_end|>...`, each marker
    several plain-text tokens) + the system prompt + the final pad token; 0.75 token per character of
    Chinese dialogue. Calibrated so that the mean (~94) matches the ~95 tokens/sample the issue
    reports for the tutorial. An estimate: the real tokenizer files are not in this repo.
    """
    chars = len(record["instruction"]) + len(record.get("input", "")) + len(record["output"])
    return 52 + round(0.75 * chars)


def write_lengths(data: Path, out: Path) -> None:
    records = json.loads(data.read_text(encoding="utf-8"))
    lengths = [estimate_tokens(r) for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"source": data.name, "method": estimate_tokens.__doc__.split("\n")[0], "lengths": lengths})
    )
    print(f"{len(lengths)} lengths, mean {statistics.mean(lengths):.1f}, max {max(lengths)} -> {out}")


def parse_case(case: str) -> tuple[str, int]:
    """'mb4x4' -> ('mb4', 4): micro-batch spec and gradient-accumulation micro-steps per optimizer step."""
    spec, _, accum = case.partition("x")
    if not spec.startswith(("mb", "pack", "cat")) or not spec.lstrip("mbpackt").isdigit():
        raise SystemExit(f"unknown case {case!r}: use mb<B>[x<accum>], pack<T>[x<accum>] or cat<S>[x<accum>]")
    return spec, int(accum or 1)


def make_batches(case: str, lengths: list[int], n: int, row_len: int, pad_id: int, seed: int = 0) -> list[dict]:
    """n micro-batches (CPU tensors) for `case` (mb<B> / pack<T> / cat<S>), from a seeded shuffle of the samples."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    stream = iter(order * 10)
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        if case.startswith("mb"):
            lens = [lengths[next(stream)] for _ in range(int(case[2:]))]
            T = max(lens)
            mask = torch.zeros(len(lens), T, dtype=torch.long)
            for i, L in enumerate(lens):
                mask[i, :L] = 1  # right padding, as DataCollatorForSeq2Seq
            pos = torch.arange(T).expand(len(lens), T).clone()
            samples = len(lens)
        elif case.startswith("cat"):
            # train.packing: the micro-batch's S samples concatenated into one row, no padding
            lens = [lengths[next(stream)] for _ in range(int(case[3:]))]
            T = sum(lens)
            mask = torch.ones(1, T, dtype=torch.long)
            pos = torch.cat([torch.arange(L) for L in lens]).unsqueeze(0)
            samples = len(lens)
        elif case.startswith("pack"):
            total = int(case[4:])
            rows = max(1, total // row_len)
            T = min(total, row_len)
            mask = torch.zeros(rows, T, dtype=torch.long)
            pos = torch.zeros(rows, T, dtype=torch.long)
            samples = 0
            for r in range(rows):
                at = 0
                while True:
                    L = min(lengths[next(stream)], T)
                    if at + L > T:
                        break  # this sample starts the next row's search; the rest of the row is padding
                    mask[r, at : at + L] = 1
                    pos[r, at : at + L] = torch.arange(L)
                    at += L
                    samples += 1
                if at < T:
                    pos[r, at:] = torch.arange(T - at)  # padding: its own "sample", masked anyway
        else:
            raise SystemExit(f"unknown case {case!r}: use mb<B>, pack<T> or cat<S>")
        ids = torch.randint(0, FIRST_SPECIAL, mask.shape, generator=g)
        ids[mask == 0] = pad_id
        labels = ids.masked_fill(mask == 0, -100)
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "position_ids": pos,
                "labels": labels,
                "tokens": int(mask.sum()),
                "padded": mask.numel(),
                "samples": samples,
            }
        )
    return batches


# ---------------------------------------------------------------------------------------------
# the upstream structure (for the baseline)


def upstream_forward(self: HunYuanMoE, hidden_states: torch.Tensor) -> torch.Tensor:
    """GShard-style capacity dispatch as the upstream code is documented to do it (see module doc)."""
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])  # (S, H), padding included
    S, E, k = x.shape[0], self.num_experts, self.gate.top_k
    C = max(k, k * S // E)  # capacity factor 1
    probs = F.linear(x.float(), self.gate.wg.weight.float()).softmax(-1)  # (S, E)
    w, idx = probs.topk(k, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    combine = torch.zeros(S, E, C, device=x.device, dtype=torch.float32)
    filled = torch.zeros(E, device=x.device, dtype=torch.long)
    for j in range(k):  # slot j of every token queues behind slots < j: top-1 picks first
        mask = F.one_hot(idx[:, j], E)  # (S, E)
        loc = torch.cumsum(mask, 0) - 1 + filled  # (S, E) place in the expert's queue
        filled = filled + mask.sum(0)
        keep = mask * (loc < C)  # overflow beyond capacity is dropped
        slot = (loc * keep).sum(1)  # (S,)
        combine = combine + (w[:, j, None, None] * keep[:, :, None]) * F.one_hot(slot, C)[:, None, :]
    dispatch = (combine > 0).to(x.dtype)
    xe = torch.einsum("sec,sm->ecm", dispatch, x)  # (E, C, H)
    ye = torch.stack([self.experts[e](xe[e]) for e in range(E)])  # all 64 experts, tokens or not
    out = torch.einsum("sec,ecm->sm", combine.to(x.dtype), ye)
    if self.shared_mlp is not None:
        out = self.shared_mlp(x) + out
    return out.view(shape)


# ---------------------------------------------------------------------------------------------
# model


def build_model(base_cfg: dict, depth: int, impl: str, args) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    cfg = dict(base_cfg)
    cfg["num_hidden_layers"] = depth
    for key in ("moe_topk", "num_shared_expert", "moe_intermediate_size"):
        if isinstance(cfg.get(key), list):
            cfg[key] = cfg[key][:depth]
    cfg["moe_impl"] = "fast" if impl.startswith("fast") else "upstream"
    cfg["use_cache"] = False
    config = HunYuanConfig(**cfg)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = HunYuanMoEV1ForCausalLM(config)  # random init on the GPU; the router is float32
    finally:
        torch.set_default_dtype(default)
    if impl in ("upstream-gshard", "fast-plainlm"):
        model.pad_lm_head = False  # else None: the model decides (pads here: training, CUDA, frozen weight)
    if impl == "upstream-gshard":
        for m in model.modules():
            if isinstance(m, HunYuanMoE):
                m.forward = upstream_forward.__get__(m)
    model.gradient_checkpointing_enable()
    model.train()
    torch.manual_seed(1)
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=args.targets.split(","),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def micro_step(model, batch, device, accum: int):
    keys = ("input_ids", "attention_mask", "position_ids", "labels")
    inputs = {k: batch[k].to(device, non_blocking=True) for k in keys}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**inputs).loss
    (loss / accum).backward()
    return loss


def opt_step(model, opt, micro_batches: list[dict], device):
    """One optimizer step: len(micro_batches) micro-steps of gradient accumulation, then AdamW."""
    for b in micro_batches:
        loss = micro_step(model, b, device, len(micro_batches))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_config(base_cfg, depth, impl, batches, accum, args) -> dict:
    model = build_model(base_cfg, depth, impl, args)
    params = [p for p in model.parameters() if p.requires_grad]
    # foreach = Trainer's default optim "adamw_torch"; fused = "adamw_torch_fused"
    opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if args.optim == "fused" else {"foreach": True}))
    units = [batches[i : i + accum] for i in range(0, len(batches), accum)]  # optimizer steps
    warm, timed = units[: args.warmup], units[args.warmup :]
    # Each new sequence length costs plan building once (cuDNN attention, cuBLAS heuristics): a
    # training run pays it once per length over thousands of steps, so every length is warmed here.
    seen = set()
    for b in (b for u in timed for b in u):
        if b["input_ids"].shape not in seen:
            seen.add(b["input_ids"].shape)
            micro_step(model, b, args.device, 1)
    opt.zero_grad(set_to_none=True)
    torch.cuda.reset_peak_memory_stats()
    times, first_loss = [], None
    for i, unit in enumerate(warm + timed):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = opt_step(model, opt, unit, args.device)
        torch.cuda.synchronize()
        if i == 0:
            first_loss = float(loss.detach())
        if i >= len(warm):
            times.append(time.perf_counter() - t0)
    cache = getattr(model.get_base_model(), "_lm_head_cache", None)
    result = {
        "impl": impl,
        "depth": depth,
        "accum": accum,
        "step_ms_median": 1e3 * statistics.median(times),
        "lm_head_rows": int(cache.padded.shape[0])
        if cache is not None and cache.padded is not None
        else int(model.get_base_model().lm_head.weight.shape[0]),
        "step_ms_all": [round(1e3 * t, 3) for t in times],
        "first_loss": first_loss,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / GIB,
        "trainable_params": sum(p.numel() for p in params),
        "warmed_shapes": len(seen),
    }
    if args.profile and impl in args.profile_impls:
        try:
            result["profile"] = profile_step(model, opt, timed[0], args)
        except Exception as e:  # the profile is a bonus: never lose the timings to it
            print(f"profile failed: {e!r}", flush=True)
    if args.sync_debug:
        result["host_syncs"] = host_syncs(model, opt, timed[0], args)
        print(
            f"{impl} depth {depth}: {len(result['host_syncs'])} host syncs in one optimizer step; "
            + "; ".join(result["host_syncs"][:8]),
            flush=True,
        )
    del model, opt, params
    gc.collect()
    torch.cuda.empty_cache()
    return result


def host_syncs(model, opt, unit, args) -> list[str]:
    """Where one optimizer step makes the host wait for the GPU (torch's sync debug mode): each one
    empties the launch queue, so the GPU idles while Python catches up. 'file:line: message' each."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            opt_step(model, opt, unit, args.device)
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}: {str(w.message).splitlines()[0][:80]}" for w in caught]


def profile_step(model, opt, unit, args) -> dict:
    """Kernels per optimizer step and the GPU-busy fraction (kernel time / step wall time)."""
    from torch.profiler import ProfilerActivity, profile

    opt_step(model, opt, unit, args.device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        opt_step(model, opt, unit, args.device)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    # device-side events, less the user annotations (e.g. 'Optimizer.step#AdamW.step') that span kernels
    kernels = [
        e
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
        and not getattr(e, "is_user_annotation", False)
        and "#" not in e.name
        and not e.name.startswith("ProfilerStep")
    ]
    busy = sum(e.device_time for e in kernels) / 1e6  # us -> s
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:100], [0.0, 0])
        entry[0] += e.device_time / 1e3  # ms
        entry[1] += 1
    return {
        "kernels": len(kernels),
        "busy_s": busy,
        "wall_s": wall,
        "busy_fraction": busy / wall,
        "kernel_ms_count": by_name,
    }


def per_layer_kernels(p1: dict | None, p2: dict | None, layers: int) -> dict | None:
    """Kernel time and count of one layer: the difference of two depths' profiles."""
    if not p1 or not p2:
        return None
    names = set(p1["kernel_ms_count"]) | set(p2["kernel_ms_count"])
    diff = {
        n: [
            (p2["kernel_ms_count"].get(n, [0, 0])[0] - p1["kernel_ms_count"].get(n, [0, 0])[0]) / layers,
            (p2["kernel_ms_count"].get(n, [0, 0])[1] - p1["kernel_ms_count"].get(n, [0, 0])[1]) / layers,
        ]
        for n in names
    }
    top = sorted(diff.items(), key=lambda kv: -kv[1][0])[:15]
    return {
        "kernels": (p2["kernels"] - p1["kernels"]) / layers,
        "busy_ms": 1e3 * (p2["busy_s"] - p1["busy_s"]) / layers,
        "top": [(n, round(ms, 3), int(c)) for n, (ms, c) in top],
    }


def gemm_rate(device) -> float:
    """bf16 8192^3 matrix product on random data, mean of 10 after 3 warm-ups (FLOP/s)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3)


# ---------------------------------------------------------------------------------------------
# report


def summarise(case: str, runs: list[dict], batches: list[dict], accum: int, args, rate: float) -> list[dict]:
    """Per optimizer step (accum micro-steps): tokens, samples, time per layer, extrapolation to 32 layers."""
    timed = batches[args.warmup * accum :]
    tokens = accum * statistics.mean(b["tokens"] for b in timed)
    padded = accum * statistics.mean(b["padded"] for b in timed)
    samples = accum * statistics.mean(b["samples"] for b in timed)
    d1, d2 = min(args.depths), max(args.depths)
    rows = []
    for impl in args.impls:
        by_depth = {r["depth"]: r for r in runs if r["impl"] == impl}
        if d1 not in by_depth or d2 not in by_depth:
            continue
        t1, t2 = by_depth[d1]["step_ms_median"], by_depth[d2]["step_ms_median"]
        per_layer = (t2 - t1) / (d2 - d1)
        fixed = t1 - d1 * per_layer
        step32 = fixed + 32 * per_layer
        tps = tokens / (step32 / 1e3)
        mem1, mem2 = by_depth[d1]["peak_mem_gib"], by_depth[d2]["peak_mem_gib"]
        rows.append(
            {
                "case": case,
                "impl": impl,
                "accum": accum,
                "micro_step_per_layer_ms": per_layer / accum,
                "tokens_per_step": tokens,
                "padded_tokens_per_step": padded,
                "samples_per_step": samples,
                "per_layer_ms": per_layer,
                "fixed_ms": fixed,
                "step32_ms": step32,
                "tokens_per_s_32": tps,
                "samples_per_s_32": samples / (step32 / 1e3),
                "mfu_32": tps * 6 * ACTIVE_PARAMS / rate,
                "layer_tokens_per_s": tokens / (per_layer / 1e3),
                "peak_mem_gib": {d: by_depth[d]["peak_mem_gib"] for d in sorted(by_depth)},
                "mem_per_layer_gib": (mem2 - mem1) / (d2 - d1),
                "first_loss": {d: by_depth[d]["first_loss"] for d in sorted(by_depth)},
                "profile": {k: v for k, v in (by_depth[d1].get("profile") or {}).items() if k != "kernel_ms_count"}
                or None,
                "layer_profile": per_layer_kernels(by_depth[d1].get("profile"), by_depth[d2].get("profile"), d2 - d1),
            }
        )
    base = {r["impl"]: r["per_layer_ms"] for r in rows}
    for r in rows:
        r["speedup_vs_gshard"] = base["upstream-gshard"] / r["per_layer_ms"] if "upstream-gshard" in base else None
        r["speedup_vs_upstream"] = base["upstream"] / r["per_layer_ms"] if "upstream" in base else None
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# MoE LoRA step benchmark: {meta['card']}, {meta['date']}",
        "",
        f"bf16 GEMM (8192^3, measured in this run): **{meta['gemm_tflops']:.0f} TFLOP/s**. "
        f"torch {meta['torch']}, transformers {meta['transformers']}, peft {meta['peft']}. "
        f"Depths {meta['depths']}, {meta['steps']} timed steps (median) after {meta['warmup']} warm-up; "
        f"LoRA r={meta['r']} alpha={meta['alpha']} dropout={meta['dropout']} on {meta['targets']}; "
        f"gradient checkpointing; autocast bf16; AdamW {meta.get('optim', 'foreach')}. "
        f"Packing rows: {meta['row_len']} tokens.",
        "",
        "Case `mb4x4` = micro-batch 4 x 4 accumulation (the tutorial); `mb16x1` = the same 16 samples per optimizer "
        "step in one micro-batch, padded; `cat16x1` = the same 16 samples concatenated into one row (train.packing); "
        "`pack<T>x1` = T tokens per step, packed. All numbers per OPTIMIZER step.",
        "",
        "| case | impl | tokens/opt step (non-pad / padded) | ms / layer / opt step | ms / layer / micro-step "
        "| step ms @32 layers "
        "| tokens/s @32 | samples/s @32 | MFU @32 | x vs upstream-gshard | x vs upstream | peak GiB (d1/d2) "
        "| kernels/opt step (d1) | GPU busy (d1) | loss@step0 (d1/d2) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.get("profile") or {}
        f = lambda v, fmt: fmt.format(v) if v is not None else "-"  # noqa: E731
        mem = "/".join(f"{v:.1f}" for v in r["peak_mem_gib"].values())
        loss = "/".join(f"{v:.3f}" for v in r["first_loss"].values())
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['tokens_per_step']:.0f} / {r['padded_tokens_per_step']:.0f} "
            f"| {r['per_layer_ms']:.2f} | {r['micro_step_per_layer_ms']:.2f} | {r['step32_ms']:.0f} "
            f"| {r['tokens_per_s_32']:.0f} | {r['samples_per_s_32']:.2f} | {100 * r['mfu_32']:.1f}% "
            f"| {f(r['speedup_vs_gshard'], '{:.1f}')} | {f(r['speedup_vs_upstream'], '{:.1f}')} "
            f"| {mem} | {p.get('kernels', '-')} | {f(p.get('busy_fraction'), '{:.0%}')} | {loss} |"
        )
    # the target: same effective batch (16 samples per optimizer step), best micro-batching per impl
    eff = {(r["case"], r["impl"]): r for r in rows}
    base = eff.get(("mb4x4", "upstream-gshard"))
    if base:
        lines += [
            "",
            "Effective batch 16 (the tutorial's structure: upstream-gshard mb4x4 = "
            f"{base['samples_per_s_32']:.2f} samples/s @32 layers):",
        ]
        for (case, impl), r in eff.items():
            if case in ("mb4x4", "mb16x1", "cat16x1") and (case, impl) != ("mb4x4", "upstream-gshard"):
                lines.append(
                    f"- {impl} {case}: {r['samples_per_s_32']:.2f} samples/s, {r['tokens_per_s_32']:.0f} "
                    f"tokens/s @32 = **{r['samples_per_s_32'] / base['samples_per_s_32']:.1f}x** "
                    "the tutorial's structure; "
                    f"per layer {base['per_layer_ms'] / r['per_layer_ms']:.1f}x"
                )
    lines += ["", "GPU kernels of ONE layer (difference of the two depths' profiles; ms and launches per step):", ""]
    for r in rows:
        lp = r.get("layer_profile")
        if lp:
            top = "; ".join(f"{n[:60]} {ms:.2f} ms x{c}" for n, ms, c in lp["top"][:6])
            lines.append(
                f"- {r['case']} / {r['impl']}: {lp['kernels']:.0f} kernels, {lp['busy_ms']:.1f} ms busy of "
                f"{r['per_layer_ms']:.1f} ms; top: {top}"
            )
    lines += [
        "",
        "Per layer = difference of median step times between the two depths; @32 layers = fixed "
        "(embedding, lm_head, loss, optimizer) + 32 x per layer. "
        f"MFU = tokens/s x 6 x {ACTIVE_PARAMS / 1e9:.2f}e9 active parameters / the GEMM rate above.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-lengths", nargs=2, metavar=("DATA_JSON", "OUT_JSON"))
    ap.add_argument("--model", help="a model folder: its config.json gives the architecture")
    ap.add_argument("--real-config", action="store_true", help="the real Hunyuan-A13B config (default)")
    ap.add_argument(
        "--depths",
        type=int,
        nargs=2,
        default=[4, 8],
        help="two depths at least 4 apart: the per-layer slope between them (1 and 2 mislead: issue 13)",
    )
    ap.add_argument(
        "--impls",
        nargs="+",
        default=["upstream-gshard", "upstream", "fast"],
        choices=["upstream-gshard", "upstream", "fast", "fast-plainlm"],
    )
    ap.add_argument(
        "--cases",
        nargs="+",
        default=["mb4x4", "mb16x1", "cat16x1", "pack4096x1", "pack16384x1"],
        help="mb<B>[x<accum>], pack<T>[x<accum>] or cat<S>[x<accum>]; accum = micro-steps per optimizer step",
    )
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[
            "upstream-gshard:pack16384x1",
            "upstream:mb16x1",
            "upstream-gshard:pack4096x1",
            "upstream-gshard:cat16x1",
            "upstream:cat16x1",
        ],
        help="impl:case pairs not to run",
    )
    ap.add_argument(
        "--optim",
        choices=["foreach", "fused"],
        default="foreach",
        help="AdamW implementation: foreach (Trainer's adamw_torch) or fused (adamw_torch_fused)",
    )
    ap.add_argument("--profile-impls", nargs="*", default=["upstream-gshard", "fast", "fast-plainlm"])
    ap.add_argument("--targets", default=TUTORIAL_TARGETS)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--row-len", type=int, default=1024, help="packed row length in tokens")
    ap.add_argument("--lengths", default=".bench_data/lengths.json")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps (after every length is warmed)")
    ap.add_argument("--profile", action="store_true", help="profile one step per impl and case at the lower depth")
    ap.add_argument(
        "--sync-debug",
        action="store_true",
        help="list where one optimizer step syncs the host with the GPU (torch.cuda.set_sync_debug_mode)",
    )
    ap.add_argument("--out-dir", default=str(REPO / "bench" / "results"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tag", default="", help="suffix of the result files' names")
    args = ap.parse_args()
    if args.write_lengths:
        write_lengths(Path(args.write_lengths[0]), Path(args.write_lengths[1]))
        return

    # ---- fail fast: everything cheap before any model is built
    if not torch.cuda.is_available():
        raise SystemExit("bench/run.py needs a CUDA GPU (the CPU correctness tests are tests/test_fast_moe.py)")
    if args.depths[1] - args.depths[0] < 4:
        raise SystemExit(
            "--depths needs two depths at least 4 apart, e.g. 4 8: a slope over depths 1 and 2 "
            "measured 49.1 ms per layer where depths 4 and 16 gave 36.5 (issue 13)"
        )
    if "gate" in args.targets.split(","):
        raise SystemExit("'gate' must never be a LoRA target (it suffix-matches the router module mlp.gate)")
    lengths = json.loads(Path(args.lengths).read_text())["lengths"]
    base_cfg = json.loads((Path(args.model) / "config.json").read_text()) if args.model else real_config()
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device)
    grouped = grouped_moe.grouped_mm_available(device, torch.bfloat16)
    print(f"{card}, torch {torch.__version__}, grouped_mm {'yes' if grouped else 'NO (loop fallback)'}", flush=True)

    rate = gemm_rate(device)
    print(f"bf16 GEMM 8192^3: {rate / 1e12:.0f} TFLOP/s", flush=True)

    import peft
    import transformers

    meta = {
        "card": card,
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "grouped_mm": grouped,
        "gemm_tflops": rate / 1e12,
        "depths": args.depths,
        "steps": args.steps,
        "warmup": args.warmup,
        "r": args.r,
        "alpha": args.alpha,
        "dropout": args.dropout,
        "targets": args.targets,
        "row_len": args.row_len,
        "optim": args.optim,
        "tag": args.tag,
        "cases": args.cases,
        "impls": args.impls,
        "hidden_size": base_cfg["hidden_size"],
        "num_experts": base_cfg["num_experts"],
        "lengths": {"n": len(lengths), "mean": statistics.mean(lengths)},
    }
    rows, raw = [], []
    for case in args.cases:
        spec, accum = parse_case(case)
        batches = make_batches(
            spec, lengths, (args.warmup + args.steps) * accum, args.row_len, base_cfg["pad_token_id"]
        )
        runs = []
        for impl in args.impls:
            if f"{impl}:{case}" in args.skip:
                continue
            for depth in args.depths:
                t0 = time.time()
                try:
                    r = time_config(base_cfg, depth, impl, batches, accum, args)
                except Exception as e:  # keep the other impls' numbers; the error goes into the log
                    import traceback

                    traceback.print_exc()
                    print(f"{case} {impl} depth {depth} FAILED: {e!r}", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
                    continue
                r["case"] = case
                runs.append(r)
                print(
                    f"{case:>10} {impl:>9} depth {depth}: step {r['step_ms_median']:8.1f} ms  "
                    f"loss {r['first_loss']:.3f}  peak {r['peak_mem_gib']:.1f} GiB  "
                    f"lm_head rows {r['lm_head_rows']}  "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
        raw += runs
        rows += summarise(case, runs, batches, accum, args, rate)
        md = write_results(Path(args.out_dir), meta, rows, raw)  # after every case: a timeout keeps what ran
    print(md)


def write_results(out: Path, meta: dict, rows: list[dict], raw: list[dict]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{meta['card'].replace(' ', '-')}-{meta['date']}" + (f"-{meta['tag']}" if meta.get("tag") else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": raw}, indent=1))
    md = markdown(meta, rows)
    (out / f"{stem}.md").write_text(md)
    return md


if __name__ == "__main__":
    main()
