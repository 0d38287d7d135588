"""Same model, same batch, one process: a forward and backward with the NF4 weights dequantised by bitsandbytes'
op, then by the Triton kernel (HUNYUAN_NF4_DEQUANT), each twice. Prints whether logits, loss and LoRA gradients
are bit-identical within a mode and across modes, and the first module (in execution order) whose output differs
across modes. For the 2-layer loss comparison of issue 25 (bench/NOTES.md); CUDA only.

    python bench/dequant_ab.py [--config configs/huanhuan_qlora_tutorial.yaml] [--layers 2] [--tokens 512]
"""

from __future__ import annotations

import argparse
import os

import torch

from hunyuan_lora import config
from hunyuan_lora.modeling import load_random_model
from hunyuan_lora.runtime import placement
from hunyuan_lora.training import attach_lora


def run_once(model, ids, record: dict | None):
    hooks = []
    if record is not None:
        for name, module in model.named_modules():

            def keep(_m, _args, out, name=name):
                out = out[0] if isinstance(out, tuple) else out
                if isinstance(out, torch.Tensor) and name not in record:
                    record[name] = out.detach().float().clone()

            hooks.append(module.register_forward_hook(keep))
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same dropout masks (attention dropout stays on in training)
    with torch.autocast(ids.device.type, torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().float().clone(), out.loss.item(), grads


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/huanhuan_qlora_tutorial.yaml")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    cfg = config.load(args.config, ["model.moe_impl=fast", "lora.dropout=0"])
    where = placement(cfg)
    model = attach_lora(cfg, load_random_model(cfg, where, num_layers=args.layers).model, where)
    model.train()
    ids = torch.randint(
        0,
        model.config.vocab_size,
        (4, args.tokens // 4),
        device=where.device,
        generator=torch.Generator(where.device).manual_seed(0),
    )
    runs = {}
    for mode in ("bitsandbytes", "triton", "bitsandbytes", "triton"):
        os.environ["HUNYUAN_NF4_DEQUANT"] = mode
        record = {} if mode not in runs else None
        result = run_once(model, ids, record)
        if mode in runs:
            logits, loss, grads = result
            first = runs[mode]
            same = (
                torch.equal(logits, first[0])
                and loss == first[1]
                and all(torch.equal(grads[k], first[2][k]) for k in grads)
            )
            print(f"{mode}: repeat bit-identical: {same}")
        else:
            runs[mode] = (*result, record)
    (lb, sb, gb, rb), (lt, st, gt, rt) = runs["bitsandbytes"], runs["triton"]
    diff = (lb - lt).abs().max().item()
    print(f"loss bitsandbytes {sb:.6f} triton {st:.6f}; logits equal {torch.equal(lb, lt)}, max |diff| {diff:.3g}")
    equal = sum(torch.equal(gb[k], gt[k]) for k in gb)
    worst = max(((gb[k] - gt[k]).abs().max().item() / max(gb[k].abs().max().item(), 1e-30), k) for k in gb)
    print(f"LoRA gradients: {equal} of {len(gb)} equal; largest relative diff {worst[0]:.3g} ({worst[1]})")
    differing = [n for n in rb if n in rt and not torch.equal(rb[n], rt[n])]
    print(f"module outputs differing: {len(differing)} of {len(rb)}; first in execution order: {differing[:5]}")


if __name__ == "__main__":
    main()
