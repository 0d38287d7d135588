"""Resume after a kill, and SIGTERM, through the real entry point (scripts/train.py subprocesses).

Four short runs of the demo recipe on a copy of the patched stand-in, OMP_NUM_THREADS=1 and the
same seed, 8 optimizer steps each:
    reference  uninterrupted
    killed     SIGKILL as soon as checkpoint-2 is complete (trainer_state.json written), then rerun
               with resume: auto -- after planting an incomplete newer checkpoint, as a kill while
               saving leaves one (trainer_state.json is the last file the Trainer writes)
    sigterm    SIGTERM after the first logged step (no periodic checkpoints), then rerun
The reference runs alongside the first round to keep the wall time down.

Tolerance for the resumed runs against the reference: 1e-4 on every logged loss after the
checkpoint, 1e-5 on every adapter weight. Why so tight: on one CPU thread the arithmetic is
deterministic, and the Trainer restores LoRA weights, Adam moments, LR schedule, data position
and the RNG states (attention dropout 0.1, LoRA dropout 0.1) from the checkpoint, so a correct
resume is bit-identical here (observed difference: 0.0). The faults it must catch are far larger
(measured once by breaking the checkpoint of this very scenario): Adam moments not restored ->
losses differ by up to 0.031 and weights by 0.012; RNG state not restored -> 0.0088 and 0.010.
A restart from step 0 gives the same numbers (the runs are deterministic), so it is caught by what
the rerun prints instead: "resuming from checkpoint-K" and only MAX_STEPS - K logged losses.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from script_helpers import stage_args

from hunyuan_lora import config, data

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"
MAX_STEPS = 8
LOSS_TOLERANCE = 1e-4
WEIGHT_TOLERANCE = 1e-5
RUN_SETTINGS = [f"train.max_steps={MAX_STEPS}", "train.logging_steps=1", "swanlab.mode=disabled", "run.seed=0"]
LOSS_LINE = re.compile(r"\{'loss': ([0-9.]+)")
TIMEOUT = 300

pytestmark = pytest.mark.slow


class Run:
    """scripts/train.py in a subprocess, stdout/stderr to files (a full pipe would block it)."""

    def __init__(self, name: str, model: Path, out: Path, *overrides: str):
        self.name, self.out = name, out
        self.stdout_path, self.stderr_path = out.parent / f"{name}.stdout", out.parent / f"{name}.stderr"
        args = [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            *stage_args(DEMO, model, out, SAMPLE, RUN_SETTINGS + list(overrides)),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.stdout_path, "w") as so, open(self.stderr_path, "w") as se:
            self.proc = subprocess.Popen(args, cwd=REPO, stdout=so, stderr=se, env=env)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def finish(self) -> int:
        return self.proc.wait(timeout=TIMEOUT)


def complete_steps(out: Path) -> list[int]:
    """Steps of the checkpoints whose trainer_state.json (written last) is complete: the test's own rule."""
    steps = []
    for p in out.glob("checkpoint-*"):
        try:
            if json.loads((p / "trainer_state.json").read_text())["global_step"] == int(p.name.split("-")[1]):
                steps.append(int(p.name.split("-")[1]))
        except (OSError, ValueError, KeyError):
            pass
    return sorted(steps)


def logged_losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in json.loads((out / "log_history.json").read_text()) if "loss" in row}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(patched_stand_in, tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    model = root / "stand-in"
    shutil.copytree(patched_stand_in, model)
    template = root / "template"
    data.run(config.load(DEMO, model_dir=str(model), output_dir=str(template), data=str(SAMPLE)))
    outs = {}
    for name in ("reference", "killed", "sigterm"):
        outs[name] = root / name / "out"
        outs[name].mkdir(parents=True)
        shutil.copytree(template / "data", outs[name] / "data")
    result = {"outs": outs}

    # -- round 1: reference, the run to SIGKILL, the run to SIGTERM, side by side
    reference = Run("reference", model, outs["reference"], "train.save_steps=2")
    killed = Run("killed", model, outs["killed"], "train.save_steps=2")
    sigterm = Run("sigterm", model, outs["sigterm"], "train.save_steps=100")

    # One polling loop for both, so that neither signal waits for the other run's event.
    pending = {
        killed: (lambda: 2 in complete_steps(outs["killed"]), signal.SIGKILL, "complete checkpoint-2"),
        sigterm: (lambda: LOSS_LINE.search(sigterm.stdout), signal.SIGTERM, "first logged loss"),
    }
    deadline = time.time() + TIMEOUT
    while pending:
        for run, (ready, sig, what) in list(pending.items()):
            if ready():
                run.proc.send_signal(sig)
                del pending[run]
            elif run.proc.poll() is not None or time.time() > deadline:
                run.proc.kill()
                raise AssertionError(f"{run.name}: no {what} ({run.proc.wait()}):\n{run.stderr[-3000:]}")
        time.sleep(0.01)
    result["killed_rc"] = killed.finish()
    result["killed_complete"] = complete_steps(outs["killed"])
    result["killed_stdout"] = killed.stdout
    result["sigterm_rc"] = sigterm.finish()
    result["sigterm_stdout"], result["sigterm_stderr"] = sigterm.stdout, sigterm.stderr
    result["sigterm_checkpoints"] = sorted(p.name for p in outs["sigterm"].glob("checkpoint-*"))
    result["sigterm_complete"] = complete_steps(outs["sigterm"])

    # A kill while saving leaves checkpoint-N without trainer_state.json: plant one after the last
    # complete checkpoint unless the kill already left one.
    last = max(result["killed_complete"])
    partial = outs["killed"] / f"checkpoint-{last + 2}"
    if last + 2 <= MAX_STEPS and not partial.exists():
        shutil.copytree(outs["killed"] / f"checkpoint-{last}", partial)
        (partial / "trainer_state.json").unlink()
        with open(partial / "optimizer.pt", "r+b") as f:
            f.truncate(100)
    result["planted"] = partial.name if partial.exists() else None

    # -- round 2: both reruns with resume: auto
    resumed = Run("resumed", model, outs["killed"], "train.save_steps=2", "train.resume=auto")
    after_sigterm = Run("after-sigterm", model, outs["sigterm"], "train.save_steps=100", "train.resume=auto")
    for run in (reference, resumed, after_sigterm):
        rc = run.finish()
        assert rc == 0, f"{run.name} failed ({rc}):\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
        result[f"{run.name}_stdout"], result[f"{run.name}_stderr"] = run.stdout, run.stderr
    return result


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------
# SIGKILL, then resume: auto


def test_kill_leaves_a_complete_checkpoint_and_no_adapter(runs):
    assert runs["killed_rc"] == -signal.SIGKILL
    assert 2 in runs["killed_complete"]
    assert max(runs["killed_complete"]) < MAX_STEPS
    assert "adapter saved" not in runs["killed_stdout"]


def test_rerun_continues_from_the_last_complete_checkpoint(runs):
    out, last = runs["outs"]["killed"], max(runs["killed_complete"])
    stdout = runs["resumed_stdout"]
    assert f"resuming from {out / f'checkpoint-{last}'}\n" in stdout
    # not from step 0: only the steps after the checkpoint are trained (and logged) again
    assert len(LOSS_LINE.findall(stdout)) == MAX_STEPS - last
    assert sorted(logged_losses(out)) == list(range(1, MAX_STEPS + 1))  # 1..last come from the checkpoint
    manifest = _manifest(out)
    assert manifest["resumed_from"] == str(out / f"checkpoint-{last}")
    assert manifest["global_step"] == MAX_STEPS


def test_incomplete_checkpoint_is_set_aside_not_resumed(runs):
    out, planted = runs["outs"]["killed"], runs["planted"]
    assert planted, "the scenario needs an incomplete checkpoint after the last complete one"
    assert f"{planted} is incomplete" in runs["resumed_stdout"]
    assert (out / f"incomplete-{planted}").is_dir()
    assert int(planted.split("-")[1]) in complete_steps(out)  # written afresh when training got there again


def test_resumed_run_ends_where_the_uninterrupted_one_does(runs):
    ref, out, last = runs["outs"]["reference"], runs["outs"]["killed"], max(runs["killed_complete"])
    assert _manifest(ref)["global_step"] == _manifest(out)["global_step"] == MAX_STEPS
    ref_losses, losses = logged_losses(ref), logged_losses(out)
    for step in range(last + 1, MAX_STEPS + 1):
        assert abs(losses[step] - ref_losses[step]) <= LOSS_TOLERANCE, (step, losses[step], ref_losses[step])
    ref_w, w = adapter(ref), adapter(out)
    assert ref_w.keys() == w.keys()
    assert max((ref_w[k] - w[k]).abs().max().item() for k in w) <= WEIGHT_TOLERANCE


# ---------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_exits(runs):
    stderr = runs["sigterm_stderr"]
    assert runs["sigterm_rc"] == 1, stderr[-2000:]
    assert "SIGTERM received: saving a checkpoint after this step, then stopping" in stderr
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", stderr)[1])
    assert 1 <= step < MAX_STEPS  # mid-run
    assert "Traceback" not in stderr
    assert runs["sigterm_checkpoints"] == [f"checkpoint-{step}"]  # save_steps=100: only the SIGTERM save
    assert runs["sigterm_complete"] == [step]  # and complete: trainer_state.json says that step
    assert "adapter saved" not in runs["sigterm_stdout"]


def test_rerun_after_sigterm_resumes_from_its_checkpoint(runs):
    out, ref = runs["outs"]["sigterm"], runs["outs"]["reference"]
    step = int(re.search(r"stopped by SIGTERM at step (\d+)", runs["sigterm_stderr"])[1])
    stdout = runs["after-sigterm_stdout"]
    assert f"resuming from {out / f'checkpoint-{step}'}\n" in stdout
    assert len(LOSS_LINE.findall(stdout)) == MAX_STEPS - step
    assert _manifest(out)["global_step"] == MAX_STEPS
    ref_losses, losses = logged_losses(ref), logged_losses(out)
    for s in range(step + 1, MAX_STEPS + 1):
        assert abs(losses[s] - ref_losses[s]) <= LOSS_TOLERANCE, (s, losses[s], ref_losses[s])
    ref_w, w = adapter(ref), adapter(out)
    assert max((ref_w[k] - w[k]).abs().max().item() for k in w) <= WEIGHT_TOLERANCE


def test_no_traceback_in_any_run(runs):
    for key, text in runs.items():
        if key.endswith(("_stdout", "_stderr")):
            assert "Traceback" not in text, (key, text[-3000:])


def test_sigterm_handler_is_safe_inside_a_print():
    """A signal can arrive while the main thread is inside print(); a handler that prints then raises
    "RuntimeError: reentrant call" out of the Trainer's own print and the run dies unsaved."""
    from hunyuan_lora.callbacks import SaveOnSignal

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        callback = SaveOnSignal()
        handler = signal.getsignal(signal.SIGTERM)

        class SignalMidWrite(io.RawIOBase):
            fired = False

            def writable(self):
                return True

            def write(self, b):
                if not self.fired:
                    self.fired = True
                    handler(signal.SIGTERM, None)  # the signal lands inside this write
                return len(b)

        stdout = sys.stdout
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(SignalMidWrite()), line_buffering=True)
        try:
            print("{'loss': 7.59}")
        finally:
            sys.stdout = stdout
        assert callback.received == "SIGTERM"
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def test_a_run_killed_after_its_last_checkpoint_publishes_it_without_another_step(patched_stand_in, tmp_path):
    """train.max_steps ending mid-epoch (the demo's epoch is 8 steps): the Trainer resumed at the last step
    trained one step more (a checkpoint-3, a logged step 3). Now the checkpoint is published as it is."""
    model, out = tmp_path / "stand-in", tmp_path / "out"
    shutil.copytree(patched_stand_in, model)
    data.run(config.load(DEMO, model_dir=str(model), output_dir=str(out), data=str(SAMPLE)))
    settings = ("train.max_steps=2", "train.save_steps=2")
    first = Run("first", model, out, *settings)
    assert first.finish() == 0, first.stderr[-3000:]
    shutil.rmtree(out / "adapter")  # as a kill between the last checkpoint and the publishing leaves it
    again = Run("again", model, out, *settings)
    assert again.finish() == 0, again.stderr[-3000:]
    assert "checkpoint-2 is the run's last step: publishing it, no step trained" in again.stdout
    assert not LOSS_LINE.search(again.stdout)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert sorted(logged_losses(out)) == [1, 2]
    published = adapter(out)
    saved = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert published.keys() == saved.keys()
    assert all(torch.equal(published[k], saved[k]) for k in saved)
    assert _manifest(out)["global_step"] == 2
