"""A model folder as every stage finds it: the files `make download` fetched, each shard's header,
the `logger` patch, the provenance (download.json). Reads only.

    config = check_model_folder(Path(cfg.model.dir))[1]   # UserError naming every problem, else config.json
    verify(folder, listing)                               # the files (download uses it with the server's listing)
    undefined_logger(folder)                              # (hunyuan.py, lines using `logger` undefined)
"""

from __future__ import annotations

import ast
import builtins
import json
import re
from pathlib import Path

from .errors import UserError

PROVENANCE_FILE = "download.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
# tokenization_hy.HYTokenizer reads its BPE ranks from this file (VOCAB_FILES_NAMES in Tencent's code).
TOKENIZER_FILES = ("tokenizer_config.json", "hy.tiktoken")


def no_auto_map_error(config_path: Path, config: dict, listing=None) -> UserError:
    known = f" (tags: {', '.join(listing.tags) or 'none'}; branches: {', '.join(listing.branches)})" if listing else ""
    return UserError(
        f"{config_path} has no auto_map (model_type {config.get('model_type')!r}): this copy is in the native "
        "transformers format (>= 4.56), but the pinned transformers 4.51.3 can only load Hunyuan-A13B through "
        "the remote-code format (auto_map + configuration_hunyuan.py, hunyuan.py, modeling_hunyuan.py)",
        where="model.revision",
        fix=f"set model.revision to a revision whose config.json has auto_map{known}, e.g. --set "
        "model.revision=<tag>, and run the download again",
    )


# ---------------------------------------------------------------------------------------------
# the files: what `make download` fetched


def _code_files(refs) -> set[str]:
    """Module files named by auto_map values: "module.Class", or a [slow, fast] list of them."""
    out = set()
    for ref in refs if isinstance(refs, list) else [refs]:
        # "other/repo--module.Class" points at another repo's code: nothing to find in this folder.
        if isinstance(ref, str) and ref and "--" not in ref:
            out.add(ref.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return out


def _with_relative_imports(folder: Path, files: set[str]) -> set[str]:
    """Add the files these code files import relatively (hunyuan.py -> modeling_hunyuan.py), recursively."""
    # The same two patterns transformers' dynamic module loader follows (get_relative_imports).
    pattern = re.compile(r"^\s*(?:from\s+\.(\w+)\s+import|import\s+\.(\w+))", re.M)
    todo, seen = list(files), set(files)
    while todo:
        path = folder / todo.pop()
        if not path.is_file():
            continue
        for m in pattern.finditer(path.read_text(encoding="utf-8", errors="replace")):
            name = f"{m[1] or m[2]}.py"
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def _read_json(path: Path, problems: dict[str, str]) -> dict | None:
    if not path.is_file():
        problems.setdefault(path.name, f"{path.name} is missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problems[path.name] = f"{path.name} is not valid JSON ({e})"
        return None


def verify(folder: Path, files: dict[str, dict] | None) -> dict:
    """Check the downloaded folder; returns config.json. One UserError names every missing or wrong file.

    `files` is the server's listing (path -> {"Size", ...}); None checks presence only.
    """
    problems: dict[str, str] = {}  # file -> what is wrong with it (one line per file)

    # (b) every file the server listed is there, with the size it listed
    for path, meta in (files or {}).items():
        p = folder / path
        if not p.is_file():
            problems[path] = f"{path} is missing"
        elif p.stat().st_size != meta["Size"]:
            problems[path] = f"{path} has {p.stat().st_size} bytes, the server lists {meta['Size']}"

    # (a) config.json with auto_map, and the code files it names
    config = _read_json(folder / "config.json", problems)
    auto_map = (config or {}).get("auto_map")
    code: set[str] = set()
    for refs in (auto_map or {}).values():
        code |= _code_files(refs)

    # (c) tokenizer: tokenizer_config.json's auto_map code, the BPE ranks file
    tok_config = _read_json(folder / "tokenizer_config.json", problems)
    for refs in ((tok_config or {}).get("auto_map") or {}).values():
        code |= _code_files(refs)
    for name in TOKENIZER_FILES:
        if not (folder / name).is_file():
            problems.setdefault(name, f"{name} (tokenizer) is missing")
    for name in sorted(_with_relative_imports(folder, code)):
        if not (folder / name).is_file():
            problems.setdefault(name, f"{name} (model/tokenizer code named by auto_map or imported by it) is missing")

    # (b) every shard the index names (or the single weights file)
    index = folder / INDEX_FILE
    if index.is_file() or (files is not None and INDEX_FILE in files):
        weight_map = (_read_json(index, problems) or {}).get("weight_map", {})
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                unlisted = files is not None and shard not in files
                problems.setdefault(
                    shard,
                    f"{shard} (named in {INDEX_FILE}) is missing"
                    + (" and the server does not list it" if unlisted else ""),
                )
    elif not (folder / SINGLE_WEIGHTS_FILE).is_file():
        problems.setdefault(SINGLE_WEIGHTS_FILE, f"no weights: neither {INDEX_FILE} nor {SINGLE_WEIGHTS_FILE}")

    if config is not None and not auto_map:
        raise no_auto_map_error(folder / "config.json", config)
    if problems:
        raise UserError(
            f"the download in {folder} is incomplete: " + "; ".join(problems[k] for k in sorted(problems)),
            where="model.dir",
            fix="delete the files named above that are present but wrong, then run `make download` again "
            "(modelscope fetches only what is missing); if the server itself lacks a file, pin another "
            "model.revision",
        )
    return config


def read_provenance(folder: str | Path) -> dict | None:
    """The download.json of a model folder (None when the folder was not made by this stage)."""
    p = Path(folder) / PROVENANCE_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


# ---------------------------------------------------------------------------------------------
# the weights: each shard's header


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(bytes before the tensor data, the header) of a safetensors file; UserError when the file is cut
    short or corrupt.

    Reads only the header (kilobytes): an 8-byte little-endian length, then that much JSON whose
    data_offsets (relative to the end of the header) say where the data ends, which must be the file's size.
    """
    size = path.stat().st_size
    bad = None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 2 or 8 + n > size:
                bad = f"its header is cut short ({size} bytes)"
            else:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end != size:
                    bad = f"it has {size} bytes, its header describes {8 + n + end}"
                else:
                    return 8 + n, header
    except (ValueError, KeyError, TypeError, IndexError) as e:
        bad = f"its header is not valid ({type(e).__name__})"
    raise UserError(
        f"weights file {path.name} is incomplete or corrupt: {bad}",
        where=str(path),
        fix="an interrupted download or copy: delete this file and run `make download` again "
        "(modelscope fetches only what is missing)",
    )


def _provenance_listing(folder: Path) -> dict[str, dict] | None:
    """download.json's file sizes, for download.verify; a patched file is checked via its .orig copy."""
    try:
        prov = read_provenance(folder)
    except (OSError, ValueError):
        return None
    if not prov or not isinstance(prov.get("files"), list):
        return None
    listing = {}
    for f in prov["files"]:
        path, size = f.get("path"), f.get("size")
        if not isinstance(path, str) or not isinstance(size, int):
            continue
        orig = folder / (path + ".orig")  # `make patch` keeps the downloaded file there
        listing[path + ".orig" if orig.is_file() else path] = {"Size": size}
    return listing


def check_model_folder(folder: Path) -> tuple[str, dict]:
    """download.verify (shared with `make download`), then every shard's header against the index."""
    if not folder.is_dir():
        raise UserError(
            f"model folder {folder} does not exist",
            where="model.dir",
            fix="run `make download` (or `make stand-in` for the demo), or pass MODEL_DIR=<folder>",
        )
    listing = _provenance_listing(folder)
    config = verify(folder, listing)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing: list[str] = []
        for shard in shards:
            names = set(safetensors_header(folder / shard)[1]) - {"__metadata__"}
            missing += [k for k, s in weight_map.items() if s == shard and k not in names]
        if missing:
            raise UserError(
                f"{len(missing)} tensor(s) named in {INDEX_FILE} are not in their shard, e.g. {missing[0]}",
                where=str(folder),
                fix="the shards and the index come from different revisions: run `make download` "
                "again into an empty folder",
            )
    else:
        shards = [SINGLE_WEIGHTS_FILE]
        safetensors_header(folder / SINGLE_WEIGHTS_FILE)
    code = sorted(p.name for p in folder.glob("*.py"))
    sized = f", sizes checked against {len(listing)} listed in download.json" if listing else ""
    return (
        f"{folder}: config.json + auto_map code ({', '.join(code)}), tokenizer, {len(shards)} shard(s) "
        f"with complete headers{sized}",
        config,
    )


def check_config(folder: Path, *, code: bool) -> dict:
    """config.json (valid, with auto_map) and, with code=True, the model code it names: what building
    the model from the folder needs when no weights are read (`make probe`). Returns config.json."""
    problems: dict[str, str] = {}
    config = _read_json(folder / "config.json", problems)
    if config is not None and not config.get("auto_map"):
        raise no_auto_map_error(folder / "config.json", config)
    files: set[str] = set()
    for refs in ((config or {}).get("auto_map") or {}).values() if code else ():
        files |= _code_files(refs)
    for name in sorted(_with_relative_imports(folder, files)):
        if not (folder / name).is_file():
            problems.setdefault(name, f"{name} (model code named by auto_map or imported by it) is missing")
    if problems:
        raise UserError(
            f"the model folder {folder} is incomplete: " + "; ".join(problems[k] for k in sorted(problems)),
            where="model.dir",
            fix="run `make download` again (it fetches only what is missing), or pass MODEL_DIR=<the complete folder>",
        )
    return config


# ---------------------------------------------------------------------------------------------
# the `logger` hunyuan.py uses without defining it (`make patch` adds it)


def model_code_file(model_dir: Path) -> Path:
    """The file that `auto_map.AutoModelForCausalLM` names (hunyuan.py in Tencent's folder)."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{config_path} not found",
            where=str(model_dir),
            fix="point MODEL_DIR / model.dir at the downloaded model folder (run `make download`)",
        )
    auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map", {})
    target = auto_map.get("AutoModelForCausalLM")
    if not target:
        raise UserError(
            "config.json has no auto_map.AutoModelForCausalLM, so there is no remote code to patch",
            where=str(config_path),
            fix="download a revision with auto_map (the remote-code format transformers 4.51.3 loads)",
        )
    path = model_dir / (target.split(".")[0] + ".py")
    if not path.is_file():
        raise UserError(
            f"{path.name} (named by auto_map) is missing",
            where=str(model_dir),
            fix="re-run `make download` to complete the folder",
        )
    return path


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
                loads = isinstance(child, ast.Name) and child.id == name and isinstance(child.ctx, ast.Load)
                if loads and name not in bound:
                    found.append(child.lineno)
                visit(child, bound)

    visit(tree, _bound_names(tree) | set(dir(builtins)))
    return sorted(found)


def undefined_logger(folder: str | Path) -> tuple[Path, list[int]]:
    """(the auto_map model file, lines where it reads `logger` without defining it)."""
    path = model_code_file(Path(folder))
    try:
        return path, undefined_uses(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise UserError(
            f"not valid Python ({e.msg})",
            where=f"{path}:{e.lineno}",
            fix="restore the original (hunyuan.py.orig) or re-download the folder",
        ) from e
