"""check.py / `make check`: every preflight failure is one UserError (what, where, fix), exit code 2
from the scripts, raised before any weights load, and `train` runs the same checks first.

The real-size cases use a fake Hunyuan-A13B folder: the real config.json and sparse safetensors
shards whose headers list every real tensor (160 GB apparent size, nothing on disk), so parameter
counts, disk and memory estimates are exercised at full scale on a CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hunyuan_lora import checkpoints, config, data, estimate, patch, preflight, runtime, train, training
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
HUANHUAN_CONFIG = REPO / "configs" / "huanhuan.yaml"
HUANHUAN_DATA = REPO.parent / "shared" / "data" / "huanhuan.json"
REAL_TOTAL = 80_393_183_232  # hunyuan-a13b.md: 32 x 2,495,881,472 + 524,972,032
REAL_LORA_TUTORIAL = 364_642_304  # hunyuan-a13b.md: r=8 on q/k/v/o/gate/up/down
H200 = 141 * 10**9  # bytes a fresh H200 reports free, roughly


SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"  # the demo's data, from any cwd


def demo_cfg(model_dir: Path, output_dir: Path, *overrides: str, data_path: str | None = None) -> config.Config:
    return config.load(
        DEMO, list(overrides), model_dir=str(model_dir), output_dir=str(output_dir), data=data_path or str(SAMPLE)
    )


@pytest.fixture(scope="module")
def tokenized(patched_stand_in, tmp_path_factory) -> Path:
    """An output folder with the demo dataset tokenized (what `make dataset` leaves)."""
    out = tmp_path_factory.mktemp("check") / "out"
    data.run(demo_cfg(patched_stand_in, out))
    return out


@pytest.fixture
def run_dir(tokenized, tmp_path) -> Path:
    """A private copy of the tokenized output folder a test may damage."""
    dst = tmp_path / "out"
    shutil.copytree(tokenized, dst)
    return dst


@pytest.fixture
def patched_copy(patched_stand_in, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(patched_stand_in, dst)
    return dst


def failure(cfg, stage="train") -> UserError:
    with pytest.raises(UserError) as info:
        preflight.preflight(cfg, stage=stage, echo=False)
    assert info.value.fix, info.value.paragraph()  # every failure says how to fix it
    return info.value


def rows(cfg, stage="check") -> dict[str, preflight.Row]:
    plan = preflight.preflight(cfg, stage=stage, echo=False)
    return {r.name: r for r in plan.rows}


# ---------------------------------------------------------------------------------------------
# the passing case


def test_passing_preflight_prints_the_table_and_returns_the_plan(patched_stand_in, tokenized, capsys):
    plan = preflight.preflight(demo_cfg(patched_stand_in, tokenized), stage="train")
    table = capsys.readouterr().out
    for name in ("config", "model folder", "patch", "parameters", "dataset", "resume", "output", "driver", "memory"):
        assert f"  {name} " in table
    assert "FAIL" not in table
    # the driver row is skipped on a machine without an NVIDIA driver (test_the_driver_is_read_from_nvml)
    driver = Path("/proc/driver/nvidia/version").is_file()
    assert {r.status for r in plan.rows if r.name != "driver" or driver} == {"ok"}
    assert (plan.placement.device, plan.placement.dtype, plan.resume.path) == ("cpu", torch.float32, None)
    assert "55,552 trainable" in table
    assert "40 examples" in table


def test_parameter_counts_from_config_json_equal_peft_on_the_loaded_model(patched_stand_in):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = config.load(DEMO, model_dir=str(patched_stand_in))
    counted = estimate.count_parameters(
        json.loads((patched_stand_in / "config.json").read_text()), cfg.lora.targets(), cfg.lora.r
    )
    model = AutoModelForCausalLM.from_pretrained(patched_stand_in, trust_remote_code=True, torch_dtype=torch.float32)
    trainable, total = get_peft_model(model, training.lora_config(cfg)).get_nb_trainable_parameters()
    assert (counted.lora, counted.total + counted.lora) == (trainable, total)


def test_parameter_counts_of_the_real_config_are_the_published_ones():
    from hunyuan_lora.hunyuan.a13b import real_config

    counted = estimate.count_parameters(real_config(), config.LORA_PRESETS["tutorial"], 8)
    assert (counted.total, counted.lora) == (REAL_TOTAL, REAL_LORA_TUTORIAL)
    assert counted.per_target["gate_proj"] == 32 * 65  # 64 routed experts + the shared one, per layer


# ---------------------------------------------------------------------------------------------
# model folder


def _drop_auto_map(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["auto_map"]
    (folder / "config.json").write_text(json.dumps(cfg))


def _truncate(path: Path, n: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - n)


def _bad_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))


def _index_names_a_tensor_the_shard_lacks(folder: Path) -> None:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.extra.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _download_json_with_other_size(folder: Path) -> None:
    files = [{"path": p.name, "size": p.stat().st_size} for p in folder.iterdir() if p.is_file()]
    next(f for f in files if f["path"] == "hy.tiktoken")["size"] += 1
    (folder / "download.json").write_text(json.dumps({"files": files}))


MODEL_FOLDER_FAULTS = [
    ("folder missing", lambda f: shutil.rmtree(f), ["does not exist", "make download"]),
    (
        "shard missing",
        lambda f: (f / "model-00002-of-00002.safetensors").unlink(),
        ["model-00002-of-00002.safetensors (named in model.safetensors.index.json) is missing"],
    ),
    ("tokenizer file missing", lambda f: (f / "hy.tiktoken").unlink(), ["hy.tiktoken (tokenizer) is missing"]),
    ("imported code file missing", lambda f: (f / "modeling_hunyuan.py").unlink(), ["modeling_hunyuan.py"]),
    ("tokenizer code missing", lambda f: (f / "tokenization_hy.py").unlink(), ["tokenization_hy.py"]),
    ("config.json missing", lambda f: (f / "config.json").unlink(), ["config.json is missing"]),
    ("no auto_map", _drop_auto_map, ["has no auto_map", "model.revision"]),
    (
        "shard cut short",
        lambda f: _truncate(f / "model-00001-of-00002.safetensors"),
        ["model-00001-of-00002.safetensors is incomplete or corrupt", "its header describes"],
    ),
    (
        "shard header corrupt",
        lambda f: _bad_header(f / "model-00002-of-00002.safetensors"),
        ["model-00002-of-00002.safetensors is incomplete or corrupt", "header is cut short"],
    ),
    (
        "index names a missing tensor",
        _index_names_a_tensor_the_shard_lacks,
        ["1 tensor(s) named in model.safetensors.index.json are not in their shard", "model.layers.0.extra.weight"],
    ),
    ("size differs from download.json", _download_json_with_other_size, ["hy.tiktoken has", "the server lists"]),
]


@pytest.mark.parametrize(("name", "damage", "fragments"), MODEL_FOLDER_FAULTS, ids=[c[0] for c in MODEL_FOLDER_FAULTS])
def test_model_folder_faults(patched_copy, run_dir, name, damage, fragments):
    damage(patched_copy)
    error = failure(demo_cfg(patched_copy, run_dir))
    for fragment in fragments:
        assert fragment in error.paragraph(), error.paragraph()


def test_patched_file_is_size_checked_through_its_orig(stand_in_dir, run_dir, tmp_path):
    """download.json lists the downloaded hunyuan.py; after `make patch` its size differs on purpose."""
    folder = tmp_path / "m"
    shutil.copytree(stand_in_dir, folder)
    files = [{"path": p.name, "size": p.stat().st_size} for p in folder.iterdir() if p.is_file()]
    (folder / "download.json").write_text(json.dumps({"files": files}))
    patch.patch_folder(folder)
    assert rows(demo_cfg(folder, run_dir))["model folder"].status == "ok"
    (folder / "hunyuan.py.orig").write_text("changed")
    assert "hunyuan.py.orig has" in failure(demo_cfg(folder, run_dir)).paragraph()


# ---------------------------------------------------------------------------------------------
# patch and LoRA targets


def test_unpatched_hunyuan_py_fails_only_with_gradient_checkpointing(stand_in_dir, run_dir):
    error = failure(demo_cfg(stand_in_dir, run_dir))
    assert "`make patch`" in error.paragraph()
    assert "NameError" in error.what
    assert error.where.endswith("hunyuan.py")
    table = rows(demo_cfg(stand_in_dir, run_dir, "train.gradient_checkpointing=false"))
    assert table["patch"].status == "skip"
    if hasattr(config.ModelSection, "moe_impl"):  # the project's own code does not run the folder's hunyuan.py
        assert rows(demo_cfg(stand_in_dir, run_dir, "model.moe_impl=fast"))["patch"].status == "skip"


@pytest.mark.parametrize(
    ("targets", "fragments"),
    [
        ("[q_proj, qproj]", ["'qproj' matches no module (did you mean 'q_proj'?)"]),
        ("[q_proj, input_layernorm]", ["'input_layernorm' matches modules that are not nn.Linear"]),
        ("[experts]", ["'experts' matches modules that are not nn.Linear"]),
    ],
)
def test_lora_target_matching_no_linear_fails_before_loading(patched_stand_in, run_dir, targets, fragments):
    cfg = demo_cfg(patched_stand_in, run_dir, "lora.preset=custom", f"lora.target_modules={targets}")
    error = failure(cfg)
    assert error.where == "lora.target_modules"
    for fragment in fragments:
        assert fragment in error.what


# ---------------------------------------------------------------------------------------------
# dataset


def test_train_needs_the_tokenized_dataset(patched_stand_in, tmp_path):
    error = failure(demo_cfg(patched_stand_in, tmp_path / "fresh"))
    assert "no tokenized dataset" in error.what
    assert "`make dataset`" in error.fix


def test_check_before_make_dataset_validates_the_raw_file(patched_stand_in, tmp_path):
    table = rows(demo_cfg(patched_stand_in, tmp_path / "fresh"))
    assert table["dataset"].status == "ok"
    assert "40 valid records" in table["dataset"].detail
    bad = tmp_path / "bad.json"
    bad.write_text('[\n{"instruction": "a", "output": "b"},\n]\n')
    error = failure(demo_cfg(patched_stand_in, tmp_path / "fresh", data_path=str(bad)), stage="check")
    assert str(bad) in error.paragraph()
    assert "comma after the last record" in error.what


def test_missing_raw_file_fails_without_a_url_and_is_a_todo_with_one(patched_stand_in, tmp_path):
    missing = str(tmp_path / "nope.json")
    error = failure(demo_cfg(patched_stand_in, tmp_path / "fresh", data_path=missing), stage="check")
    assert "does not exist" in error.what
    assert error.where == "data.path"
    cfg = config.load(
        DEMO,
        [f"data.path={missing}", "data.url=https://example.invalid/d.json"],
        model_dir=str(patched_stand_in),
        output_dir=str(tmp_path / "fresh"),
    )
    assert rows(cfg)["dataset"].status == "todo"


def _drop_arrow_file(out: Path) -> None:
    next((out / "data" / "train").glob("*.arrow")).unlink()


def _cut_stats(out: Path) -> None:
    path = out / "data" / "stats.json"
    path.write_text(path.read_text()[:40])


def _drop_dataset_dict(out: Path) -> None:
    (out / "data" / "dataset_dict.json").unlink()


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (_drop_arrow_file, "is incomplete: "),
        (_cut_stats, "is incomplete or damaged (JSONDecodeError"),
        (_drop_dataset_dict, "dataset_dict.json is missing"),
    ],
)
def test_damaged_tokenized_dataset_fails(patched_stand_in, run_dir, damage, fragment):
    damage(run_dir)
    error = failure(demo_cfg(patched_stand_in, run_dir))
    assert fragment in error.what
    assert "`make dataset`" in error.fix


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("data.max_length=128", "data.max_length was 256 when tokenized, the config now says 128"),
        ("data.answer_tags=true", "data.answer_tags was False"),
        ("data.eval_ratio=0.1", "data.eval_ratio is 0.1 but the dataset has splits ['train']"),
    ],
)
def test_dataset_tokenized_under_other_settings_fails(patched_stand_in, run_dir, override, fragment):
    error = failure(demo_cfg(patched_stand_in, run_dir, override))
    assert fragment in error.what


def test_dataset_made_from_another_or_an_edited_file_fails(patched_stand_in, run_dir, tmp_path):
    """make dataset DATA=big.json, then make train without DATA; or the file edited after make dataset."""
    other = tmp_path / "big.json"
    other.write_bytes(SAMPLE.read_bytes())
    error = failure(demo_cfg(patched_stand_in, run_dir, data_path=str(other)))
    assert f"it was made from {SAMPLE.resolve()}, the config's data.path is {other.resolve()}" in error.what
    assert "rerun `make dataset`" in error.fix
    data.run(demo_cfg(patched_stand_in, run_dir, data_path=str(other)))
    assert rows(demo_cfg(patched_stand_in, run_dir, data_path=str(other)))["dataset"].status == "ok"
    other.write_text(other.read_text(encoding="utf-8").replace("甄嬛", "嬛嬛", 1), encoding="utf-8")
    error = failure(demo_cfg(patched_stand_in, run_dir, data_path=str(other)), stage="check")
    assert f"{other.resolve()} has changed since it was tokenized" in error.what


# ---------------------------------------------------------------------------------------------
# resume


def fake_checkpoint(out: Path, step: int, complete: bool = True, r: int = 8, batch: int = 4) -> Path:
    """A checkpoint folder with the files the Trainer writes (contents only where the checks read them)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"r": r, "lora_alpha": 32, "target_modules": config.LORA_PRESETS["tutorial"]})
    )
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (path / name).write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "train_batch_size": batch}))
    return path


def test_resume_auto_skips_an_incomplete_checkpoint_and_train_sets_it_aside(patched_stand_in, run_dir):
    from transformers.trainer_utils import get_last_checkpoint

    fake_checkpoint(run_dir, 2)
    fake_checkpoint(run_dir, 4, complete=False)
    cfg = demo_cfg(patched_stand_in, run_dir, "train.resume=auto")
    for stage in ("check", "train"):  # the preflight only reports, whichever stage runs it
        plan = preflight.preflight(cfg, stage=stage, echo=False)
        assert plan.resume.path == str(run_dir / "checkpoint-2")
        resume_row = {r.name: r for r in plan.rows}["resume"]
        assert resume_row.status == "warn"
        assert "checkpoint-4 is incomplete (trainer_state.json missing" in resume_row.detail
        assert (run_dir / "checkpoint-4").is_dir()

    assert train.prepare_output(cfg, plan.resume) == str(run_dir / "checkpoint-2")  # train.run acts on it
    assert not (run_dir / "checkpoint-4").exists()
    assert (run_dir / "incomplete-checkpoint-4").is_dir()
    assert get_last_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-2")  # what the Trainer would pick now


def test_trainer_state_cut_short_is_incomplete(run_dir):
    ckpt = fake_checkpoint(run_dir, 6)
    (ckpt / "trainer_state.json").write_text('{"global_step": 6, "log_hi')
    assert checkpoints.checkpoint_problem(ckpt) == "trainer_state.json is cut short or not valid"


@pytest.mark.parametrize(
    ("override", "kwargs", "fragment"),
    [
        ("lora.r=16", {}, "r=8 (config: 16)"),
        ("lora.alpha=16", {}, "alpha=32 (config: 16)"),
        ("train.per_device_train_batch_size=2", {}, "per_device_train_batch_size=4 (config: 2)"),
        ("train.resume=CKPT", {"complete": False}, "is incomplete (trainer_state.json missing)"),
        ("train.resume=/nonexistent/checkpoint-3", {}, "does not exist"),
    ],
)
def test_resume_from_an_unusable_checkpoint_fails(patched_stand_in, run_dir, override, kwargs, fragment):
    ckpt = fake_checkpoint(run_dir, 2, **kwargs)
    error = failure(demo_cfg(patched_stand_in, run_dir, override.replace("CKPT", str(ckpt))))
    assert error.where == "train.resume"
    assert fragment in error.what


# ---------------------------------------------------------------------------------------------
# output folder and disk


def test_an_eval_ratio_that_leaves_nothing_to_train_on_fails_before_make_dataset(patched_stand_in, tmp_path):
    two = tmp_path / "two.json"
    two.write_text(
        json.dumps(
            [
                {"instruction": "你好", "input": "", "output": "臣妾在"},
                {"instruction": "你是谁", "input": "", "output": "甄嬛"},
            ],
            ensure_ascii=False,
        )
    )
    half = demo_cfg(patched_stand_in, tmp_path / "a", "data.eval_ratio=0.5", data_path=str(two))
    assert rows(half)["dataset"].status == "ok"
    most = demo_cfg(patched_stand_in, tmp_path / "b", "data.eval_ratio=0.9", data_path=str(two))
    error = failure(most, stage="check")
    assert error.where == "data.eval_ratio"
    assert "holds out 2 of 2 record(s)" in error.what


def test_output_under_a_file_fails(patched_stand_in, tmp_path):
    (tmp_path / "afile").write_text("")
    error = failure(demo_cfg(patched_stand_in, tmp_path / "afile" / "out"), stage="check")
    assert "is a file" in error.what
    assert error.where == "run.output_dir"


def test_too_little_disk_fails_with_the_estimate(patched_stand_in, run_dir, monkeypatch):
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000))
    error = failure(demo_cfg(patched_stand_in, run_dir))
    assert "1.0 kB free" in error.what
    assert "5 checkpoint(s)" in error.what
    assert "save_total_limit" in error.fix


def test_checkpoint_estimate():
    params = estimate.ParamCount(total=10**9, lora=10**6, per_target={})
    per = estimate.checkpoint_bytes(params, tokenizer_bytes=0)
    assert per == 10**6 * 4 + 10**6 * 12  # adapter fp32 + (fp32 weights, Adam m, v)
    cfg = config.load(DEMO, ["train.save_steps=10", "train.max_steps=95"])
    assert estimate.disk_needed(cfg, per, 4 * 10**6, estimate.expected_steps(cfg, None)) == (10 * per + 4 * 10**6, 10)
    cfg = config.load(DEMO, ["train.save_steps=10", "train.max_steps=95", "train.save_total_limit=2"])
    assert estimate.disk_needed(cfg, per, 0, 95)[1] == 3  # the limit, + 1 while the next is written
    # the tutorial's published run: 3,729 records, batch 4 x accumulation 4, 1 epoch -> 233 steps
    assert estimate.expected_steps(config.load(HUANHUAN_CONFIG), 3729) == 233


# ---------------------------------------------------------------------------------------------
# memory


def fake_gpus(monkeypatch, gpus: list[tuple[str, int, int]], bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(preflight, "gpu_memory", lambda: gpus)


# ---------------------------------------------------------------------------------------------
# the NVIDIA driver against the CUDA torch is built for (the GPU is faked: CI has none)


def fake_driver(monkeypatch, version: str, cuda: tuple[int, int], *, gpu: bool) -> None:
    monkeypatch.setattr(preflight, "nvidia_driver", lambda: runtime.Driver(version, cuda))
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # the pinned torch 2.11.0's build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)  # what torch says under an old driver


def test_a_driver_older_than_torchs_cuda_fails_naming_the_driver_to_install(patched_stand_in, tokenized, monkeypatch):
    fake_driver(monkeypatch, "570.86.15", (12, 8), gpu=False)
    error = failure(demo_cfg(patched_stand_in, tokenized))
    assert "the NVIDIA driver 570.86.15 runs CUDA up to 12.8" in error.what
    assert "built for CUDA 13.0" in error.what
    assert "install an NVIDIA driver >= 580.65.06" in error.paragraph()


@pytest.mark.parametrize(
    ("version", "cuda", "gpu", "detail"),
    [
        ("580.95.05", (13, 0), False, "580.95.05 runs CUDA 13.0; torch"),
        ("535.230.02", (12, 2), True, "through CUDA forward compatibility"),  # datacenter compat libraries
    ],
)
def test_a_driver_that_runs_torchs_cuda_passes(patched_stand_in, tokenized, monkeypatch, version, cuda, gpu, detail):
    fake_driver(monkeypatch, version, cuda, gpu=gpu)
    row = rows(demo_cfg(patched_stand_in, tokenized))["driver"]
    assert row.status == "ok"
    assert detail in row.detail


def test_the_driver_is_read_from_nvml():
    """The real NVML: None exactly on a machine whose kernel has no NVIDIA driver loaded."""
    proc = Path("/proc/driver/nvidia/version")
    driver = runtime.nvidia_driver()
    if not proc.is_file():
        assert driver is None
    else:
        assert driver.version in proc.read_text()
        assert driver.cuda >= (12, 0)


def test_the_driver_needed_by_the_locked_torch_is_known():
    """The message names the driver the lock's torch needs: its CUDA (cuda-toolkit) is in MIN_DRIVER."""
    lock = (REPO / "requirements.lock").read_text()
    toolkit = next(line.split("==")[1].split()[0] for line in lock.splitlines() if line.startswith("cuda-toolkit=="))
    assert ".".join(toolkit.split(".")[:2]) in runtime.MIN_DRIVER


def test_an_optimizer_this_environment_lacks_fails_naming_those_installed(patched_stand_in, run_dir):
    cfg = demo_cfg(patched_stand_in, run_dir, "train.optim=adamw_torch_4bit")  # torchao: not in the lock
    e = failure(cfg, stage="check")
    installed = preflight.installed_optimizers()
    assert "adamw_torch_4bit" not in installed
    assert {"adamw_torch", "adamw_torch_fused", "adafactor"} <= set(installed)
    assert e.where == "train.optim"
    assert e.what == (
        "train.optim 'adamw_torch_4bit' needs a package this environment does not install; the "
        f"optimizers installed: {', '.join(installed)}"
    )
    suggested = e.fix.split("(the nearest: ")[1].split(")")[0]
    assert suggested in installed
    assert "adamw_torch_fused" in e.fix
    assert rows(demo_cfg(patched_stand_in, run_dir, "train.optim=adafactor"))["optimizer"].status == "ok"


def test_cuda_requested_without_a_gpu_fails(patched_stand_in, run_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    error = failure(demo_cfg(patched_stand_in, run_dir, "model.device=cuda"))
    assert "no CUDA GPU is visible" in error.what
    assert error.where == "model.device"


def test_stand_in_on_a_fake_gpu_passes_with_the_estimate_printed(patched_stand_in, run_dir, monkeypatch, capsys):
    fake_gpus(monkeypatch, [("NVIDIA H200", H200, H200)])
    plan = preflight.preflight(demo_cfg(patched_stand_in, run_dir, "model.device=cuda", "model.device_map=auto"))
    assert (plan.placement.device, plan.placement.dtype) == ("cuda", torch.bfloat16)
    assert "1 GPU(s): NVIDIA H200 141.0 GB free" in capsys.readouterr().out


def test_gpu_without_bf16_fails(patched_stand_in, run_dir, monkeypatch):
    fake_gpus(monkeypatch, [("Tesla V100", H200, H200)], bf16=False)
    error = failure(demo_cfg(patched_stand_in, run_dir, "model.device=cuda"))
    assert "no bfloat16 support" in error.what


# ---------------------------------------------------------------------------------------------
# a real-size folder: real config.json, sparse shards with the real tensor headers


def write_sparse_shard(path: Path, tensors: dict[str, tuple[list[int], torch.dtype]]) -> None:
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    header, offset = {}, 0
    for key, (shape, dtype) in sorted(tensors.items()):
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": names[dtype], "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: the size of the real shard, no blocks on disk


@pytest.fixture(scope="module")
def real_size_folder(patched_stand_in, tmp_path_factory) -> Path:
    from hunyuan_lora.hunyuan.a13b import real_config
    from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
    from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

    folder = tmp_path_factory.mktemp("real") / "Hunyuan-A13B-Instruct"
    folder.mkdir()
    for name in (
        "configuration_hunyuan.py",
        "hunyuan.py",
        "modeling_hunyuan.py",
        "tokenization_hy.py",
        "tokenizer_config.json",
        "hy.tiktoken",
        "generation_config.json",
    ):
        shutil.copy2(patched_stand_in / name, folder / name)
    cfg = real_config()
    (folder / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**cfg))
    tensors = {
        k: (list(v.shape), torch.float32 if k.endswith("mlp.gate.wg.weight") else torch.bfloat16)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"
    }
    shard_of = {k: 1 + int(k.split(".")[2]) // 8 if k.startswith("model.layers.") else 1 for k in tensors}
    names = {n: f"model-{n:05d}-of-00004.safetensors" for n in range(1, 5)}
    for n, name in names.items():
        write_sparse_shard(folder / name, {k: v for k, v in tensors.items() if shard_of[k] == n})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: names[shard_of[k]] for k in tensors}})
    )
    return folder


@pytest.fixture
def roomy_disk(monkeypatch):
    """The real model's checkpoints need ~20 GB of disk; these tests are about memory, not the host's disk."""
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**13, 0, 10**13))


def real_cfg(folder: Path, out: Path, *overrides: str) -> config.Config:
    data_path = str(HUANHUAN_DATA) if HUANHUAN_DATA.is_file() else None
    return config.load(HUANHUAN_CONFIG, list(overrides), model_dir=str(folder), output_dir=str(out), data=data_path)


def test_real_size_folder_on_the_cpu_fails_on_memory_with_the_estimate(
    real_size_folder, roomy_disk, tmp_path, monkeypatch
):
    monkeypatch.setattr(preflight, "available_ram", lambda: 64 * 10**9)
    assert sum(p.stat().st_size for p in real_size_folder.glob("*.safetensors")) > 160e9  # apparent size
    error = failure(real_cfg(real_size_folder, tmp_path / "out", "model.device=cpu"), stage="check")
    assert "on the CPU, in float32, these settings need ~" in error.what
    assert "weights 321.6 GB" in error.what
    assert "train this model on GPUs" in error.fix


def test_real_size_memory_estimate_against_one_and_two_h200(
    real_size_folder, roomy_disk, tmp_path, monkeypatch, capsys
):
    cfg = real_cfg(real_size_folder, tmp_path / "out")
    fake_gpus(monkeypatch, [("NVIDIA H200", H200, H200)])
    error = failure(cfg, stage="check")
    assert "1 GPU(s) with 141.0 GB free, these settings need ~" in error.what
    assert "weights 160.8 GB" in error.what
    assert "make more GPUs visible" in error.fix

    fake_gpus(monkeypatch, [("NVIDIA H200", H200, H200)] * 2)
    plan = preflight.preflight(cfg, stage="check")
    table = capsys.readouterr().out
    assert f"{REAL_TOTAL:,} in the model" in table
    assert f"{REAL_LORA_TUTORIAL:,} trainable" in table
    assert 160.8e9 + 5.8e9 < plan.memory.total < 282e9
    # checkpoints: 364.6 M LoRA params x 16 B = 5.8 GB each (+ tokenizer files)
    assert plan.disk_bytes > 5.8e9


def test_no_gradient_checkpointing_raises_the_activation_estimate(real_size_folder):
    from hunyuan_lora.hunyuan.a13b import real_config

    params = estimate.count_parameters(real_config(), config.LORA_PRESETS["tutorial"], 8)
    with_gc = estimate.estimate_memory(real_config(), params, 2, 4 * 1024, True, 1)
    without = estimate.estimate_memory(real_config(), params, 2, 4 * 1024, False, 1)
    assert with_gc.activations == 4096 * 4096 * 32 * 2  # hidden x tokens x layers x bytes
    assert without.activations == 37 * with_gc.activations


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_gpus_are_read_and_compared(real_size_folder, roomy_disk, patched_stand_in, tokenized, tmp_path, capsys):
    gpus = preflight.gpu_memory()
    assert gpus
    assert all(0 < free <= total for _, free, total in gpus)
    plan = preflight.preflight(demo_cfg(patched_stand_in, tokenized, "model.device=cuda"), stage="check")
    assert plan.placement.device == "cuda"
    assert "GPU(s):" in capsys.readouterr().out
    # the real 80 B model: fits on 2+ H200s, not on one; either way the estimate is printed
    if len(gpus) == 1:
        with pytest.raises(UserError) as e:
            preflight.preflight(real_cfg(real_size_folder, tmp_path / "out"), stage="check")
        assert "GPU(s) with" in e.value.what
        assert "these settings need ~" in e.value.what
    else:
        plan = preflight.preflight(real_cfg(real_size_folder, tmp_path / "out"), stage="check")
        assert plan.memory.total <= sum(free for _, free, _ in gpus)


# ---------------------------------------------------------------------------------------------
# all at once, the scripts, and train


def test_all_failures_are_reported_together(stand_in_dir, tmp_path):
    error = failure(demo_cfg(stand_in_dir, tmp_path / "fresh", "lora.preset=custom", "lora.target_modules=[qproj]"))
    assert error.what.startswith("3 preflight checks failed: (1) patch:")
    for fragment in (
        "Fix: run `make patch`",
        "(2) parameters:",
        "'qproj' matches no module",
        "(3) dataset:",
        "no tokenized dataset",
    ):
        assert fragment in error.what


def script(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "check.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_make_check_script_exit_codes_and_table(patched_stand_in, stand_in_dir, tokenized, tmp_path):
    ok = script("--config", str(DEMO), "--model-dir", str(patched_stand_in), "--output-dir", str(tokenized))
    assert ok.returncode == 0, ok.stderr
    assert "preflight passed" in ok.stdout
    assert "  memory        ok" in ok.stdout

    typo = script("--config", str(DEMO), "--set", "train.learnig_rate=1e-4")
    assert typo.returncode == 2
    assert "Traceback" not in typo.stderr
    assert "did you mean 'learning_rate'" in " ".join(typo.stderr.split())  # wrapped at 100 columns

    bad = script("--config", str(DEMO), "--model-dir", str(stand_in_dir), "--output-dir", str(tmp_path / "new"))
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.startswith("error: ")
    assert "`make patch`" in " ".join(bad.stderr.split())
    assert "  patch         FAIL" in bad.stdout  # the table comes first, on stdout


@pytest.mark.parametrize(
    ("fault", "overrides", "fragment"),
    [
        ("shard cut short", [], "is incomplete or corrupt"),
        (
            "LoRA target typo",
            ["lora.preset=custom", "lora.target_modules=[q_proj, vproj]"],
            "'vproj' matches no module",
        ),
        ("unpatched", [], "`make patch`"),
    ],
)
def test_train_runs_the_preflight_before_loading_any_weights(
    patched_copy, stand_in_dir, tokenized, monkeypatch, fault, overrides, fragment
):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the preflight failed")

    if fault == "shard cut short":
        _truncate(patched_copy / "model-00002-of-00002.safetensors")
    model = stand_in_dir if fault == "unpatched" else patched_copy
    monkeypatch.setattr(train, "load_base_model", no_weights)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_weights)
    with pytest.raises(UserError) as info:
        train.run(demo_cfg(model, tokenized, *overrides))
    assert fragment in info.value.paragraph()
