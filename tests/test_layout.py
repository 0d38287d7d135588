"""The package's structural rules, read from the source with ast (imports inside functions too):
a stage never imports another stage, a shared module never imports a stage, the model code under
hunyuan/ imports nothing of the package above it, and no module is imported by a string name
(importlib.import_module hides an import from these rules) except the CLI's stage registry.

Stages are what a `make` target runs (each `run(cfg) -> Path`); everything else in the package is a
shared module below them. stand_in is shared: the demo, the probe and the tests all write its folder.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hunyuan_lora"
STAGES = {
    "download",
    "patch",
    "data",
    "check",
    "train",
    "infer",
    "merge",
    "watch",
    "probe",
    "chat",
    "evaluate",
    "serve",
    "clean_cache",
}


def project_imports(path: Path) -> set[str]:
    """Top-level hunyuan_lora modules a module imports, anywhere in its file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y / from .x.sub import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found |= {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.split(".")[0] == "hunyuan_lora":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("hunyuan_lora.")}
    return found - {path.stem}


MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_no_module_imports_a_stage(path):
    kind = "stage" if path.stem in STAGES else "shared module"
    assert not project_imports(path) & STAGES, (
        f"{path.name} ({kind}) imports the stage(s) {sorted(project_imports(path) & STAGES)}: move what they share "
        "into a shared module below the stages (runtime, modeling, training, checkpoints, estimate, model_folder, ...)"
    )


def test_the_rule_catches_imports_inside_functions(tmp_path):
    module = tmp_path / "example.py"
    module.write_text("def f():\n    from .train import run\n    from . import infer\n    import hunyuan_lora.merge\n")
    assert project_imports(module) == {"train", "infer", "merge"}


def test_the_cli_reaches_every_stage_through_the_registry():
    """cli.py (shared) names stages only as strings, imported by importlib when one is asked for."""
    from hunyuan_lora import cli

    assert not project_imports(PACKAGE / "cli.py") & STAGES
    assert set(cli.STAGES.values()) == STAGES


def test_every_test_module_belongs_to_one_layer():
    from conftest import LAYER_OF, LAYERS

    modules = {p.stem for p in (PACKAGE.parents[1] / "tests").glob("test_*.py")}
    assert modules - set(LAYER_OF) == set(), "add the new test module to a layer in tests/conftest.py LAYERS"
    assert sum(len(names) for names in LAYERS.values()) == len(LAYER_OF)  # none in two layers


# ---------------------------------------------------------------------------------------------
# the model code depends on nothing above it; no import by a string name


def package_of(path: Path) -> str:
    """The dotted package a file of src/hunyuan_lora belongs to (hunyuan_lora, hunyuan_lora.hunyuan)."""
    return ".".join(("hunyuan_lora", *path.parent.relative_to(PACKAGE).parts))


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module a file imports, dotted, relative imports resolved against `package`; a constant
    string given to import_module counts as an import of that module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                found |= {f"{base}.{node.module}"} if node.module else {f"{base}.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif (
            isinstance(node, ast.Call)
            and _is_import_module(node.func)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Name) and func.id in ("import_module", "__import__")) or (
        isinstance(func, ast.Attribute) and func.attr == "import_module"
    )


def string_imports(path: Path) -> list[str]:
    """import_module calls that may name a module of the package: a string naming one ("hunyuan_lora...",
    ".x"), or a name computed at run time. The CLI's stage registry (cli.py, STAGES[...]) is the exception."""
    source = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(source, filename=str(path))):
        if not (isinstance(node, ast.Call) and _is_import_module(node.func) and node.args):
            continue
        name = node.args[0]
        if (
            isinstance(name, ast.Constant)
            and isinstance(name.value, str)
            and not name.value.startswith(("hunyuan_lora", "."))
        ):
            continue  # a third-party module by name
        registry = path.name == "cli.py" and any(
            isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == "STAGES"
            for n in ast.walk(name)
        )
        if not registry:
            found.append(f"{path}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return found


def test_the_model_code_imports_nothing_above_it():
    """hunyuan/ is the model (and is copied into model folders): it must not reach back up into the kit."""
    outside = {
        f"{path.name}: {name}"
        for path in sorted((PACKAGE / "hunyuan").rglob("*.py"))
        for name in imported_modules(path, package_of(path))
        if name.startswith("hunyuan_lora") and not name.startswith("hunyuan_lora.hunyuan")
    }
    assert not outside, f"hunyuan/ imports the package above it: {sorted(outside)}"


def test_no_module_of_the_package_is_imported_by_a_string_name():
    found = [line for path in sorted(PACKAGE.rglob("*.py")) for line in string_imports(path)]
    assert not found, (
        f"import_module with a package module's name hides the import from the layout rules; import it by name: {found}"
    )


def test_the_new_rules_catch_a_string_import_and_a_reach_upwards(tmp_path):
    model_code = tmp_path / "random_init.py"
    model_code.write_text(
        "import importlib\nfrom ..stand_in import real_config\nfrom . import fast_moe\n"
        "def f(name):\n    importlib.import_module('hunyuan_lora.stand_in')\n"
        "    importlib.import_module(name)\n    importlib.import_module('bitsandbytes')\n"
    )
    assert imported_modules(model_code, "hunyuan_lora.hunyuan") == {
        "importlib",
        "hunyuan_lora.stand_in",
        "hunyuan_lora.hunyuan.fast_moe",
        "bitsandbytes",
    }
    assert [line.split(": ", 1)[1] for line in string_imports(model_code)] == [
        "importlib.import_module('hunyuan_lora.stand_in')",
        "importlib.import_module(name)",
    ]
    registry = tmp_path / "cli.py"
    registry.write_text("import importlib\nmodule = importlib.import_module(f'{__package__}.{STAGES[stage]}')\n")
    assert string_imports(registry) == []


def test_the_read_only_preflight_loads_no_training_callbacks():
    """make check imports the preflight: it must not pull in the Trainer callbacks (or transformers' Trainer
    machinery) that only a training run uses."""
    import subprocess
    import sys

    probe = (
        "import sys, hunyuan_lora.preflight; "
        "print(sorted(m for m in sys.modules if m in ('hunyuan_lora.callbacks', 'hunyuan_lora.training', "
        "'transformers.trainer_callback')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_bench_scripts_take_the_package_from_the_environment():
    """bench/ imports hunyuan_lora as installed (.venv's editable install, or PYTHONPATH=src as bench/*_gpu.sh
    set it on the device machine): no bench script edits sys.path to find it."""
    bench = PACKAGE.parents[1] / "bench"
    scripts = sorted([*bench.glob("*.py"), *bench.glob("*.sh")])
    assert len(scripts) >= 8
    assert [p.name for p in scripts if "sys.path" in p.read_text(encoding="utf-8")] == []


def test_the_package_imports_without_swanlab():
    """The GPU bench machine carries no swanlab (bench/gpu_wheels.sh): importing the package and the probe's
    CLI must not need it; swanlab is imported where a run logs to it."""
    import subprocess
    import sys

    probe = (
        "import sys; sys.modules.update(dict.fromkeys(['swanlab', 'swankit', 'swankit.log', 'swankit.log.utils'])); "
        "import hunyuan_lora.cli, hunyuan_lora.probe; print('imported')"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "imported", out.stderr[-2000:]
