"""Every stage checks its model folder before loading anything: a broken folder is one paragraph, exit 2.

The stages run through their real scripts (scripts/<stage>.py with argv and the HL_* environment
make sets) against broken copies of the stand-in:

    missing         the folder does not exist (before `make download`)
    empty           an empty folder
    config_only     config.json alone
    no_weights      config, code and tokenizer, no weights (no shards, no index)
    truncated       one shard cut in half (an interrupted download or copy)
    config_cut      config.json cut in half (not valid JSON)

The stages that generate or merge (infer, merge, chat, eval, serve) need all of it; `make dataset`
reads only the tokenizer files (no weights, and config.json does not change tokens); `make probe`
builds random weights from config.json with the folder's model code (moe_impl upstream), so it needs
no weights. Each case asserts exit code 2, one "error:" paragraph naming the folder and the fix, and
no traceback; the cases a stage must accept, exit 0.

The scripts run in one helper process (this file run as a script): it imports torch, transformers
and peft once, then forks one child per case, so 30-odd runs cost seconds, not minutes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"
CASE_TIMEOUT = 180
USER_VARS = ("CONFIG", "MODEL_DIR", "DATA", "OUTPUT_DIR", "SET", "PROMPT", "STAND_IN_DIR", "EVAL")


# ---------------------------------------------------------------------------------------------
# the helper process: python tests/test_stage_inputs.py PLAN.json RESULTS.json


def _child(case: dict) -> None:
    import runpy
    import traceback

    os.chdir(case["cwd"])
    for name in USER_VARS:
        os.environ.pop(f"HL_{name}", None)
    os.environ.update(case["env"])
    fds = [
        os.open(os.devnull, os.O_RDONLY),
        os.open(case["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
        os.open(case["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
    ]
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    code = 0
    sys.argv = [case["script"], *case["args"]]
    try:
        runpy.run_path(case["script"], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def helper(plan_path: str, results_path: str) -> None:
    import peft  # noqa: F401  (imported once, before the forks)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from hunyuan_lora import cli, generation, merge, probe  # noqa: F401

    results = []
    for case in json.loads(Path(plan_path).read_text()):
        pid = os.fork()
        if pid == 0:
            _child(case)
        deadline = time.time() + CASE_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:  # e.g. a server that started instead of refusing
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.05)
        results.append({"id": case["id"], "rc": None if status is None else os.waitstatus_to_exitcode(status)})
    Path(results_path).write_text(json.dumps(results))


if __name__ == "__main__":
    helper(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# the broken folders and the stages

BROKEN = ("missing", "empty", "config_only", "no_weights", "truncated", "config_cut")
WEIGHTS = ("*.safetensors", "model.safetensors.index.json")


def make_broken(stand_in: Path, root: Path, kind: str) -> Path:
    folder = root / f"model-{kind}"
    if kind == "missing":
        return folder
    if kind == "empty":
        folder.mkdir()
    elif kind == "config_only":
        folder.mkdir()
        shutil.copy2(stand_in / "config.json", folder / "config.json")
    else:
        shutil.copytree(stand_in, folder)
        if kind == "no_weights":
            for pattern in WEIGHTS:
                for path in folder.glob(pattern):
                    path.unlink()
        elif kind == "truncated":
            shard = sorted(folder.glob("*.safetensors"))[-1]
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        elif kind == "config_cut":
            text = (folder / "config.json").read_text()
            (folder / "config.json").write_text(text[: len(text) // 2])
    return folder


# stage -> (script, extra args, extra environment); every stage also gets --config/--model-dir/--output-dir
STAGES = {
    "dataset": ("dataset.py", ["--data", str(SAMPLE)], {}),
    "infer": ("infer.py", [], {"HL_PROMPT": "你是谁？"}),
    "merge": ("merge.py", [], {}),
    "chat": ("chat.py", [], {}),
    "eval": ("eval.py", [], {"HL_EVAL": str(SAMPLE)}),
    "serve": ("serve.py", [], {}),
    "probe": ("probe.py", ["--steps", "2", "--layers", "1"], {}),
}
# what each stage must accept: dataset reads only the tokenizer; the probe builds random weights
ACCEPTED = {
    "dataset": {"no_weights", "truncated", "config_cut"},
    "probe": {"no_weights", "truncated"},
}
# a probe without a folder at all uses the real A13B config: not a broken input (and not for a CPU test)
SKIPPED = {("probe", "missing"), ("probe", "empty")}
CASES = [(stage, kind) for stage in STAGES for kind in BROKEN if (stage, kind) not in SKIPPED]


@pytest.fixture(scope="module")
def results(stand_in_dir, lora_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage-inputs")
    folders = {kind: make_broken(stand_in_dir, root, kind) for kind in BROKEN}
    plan = []
    for stage, kind in CASES:
        script, extra, env = STAGES[stage]
        out = root / f"out-{stage}-{kind}"
        if stage != "dataset":  # an adapter that is fine, so that only the model folder is wrong
            shutil.copytree(lora_run.output_dir / "adapter", out / "adapter")
        log = root / f"{stage}-{kind}"
        plan.append(
            {
                "id": f"{stage}/{kind}",
                "script": str(REPO / "scripts" / script),
                "cwd": str(REPO),
                "args": ["--config", str(DEMO), "--model-dir", str(folders[kind]), "--output-dir", str(out), *extra],
                "env": {"OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", **env},
                "stdout": str(log) + ".stdout",
                "stderr": str(log) + ".stderr",
            }
        )
    (root / "plan.json").write_text(json.dumps(plan))
    import subprocess

    proc = subprocess.run(
        [sys.executable, __file__, str(root / "plan.json"), str(root / "results.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT * len(plan),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rcs = {r["id"]: r["rc"] for r in json.loads((root / "results.json").read_text())}
    return {
        case["id"]: {
            "rc": rcs[case["id"]],
            "folder": case["args"][3],
            "stdout": Path(case["stdout"]).read_text(errors="replace"),
            "stderr": Path(case["stderr"]).read_text(errors="replace"),
        }
        for case in plan
    }


@pytest.mark.parametrize(("stage", "kind"), CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_a_broken_model_folder(results, stage, kind):
    r = results[f"{stage}/{kind}"]
    stderr = r["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    if kind in ACCEPTED.get(stage, ()):
        assert r["rc"] == 0, stderr[-3000:]
        return
    assert r["rc"] == 2, f"exit {r['rc']}:\n{r['stdout'][-1500:]}\n{stderr[-3000:]}"
    assert len(re.findall(r"^error:", stderr, re.M)) == 1, stderr
    paragraph = stderr[stderr.index("error:") :].strip()
    assert "\n\n" not in paragraph
    paragraph = " ".join(paragraph.split())
    assert r["folder"] in paragraph or "model.dir" in paragraph, paragraph
    assert "Fix: " in paragraph, paragraph
    assert "make download" in paragraph, paragraph


def test_dataset_before_make_download_names_the_demo(results):
    """`make dataset` with the default config before `make download`: the newcomer's first mistake."""
    for kind in ("missing", "empty", "config_only"):
        paragraph = " ".join(results[f"dataset/{kind}"]["stderr"].split())
        assert "run `make download`" in paragraph, paragraph
        assert "CONFIG=configs/demo.yaml" in paragraph, paragraph


def test_the_accepted_cases_did_their_work(results):
    assert "wrote " in results["dataset/no_weights"]["stdout"]
    assert "probe.json" in results["probe/no_weights"]["stdout"]


def test_make_dataset_with_the_default_config_before_make_download(tmp_path):
    """The README's first real-model command, typed before `make download` (the default config)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in {f"HL_{name}" for name in USER_VARS}}
    proc = subprocess.run(
        [
            "make",
            "--no-print-directory",
            "dataset",
            f"MODEL_DIR={tmp_path / 'not-downloaded'}",
            f"OUTPUT_DIR={tmp_path / 'out'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    paragraph = " ".join(proc.stderr[proc.stderr.index("error:") :].split())
    assert "run `make download` first (or use CONFIG=configs/demo.yaml" in paragraph, paragraph
    assert not (tmp_path / "out").exists()  # nothing fetched or written
