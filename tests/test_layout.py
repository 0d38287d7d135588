"""The package's one structural rule, read from the source with ast (imports inside functions too):
a stage never imports another stage, and a shared module never imports a stage.

Stages are what a `make` target runs (each `run(cfg) -> Path`); everything else in the package is a
shared module below them. stand_in is shared: the demo, the probe and the tests all write its folder.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "hunyuan_lora"
STAGES = {"download", "patch", "data", "check", "train", "infer", "merge", "watch", "probe", "chat", "evaluate",
          "serve"}


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
        "into a shared module below the stages (runtime, modeling, training, checkpoints, estimate, model_folder, ...)")


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
