"""The output folder: the kit touches only names it owns, one run writes it at a time, and what is in
the way (a file, a read-only folder, a folder of the user's) is refused before any work.

Every stage runs through its real script (scripts/<stage>.py, the HL_* environment make sets) on the
stand-in. The cases run in one helper process (this file run as a script) that imports torch,
transformers and peft once and forks one child per case, in order (a later case may build on an
earlier one's folder); a case may run in the background while later ones run (two real processes
on one folder). Each child records in a file every model or tokenizer it loads, so a case shows
whether a refusal came before the stage's work or after it. Root ignores a folder's read-only mode,
so as root the helper runs without the capability that lets it (setpriv).
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
from script_helpers import stage_args

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"
CASE_TIMEOUT = 300
LOCK = ".hunyuan-lora.lock"
USER_VARS = ("CONFIG", "MODEL_DIR", "DATA", "OUTPUT_DIR", "SET", "PROMPT", "STAND_IN_DIR", "EVAL")


# ---------------------------------------------------------------------------------------------
# the helper process: python tests/test_output_folders.py PLAN.json RESULTS.json


def _spy_on_loads(record: str) -> None:
    """Append a line to `record` whenever a model or a tokenizer is loaded (then load it as usual)."""
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    for cls in (PreTrainedModel, PreTrainedTokenizerBase):
        load = cls.from_pretrained.__func__

        def spied(klass, *args, _load=load, **kwargs):
            with open(record, "a") as f:
                f.write(f"{klass.__name__}\n")
            return _load(klass, *args, **kwargs)

        cls.from_pretrained = classmethod(spied)


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
    _spy_on_loads(case["loads"])
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
    import datasets  # noqa: F401  (imported once, before the forks)
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from hunyuan_lora import cli, data, evaluate, generation, infer, merge, train  # noqa: F401

    results, background = [], {}
    for case in json.loads(Path(plan_path).read_text()):
        if case.get("before"):
            _prepare(case["before"], background)
        pid = os.fork()
        if pid == 0:
            _child(case)
        if case.get("background"):
            background[case["id"]] = pid
            results.append({"id": case["id"], "rc": None, "pid": pid})
            continue
        deadline = time.time() + CASE_TIMEOUT
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.05)
        results.append(
            {"id": case["id"], "rc": None if status is None else os.waitstatus_to_exitcode(status), "pid": pid}
        )
    for pid in background.values():  # a background case the plan did not stop
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    Path(results_path).write_text(json.dumps(results))


def _prepare(steps: list[list[str]], background: dict[str, int]) -> None:
    """What a case finds in place when it starts: ["file", path, text], ["copy", src, dst], ["chmod",
    path, mode], ["locked", folder, case id] (wait until that background case holds the folder's lock),
    ["kill", case id] (SIGKILL a background case)."""
    for step in steps:
        kind, path = step[0], Path(step[1])
        if kind == "file":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(step[2])
        elif kind == "copy":
            shutil.copytree(path, step[2], symlinks=True)
        elif kind == "chmod":
            path.chmod(int(step[2], 8))
        elif kind == "locked":
            deadline = time.time() + CASE_TIMEOUT
            while time.time() < deadline:
                try:
                    if json.loads((path / ".hunyuan-lora.lock").read_text())["pid"] == background[step[2]]:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.2)
        elif kind == "kill":
            pid = background.pop(step[1])
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    helper(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# the cases

# stage -> (script, extra arguments, extra environment)
STAGES = {
    "dataset": ("dataset.py", ["--data", str(SAMPLE)], {}),
    "train": ("train.py", ["--data", str(SAMPLE), "--set", "train.max_steps=1", "--set", "train.save_steps=100"], {}),
    "infer": ("infer.py", [], {"HL_PROMPT": "你是谁？"}),
    "merge": ("merge.py", [], {}),
    "eval": ("eval.py", [], {"HL_EVAL": str(SAMPLE), "HL_SET": "eval.limit=1 eval.max_new_tokens=2"}),
    "check": ("check.py", ["--data", str(SAMPLE)], {}),
    "chat": ("chat.py", [], {}),
    "probe": ("probe.py", ["--steps", "2", "--layers", "1"], {}),
}
# the stages that write into the output folder, and so refuse one they cannot write in
WRITING = ("dataset", "check", "train", "infer", "merge", "eval", "chat", "probe")
# the capability that lets root write into a read-only folder, dropped for the helper when it runs as root
AS_ROOT = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def case(
    root: Path,
    model: Path,
    name: str,
    stage: str,
    out: Path,
    before: list | None = None,
    *,
    sets: tuple[str, ...] = (),
    background: bool = False,
) -> dict:
    script, extra, env = STAGES[stage]
    log = root / "logs" / name.replace("/", "-")
    return {
        "id": name,
        "script": str(REPO / "scripts" / script),
        "cwd": str(REPO),
        "args": [*stage_args(DEMO, model, out), *extra, *[a for s in sets for a in ("--set", s)]],
        "env": {"OMP_NUM_THREADS": "1", "SWANLAB_MODE": "disabled", **env},
        "stdout": f"{log}.stdout",
        "stderr": f"{log}.stderr",
        "loads": f"{log}.loads",
        "before": before,
        "background": background,
    }


def read_only_works(prefix: list[str]) -> bool:
    """Whether the helper, started with `prefix`, is refused writing into a 0555 folder."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o555)
        try:
            proc = subprocess.run(
                [*prefix, sys.executable, "-c", f"open({folder!r} + '/x', 'w')"], capture_output=True, timeout=60
            )
        except FileNotFoundError:  # no setpriv
            return False
        finally:
            os.chmod(folder, 0o755)
    return proc.returncode != 0 and b"PermissionError" in proc.stderr


@pytest.fixture(scope="module")
def runs(patched_stand_in, lora_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("output-folders")
    (root / "logs").mkdir()
    model = patched_stand_in
    adapter = str(lora_run.output_dir / "adapter")
    d = {
        name: root / name
        for name in (
            "kept",
            "data_file",
            "data_foreign",
            "adapter_file",
            "merged_file",
            "eval_foreign",
            "locked",
            "read_only",
            "evals",
        )
    }
    d["a_file"] = root / "a-file"
    prefix = AS_ROOT if os.geteuid() == 0 else []
    read_only = read_only_works(prefix)
    run_folder = [
        ["copy", str(d["kept"] / "data"), str(d["read_only"] / "data")],
        ["copy", adapter, str(d["read_only"] / "adapter")],
    ]
    plan = [
        # item 7: a user's data.old (and a manifest.json.tmp) beside a dataset the kit replaces
        case(root, model, "dataset/first", "dataset", d["kept"]),
        case(
            root,
            model,
            "dataset/again",
            "dataset",
            d["kept"],
            before=[
                ["file", d["kept"] / "data.old" / "mine.txt", "the user's"],
                ["file", d["kept"] / "manifest.json.tmp", "the user's too"],
            ],
        ),
        # a file, or a folder the kit did not write, where a stage publishes its folder
        case(
            root,
            model,
            "dataset/file",
            "dataset",
            d["data_file"],
            before=[["file", d["data_file"] / "data", "a file named data"]],
        ),
        case(
            root,
            model,
            "dataset/foreign",
            "dataset",
            d["data_foreign"],
            before=[["file", d["data_foreign"] / "data" / "huanhuan.json", "[]"]],
        ),
        case(
            root,
            model,
            "train/adapter-file",
            "train",
            d["adapter_file"],
            before=[
                ["copy", str(d["kept"] / "data"), str(d["adapter_file"] / "data")],
                ["file", d["adapter_file"] / "adapter", "a file named adapter"],
            ],
        ),
        case(
            root,
            model,
            "merge/file",
            "merge",
            d["merged_file"],
            before=[
                ["copy", adapter, str(d["merged_file"] / "adapter")],
                ["file", d["merged_file"] / "merged", "a file named merged"],
            ],
        ),
        case(
            root,
            model,
            "eval/foreign",
            "eval",
            d["eval_foreign"],
            before=[
                ["copy", adapter, str(d["eval_foreign"] / "adapter")],
                ["file", d["eval_foreign"] / "eval" / "notes.md", "the user's notes"],
            ],
        ),
        # item 8: an output folder that is a file, or read-only, in every stage that writes
        *[
            case(
                root,
                model,
                f"{stage}/output-is-a-file",
                stage,
                d["a_file"],
                before=[["file", d["a_file"], "a file"]] if stage == WRITING[0] else None,
            )
            for stage in WRITING
        ],
        *(
            [
                case(
                    root,
                    model,
                    f"{stage}/read-only",
                    stage,
                    d["read_only"],
                    before=[*run_folder, ["chmod", d["read_only"], "555"]] if stage == WRITING[0] else None,
                )
                for stage in WRITING
            ]
            if read_only
            else []
        ),
        # item 8: eval keeps the earlier eval/
        case(root, model, "eval/first", "eval", d["evals"], before=[["copy", adapter, str(d["evals"] / "adapter")]]),
        case(
            root,
            model,
            "eval/again",
            "eval",
            d["evals"],
            before=[["copy", str(d["evals"] / "eval"), str(root / "first-eval")]],
        ),
        # item 5: two runs on one folder; the lock of a killed run does not block the next one
        case(
            root,
            model,
            "train/holder",
            "train",
            d["locked"],
            background=True,
            before=[["copy", str(d["kept"] / "data"), str(d["locked"] / "data")]],
            sets=("train.max_steps=100000", "train.save_steps=100000"),
        ),
        *[
            case(
                root,
                model,
                f"{stage}/while-locked",
                stage,
                d["locked"],
                before=[["locked", d["locked"], "train/holder"]] if stage == "train" else None,
            )
            for stage in ("train", "dataset", "merge", "eval", "infer")
        ],
        case(root, model, "dataset/after-kill", "dataset", d["locked"], before=[["kill", "train/holder"]]),
    ]
    (root / "plan.json").write_text(json.dumps(plan, default=str))
    import subprocess

    proc = subprocess.run(
        [*(prefix if read_only else []), sys.executable, __file__, str(root / "plan.json"), str(root / "results.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CASE_TIMEOUT * len(plan),
    )
    if d["read_only"].exists():
        d["read_only"].chmod(0o755)  # for pytest to clean it up
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = {r["id"]: r for r in json.loads((root / "results.json").read_text())}
    results = {}
    for c in plan:
        loads = Path(c["loads"])
        results[c["id"]] = {
            "rc": ran[c["id"]]["rc"],
            "pid": ran[c["id"]]["pid"],
            "stdout": Path(c["stdout"]).read_text(errors="replace"),
            "stderr": Path(c["stderr"]).read_text(errors="replace"),
            "loads": loads.read_text().split() if loads.is_file() else [],
        }
    return {"dirs": d, "results": results, "root": root, "read_only": read_only}


def refusal(result: dict) -> str:
    """The one-paragraph error of a refused case (exit 2, no traceback), whitespace folded."""
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert result["rc"] == 2, f"exit {result['rc']}:\n{result['stdout'][-1500:]}\n{stderr[-3000:]}"
    assert len(re.findall(r"^error:", stderr, re.M)) == 1, stderr
    return " ".join(stderr[stderr.index("error:") :].split())


def test_a_users_names_beside_a_published_folder_are_never_touched(runs):
    """`<output>/data.old` was deleted by the next `make dataset` (it was the kit's swap name)."""
    out = runs["dirs"]["kept"]
    for name in ("dataset/first", "dataset/again"):
        assert runs["results"][name]["rc"] == 0, runs["results"][name]["stderr"][-3000:]
    assert (out / "data.old" / "mine.txt").read_text() == "the user's"
    assert (out / "manifest.json.tmp").read_text() == "the user's too"
    assert (out / "data" / "stats.json").is_file()
    assert (out / "data" / ".hunyuan-lora").is_file()
    assert sorted(p.name for p in out.iterdir()) == [LOCK, "data", "data.old", "manifest.json.tmp"]  # no leftovers


@pytest.mark.parametrize(
    ("name", "folder", "stage_name"),
    [
        ("dataset/file", "data_file", "data"),
        ("train/adapter-file", "adapter_file", "adapter"),
        ("merge/file", "merged_file", "merged"),
    ],
)
def test_a_file_where_a_stage_publishes_is_refused_in_words(runs, name, folder, stage_name):
    """A file named `data` was renamed to data.old, then a NotADirectoryError traceback."""
    text = refusal(runs["results"][name])
    target = runs["dirs"][folder] / stage_name
    assert f"{target} is a file, where the kit publishes a folder; nothing was changed" in text, text
    assert "Fix: move or rename" in text
    assert target.is_file()
    assert target.read_text() == f"a file named {stage_name}"
    left = [p.name for p in runs["dirs"][folder].iterdir() if p.name != LOCK]
    assert not [name for name in left if name.startswith(".") or name.endswith(".old")], left
    assert runs["results"][name]["loads"] == [], "refused after loading the model"


@pytest.mark.parametrize(
    ("name", "folder", "stage_name", "file"),
    [
        ("dataset/foreign", "data_foreign", "data", "huanhuan.json"),
        ("eval/foreign", "eval_foreign", "eval", "notes.md"),
    ],
)
def test_a_folder_the_kit_did_not_write_is_refused_and_left_alone(runs, name, folder, stage_name, file):
    text = refusal(runs["results"][name])
    out = runs["dirs"][folder]
    assert f"{out / stage_name} is a folder the kit did not write (it has no .hunyuan-lora file)" in text, text
    assert sorted(p.name for p in (out / stage_name).iterdir()) == [file]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK]
    assert runs["results"][name]["loads"] == [], "refused after loading the model"


@pytest.mark.parametrize("stage", WRITING)
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(runs, stage):
    """dataset, merge and eval gave OSError / FileExistsError tracebacks, merge and eval after all their work."""
    text = refusal(runs["results"][f"{stage}/output-is-a-file"])
    assert f"{runs['dirs']['a_file']} is a file" in text, text
    assert "run.output_dir" in text, text
    assert runs["results"][f"{stage}/output-is-a-file"]["loads"] == [], "refused after loading the model"
    assert runs["dirs"]["a_file"].read_text() == "a file"


@pytest.mark.parametrize("stage", WRITING)
def test_a_read_only_output_folder_is_refused_before_any_work(runs, stage):
    if not runs["read_only"]:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made here")
    text = refusal(runs["results"][f"{stage}/read-only"])
    assert f"cannot write in {runs['dirs']['read_only']} (Permission denied)" in text, text
    assert runs["results"][f"{stage}/read-only"]["loads"] == [], "refused after loading the model"
    assert sorted(p.name for p in runs["dirs"]["read_only"].iterdir()) == ["adapter", "data"]  # nothing written


def test_eval_keeps_the_earlier_eval(runs):
    first, again = runs["results"]["eval/first"], runs["results"]["eval/again"]
    assert first["rc"] == 0, again["stderr"][-3000:]
    assert again["rc"] == 0, again["stderr"][-3000:]
    out = runs["dirs"]["evals"]
    [kept] = out.glob("eval.2*")
    assert f"the earlier eval in {out / 'eval'} was moved to {kept} (kept" in again["stdout"]
    assert tree_digest(kept) == tree_digest(runs["root"] / "first-eval")
    assert (out / "eval" / "eval.json").is_file()
    assert (out / "eval" / "answers.jsonl").is_file()


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_first(runs):
    """The second `make train` marked the first one's SwanLab experiment crashed and looped in SwanLab's init."""
    holder = runs["results"]["train/holder"]
    for stage in ("train", "dataset", "merge", "eval", "infer"):
        result = runs["results"][f"{stage}/while-locked"]
        text = refusal(result)
        assert f"{runs['dirs']['locked']} is in use by `make train` (pid {holder['pid']} on " in text, (stage, text)
        assert "OUTPUT_DIR" in text, (stage, text)
        assert result["loads"] == [], (stage, text)
    assert "adapter saved" not in holder["stdout"]  # it was still training when the others were refused
    after = runs["results"]["dataset/after-kill"]  # the holder was killed -9: its lock file stays, not its lock
    assert after["rc"] == 0, after["stderr"][-3000:]
    lock = json.loads((runs["dirs"]["locked"] / ".hunyuan-lora.lock").read_text())
    assert lock["stage"] == "dataset"
    assert lock["pid"] == after["pid"]


def tree_digest(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
