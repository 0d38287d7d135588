"""The preflight: everything cheap that can stop a run, checked before any weights load. Reads only.

    make check [CONFIG=configs/huanhuan.yaml] [MODEL_DIR=...]     # the table; exit 2 on a problem
    plan = preflight(cfg, stage="train")                           # the first thing train.run does

Each row of the table is one check; a failed row is a UserError (what, where, fix). All rows run
(those whose input is missing are skipped), then every failure is raised as one UserError, so one
`make check` lists every problem.

    config        config.load has validated every key and type (unknown keys name the nearest)
    optimizer     train.optim is one this environment can build (some need a package the lock does not install)
    model folder  model_folder.verify: config.json + auto_map code, tokenizer files, every shard of the
                  index (and each size, when the folder has a download.json); plus each shard's
                  safetensors header: complete file, every indexed tensor present
    patch         hunyuan.py defines `logger` (training with gradient checkpointing needs it)
    parameters    counted from config.json alone: the project's HunYuan built on the meta device;
                  every LoRA target must match an nn.Linear
    dataset       train: <output_dir>/data complete and tokenized with this config;
                  before `make dataset`: the raw file read with records.read_records
    resume        the checkpoint training continues from: the newest *complete* one
    output        output_dir writable, free space for the checkpoints (estimate printed)
    driver        the NVIDIA driver runs the CUDA torch is built for (torch 2.11.0: CUDA 13.0, driver >= 580);
                  an older one leaves torch without a GPU, silently on the CPU
    launch        device, dtype, how the process was launched (one process, ZeRO-3), QLoRA's needs
    memory        visible GPUs (or CPU RAM) against an estimate for these settings (printed)
    swanlab       cloud mode: an API key, well formed, that the cloud accepts (tracking.check_swanlab)
    secrets       a credential in the git remote URL (SwanLab records that URL): `make train` masks it

The estimates behind the output and memory rows are estimate.py's (the formulas are there).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from .atomic import LEFTOVER_GLOBS, PREVIOUS_INFIX, check_replaceable, check_writable
from .checkpoints import INCOMPLETE_PREFIX, ResumePoint, incomplete_notes, resume_point
from .config import Config
from .errors import UserError
from .estimate import (
    MemoryEstimate,
    ParamCount,
    checkpoint_bytes,
    count_parameters,
    disk_needed,
    estimate_memory,
    expected_steps,
    human_bytes,
)
from .model_folder import check_model_folder, undefined_logger
from .prompt import dataset_mismatch
from .records import check_sha256, read_records
from .runtime import (
    MIN_DRIVER,
    Placement,
    check_combination,
    is_main_process,
    mask_git_remote,
    nvidia_driver,
    placement,
)
from .tracking import check_swanlab

# Temporary siblings the stages write before renaming into place (atomic.py's names) and checkpoints
# set aside as incomplete: what killed runs leave behind.
LEFTOVER_PATTERNS = (*LEFTOVER_GLOBS, f"{INCOMPLETE_PREFIX}checkpoint-*")

Status = Literal["ok", "FAIL", "warn", "skip", "todo"]


@dataclass
class Row:
    name: str
    status: Status
    detail: str


@dataclass
class Plan:
    """What the preflight established; train.run uses the placement and resume."""

    placement: Placement
    resume: ResumePoint | None
    rows: list[Row] = field(default_factory=list)
    params: ParamCount | None = None
    memory: MemoryEstimate | None = None
    disk_bytes: int | None = None  # what the output folder must have free
    steps: int | None = None  # optimizer steps the run will take (estimate.expected_steps)


# ---------------------------------------------------------------------------------------------
# dataset


def _split_rows(split_dir: Path) -> int:
    """Rows in one `save_to_disk` split; UserError when a file it lists is gone."""
    import pyarrow as pa

    state = json.loads((split_dir / "state.json").read_text(encoding="utf-8"))
    rows = 0
    for entry in state.get("_data_files", []):
        path = split_dir / entry["filename"]
        if not path.is_file():
            raise FileNotFoundError(2, "No such file", str(path))
        with pa.memory_map(str(path)) as source:
            rows += pa.ipc.open_stream(source).read_all().num_rows
    return rows


def check_tokenized(cfg: Config) -> tuple[str, dict]:
    """<output_dir>/data as `make dataset` leaves it, tokenized with this config's settings."""
    data_dir = cfg.output_dir / "data"
    stats_path = data_dir / "stats.json"
    if not stats_path.is_file():
        raise UserError(
            f"no tokenized dataset in {data_dir}",
            where="run.output_dir",
            fix="run `make dataset` with the same CONFIG / OUTPUT_DIR first",
        )
    incomplete = f"the tokenized dataset in {data_dir} is incomplete"
    rerun = "run `make dataset` again (it replaces the folder)"
    try:
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        splits: dict[str, int] = stats["splits"]
        found = json.loads((data_dir / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
        if sorted(found) != sorted(splits):
            raise ValueError(f"splits {found} on disk, {sorted(splits)} in stats.json")
        for name, n in splits.items():
            rows = _split_rows(data_dir / name)
            if rows != n:
                raise ValueError(f"split '{name}' has {rows} rows, stats.json says {n}")
    except FileNotFoundError as e:
        raise UserError(f"{incomplete}: {e.filename} is missing", where=str(data_dir), fix=rerun) from e
    except (ValueError, KeyError, TypeError, OSError) as e:  # json and pyarrow errors are ValueErrors/OSErrors
        raise UserError(f"{incomplete} or damaged ({type(e).__name__}: {e})", where=str(data_dir), fix=rerun) from e

    # Tokenized from another file or tokenizer, or under other settings: training would silently use
    # the old examples.
    stale = dataset_mismatch(cfg, stats)
    if (cfg.data.eval_ratio > 0) != ("eval" in splits):
        stale.append(f"data.eval_ratio is {cfg.data.eval_ratio} but the dataset has splits {sorted(splits)}")
    if stale:
        raise UserError(
            "the tokenized dataset does not match the config: " + "; ".join(stale),
            where=str(data_dir),
            fix="rerun `make dataset` with this CONFIG (and DATA / MODEL_DIR)",
        )
    detail = (
        f"{data_dir}: {stats['examples']:,} examples ({', '.join(f'{k} {v:,}' for k, v in splits.items())}), "
        f"tokens max {stats['tokens']['max']}, from {stats['source']}"
    )
    return detail, stats


def check_raw_dataset(cfg: Config) -> tuple[Status, str, int | None]:
    """Before `make dataset`: the raw file, read and validated as the dataset stage will read it."""
    path = Path(cfg.data.path)
    if not path.exists():
        if cfg.data.url:
            return "todo", f"{path} not downloaded yet: `make dataset` fetches {cfg.data.url}", None
        raise UserError(
            f"dataset file {path} does not exist",
            where="data.path",
            fix="set DATA=/path/to/file.json(l), or data.url in the config",
        )
    check_sha256(path, cfg.data.sha256, str(path))
    records, report = read_records(path, drop_duplicates=cfg.data.drop_duplicates)
    held_out = math.ceil(cfg.data.eval_ratio * len(records))  # as data.split_records draws them
    if cfg.data.eval_ratio > 0 and held_out >= len(records):
        raise UserError(
            f"data.eval_ratio={cfg.data.eval_ratio} holds out {held_out} of {len(records)} record(s), "
            "leaving none to train on",
            where="data.eval_ratio",
            fix="lower data.eval_ratio or add records (0 turns the held-out split off)",
        )
    note = "; not tokenized yet: run `make dataset`"
    return "ok", f"{path}: {len(records):,} valid records ({report.format}){note}", len(records)


def gpu_memory(only: int | None = None) -> list[tuple[str, int, int]]:
    """(name, free bytes, total bytes) of every visible GPU, or of GPU `only` (each query opens a CUDA
    context on that GPU for the life of the process: a ZeRO-3 rank must touch only its own)."""
    import torch

    out = []
    for i in [only] if only is not None else range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append((torch.cuda.get_device_name(i), free, total))
    return out


def available_ram() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_output(cfg: Config, params: ParamCount | None, steps: int | None) -> tuple[Status, str, int | None]:
    """output_dir writable (or creatable), with free space for the checkpoints estimate.disk_needed counts."""
    out = cfg.output_dir
    needed = basis = None
    if params is not None:
        folder = Path(cfg.model.dir)
        tokenizer_bytes = sum(
            (folder / n).stat().st_size
            for n in ("hy.tiktoken", "tokenizer_config.json", "tokenization_hy.py")
            if (folder / n).is_file()
        )
        per_ckpt = checkpoint_bytes(params, tokenizer_bytes)
        needed, n = disk_needed(cfg, per_ckpt, params.lora * 4, steps)
        basis = f"{n} checkpoint(s) x {human_bytes(per_ckpt)} + adapter" + (
            "" if steps is not None else "; steps unknown until the dataset is read"
        )
    anchor = check_writable(out)
    check_replaceable(out / "adapter", where="run.output_dir")  # train publishes it there
    free = shutil.disk_usage(anchor).free
    if needed is not None and free < needed:
        raise UserError(
            f"{human_bytes(free)} free at {anchor.resolve()}, the run needs about {human_bytes(needed)} ({basis})",
            where="run.output_dir",
            fix="free some space, pass an OUTPUT_DIR on a bigger disk, or set train.save_total_limit "
            "(checkpoints kept)",
        )
    needs = f", ~{human_bytes(needed)} needed ({basis})" if needed is not None else ""
    return "ok", f"{out} writable, {human_bytes(free)} free{needs}", needed


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings a killed stage left behind (never read by any stage; safe to delete)."""
    if not out.is_dir():
        return []
    return sorted({p for pattern in LEFTOVER_PATTERNS for p in out.glob(pattern)})


def check_memory(
    cfg: Config, model_config: dict | None, params: ParamCount | None, where: Placement | None, stats: dict | None
) -> tuple[Status, str, MemoryEstimate | None]:
    """The visible GPUs' free memory (or the CPU's RAM) against estimate.estimate_memory."""
    import torch

    if where is None:
        return "skip", "needs the device (launch row)", None
    if params is None or model_config is None:
        return "skip", "needs the parameter count", None
    device, dtype, run = where.device, where.dtype, where.launch
    longest = min(cfg.data.max_length, stats["tokens"]["max"]) if stats else cfg.data.max_length
    batch = cfg.train.per_device_train_batch_size
    tokens = batch * longest
    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    gc = cfg.train.gradient_checkpointing
    nf4 = cfg.model.quantization == "nf4"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) if run.zero3 and "LOCAL_RANK" in os.environ else None
        gpus = gpu_memory(local) if local is not None else gpu_memory()
        if not gpus:
            raise UserError(
                "no CUDA GPU is visible",
                where="model.device",
                fix="check `nvidia-smi` / CUDA_VISIBLE_DEVICES, or set model.device: cpu",
            )
        if run.zero3:  # one process per GPU, each holding 1/N: this process's own GPU
            used = gpus[:1]  # this rank's GPU (launched), or the first (`make check LAUNCH=zero3`)
            est = estimate_memory(
                model_config,
                params,
                dtype_bytes,
                tokens,
                gc,
                1,
                zero3_processes=run.processes,
                offload_param=run.offload_param,
            )
        else:
            used = gpus if cfg.model.device_map else gpus[:1]  # without device_map everything goes to cuda:0
            est = estimate_memory(model_config, params, dtype_bytes, tokens, gc, len(used), nf4=nf4)
        free = sum(f for _, f, _ in used)
        where = ", ".join(f"{name} {human_bytes(f)} free of {human_bytes(t)}" for name, f, t in used)
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UserError(
                f"{gpus[0][0]} has no bfloat16 support",
                where="train.bf16",
                fix="use an Ampere or newer GPU (A100, H100, H200, RTX 30xx+); float32 would need twice the memory",
            )
        if est.total > free:
            raise UserError(
                f"{len(used)} GPU(s) with {human_bytes(free)} free, these settings need {est.describe()}",
                where=f"model.device_map={cfg.model.device_map!r}, batch {batch} x {longest} tokens",
                fix="make more GPUs visible (device_map: auto spreads the layers over them) or run ZeRO-3 "
                "over more processes (`make train LAUNCH=zero3 NPROC=<GPUs>`) or QLoRA "
                "(CONFIG=configs/huanhuan_qlora.yaml), free the GPUs other processes hold, or lower "
                "train.per_device_train_batch_size / data.max_length",
            )
        return "ok", f"{len(used)} GPU(s): {where}; {str(dtype).replace('torch.', '')} needs {est.describe()}", est
    est = estimate_memory(model_config, params, dtype_bytes, tokens, gc, 0)
    ram = available_ram()
    if ram is not None and est.total > ram:
        raise UserError(
            f"on the CPU, in {str(dtype).replace('torch.', '')}, these settings need {est.describe()} of "
            f"RAM; {human_bytes(ram)} is available",
            where=f"model.device={cfg.model.device!r}",
            fix="train this model on GPUs (model.device: cuda; check `nvidia-smi`); the CPU is for the "
            "stand-in (CONFIG=configs/demo.yaml)",
        )
    return (
        "ok",
        (
            f"cpu, {str(dtype).replace('torch.', '')}: needs {est.describe()}"
            + (f", {human_bytes(ram)} RAM available" if ram else "")
        ),
        est,
    )


# ---------------------------------------------------------------------------------------------
# the preflight


class _Table:
    def __init__(self):
        self.rows: list[Row] = []
        self.errors: list[tuple[str, UserError]] = []

    def run(self, name: str, check: Callable[..., tuple], *args) -> Any:
        """check(*args) returns (status, detail) or (status, detail, value); a UserError is a FAIL row.
        Returns the value (None on FAIL)."""
        try:
            status, detail, *value = check(*args)
        except UserError as e:
            self.add(name, "FAIL", e.what)
            self.errors.append((name, e))
            return None
        self.add(name, status, detail)
        return value[0] if value else None

    def add(self, name: str, status: Status, detail: str) -> None:
        self.rows.append(Row(name, status, detail))

    def raise_failures(self) -> None:
        """One UserError: the only failure as it is, or every failure numbered."""
        if len(self.errors) == 1:
            raise self.errors[0][1]
        if self.errors:
            raise UserError(
                f"{len(self.errors)} preflight checks failed: "
                + " ".join(f"({i}) {name}: {e.paragraph()}" for i, (name, e) in enumerate(self.errors, 1)),
                fix="fix each problem as its own 'Fix:' says, then run `make check` again",
            )


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    return "\n".join(f"  {r.name:<{width}}  {r.status:<4}  {r.detail}" for r in rows)


def check_patch(cfg: Config, model_config: dict | None) -> tuple[Status, str]:
    if not cfg.train.gradient_checkpointing:
        return "skip", "gradient checkpointing is off: the undefined `logger` is never reached"
    if cfg.model.moe_impl == "fast":
        return "skip", "model.moe_impl is fast: the project's own model code runs, not the folder's hunyuan.py"
    if model_config is None or not model_config.get("auto_map"):
        return "skip", "needs the model folder's config.json with auto_map"
    path, lines = undefined_logger(cfg.model.dir)
    if lines:
        raise UserError(
            f"hunyuan.py uses `logger` without defining it (line(s) {', '.join(map(str, lines))}), so "
            "training with gradient checkpointing would crash with NameError",
            where=str(path),
            fix="run `make patch`",
        )
    return "ok", f"{path.name} defines `logger`"


def check_parameters(cfg: Config, model_config: dict | None) -> tuple[Status, str, ParamCount | None]:
    if model_config is None:
        return "skip", "needs the model folder's config.json", None
    p = count_parameters(model_config, cfg.lora.targets(), cfg.lora.r)
    modules = sum(p.per_target.values())
    return (
        "ok",
        (
            f"{p.total:,} in the model (from config.json, meta device); LoRA r={cfg.lora.r} on {modules:,} "
            f"Linear layers: {p.lora:,} trainable ({100 * p.lora / (p.total + p.lora):.3f} % of "
            f"{p.total + p.lora:,})"
        ),
        p,
    )


def check_dataset(cfg: Config, stage: str) -> tuple[Status, str, tuple[dict | None, int | None]]:
    """The tokenized dataset when it exists or train needs it, else the raw file.
    Value: (stats.json or None, training examples or None)."""
    if stage == "train" or (cfg.output_dir / "data" / "stats.json").is_file():
        detail, stats = check_tokenized(cfg)
        return "ok", detail, (stats, stats["splits"].get("train"))
    status, detail, records = check_raw_dataset(cfg)
    examples = math.floor(records * (1 - cfg.data.eval_ratio)) if records is not None else None
    return status, detail, (None, examples)


def check_resume(cfg: Config, steps: int | None) -> tuple[Status, str, ResumePoint]:
    point = resume_point(cfg)
    notes = incomplete_notes(point)
    if point.path and steps is not None and point.step >= steps:
        notes.append(
            f"training is complete ({Path(point.path).name} is at the last step, {steps}): `make train` trains no "
            "further step; it publishes that checkpoint as adapter/ unless it already is"
        )
    return ("warn" if notes else "ok"), "; ".join([point.detail] + notes), point


@lru_cache(maxsize=1)
def installed_optimizers() -> tuple[str, ...]:
    """The Trainer's optimizer names whose implementation this environment has (the rest need a
    package the lock does not install: torchao, galore_torch, apex, ...)."""
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers.training_args import OptimizerNames

    args = TrainingArguments(output_dir=tempfile.gettempdir(), use_cpu=True, report_to="none")
    names = []
    for name in OptimizerNames:
        args.optim = name
        try:
            Trainer.get_optimizer_cls_and_kwargs(args)
        except (ImportError, ValueError):  # "You need to install ..." / "Trainer failed to import ..."
            continue
        names.append(name.value)
    return tuple(names)


def check_optimizer(cfg: Config) -> tuple[Status, str]:
    """train.optim (config.load has checked it is a Trainer optimizer name) against those installed."""
    optim = cfg.train.optim
    if optim in ("adamw_torch", "adamw_torch_fused"):  # torch's own: no need to ask transformers
        return "ok", optim
    installed = installed_optimizers()
    if optim in installed:
        return "ok", optim
    nearest = difflib.get_close_matches(optim, installed, n=1, cutoff=0.5)
    raise UserError(
        f"train.optim '{optim}' needs a package this environment does not install; the optimizers "
        f"installed: {', '.join(installed)}",
        where="train.optim",
        fix=f"set train.optim to an installed one{f' (the nearest: {nearest[0]})' if nearest else ''}: "
        "adamw_torch is the tutorial's, adamw_torch_fused the faster one (bench/NOTES.md); or "
        "install the package it needs into the kit's environment",
    )


def check_driver() -> tuple[Status, str]:
    """The NVIDIA driver against the CUDA torch is built for (torch.version.cuda)."""
    import torch

    driver = nvidia_driver()
    if driver is None:
        return "skip", "no NVIDIA driver on this machine"
    need = torch.version.cuda
    if need is None:
        return "skip", f"driver {driver.version}; torch {torch.__version__} is a CPU build"
    runs = f"{driver.cuda[0]}.{driver.cuda[1]}"
    if driver.cuda >= tuple(int(n) for n in need.split(".")[:2]):
        return "ok", f"{driver.version} runs CUDA {runs}; torch {torch.__version__} needs CUDA {need}"
    if torch.cuda.is_available():  # the datacenter forward-compatibility libraries make up the difference
        return "ok", (
            f"{driver.version} runs CUDA {runs}, torch {torch.__version__} needs {need}: the GPU works "
            "through CUDA forward compatibility"
        )
    minimum = MIN_DRIVER.get(need)
    raise UserError(
        f"the NVIDIA driver {driver.version} runs CUDA up to {runs}, but torch {torch.__version__} is "
        f"built for CUDA {need}: torch sees no GPU and would run on the CPU",
        where="the NVIDIA driver (`nvidia-smi` shows its version and CUDA Version)",
        fix=f"install an NVIDIA driver {'>= ' + minimum if minimum else f'for CUDA {need}'} (the README's "
        "'What the machine needs'; on a rented GPU pick an image with that driver), then run "
        "`make check` again",
    )


def check_launch(cfg: Config) -> tuple[Status, str, Placement]:
    """Device, dtype and launcher; value: the placement (runtime.placement) the run will use."""
    where = placement(cfg)
    device, run = where.device, where.launch
    check_combination(cfg, run)
    if cfg.model.quantization == "nf4" and device != "cuda":
        raise UserError(
            "model.quantization is nf4 (QLoRA) but there is no CUDA GPU: bitsandbytes' 4-bit layers run on CUDA only",
            where="model.quantization",
            fix="run QLoRA on a GPU machine, or set model.quantization: none (on the CPU only the stand-in "
            "trains: CONFIG=configs/demo.yaml)",
        )
    if run.deepspeed and device != "cuda" and run.processes != 1:
        # one process runs on DeepSpeed's CPU accelerator (the tests' path); more, or none (NPROC counts
        # the GPUs nvidia-smi lists), would pass here and fail inside DeepSpeed
        why = "model.device is cpu" if cfg.model.device == "cpu" else "this machine has no CUDA GPU visible"
        raise UserError(
            f"DeepSpeed ZeRO-3 over {run.processes} processes (LAUNCH, NPROC) needs CUDA GPUs, one per "
            f"process, but {why}",
            where="LAUNCH",
            fix="run LAUNCH=zero3 on a GPU machine (`nvidia-smi -L` lists its GPUs; NPROC defaults to "
            "their number) with model.device auto or cuda; without GPUs train as one process, no "
            "LAUNCH (on the CPU only the stand-in trains: CONFIG=configs/demo.yaml)",
        )
    if run.zero3:
        how = (
            f"DeepSpeed ZeRO-3 over {run.processes} processes (weights sharded 1/{run.processes} per GPU"
            + (", offloaded to host RAM" if run.offload_param else "")
            + "; MoE blocks are leaf modules)"
        )
    else:
        how = f"one process, {device}" + (
            f", device_map={cfg.model.device_map!r}" if device == "cuda" and cfg.model.device_map else ""
        )
    if cfg.model.quantization == "nf4":
        how += ", base weights NF4 (router wg and lm_head bf16)"
    return "ok", how, where


def check_nf4_cache(cfg: Config, params: ParamCount | None, where: Placement | None) -> tuple[Status, str]:
    """Whether NF4 loads will read the cache (model.nf4_cache), and the disk space it takes or will take."""
    from . import nf4
    from .scale import NF4_BYTES_PER_PARAM, bnb_config

    root = nf4.cache_dir(cfg.model.nf4_cache, cfg.model.dir)
    if root is None:
        return "ok", "none (model.nf4_cache: none): every NF4 load quantises the checkpoint again"
    if where is None or not (Path(cfg.model.dir) / "config.json").is_file():
        return "skip", "needs the model folder and the device (launch row)"
    state, line = nf4.cache_state(root, nf4.cache_key(Path(cfg.model.dir), where.dtype, bnb_config(cfg)))
    used, stale = nf4.cache_bytes(root), nf4.leftovers(root)
    left = (
        (
            f"; {', '.join(p.name for p in stale)} beside it: left by killed writes, never read "
            "(`make clean-cache` removes them)"
        )
        if stale
        else ""
    )
    if state == "valid":
        return "ok", f"will be used: {line}; {human_bytes(used)} on disk (`make clean-cache` removes it){left}"
    if state != "missing":
        return "warn", f"{line}: the next NF4 load rebuilds it ({human_bytes(used)} on disk now){left}"
    if params is None:
        return "ok", f"{line}: the first NF4 load writes it, later loads read it{left}"
    need = params.quantizable * NF4_BYTES_PER_PARAM + (params.total - params.quantizable) * 2
    anchor = root.parent
    while not anchor.exists():
        anchor = anchor.parent
    free = shutil.disk_usage(anchor).free
    if free < need:
        return "warn", (
            f"{line}; it needs ~{human_bytes(need)}, {human_bytes(free)} free at {anchor}: every NF4 "
            f"load will quantise the checkpoint (set model.nf4_cache to a folder with room){left}"
        )
    return "ok", (
        f"{line}: the first NF4 load writes it (~{human_bytes(need)}, {human_bytes(free)} free there), "
        f"later loads read it instead of quantising the checkpoint{left}"
    )


def leftover_rows(out: Path) -> list[tuple[Status, str]]:
    stale = leftovers(out)
    # .X.previous-* without X: killed between "old aside" and "new in place"; it is the last complete X.
    previous = {p: out / p.name[1:].rsplit(PREVIOUS_INFIX, 1)[0] for p in stale if PREVIOUS_INFIX in p.name}
    orphans = [p for p, final in previous.items() if not final.exists()]
    rows = []
    if orphans:
        rows.append(
            (
                "warn",
                "; ".join(
                    f"{p} is the previous complete {previous[p].name} (a run was killed while "
                    f"replacing it): `mv {p} {previous[p]}` restores it"
                    for p in orphans
                ),
            )
        )
    if set(stale) - set(orphans):
        rows.append(
            (
                "warn",
                f"{', '.join(p.name for p in stale if p not in orphans)} in {out}: temporary files of a "
                "killed run, never read; safe to delete",
            )
        )
    return rows


def read_model_config(folder: Path) -> dict | None:
    """config.json, or None when it is missing or unreadable (the model folder row says which)."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def preflight(cfg: Config, stage: Literal["check", "train"] = "check", *, echo: bool = True) -> Plan:
    """Run every check; print the table; raise one UserError naming every failure.

    Reads only (train.run acts on what it reports). stage "train": the tokenized dataset must exist.
    """
    t = _Table()
    source = cfg.source or "(defaults)"
    t.add("config", "ok", f"{source}: every key and type valid")
    t.run("optimizer", check_optimizer, cfg)
    model_config = read_model_config(Path(cfg.model.dir))
    t.run("model folder", lambda folder: ("ok", check_model_folder(folder)[0]), Path(cfg.model.dir))
    t.run("patch", check_patch, cfg, model_config)
    params = t.run("parameters", check_parameters, cfg, model_config)
    stats, examples = t.run("dataset", check_dataset, cfg, stage) or (None, None)
    steps = expected_steps(cfg, examples)
    resume = t.run("resume", check_resume, cfg, steps)
    needed = t.run("output", check_output, cfg, params, steps)
    for status, detail in leftover_rows(cfg.output_dir):
        t.add("leftovers", status, detail)
    t.run("driver", check_driver)
    where = t.run("launch", check_launch, cfg)
    if cfg.model.quantization == "nf4":
        t.run("nf4 cache", check_nf4_cache, cfg, params, where)
    memory = t.run("memory", check_memory, cfg, model_config, params, where, stats)
    t.run("swanlab", check_swanlab, cfg)
    masked = mask_git_remote(apply=False)
    if masked:
        t.add(
            "secrets",
            "warn",
            f"the git remote URL carries a credential; SwanLab records that URL, so "
            f"`make train` masks it for its process ({masked})",
        )

    if echo and is_main_process():
        print(f"preflight ({stage}, {source}):\n{format_table(t.rows)}", flush=True)
    t.raise_failures()
    return Plan(
        placement=where, resume=resume, rows=t.rows, params=params, memory=memory, disk_bytes=needed, steps=steps
    )
