"""Preflight: everything cheap that can stop a run, checked before any weights load.

    make check [CONFIG=configs/huanhuan.yaml] [MODEL_DIR=...]     # the table; exit 2 on a problem
    plan = check.preflight(cfg, stage="train")                     # the first thing train.run does

Each row of the table is one check; a failed row is a UserError (what, where, fix). All rows run
(those whose input is missing are skipped), then every failure is raised as one UserError, so one
`make check` lists every problem.

    config        config.load has validated every key and type (unknown keys name the nearest)
    model folder  download.verify: config.json + auto_map code, tokenizer files, every shard of the
                  index (and each size, when the folder has a download.json); plus each shard's
                  safetensors header: complete file, every indexed tensor present
    patch         hunyuan.py defines `logger` (training with gradient checkpointing needs it)
    parameters    counted from config.json alone: the project's HunYuan built on the meta device;
                  every LoRA target must match an nn.Linear
    dataset       train: <output_dir>/data complete and tokenized with this config;
                  before `make dataset`: the raw file read with records.read_records
    resume        the checkpoint training continues from: the newest *complete* one
    output        output_dir writable, free space for the checkpoints (estimate printed)
    memory        visible GPUs (or CPU RAM) against an estimate for these settings (printed)
    secrets       a credential in the git remote URL (SwanLab records that URL) is masked

Estimates (deliberately simple; the numbers appear in the table):
    checkpoint  = adapter (LoRA params x 4 B, fp32) + optimizer (LoRA params x 4 B x 3: fp32 weights,
                  Adam m and v) + the tokenizer files the Trainer copies; x checkpoints kept
                  (save_total_limit + 1 while the next one is written) or expected (steps / save_steps
                  + 1 for a SIGTERM save), + the final adapter
    memory      = weights (params x dtype bytes) + LoRA, grads, Adam (LoRA params x 4 B x 4)
                  + activations: hidden x tokens x layers x dtype bytes with gradient checkpointing
                  (a rough 37 x that without it) + logits (tokens x vocab x 4 B x 2)
                  + 1 GiB per GPU (CUDA context, allocator), where tokens = micro-batch x longest sample
                  ZeRO-3 (accelerate launch, N processes), per GPU: weights / N + LoRA, grads, Adam / N
                  + activations + logits + two MoE blocks gathered whole (leaf modules: the one running,
                  the next prefetched) + 1 GiB; with param offload the weights / N live in host RAM
                  nf4 (QLoRA): the Linear weights NF4 quantises x 0.516 B (4 bit + block scales, double
                  quantised) + everything else (embedding/lm_head, norms, router) x 4 B (peft's
                  prepare_model_for_kbit_training casts it to fp32)
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal

from .config import Config
from .download import human_bytes
from .checkpoints import INCOMPLETE_PREFIX, ResumePoint, incomplete_notes, resume_point
from .errors import UserError
from .runtime import mask_git_remote

GIB = 2**30
CUDA_OVERHEAD_BYTES = GIB  # per GPU: context + allocator slack
# Temporary siblings the stages write before renaming into place; a killed run leaves them behind.
LEFTOVER_PATTERNS = (".data-*", ".adapter-*", ".merged-*", "*.old", "*.tmp", f"{INCOMPLETE_PREFIX}checkpoint-*")

Status = Literal["ok", "FAIL", "warn", "skip", "todo"]


@dataclass
class Row:
    name: str
    status: Status
    detail: str


@dataclass
class ParamCount:
    total: int  # every parameter once (lm_head is tied to the embedding)
    lora: int  # LoRA A + B parameters the targets add: r x (in + out) per wrapped Linear
    per_target: dict[str, int]  # target -> Linear modules it wraps
    quantizable: int = 0  # parameters in the Linear layers NF4 quantises (all but the router and lm_head)
    moe_block: int = 0  # parameters of one decoder layer's MoE block (what ZeRO-3 gathers at once)


@dataclass
class MemoryEstimate:
    weights: int
    lora_and_optimizer: int  # LoRA weights, their grads, Adam m and v: all fp32
    activations: int
    logits: int
    overhead: int  # per-GPU CUDA context / allocator slack, summed
    gathered: int = 0  # ZeRO-3: MoE blocks gathered whole on each GPU
    per_gpu_of: int = 0  # ZeRO-3: the processes the estimate is one share of (0: not sharded)

    @property
    def total(self) -> int:
        return self.weights + self.lora_and_optimizer + self.activations + self.logits + self.overhead + self.gathered

    def describe(self) -> str:
        return (f"~{human_bytes(self.total)} (weights {human_bytes(self.weights)}"
                f" + LoRA/grads/Adam {human_bytes(self.lora_and_optimizer)}"
                f" + activations {human_bytes(self.activations)} + logits {human_bytes(self.logits)}"
                + (f" + ZeRO-3 gathered MoE blocks {human_bytes(self.gathered)}" if self.gathered else "")
                + (f" + CUDA overhead {human_bytes(self.overhead)}" if self.overhead else "") + ")"
                + (f" per GPU, ZeRO-3 over {self.per_gpu_of} processes" if self.per_gpu_of else ""))


@dataclass
class Plan:
    """What the preflight established; train.run uses device, dtype and resume."""

    device: str | None
    dtype: Any  # torch.dtype
    resume: ResumePoint | None
    rows: list[Row] = field(default_factory=list)
    params: ParamCount | None = None
    memory: MemoryEstimate | None = None
    disk_bytes: int | None = None  # what the output folder must have free


# ---------------------------------------------------------------------------------------------
# model folder


def _safetensors_tensors(path: Path) -> set[str]:
    """Tensor names in a safetensors file's header; UserError when the file is cut short or corrupt.

    Reads only the header (kilobytes): an 8-byte little-endian length, then that much JSON whose
    data_offsets say where the data ends, which must be the file's size.
    """
    size = path.stat().st_size
    bad = None
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 2 or 8 + n > size:
                bad = f"its header is cut short ({size} bytes)"
            else:
                header = json.loads(f.read(n))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                if 8 + n + end != size:
                    bad = f"it has {size} bytes, its header describes {8 + n + end}"
                else:
                    return set(header) - {"__metadata__"}
    except (ValueError, KeyError, TypeError, IndexError) as e:
        bad = f"its header is not valid ({type(e).__name__})"
    raise UserError(f"weights file {path.name} is incomplete or corrupt: {bad}", where=str(path),
                    fix="an interrupted download or copy: delete this file and run `make download` again "
                        "(modelscope fetches only what is missing)")


def _provenance_listing(folder: Path) -> dict[str, dict] | None:
    """download.json's file sizes, for download.verify; a patched file is checked via its .orig copy."""
    from .download import read_provenance

    try:
        prov = read_provenance(folder)
    except (OSError, ValueError):
        return None
    if not prov or not isinstance(prov.get("files"), list):
        return None
    listing = {}
    for f in prov["files"]:
        path, size = f.get("path"), f.get("size")
        if not isinstance(path, str) or not isinstance(size, int):
            continue
        orig = folder / (path + ".orig")  # `make patch` keeps the downloaded file there
        listing[path + ".orig" if orig.is_file() else path] = {"Size": size}
    return listing


def check_model_folder(folder: Path) -> tuple[str, dict]:
    """download.verify (shared with `make download`), then every shard's header against the index."""
    from .download import INDEX_FILE, SINGLE_WEIGHTS_FILE, verify

    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist", where="model.dir",
                        fix="run `make download` (or `make stand-in` for the demo), or pass MODEL_DIR=<folder>")
    listing = _provenance_listing(folder)
    config = verify(folder, listing)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing: list[str] = []
        for shard in shards:
            names = _safetensors_tensors(folder / shard)
            missing += [k for k, s in weight_map.items() if s == shard and k not in names]
        if missing:
            raise UserError(f"{len(missing)} tensor(s) named in {INDEX_FILE} are not in their shard, e.g. "
                            f"{missing[0]}", where=str(folder),
                            fix="the shards and the index come from different revisions: run `make download` "
                                "again into an empty folder")
    else:
        shards = [SINGLE_WEIGHTS_FILE]
        _safetensors_tensors(folder / SINGLE_WEIGHTS_FILE)
    code = sorted(p.name for p in folder.glob("*.py"))
    sized = f", sizes checked against {len(listing)} listed in download.json" if listing else ""
    return f"{folder}: config.json + auto_map code ({', '.join(code)}), tokenizer, {len(shards)} shard(s) " \
           f"with complete headers{sized}", config


# ---------------------------------------------------------------------------------------------
# parameters, from config.json alone


@lru_cache(maxsize=8)
def _meta_linears(config_json: str) -> tuple[int, tuple[tuple[str, int, int], ...], tuple[str, ...]]:
    """(total params, (name, in, out) of every nn.Linear, names of every other module) on the meta device."""
    import torch

    from .hunyuan.configuration_hunyuan import HunYuanConfig
    from .hunyuan.hunyuan import HunYuanMoEV1ForCausalLM

    with torch.device("meta"):  # shapes only: the 80 B model costs no memory and ~4 s
        model = HunYuanMoEV1ForCausalLM(HunYuanConfig(**json.loads(config_json)))
    total = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    linears, others = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append((name, module.in_features, module.out_features))
        elif name:
            others.append(name)
    return total, tuple(linears), tuple(others)


def _matches(name: str, target: str) -> bool:
    """PEFT's rule for a list of target names: the module's name is the target or ends in '.target'."""
    return name == target or name.endswith("." + target)


def count_parameters(model_config: dict, targets: list[str], r: int) -> ParamCount:
    try:
        total, linears, others = _meta_linears(json.dumps(model_config, sort_keys=True))
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise UserError(f"the model cannot be built from config.json ({type(e).__name__}: {e})",
                        where="config.json", fix="restore the model folder's original config.json") from e
    lora, per_target, not_linear = 0, {}, []
    for target in targets:
        hits = [(n, i, o) for n, i, o in linears if _matches(n, target)]
        per_target[target] = len(hits)
        lora += sum(r * (i + o) for _, i, o in hits)
        if not hits and any(_matches(n, target) for n in others):
            not_linear.append(target)
    unmatched = [t for t, n in per_target.items() if n == 0]
    if unmatched:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n, _, _ in linears})
        hints = []
        for t in unmatched:
            kind = "matches modules that are not nn.Linear" if t in not_linear else "matches no module"
            close = difflib.get_close_matches(t.rsplit(".", 1)[-1], suffixes, n=1)
            hints.append(f"'{t}' {kind}" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise UserError("LoRA target(s) " + "; ".join(hints) + f"; the model's Linear layers are named "
                        f"{', '.join(suffixes)}", where="lora.target_modules",
                        fix="correct lora.target_modules (or pick lora.preset: tutorial / attention / attention_shared)")
    from .scale import skipped_by_quantization

    quantizable = sum(i * o for n, i, o in linears if not skipped_by_quantization(n))
    moe_block = sum(i * o for n, i, o in linears if ".layers.0.mlp." in n)
    return ParamCount(total=total, lora=lora, per_target=per_target, quantizable=quantizable, moe_block=moe_block)


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
        raise UserError(f"no tokenized dataset in {data_dir}", where="run.output_dir",
                        fix="run `make dataset` with the same CONFIG / OUTPUT_DIR first")
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

    # Tokenized under other settings: training would silently use the old examples.
    stale = [f"data.{k} was {stats.get(k)!r} when tokenized, the config now says {getattr(cfg.data, k)!r}"
             for k in ("max_length", "answer_tags", "system_prompt") if stats.get(k) != getattr(cfg.data, k)]
    if (cfg.data.eval_ratio > 0) != ("eval" in splits):
        stale.append(f"data.eval_ratio is {cfg.data.eval_ratio} but the dataset has splits {sorted(splits)}")
    if stale:
        raise UserError("the tokenized dataset does not match the config: " + "; ".join(stale), where=str(data_dir),
                        fix="run `make dataset` with this CONFIG again")
    detail = (f"{data_dir}: {stats['examples']:,} examples ({', '.join(f'{k} {v:,}' for k, v in splits.items())}), "
              f"tokens max {stats['tokens']['max']}, from {stats['source']}")
    return detail, stats


def check_raw_dataset(cfg: Config) -> tuple[Status, str, int | None]:
    """Before `make dataset`: the raw file, read and validated as the dataset stage will read it."""
    from .records import check_sha256, read_records

    path = Path(cfg.data.path)
    if not path.exists():
        if cfg.data.url:
            return "todo", f"{path} not downloaded yet: `make dataset` fetches {cfg.data.url}", None
        raise UserError(f"dataset file {path} does not exist", where="data.path",
                        fix="set DATA=/path/to/file.json(l), or data.url in the config")
    check_sha256(path, cfg.data.sha256, str(path))
    records, report = read_records(path, drop_duplicates=cfg.data.drop_duplicates)
    note = "; not tokenized yet: run `make dataset`"
    return "ok", f"{path}: {len(records):,} valid records ({report.format}){note}", len(records)


# ---------------------------------------------------------------------------------------------
# disk and memory estimates


def expected_steps(cfg: Config, examples: int | None) -> int | None:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    if examples is None:
        return None
    # The Trainer's count (4.51): optimizer steps per epoch = batches // accumulation, at least 1.
    batches = math.ceil(examples / cfg.train.per_device_train_batch_size)
    return math.ceil(max(batches // cfg.train.gradient_accumulation_steps, 1) * cfg.train.num_train_epochs)


def checkpoint_bytes(params: ParamCount, tokenizer_bytes: int) -> int:
    adapter = params.lora * 4  # PEFT keeps (and saves) LoRA weights in fp32
    optimizer = params.lora * 4 * 3  # fp32 weights + Adam m, v
    return adapter + optimizer + tokenizer_bytes


def disk_needed(cfg: Config, per_checkpoint: int, adapter_bytes: int, steps: int | None) -> tuple[int, int]:
    """(bytes, checkpoints counted)."""
    expected = steps // cfg.train.save_steps + 1 if steps is not None else 1  # + 1: a SIGTERM save
    kept = cfg.train.save_total_limit
    n = min(expected, kept + 1) if kept else expected  # the Trainer deletes the oldest after writing the next
    return n * per_checkpoint + adapter_bytes, n


def estimate_memory(model_config: dict, params: ParamCount, dtype_bytes: int, tokens: int,
                    gradient_checkpointing: bool, gpus: int, *, zero3_processes: int = 0,
                    offload_param: bool = False, nf4: bool = False) -> MemoryEstimate:
    """The whole run's memory; with zero3_processes, what ONE of those processes' GPU holds."""
    from .scale import NF4_BYTES_PER_PARAM

    hidden, layers = model_config["hidden_size"], model_config["num_hidden_layers"]
    per_layer = hidden * tokens * dtype_bytes  # the layer input kept for recomputation
    if not gradient_checkpointing:
        per_layer *= 37  # rough: attention + the 8 routed and the shared expert's intermediates
    if nf4:
        weights = params.quantizable * NF4_BYTES_PER_PARAM + (params.total - params.quantizable) * 4
    else:
        weights = params.total * dtype_bytes
    shards = max(zero3_processes, 1)
    return MemoryEstimate(
        weights=0 if offload_param else math.ceil(weights / shards),  # ZeRO-3: 1/N of every tensor per GPU
        lora_and_optimizer=math.ceil(params.lora * 4 * 4 / shards),  # fp32 weights, grads, Adam m, v
        activations=per_layer * layers,
        logits=tokens * model_config["vocab_size"] * 4 * 2,  # fp32 logits and their gradient
        overhead=CUDA_OVERHEAD_BYTES * gpus,
        gathered=2 * params.moe_block * dtype_bytes if zero3_processes else 0,
        per_gpu_of=zero3_processes,
    )


def gpu_memory(only: int | None = None) -> list[tuple[str, int, int]]:
    """(name, free bytes, total bytes) of every visible GPU, or of GPU `only` (each query opens a CUDA
    context on that GPU for the life of the process: a ZeRO-3 rank must touch only its own)."""
    import torch

    out = []
    for i in ([only] if only is not None else range(torch.cuda.device_count())):
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


def check_memory(cfg: Config, model_config: dict, params: ParamCount, device: str, dtype, tokens: int
                 ) -> tuple[str, MemoryEstimate]:
    import torch

    from .runtime import launch

    dtype_bytes = torch.empty(0, dtype=dtype).element_size()
    gc = cfg.train.gradient_checkpointing
    run, nf4 = launch(), cfg.model.quantization == "nf4"
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0")) if run.zero3 and "LOCAL_RANK" in os.environ else None
        gpus = gpu_memory(local) if local is not None else gpu_memory()
        if not gpus:
            raise UserError("no CUDA GPU is visible", where="model.device",
                            fix="check `nvidia-smi` / CUDA_VISIBLE_DEVICES, or set model.device: cpu")
        if run.zero3:  # one process per GPU, each holding 1/N: this process's own GPU
            used = gpus[:1]  # this rank's GPU (launched), or the first (`make check LAUNCH=zero3`)
            est = estimate_memory(model_config, params, dtype_bytes, tokens, gc, 1,
                                  zero3_processes=run.processes, offload_param=run.offload_param)
        else:
            used = gpus if cfg.model.device_map else gpus[:1]  # without device_map everything goes to cuda:0
            est = estimate_memory(model_config, params, dtype_bytes, tokens, gc, len(used), nf4=nf4)
        free = sum(f for _, f, _ in used)
        where = ", ".join(f"{name} {human_bytes(f)} free of {human_bytes(t)}" for name, f, t in used)
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise UserError(f"{gpus[0][0]} has no bfloat16 support", where="train.bf16",
                            fix="use an Ampere or newer GPU (A100, H100, H200, RTX 30xx+); float32 would need "
                                "twice the memory")
        if est.total > free:
            raise UserError(f"{len(used)} GPU(s) with {human_bytes(free)} free, these settings need {est.describe()}",
                            where=f"model.device_map={cfg.model.device_map!r}, batch "
                                  f"{cfg.train.per_device_train_batch_size} x {tokens // cfg.train.per_device_train_batch_size} tokens",
                            fix="make more GPUs visible (device_map: auto spreads the layers over them) or run ZeRO-3 "
                                "over more processes (`make train LAUNCH=zero3 NPROC=<GPUs>`) or QLoRA "
                                "(CONFIG=configs/huanhuan_qlora.yaml), free the GPUs other processes hold, or lower "
                                "train.per_device_train_batch_size / data.max_length")
        return f"{len(used)} GPU(s): {where}; {str(dtype).replace('torch.', '')} needs {est.describe()}", est
    est = estimate_memory(model_config, params, dtype_bytes, tokens, gc, 0)
    ram = available_ram()
    if ram is not None and est.total > ram:
        raise UserError(f"on the CPU, in {str(dtype).replace('torch.', '')}, these settings need {est.describe()} of RAM; "
                        f"{human_bytes(ram)} is available", where=f"model.device={cfg.model.device!r}",
                        fix="train this model on GPUs (model.device: cuda; check `nvidia-smi`); the CPU is for the "
                            "stand-in (CONFIG=configs/demo.yaml)")
    return (f"cpu, {str(dtype).replace('torch.', '')}: needs {est.describe()}"
            + (f", {human_bytes(ram)} RAM available" if ram else "")), est


def check_output(cfg: Config, needed: int | None, basis: str) -> str:
    out = cfg.output_dir
    anchor = out
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"{anchor} is a file, so the output folder {out} cannot be created", where="run.output_dir",
                        fix="pass another OUTPUT_DIR")
    try:  # os.access is not enough: read-only mounts, root on NFS, ...
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write in {anchor} ({e.strerror})", where="run.output_dir",
                        fix="pass an OUTPUT_DIR on a writable disk, or fix the folder's permissions") from e
    free = shutil.disk_usage(anchor).free
    if needed is not None and free < needed:
        raise UserError(f"{human_bytes(free)} free at {anchor.resolve()}, "
                        f"the run needs about {human_bytes(needed)} ({basis})",
                        where="run.output_dir",
                        fix="free some space, pass an OUTPUT_DIR on a bigger disk, or set train.save_total_limit "
                            "(checkpoints kept)")
    needs = f", ~{human_bytes(needed)} needed ({basis})" if needed is not None else ""
    return f"{out} writable, {human_bytes(free)} free{needs}"


def leftovers(out: Path) -> list[Path]:
    """Temporary siblings a killed stage left behind (never read by any stage; safe to delete)."""
    if not out.is_dir():
        return []
    return sorted({p for pattern in LEFTOVER_PATTERNS for p in out.glob(pattern)})


# ---------------------------------------------------------------------------------------------
# the preflight


class _Table:
    def __init__(self):
        self.rows: list[Row] = []
        self.errors: list[tuple[str, UserError]] = []

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """fn returns a detail, (detail, value) or (status, detail, value); a UserError is a FAIL row."""
        try:
            result = fn()
        except UserError as e:
            self.fail(name, e)
            return None
        if isinstance(result, str):
            result = (result, None)
        status, detail, value = result if len(result) == 3 else ("ok", *result)
        self.add(name, status, detail)
        return value

    def add(self, name: str, status: Status, detail: str) -> None:
        self.rows.append(Row(name, status, detail))

    def fail(self, name: str, error: UserError) -> None:
        self.add(name, "FAIL", error.what)
        self.errors.append((name, error))


def format_table(rows: list[Row]) -> str:
    width = max(len(r.name) for r in rows)
    return "\n".join(f"  {r.name:<{width}}  {r.status:<4}  {r.detail}" for r in rows)


def preflight(cfg: Config, stage: Literal["check", "train"] = "check", *, echo: bool = True) -> Plan:
    """Run every check; print the table; raise one UserError naming every failure.

    Reads only (train.run acts on what it reports). stage "train": the tokenized dataset must exist.
    """
    from .patch import patch_folder
    from .runtime import check_combination, launch, pick_device, pick_dtype

    main_process = os.environ.get("RANK", "0") == "0"  # accelerate launch sets RANK per process
    echo = echo and main_process
    t = _Table()
    source = cfg.source or "(defaults)"
    t.add("config", "ok", f"{source}: every key and type valid")

    # -- model folder, patch, parameters
    folder = Path(cfg.model.dir)
    model_config = None
    config_path = folder / "config.json"
    try:
        model_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
    except (OSError, ValueError):
        model_config = None  # the model-folder row names it
    t.run("model folder", lambda: check_model_folder(folder))
    if not cfg.train.gradient_checkpointing:
        t.add("patch", "skip", "gradient checkpointing is off: the undefined `logger` is never reached")
    elif cfg.model.moe_impl == "fast":
        t.add("patch", "skip", "model.moe_impl is fast: the project's own model code runs, not the folder's hunyuan.py")
    elif model_config is None or not model_config.get("auto_map"):
        t.add("patch", "skip", "needs the model folder's config.json with auto_map")
    else:
        def _patch() -> str:
            result = patch_folder(folder, check_only=True)
            if result.needed:
                raise UserError(f"hunyuan.py uses `logger` without defining it (line(s) "
                                f"{', '.join(map(str, result.lines))}), so training with gradient checkpointing "
                                "would crash with NameError", where=str(result.path), fix="run `make patch`")
            return f"{result.path.name} defines `logger`"
        t.run("patch", _patch)

    params = None
    if model_config is None:
        t.add("parameters", "skip", "needs the model folder's config.json")
    else:
        def _params():
            p = count_parameters(model_config, cfg.lora.targets(), cfg.lora.r)
            modules = sum(p.per_target.values())
            return (f"{p.total:,} in the model (from config.json, meta device); LoRA r={cfg.lora.r} on "
                    f"{modules:,} Linear layers: {p.lora:,} trainable ({100 * p.lora / (p.total + p.lora):.3f} % "
                    f"of {p.total + p.lora:,})"), p
        params = t.run("parameters", _params)

    # -- dataset (the tokenized one when it exists or train needs it, else the raw file)
    stats = None
    if stage == "train" or (cfg.output_dir / "data" / "stats.json").is_file():
        stats = t.run("dataset", lambda: check_tokenized(cfg))
        examples = stats["splits"].get("train") if stats else None
    else:
        records = t.run("dataset", lambda: check_raw_dataset(cfg))
        examples = math.floor(records * (1 - cfg.data.eval_ratio)) if records is not None else None

    # -- resume
    def _resume():
        point = resume_point(cfg)
        notes = incomplete_notes(point)
        return ("warn" if notes else "ok"), "; ".join([point.detail] + notes), point

    resume = t.run("resume", _resume)

    steps = expected_steps(cfg, examples)
    if resume and resume.path and steps is not None and resume.step >= steps:
        t.add("resume", "warn", f"{Path(resume.path).name} is already at the last step ({steps}): training is "
                                "complete; `make train` changes nothing")

    # -- output folder and disk
    needed, basis = None, ""
    if params is not None:
        tokenizer_bytes = sum((folder / n).stat().st_size for n in ("hy.tiktoken", "tokenizer_config.json",
                                                                     "tokenization_hy.py") if (folder / n).is_file())
        per_ckpt = checkpoint_bytes(params, tokenizer_bytes)
        needed, n = disk_needed(cfg, per_ckpt, params.lora * 4, steps)
        basis = (f"{n} checkpoint(s) x {human_bytes(per_ckpt)} + adapter" + ("" if steps is not None else
                                                                       "; steps unknown until the dataset is read"))
    t.run("output", lambda: check_output(cfg, needed, basis))
    stale = leftovers(cfg.output_dir)
    # X.old without X: killed between "old aside" and "new in place"; X.old is the last complete X.
    orphans = [p for p in stale if p.suffix == ".old" and not p.with_suffix("").exists()]
    if orphans:
        t.add("leftovers", "warn", "; ".join(f"{p} is the previous complete {p.stem} (a run was killed while "
                                             f"replacing it): `mv {p} {p.with_suffix('')}` restores it"
                                             for p in orphans))
    if set(stale) - set(orphans):
        t.add("leftovers", "warn", f"{', '.join(p.name for p in stale if p not in orphans)} in {cfg.output_dir}: "
                                   "temporary files of a killed run, never read; safe to delete")

    # -- device and memory
    device = dtype = None
    try:
        device = pick_device(cfg)
        dtype = pick_dtype(cfg, device)
    except UserError as e:
        t.fail("memory", e)
    if device is not None:
        def _launch() -> str:
            run = launch()
            check_combination(cfg, run)
            if cfg.model.quantization == "nf4" and device != "cuda":
                raise UserError("model.quantization is nf4 (QLoRA) but there is no CUDA GPU: bitsandbytes' 4-bit "
                                "layers run on CUDA only", where="model.quantization",
                                fix="run QLoRA on a GPU machine, or set model.quantization: none (on the CPU only the "
                                    "stand-in trains: CONFIG=configs/demo.yaml)")
            how = (f"DeepSpeed ZeRO-3 over {run.processes} processes (weights sharded 1/{run.processes} per GPU"
                   + (", offloaded to host RAM" if run.offload_param else "") + "; MoE blocks are leaf modules)"
                   if run.zero3 else f"one process, {device}"
                   + (f", device_map={cfg.model.device_map!r}" if device == "cuda" and cfg.model.device_map else ""))
            return how + (", base weights NF4 (router wg and lm_head bf16)" if cfg.model.quantization == "nf4" else "")
        t.run("launch", _launch)
    memory = None
    if device is not None:
        if params is None or model_config is None:
            t.add("memory", "skip", "needs the parameter count")
        else:
            longest = cfg.data.max_length
            if stats:
                longest = min(longest, stats["tokens"]["max"])
            tokens = cfg.train.per_device_train_batch_size * longest
            memory = t.run("memory", lambda: check_memory(cfg, model_config, params, device, dtype, tokens))

    # -- secrets
    masked = mask_git_remote(apply=False)
    if masked:
        t.add("secrets", "warn", f"the git remote URL carries a credential; SwanLab records that URL, so "
                                 f"`make train` masks it for its process ({masked})")

    plan = Plan(device=device, dtype=dtype, resume=resume, rows=t.rows, params=params, memory=memory,
                disk_bytes=needed)
    if echo:
        print(f"preflight ({stage}, {source}):\n{format_table(t.rows)}", flush=True)
    if len(t.errors) == 1:
        raise t.errors[0][1]
    if t.errors:
        raise UserError(f"{len(t.errors)} preflight checks failed: "
                        + " ".join(f"({i}) {name}: {e.paragraph()}" for i, (name, e) in enumerate(t.errors, 1)),
                        fix="fix each problem as its own 'Fix:' says, then run `make check` again")
    return plan


def run(cfg: Config) -> Plan:
    """`make check`: the table, exit 2 (via the script) on any failure."""
    plan = preflight(cfg, stage="check")
    print("preflight passed: nothing was loaded; `make train` runs the same checks first")
    return plan
