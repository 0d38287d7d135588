"""Decode speed on the GPU (issue 23): the 4-bit products at the model's shapes, and generate on the
real-width random model with the adapter attached, before and after the decode path.

    .venv/bin/python bench/decode_bench.py kernels [--out FILE]   # products: dequantise+multiply, Triton, bitsandbytes
    .venv/bin/python bench/decode_bench.py model --config configs/huanhuan_qlora.yaml --layers 32 [--out FILE]
    run(carry=[".whl", ".bench_data"], command="bash bench/decode_gpu.sh")   # the device machine

`kernels` times each product as GPU time (20 calls captured in one CUDA graph, replayed); run it once per
bitsandbytes version (PYTHONPATH) for the same-run comparison. `model` builds the configured model on random
weights (load_base_model weights="random"), attaches the config's LoRA with non-zero B, and times greedy
`generate` (40-token prompts, 48 new tokens) with the environment switches HUNYUAN_DECODE_MAX_ROWS /
HUNYUAN_DECODE_GRAPHS and the cache implementation per case, plus a torch.profiler pass over decode steps.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hunyuan_lora.probe import TIMED_GREEDY

H, INTER, E, TOPK = 4096, 3072, 64, 8


def gpu_ms(fn, n: int = 20) -> float:
    """GPU milliseconds per call of fn: n calls captured in a CUDA graph (no launch gaps), replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(n):
                fn()
        run = g.replay
        per = n
    except Exception as e:  # not capturable: eager timing
        print("  (eager timing:", type(e).__name__, str(e)[:80], ")")
        run, per = fn, 1
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 5 if per > 1 else 50
    start.record()
    for _ in range(reps):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (reps * per)


def quantized(shape, device="cuda"):
    """bitsandbytes NF4 codes and float32 absmax of a random (E, out, in) weight (blocks of 64)."""
    import bitsandbytes.functional as bnbf

    w = torch.randn(shape, device=device, dtype=torch.bfloat16) * 0.02
    codes, state = bnbf.quantize_4bit(
        w.reshape(-1, shape[-1]), blocksize=64, quant_type="nf4", compress_statistics=False
    )
    return w, codes, state


def _dequant_grouped(codes, absmax, shape, xs, ends):
    w = torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, 64, "nf4", list(shape), torch.bfloat16)
    return torch._grouped_mm(xs, w.transpose(1, 2), offs=ends)


def _dequant_mm(codes, absmax, shape, x):
    w = torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, 64, "nf4", list(shape), torch.bfloat16)
    return x @ w.t()


def _gather_gemv(codes_e, absmax_e, sel, x1, table, shape):
    c = codes_e.index_select(0, sel).view(torch.uint8).view(-1, 1)
    a = absmax_e.index_select(0, sel).view(-1)
    return torch.ops.bitsandbytes.gemv_4bit.default(x1, c, list(shape), a, table, 64)


def kernels(out: Path | None) -> dict:
    """GPU time of each way to multiply by the model's 4-bit weights, at decode's row counts."""
    from functools import partial

    import bitsandbytes as bnb

    ops = torch.ops.bitsandbytes
    res = {
        "bitsandbytes": bnb.__version__,
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name(0),
        "rows": [],
    }

    def row(what, ms, **kw):
        res["rows"].append({"what": what, "ms": round(ms, 4), **kw})
        print(f"{what:60s} {ms:8.4f} ms {kw}", flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)
    for proj, (n_out, k_in) in {"gate": (INTER, H), "down": (H, INTER)}.items():
        _, codes, state = quantized((E, n_out, k_in))
        absmax, table = state.absmax.float(), state.code.float()
        shape = (E, n_out, k_in)
        for tokens in (1, 4, 16, 64):
            M = tokens * TOPK
            experts = torch.stack([torch.randperm(E, device="cuda", generator=g)[:TOPK] for _ in range(tokens)])
            flat = experts.reshape(-1)
            order = flat.argsort(stable=True)
            ends = torch.searchsorted(flat[order], torch.arange(E, device="cuda"), right=True).to(torch.int32)
            xs = torch.randn(M, k_in, device="cuda", dtype=torch.bfloat16)
            used = int(flat.unique().numel())
            row(
                f"{proj} experts M={M} dequantise all + grouped_mm",
                gpu_ms(partial(_dequant_grouped, codes, absmax, shape, xs, ends)),
                tokens=tokens,
                used=used,
            )
            if tokens == 1:
                row(
                    f"{proj} experts 1 token: gather 8 + bnb gemv_4bit",
                    gpu_ms(
                        partial(
                            _gather_gemv,
                            codes.view(E, -1),
                            absmax.view(E, -1),
                            experts[0],
                            xs[:1],
                            table,
                            (TOPK * n_out, k_in),
                        )
                    ),
                    tokens=1,
                )
                row(
                    f"{proj} experts 1 token: gather 8 as 8-byte words + bnb gemv_4bit",
                    gpu_ms(
                        partial(
                            _gather_gemv,
                            codes.view(-1).view(torch.int64).view(E, -1),
                            absmax.view(E, -1),
                            experts[0],
                            xs[:1],
                            table,
                            (TOPK * n_out, k_in),
                        )
                    ),
                    tokens=1,
                )
        if hasattr(ops, "gemm_4bit") and proj == "gate":
            for tokens in (1, 8, 16, 32, 64):  # every expert for every token: the weights read once, 8x the FLOPs
                x = torch.randn(tokens, k_in, device="cuda", dtype=torch.bfloat16)
                row(
                    f"{proj} all 64 experts dense, bnb gemm_4bit M={tokens}",
                    gpu_ms(partial(ops.gemm_4bit.default, x, codes, [E * n_out, k_in], absmax, 64, "nf4")),
                    tokens=tokens,
                )
        del codes, state, absmax
        torch.cuda.empty_cache()

    for name, (n_out, k_in) in {
        "qkv": (6144, H),
        "o": (H, H),
        "shared gate+up": (2 * INTER, H),
        "shared down": (H, INTER),
    }.items():
        w, codes, state = quantized((1, n_out, k_in))
        absmax, table = state.absmax.float(), state.code.float()
        for tokens in (1, 8, 64):
            x = torch.randn(tokens, k_in, device="cuda", dtype=torch.bfloat16)
            row(
                f"dense {name} M={tokens} dequantise + mm",
                gpu_ms(partial(_dequant_mm, codes, absmax, (n_out, k_in), x)),
                tokens=tokens,
            )
            if tokens == 1:
                row(
                    f"dense {name} M=1 bnb gemv_4bit",
                    gpu_ms(partial(ops.gemv_4bit.default, x, codes, [n_out, k_in], absmax, table, 64)),
                )
            if hasattr(ops, "gemm_4bit"):
                row(
                    f"dense {name} M={tokens} bnb gemm_4bit",
                    gpu_ms(partial(ops.gemm_4bit.default, x, codes, [n_out, k_in], absmax, 64, "nf4")),
                )
    if out:
        out.write_text(json.dumps(res, indent=1))
    return res


# ---------------------------------------------------------------------------------------------


def build(config: str, layers: int):
    from peft import get_peft_model

    from hunyuan_lora.config import load as load_config
    from hunyuan_lora.modeling import load_random_model
    from hunyuan_lora.runtime import placement
    from hunyuan_lora.training import lora_config

    cfg = load_config(config)
    t0 = time.perf_counter()
    model = load_random_model(cfg, placement(cfg), layers).model
    model = get_peft_model(model, lora_config(cfg))
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)  # B non-zero: the adapter changes every product
    model.eval()
    base = model.get_base_model()
    base.config.use_cache = base.generation_config.use_cache = True  # random_init builds for training (no cache)
    print(
        f"built {layers} layers in {time.perf_counter() - t0:.1f} s; allocated "
        f"{torch.cuda.memory_allocated() / 2**30:.1f} GiB",
        flush=True,
    )
    return cfg, model


def timed_generate(model, batch: int, prompt: int, new: int, cache: str | None, seed: int = 0) -> dict:
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 300, (batch, prompt), generator=g).cuda()
    mask = torch.ones_like(ids)
    kw = {**TIMED_GREEDY, "cache_implementation": cache, "disable_compile": True}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():  # warm-up: the cache of this length, the graphs' capture, Triton compilation
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new if cache else 2, **kw)
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, **kw)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, **kw)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    assert out.shape == (batch, prompt + new)
    decode_s = max(total - first, 1e-9)
    return {
        "batch": batch,
        "prompt": prompt,
        "new": new,
        "cache": cache,
        "warmup_s": round(warm, 3),
        "ttft_s": round(first, 4),
        "total_s": round(total, 3),
        "decode_tokens_per_s": round(batch * (new - 1) / decode_s, 2),
        "per_stream_tokens_per_s": round((new - 1) / decode_s, 2),
        "tokens": out[0, prompt : prompt + 8].tolist(),
    }


def profile_decode(model, batch: int, cache: str | None, steps: int = 8) -> dict:
    from torch.profiler import ProfilerActivity, profile

    vocab = model.get_base_model().config.vocab_size
    ids = torch.randint(0, vocab - 300, (batch, 40)).cuda()
    kw = {**TIMED_GREEDY, "cache_implementation": cache, "disable_compile": True}
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, **kw)  # warm / capture
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, **kw)
        torch.cuda.synchronize()
        prefill = time.perf_counter() - t1
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, **kw)
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0 - prefill
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by: dict[str, list] = {}
    for e in kernels:
        v = by.setdefault(e.name[:80], [0.0, 0])
        v[0] += e.device_time / 1e3
        v[1] += 1
    busy = sum(v[0] for v in by.values())
    deq = sum(v[0] for n, v in by.items() if "equant" in n)
    top = sorted(by.items(), key=lambda kv: -kv[1][0])[:12]
    # per decode token: the prefill's kernels are in there too; subtract by a prefill-only run's share is not
    # possible inside one profile, so the figures are per generate of `steps` tokens after a 40-token prefill
    return {
        "batch": batch,
        "cache": cache,
        "steps": steps,
        "kernels": len(kernels),
        "kernels_per_token": round(len(kernels) / (steps + 1), 1),
        "busy_ms": round(busy, 2),
        "wall_ms_decode_est": round(wall * 1e3, 2),
        "dequantize_ms": round(deq, 2),
        "dequantize_share": round(deq / busy, 3) if busy else 0,
        "top": [[n, round(ms, 3), c] for n, (ms, c) in top],
    }


CASES = {  # name: (environment, cache implementation)
    "today": ({"HUNYUAN_DECODE_GEMV": "0", "HUNYUAN_DECODE_GRAPHS": "0"}, None),
    "gemv": ({"HUNYUAN_DECODE_GEMV": "1", "HUNYUAN_DECODE_GRAPHS": "0"}, None),
    "graphs": ({"HUNYUAN_DECODE_GEMV": "0", "HUNYUAN_DECODE_GRAPHS": "1"}, "static"),
    "gemv-graphs": ({"HUNYUAN_DECODE_GEMV": "1", "HUNYUAN_DECODE_GRAPHS": "1"}, "static"),
}


def model_bench(args) -> dict:
    cfg, model = build(args.config, args.layers)
    res = {
        "config": args.config,
        "layers": args.layers,
        "torch": torch.__version__,
        "card": torch.cuda.get_device_name(0),
        "cases": [],
        "profiles": [],
    }
    import bitsandbytes

    res["bitsandbytes"] = bitsandbytes.__version__

    def save():
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))

    for spec in args.cases.split(","):
        name, batches = spec.split(":") if ":" in spec else (spec, "1")
        env, cache = CASES[name]
        os.environ.update(env)
        for b in map(int, batches.split("+")):
            try:
                t0 = time.perf_counter()
                r = timed_generate(model, b, 40, args.new, cache)
                r |= {
                    "case": name,
                    "wall_s": round(time.perf_counter() - t0, 2),
                    "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                }
                graphs = model.get_base_model()._decode_graphs._graphs
                r["captures"] = graphs.captures if graphs is not None else 0
            except Exception as e:  # report and go on with the next case
                r = {"case": name, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(json.dumps(r), flush=True)
            res["cases"].append(r)
            save()
    for spec in args.profile.split(",") if args.profile else []:
        name, b = spec.split(":")
        env, cache = CASES[name]
        os.environ.update(env)
        try:
            p = profile_decode(model, int(b), cache) | {"case": name}
        except Exception as e:
            p = {"case": name, "batch": int(b), "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(p), flush=True)
        res["profiles"].append(p)
        save()
    return res


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["kernels", "model"])
    parser.add_argument("--config", default="configs/huanhuan_qlora.yaml")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--new", type=int, default=48)
    parser.add_argument("--cases", default="today:1,gemv-graphs:1+8+32+64")
    parser.add_argument("--profile", default="today:1,gemv-graphs:1")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.what == "kernels":
        kernels(args.out)
    else:
        model_bench(args)


if __name__ == "__main__":
    main()
