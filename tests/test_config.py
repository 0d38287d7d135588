"""The run config: defaults reproduce the tutorial, typos and wrong types fail with the nearest name."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hunyuan_lora import config
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = config.load(path)
    assert cfg.source == str(path)


def test_huanhuan_config_reproduces_the_tutorial():
    cfg = config.load(REPO / "configs/huanhuan.yaml")
    assert cfg.data.system_prompt == "现在你要扮演皇帝身边的女人--甄嬛"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32, 0.1)
    assert cfg.lora.targets() == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    t = cfg.train
    assert (t.per_device_train_batch_size, t.gradient_accumulation_steps, t.num_train_epochs) == (4, 4, 1)
    assert (t.learning_rate, t.logging_steps, t.save_steps) == (1e-4, 10, 100)
    assert t.gradient_checkpointing
    assert t.bf16
    assert cfg.data.max_length == 1024
    assert cfg.swanlab.project == "Hunyuan-A13B-Instruct-Lora"
    assert cfg.data.sha256 == "1a0172c731eee506fb58f888f5efd953f7bb183f416affecbe3f93dbb9596a34"
    assert "84c3486aeee22cd6585c21771924cd538a081295" in cfg.data.url


def test_large_batch_config_is_the_qlora_config_at_64_per_step():
    """configs/qlora_large_batch.yaml changes only the batch, the learning rate (x sqrt 4), warm-up and names."""
    small = config.load(REPO / "configs/huanhuan_qlora.yaml")
    large = config.load(REPO / "configs/qlora_large_batch.yaml")
    assert (large.train.per_device_train_batch_size, large.train.gradient_accumulation_steps) == (64, 1)
    assert large.train.learning_rate == 2 * small.train.learning_rate
    assert (small.train.warmup_ratio, large.train.warmup_ratio) == (0.0, 0.05)
    for section in ("model", "data", "lora", "infer", "eval"):
        assert getattr(large, section) == getattr(small, section), section
    assert large.output_dir.name == large.run.name == "qlora_large_batch"


def test_unknown_key_names_the_nearest_valid_one(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rat: 1e-4\nlora:\n  rank: 8\nswanlb:\n  mode: local\n")
    with pytest.raises(UserError) as e:
        config.load(bad)
    message = str(e.value)
    assert "'train.learning_rat'" in message
    assert "did you mean 'learning_rate'" in message
    assert "'lora.rank'" in message
    assert "'swanlb'" in message
    assert "did you mean 'swanlab'" in message


def test_wrong_types_and_values_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  per_device_train_batch_size: four\nswanlab:\n  mode: offline\n")
    with pytest.raises(UserError, match=r"per_device_train_batch_size' is 'four', expected int.*mode' is 'offline'"):
        config.load(bad)


def test_gate_is_never_a_lora_target():
    with pytest.raises(UserError, match="matches the router"):
        config.load(overrides=["lora.preset=custom", "lora.target_modules=[q_proj, gate]"])


def test_overrides_and_path_arguments_take_precedence(tmp_path):
    cfg = config.load(
        REPO / "configs/huanhuan.yaml",
        overrides=["train.learning_rate=2e-4", "lora.r=16"],
        model_dir="/root/autodl-tmp/m",
        data="my.jsonl",
        output_dir="out/x",
    )
    assert cfg.train.learning_rate == 2e-4
    assert cfg.lora.r == 16
    assert (cfg.model.dir, cfg.data.path, cfg.run.output_dir) == ("/root/autodl-tmp/m", "my.jsonl", "out/x")
    assert cfg.data.url is None
    assert cfg.data.sha256 is None


def test_malformed_yaml_says_where(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1,\n")
    with pytest.raises(UserError, match=r"bad.yaml:\d+: not valid YAML"):
        config.load(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(REPO / "configs/demo.yaml")
    again = config.load(cfg.dump(tmp_path / "resolved.yaml"))
    assert again.to_dict() == cfg.to_dict()


# ---------------------------------------------------------------------------------------------
# train: TrainingArguments by their own names


def test_train_takes_any_trainingarguments_field_and_it_reaches_the_trainer():
    from hunyuan_lora import runtime, training

    cfg = config.load(
        REPO / "configs/demo.yaml",
        ["train.weight_decay=0.05", "train.lr_scheduler_type=cosine", "train.adam_beta2=0.95"],
    )
    args = training.training_arguments(cfg, runtime.placement(cfg))
    assert (args.weight_decay, args.lr_scheduler_type.value, args.adam_beta2) == (0.05, "cosine", 0.95)
    assert cfg.to_dict()["train"]["weight_decay"] == 0.05  # resolved.yaml: one flat train: section
    assert (
        config.load(
            REPO / "configs/demo.yaml", [f"train.{k}={v}" for k, v in cfg.to_dict()["train"].items() if v is not None]
        ).train.args
        == cfg.train.args
    )


def test_training_on_a_gpu_copies_batches_without_blocking_and_leaves_nan_checks_to_the_divergence_watch():
    """On CUDA the batches go over from pinned memory without blocking (a user's other accelerator_config keys
    kept); the Trainer's NaN filter, which waits for the GPU every micro-step, is off everywhere and is not a
    setting: a non-finite loss stops the run before it is logged (training.DivergenceWatch)."""
    import dataclasses

    from hunyuan_lora import runtime, training

    cfg = config.load(REPO / "configs/demo.yaml", ['train.accelerator_config={"even_batches": false}'])
    cpu = runtime.placement(cfg)
    gpu = dataclasses.replace(cpu, device="cuda")
    on_gpu, on_cpu = training.training_arguments(cfg, gpu), training.training_arguments(cfg, cpu)
    assert (on_gpu.accelerator_config.non_blocking, on_gpu.accelerator_config.even_batches) == (True, False)
    assert (on_cpu.accelerator_config.non_blocking, on_cpu.accelerator_config.even_batches) == (False, False)
    assert not on_gpu.logging_nan_inf_filter
    assert not on_cpu.logging_nan_inf_filter
    with pytest.raises(UserError, match="logging_nan_inf_filter.*DivergenceWatch"):
        config.load(REPO / "configs/demo.yaml", ["train.logging_nan_inf_filter=true"])


def test_yaml_float_spelling_is_the_float_the_user_meant(tmp_path):
    path = tmp_path / "lr.yaml"
    path.write_text("train:\n  learning_rate: 2e-4\n  warmup_ratio: 1e-1\n")  # strings to YAML 1.1
    cfg = config.load(path)
    assert (cfg.train.learning_rate, cfg.train.warmup_ratio) == (2e-4, 0.1)


def test_settings_the_project_derives_are_refused_by_name():
    with pytest.raises(UserError, match=r"'train.output_dir' is set by the project from run.output_dir"):
        config.load(overrides=["train.output_dir=/tmp/x"])


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("lora.dropout=2", "lora.dropout is 2.0: it must be in [0, 1)"),
        ("lora.alpha=-5", "lora.alpha is -5: it must be positive"),
        ("train.learning_rate=-1", "train.learning_rate is -1.0: it must be positive"),
        ("train.warmup_ratio=5", "train.warmup_ratio is 5.0: it must be in [0, 1]"),
        ("train.lr_scheduler_type=foo", "'train.lr_scheduler_type' is 'foo', not one of TrainingArguments' choices"),
        ("train.dataloader_num_workers=-1", "train.dataloader_num_workers is -1"),
        ("train.save_total_limit=0", "train.save_total_limit is 0: at least 1"),
        ("infer.max_new_tokens=0", "infer.max_new_tokens is 0: at least 1"),
        ("eval.batch_size=0", "eval.batch_size is 0: at least 1"),
        ("serve.max_queue=0", "serve.max_queue is 0: at least 1"),
        ("serve.max_prompt_tokens=-3", "serve.max_prompt_tokens is -3: at least 1"),
        ("lora.target_modules=[q_proj, v_proj]", "lora.target_modules is set but lora.preset is 'tutorial'"),
        ("train.learning_rate=1e39", "train.learning_rate is 1e+39: more than a float32 holds"),
    ],
)
def test_out_of_range_values_fail_at_load_with_the_key(override, fragment):
    with pytest.raises(UserError) as e:
        config.load(REPO / "configs/huanhuan.yaml", [override])
    assert fragment in str(e.value)


def test_target_modules_with_the_custom_preset_are_what_trains():
    cfg = config.load(overrides=["lora.preset=custom", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.targets() == ["q_proj", "v_proj"]


def test_loading_builds_no_training_arguments(monkeypatch):
    """Whether train.optim is installed is the preflight's question (test_check.py): loading a config
    only checks the name against TrainingArguments' choices, without building one."""
    from transformers import TrainingArguments

    def refuse(self, *args, **kwargs):
        raise AssertionError("config.load built a TrainingArguments")

    monkeypatch.setattr(TrainingArguments, "__post_init__", refuse)
    assert config.load(overrides=["train.optim=adamw_torch_4bit"]).train.optim == "adamw_torch_4bit"
    with pytest.raises(
        UserError,
        match=r"'train.optim' is 'adamw_torch_4bt', not one of TrainingArguments' choices "
        r"\(did you mean 'adamw_torch_4bit'\?\)",
    ):
        config.load(overrides=["train.optim=adamw_torch_4bt"])


@pytest.mark.parametrize(
    "override",
    [
        "train.learning_rate=.inf",
        "train.learning_rate=-.inf",
        "train.learning_rate=.nan",
        "train.learning_rate=1e999",
        "train.learning_rate=inf",
        "train.max_grad_norm=.nan",
        "train.weight_decay=1e999",
        "lora.dropout=.nan",
        "model.download_size_gb=.inf",
    ],
)
def test_non_finite_numbers_are_refused_anywhere(override):
    """Not only .nan: inf, a float too large (1e999 reads as inf) and non-finite values inside a mapping."""
    with pytest.raises(UserError) as e:
        config.load(REPO / "configs/demo.yaml", [override])
    key = override.split("=")[0]
    assert f"'{key}' is " in str(e.value), str(e.value)
    assert "must be finite" in str(e.value), str(e.value)


def test_non_finite_numbers_in_the_yaml_file_are_refused(tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text(
        "train:\n  learning_rate: .inf\n  warmup_ratio: 1e999\n  lr_scheduler_kwargs: {min_lr: .nan}\n"
        "data:\n  eval_ratio: .nan\n"
    )
    with pytest.raises(UserError) as e:
        config.load(path)
    for key in ("train.learning_rate", "train.warmup_ratio", "train.lr_scheduler_kwargs", "data.eval_ratio"):
        assert f"'{key}' is " in str(e.value), str(e.value)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (
            ["train.num_train_epochs=0"],
            "train.num_train_epochs is 0.0 with train.max_steps -1: that is 0 training steps",
        ),
        (["train.num_train_epochs=-1"], "that is 0 training steps"),
        (["train.max_steps=0"], "train.max_steps is 0: at least 1"),
        (["train.max_steps=-5"], "train.max_steps is -5: at least 1"),
    ],
)
def test_zero_training_steps_are_refused(overrides, fragment):
    with pytest.raises(UserError) as e:
        config.load(REPO / "configs/demo.yaml", overrides)
    assert fragment in str(e.value), str(e.value)


def test_a_positive_max_steps_overrides_zero_epochs():
    cfg = config.load(REPO / "configs/demo.yaml", ["train.num_train_epochs=0", "train.max_steps=3"])
    assert cfg.train.max_steps == 3


@pytest.mark.parametrize("override", ["serve.port=70000", "serve.port=0", "serve.port=-1", "swanlab.port=65536"])
def test_ports_are_range_checked(override):
    with pytest.raises(UserError) as e:
        config.load(REPO / "configs/demo.yaml", [override])
    assert f"{override.split('=')[0]} is {override.split('=')[1]}: a TCP port is 1-65535" in str(e.value)


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("gbk", "not UTF-8 text (bytes"),
        ("binary", "not UTF-8 text (bytes"),
        ("folder", "is a folder, not a YAML file"),
        ("fifo", "is not a regular file"),
        ("device", "is not a regular file"),
        ("empty", "is empty (or only comments)"),
        ("comments", "is empty (or only comments)"),
        ("nested", "nested too deeply"),
    ],
)
def test_a_config_that_is_not_a_utf8_yaml_file_is_refused_in_words(tmp_path, kind, fragment):
    """GBK and binary gave a UnicodeDecodeError traceback; a folder, a FIFO and /dev/zero "does not
    exist" (a FIFO read would block, /dev/zero never end); an empty config meant every default."""
    path = tmp_path / f"{kind}.yaml"
    if kind == "gbk":
        path.write_bytes("run:\n  name: 甄嬛\n".encode("gbk"))
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "nested":
        path.write_text("a: " + "[" * 100_000)
    else:
        path.write_text("" if kind == "empty" else "# nothing yet\n\n")
    with pytest.raises(UserError) as e:
        config.load(path)
    assert fragment in str(e.value), str(e.value)
    assert str(path) in str(e.value), str(e.value)
    if kind == "gbk":
        assert f"{path}:2" in str(e.value)
        assert "iconv -f GB18030" in str(e.value)
