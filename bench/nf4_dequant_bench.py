"""NF4 dequantisation at the model's shapes on the GPU: bitsandbytes' op against nf4_products.dequantize (Triton),
GPU time per call, effective bandwidth (code bytes read + bf16 bytes written), bit-for-bit check, same run.

    python3 bench/nf4_dequant_bench.py [--out FILE]

Shapes: the routed experts of one projection (gate/up 64 x 3072 x 4096, down 64 x 4096 x 3072: what a training
step dequantises twice per layer) and the attention's packed q/k/v (6144 x 4096). The Triton kernel is timed at a
few block counts per program and warp counts, the code table in registers or memory; the default (128 blocks,
4 warps, registers) is what fast_moe uses.
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import bitsandbytes.functional as bnbf
import torch
from decode_bench import INTER, E, H, gpu_ms  # bench/: the folder of the script run
from nf4_products_bench import gemm_tflops

from hunyuan_lora.hunyuan import nf4_products

SHAPES = {"experts gate/up": (E, INTER, H), "experts down": (E, H, INTER), "attention qkv": (6144, H)}
# (64-value blocks per program, warps, the 16 code values in registers or read from memory)
VARIANTS = (
    (32, 4, True),
    (64, 4, True),
    (128, 4, True),
    (128, 8, True),
    (256, 8, True),
    (64, 4, False),
    (128, 8, False),
)


def main(out: Path | None) -> dict:
    res = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}
    res["gemm_tflops_bf16_8192"] = round(gemm_tflops(), 1)
    print(res, flush=True)
    table = bnbf.get_4bit_type("nf4", device="cuda").float()
    for what, shape in SHAPES.items():
        n = torch.Size(shape).numel()
        codes = torch.randint(0, 256, (n // 2, 1), dtype=torch.uint8, device="cuda")
        scales = torch.rand(n // 64, device="cuda") + 0.5
        moved = n // 2 + 2 * n  # bytes: codes read, bf16 written (the scales are 1/32 of the codes)
        bitsandbytes = partial(torch.ops.bitsandbytes.dequantize_4bit.default, codes, scales, 64, "nf4", list(shape))
        ref = bitsandbytes(torch.bfloat16)
        ms = gpu_ms(partial(bitsandbytes, torch.bfloat16))
        rows = [{"shape": what, "kernel": "bitsandbytes", "ms": round(ms, 4), "tb_s": round(moved / ms / 1e9, 2)}]
        for blocks, warps, registers in VARIANTS:
            triton = partial(
                nf4_products.dequantize, codes, scales, table, shape, torch.bfloat16, blocks, warps, registers
            )
            same = torch.equal(triton(), ref)
            ms = gpu_ms(triton)
            rows.append(
                {
                    "shape": what,
                    "kernel": f"triton {blocks} blocks x {warps} warps",
                    "table_in_registers": registers,
                    "ms": round(ms, 4),
                    "tb_s": round(moved / ms / 1e9, 2),
                    "bit_for_bit": same,
                }
            )
        for r in rows:
            print(r, flush=True)
        res["rows"] += rows
    if out:
        out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    main(parser.parse_args().out)
