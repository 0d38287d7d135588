"""Real scale on CPU: the plumbing of ZeRO-3 (accelerate launch) and QLoRA (NF4) that a CPU can test.

What needs GPUs (a ZeRO-3 step over 2 processes, a 4-bit step) is bench/verify_multi_gpu.sh."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_helpers import stage_args
from test_check import (  # noqa: F401 (fixtures)
    H200,
    REAL_TOTAL,
    demo_cfg,
    failure,
    fake_gpus,
    real_cfg,
    real_size_folder,
    roomy_disk,
    run_dir,
    tokenized,
)

from hunyuan_lora import checkpoints, config, estimate, modeling, preflight, runtime, scale, train
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
ZERO3 = REPO / "configs" / "accelerate" / "zero3.yaml"
ZERO3_OFFLOAD = REPO / "configs" / "accelerate" / "zero3_offload.yaml"
QLORA = REPO / "configs" / "huanhuan_qlora.yaml"
# What `accelerate launch` (accelerate 1.6.0) puts in each process's environment for zero3.yaml, one
# machine, 4 processes (prepare_deepspeed_cmd_env + torchrun); see test_accelerate_launch_environment.
ZERO3_ENV = {
    "ACCELERATE_USE_DEEPSPEED": "true",
    "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
    "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true",
    "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "none",
    "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "none",
    "WORLD_SIZE": "4",
}
ROUTER_FREE_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make(*args: str) -> list[str]:
    # --no-print-directory: under `make test` this make is a sub-make and would add "Entering directory" lines
    out = subprocess.run(
        ["make", "--no-print-directory", "-n", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# the launch: Makefile, accelerate configs, environment


def test_make_train_launch_zero3_is_accelerate_launch():
    lines = make("train", "LAUNCH=zero3", "NPROC=4", "CONFIG=configs/huanhuan.yaml")
    assert lines[-1].split() == [
        ".venv/bin/accelerate",
        "launch",
        "--config_file",
        "configs/accelerate/zero3.yaml",
        "--num_processes",
        "4",
        "$HL_ACCELERATE_ARGS",
        "scripts/train.py",
    ]
    # CONFIG travels as HL_CONFIG, ACCELERATE_ARGS as HL_ACCELERATE_ARGS (tests/test_user_values.py runs them)
    assert make("train")[-1].split()[:2] == [".venv/bin/python", "scripts/train.py"]  # no LAUNCH: one process
    check_line = make("check", "LAUNCH=zero3", "NPROC=4")[-1]
    assert check_line.startswith("HL_ACCELERATE_CONFIG=configs/accelerate/zero3.yaml HL_NPROC=4 .venv/bin/python")


@pytest.mark.parametrize(("path", "offload"), [(ZERO3, False), (ZERO3_OFFLOAD, True)], ids=["zero3", "zero3_offload"])
def test_accelerate_configs_parse_with_accelerates_loader_and_say_zero3(path, offload):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(path))
    assert str(c.distributed_type) == "DistributedType.DEEPSPEED"
    assert c.mixed_precision == "bf16"
    ds = c.deepspeed_config
    assert ds["zero_stage"] == 3
    assert ds["zero3_init_flag"] is True
    assert ds["offload_param_device"] == ("cpu" if offload else "none")
    assert ds["zero3_save_16bit_model"] is False  # no 160 GB gather per checkpoint
    assert ds["deepspeed_multinode_launcher"] == "standard"  # multi-node: the same command per machine
    planned = runtime.accelerate_config(str(path))
    assert planned.zero3
    assert planned.offload_param == offload


def test_accelerate_launch_environment_is_what_scale_reads():
    """The variable names runtime.launch() reads are the ones accelerate 1.6.0's launcher sets."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(ZERO3), "--num_processes", "4", "scripts/train.py"])
    args, defaults, _ = _validate_launch_command(args)
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
    _, env = prepare_deepspeed_cmd_env(args)
    expected = {k: v for k, v in ZERO3_ENV.items() if k != "WORLD_SIZE"}
    assert {k: env[k] for k in expected} == expected
    run = runtime.launch({**env, "WORLD_SIZE": "4"})  # WORLD_SIZE: torchrun's, per process
    assert run.zero3
    assert run.processes == 4
    assert not run.offload_param
    assert runtime.launch({}) == runtime.Launch(deepspeed=False, zero_stage=None, processes=1, offload_param=False)
    planned = runtime.launch({"HL_ACCELERATE_CONFIG": str(ZERO3), "HL_NPROC": "8"})  # `make check LAUNCH=zero3 NPROC=8`
    assert planned.zero3
    assert planned.processes == 8


def test_unsupported_combinations_are_refused():
    cfg = config.load(QLORA)
    with pytest.raises(UserError, match="nf4 under DeepSpeed"):
        runtime.check_combination(cfg, runtime.launch(ZERO3_ENV))
    with pytest.raises(UserError, match="stage 2"):
        runtime.check_combination(config.load(), runtime.launch({**ZERO3_ENV, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}))
    assert config.load(QLORA, ["model.moe_impl=fast"]).model.moe_impl == "fast"  # fast NF4 experts exist
    with pytest.raises(UserError, match="did you mean 'quantization'"):
        config.load(None, ["model.quantisation=nf4"])


# ---------------------------------------------------------------------------------------------
# ZeRO-3: leaf modules, no device_map, arguments before the model


def _load_stand_in(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, torch_dtype=torch.float32)


def test_moe_blocks_of_the_folders_remote_code_become_zero3_leaf_modules(patched_stand_in):
    from deepspeed.utils import z3_leaf_module

    model = _load_stand_in(patched_stand_in)
    (cls,) = scale.moe_classes(model)
    assert cls.__module__.startswith("transformers_modules.")  # the folder's class, not hunyuan_lora's
    assert scale.set_moe_leaf_modules(model) == model.config.num_hidden_layers
    leaves = {n for n, m in model.named_modules() if z3_leaf_module(m)}
    assert leaves == {f"model.layers.{i}.mlp" for i in range(model.config.num_hidden_layers)}
    assert all(m._z3_leaf for n, m in model.named_modules() if n in leaves)


def test_project_fast_class_is_found_too_and_a_model_without_moe_is_refused():
    from hunyuan_lora.hunyuan.configuration_hunyuan import HunYuanConfig
    from hunyuan_lora.hunyuan.hunyuan import HunYuanMoEV1ForCausalLM
    from hunyuan_lora.hunyuan.modeling_hunyuan import HunYuanMoE
    from hunyuan_lora.stand_in import stand_in_config

    with torch.device("meta"):
        model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**stand_in_config()))
    assert scale.moe_classes(model) == [HunYuanMoE]
    assert scale.set_moe_leaf_modules(model) > 0
    with pytest.raises(UserError, match="no HunYuanMoE module"):
        scale.set_moe_leaf_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _capture_from_pretrained(monkeypatch, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    seen: dict = {}
    real = _load_stand_in(folder)

    def fake(*args, **kwargs):
        seen.update(kwargs)
        return real

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)  # no CUDA here
    return seen


def test_device_map_only_outside_deepspeed(patched_stand_in, tmp_path, monkeypatch):
    cfg = demo_cfg(patched_stand_in, tmp_path, "model.device_map=auto", "model.device=cuda")
    seen = _capture_from_pretrained(monkeypatch, patched_stand_in)
    where = runtime.placement(cfg)
    assert (where.device, where.dtype, where.device_map) == ("cuda", torch.bfloat16, "auto")
    modeling.load_base_model(cfg, where)
    assert seen["device_map"] == "auto"  # the tutorial's single-process option is kept

    seen.clear()
    for k, v in ZERO3_ENV.items():
        monkeypatch.setenv(k, v)
    model = modeling.load_base_model(cfg, runtime.placement(cfg)).model
    assert "device_map" not in seen
    assert "quantization_config" not in seen
    assert all(getattr(m, "_z3_leaf", False) for m in model.modules() if type(m).__name__ == "HunYuanMoE")


def test_training_arguments_are_built_before_the_model_loads(patched_stand_in, run_dir, monkeypatch):
    """Under ZeRO-3, TrainingArguments registers the DeepSpeed config that makes from_pretrained use
    zero.Init; built after the model, every process would first load all 160 GB."""
    import transformers

    order: list[str] = []
    real_args = transformers.TrainingArguments

    def recording_args(*a, **k):
        order.append("TrainingArguments")
        return real_args(*a, **k)

    def stop(*a, **k):
        order.append("load_base_model")
        raise KeyboardInterrupt  # nothing to train: the order is the test

    monkeypatch.setattr(transformers, "TrainingArguments", recording_args)
    monkeypatch.setattr(train, "load_base_model", stop)
    with pytest.raises(KeyboardInterrupt):
        train.run(demo_cfg(patched_stand_in, run_dir, "train.resume=never"))
    assert order == ["TrainingArguments", "load_base_model"]


@pytest.mark.slow
def test_zero3_one_process_on_cpu_shards_the_stand_in_and_trains(patched_stand_in, run_dir, tmp_path):
    """The real path, one process, DeepSpeed's CPU accelerator: TrainingArguments -> zero.Init load
    (parameters partitioned: ds_id, empty local tensors) -> leaf modules -> Trainer with the DeepSpeed
    engine -> the adapter gathered and saved whole. (First run JIT-compiles DeepSpeed's CPU comm op, ~70 s.)"""
    env = {
        **os.environ,
        **ZERO3_ENV,
        "WORLD_SIZE": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
        "ACCELERATE_MIXED_PRECISION": "no",
        "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "false",
    }

    def train_(*overrides: str) -> str:
        sets = ["swanlab.mode=disabled", "train.save_steps=2", *overrides]
        proc = subprocess.run(
            [
                sys.executable,
                "scripts/train.py",
                *stage_args("configs/demo.yaml", patched_stand_in, run_dir, sets=sets),
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert "process 1 of 1" in train_("train.resume=never", "train.max_steps=3")
    ckpt = run_dir / "checkpoint-2"
    assert (ckpt / "latest").is_file()
    assert checkpoints.checkpoint_problem(ckpt) is None
    from safetensors.torch import load_file

    adapter = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter
    assert all(t.numel() > 0 for t in adapter.values())
    assert any(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained
    # resume: auto continues from the DeepSpeed checkpoint (the Trainer loads global_step3/)
    out = train_("train.max_steps=5")
    assert "continues from" in out
    assert "checkpoint-3 (step 3)" in out
    assert "over 5 steps" in out


# ---------------------------------------------------------------------------------------------
# QLoRA


def test_bnb_config_from_the_qlora_preset():
    cfg = config.load(QLORA)
    assert cfg.model.quantization == "nf4"
    assert config.load().model.quantization == "none"
    assert scale.bnb_config(config.load()) is None
    q = scale.bnb_config(cfg)
    assert q.load_in_4bit
    assert q.bnb_4bit_quant_type == "nf4"
    assert q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.llm_int8_skip_modules == ["wg", "lm_head"]


def test_skip_list_keeps_every_router_and_the_lm_head_out_of_nf4(patched_stand_in):
    """transformers' own replacement (what from_pretrained runs) on the stand-in, built empty."""
    import bitsandbytes as bnb
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    model_config = AutoConfig.from_pretrained(str(patched_stand_in), trust_remote_code=True)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=True)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    q = scale.bnb_config(config.load(QLORA))
    model = replace_with_bnb_linear(model, modules_to_not_convert=q.llm_int8_skip_modules, quantization_config=q)
    kept = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)
    }
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    routers = {f"model.layers.{i}.mlp.gate.wg" for i in range(model_config.num_hidden_layers)}
    assert kept == routers | {"lm_head"}
    assert quantized == set(linears) - kept
    assert all(n.endswith(ROUTER_FREE_LINEARS) for n in quantized)
    assert {n for n in linears if scale.skipped_by_quantization(n)} == kept  # check.py's count uses the same rule


def test_preflight_refuses_nf4_without_cuda(patched_stand_in, run_dir):
    error = failure(demo_cfg(patched_stand_in, run_dir, "model.quantization=nf4"))
    assert "nf4 (QLoRA) but there is no CUDA GPU" in error.what
    assert error.where == "model.quantization"


@pytest.mark.parametrize("nproc", ["0", "2"])
def test_make_check_launch_zero3_without_gpus_says_it_needs_gpus(patched_stand_in, run_dir, monkeypatch, nproc):
    """`make check LAUNCH=zero3` on a machine without GPUs (NPROC counts nvidia-smi's GPUs: 0), or NPROC=2."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("HL_ACCELERATE_CONFIG", str(ZERO3))
    monkeypatch.setenv("HL_NPROC", nproc)
    error = failure(demo_cfg(patched_stand_in, run_dir, "model.device=auto"), stage="check")
    assert f"ZeRO-3 over {nproc} processes (LAUNCH, NPROC) needs CUDA GPUs" in error.what
    assert "no CUDA GPU visible" in error.what
    assert error.where == "LAUNCH"
    assert "without GPUs" in error.fix


# ---------------------------------------------------------------------------------------------
# memory estimates at the real size


def test_real_size_estimates_zero3_divides_by_processes_and_nf4_is_half_a_byte():
    from hunyuan_lora.hunyuan.a13b import real_config

    params = estimate.count_parameters(real_config(), config.LORA_PRESETS["tutorial"], 8)
    routers, embedding, norms = 32 * 4096 * 64, 128167 * 4096, 32 * (2 * 4096 + 2 * 128) + 4096
    assert params.quantizable == REAL_TOTAL - routers - embedding - norms  # every Linear but wg and lm_head
    assert params.moe_block == 65 * 3 * 4096 * 3072 + 4096 * 64  # 64 routed + shared expert + router
    one = estimate.estimate_memory(real_config(), params, 2, 4 * 512, True, 1)
    four = estimate.estimate_memory(real_config(), params, 2, 4 * 512, True, 1, zero3_processes=4)
    assert four.weights == pytest.approx(one.weights / 4, abs=1)
    assert four.per_gpu_of == 4
    assert four.lora_and_optimizer == pytest.approx(one.lora_and_optimizer / 4, abs=1)
    assert four.activations == one.activations
    assert four.gathered == 2 * params.moe_block * 2
    offload = estimate.estimate_memory(
        real_config(), params, 2, 4 * 512, True, 1, zero3_processes=4, offload_param=True
    )
    assert offload.weights == 0
    nf4 = estimate.estimate_memory(real_config(), params, 2, 4 * 512, True, 1, nf4=True)
    assert 41.0e9 < nf4.weights < 44.0e9  # ~0.516 B x 79.86 B quantised + 0.53 B x 4 B (fp32 after prepare)
    assert "per GPU, ZeRO-3 over 4 processes" in four.describe()


def test_make_check_zero3_fits_where_one_process_does_not(real_size_folder, roomy_disk, tmp_path, monkeypatch, capsys):
    cfg = real_cfg(real_size_folder, tmp_path / "out")
    fake_gpus(monkeypatch, [("NVIDIA H200", H200, H200)] * 2)
    monkeypatch.setenv("HL_ACCELERATE_CONFIG", str(ZERO3))
    monkeypatch.setenv("HL_NPROC", "2")
    plan = preflight.preflight(cfg, stage="check")
    out = capsys.readouterr().out
    assert "DeepSpeed ZeRO-3 over 2 processes" in out
    assert "per GPU, ZeRO-3 over 2 processes" in out
    assert 80.3e9 < plan.memory.weights < 80.5e9
    assert plan.memory.total < H200

    monkeypatch.setenv("HL_NPROC", "1")  # ZeRO-3 on one GPU: the whole 160 GB on it
    assert "1 GPU(s) with 141.0 GB free" in failure(cfg, stage="check").what


def test_make_check_qlora_fits_one_80gb_gpu(real_size_folder, roomy_disk, tmp_path, monkeypatch, capsys):
    cfg = config.load(
        QLORA,
        model_dir=str(real_size_folder),
        output_dir=str(tmp_path / "out"),
        data=str(REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"),
    )
    fake_gpus(monkeypatch, [("NVIDIA A100-SXM4-80GB", 80 * 10**9, 80 * 10**9)])
    plan = preflight.preflight(cfg, stage="check")
    assert "base weights NF4" in capsys.readouterr().out
    assert plan.memory.total < 80e9
    assert 41e9 < plan.memory.weights < 44e9


def test_deepspeed_checkpoint_layout_counts_as_complete(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    (ckpt / "global_step2").mkdir(parents=True)
    (ckpt / "latest").write_text("global_step2")
    (ckpt / "adapter_config.json").write_text("{}")
    assert "trainer_state.json missing" in checkpoints.checkpoint_problem(ckpt)
    (ckpt / "trainer_state.json").write_text('{"global_step": 2}')
    assert checkpoints.checkpoint_problem(ckpt) is None
    (ckpt / "global_step2").rmdir()
    assert "global_step2/ missing" in checkpoints.checkpoint_problem(ckpt)


# ---------------------------------------------------------------------------------------------
# the GPU verification scripts (run in a later session): they parse, their Python runs


def test_gpu_verification_scripts_parse_and_summarize(tmp_path):
    for script in ("bench/verify_multi_gpu.sh", "bench/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=REPO, check=True)

    def summarize(case: str, samples_per_s: float, mem_rows: str) -> str:
        run = tmp_path / case
        (run / "data").mkdir(parents=True)
        (run / "log_history.json").write_text(
            '[{"loss": 9.5, "step": 1}, {"loss": 8.25, "step": 2}, {"train_runtime": 4}]'
        )
        (run / "manifest.json").write_text(
            f'{{"global_step": 2, "train_runtime_s": 4.0, "train_samples_per_second": '
            f'{samples_per_s}, "quantization": "none", "deepspeed_zero_stage": 3, '
            '"gpus": ["H200", "H200"]}'
        )
        (run / "resolved.yaml").write_text(
            "train:\n  per_device_train_batch_size: 4\n  gradient_accumulation_steps: 1\n"
        )
        (run / "data" / "stats.json").write_text('{"tokens": {"mean": 95.0}}')
        mem = tmp_path / f"{case}.csv"
        mem.write_text(mem_rows)
        return subprocess.run(
            [
                sys.executable,
                "bench/verify_scale.py",
                "summarize",
                "--case",
                case,
                "--run-dir",
                str(run),
                "--mem-log",
                str(mem),
                "--processes",
                "2",
                "--out-dir",
                str(tmp_path),
                "--tag",
                "t",
                "--gemm-tflops",
                "800",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    out = summarize("zero3-2gpu-d2", 2.0, "0, 20000\n1, 21000\n0, 30500\n")
    assert '"tokens_per_s_est": 190.0' in out
    assert '"samples_per_step": 8' in out
    assert '"losses": [9.5, 8.25]' in out
    md = (tmp_path / "t.md").read_text()
    assert "| zero3-2gpu-d2 | ok | 2 | 2 | 9.500 → 8.250 | 2.0 | 190.0 | 0: 30500, 1: 21000 |" in md
    assert "Extrapolated" not in md  # one depth: nothing to extrapolate from
    # a second depth: step 8/2.0 = 4 s -> 8/1.6 = 5 s, peak 30500 -> 40740 MiB: per layer 500 ms and 5 GiB;
    # @32 layers: 4 + 30 x 0.5 = 19 s (8/19 = 0.42 samples/s, x 95 tokens / 2 GPUs = 20.0), 30500 + 30 x 5120 MiB;
    # MFU 20 tokens/s x 6 x 12.74e9 active parameters / 800e12 = 0.19 %
    summarize("zero3-2gpu-d4", 1.6, "0, 40740\n1, 40000\n")
    md = (tmp_path / "t.md").read_text()
    assert "| zero3-2gpu | 2 | 2/4 | 500 | 5.00 | 179.8 | 0.42 | 20.0 | 0.19 % |" in md, md
