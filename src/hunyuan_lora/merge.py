"""Stage 6, merge: fold the LoRA adapter into the bf16 base weights, shard by shard; the result loads
like the original folder.

    make merge [CONFIG=...]        ->  <output_dir>/merged/

No model is built: each base shard is streamed tensor by tensor into a shard of the same name, the
same header and the same bytes, except that every tensor the adapter changes becomes
W + B @ A * scaling, computed in float32 and rounded once to the tensor's own dtype (what PEFT's
merge_and_unload does on a bf16 model with its float32 adapter weights). Memory: the adapter (1.5 GB
for the tutorial's preset on the real model) plus one tensor; no GPU needed, one is used for the
products when model.device allows it. Any adapter of the base folder merges the same way: trained in
bf16, or on the NF4 base (QLoRA: the adapter is added to the original bf16 weights, the usual
practice), on the folder's code or the fast path (both save PEFT's per-expert keys).

The merged folder holds those shards, the base folder's index, config.json (with its auto_map),
model code, tokenizer files, generation config and any other file it has (not download.json, which
describes a download), so `AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)`
works with no adapter.

Before the folder is published, the merge check reads the merged shards back and, for every tensor
the adapter changes, compares the first rows with base + B @ A * scaling computed from the adapter
file: a tensor whose delta is missing (the silent drop of expert deltas seen elsewhere) stops the
merge with nothing published. It prints the count of expert tensors carrying their delta against
the count the adapter has, and writes it to merged/merged_from.json (which also tells chat, eval,
serve and infer that this folder already has the adapter inside).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .atomic import check_replaceable, staging_dir, write_json
from .checkpoints import require_finite_adapter
from .config import Config
from .errors import UserError
from .model_folder import INDEX_FILE, PROVENANCE_FILE, check_model_folder, safetensors_header
from .modeling import MERGED_MARKER, adapter_dir, is_merged
from .runtime import placement

CHECK_ROWS = 8  # rows of each adapted tensor compared: reads a sliver of the weights, sees any dropped delta
PEFT_PREFIX = "base_model.model."
COPY_CHUNK = 64 << 20  # bytes of an unadapted tensor copied at a time
FLOAT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}  # safetensors -> torch


# ---------------------------------------------------------------------------------------------
# the adapter: base tensor name -> (A, B, scaling)


@dataclass
class Delta:
    a: object  # (r, in) float32
    b: object  # (out, r) float32
    scaling: float

    def of(self, device):
        """B @ A * scaling in float32: PEFT's get_delta_weight, in its order of operations."""
        return (self.b.to(device) @ self.a.to(device)) * self.scaling


def read_adapter(adapter: Path) -> dict[str, Delta]:
    """Every LoRA pair of a PEFT adapter folder by the base tensor it changes (`model.layers.N....weight`).

    The scaling is PEFT's: lora_alpha (or its alpha_pattern entry for the module) over the rank, or over
    its square root with use_rslora. What a plain W + B @ A * scaling cannot express is refused."""
    import torch
    from peft.utils.other import get_pattern_key
    from safetensors import safe_open

    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    elsewhere = "merge this adapter with PEFT's merge_and_unload on a machine that holds the bf16 model"
    unsupported = [
        f"{key}: {settings.get(key)!r}"
        for key, ok in (("peft_type", "LORA"), ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"))
        if settings.get(key, ok) != ok
    ]
    if unsupported:
        raise UserError(
            f"the adapter's {', '.join(unsupported)}: `make merge` folds plain LoRA pairs (W + B @ A * scaling) only",
            where=str(adapter / "adapter_config.json"),
            fix=elsewhere,
        )
    alpha_pattern = settings.get("alpha_pattern") or {}
    deltas: dict[str, Delta] = {}
    path = adapter / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        other = sorted(k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight")))
        if other:
            raise UserError(
                f"{len(other)} adapter tensor(s) are not LoRA A/B weights, e.g. {other[:2]} "
                "(modules_to_save, embedding LoRA or DoRA magnitudes)",
                where=str(path),
                fix=elsewhere,
            )
        for a_key in sorted(k for k in keys if k.endswith(".lora_A.weight")):
            b_key = a_key.replace(".lora_A.weight", ".lora_B.weight")
            if b_key not in keys:
                raise UserError(
                    f"{a_key} has no {b_key}", where=str(path), fix="the adapter file is damaged: save it again"
                )
            module = a_key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            a, b = f.get_tensor(a_key).to(torch.float32), f.get_tensor(b_key).to(torch.float32)
            rank = a.shape[0]
            alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), settings["lora_alpha"])
            scaling = alpha / (rank**0.5 if settings.get("use_rslora") else rank)
            deltas[module + ".weight"] = Delta(a, b, scaling)
        if len(deltas) * 2 != len(keys):
            raise UserError(
                "the adapter has lora_B weights without their lora_A",
                where=str(path),
                fix="the adapter file is damaged: save it again",
            )
    if not deltas:
        raise UserError("the adapter holds no LoRA weights", where=str(path), fix="use the adapter `make train` saved")
    return deltas


# ---------------------------------------------------------------------------------------------
# one shard


def merge_shard(src: Path, dst: Path, deltas: dict[str, Delta], device: str) -> int:
    """Write src to dst with each tensor named in `deltas` merged; returns how many were.

    The header is written unchanged (a merged tensor keeps its dtype and shape, so its offsets hold),
    then the tensors in file order: unadapted ones copied a chunk at a time, adapted ones read, merged
    in float32 and written. The merged tensor is rounded once, where PEFT's `weight += delta` rounds it."""
    import torch

    start, header = safetensors_header(src)
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"])
    merged = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(fin.read(start))
        position = 0
        for key, info in tensors:
            begin, end = info["data_offsets"]
            if begin != position:
                raise UserError(
                    f"{src.name}: tensor {key} starts at byte {begin} of the data, not at {position}",
                    where=str(src),
                    fix="the shard is not a valid safetensors file: run `make download` again",
                )
            position = end
            delta = deltas.get(key)
            if delta is None:
                left = end - begin
                while left:
                    chunk = fin.read(min(left, COPY_CHUNK))
                    fout.write(chunk)
                    left -= len(chunk)
                continue
            if info["dtype"] not in FLOAT_DTYPES:
                raise UserError(
                    f"{key} is {info['dtype']} in {src.name}; LoRA merges into floating-point weights",
                    where=str(src),
                    fix="use the bf16 model folder `make download` fetched",
                )
            raw = bytearray(end - begin)
            fin.readinto(raw)
            dtype = getattr(torch, FLOAT_DTYPES[info["dtype"]])
            weight = (torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)).view(info["shape"])
            update = delta.of(device)
            if tuple(update.shape) != tuple(weight.shape):
                raise UserError(
                    f"the adapter's B @ A for {key} is {tuple(update.shape)}, the base tensor is {tuple(weight.shape)}",
                    where=str(src),
                    fix="use the adapter trained on this model folder (same architecture)",
                )
            result = (weight.to(device, torch.float32) + update).to(dtype).cpu()
            fout.write(result.contiguous().view(torch.uint8).numpy())
            merged += 1
        fout.flush()
        os.fsync(fout.fileno())  # on disk before the folder is published
    return merged


def weight_files(folder: Path) -> dict[str, str]:
    """tensor name -> shard file name, from the index or the single weights file."""
    index = folder / INDEX_FILE
    if index.is_file():
        return json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    from .model_folder import SINGLE_WEIGHTS_FILE

    return dict.fromkeys(
        set(safetensors_header(folder / SINGLE_WEIGHTS_FILE)[1]) - {"__metadata__"}, SINGLE_WEIGHTS_FILE
    )


def merge_folder(base: Path, adapter: Path, out: Path, device: str) -> dict:
    """The merged shards and the base folder's other files in `out`; returns counts for the report."""
    deltas = read_adapter(adapter)
    shard_of = weight_files(base)
    absent = sorted(set(deltas) - set(shard_of))
    if absent:
        raise UserError(
            f"{len(absent)} tensor(s) the adapter changes are not in the base model, e.g. {absent[:2]}",
            where=str(adapter),
            fix="use the adapter trained on this model folder (same architecture)",
        )
    shards = sorted(set(shard_of.values()))
    merged = 0
    for i, shard in enumerate(shards, 1):
        t0 = time.perf_counter()
        n = merge_shard(base / shard, out / shard, deltas, device)
        merged += n
        print(
            f"merge: {shard} ({i}/{len(shards)}): {n} tensor(s) merged in {time.perf_counter() - t0:.1f} s", flush=True
        )
    for path in sorted(base.iterdir()):
        if path.is_file() and path.name not in shards and path.name != PROVENANCE_FILE:
            shutil.copy2(path, out / path.name)
    return {"tensors_merged": merged, "shards": len(shards)}


# ---------------------------------------------------------------------------------------------
# the merge check


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    return {k: folder / v for k, v in weight_files(folder).items()}


def _rows(files: dict[str, Path], key: str, rows: int):
    from safetensors import safe_open

    with safe_open(str(files[key]), "pt") as f:
        return f.get_slice(key)[:rows].float()


def check_merge(base: Path, adapter: Path, merged: Path) -> dict:
    """Every tensor the adapter changes must differ from the base by its delta in the merged files.

    Compared on the first CHECK_ROWS rows: the merged rows must be closer to base + delta than to the
    base (mean absolute error under half the delta's mean size). A delta smaller than the weights'
    rounding (bf16 keeps 8 significant bits) cannot show and is counted apart, not as a failure."""
    from safetensors import safe_open

    settings = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    base_files, merged_files = _tensor_files(base), _tensor_files(merged)
    counts = {"expert": [0, 0], "other": [0, 0]}  # kind -> [carrying their delta, adapted]
    unresolved, dropped = [], []
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        for a_key in sorted(k for k in f.keys() if k.endswith(".lora_A.weight")):
            module = a_key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
            a, b = f.get_tensor(a_key).float(), f.get_tensor(a_key.replace("lora_A", "lora_B")).float()
            rank = a.shape[0]
            alpha = settings.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], settings["lora_alpha"])
            scaling = alpha / (rank**0.5 if settings.get("use_rslora") else rank)
            key = module + ".weight"
            if key not in merged_files:
                dropped.append(f"{key} (not in the merged files)")
                continue
            kind = "expert" if ".experts." in key else "other"
            counts[kind][1] += 1
            w0, w = _rows(base_files, key, CHECK_ROWS), _rows(merged_files, key, CHECK_ROWS)
            delta = (b[:CHECK_ROWS] @ a) * scaling
            size, error = delta.abs().mean().item(), (w - w0 - delta).abs().mean().item()
            if size > 0 and error < 0.5 * size:
                counts[kind][0] += 1
            elif size <= 0.5 * (w0.abs().mean().item() * 2.0**-8):
                unresolved.append(key)
            else:
                dropped.append(key)
    if dropped:
        raise UserError(
            f"{len(dropped)} adapted tensor(s) do not carry their LoRA delta in the merged weights, "
            f"e.g. {dropped[:3]}; expert tensors with their delta: {counts['expert'][0]} of "
            f"{counts['expert'][1]}",
            where=str(merged),
            fix="nothing was published; do not use this merge: check that the adapter was trained on "
            "this model folder, and report it if it was",
        )
    return {
        "expert_tensors": {"with_delta": counts["expert"][0], "adapted": counts["expert"][1]},
        "other_tensors": {"with_delta": counts["other"][0], "adapted": counts["other"][1]},
        "below_resolution": len(unresolved),
        "rows_checked": CHECK_ROWS,
    }


def run(cfg: Config) -> Path:
    base = Path(cfg.model.dir)
    if is_merged(base):
        raise UserError(
            f"{base} is a `make merge` output: its weights already hold an adapter",
            where="model.dir",
            fix="merge into the base model folder (MODEL_DIR=<the downloaded folder>)",
        )
    check_model_folder(base)
    adapter = adapter_dir(cfg)
    require_finite_adapter(adapter)  # a diverged adapter merged would make every answer garbage
    device = placement(cfg).device
    out = cfg.output_dir / "merged"
    check_replaceable(out, where="run.output_dir")
    t0 = time.perf_counter()
    with staging_dir(out) as tmp:
        merged = merge_folder(base, adapter, tmp, device)
        check = check_merge(base, adapter, tmp)
        write_json(
            tmp / MERGED_MARKER,
            {
                "base": str(base.resolve()),
                "adapter": str(adapter.resolve()),
                "device": device,
                **merged,
                "merge_check": check,
            },
        )
    experts, other = check["expert_tensors"], check["other_tensors"]
    print(
        f"merge check: {experts['with_delta']} of {experts['adapted']} expert tensors and {other['with_delta']} "
        f"of {other['adapted']} other adapted tensors carry their LoRA delta"
        + (
            f" ({check['below_resolution']} with a delta below the weights' rounding)"
            if check["below_resolution"]
            else ""
        )
    )
    print(
        f"merged {adapter} into {base} -> {out} ({merged['shards']} shard(s), {time.perf_counter() - t0:.0f} s "
        f"on {device})"
    )
    return out
