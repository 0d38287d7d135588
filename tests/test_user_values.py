"""What a user types on the make command line reaches Python exactly as typed, and runs nothing;
the stand-in writer never deletes or moves a folder it did not write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hunyuan_lora import cli, config, stand_in
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DUMP = """#!{python}
import json, os, sys
with open({out!r}, "a", encoding="utf-8") as f:
    env = {{k: v for k, v in os.environ.items() if k.startswith("HL_")}}
    f.write(json.dumps({{"argv": sys.argv[1:], "env": env}}) + "\\n")
"""


@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose python records its arguments and HL_* environment instead of running a stage."""
    venv, out = tmp_path / "venv", tmp_path / "calls.jsonl"
    (venv / "bin").mkdir(parents=True)
    for tool in ("python", "accelerate"):
        (venv / "bin" / tool).write_text(DUMP.format(python=sys.executable, out=str(out)))
        (venv / "bin" / tool).chmod(0o755)
    (venv / ".installed").touch()  # newer than requirements.lock: `setup` has nothing to do

    def make(*args: str, returncode: int = 0) -> list[dict]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HL_")}
        proc = subprocess.run(
            ["make", "--no-print-directory", f"VENV={venv}", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == returncode, proc.stdout + proc.stderr
        make.stderr = proc.stderr
        calls = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] if out.exists() else []
        out.unlink(missing_ok=True)
        return calls

    return make


def test_prompt_reaches_python_as_typed_and_runs_nothing(fake_venv, tmp_path):
    pwned = tmp_path / "pwned"
    prompt = f"`touch {pwned}`他说\"你好\" 价格是 $HOME 两 $(shell echo x) '单引号'\n第二行"
    (call,) = fake_venv("infer", f"PROMPT={prompt}")
    assert call["env"]["HL_PROMPT"] == prompt
    assert call["argv"] == ["scripts/infer.py"]  # no user text on the command line at all
    assert not pwned.exists()


def test_paths_with_spaces_and_set_values_reach_every_stage(fake_venv):
    sets = 'data.system_prompt="你是 甄嬛" infer.prompts=[a, b]'
    for target in ("dataset", "check", "train", "merge", "download", "patch"):
        (call,) = fake_venv(
            target,
            "OUTPUT_DIR=outputs/my runs",
            "CONFIG=configs/my run.yaml",
            f"SET={sets}",
            "MODEL_DIR=/models/a b",
            "DATA=data/甄 嬛.json",
        )
        env = call["env"]
        typed = ("outputs/my runs", "configs/my run.yaml", sets)
        assert (env["HL_OUTPUT_DIR"], env["HL_CONFIG"], env["HL_SET"]) == typed, target
        assert (env["HL_MODEL_DIR"], env["HL_DATA"]) == ("/models/a b", "data/甄 嬛.json"), target


def test_launch_settings_reach_accelerate_as_words_and_run_nothing(fake_venv, tmp_path):
    pwned = tmp_path / "pwned"
    (call,) = fake_venv(
        "train",
        "LAUNCH=zero3",
        "NPROC=16",
        f"ACCELERATE_ARGS=--num_machines 2 --machine_rank 1 `touch {pwned}` $(shell touch {pwned})",
    )
    assert call["argv"] == [
        "launch",
        "--config_file",
        "configs/accelerate/zero3.yaml",
        "--num_processes",
        "16",
        "--num_machines",
        "2",
        "--machine_rank",
        "1",
        "`touch",
        f"{pwned}`",
        "$(shell",
        "touch",
        f"{pwned})",
        "scripts/train.py",
    ]
    assert not pwned.exists()
    for bad in (f"LAUNCH=zero3;touch {pwned}", "LAUNCH=nosuch"):
        assert fake_venv("train", bad, "NPROC=2", returncode=2) == []
        assert "LAUNCH must be one of: zero3 zero3_offload" in fake_venv.stderr
    assert fake_venv("check", "LAUNCH=zero3", f"NPROC=2;touch {pwned}", returncode=2) == []
    assert "NPROC must be a number" in fake_venv.stderr
    assert not pwned.exists()


def test_demo_uses_its_config_and_the_stand_in_folder(fake_venv, tmp_path):
    folder = str(tmp_path / "my stand in")
    calls = fake_venv("demo", f"STAND_IN_DIR={folder}")
    assert calls[0]["argv"] == ["-m", "hunyuan_lora.stand_in"]
    assert calls[0]["env"]["HL_STAND_IN_DIR"] == folder
    for call in calls[1:]:
        assert call["env"]["HL_CONFIG"] == "configs/demo.yaml"
        assert call["env"]["HL_MODEL_DIR"] == folder


def test_config_reads_the_environment_make_sets(monkeypatch, tmp_path):
    import argparse

    monkeypatch.setenv("HL_CONFIG", str(REPO / "configs/demo.yaml"))
    monkeypatch.setenv("HL_OUTPUT_DIR", "outputs/my runs")
    monkeypatch.setenv("HL_SET", 'data.system_prompt="你是 甄嬛" infer.prompts=[a, b] train.learning_rate=2e-4')
    parser = argparse.ArgumentParser()
    cli.add_cli_args(parser)
    cfg = cli.from_args(parser.parse_args(["--set", "train.learning_rate=3e-4"]))
    assert cfg.source.endswith("configs/demo.yaml")
    assert str(cfg.output_dir) == "outputs/my runs"
    assert cfg.data.system_prompt == "你是 甄嬛"
    assert cfg.infer.prompts == ["a", "b"]
    assert cfg.train.learning_rate == 3e-4  # --set on the command line comes after SET


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('data.system_prompt="你是 甄嬛"', [("data", "system_prompt", "你是 甄嬛")]),
        ("data.system_prompt=你是 甄嬛 run.seed=3", [("data", "system_prompt", "你是 甄嬛"), ("run", "seed", 3)]),
        ('data.system_prompt="设置 x.y=1" run.name=a', [("data", "system_prompt", "设置 x.y=1"), ("run", "name", "a")]),
        ("infer.prompts=[a, b]", [("infer", "prompts", ["a", "b"])]),
        ("data.system_prompt=注意: 回答", [("data", "system_prompt", "注意: 回答")]),
        ("train.learning_rate=2e-4", [("train", "learning_rate", 2e-4)]),
    ],
)
def test_set_is_split_at_keys_not_at_spaces(text, expected):
    assert [config.parse_override(o) for o in cli.split_overrides(text)] == expected


# ---------------------------------------------------------------------------------------------
# STAND_IN_DIR


def test_stand_in_refuses_a_users_folder_and_changes_nothing(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    proc = subprocess.run(
        ["make", "--no-print-directory", "stand-in", f"STAND_IN_DIR={folder}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "did not write" in proc.stderr
    assert "STAND_IN_DIR" in proc.stderr
    assert [p.name for p in folder.iterdir()] == ["thesis.txt"]
    assert (folder / "thesis.txt").read_text() == "four years of work"


def test_stand_in_refuses_a_file_and_leaves_it_in_place(tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(UserError, match="not a folder"):
        stand_in.build(target)
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_stand_in_replaces_its_own_folder_and_fills_an_empty_one(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    stand_in.build(empty)
    assert (empty / stand_in.MARKER).is_file()
    assert (empty / "config.json").is_file()
    (empty / "config.json").write_text("{}")  # a rebuild replaces what it wrote before
    stand_in.build(empty)
    assert json.loads((empty / "config.json").read_text()) == stand_in.stand_in_config()


def test_bench_without_the_shared_data_says_what_to_pass(fake_venv, tmp_path):
    if (REPO / ".bench_data" / "lengths.json").exists():
        pytest.skip(".bench_data/lengths.json exists here: make bench would not read the dataset")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HL_")}
    proc = subprocess.run(
        ["make", "--no-print-directory", f"VENV={tmp_path / 'venv'}", "bench", f"DATA={tmp_path / 'none.json'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "pass DATA=" in proc.stderr
    assert "none.json" in proc.stderr
