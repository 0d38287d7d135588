"""Stage 2, patch: define the `logger` that the model folder's hunyuan.py uses but never defines.

    make patch [MODEL_DIR=...]            # fix it (keeps hunyuan.py.orig)
    python -m hunyuan_lora patch --check  # report only: exit 1 when the patch is needed

HunYuanModel.forward calls `logger.warning_once(...)` under gradient checkpointing + training +
use_cache, so the tutorial's training dies with `NameError: name 'logger' is not defined`. The need
is read from the code with `ast` (a load of `logger` that no module-level or enclosing binding
defines), not from a string search; the fix is two lines inserted after the last top-level import.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text
from .config import Config
from .model_folder import undefined_logger, undefined_uses

INSERTED_LINES = [
    "from transformers.utils import logging as _hunyuan_lora_logging  # added by hunyuan-lora `make patch`\n",
    "logger = _hunyuan_lora_logging.get_logger(__name__)  # added by hunyuan-lora `make patch`\n",
]


@dataclass
class PatchResult:
    path: Path
    needed: bool  # the file used an undefined `logger` before this run
    written: bool  # this run changed the file
    lines: list[int]  # where the undefined `logger` is used (1-based)


def _insert_at(source: str) -> int:
    """Index of the line after the last top-level import (after the docstring if there is none)."""
    tree = ast.parse(source)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if imports:
        return imports[-1].end_lineno
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        return tree.body[0].end_lineno
    return 0


def patch_folder(model_dir: str | Path, check_only: bool = False) -> PatchResult:
    path, lines = undefined_logger(model_dir)
    source = path.read_text(encoding="utf-8")
    if not lines or check_only:
        return PatchResult(path, needed=bool(lines), written=False, lines=lines)

    text_lines = source.splitlines(keepends=True)
    at = _insert_at(source)
    patched = "".join(text_lines[:at] + INSERTED_LINES + text_lines[at:])
    compile(patched, str(path), "exec")  # never write a file that does not compile
    remaining = undefined_uses(patched)
    if remaining:
        raise RuntimeError(f"patch left undefined `logger` uses at lines {remaining}")

    orig = path.with_name(path.name + ".orig")
    if not orig.exists():
        shutil.copy2(path, orig)
    write_text(path, patched)
    return PatchResult(path, needed=True, written=True, lines=lines)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--check",
        dest="check_only",
        action="store_true",
        help="report whether the patch is needed (exit 1 when it is); write nothing",
    )


def run(cfg: Config, check_only: bool = False) -> Path:
    result = patch_folder(cfg.model.dir, check_only=check_only)
    where = ", ".join(map(str, result.lines))
    if result.written:
        print(
            f"patched {result.path}: `logger` was undefined at line(s) {where}; original kept as "
            f"{result.path.name}.orig"
        )
    elif result.needed:
        print(f"{result.path} needs the patch: `logger` is undefined at line(s) {where} (run `make patch`)")
        raise SystemExit(1)  # --check: the answer is the exit status
    else:
        print(f"{result.path} is already patched: `logger` is defined")
    return result.path
