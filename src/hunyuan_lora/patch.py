"""Stage 2, patch: define the `logger` that the model folder's hunyuan.py uses but never defines.

    make patch [MODEL_DIR=...]            # fix it (keeps hunyuan.py.orig)
    python scripts/patch.py --check       # report only

HunYuanModel.forward calls `logger.warning_once(...)` under gradient checkpointing + training +
use_cache, so the tutorial's training dies with `NameError: name 'logger' is not defined`. The need
is read from the code with `ast` (a load of `logger` that no module-level or enclosing binding
defines), not from a string search; the fix is two lines inserted after the last top-level import.
"""

from __future__ import annotations

import ast
import builtins
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text
from .config import Config
from .errors import UserError

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


def _bound_names(node: ast.AST) -> set[str]:
    """Names a module or function body binds directly (not in nested functions or classes)."""
    names: set[str] = set()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        args = node.args
        names |= {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        names |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(child.name)
            continue  # its body is its own scope
        if isinstance(child, ast.Lambda):
            continue
        if isinstance(child, ast.Name) and isinstance(child.ctx, (ast.Store, ast.Del)):
            names.add(child.id)
        elif isinstance(child, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in child.names}
        elif isinstance(child, (ast.Global, ast.Nonlocal)):
            names |= set(child.names)
        stack.extend(ast.iter_child_nodes(child))
    return names


def undefined_uses(source: str, name: str = "logger", filename: str = "<source>") -> list[int]:
    """Line numbers where `name` is read but no enclosing scope (or builtins) binds it."""
    tree = ast.parse(source, filename=filename)
    found: list[int] = []

    def visit(node: ast.AST, bound: set[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, bound | _bound_names(child))
            elif isinstance(child, ast.ClassDef):
                visit(child, bound)  # class bodies do not enclose their methods; close enough here
            else:
                if isinstance(child, ast.Name) and child.id == name and isinstance(child.ctx, ast.Load):
                    if name not in bound:
                        found.append(child.lineno)
                visit(child, bound)

    visit(tree, _bound_names(tree) | set(dir(builtins)))
    return sorted(found)


def _insert_at(source: str) -> int:
    """Index of the line after the last top-level import (after the docstring if there is none)."""
    tree = ast.parse(source)
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    if imports:
        return imports[-1].end_lineno
    if tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant):
        return tree.body[0].end_lineno
    return 0


def model_code_file(model_dir: Path) -> Path:
    """The file that `auto_map.AutoModelForCausalLM` names (hunyuan.py in Tencent's folder)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found", where=str(model_dir),
                        fix="point MODEL_DIR / model.dir at the downloaded model folder (run `make download`)")
    auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map", {})
    target = auto_map.get("AutoModelForCausalLM")
    if not target:
        raise UserError("config.json has no auto_map.AutoModelForCausalLM, so there is no remote code to patch",
                        where=str(config_path),
                        fix="download a revision with auto_map (the remote-code format transformers 4.51.3 loads)")
    path = model_dir / (target.split(".")[0] + ".py")
    if not path.is_file():
        raise UserError(f"{path.name} (named by auto_map) is missing", where=str(model_dir),
                        fix="re-run `make download` to complete the folder")
    return path


def patch_folder(model_dir: str | Path, check_only: bool = False) -> PatchResult:
    path = model_code_file(Path(model_dir))
    source = path.read_text(encoding="utf-8")
    try:
        lines = undefined_uses(source, filename=str(path))
    except SyntaxError as e:
        raise UserError(f"not valid Python ({e.msg})", where=f"{path}:{e.lineno}",
                        fix="restore the original (hunyuan.py.orig) or re-download the folder") from e
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


def run(cfg: Config, check_only: bool = False) -> Path:
    result = patch_folder(cfg.model.dir, check_only=check_only)
    where = ", ".join(map(str, result.lines))
    if result.written:
        print(f"patched {result.path}: `logger` was undefined at line(s) {where}; original kept as "
              f"{result.path.name}.orig")
    elif result.needed:
        print(f"{result.path} needs the patch: `logger` is undefined at line(s) {where} (run `make patch`)")
    else:
        print(f"{result.path} is already patched: `logger` is defined")
    return result.path
