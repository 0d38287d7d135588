"""Stage 6, merge: fold the LoRA adapter into the base weights; the result loads like the original.

    make merge [CONFIG=...]        ->  <output_dir>/merged/

The merged folder holds the merged safetensors, the base folder's config.json (with its auto_map),
its model code, tokenizer files and generation config, so
`AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)` works with no adapter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .atomic import staging_dir
from .config import Config
from .modeling import adapter_dir, load_with_adapter

# Files copied from the base folder as they are (the weights and their index are written anew).
CARRIED = ("config.json", "generation_config.json", "tokenizer_config.json", "hy.tiktoken")


def run(cfg: Config) -> Path:
    base = Path(cfg.model.dir)
    model = load_with_adapter(cfg, adapter_dir(cfg))
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
    print(f"merged {adapter_dir(cfg)} into {base} -> {out}")
    return out
