"""tracking.py, callbacks.py and loss_plot.py on a real short run: what SwanLab's local store holds, the
before/after samples, loss.png.

One demo-config run (6 steps, an eval split) through the real entry points, shared by this module and
tests/test_dashboard.py; the store is read the way swanboard reads it (runs.swanlab + logs/<folder>/*.log).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from generation_helpers import greedy_text_alone
from swanlab_store import read_tag

from hunyuan_lora import callbacks, config, loss_plot, tracking

REPO = Path(__file__).resolve().parents[1]
STEPS, LOGGING_STEPS = 6, 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def demo_run(tmp_path_factory, model_dir: Path) -> config.Config:
    """The session's one short training run (the first caller trains, later callers reuse it)."""
    out = tmp_path_factory.getbasetemp() / "tracking-run"
    overrides = [
        f"train.max_steps={STEPS}",
        f"train.logging_steps={LOGGING_STEPS}",
        "train.save_steps=1000",
        "train.resume=never",
        "data.eval_ratio=0.25",
        "swanlab.mode=local",
        "infer.max_new_tokens=8",
    ]
    cfg = config.load(REPO / "configs/demo.yaml", overrides, model_dir=str(model_dir), output_dir=str(out))
    if (out / "loss.png").is_file():
        return cfg
    shutil.rmtree(out, ignore_errors=True)
    args = ["--config", "configs/demo.yaml", "--model-dir", str(model_dir), "--output-dir", str(out)]
    args += [a for o in overrides for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWANLAB_")}  # local, whatever the shell says
    for script in ("scripts/dataset.py", "scripts/train.py"):
        proc = subprocess.run(
            [sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        (out.parent / f"tracking-run.{Path(script).stem}.log").write_text(proc.stdout + proc.stderr)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, patched_stand_in) -> config.Config:
    return demo_run(tmp_path_factory, patched_stand_in)


def _history(cfg) -> list[dict]:
    return json.loads((cfg.output_dir / "log_history.json").read_text(encoding="utf-8"))


def _the_experiment(cfg) -> dict:
    (exp,) = tracking.local_experiments(cfg.output_dir / "swanlog")
    return exp


def _series(cfg, tag: str) -> list[tuple[int, object]]:
    records = read_tag(cfg.output_dir / "swanlog", _the_experiment(cfg)["run_id"], tag)
    return [(r["index"], r["data"]) for r in records]


# ---- SwanLab's store == the Trainer's log history -----------------------------------------------


@pytest.mark.slow
def test_the_store_holds_one_finished_experiment_named_after_the_run(run):
    exp = _the_experiment(run)
    assert (exp["name"], exp["project"], exp["status"]) == (run.run.name, run.swanlab.project, "finished")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tag", "key"),
    [
        ("train/loss", "loss"),
        ("train/grad_norm", "grad_norm"),
        ("train/learning_rate", "learning_rate"),
        ("eval/loss", "eval_loss"),
    ],
)
def test_logged_curves_equal_the_trainer_log_history(run, tag, key):
    expected = [(row["step"], row[key]) for row in _history(run) if key in row]
    assert len(expected) == STEPS // LOGGING_STEPS
    assert _series(run, tag) == expected


@pytest.mark.slow
def test_throughput_is_logged_at_each_train_log_and_counts_real_tokens(run):
    stats = json.loads((run.output_dir / "data/stats.json").read_text())
    samples, tokens = _series(run, "perf/samples_per_second"), _series(run, "perf/tokens_per_second")
    steps = [row["step"] for row in _history(run) if "loss" in row]
    assert [s for s, _ in samples] == [s for s, _ in tokens] == steps
    for (_, per_s), (_, tok_s) in zip(samples, tokens):
        assert per_s > 0
        assert tok_s > 0
        # tokens per sample of the window: a mean of unpadded lengths, within the dataset's range
        assert stats["tokens"]["min"] - 1 <= tok_s / per_s <= stats["tokens"]["max"] + 1
    assert not _series(run, "perf/gpu0_peak_memory_gib")  # a CPU run logs no GPU memory


@pytest.mark.slow
def test_eval_logs_do_not_repeat_the_train_step_keys(run):
    # One train/epoch and train/global_step point per train log (the stock callback also adds them
    # to eval logs, which SwanLab rejects with a warning per evaluation).
    steps = [row["step"] for row in _history(run) if "loss" in row]
    assert [s for s, _ in _series(run, "train/global_step")] == steps
    assert [s for s, _ in _series(run, "train/epoch")] == steps


@pytest.mark.slow
def test_config_is_flat_and_complete(run):
    exp = _the_experiment(run)
    raw = yaml.safe_load((run.output_dir / "swanlog" / exp["run_id"] / "files/config.yaml").read_text())
    values = {k: v["value"] for k, v in raw.items()}
    manifest = json.loads((run.output_dir / "manifest.json").read_text())
    stats = json.loads((run.output_dir / "data/stats.json").read_text())
    for key in config.Config().to_dict()["lora"]:
        assert f"lora.{key}" in values, key
    assert values["train.max_steps"] == STEPS
    assert values["train.gradient_checkpointing"] == "true"
    assert values["lora.targets"] == ", ".join(run.lora.targets())
    assert values["params.trainable"] == manifest["lora"]["trainable_params"]
    assert values["params.total"] == manifest["lora"]["total_params"]
    assert values["dataset.examples"] == stats["examples"]
    assert values["dataset.splits.eval"] == stats["splits"]["eval"] > 0
    assert values["dataset.tokens.p95"] == stats["tokens"]["p95"]
    assert {values[f"versions.{name}"] for name in ("torch", "transformers", "peft", "swanlab")} == {
        manifest["packages"][name] for name in ("torch", "transformers", "peft", "swanlab")
    }
    # HF's own dumps are one entry each, not ~180 rows between ours
    nested = sorted(k for k, v in values.items() if isinstance(v, dict))
    assert nested == ["model_config", "trainer_args"]
    assert values["trainer_args"]["max_steps"] == STEPS


# ---- before / after samples --------------------------------------------------------------------


@pytest.mark.slow
def test_sample_panel_has_before_and_after_rows_per_prompt(run):
    (record,) = read_tag(run.output_dir / "swanlog", _the_experiment(run)["run_id"], callbacks.SAMPLES_KEY)
    assert record["index"] == STEPS  # logged once, at the end
    captions = [m["caption"] for m in record["more"]]
    assert captions == [c for p in run.infer.prompts for c in (f"before: {p}", f"after: {p}")]
    assert all(isinstance(t, str) and t.strip() for t in record["data"])


@pytest.mark.slow
def test_before_is_the_base_model_and_after_is_the_saved_adapter(run):
    """Regenerate both columns outside training: the base folder alone, then base + adapter/."""
    from hunyuan_lora import modeling, prompt, runtime

    (record,) = read_tag(run.output_dir / "swanlog", _the_experiment(run)["run_id"], callbacks.SAMPLES_KEY)
    logged_before, logged_after = record["data"][0::2], record["data"][1::2]
    greedy = callbacks.SampleGenerations(run, tokenizer=None).cfg
    assert (greedy.infer.do_sample, greedy.infer.max_new_tokens) == (False, 8)
    tokenizer = modeling.load_tokenizer(run.model.dir)
    where = runtime.placement(run)
    base = modeling.load_base_model(run, where).model.eval()
    tuned = modeling.load_with_adapter(run, where, run.output_dir / "adapter").model
    for model, logged in ((base, logged_before), (tuned, logged_after)):
        answers = [
            prompt.extract_answer(
                greedy_text_alone(
                    model,
                    tokenizer,
                    prompt.prompt_ids(tokenizer, prompt.ask(p, greedy), False),
                    greedy.infer.max_new_tokens,
                )
            )
            for p in run.infer.prompts
        ]
        assert answers == logged


def test_the_samples_are_one_batch_each_prompt_answered_as_alone(lora_run, monkeypatch):
    """Every prompt in one generate call (left-padded), each answered as it would be alone, and the
    model back in training mode after."""
    import dataclasses
    from types import SimpleNamespace

    from hunyuan_lora import modeling, prompt

    prompts = ["你是谁？", "你喜欢什么花？请说说看", "一"]
    cfg = dataclasses.replace(lora_run, infer=dataclasses.replace(lora_run.infer, prompts=prompts))
    loaded, tokenizer = modeling.load_for_generation(cfg)
    model = loaded.model
    samples = callbacks.SampleGenerations(cfg, tokenizer)
    batches, generate = [], model.generate

    def counted(**kwargs):
        batches.append(kwargs["input_ids"].shape[0])
        return generate(**kwargs)

    monkeypatch.setattr(model, "generate", counted)
    model.train()
    samples.on_train_begin(None, SimpleNamespace(is_world_process_zero=True), None, model=model)
    assert batches == [len(prompts)]
    assert model.training
    monkeypatch.undo()
    model.eval()
    with model.disable_adapter():
        alone = [
            prompt.extract_answer(
                greedy_text_alone(
                    model,
                    tokenizer,
                    prompt.prompt_ids(tokenizer, prompt.ask(p, samples.cfg), False),
                    samples.cfg.infer.max_new_tokens,
                )
            )
            for p in prompts
        ]
    assert samples.before == alone
    assert any(alone)


# ---- loss.png ----------------------------------------------------------------------------------


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_loss_png_is_a_png_of_the_log_history(run, tmp_path):
    png = run.output_dir / "loss.png"
    data = png.read_bytes()
    assert _png_size(data) == (800, 450)  # figsize 8 x 4.5 in at 100 dpi
    assert len(data) > 10_000  # axes, two curves, legend: not an empty canvas
    # regenerated from log_history.json: the same bytes
    again = loss_plot.plot_loss(run.output_dir / "log_history.json", tmp_path / "again.png")
    assert again.read_bytes() == data
    # ... and other values give another image
    changed = _history(run)
    for row in changed:
        if "loss" in row:
            row["loss"] *= 0.5
    assert loss_plot.plot_loss(changed, tmp_path / "changed.png").read_bytes() != data
    without_eval = [row for row in _history(run) if "eval_loss" not in row]
    assert loss_plot.plot_loss(without_eval, tmp_path / "train_only.png").read_bytes() != data


@pytest.mark.slow
def test_the_readmes_loss_png_command_regenerates_it(run, tmp_path):
    """The README's command as written, from the repository root (where `make setup` put .venv)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (command,) = re.findall(r"`([^`]*-m hunyuan_lora\.loss_plot [^`]*)`", readme)
    history = tmp_path / "run" / "log_history.json"
    history.parent.mkdir()
    shutil.copy(run.output_dir / "log_history.json", history)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}  # a fresh shell
    proc = subprocess.run(
        ["bash", "-c", command.replace("outputs/<run>", str(history.parent))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (history.parent / "loss.png").read_bytes() == (run.output_dir / "loss.png").read_bytes()


@pytest.mark.slow
def test_loss_png_before_the_first_log_is_an_empty_plot_not_a_crash(run, tmp_path):
    # A run shorter than logging_steps has only the final summary in its history.
    summary_only = [row for row in _history(run) if "loss" not in row and "eval_loss" not in row]
    assert summary_only
    assert "train_runtime" in summary_only[0]
    png = loss_plot.plot_loss(summary_only, tmp_path / "empty.png")
    assert _png_size(png.read_bytes()) == (800, 450)


# ---- make watch --------------------------------------------------------------------------------


def test_watch_without_logs_says_to_train_first(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/watch.py",
            "--config",
            "configs/demo.yaml",
            "--output-dir",
            str(tmp_path / "never-trained"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    message = " ".join(proc.stderr.split())
    assert "no SwanLab logs in" in message
    assert "make train" in message
    assert "make demo" in message


def test_watch_rejects_a_host_swanboard_cannot_bind(tmp_path, run):
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/watch.py",
            "--config",
            "configs/demo.yaml",
            "--output-dir",
            str(run.output_dir),
            "--host",
            "localhost",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "not an IPv4 address" in proc.stderr
    assert "127.0.0.1" in proc.stderr


# ---- mode handling (fast) ----------------------------------------------------------------------


def test_disabled_mode_adds_no_callbacks():
    assert (
        callbacks.swanlab_callbacks(config.load(REPO / "configs/demo.yaml"), "disabled", {}, 1, 2, tokenizer=None) == []
    )


def test_stages_print_no_accelerator_detection_and_no_ansi_codes_into_a_pipe(run):
    """Each stage printed DeepSpeed's "Setting accelerator" lines, and SwanLab coloured its lines with
    ANSI codes even into a pipe or a file."""
    for stage in ("dataset", "train"):
        text = (run.output_dir.parent / f"tracking-run.{stage}.log").read_text()
        assert "Setting accelerator" not in text, stage
        assert "Setting ds_accelerator" not in text, stage
    swanlab_lines = [line for line in text.splitlines() if "swanlab" in line.lower()]
    assert any(line.startswith("swanlab: ") for line in swanlab_lines), text[-3000:]
    assert not [line for line in swanlab_lines if "\x1b[" in line]
