"""Stage 6, merge: fold the LoRA adapter into the base weights; the result loads like the original.

    make merge [CONFIG=...]        ->  <output_dir>/merged/

The merged folder holds the merged safetensors, the base folder's config.json (with its auto_map),
its model code, tokenizer files and generation config, so
`AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)` works with no adapter.

Before the folder is published, the merge check reads the merged shards back and, for every tensor
the adapter changes, compares the first rows with base + B @ A * scaling computed from the adapter
file: a tensor whose delta is missing (the silent drop of expert deltas seen elsewhere) stops the
merge with nothing published. It prints the count of expert tensors carrying their delta against
the count the adapter has, and writes it to merged/merged_from.json (which also tells chat, eval,
serve and infer that this folder already has the adapter inside).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .atomic import staging_dir, write_json
from .config import Config
from .errors import UserError
from .model_folder import check_model_folder
from .modeling import MERGED_MARKER, adapter_dir, is_merged, load_with_adapter
from .runtime import placement

# Files copied from the base folder as they are (the weights and their index are written anew).
CARRIED = ("config.json", "generation_config.json", "tokenizer_config.json", "hy.tiktoken")
CHECK_ROWS = 8  # rows of each adapted tensor compared: reads a sliver of the weights, sees any dropped delta
PEFT_PREFIX = "base_model.model."


def _tensor_files(folder: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out |= dict.fromkeys(f.keys(), path)
    return out


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
            scaling = alpha / (rank ** 0.5 if settings.get("use_rslora") else rank)
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
            elif size <= 0.5 * (w0.abs().mean().item() * 2.0 ** -8):
                unresolved.append(key)
            else:
                dropped.append(key)
    if dropped:
        raise UserError(f"{len(dropped)} adapted tensor(s) do not carry their LoRA delta in the merged weights, "
                        f"e.g. {dropped[:3]}; expert tensors with their delta: {counts['expert'][0]} of "
                        f"{counts['expert'][1]}", where=str(merged),
                        fix="nothing was published; do not use this merge: check that the adapter was trained on "
                            "this model folder, and report it if it was")
    return {"expert_tensors": {"with_delta": counts["expert"][0], "adapted": counts["expert"][1]},
            "other_tensors": {"with_delta": counts["other"][0], "adapted": counts["other"][1]},
            "below_resolution": len(unresolved), "rows_checked": CHECK_ROWS}


def run(cfg: Config) -> Path:
    base = Path(cfg.model.dir)
    if is_merged(base):
        raise UserError(f"{base} is a `make merge` output: its weights already hold an adapter", where="model.dir",
                        fix="merge into the base model folder (MODEL_DIR=<the downloaded folder>)")
    check_model_folder(base)
    adapter = adapter_dir(cfg)
    model = load_with_adapter(cfg, placement(cfg), adapter).model
    merged = model.merge_and_unload()
    out = cfg.output_dir / "merged"
    with staging_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True, max_shard_size="5GB")
        auto_map = json.loads((base / "config.json").read_text(encoding="utf-8")).get("auto_map", {})
        code = {v.split(".")[0] + ".py" for v in auto_map.values() if isinstance(v, str)}
        code |= {p.name for p in base.glob("*.py")}  # modules those import (modeling_hunyuan.py, tokenizer code)
        for name in sorted(code) + list(CARRIED):
            if (base / name).is_file():
                shutil.copy2(base / name, tmp / name)
        check = check_merge(base, adapter, tmp)
        write_json(tmp / MERGED_MARKER, {"base": str(base.resolve()), "adapter": str(adapter.resolve()),
                                         "merge_check": check})
    experts, other = check["expert_tensors"], check["other_tensors"]
    print(f"merge check: {experts['with_delta']} of {experts['adapted']} expert tensors and {other['with_delta']} "
          f"of {other['adapted']} other adapted tensors carry their LoRA delta"
          + (f" ({check['below_resolution']} with a delta below the weights' rounding)" if check["below_resolution"]
             else ""))
    print(f"merged {adapter} into {base} -> {out}")
    return out
