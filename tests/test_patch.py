"""patch: found by ast, fixed by two inserted lines, idempotent, .orig kept, --check writes nothing."""

from __future__ import annotations

import difflib
import subprocess
import sys

import pytest

from hunyuan_lora import model_folder, patch
from hunyuan_lora.errors import UserError

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_patch_inserts_only_the_logger_lines_and_keeps_the_original(model_copy):
    original = (model_copy / "hunyuan.py").read_text()
    result = patch.patch_folder(model_copy)
    assert result.needed
    assert result.written
    assert result.lines
    patched = (model_copy / "hunyuan.py").read_text()
    assert (model_copy / "hunyuan.py.orig").read_text() == original
    diff = [line for line in difflib.ndiff(original.splitlines(True), patched.splitlines(True)) if line[:2] != "  "]
    assert [line[2:] for line in diff if line.startswith("+ ")] == patch.INSERTED_LINES
    assert not [line for line in diff if line.startswith("- ")]
    assert model_folder.undefined_uses(patched) == []
    compile(patched, "hunyuan.py", "exec")


def test_second_run_changes_nothing(model_copy):
    patch.patch_folder(model_copy)
    before = (model_copy / "hunyuan.py").read_bytes()
    again = patch.patch_folder(model_copy)
    assert not again.needed
    assert not again.written
    assert (model_copy / "hunyuan.py").read_bytes() == before


def test_check_only_reports_and_writes_nothing(model_copy):
    before = (model_copy / "hunyuan.py").read_bytes()
    cmd = [
        sys.executable,
        str(REPO / "scripts/patch.py"),
        "--config",
        str(REPO / "configs/demo.yaml"),
        "--model-dir",
        str(model_copy),
        "--check",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "needs the patch" in proc.stdout
    assert (model_copy / "hunyuan.py").read_bytes() == before
    assert not (model_copy / "hunyuan.py.orig").exists()
    subprocess.run(cmd[:-1], check=True, capture_output=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0
    assert "already patched" in proc.stdout


@pytest.mark.parametrize(
    ("source", "needed"),
    [
        ("from transformers.utils import logging\ndef f():\n    logger.warning_once('x')\n", True),
        (
            "from transformers.utils import logging\nlogger = logging.get_logger(__name__)\n"
            "def f():\n    logger.warning_once('x')\n",
            False,
        ),
        # defined only inside another function: still undefined where it is used
        ("def g():\n    logger = 1\n    return logger\ndef f():\n    return logger\n", True),
        ("def f(logger):\n    return logger\n", False),
        ("import logging as logger\ndef f():\n    return logger\n", False),
        # the word in a string or comment is not a use
        ("x = 'logger.warning_once'  # logger\n", False),
        ("class A:\n    def f(self):\n        logger.info('x')\n", True),
    ],
)
def test_undefined_logger_is_found_from_the_code(source, needed):
    assert bool(model_folder.undefined_uses(source)) is needed


def test_insertion_goes_after_the_last_top_level_import():
    source = '"""doc"""\nimport os\nfrom transformers.utils import logging\n\ndef f():\n    logger.info(1)\n'
    lines = source.splitlines(True)
    at = patch._insert_at(source)
    assert lines[at - 1].startswith("from transformers.utils import logging")


def test_broken_python_gives_a_clear_error(model_copy):
    (model_copy / "hunyuan.py").write_text("def f(:\n")
    with pytest.raises(UserError, match=r"hunyuan.py:1.*not valid Python"):
        patch.patch_folder(model_copy)


def test_folder_without_auto_map_or_code_is_a_clear_error(model_copy):
    (model_copy / "hunyuan.py").unlink()
    with pytest.raises(UserError, match="hunyuan.py .named by auto_map. is missing"):
        patch.patch_folder(model_copy)
    with pytest.raises(UserError, match="config.json not found"):
        patch.patch_folder(model_copy / "nowhere")
