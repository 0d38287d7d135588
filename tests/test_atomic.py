"""Atomic outputs: a writer SIGKILLed mid-write never leaves a half artifact that a later stage accepts.

The tokenized dataset (data.py), the adapter and the manifest (train.py) and the merged model
(merge.py) are written into a temporary sibling and renamed into place. Each scenario runs the real
stage with a tiny hook that SIGKILLs the process at one chosen instant of the write (os.kill of its
own pid: no handler, no cleanup, exactly what `kill -9` does at that moment):

    mid-write   the temporary sibling is half written (the first part saved, the rest not)
    swap        between "old artifact renamed aside" and "new one renamed into place"
    delete-old  while the previous dataset, renamed aside, is being deleted (data.py)

Afterwards the previous complete artifact (or none) must be what is in place, and the stage that
reads it next (train's preflight, infer, a model-folder check of the merged model) accepts the
complete one and refuses the rest with a clear UserError.

The scenarios run in one helper process (this file run as a script): it imports torch /
transformers / peft once and forks one child per scenario, so a dozen kills cost seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import stage_args

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"
TRAIN_SETTINGS = ["train.max_steps=1", "train.save_steps=100", "swanlab.mode=disabled", "train.resume=never"]


# ---------------------------------------------------------------------------------------------
# the helper process: python tests/test_atomic.py PLAN.json RESULTS.json


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _die_after(save, temp_prefix: str):
    """save_pretrained that dies once it has written into the stage's temp folder (not a checkpoint)."""

    def dying_save(self, directory, *a, **k):
        result = save(self, directory, *a, **k)
        if Path(directory).name.startswith(temp_prefix):
            _die()
        return result

    return dying_save


def _install_hook(hook: str, out: Path) -> None:
    """Patch one write of the stage so the process is SIGKILLed at the chosen instant."""
    if hook == "dataset-mid-write":  # splits saved into the temp folder, stats.json not yet
        from datasets import DatasetDict

        save = DatasetDict.save_to_disk
        DatasetDict.save_to_disk = lambda self, *a, **k: (save(self, *a, **k), _die())
    elif hook == "dataset-delete-old":  # new dataset in place, the previous one cut off mid-delete
        rmtree = shutil.rmtree

        def dying_rmtree(path, *a, **k):
            if Path(path).parent == out and Path(path).name.startswith(".data.previous-"):
                next((Path(path) / "train").glob("*.arrow")).unlink()
                _die()
            return rmtree(path, *a, **k)

        shutil.rmtree = dying_rmtree
    elif hook == "adapter-mid-write":  # LoRA weights in the temp folder, tokenizer files not yet
        from peft import PeftModel

        PeftModel.save_pretrained = _die_after(PeftModel.save_pretrained, ".adapter.tmp-")
    elif hook in ("adapter-swap", "merged-swap"):  # old one renamed aside, new one not yet in place
        name, replace = hook.split("-")[0], os.replace

        def dying_replace(src, dst, *a, **k):
            replace(src, dst, *a, **k)
            if Path(src) == out / name:
                _die()

        os.replace = dying_replace
    elif hook == "manifest-mid-write":  # adapter published, half of the top-level manifest.json.tmp written
        from hunyuan_lora import atomic

        write_text = atomic.write_text

        def dying_write_text(path, text):
            if path == out / "manifest.json":
                atomic.temp_file(path).write_text(text[: len(text) // 2], encoding="utf-8")
                _die()
            return write_text(path, text)

        atomic.write_text = dying_write_text
    elif hook == "merged-mid-write":  # the first merged shard in the temp folder, the rest not yet
        from hunyuan_lora import merge

        merge_shard = merge.merge_shard

        def dying_merge_shard(src, dst, *a, **k):
            result = merge_shard(src, dst, *a, **k)
            if Path(dst).parent.name.startswith(".merged.tmp-"):
                _die()
            return result

        merge.merge_shard = dying_merge_shard
    elif hook:
        raise ValueError(hook)


def _run_step(step: dict) -> None:
    from hunyuan_lora import config, data, merge, train

    out = Path(step["out"])
    cfg = config.load(DEMO, step.get("overrides", []), model_dir=step["model"], output_dir=str(out), data=str(SAMPLE))
    _install_hook(step.get("hook"), out)
    {"dataset": data.run, "train": train.run, "merge": merge.run}[step["stage"]](cfg)


def helper(plan_path: str, results_path: str) -> None:
    # Everything heavy is imported once, before any fork; no torch op runs in this parent process.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from hunyuan_lora import data, merge, train  # noqa: F401

    results = []
    for step in json.loads(Path(plan_path).read_text()):
        if step["stage"] == "copy":
            shutil.copytree(step["src"], step["out"], symlinks=True)
            results.append({"out": step["out"], "status": "copied"})
            continue
        with open(Path(step["out"]).with_name(Path(step["out"]).name + ".log"), "w") as log:
            pid = os.fork()
            if pid == 0:  # child: the writer
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
                try:
                    _run_step(step)
                except BaseException:
                    import traceback

                    traceback.print_exc()
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results.append({"out": step["out"], "status": f"killed {os.WTERMSIG(status)}"})
        else:
            results.append({"out": step["out"], "status": f"exit {os.WEXITSTATUS(status)}"})
    Path(results_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO / "src"))
    helper(sys.argv[1], sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------
# the tests

from hunyuan_lora import config, model_folder, modeling, preflight  # noqa: E402
from hunyuan_lora.errors import UserError  # noqa: E402


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cfg_for(model: Path, out: Path, *overrides: str) -> config.Config:
    return config.load(DEMO, list(overrides), model_dir=str(model), output_dir=str(out), data=str(SAMPLE))


@pytest.fixture(scope="module")
def scenarios(patched_stand_in, tmp_path_factory):
    root = tmp_path_factory.mktemp("atomic")
    model = root / "stand-in"
    shutil.copytree(patched_stand_in, model)
    d = {
        name: root / name / "out"
        for name in (
            "data_prev",
            "data_mid",
            "data_delete",
            "data_fresh",
            "train_prev",
            "adapter_mid",
            "adapter_swap",
            "manifest_mid",
            "adapter_fresh",
            "merged_prev",
            "merged_mid",
            "merged_swap",
            "merged_fresh",
        )
    }
    for path in d.values():
        path.parent.mkdir()
    m = str(model)
    other = ["data.max_length=128"]  # the new dataset differs from the previous one
    plan = [
        # dataset: a complete one, then kills over copies of it, and one with no previous dataset
        {"stage": "dataset", "out": d["data_prev"], "model": m},
        {"stage": "copy", "src": d["data_prev"], "out": d["data_mid"]},
        {"stage": "dataset", "out": d["data_mid"], "model": m, "hook": "dataset-mid-write", "overrides": other},
        {"stage": "copy", "src": d["data_prev"], "out": d["data_delete"]},
        {"stage": "dataset", "out": d["data_delete"], "model": m, "hook": "dataset-delete-old", "overrides": other},
        {"stage": "dataset", "out": d["data_fresh"], "model": m, "hook": "dataset-mid-write"},
        # adapter + manifest: a complete run (seed 1), then kills over copies of it (seed 0)
        {"stage": "copy", "src": d["data_prev"], "out": d["train_prev"]},
        {"stage": "train", "out": d["train_prev"], "model": m, "overrides": TRAIN_SETTINGS + ["run.seed=1"]},
        *[
            s
            for name, hook in (
                ("adapter_mid", "adapter-mid-write"),
                ("adapter_swap", "adapter-swap"),
                ("manifest_mid", "manifest-mid-write"),
            )
            for s in (
                {"stage": "copy", "src": d["train_prev"], "out": d[name]},
                {
                    "stage": "train",
                    "out": d[name],
                    "model": m,
                    "hook": hook,
                    "overrides": TRAIN_SETTINGS + ["run.seed=0"],
                },
            )
        ],
        {"stage": "copy", "src": d["data_prev"], "out": d["adapter_fresh"]},
        {
            "stage": "train",
            "out": d["adapter_fresh"],
            "model": m,
            "hook": "adapter-mid-write",
            "overrides": TRAIN_SETTINGS,
        },
        # merged model: complete, then kills over a copy of it and over a run without one
        {"stage": "copy", "src": d["train_prev"], "out": d["merged_prev"]},
        {"stage": "merge", "out": d["merged_prev"], "model": m},
        {"stage": "copy", "src": d["merged_prev"], "out": d["merged_mid"]},
        {"stage": "merge", "out": d["merged_mid"], "model": m, "hook": "merged-mid-write"},
        {"stage": "copy", "src": d["merged_prev"], "out": d["merged_swap"]},
        {"stage": "merge", "out": d["merged_swap"], "model": m, "hook": "merged-swap"},
        {"stage": "copy", "src": d["train_prev"], "out": d["merged_fresh"]},
        {"stage": "merge", "out": d["merged_fresh"], "model": m, "hook": "merged-mid-write"},
    ]
    plan = [{k: str(v) if isinstance(v, Path) else v for k, v in step.items()} for step in plan]
    (root / "plan.json").write_text(json.dumps(plan, indent=1))
    proc = subprocess.run(
        [sys.executable, __file__, str(root / "plan.json"), str(root / "results.json")],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {Path(r["out"]).parent.name: r["status"] for r in json.loads((root / "results.json").read_text())}
    return {"dirs": d, "results": results, "model": model, "plan": plan}


def test_every_scenario_ran_as_planned(scenarios):
    """Complete runs exit 0; every hooked run died by SIGKILL (9) at its hook, none by an exception."""
    killed = {Path(s["out"]).parent.name for s in scenarios["plan"] if s.get("hook")}
    assert len(killed) == 10
    for name, status in scenarios["results"].items():
        expected = "killed 9" if name in killed else "exit 0"
        assert status == expected, (name, status, _log(scenarios, name))


def _log(scenarios, name: str) -> str:
    log = scenarios["dirs"][name].with_name("out.log")
    return log.read_text()[-3000:] if log.is_file() else ""


# -- dataset


def test_dataset_killed_mid_write_leaves_the_previous_one(scenarios):
    d = scenarios["dirs"]
    assert tree_digest(d["data_mid"] / "data") == tree_digest(d["data_prev"] / "data")
    plan = preflight.preflight(cfg_for(scenarios["model"], d["data_mid"]), stage="check", echo=False)
    assert {r.name: r.status for r in plan.rows}["dataset"] == "ok"
    assert [p.name[:10] for p in preflight.leftovers(d["data_mid"])] == [".data.tmp-"]  # the half-written temp


def test_dataset_killed_without_a_previous_one_leaves_none(scenarios):
    out = scenarios["dirs"]["data_fresh"]
    assert not (out / "data").exists()
    with pytest.raises(UserError, match="no tokenized dataset"):
        preflight.preflight(cfg_for(scenarios["model"], out), stage="train", echo=False)


def test_dataset_killed_while_deleting_the_old_one_leaves_the_new_one_complete(scenarios):
    """The new dataset is renamed into place before the previous one (moved aside to
    .data.previous-*) is deleted: a kill during that delete leaves the complete new dataset and a
    leftover that `make check` lists."""
    out = scenarios["dirs"]["data_delete"]
    plan = preflight.preflight(cfg_for(scenarios["model"], out, "data.max_length=128"), stage="check", echo=False)
    assert {r.name: r.status for r in plan.rows}["dataset"] == "ok"
    assert json.loads((out / "data" / "stats.json").read_text())["max_length"] == 128  # the new one
    [aside] = out.glob(".data.previous-*")
    assert aside.is_dir()
    assert aside in preflight.leftovers(out)


# -- adapter and manifest


def test_adapter_killed_mid_write_leaves_the_previous_one(scenarios):
    d = scenarios["dirs"]
    assert tree_digest(d["adapter_mid"] / "adapter") == tree_digest(d["train_prev"] / "adapter")
    cfg = cfg_for(scenarios["model"], d["adapter_mid"])
    assert modeling.adapter_dir(cfg) == d["adapter_mid"] / "adapter"
    assert (d["adapter_mid"] / "manifest.json").read_bytes() == (d["train_prev"] / "manifest.json").read_bytes()


def test_adapter_killed_during_the_swap_leaves_none_and_infer_says_so(scenarios):
    d = scenarios["dirs"]
    out = d["adapter_swap"]
    assert not (out / "adapter").exists()
    [aside] = out.glob(".adapter.previous-*")
    assert tree_digest(aside) == tree_digest(d["train_prev"] / "adapter")  # never read
    with pytest.raises(UserError, match="no LoRA adapter"):
        modeling.adapter_dir(cfg_for(scenarios["model"], out))
    rows = preflight.preflight(cfg_for(scenarios["model"], out), stage="check", echo=False).rows
    assert f"`mv {aside} {out / 'adapter'}` restores it" in " ".join(r.detail for r in rows)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "infer.py"), *stage_args(DEMO, scenarios["model"], out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "no LoRA adapter" in proc.stderr
    assert "make train" in " ".join(proc.stderr.split())


def test_adapter_killed_without_a_previous_one_leaves_none(scenarios):
    out = scenarios["dirs"]["adapter_fresh"]
    assert not (out / "adapter").exists()
    with pytest.raises(UserError, match="no LoRA adapter"):
        modeling.adapter_dir(cfg_for(scenarios["model"], out))


def test_manifest_killed_mid_write_leaves_the_previous_complete_one(scenarios):
    d = scenarios["dirs"]
    out = d["manifest_mid"]
    assert (out / "manifest.json").read_bytes() == (d["train_prev"] / "manifest.json").read_bytes()
    json.loads((out / "manifest.json").read_text())  # complete JSON
    [half] = out.glob(".manifest.json.tmp-*")
    with pytest.raises(json.JSONDecodeError):  # the half-written one exists only under its temp name
        json.loads(half.read_text())
    assert half in preflight.leftovers(out)
    # the new adapter was published with its own manifest: it says which run made it (seed 0), while
    # the top-level manifest still describes the previous run (seed 1)
    assert json.loads((out / "adapter" / "manifest.json").read_text())["seed"] == 0
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1


# -- merged model


def test_merged_killed_mid_write_leaves_the_previous_one(scenarios):
    d = scenarios["dirs"]
    before = tree_digest(d["merged_prev"] / "merged")
    assert tree_digest(d["merged_mid"] / "merged") == before
    detail, _ = model_folder.check_model_folder(d["merged_mid"] / "merged")  # loadable as a model folder
    assert "2 shard(s)" in detail or "1 shard(s)" in detail


def test_merged_killed_during_the_swap_or_without_a_previous_one_leaves_none(scenarios):
    d = scenarios["dirs"]
    for name in ("merged_swap", "merged_fresh"):
        merged = d[name] / "merged"
        assert not merged.exists(), name
        with pytest.raises(UserError, match="does not exist"):
            model_folder.check_model_folder(merged)
    [aside] = d["merged_swap"].glob(".merged.previous-*")
    assert tree_digest(aside) == tree_digest(d["merged_prev"] / "merged")


def test_a_merged_folder_cut_short_is_refused(scenarios, tmp_path):
    """What the rename protects against: the same folder with its weights cut short fails the check."""
    merged = tmp_path / "merged"
    shutil.copytree(scenarios["dirs"]["merged_prev"] / "merged", merged)
    shard = next(merged.glob("*.safetensors"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(UserError, match="is incomplete or corrupt"):
        model_folder.check_model_folder(merged)
