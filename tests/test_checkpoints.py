"""A run's checkpoints across reruns of `make train`: the whole run's train_loss after a resume, a
finished run left alone, a fresh run (train.resume: never) that never mixes with an earlier one.

Runs of the demo recipe on the patched stand-in, in this process: 6 optimizer steps, a loss logged
every step and a checkpoint every 3, seed 0 (the runs are deterministic on the CPU, test_resume.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hunyuan_lora import checkpoints, config, data, train

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["train.max_steps=6", "train.logging_steps=1", "train.save_steps=3", "swanlab.mode=disabled", "run.seed=0"]

pytestmark = pytest.mark.slow


def cfg_for(model: Path, out: Path, *overrides: str) -> config.Config:
    return config.load(REPO / "configs/demo.yaml", [*SETTINGS, *overrides], model_dir=str(model), output_dir=str(out))


@pytest.fixture(scope="module")
def finished_run(patched_stand_in, tmp_path_factory) -> Path:
    """An uninterrupted run: checkpoint-3, checkpoint-6, adapter/, manifest.json."""
    out = tmp_path_factory.mktemp("finished") / "out"
    cfg = cfg_for(patched_stand_in, out, "train.resume=never")
    data.run(cfg)
    train.run(cfg)
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def test_train_loss_after_a_resume_is_the_whole_runs(finished_run, patched_stand_in, tmp_path):
    """As after a kill -9 between the checkpoints: only checkpoint-3 survives, the rerun trains 4-6."""
    out = tmp_path / "out"
    shutil.copytree(
        finished_run, out, ignore=shutil.ignore_patterns("checkpoint-6", *checkpoints.PUBLISHED, *checkpoints.RUN_LOG)
    )
    train.run(cfg_for(patched_stand_in, out))
    resumed, reference = manifest(out), manifest(finished_run)
    assert resumed["resumed_from"] == str(out / "checkpoint-3")
    assert resumed["global_step"] == 6
    # the Trainer's own number here is steps 4-6's loss divided by 6 steps: about half
    assert resumed["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-3)


def test_a_finished_run_is_left_alone(finished_run, patched_stand_in, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*")}
    manifest_text = (finished_run / "manifest.json").read_text(encoding="utf-8")
    assert train.run(cfg_for(patched_stand_in, finished_run)) == finished_run / "adapter"
    assert "already complete" in capsys.readouterr().out
    assert (finished_run / "manifest.json").read_text(encoding="utf-8") == manifest_text
    assert {p.name: p.stat().st_mtime_ns for p in finished_run.rglob("*")} == before


def test_a_fresh_run_sets_the_earlier_one_aside(finished_run, patched_stand_in, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    (out / "checkpoint-9").mkdir()  # a later checkpoint of the earlier run (kill -9 while saving)
    cfg = cfg_for(patched_stand_in, out, "train.resume=never", "train.max_steps=3")
    train.run(cfg)
    assert "set aside in" in capsys.readouterr().out
    (aside,) = (out / checkpoints.PREVIOUS_RUNS).iterdir()
    assert sorted(p.name for p in aside.iterdir()) == sorted(
        ["checkpoint-3", "checkpoint-6", "checkpoint-9", *checkpoints.RUN_LOG]
    )
    assert json.loads((aside / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6  # whole
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]  # only the new run's
    assert manifest(out)["global_step"] == 3
    assert manifest(out)["resumed_from"] is None
    assert manifest(out / "adapter") == manifest(out)  # the new run's adapter replaced the earlier one


def test_a_killed_fresh_run_is_not_taken_for_the_finished_earlier_one(finished_run, patched_stand_in, tmp_path):
    """The earlier adapter stays published while a fresh run trains; its checkpoints are not that adapter's."""
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    checkpoints.set_aside_previous_run(out)  # as `make train` with resume: never does first
    # the fresh run, killed after its last save: a checkpoint written now, after the earlier adapter
    shutil.copytree(finished_run / "checkpoint-6", out / "checkpoint-6", copy_function=shutil.copy)
    point = checkpoints.resume_point(cfg_for(patched_stand_in, out))
    assert point.step == 6
    assert not checkpoints.published_from(out, point)
    assert checkpoints.published_from(finished_run, checkpoints.resume_point(cfg_for(patched_stand_in, finished_run)))


def test_whole_run_loss_from_the_log_history():
    history = [{"loss": 4.0, "step": 2}, {"loss": 3.0, "step": 4}, {"loss": 2.0, "step": 6}]  # logged every 2
    # uninterrupted, 7 steps: the Trainer's sum over all 7 steps / 7 is the mean
    assert checkpoints.whole_run_loss(history, 0, 20.0 / 7, 7) == pytest.approx(20.0 / 7)
    # resumed at step 4: this session ran 5-7, summed 2 * 2 (steps 5-6) + 1.0 (step 7), divided by 7 by the Trainer
    assert checkpoints.whole_run_loss(history, 4, 5.0 / 7, 7) == pytest.approx((8 + 6 + 4 + 1) / 7)
