"""The run config: one dataclass tree with the tutorial's defaults, loaded from YAML.

    cfg = load("configs/huanhuan.yaml", overrides=["train.learning_rate=2e-4"],
               model_dir="/root/autodl-tmp/Hunyuan-A13B-Instruct")

Order of precedence: dataclass defaults < YAML file < `--set section.key=value` < the path
overrides (MODEL_DIR / DATA / OUTPUT_DIR). Unknown keys and wrong types are rejected with the
nearest valid name, all problems at once, before anything heavy is loaded.

The train: section takes the project's keys (packing, pad_to_multiple_of, packed_row_tokens, resume,
cuda_graphs, expert_stash_gib) and any TrainingArguments field by its own name, checked against TrainingArguments'
dataclass (names, types, choices); training.training_arguments hands them to it as given. TRAINING_DEFAULTS holds
the tutorial's values.
"""

from __future__ import annotations

import contextlib
import difflib
import enum
import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError

# The tutorial's target list; "gate" must never be a target (it suffix-matches the router `mlp.gate`).
LORA_PRESETS: dict[str, list[str]] = {
    "tutorial": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "attention_shared": [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "shared_mlp.gate_proj",
        "shared_mlp.up_proj",
        "shared_mlp.down_proj",
    ],
}

FLOAT32_MAX = 3.4028234663852886e38

TUTORIAL_SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"


@dataclass
class RunSection:
    name: str = "huanhuan"
    output_dir: str = "outputs/huanhuan"  # everything the run writes goes under here
    seed: int = 42


@dataclass
class ModelSection:
    model_id: str = "Tencent-Hunyuan/Hunyuan-A13B-Instruct"
    # A ModelScope branch or tag (modelscope 1.25.0 rejects commit ids); download.json records
    # the commit the downloaded files match.
    revision: str = "master"
    cache_dir: str = "models"  # snapshot_download(cache_dir=...) puts the model in <cache_dir>/<model_id>
    dir: str = "models/Tencent-Hunyuan/Hunyuan-A13B-Instruct"  # the folder every later stage loads
    download_size_gb: float = 170.0  # free space `download` requires before it starts
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device_map: str | None = "auto"  # the tutorial's single-process layer split over visible GPUs
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # upstream: the folder's own hunyuan.py (the tutorial, byte for byte); fast: the same checkpoint
    # in this project's implementation with grouped-GEMM experts (hunyuan_lora/hunyuan/fast_moe.py).
    moe_impl: Literal["upstream", "fast"] = "upstream"
    # nf4: QLoRA, base weights 4-bit through bitsandbytes (one process, CUDA only); the router `wg`
    # and the lm_head are not quantised (hunyuan_lora/scale.py QUANT_SKIP_MODULES). With moe_impl
    # fast the experts stay NF4 and are dequantised per projection, per pass, into scratch memory.
    quantization: Literal["none", "nf4"] = "none"
    # How the routed experts' NF4 products run (quantization nf4, moe_impl fast): "dequantize" writes all 64
    # experts of a projection in bf16 and multiplies; "triton" multiplies straight from the 4-bit codes
    # (hunyuan_lora/hunyuan/nf4_products.py); "auto" reads the codes for few tokens (decoding, where it is
    # 2-5x faster) and dequantises for many (training and prefill, where dequantising is 3.6x faster).
    nf4_products: Literal["dequantize", "triton", "auto"] = "dequantize"
    # Where the first NF4 load writes the quantised, packed model (~45 GB) that later loads read instead of
    # quantising the 160 GB again (hunyuan_lora/nf4.py): "auto" = <model.dir>.nf4-cache beside the model
    # folder (same disk), a folder, or "none". `make clean-cache` removes it.
    nf4_cache: str = "auto"


@dataclass
class DataSection:
    # JSON array or JSONL of alpaca records (instruction, input, output[, system, history]), OpenAI
    # `messages` or ShareGPT `conversations` (records.py); the format is detected per file.
    path: str = "data/huanhuan.json"
    # Where `make dataset` fetches `path` from when it is missing (pinned commit + sha256).
    url: str | None = (
        "https://raw.githubusercontent.com/datawhalechina/self-llm/"
        "84c3486aeee22cd6585c21771924cd538a081295/dataset/huanhuan.json"
    )
    sha256: str | None = "1a0172c731eee506fb58f888f5efd953f7bb183f416affecbe3f93dbb9596a34"
    system_prompt: str | None = TUTORIAL_SYSTEM_PROMPT
    max_length: int = 1024
    # Wrap targets as <answer>\n...\n</answer> (the model's native format).
    answer_tags: bool = False
    # What to do with a record whose prompt + answer exceed max_length.
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    eval_ratio: float = 0.0  # fraction of records held out: eval loss in train, `make eval` (0: none)
    # huanhuan.json repeats 112 records; the tutorial trained on all 3,729 (233 steps).
    drop_duplicates: bool = True
    # Which assistant turns of a conversation carry labels (the others are context only).
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"


@dataclass
class LoraSection:
    preset: Literal["tutorial", "attention", "attention_shared", "custom"] = "tutorial"
    target_modules: list[str] | None = None  # used when preset is "custom"
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1

    def targets(self) -> list[str]:
        return list(self.target_modules or []) if self.preset == "custom" else LORA_PRESETS[self.preset]


# The tutorial's TrainingArguments (the rest keep TrainingArguments' own defaults). The values the
# project reads before transformers is imported (preflight, estimates) are listed even where they
# equal TrainingArguments' default, so reading them never imports it.
TRAINING_DEFAULTS: dict[str, Any] = {
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 4,
    "num_train_epochs": 1.0,
    "max_steps": -1,
    "learning_rate": 1e-4,
    "lr_scheduler_type": "linear",
    "warmup_ratio": 0.0,
    "logging_steps": 10,
    "save_steps": 100,
    "save_total_limit": None,
    "gradient_checkpointing": True,
    # adamw_torch (foreach AdamW) is what the tutorial's Trainer used; adamw_torch_fused (one kernel set
    # for all LoRA tensors) measured up to 2x per layer at micro-batch 4 (bench/NOTES.md).
    "optim": "adamw_torch",
    "bf16": True,  # on a GPU; the CPU runs in float32 (runtime.placement)
    "dataloader_num_workers": 0,
}
# TrainingArguments the project derives from other settings (training.training_arguments): a
# train: key of that name is refused, naming the setting to change instead.
DERIVED_TRAINING_ARGS = {
    "output_dir": "run.output_dir",
    "seed": "run.seed",
    "data_seed": "run.seed",
    "use_cpu": "model.device",
    "report_to": "swanlab.mode (SwanLab is the project's own callback)",
    "resume_from_checkpoint": "train.resume",
    "gradient_checkpointing_kwargs": "the launcher (reentrant under ZeRO-3)",
    "label_names": "the dataset's labels column",
    "deepspeed": "LAUNCH=zero3 (configs/accelerate/)",
    "logging_nan_inf_filter": "nothing: a non-finite loss stops the run before it is logged (training.DivergenceWatch)",
}


@dataclass
class TrainSection:
    """train: the project's own keys below, and any TrainingArguments field by its own name
    (validated against TrainingArguments' dataclass), kept in `args` and read as attributes:
    cfg.train.learning_rate is TrainingArguments' learning_rate for this run."""

    # Concatenate each micro-batch into one row (position ids restart per sample, no cross-sample
    # attention, no padding): raise per_device_train_batch_size to fill thousands of tokens.
    # Needs model.moe_impl: fast (the project's attention; Tencent's is not known to mask per sample).
    packing: bool = False
    # Round each micro-batch's length up to a multiple of this (padding masked, labels -100; with
    # packing a padding block of its own). Bounds the number of distinct shapes: cuDNN attention
    # builds a graph per new sequence length (hundreds of ms each), and packed batches would
    # otherwise bring a new length almost every step. null: pad to the longest only (the tutorial).
    pad_to_multiple_of: int | None = None
    # With packing: rows of about this many tokens instead of one (as many as the micro-batch needs, at least
    # the longest sample each, filled level), all padded to the longest. Packed attention costs the square of
    # a row's length, masked or not, so long micro-batches pay for it. 0: one row.
    packed_row_tokens: int = 0
    resume: str = "auto"  # auto: continue from the last complete checkpoint in output_dir; never; or a path
    # Replay each micro-step's forward and backward from a CUDA graph, one per shape (step_graphs.py): the
    # launches of a host-bound step cost one. Needs one CUDA GPU and model.moe_impl: fast.
    cuda_graphs: bool = False
    # Under gradient checkpointing on the fast path, the forward keeps its frozen expert products' outputs
    # for the recompute (grouped_moe.RecomputeStash): one grouped product per expert projection and step
    # less (for NF4 also a dequantisation), for up to this much memory held at once. 0: recompute them all.
    # Off by default: the one eager A/B was slower with it (bench/NOTES.md); huanhuan_qlora.yaml sets it
    # with cuda_graphs, the combination measured.
    expert_stash_gib: float = 0.0
    args: dict[str, Any] = field(default_factory=lambda: dict(TRAINING_DEFAULTS), metadata={"internal": True})

    def __getattr__(self, name: str) -> Any:  # only reached for names that are not the fields above
        args = self.__dict__.get("args")
        if args is None or name.startswith("__"):
            raise AttributeError(name)
        if name in args:
            return args[name]
        defaults = training_argument_defaults()
        if name in defaults:
            return defaults[name]
        raise AttributeError(f"train.{name} is neither a project key nor a TrainingArguments field")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in TRAIN_PROJECT_KEYS or name == "args":
            object.__setattr__(self, name, value)
        else:
            self.args[name] = value

    def to_dict(self) -> dict[str, Any]:
        """As the YAML writes it: one flat section."""
        return {**{k: getattr(self, k) for k in TRAIN_PROJECT_KEYS}, **self.args}


TRAIN_PROJECT_KEYS = ("packing", "pad_to_multiple_of", "packed_row_tokens", "resume", "cuda_graphs", "expert_stash_gib")


@lru_cache(maxsize=1)
def training_argument_hints() -> dict[str, Any]:
    """TrainingArguments' own fields and their types (its dataclass is the schema for train:)."""
    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    return {f.name: hints[f.name] for f in fields(TrainingArguments) if f.init}


@lru_cache(maxsize=1)
def training_argument_defaults() -> dict[str, Any]:
    from transformers import TrainingArguments

    return {f.name: f.default for f in fields(TrainingArguments) if f.init and f.default is not MISSING}


@dataclass
class SwanLabSection:
    project: str = "Hunyuan-A13B-Instruct-Lora"
    experiment: str | None = None  # default: run.name
    # auto: cloud when SWANLAB_API_KEY is set, else local into <output_dir>/swanlog; never prompts.
    mode: Literal["auto", "cloud", "local", "disabled"] = "auto"
    host: str = "127.0.0.1"  # `make watch` binds here (0.0.0.0 in the container)
    port: int = 5092


@dataclass
class InferSection:
    prompts: list[str] = field(default_factory=lambda: ["你是谁？"])
    # Batch mode: a file in any dataset format (records.py); a record's answer, if any, is kept as reference.
    input_jsonl: str | None = None
    output_jsonl: str | None = None  # default: <output_dir>/infer/answers.jsonl
    thinking: bool = False
    max_new_tokens: int = 512
    do_sample: bool | None = None  # None: the model folder's generation_config.json decides
    batch_size: int = 64  # input_jsonl prompts generated together (sorted by length, left-padded)
    adapter: str | None = None  # default: <output_dir>/adapter (chat, eval and serve use it too)


@dataclass
class ChatSection:
    thinking: bool = False  # the mode a session starts in; /think and /no_think switch it
    max_new_tokens: int = 512
    do_sample: bool | None = None  # None: the model folder's generation_config.json decides


@dataclass
class EvalSection:
    input: str | None = None  # EVAL=file (any dataset format); default <output_dir>/data/eval.jsonl
    limit: int | None = None  # score only the first N records
    max_new_tokens: int = 256
    batch_size: int = 64  # records answered together (sorted by length, left-padded), per side
    compare_base: bool = True  # also answer with the base model (adapter switched off)
    report_samples: int = 10  # answers shown side by side in report.md


@dataclass
class ServeSection:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None  # the id in /v1/models and responses; default: run.name
    thinking: bool = False  # when a request does not say (enable_thinking, or /think in the message)
    max_new_tokens: int = 512  # when a request gives no max_tokens; also the most one may ask for
    max_batch_size: int = 8  # requests generated together (those waiting when the model is free)
    max_queue: int = 64  # requests that may wait for the model; more get 429
    max_prompt_tokens: int | None = None  # a longer prompt gets 400; default: the model's context
    max_request_bytes: int | None = None  # a larger body gets 413; default: 16 per max_prompt_tokens + 64 KiB


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lora: LoraSection = field(default_factory=LoraSection)
    train: TrainSection = field(default_factory=TrainSection)
    swanlab: SwanLabSection = field(default_factory=SwanLabSection)
    infer: InferSection = field(default_factory=InferSection)
    chat: ChatSection = field(default_factory=ChatSection)
    eval: EvalSection = field(default_factory=EvalSection)
    serve: ServeSection = field(default_factory=ServeSection)
    source: str | None = field(default=None, metadata={"internal": True})  # the YAML it came from

    @property
    def output_dir(self) -> Path:
        return Path(self.run.output_dir)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        d["train"] = self.train.to_dict()
        return d

    def dump(self, path: Path) -> Path:
        from .atomic import write_text

        return write_text(path, yaml.safe_dump(self.to_dict(), allow_unicode=True, sort_keys=False))


# ---------------------------------------------------------------------------------------------
# loading and validation


def _section_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_type(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if isinstance(hint, type) and issubclass(hint, enum.Enum):  # TrainingArguments' choices: by value
        return value in {e.value for e in hint}
    if origin in (typing.Union, types.UnionType):
        return any(_check_type(value, h) for h in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (list, dict):
        args = typing.get_args(hint)
        if origin is dict:
            return isinstance(value, dict)
        return isinstance(value, list) and all(_check_type(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {type(None): "null"}.get(hint, getattr(hint, "__name__", str(hint)))


def _nearest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(choices)})"


def _enum_choices(hint: Any) -> list[str]:
    """The values of the Enum a TrainingArguments field accepts next to str (lr_scheduler_type, ...)."""
    members = [h for h in typing.get_args(hint) or (hint,) if isinstance(h, type) and issubclass(h, enum.Enum)]
    return [e.value for m in members for e in m]


def _coerce(value: Any, hint: Any, keep_ints: bool) -> Any:
    """YAML 1.1's string "2e-4" as the float the user meant; an int where a float is expected as a
    float, except where keep_ints (TrainingArguments' *_steps: a float there is a fraction of the run)."""
    accepts_float = hint is float or float in typing.get_args(hint)
    if accepts_float and isinstance(value, int) and not isinstance(value, bool) and not keep_ints:
        return float(value)
    if accepts_float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _not_finite(value: Any) -> bool:
    """A float inf / nan, also inside a list or mapping (YAML's .inf, .nan, 1e999 read as a float)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_not_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_not_finite(v) for v in value)
    return False


def _key_hint(sec_name: str, section: Any, key: str, where: str, problems: list[str]) -> Any:
    """The type a section's key takes, or None (after naming the problem) when there is no such key."""
    hints = _section_types(type(section))
    hints.pop("args", None)
    if key in hints:
        return hints[key]
    if sec_name != "train":
        problems.append(f"{where}: unknown key '{sec_name}.{key}'{_nearest(key, list(hints))}")
        return None
    training = training_argument_hints()
    if key in DERIVED_TRAINING_ARGS:
        problems.append(
            f"{where}: 'train.{key}' is set by the project from {DERIVED_TRAINING_ARGS[key]}: change that instead"
        )
        return None
    if key not in training:
        problems.append(
            f"{where}: unknown key 'train.{key}' (neither a project key nor a TrainingArguments field)"
            f"{_nearest(key, list(hints) + list(training))}"
        )
        return None
    return training[key]


def _apply(cfg: Config, data: dict, where: str, problems: list[str]) -> None:
    sections = {f.name: f for f in fields(Config) if not f.metadata.get("internal")}
    if not isinstance(data, dict):
        problems.append(f"{where}: the top level must be a mapping of sections ({', '.join(sections)})")
        return
    for sec_name, values in data.items():
        if sec_name not in sections:
            problems.append(f"{where}: unknown section '{sec_name}'{_nearest(sec_name, list(sections))}")
            continue
        section = getattr(cfg, sec_name)
        if not isinstance(values, dict):
            problems.append(f"{where}: section '{sec_name}' must be a mapping of keys")
            continue
        for key, value in values.items():
            hint = _key_hint(sec_name, section, key, where, problems)
            if hint is None:
                continue
            value = _coerce(value, hint, keep_ints=sec_name == "train" and key.endswith("_steps"))
            if _not_finite(value):
                problems.append(
                    f"{where}: '{sec_name}.{key}' is {value!r}: every number in the config must be "
                    "finite (no .inf, .nan, or a number too large for a float such as 1e999)"
                )
                continue
            choices = _enum_choices(hint)
            if choices and isinstance(value, str) and value not in choices:
                problems.append(
                    f"{where}: '{sec_name}.{key}' is {value!r}, not one of TrainingArguments' choices"
                    f"{_nearest(value, choices)}"
                )
                continue
            if not _check_type(value, hint):
                problems.append(f"{where}: '{sec_name}.{key}' is {value!r}, expected {_describe(hint)}")
                continue
            setattr(section, key, value)


def _validate(cfg: Config, problems: list[str]) -> None:
    if cfg.lora.preset == "custom" and not cfg.lora.target_modules:
        problems.append("lora.preset is 'custom' but lora.target_modules is empty: list the module names")
    if cfg.lora.preset != "custom" and cfg.lora.target_modules:
        problems.append(
            f"lora.target_modules is set but lora.preset is '{cfg.lora.preset}', which trains its own "
            f"list ({', '.join(LORA_PRESETS[cfg.lora.preset])}) and would ignore yours: add "
            "lora.preset=custom to train exactly lora.target_modules, or drop target_modules"
        )
    if "gate" in cfg.lora.targets():
        problems.append(
            "lora.target_modules contains 'gate', which matches the router `mlp.gate` (not a Linear): "
            "use 'gate_proj' (the router's Linear is 'wg' and should stay frozen)"
        )
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps", "save_steps"):
        if getattr(cfg.train, key) < 1:
            problems.append(f"train.{key} must be at least 1")
    if cfg.data.max_length < 8:
        problems.append("data.max_length must be at least 8 tokens")
    if not 0.0 <= cfg.data.eval_ratio < 1.0:
        problems.append("data.eval_ratio must be in [0, 1)")
    if cfg.lora.r < 1:
        problems.append("lora.r must be at least 1")
    if cfg.lora.alpha <= 0:
        problems.append(f"lora.alpha is {cfg.lora.alpha}: it must be positive (the update is scaled by alpha / r)")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        problems.append(f"lora.dropout is {cfg.lora.dropout}: it must be in [0, 1)")
    if cfg.train.max_steps == 0 or cfg.train.max_steps < -1:
        problems.append(
            f"train.max_steps is {cfg.train.max_steps}: at least 1, or -1 to train "
            "train.num_train_epochs (the Trainer would read 0 as -1)"
        )
    elif cfg.train.max_steps == -1 and not cfg.train.num_train_epochs > 0:
        problems.append(
            f"train.num_train_epochs is {cfg.train.num_train_epochs} with train.max_steps -1: that is 0 "
            "training steps; set a positive num_train_epochs (1 is the tutorial's), or max_steps"
        )
    for key in ("serve.port", "swanlab.port"):
        section, name = key.split(".")
        port = getattr(getattr(cfg, section), name)
        if not 1 <= port <= 65535:
            problems.append(f"{key} is {port}: a TCP port is 1-65535")
    if not cfg.train.learning_rate > 0:
        problems.append(f"train.learning_rate is {cfg.train.learning_rate}: it must be positive")
    elif cfg.train.learning_rate > FLOAT32_MAX:  # the optimizer's update would fail converting it
        problems.append(
            f"train.learning_rate is {cfg.train.learning_rate:g}: more than a float32 holds "
            f"({FLOAT32_MAX:.1e}); LoRA learning rates are around 1e-4"
        )
    if not 0.0 <= cfg.train.warmup_ratio <= 1.0:
        problems.append(
            f"train.warmup_ratio is {cfg.train.warmup_ratio}: it must be in [0, 1] (a fraction of the steps)"
        )
    if cfg.train.dataloader_num_workers < 0:
        problems.append(
            f"train.dataloader_num_workers is {cfg.train.dataloader_num_workers}: 0 (load in the "
            "training process) or more"
        )
    if cfg.train.save_total_limit is not None and cfg.train.save_total_limit < 1:
        problems.append(
            f"train.save_total_limit is {cfg.train.save_total_limit}: at least 1 (checkpoints kept), or "
            "null to keep all"
        )
    for section in ("infer", "chat", "eval", "serve"):
        tokens = getattr(getattr(cfg, section, None), "max_new_tokens", 1)
        if tokens < 1:
            problems.append(f"{section}.max_new_tokens is {tokens}: at least 1")
    for key in (
        "infer.batch_size",
        "eval.batch_size",
        "serve.max_batch_size",
        "serve.max_queue",
        "serve.max_prompt_tokens",
        "serve.max_request_bytes",
    ):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None and value < 1:
            problems.append(f"{key} is {value}: at least 1")
    if cfg.train.pad_to_multiple_of is not None and cfg.train.pad_to_multiple_of < 1:
        problems.append("train.pad_to_multiple_of must be at least 1, or null")
    if cfg.train.expert_stash_gib < 0:
        problems.append(f"train.expert_stash_gib is {cfg.train.expert_stash_gib}: 0 (recompute all) or more")
    if cfg.train.packed_row_tokens < 0:
        problems.append(f"train.packed_row_tokens is {cfg.train.packed_row_tokens}: 0 (one row) or more")
    elif cfg.train.packed_row_tokens and not cfg.train.packing:
        problems.append(
            "train.packed_row_tokens splits packed micro-batches into rows, but train.packing is off; "
            "set train.packing: true, or remove train.packed_row_tokens"
        )
    if cfg.model.nf4_products != "dequantize" and (cfg.model.quantization != "nf4" or cfg.model.moe_impl != "fast"):
        problems.append(
            f"model.nf4_products: {cfg.model.nf4_products} needs model.quantization: nf4 and "
            "model.moe_impl: fast (it is how the project's grouped experts multiply by 4-bit weights); "
            "remove it, or set both"
        )
    if cfg.train.cuda_graphs and cfg.model.moe_impl != "fast":
        problems.append(
            "train.cuda_graphs needs model.moe_impl: fast (the per-expert loop of upstream asks the GPU how many "
            "tokens each expert got, a host synchronisation that a CUDA graph cannot hold); set it, or remove "
            "train.cuda_graphs"
        )
    if cfg.train.packing and cfg.model.moe_impl != "fast":
        problems.append(
            "train.packing needs model.moe_impl: fast (the project's attention keeps each packed "
            "sample to itself, from position ids that restart per sample; with upstream the model "
            "folder's own hunyuan.py runs, which is not known to, and the samples of one row would "
            "attend to each other)"
        )


def parse_override(text: str) -> tuple[str, str, Any]:
    """`section.key=value` with the value parsed as YAML (so 2e-4, true, [a, b], "a b" get their types)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UserError(
            f"override '{text}' is not of the form section.key=value",
            where="--set / SET",
            fix='write it like train.learning_rate=2e-4; several: SET="a.b=1 c.d=2"; a value with spaces '
            "may be quoted: SET='data.system_prompt=\"你是 甄嬛\"'",
        )
    path, raw = text.split("=", 1)
    section, key = path.split(".", 1)
    # YAML 1.1 reads "2e-4" as a string; accept the float spelling users type. Text YAML would turn
    # into a mapping ("注意: 回答") is meant as text: no config key takes a mapping.
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, dict):
        value = raw
    if isinstance(value, str) and value == raw:
        with contextlib.suppress(ValueError):
            value = float(raw)
    return section.strip(), key.strip(), value


def read_yaml(p: Path) -> dict:
    """The config file's mapping; UserError for what is not a non-empty UTF-8 YAML file."""
    fix = "pass CONFIG=configs/<run>.yaml (see configs/)"
    if not p.exists():
        raise UserError(f"config file {p} does not exist", fix=fix)
    if p.is_dir():
        raise UserError(f"config file {p} is a folder, not a YAML file", fix=fix)
    if not p.is_file():  # a FIFO would block the read, a device such as /dev/zero never end
        raise UserError(f"config file {p} is not a regular file (a pipe, a device, a socket)", fix=fix)
    try:
        data = p.read_bytes()
        text = data.decode("utf-8")
    except OSError as e:
        raise UserError(f"config file {p} cannot be read ({e.strerror})", fix="check its permissions") from e
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"not UTF-8 text (bytes {data[e.start : e.start + 4].hex(' ').upper()} at byte offset "
            f"{e.start:,}: {e.reason})",
            where=f"{p}:{line}",
            fix=f"a config is UTF-8 YAML: convert it, e.g. iconv -f GB18030 -t UTF-8 {p} > {p}.utf8 "
            "(GBK / GB18030 is the usual other encoding of Chinese text); a binary file is not "
            "a config",
        ) from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise UserError(
            f"not valid YAML ({getattr(e, 'problem', e)})",
            where=where,
            fix="check indentation and quoting on that line",
        ) from e
    except RecursionError as e:
        raise UserError("nested too deeply to be a config", where=str(p), fix=fix) from e
    if raw is None:  # empty, or comments only: every default would be a real-model run, unasked
        raise UserError(
            f"config file {p} is empty (or only comments): every setting would take its default, "
            "the tutorial's run on the real model",
            where=str(p),
            fix="write the settings of your run into it, or pass the tutorial's own config: "
            "CONFIG=configs/huanhuan.yaml (the stand-in: CONFIG=configs/demo.yaml)",
        )
    return raw


def load(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model_dir: str | None = None,
    data: str | None = None,
    output_dir: str | None = None,
) -> Config:
    """Build the run config; raises one UserError listing every problem found."""
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        _apply(cfg, read_yaml(p), str(p), problems)
        cfg.source = str(p)
    for text in overrides or []:
        section, key, value = parse_override(text)
        _apply(cfg, {section: {key: value}}, f"--set {text}", problems)
    if model_dir:
        cfg.model.dir = model_dir
    if data:
        cfg.data.path = data
        cfg.data.url = cfg.data.sha256 = None  # a user-given file is used as it is
    if output_dir:
        cfg.run.output_dir = output_dir
    _validate(cfg, problems)
    if problems:
        raise UserError(
            "invalid config: " + "; ".join(problems),
            fix="correct the keys named above (every valid key and its default is in src/hunyuan_lora/config.py)",
        )
    return cfg
