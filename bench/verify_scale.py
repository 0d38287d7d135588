"""Helpers of bench/verify_multi_gpu.sh (the GPU check of ZeRO-3 and QLoRA through the real entry points).

    .venv/bin/python bench/verify_scale.py write-model DIR --depth 2   # real width, reduced depth, random bf16
    .venv/bin/python bench/verify_scale.py summarize --case zero3-2gpu --run-dir RUN --mem-log MEM.csv --processes 2 \
        --out-dir bench/results --tag TAG

write-model: the stand-in folder's code and tokenizer with Hunyuan-A13B's real config.json cut to
`--depth` layers (hidden 4096, 64 experts top-8 + shared, vocab 128,167; the small tokenizer's ids
all lie below 128,167), random weights built on the GPU when there is one (bf16, router float32).
Depth 2 = 5.5 B parameters, 11 GB of shards.

summarize: one result row from what `make train` left in the run folder (log_history.json,
manifest.json, data/stats.json) and an `nvidia-smi --query-gpu=index,memory.used` CSV sampled
during the run: loss first/last, optimizer steps, samples/s (Trainer), tokens/s (samples/s x the
dataset's mean tokens per sample: an estimate, padding not counted), peak memory per GPU (nvidia-smi:
includes the CUDA context and the allocator's cache). Appends to <out-dir>/<tag>.json and rewrites
<tag>.md.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from hunyuan_lora.estimate import active_parameters
from hunyuan_lora.hunyuan.a13b import real_config

REPO = Path(__file__).resolve().parents[1]
ACTIVE_PARAMS = active_parameters(real_config())  # per token, 32 layers + lm_head


def write_model(out: Path, depth: int, seed: int) -> Path:
    import torch

    from hunyuan_lora import stand_in
    from hunyuan_lora.atomic import staging_dir

    cfg = real_config()
    small = stand_in.stand_in_config()
    special = ("bos_token_id", "eos_token_id", "pad_token_id", "eod_token_id", "sep_token_id")
    cfg.update(
        num_hidden_layers=depth,
        moe_topk=cfg["moe_topk"][:depth],
        num_shared_expert=cfg["num_shared_expert"][:depth],
        moe_intermediate_size=cfg["moe_intermediate_size"][:depth],
        **{k: small[k] for k in special},
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    build = stand_in.random_state_dict

    def on_device(config: dict, seed: int) -> dict:
        with torch.device(device):  # 5.5 B parameters initialise in seconds on a GPU, minutes on a CPU
            return {k: v.cpu() for k, v in build(config, seed).items()}

    stand_in.random_state_dict = on_device
    try:
        with staging_dir(out) as tmp:
            stand_in.copy_model_code(tmp)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
            (tmp / "generation_config.json").write_text(
                json.dumps(
                    {"eos_token_id": [cfg["eos_token_id"], cfg["eod_token_id"]], "pad_token_id": cfg["pad_token_id"]}
                )
            )
            stand_in.write_tokenizer(tmp)
            stand_in.write_weights(tmp, cfg, seed)
    finally:
        stand_in.random_state_dict = build
    return out


def peak_memory(mem_log: Path) -> dict[str, int]:
    """{gpu index: peak MiB used} from the log of
    `nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms N`."""
    peaks: dict[str, int] = {}
    if mem_log.is_file():
        for row in csv.reader(mem_log.read_text().splitlines()):
            if len(row) >= 2 and row[1].strip().isdigit():
                gpu = row[0].strip()
                peaks[gpu] = max(peaks.get(gpu, 0), int(row[1]))
    return peaks


def summarize(
    case: str,
    run_dir: Path,
    mem_log: Path,
    processes: int,
    out_dir: Path,
    tag: str,
    status: str,
    gemm_tflops: float | None = None,
) -> dict:
    row: dict = {"case": case, "processes": processes, "status": status, "gemm_tflops": gemm_tflops}
    history_path, manifest_path = run_dir / "log_history.json", run_dir / "manifest.json"
    if history_path.is_file():
        losses = [e["loss"] for e in json.loads(history_path.read_text()) if "loss" in e]
        row.update(
            loss_first=losses[0] if losses else None,
            loss_last=losses[-1] if losses else None,
            loss_steps=len(losses),
            losses=losses,
        )
    if manifest_path.is_file():
        import yaml

        train_cfg = yaml.safe_load((run_dir / "resolved.yaml").read_text())["train"]
        samples_per_step = (
            train_cfg["per_device_train_batch_size"] * train_cfg["gradient_accumulation_steps"] * processes
        )
        m = json.loads(manifest_path.read_text())
        stats = json.loads((run_dir / "data" / "stats.json").read_text())
        sps = m.get("train_samples_per_second")
        row.update(
            samples_per_step=samples_per_step,
            steps=m.get("global_step"),
            train_runtime_s=m.get("train_runtime_s"),
            samples_per_s=sps,
            tokens_per_s_est=round(sps * stats["tokens"]["mean"], 1) if sps else None,
            quantization=m.get("quantization"),
            zero_stage=m.get("deepspeed_zero_stage"),
            gpus=m.get("gpus"),
            packages=m.get("packages"),
            adapter_bytes=sum(p.stat().st_size for p in (run_dir / "adapter").glob("*.safetensors")),
        )
    row["peak_mib_per_gpu"] = peak_memory(mem_log)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"{tag}.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else []
    rows = [r for r in rows if r["case"] != case] + [row]
    results_path.write_text(json.dumps(rows, indent=2) + "\n")
    write_markdown(rows, out_dir, tag)
    print(json.dumps(row))
    return row


def write_markdown(rows: list[dict], out_dir: Path, tag: str) -> None:
    lines = [
        f"# {tag}: ZeRO-3 and QLoRA through `make train`'s code (bench/verify_multi_gpu.sh)",
        "",
        "| case | status | processes | steps | loss first → last | samples/s | tokens/s (est.) | peak MiB per GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        loss = f"{r.get('loss_first'):.3f} → {r.get('loss_last'):.3f}" if r.get("loss_first") is not None else ""
        lines.append(
            f"| {r['case']} | {r['status']} | {r['processes']} | {r.get('steps', '')} | {loss} | "
            f"{r.get('samples_per_s', '')} | {r.get('tokens_per_s_est', '')} | "
            f"{', '.join(f'{g}: {v}' for g, v in sorted(r['peak_mib_per_gpu'].items()))} |"
        )
    lines += extrapolation(rows)
    (out_dir / f"{tag}.md").write_text("\n".join(lines) + "\n")


def extrapolation(rows: list[dict], layers: int = 32) -> list[str]:
    """Per layer and at `layers` layers, from the same case measured at two depths (names ...-d<N>).

    Step time = samples per optimizer step / samples/s (Trainer's, over the whole run, start-up
    excluded); per layer = the difference between the depths; @32 = the shallower run + the missing
    layers. Memory likewise from nvidia-smi's peak per GPU (the highest GPU of the case).
    """
    import re

    ok = {}
    for r in rows:
        m = re.fullmatch(r"(.+)-d(\d+)", r["case"])
        if m and r["status"] == "ok" and r.get("samples_per_s") and r.get("peak_mib_per_gpu"):
            ok.setdefault(m.group(1), {})[int(m.group(2))] = r
    out = []
    for case, by_depth in ok.items():
        if len(by_depth) < 2:
            continue
        (d1, r1), (d2, r2) = sorted(by_depth.items())[:2]
        gpus = r1["processes"]
        batch = r1["samples_per_step"]
        t1, t2 = batch / r1["samples_per_s"], batch / r2["samples_per_s"]
        m1, m2 = max(r1["peak_mib_per_gpu"].values()), max(r2["peak_mib_per_gpu"].values())
        per_layer_s, per_layer_mib = (t2 - t1) / (d2 - d1), (m2 - m1) / (d2 - d1)
        step = t1 + (layers - d1) * per_layer_s
        mem = m1 + (layers - d1) * per_layer_mib
        tokens = r1["tokens_per_s_est"] / r1["samples_per_s"]  # mean tokens per sample of the run's data
        tokens_per_gpu = batch / step * tokens / gpus
        rate = r1.get("gemm_tflops")
        mfu = f"{100 * tokens_per_gpu * 6 * ACTIVE_PARAMS / (rate * 1e12):.2f} %" if rate else "-"
        out.append(
            f"| {case} | {gpus} | {d1}/{d2} | {1e3 * per_layer_s:.0f} | {per_layer_mib / 1024:.2f} | "
            f"{mem / 1024:.1f} | {batch / step:.2f} | {tokens_per_gpu:.1f} | {mfu} |"
        )
    if not out:
        return []
    return [
        "",
        f"Extrapolated to {layers} layers (two depths of the same case; ms and GiB per layer, per GPU):",
        "",
        f"| case | GPUs | depths | ms per layer per step | GiB per layer per GPU | peak GiB per GPU @{layers} "
        f"| samples/s @{layers} | tokens/s per GPU @{layers} | MFU @{layers} |",
        "|---|---|---|---|---|---|---|---|---|",
        *out,
        "",
        f"MFU = tokens/s per GPU x 6 x {ACTIVE_PARAMS / 1e9:.2f}e9 active parameters / the bf16 GEMM "
        "rate measured at the start of the run "
        "(- where the run did not measure it). Tokens/s count the run's own samples (`make train`'s data).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write-model")
    w.add_argument("out", type=Path)
    w.add_argument("--depth", type=int, default=2)
    w.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("summarize")
    s.add_argument("--case", required=True)
    s.add_argument("--run-dir", type=Path, required=True)
    s.add_argument("--mem-log", type=Path, required=True)
    s.add_argument("--processes", type=int, required=True)
    s.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results")
    s.add_argument("--tag", required=True)
    s.add_argument("--status", default="ok")
    s.add_argument("--gemm-tflops", type=float, help="the card's bf16 GEMM rate measured in this run")
    args = parser.parse_args()
    if args.cmd == "write-model":
        print(write_model(args.out, args.depth, args.seed))
    else:
        summarize(
            args.case, args.run_dir, args.mem_log, args.processes, args.out_dir, args.tag, args.status, args.gemm_tflops
        )


if __name__ == "__main__":
    main()
