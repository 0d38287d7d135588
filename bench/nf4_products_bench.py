"""The routed experts' NF4 products at the model's shapes on the GPU: today's dequantise-all + grouped_mm against
the candidates that read the packed codes (issues 23 and 25), GPU time per call, same run, with each result
checked against today's.

    .venv/bin/python bench/nf4_products_bench.py [--out FILE]

Candidates, per projection (gate/up: 64 experts x 3072 x 4096; down: 64 x 4096 x 3072) and per row count M
(pairs = tokens x 8: 8 = one decode token, 512 = a decode step at batch 64, 8192 / 32768 = a training
micro-batch of 16 / 64 samples):
  dequantise     bitsandbytes' dequantize_4bit of all 64 experts + torch._grouped_mm (today's path)
  routed-only    the routed experts' codes gathered, only they dequantised, + _grouped_mm (M <= 512; the
                 experts used are counted on the host first, outside the timing)
  triton         hunyuan/nf4_products.py (model.nf4_products: triton), the code table in registers and in
                 memory, a few tile shapes each, the best reported (the defaults: registers, block_n 64, 4 warps)
  gnf4           grouped-nf4-gemm's capturable M-tile kernel and its input-gradient kernel, when importable
                 (pip download --no-deps grouped-nf4-gemm==0.51.0 into .whl/ here; not in the lock)
and the input gradient (training's backward) at the training row counts. Plus the same-run bf16 GEMM rate.

On the device machine: bench/nf4_products_gpu.sh's first call ("kernels") runs it, after the CUDA tests and
the 8-step loss comparison; its second ("probes") runs make probe at 32 layers with and without the switch.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch
from decode_bench import INTER, TOPK, E, H, gpu_ms  # bench/: the folder of the script run

from hunyuan_lora.hunyuan import nf4_products

ROWS = (8, 128, 512, 8192, 32768)
TRAINING_ROWS = (8192, 32768)
TILES = ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3))  # (block_n, num_warps, num_stages)


def routing(tokens: int, g: torch.Generator):
    """top-8 of 64 per token, uniformly: (order of the pairs by expert, offs (E,) int32 end rows, rows per expert)."""
    experts = torch.stack([torch.randperm(E, device="cuda", generator=g)[:TOPK] for _ in range(tokens)])
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)
    offs = torch.searchsorted(flat[order], torch.arange(E, device="cuda"), right=True).to(torch.int32)
    return offs, torch.bincount(flat, minlength=E)


def dequantise(codes, absmax, shape):
    return torch.ops.bitsandbytes.dequantize_4bit.default(codes, absmax, 64, "nf4", list(shape), torch.bfloat16)


def today_forward(codes, absmax, shape, xs, offs):
    return torch._grouped_mm(xs, dequantise(codes, absmax, shape).transpose(1, 2), offs=offs)


def today_input_grad(codes, absmax, shape, g, offs):
    return torch._grouped_mm(g, dequantise(codes, absmax, shape), offs=offs)


def routed_only(codes3, scales3, used, shape, xs, offs_used):
    """Only the routed experts' codes (gathered) dequantised, then one grouped product over them."""
    n = used.numel()
    c = codes3.index_select(0, used).reshape(-1, 1)
    a = scales3.index_select(0, used).reshape(-1)
    w = torch.ops.bitsandbytes.dequantize_4bit.default(c, a, 64, "nf4", [n, shape[1], shape[2]], torch.bfloat16)
    return torch._grouped_mm(xs, w.transpose(1, 2), offs=offs_used)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def gemm_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = gpu_ms(partial(torch.mm, a, a), n=5)
    return 2 * 8192**3 / ms / 1e9


def main(out: Path | None) -> dict:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    try:
        import nf4_grouped as gnf4  # grouped-nf4-gemm's module (the package installs top-level modules)
    except ImportError:
        gnf4 = None
    res = {
        "card": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "gnf4": gnf4 is not None,
        "gemm_tflops_bf16_8192": round(gemm_tflops(), 1),
        "rows": [],
    }
    print(res, flush=True)

    def row(what, proj, M, ms, err=None, **kw):
        res["rows"].append(
            {
                "what": what,
                "projection": proj,
                "M": M,
                "ms": round(ms, 4),
                "rel_err_vs_today": None if err is None else round(err, 5),
                **kw,
            }
        )
        print(f"{proj:5s} M={M:6d} {what:45s} {ms:9.4f} ms  err {err}", flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)
    for proj, (n_out, k_in) in {"gate": (INTER, H), "down": (H, INTER)}.items():
        shape = (E, n_out, k_in)
        w = torch.randn(E * n_out, k_in, device="cuda", dtype=torch.bfloat16) * 0.02
        codes, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        del w
        absmax, table = state.absmax.float(), state.code.float()
        codes3, scales3 = codes.view(E, n_out, k_in // 2), absmax.view(E, n_out, k_in // 64)
        for M in ROWS:
            offs, counts = routing(M // TOPK, g)
            xs = torch.randn(M, k_in, device="cuda", dtype=torch.bfloat16)
            want = today_forward(codes, absmax, shape, xs, offs)
            row("dequantise all + grouped_mm", proj, M, gpu_ms(partial(today_forward, codes, absmax, shape, xs, offs)))
            if M <= 512:
                used = counts.nonzero().flatten()
                offs_used = counts[used].cumsum(0).to(torch.int32)
                y = routed_only(codes3, scales3, used, shape, xs, offs_used)
                row(
                    "routed-only dequantise + grouped_mm",
                    proj,
                    M,
                    gpu_ms(partial(routed_only, codes3, scales3, used, shape, xs, offs_used)),
                    rel(y, want),
                    experts_used=int(used.numel()),
                )
            best = None
            for registers in (True, False):
                for bn, warps, stages in TILES:
                    fn = partial(
                        nf4_products.grouped_product,
                        xs,
                        codes3,
                        scales3,
                        table,
                        offs,
                        block_n=bn,
                        num_warps=warps,
                        num_stages=stages,
                        table_in_registers=registers,
                    )
                    what = f"triton codes (table in {'registers' if registers else 'memory'}, {bn}/{warps}/{stages})"
                    try:
                        err, ms = rel(fn(), want), gpu_ms(fn)
                    except Exception as e:  # a tile shape that does not compile here (shared memory)
                        print(f"  {what}: {type(e).__name__} {str(e)[:100]}", flush=True)
                        continue
                    row(what, proj, M, ms, err)
                    best = ms if best is None else min(best, ms)
            if best is not None:
                row("triton codes, best variant", proj, M, best)
            if gnf4 is not None:
                block_m = 16 if M <= 16 * E else 64
                t_row0, t_rows, t_group, _, _ = gnf4.build_group_tiles_device(
                    torch.repeat_interleave(torch.arange(E, device="cuda"), counts), E, block_m
                )

                gnf4_forward = partial(
                    gnf4.gemm_4bit_grouped_captured, xs, codes3, scales3, t_row0, t_rows, t_group, block_m
                )
                try:
                    row("grouped-nf4-gemm captured M-tile", proj, M, gpu_ms(gnf4_forward), rel(gnf4_forward(), want))
                except Exception as e:
                    print(f"  gnf4 forward: {type(e).__name__} {str(e)[:160]}", flush=True)
            if M in TRAINING_ROWS:
                grad = torch.randn(M, n_out, device="cuda", dtype=torch.bfloat16)
                want_g = today_input_grad(codes, absmax, shape, grad, offs)
                row(
                    "input grad: dequantise all + grouped_mm",
                    proj,
                    M,
                    gpu_ms(partial(today_input_grad, codes, absmax, shape, grad, offs)),
                )
                for registers in (True, False):
                    for bn, warps, stages in TILES[:3]:
                        fn = partial(
                            nf4_products.grouped_input_grad,
                            grad,
                            codes3,
                            scales3,
                            table,
                            offs,
                            block_n=bn,
                            num_warps=warps,
                            num_stages=stages,
                            table_in_registers=registers,
                        )
                        what = (
                            f"input grad: triton codes (table in {'registers' if registers else 'memory'}, "
                            f"{bn}/{warps}/{stages})"
                        )
                        try:
                            row(what, proj, M, gpu_ms(fn), rel(fn(), want_g))
                        except Exception as e:
                            print(f"  {what}: {type(e).__name__} {str(e)[:100]}", flush=True)
                if gnf4 is not None:
                    sizes = counts.tolist()
                    try:
                        fn = partial(
                            gnf4.dgrad_4bit_grouped,
                            grad,
                            codes3,
                            scales3,
                            [s for s in sizes if s],
                            [e for e, s in enumerate(sizes) if s],
                        )
                        row("input grad: grouped-nf4-gemm dgrad", proj, M, gpu_ms(fn), rel(fn(), want_g))
                    except Exception as e:
                        print(f"  gnf4 dgrad: {type(e).__name__} {str(e)[:160]}", flush=True)
        del codes, state, absmax, codes3, scales3
        torch.cuda.empty_cache()
    if out:
        out.write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    main(parser.parse_args().out)
