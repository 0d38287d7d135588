"""make clean-cache: delete the NF4 cache of the model folder (model.nf4_cache) and what killed writes
of it left beside it.

    make clean-cache [CONFIG=...] [MODEL_DIR=...]

The cache is only ever a copy: the next NF4 load quantises the checkpoint again and writes a new one.
"""

from __future__ import annotations

from pathlib import Path

from . import nf4
from .config import Config
from .estimate import human_bytes


def run(cfg: Config) -> Path:
    root = nf4.cache_dir(cfg.model.nf4_cache, cfg.model.dir)
    if root is None:
        print("model.nf4_cache is none: there is no NF4 cache to remove")
        return Path(cfg.model.dir)
    freed = nf4.remove(root)
    print(
        f"removed the NF4 cache {root} and its leftovers: {human_bytes(freed)} freed"
        if freed
        else f"no NF4 cache at {root}: nothing to remove"
    )
    return root
