"""The probe: the config's real training run on random weights, measured, before any download.

    make probe CONFIG=configs/huanhuan_qlora.yaml [PROBE_STEPS=20] [PROBE_LAYERS=8] \
               [PROBE_LENGTHS=../shared/data/huanhuan_token_lengths.json] [PROBE_COMPARE=1]

What runs is `make train`'s own code: training.py's TrainingArguments, collator, Trainer and LoRA
(targets, quantisation, MoE implementation as configured), on a model of the real architecture
(the model folder's config.json, else the real Hunyuan-A13B config) with random weights created
where they live (hunyuan/random_init.py), for PROBE_STEPS optimizer steps on the config's
dataset lengths. Nothing is saved but the report: outputs/<run>/probe/probe.json + probe.md with
per-GPU peak memory (allocated, reserved, nvidia-smi), warm-up and steady-state seconds per
optimizer step, samples/s, real (non-pad) tokens/s, MFU against a bf16 GEMM rate measured in the
same run, the ETA of the configured run, and a fits / headroom / does-not-fit verdict per card size.
PROBE_COMPARE=1 then probes the same config with model.moe_impl: upstream (unpacked), so one command
gives the speed-up over the tutorial's MoE path on this machine.

Lengths, first that applies (probe.json says which): PROBE_LENGTHS (a JSON file with a "tokens"
list and optionally "answer_tokens", or a plain list); the config's tokenized dataset
(outputs/<run>/data from `make dataset`: its real samples); the raw dataset (data.path) through the
model folder's tokenizer, else through the stand-in's. Token ids are random where only lengths
are known (the work per token does not depend on them).
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import check_replaceable, staging_dir, write_json, write_text
from .callbacks import BatchCounter
from .config import Config
from .errors import UserError
from .estimate import GIB, active_parameters
from .hunyuan.fast_moe import nf4_dequantizer
from .model_folder import check_config
from .modeling import load_random_model, load_tokenizer
from .preflight import check_optimizer
from .runtime import Placement, git_commit, package_versions, placement
from .training import attach_lora, build_trainer, lora_config, training_arguments

CARD_SIZES_GB = (24, 48, 80, 141)
HEADROOM = 0.10  # "fits with headroom": at least 10 % of the card left over the measured peak


# ---------------------------------------------------------------------------------------------
# lengths and samples


def _lengths_file(path: Path) -> tuple[list[int], list[int] | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(
            f"cannot read token lengths from {path}: {e}",
            where="PROBE_LENGTHS",
            fix='give a JSON file with a "tokens" list of per-sample token counts',
        ) from e
    tokens = data.get("tokens") if isinstance(data, dict) else data
    answers = data.get("answer_tokens") if isinstance(data, dict) else None
    if not (isinstance(tokens, list) and tokens and all(isinstance(n, int) and n > 1 for n in tokens)):
        raise UserError(
            f"{path} holds no list of token counts (each > 1)",
            where="PROBE_LENGTHS",
            fix='give a JSON file {"tokens": [61, 48, ...]} or a plain list',
        )
    return tokens, answers if isinstance(answers, list) and len(answers) == len(tokens) else None


def _synthetic(lengths: list[int], answers: list[int] | None, vocab: int, seed: int) -> list[dict]:
    """Samples of the given lengths with random ids (below the special tokens at the top of the
    vocabulary); labels on the last answer_tokens of each (all but the first token without them)."""
    g = torch.Generator().manual_seed(seed)
    top = int(0.9 * vocab)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, top, (n,), generator=g).tolist()
        a = min(answers[i], n - 1) if answers else n - 1
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * (n - a) + ids[n - a :]})
    return out


def _tokenizer(cfg: Config, scratch: Path):
    """The model folder's tokenizer, else the stand-in's (built into scratch); and which it is."""
    folder = Path(cfg.model.dir)
    if (folder / "tokenizer_config.json").is_file():
        return load_tokenizer(folder), f"the model folder's ({folder})"
    from . import stand_in

    return load_tokenizer(stand_in.build(scratch / "stand-in")), "the stand-in's (no model folder)"


def probe_samples(cfg: Config, lengths_file: str | None, vocab: int, scratch: Path):
    """(train samples, records in the configured run's dataset, tokenizer, where the lengths came from)."""
    from datasets import load_from_disk

    tokenizer, which = _tokenizer(cfg, scratch)
    if lengths_file:
        tokens, answers = _lengths_file(Path(lengths_file))
        return (
            _synthetic(tokens, answers, vocab, cfg.run.seed),
            len(tokens),
            tokenizer,
            f"token lengths from {lengths_file} (random ids)",
        )
    tokenized = cfg.output_dir / "data"
    if (tokenized / "dataset_dict.json").is_file():
        train = load_from_disk(str(tokenized))["train"]
        samples = [{k: row[k] for k in ("input_ids", "attention_mask", "labels")} for row in train]
        return samples, len(samples), tokenizer, f"the config's tokenized dataset ({tokenized})"
    from .prompt import training_samples
    from .records import read_records

    path = Path(cfg.data.path)
    if not path.is_file():
        raise UserError(
            f"no dataset to take lengths from: {tokenized} (make dataset) and {path} (data.path) do not exist",
            where="data.path",
            fix="run `make dataset`, or give PROBE_LENGTHS=<a JSON list of token counts>",
        )
    records, _ = read_records(path, drop_duplicates=cfg.data.drop_duplicates)
    samples = [s for r in records for s in training_samples(tokenizer, r, cfg)[0]]
    for s in samples:
        s.pop("truncated", None)
    return samples, len(samples), tokenizer, f"{path} through {which} tokenizer"


# ---------------------------------------------------------------------------------------------
# measuring


class StepClock:
    """Trainer callback: the time, samples, real (non-pad) tokens and loss of every optimizer step, and where the
    time went.

    A step runs from the end of the step before to its own end. On CUDA the marks are events on the GPU's
    timeline, read when training ends: the clock adds no host sync, so the host queues the next step while the
    GPU still runs this one, as in `make train`; on the CPU they are host times. The samples and tokens are
    callbacks.BatchCounter's, as SwanLab's perf/* count them; the loss is the sum of the micro-steps' (note_loss).
    Phases, from marks at the Trainer's callbacks:
      before: the step before's end to this one's begin; on the GPU the time it waits for the host (the next
        batches fetched and collated, the first kernels queued);
      micro_steps: every micro-step's forward and backward, and the gradient clipping;
      optimizer: optimizer.step();
      after: the scheduler and zero_grad, up to the step's end.
    """

    PHASES = ("before", "micro_steps", "optimizer", "after")
    MARKS = ("begin", "optimizer", "after", "end")

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, **kwargs):
                clock.counter.attach(model)
                clock.start = clock.now()

            def on_step_begin(self, args, state, control, **kwargs):
                clock.marks["begin"] = clock.now()

            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                clock.marks["optimizer"] = clock.now()

            def on_optimizer_step(self, args, state, control, **kwargs):
                clock.marks["after"] = clock.now()

            def on_step_end(self, args, state, control, **kwargs):
                clock.marks["end"] = clock.now()
                loss = torch.stack(clock.losses).sum() if clock.losses else None
                clock.pending.append((clock.marks, clock.counter.take_on_device(), loss))
                clock.marks, clock.losses = {}, []

            def on_train_end(self, args, state, control, **kwargs):
                clock.resolve()
                clock.counter.detach()

        self.callback = _Callback()
        self.counter = BatchCounter()
        self.steps: list[dict] = []
        self.start = None
        self.marks: dict = {}
        self.losses: list[torch.Tensor] = []
        self.pending: list[tuple] = []

    def note_loss(self, loss: torch.Tensor) -> None:
        """A micro-step's loss as the Trainer's training_step returns it (kept on the device)."""
        self.losses.append(loss.detach().float())

    @staticmethod
    def now():
        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @staticmethod
    def sync() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @staticmethod
    def seconds(a, b) -> float:
        if isinstance(a, float):
            return b - a
        return a.elapsed_time(b) / 1e3

    def resolve(self) -> None:
        """The pending steps' seconds, counts, losses and phases (one sync, at the end of training)."""
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        last = self.start
        for marks, (samples, tokens), loss in self.pending:
            step = {"s": self.seconds(last, marks["end"]), "samples": int(samples), "tokens": int(tokens)}
            if loss is not None:
                step["loss"] = float(loss)
            phases = self.phases(last, marks)
            if phases:
                step["phases"] = phases
            self.steps.append(step)
            last = marks["end"]
        self.pending = []

    def phases(self, last, marks: dict) -> dict[str, float] | None:
        """Seconds per phase of the step that began after `last`; None when a mark is missing."""
        if set(marks) != set(self.MARKS):
            return None
        cuts = [last] + [marks[k] for k in self.MARKS]
        return {k: round(self.seconds(a, b), 4) for k, a, b in zip(self.PHASES, cuts[:-1], cuts[1:], strict=True)}


class SmiPeak:
    """nvidia-smi's memory.used per GPU, sampled every 250 ms in the background: the peak (MiB)."""

    def __init__(self):
        self.peak: dict[int, int] = {}
        self.proc = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits", "-lms", "250"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        except OSError:
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
                i, mib = int(parts[0]), int(parts[1])
                self.peak[i] = max(self.peak.get(i, 0), mib)

    def stop(self) -> dict[int, int]:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        return dict(self.peak)


class StepProfile:
    """Trainer callback: torch.profiler over one optimizer step (an extra step after the timed ones):
    kernels launched, GPU busy time, the top kernels, and the share of bitsandbytes' dequantisation."""

    def __init__(self, step: int):
        from transformers import TrainerCallback

        outer = self
        self.result: dict | None = None

        class _Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == step and outer.prof is None:
                    from torch.profiler import ProfilerActivity, profile

                    StepClock.sync()
                    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                    outer.prof = profile(activities=acts)
                    outer.prof.__enter__()

            def on_step_end(self, args, state, control, **kwargs):
                if outer.prof is not None and outer.result is None:
                    StepClock.sync()
                    outer.prof.__exit__(None, None, None)
                    outer.result = outer.summary()

        self.prof = None
        self.callback = _Callback()

    def summary(self) -> dict:
        kernels = [
            e
            for e in self.prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False)
            and "#" not in e.name
        ]
        by_name: dict[str, list] = {}
        for e in kernels:
            entry = by_name.setdefault(e.name[:90], [0.0, 0])
            entry[0] += e.device_time / 1e3  # ms
            entry[1] += 1
        busy_ms = sum(v[0] for v in by_name.values())
        dequant = sum(v[0] for n, v in by_name.items() if "equant" in n)
        top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:15]
        # the host side: operators by their own CPU time (Python, dispatch, autograd, launches)
        ops = sorted(self.prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:15]
        host = [[a.key[:90], round(a.self_cpu_time_total / 1e3, 3), a.count] for a in ops]
        return {
            "kernels": len(kernels),
            "busy_ms": round(busy_ms, 2),
            "dequantize_ms": round(dequant, 2),
            "top": [[n, round(ms, 3), c] for n, (ms, c) in top],
            "host_top": host,
            "host_ms": round(sum(a.self_cpu_time_total for a in self.prof.key_averages()) / 1e3, 2),
            **self.idle(kernels),
        }

    def idle(self, kernels: list) -> dict:
        """Where the GPU waited in the profiled step (gpu_idle), segmented at the host's first backward op and
        the optimizer step; the largest gaps with the host op that ran through each. The cuts are host times: where
        the host runs ahead of the GPU (a CUDA-graph replay) the segments say little, the sums per kernel still hold."""
        host = [e for e in self.prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
        if not kernels or not host:
            return {}
        window = (min(e.time_range.start for e in host), max(e.time_range.end for e in host + kernels))
        backward = [e.time_range.start for e in host if e.name.startswith("autograd::engine::evaluate_function")]
        optimizer = [e.time_range for e in host if e.name.startswith("Optimizer.step#")]
        cuts = [("forward", window[0])]
        if backward:
            cuts.append(("backward", min(backward)))
        if optimizer:
            cuts += [("optimizer", min(r.start for r in optimizer)), ("after", max(r.end for r in optimizer))]
        cuts.sort(key=lambda c: c[1])
        return gpu_idle([(k.time_range.start, k.time_range.end, k.name) for k in kernels], window, cuts, host)


def gpu_idle(kernels: list[tuple], window: tuple[float, float], cuts: list[tuple[str, float]], host=()):
    """GPU idle time (ms) per segment of `window` (microseconds, as the profiler's time ranges): the time no kernel
    runs. kernels: (start, end, name). cuts: (name, start) of each segment in time order, the first at window[0].
    host: profiler events (name, time_range); each of the 8 largest gaps is named by the innermost one spanning
    its middle, which is what kept the GPU waiting (a sync, the data, Python). The idle time is also summed by the
    kernel that ends each gap (idle_before_kernel, the 10 largest sums): many short gaps before the same kernel
    point at its launch, not at the host."""
    gaps, t, before = [], window[0], {}
    for start, end, name in sorted(kernels):
        if start > t:
            gaps.append((t, start))
            entry = before.setdefault(name[:70], [0.0, 0])
            entry[0] += (start - t) / 1e3
            entry[1] += 1
        t = max(t, end)
    if window[1] > t:
        gaps.append((t, window[1]))
    bounds = [c[1] for c in cuts[1:]] + [window[1]]
    segments = {}
    for (name, lo), hi in zip(cuts, bounds, strict=True):
        segments[name] = round(sum(max(0.0, min(b, hi) - max(a, lo)) for a, b in gaps) / 1e3, 2)
    largest = []
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:8]:
        mid = (a + b) / 2
        spanning = [e for e in host if e.time_range.start <= mid <= e.time_range.end]
        inner = max(spanning, key=lambda e: e.time_range.start).name[:60] if spanning else "-"
        largest.append([round((b - a) / 1e3, 3), inner])
    return {
        "idle_ms": round(sum(b - a for a, b in gaps) / 1e3, 2),
        "idle_gaps": len(gaps),
        "idle_by_segment_ms": segments,
        "idle_largest": largest,
        "idle_before_kernel": [
            [n, round(ms, 2), c] for n, (ms, c) in sorted(before.items(), key=lambda kv: -kv[1][0])[:10]
        ],
    }


def gemm_rate(device: str) -> tuple[float, str]:
    """FLOP/s of a square matrix product measured now: bf16 8192^3 on CUDA, float32 1024^3 on the CPU."""
    n, dtype = (8192, torch.bfloat16) if device == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    t0 = StepClock.sync()
    reps = 10
    for _ in range(reps):
        a @ b
    seconds = StepClock.sync() - t0
    return reps * 2 * n**3 / seconds, f"{str(dtype).replace('torch.', '')} {n}^3"


def verdicts(peak_gib: float) -> dict[str, str]:
    """Per card size (nominal GB ~ GiB usable, less 2 % for the driver): fits with headroom / fits / does not fit."""
    out = {}
    for gb in CARD_SIZES_GB:
        usable = 0.98 * gb
        out[f"{gb}GB"] = (
            "fits with headroom"
            if peak_gib <= (1 - HEADROOM) * usable
            else "fits"
            if peak_gib <= usable
            else "does not fit"
        )
    return out


# ---------------------------------------------------------------------------------------------
# the stage


def add_arguments(parser) -> None:
    # make probe PROBE_STEPS=... arrives in the environment (make exports command-line variables)
    parser.add_argument(
        "--steps",
        type=int,
        default=int(os.environ.get("PROBE_STEPS") or 20),
        help="optimizer steps to run (PROBE_STEPS, default 20)",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=int(os.environ["PROBE_LAYERS"]) if os.environ.get("PROBE_LAYERS") else None,
        help="decoder layers to build (PROBE_LAYERS; default: all of the config)",
    )
    parser.add_argument(
        "--lengths",
        default=os.environ.get("PROBE_LENGTHS") or None,
        help="JSON of per-sample token counts (PROBE_LENGTHS), e.g. ../shared/data/huanhuan_token_lengths.json",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        default=os.environ.get("PROBE_COMPARE") == "1",
        help="then the same probe with moe_impl upstream, unpacked, for a ratio (PROBE_COMPARE=1)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        default=os.environ.get("PROBE_PROFILE") == "1",
        help="profile one extra step: kernels, GPU busy, dequantisation share (PROBE_PROFILE=1)",
    )
    parser.add_argument(
        "--no-generation",
        dest="generation",
        action="store_false",
        default=os.environ.get("PROBE_GENERATION") != "0",
        help="training only: skip the generation part, which builds the model a second time (PROBE_GENERATION=0)",
    )


def run(
    cfg: Config,
    *,
    steps: int = 20,
    layers: int | None = None,
    lengths: str | None = None,
    profile: bool = False,
    compare: bool = False,
    generation: bool = True,
) -> Path:
    where = placement(cfg)
    if where.launch.deepspeed:
        raise UserError(
            "make probe runs one process: ZeRO-3 (LAUNCH=zero3) is not probed yet",
            where="LAUNCH",
            fix="run `make probe` without LAUNCH (one GPU, or NF4 with configs/huanhuan_qlora.yaml)",
        )
    check_optimizer(cfg)  # the preflight's optimizer row: the probe trains with it
    if steps < 2:
        raise UserError(
            f"PROBE_STEPS={steps}: at least 2 optimizer steps are needed (warm-up and steady state)",
            where="PROBE_STEPS",
            fix="PROBE_STEPS=20",
        )
    if (Path(cfg.model.dir) / "config.json").is_file():  # else the real A13B architecture (no folder yet)
        # upstream (and the PROBE_COMPARE baseline) runs the folder's own code
        check_config(Path(cfg.model.dir), code=cfg.model.moe_impl == "upstream" or compare)
    if compare and cfg.model.moe_impl != "fast":
        raise UserError(
            "PROBE_COMPARE=1 measures the config against the per-expert upstream path: the config "
            "already runs model.moe_impl: upstream",
            where="PROBE_COMPARE",
            fix="use it with a fast config (configs/huanhuan_fast.yaml, configs/huanhuan_qlora.yaml)",
        )
    out = cfg.output_dir / "probe"
    check_replaceable(out, where="run.output_dir")
    report = measure(cfg, where, steps, layers, lengths, profile)
    prompt_tokens = report.pop("prompt_tokens")
    if generation:
        report.update(measure_generation(cfg, where, layers, prompt_tokens, report["run_records"], profile))
    report.update(load_times(cfg, report, *read_rate(cfg)))
    if compare:
        report["baseline"] = baseline(cfg, where, steps, layers, lengths)
        report["speedup_vs_baseline"] = round(report["samples_per_s"] / report["baseline"]["samples_per_s"], 2)
    with staging_dir(out) as tmp:
        write_json(tmp / "probe.json", report)
        write_text(tmp / "probe.md", markdown(report))
    print(markdown(report))
    print(f"wrote {out}/probe.json and probe.md")
    return out


def baseline(cfg: Config, where: Placement, steps: int, layers: int | None, lengths: str | None) -> dict:
    """The same probe with model.moe_impl: upstream and no packing (upstream cannot keep packed samples
    apart): the tutorial's MoE path at the same samples per step, quantisation and LoRA, for a ratio."""
    import copy
    import gc

    base = copy.deepcopy(cfg)
    base.model.moe_impl, base.train.packing = "upstream", False
    gc.collect()  # the first probe's model is gone: give its memory back before building the second
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    r = measure(base, where, steps, layers, lengths, profile=False)
    keys = (
        "moe_impl",
        "code",
        "train",
        "steady_s_per_step",
        "warmup_s",
        "samples_per_s",
        "tokens_per_s",
        "peak_gib",
        "memory",
        "step_s",
        "loss_per_step",
    )
    return {k: r[k] for k in keys}


def measure(cfg: Config, where: Placement, steps: int, layers: int | None, lengths: str | None, profile: bool) -> dict:
    """One probe: build the random model, train `steps` optimizer steps through the Trainer, report."""
    device = where.device
    per_step = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps  # one process

    with tempfile.TemporaryDirectory(prefix="probe-") as scratch:
        scratch = Path(scratch)
        t0 = time.perf_counter()
        loaded = load_random_model(cfg, where, num_layers=layers)
        model = loaded.model
        init = dict(loaded.random_init, init_s=round(time.perf_counter() - t0, 2))
        samples, records, tokenizer, lengths_source = probe_samples(cfg, lengths, model.config.vocab_size, scratch)
        rng = random.Random(cfg.run.seed)
        order = list(range(len(samples)))
        rng.shuffle(order)
        need = (steps + profile) * per_step
        chosen = [samples[order[i % len(order)]] for i in range(need)]  # the Trainer shuffles again (seeded)

        from datasets import Dataset

        train = Dataset.from_list(chosen)
        model = attach_lora(cfg, model, where)
        trainable, total = model.get_nb_trainable_parameters()
        # profile: one more step after the timed ones, profiled (the profiler's overhead stays out of the timings)
        args = training_arguments(cfg, where, output_dir=scratch / "trainer", max_steps=steps + profile)
        args.save_strategy = "no"  # a probe keeps nothing but its report
        args.eval_strategy = "no"
        args.logging_steps = steps + profile  # one log, at the end: a log reads the loss, which waits for the GPU
        args.disable_tqdm = True
        clock = StepClock()
        profiler = StepProfile(steps) if profile else None
        callbacks = [clock.callback] + ([profiler.callback] if profiler else [])
        trainer = build_trainer(cfg, model, tokenizer, {"train": train}, args, callbacks)
        training_step = trainer.training_step

        def noted_training_step(*a, **k):
            loss = training_step(*a, **k)
            clock.note_loss(loss)
            return loss

        trainer.training_step = noted_training_step  # each step's loss, without the sync of a log per step
        rate, gemm_what = gemm_rate(device)
        if device == "cuda":
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        smi = SmiPeak() if device == "cuda" else None
        t_train = time.perf_counter()
        result = trainer.train()
        train_wall = time.perf_counter() - t_train
        smi_peak = smi.stop() if smi else {}

    report = summarize(
        cfg,
        Measurement(
            steps=clock.steps[:steps],
            per_step=per_step,
            records=records,
            gemm_rate=rate,
            gemm_what=gemm_what,
            init=init,
            lengths_source=lengths_source,
            device=device,
            trainable=trainable,
            total=total,
            train_wall_s=train_wall,
            smi_peak=smi_peak,
            active_params=active_parameters(model.get_base_model().config.to_dict()),
            loss=float(result.training_loss),
        ),
    )
    report["loss_per_step"] = [round(s["loss"], 4) for s in clock.steps[:steps] if "loss" in s]
    graphs = trainer.step_graphs
    if graphs is not None:  # train.cuda_graphs: how many micro-steps were replayed, of how many shapes
        report["cuda_graphs"] = {"shapes": len(graphs.seen), "graphs": len(graphs.graphs), "replays": graphs.replays}
        report["cuda_graphs"]["failed"] = graphs.failed
        report["cuda_graphs"]["cold_failures"] = sorted(set(graphs.cold_failures.values()))
    # the prompt a generation starts from: a sample without its answer (the tokens without labels)
    report["prompt_tokens"] = max(
        1, round(statistics.median(sum(1 for v in s["labels"] if v == -100) for s in samples))
    )
    if profiler is not None and profiler.result is not None:
        p = profiler.result
        report["profile"] = dict(
            p,
            busy_fraction_of_steady=round(p["busy_ms"] / 1e3 / report["steady_s_per_step"], 3),
            kernels_per_layer=round(p["kernels"] / report["layers"], 1),
        )
    return report


GEN_NEW_TOKENS = 48  # tokens generated per measurement (the first comes from the prefill)
# greedy with no stop token: every row generates exactly max_new_tokens, so the timed work is known
TIMED_GREEDY = {
    "do_sample": False,
    "temperature": None,
    "top_p": None,
    "top_k": None,
    "pad_token_id": 0,
    "eos_token_id": None,
}
GEN_BATCH_SIZE = 64  # the eval batch size measured when the config names none
TUTORIAL_EVAL_RATIO = 0.05  # the held-out share the ETA of `make eval` assumes when the config holds none out


def eval_batch_size(cfg: Config) -> int:
    return getattr(cfg.eval, "batch_size", None) or GEN_BATCH_SIZE


def _generate_timed(model, batch: int, prompt: int, new: int, seed: int) -> dict:
    """Greedy generate of `new` tokens for `batch` random prompts of `prompt` tokens: a warm-up of the same
    length (the static cache and the decode graphs are made there: its time is reported), then the time
    to first token (max_new_tokens=1) and the whole run; decode rate = the tokens after the first over
    the time after it."""
    vocab = model.get_base_model().config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, int(0.9 * vocab), (batch, prompt), generator=g).to(model.device)
    kwargs = {"attention_mask": torch.ones_like(ids), **TIMED_GREEDY}
    times = []
    with torch.no_grad():
        for n in (new, 1, new):
            t0 = StepClock.sync()
            out = model.generate(input_ids=ids, max_new_tokens=n, **kwargs)
            times.append(StepClock.sync() - t0)
    assert out.shape == (batch, prompt + new)
    warm, first, total = times
    decode = max(total - first, 1e-9)
    return {
        "warmup_s": round(warm, 3),
        "ttft_s": round(first, 4),
        "total_s": round(total, 3),
        "tokens_per_s": round(batch * (new - 1) / decode, 2),
        "per_stream_tokens_per_s": round((new - 1) / decode, 2),
    }


def _decode_profile(model, prompt: int) -> dict:
    """torch.profiler over 8 decode steps at batch 1 (after a prefill of `prompt` tokens, timed apart)."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 1000, (1, prompt)).to(model.device)
    kwargs = {"attention_mask": torch.ones_like(ids), **TIMED_GREEDY}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad(), profile(activities=acts) as prof:
        model.generate(input_ids=ids, max_new_tokens=9, **kwargs)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3
    dequant = sum(e.device_time for e in kernels if "equant" in e.name) / 1e3
    return {
        "tokens": 9,
        "kernels": len(kernels),
        "kernels_per_token": round(len(kernels) / 9, 1),
        "busy_ms": round(busy, 2),
        "dequantize_ms": round(dequant, 2),
        "dequantize_share": round(dequant / busy, 3) if busy else 0.0,
    }


def measure_generation(
    cfg: Config, where: Placement, layers: int | None, prompt_tokens: int, records: int, profile: bool
) -> dict:
    """The generation part: the configured model on random weights with the config's LoRA attached (B non-zero),
    as infer / eval / chat / serve load it, generating greedily at batch 1 and at the eval batch size; from those,
    the time of the train stage's before/after samples and the ETA of `make eval` on the held-out split."""
    import gc

    from peft import get_peft_model

    gc.collect()  # the training probe's model is gone: give its memory back first
    device = where.device
    if device == "cuda":
        torch.cuda.empty_cache()
    model = load_random_model(cfg, where, layers).model
    model.config.use_cache = model.generation_config.use_cache = True  # built for training, which has no cache
    model = get_peft_model(model, lora_config(cfg))
    g = torch.Generator().manual_seed(cfg.run.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: a trained adapter's B is not
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    model.eval()
    batch = eval_batch_size(cfg)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one = _generate_timed(model, 1, prompt_tokens, GEN_NEW_TOKENS, cfg.run.seed)
    many = _generate_timed(model, batch, prompt_tokens, GEN_NEW_TOKENS, cfg.run.seed)
    peak = torch.cuda.max_memory_reserved() / GIB if device == "cuda" else None
    # train's before/after samples: each prompt alone, greedy, up to SAMPLE_MAX_NEW_TOKENS (tracking.py)
    from .callbacks import SAMPLE_MAX_NEW_TOKENS, SAMPLE_MAX_PROMPTS

    prompts = len(list(cfg.infer.prompts)[:SAMPLE_MAX_PROMPTS])
    sample_tokens = min(cfg.infer.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)
    samples_s = 2 * prompts * (one["ttft_s"] + (sample_tokens - 1) / one["per_stream_tokens_per_s"])
    # make eval: every held-out record answered by the adapter (and the base), in batches, each row to max_new_tokens
    held_out = math.ceil(cfg.data.eval_ratio * records) if cfg.data.eval_ratio > 0 else 0
    eval_records = held_out or math.ceil(TUTORIAL_EVAL_RATIO * records)
    sides = 2 if cfg.eval.compare_base else 1
    per_batch = many["ttft_s"] + (cfg.eval.max_new_tokens - 1) / many["per_stream_tokens_per_s"]
    eta = sides * math.ceil(eval_records / batch) * per_batch
    graphs = getattr(getattr(model.get_base_model(), "_decode_graphs", None), "_graphs", None)
    report = {
        "gen_tokens_per_s_batch1": one["per_stream_tokens_per_s"],
        "gen_tokens_per_s_batched": many["tokens_per_s"],
        "gen_batch_size": batch,
        "gen_time_to_first_token_s": one["ttft_s"],
        "gen_eval_eta_s": round(eta, 1),
        "generation": {
            "prompt_tokens": prompt_tokens,
            "new_tokens": GEN_NEW_TOKENS,
            "batch1": one,
            "batched": many,
            "peak_reserved_gib": round(peak, 2) if peak is not None else None,
            "cache": model.generation_config.cache_implementation or "dynamic",
            "graphs_captured": graphs.captures if graphs is not None else 0,
            "samples_s": round(samples_s, 1),
            "samples": f"{prompts} prompt(s) x before/after x {sample_tokens} tokens at batch 1",
            "eval_records": eval_records,
            "eval_sides": sides,
            "eval_max_new_tokens": cfg.eval.max_new_tokens,
            "eval_records_from": (
                f"data.eval_ratio {cfg.data.eval_ratio}"
                if held_out
                else f"no held-out split configured: {TUTORIAL_EVAL_RATIO:.0%} of the records, as the tutorial"
            ),
        },
    }
    if profile:
        report["generation"]["profile"] = _decode_profile(model, prompt_tokens)
    return report


@dataclass
class Measurement:
    """What one probe's training run measured; summarize turns it into the report."""

    steps: list[dict]  # StepClock.steps of the timed steps: seconds, samples, real tokens
    per_step: int  # samples per optimizer step as configured (one process)
    records: int  # training records of the configured run (its step count, the ETA)
    gemm_rate: float  # bf16 GEMM FLOP/s measured in the same run (gemm_rate)
    gemm_what: str  # how it was measured
    init: dict  # load_random_model's facts (layers, code, architecture_from) and init_s
    lengths_source: str  # where the sample lengths came from
    device: str  # "cuda" or "cpu"
    trainable: int  # LoRA parameters trained
    total: int  # all parameters of the (cut) model
    train_wall_s: float  # the whole trainer.train() call
    smi_peak: dict[int, float]  # GPU index -> nvidia-smi's peak MiB (SmiPeak); empty on the CPU
    active_params: int  # parameters per token (estimate.active_parameters of the model's config)
    loss: float  # the Trainer's training_loss


def steady_phases(steps: list[dict]) -> dict[str, float] | None:
    """The median of each StepClock phase over the steady steps (None where the callbacks gave none)."""
    if not steps or any("phases" not in s for s in steps):
        return None
    return {k: round(statistics.median(s["phases"][k] for s in steps), 4) for k in StepClock.PHASES}


def summarize(cfg: Config, m: Measurement) -> dict:
    times = [s["s"] for s in m.steps]
    warm = max(1, len(times) // 4)  # the first quarter: plan building for new shapes, allocator growth
    steady_times = times[warm:]
    steady = statistics.median(steady_times)
    mean_after = statistics.fmean(steady_times)
    warmup_s = max(0.0, sum(times[:warm]) - warm * steady)
    samples = statistics.fmean(s["samples"] for s in m.steps[warm:])
    tokens = statistics.fmean(s["tokens"] for s in m.steps[warm:])
    tokens_per_s = tokens / steady
    run_steps = (
        cfg.train.max_steps
        if cfg.train.max_steps > 0
        else math.ceil(cfg.train.num_train_epochs * math.ceil(m.records / m.per_step))
    )
    memory = []
    if m.device == "cuda":
        for i in range(torch.cuda.device_count()):
            memory.append(
                {
                    "gpu": i,
                    "name": torch.cuda.get_device_name(i),
                    "allocated_gib": round(torch.cuda.max_memory_allocated(i) / GIB, 2),
                    "reserved_gib": round(torch.cuda.max_memory_reserved(i) / GIB, 2),
                    "nvidia_smi_gib": round(m.smi_peak[i] / 1024, 2) if i in m.smi_peak else None,
                    "card_gib": round(torch.cuda.get_device_properties(i).total_memory / GIB, 1),
                }
            )
    else:
        import resource

        memory.append({"cpu_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)})
    peak = max(
        (row.get("nvidia_smi_gib") or row.get("reserved_gib") or row.get("cpu_peak_rss_gib") or 0) for row in memory
    )
    import transformers

    return {
        "config": cfg.source,
        "run": cfg.run.name,
        "card": memory[0].get("name", "cpu") if memory else "cpu",
        "gpus": torch.cuda.device_count() if m.device == "cuda" else 0,
        "device": m.device,
        "layers": m.init["layers"],
        "layers_in_config": m.init["layers_in_config"],
        "depth_cut": m.init["layers"] != m.init["layers_in_config"],
        "architecture_from": m.init["architecture_from"],
        "code": m.init["code"],
        "moe_impl": cfg.model.moe_impl,
        "quantization": cfg.model.quantization,
        "nf4_products": cfg.model.nf4_products,
        "nf4_dequantizer": nf4_dequantizer() if m.device == "cuda" else "bitsandbytes",
        "lora": {
            "targets": cfg.lora.targets(),
            "r": cfg.lora.r,
            "alpha": cfg.lora.alpha,
            "dropout": cfg.lora.dropout,
            "trainable": m.trainable,
            "total": m.total,
        },
        "train": {
            "per_device_train_batch_size": cfg.train.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
            "packing": cfg.train.packing,
            "pad_to_multiple_of": cfg.train.pad_to_multiple_of,
            "packed_row_tokens": cfg.train.packed_row_tokens,
            "optim": cfg.train.optim,
            "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "cuda_graphs": cfg.train.cuda_graphs,
            "expert_stash_gib": cfg.train.expert_stash_gib,
        },
        "lengths_from": m.lengths_source,
        "samples_per_optimizer_step": m.per_step,
        "steps": len(times),
        "warmup_steps": warm,
        "step_s": [round(t, 4) for t in times],
        "steady_phases_s": steady_phases(m.steps[warm:]),
        "steady_s_per_step": round(steady, 4),
        "mean_s_per_step_after_warmup": round(mean_after, 4),
        "warmup_s": round(warmup_s, 3),
        "first_step_s": round(times[0], 3),
        "train_wall_s": round(m.train_wall_s, 3),
        "init_s": m.init["init_s"],
        "samples_per_s": round(samples / steady, 3),
        "tokens_per_s": round(tokens_per_s, 1),
        "real_tokens_per_step": round(tokens, 1),
        "samples_per_step_measured": round(samples, 2),
        "active_params_per_token": m.active_params,
        "gemm_tflops": round(m.gemm_rate / 1e12, 1),
        "gemm": m.gemm_what,
        "mfu": round(tokens_per_s * 6 * m.active_params / m.gemm_rate, 4),
        "run_steps": run_steps,
        "run_records": m.records,
        "eta_s": round(warmup_s + run_steps * mean_after, 1),
        "memory": memory,
        "peak_gib": peak,
        "verdict": verdicts(peak),
        "final_loss": round(m.loss, 4),
        "code_commit": git_commit(),
        "versions": package_versions(),
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


# ---------------------------------------------------------------------------------------------
# the load: what each stage waits for before its first step or answer

READ_SAMPLE = 256 * 2**20  # bytes read (written first when there is no shard to read) to time the disk


def read_rate(cfg: Config) -> tuple[float, str]:
    """Bytes per second read from the disk of the model folder, past the page cache: the largest shard if
    the folder has one of READ_SAMPLE bytes or more, else a file written (and fsynced) beside where the
    folder goes; its cached pages dropped first (posix_fadvise DONTNEED; on tmpfs that reads memory)."""
    folder = Path(cfg.model.dir)
    shards = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_size) if folder.is_dir() else []
    written = None
    if shards and shards[-1].stat().st_size >= READ_SAMPLE:
        path, what = shards[-1], f"{READ_SAMPLE >> 20} MiB of {shards[-1]}"
    else:
        anchor = folder
        while not anchor.is_dir():
            anchor = anchor.parent
        fd, name = tempfile.mkstemp(prefix=".read-rate-", dir=anchor)
        written = path = Path(name)
        with os.fdopen(fd, "wb") as f:
            chunk = os.urandom(16 * 2**20)
            for _ in range(READ_SAMPLE // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        what = f"a {READ_SAMPLE >> 20} MiB file written in {anchor}"
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0, left = time.perf_counter(), READ_SAMPLE
            while left > 0:
                got = len(os.read(fd, min(left, 16 * 2**20)))
                if not got:
                    break
                left -= got
            seconds = time.perf_counter() - t0
        finally:
            os.close(fd)
    finally:
        if written is not None:
            written.unlink()
    return (READ_SAMPLE - left) / max(seconds, 1e-6), what


def load_times(cfg: Config, r: dict, rate: float, rate_how: str) -> dict:
    """Each stage's load from the checkpoint (bf16 shards read; NF4 quantised on the way, the GPU keeping up
    with the disk) and from the NF4 cache, as bytes over the disk's read rate, and the whole wait per stage:
    the load, then what the probe measured for it (the epoch and before/after samples, the eval's generation)."""
    from .estimate import count_parameters
    from .hunyuan.random_init import real_or_folder_config
    from .model_folder import INDEX_FILE
    from .scale import NF4_BYTES_PER_PARAM

    model_config, _ = real_or_folder_config(cfg.model.dir)
    params = count_parameters(model_config, cfg.lora.targets(), cfg.lora.r)
    folder = Path(cfg.model.dir)
    if (folder / INDEX_FILE).is_file():
        shards = set(json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"].values())
        checkpoint, checkpoint_from = sum((folder / s).stat().st_size for s in shards), "the model folder's shards"
    else:
        checkpoint, checkpoint_from = params.total * 2, "the parameter count x 2 bytes (bf16)"
    nf4 = cfg.model.quantization == "nf4"
    cache = params.quantizable * NF4_BYTES_PER_PARAM + (params.total - params.quantizable) * 2 if nf4 else None
    from_checkpoint = checkpoint / rate
    from_cache = cache / rate if nf4 else None
    gen = r.get("generation") or {}
    after = {
        "train": r["eta_s"] + gen.get("samples_s", 0.0),
        "eval": r.get("gen_eval_eta_s"),
        "infer, chat, serve": 0.0,
    }
    stages = {
        stage: {
            "then_s": None if then is None else round(then, 1),
            "from_checkpoint_s": round(from_checkpoint + (then or 0.0), 1),
            "from_cache_s": None if from_cache is None else round(from_cache + (then or 0.0), 1),
        }
        for stage, then in after.items()
    }
    return {
        "load": {
            "read_bytes_per_s": round(rate),
            "read_measured_on": rate_how,
            "checkpoint_bytes": int(checkpoint),
            "checkpoint_bytes_from": checkpoint_from,
            "cache_bytes": None if cache is None else int(cache),
            "from_checkpoint_s": round(from_checkpoint, 1),
            "from_cache_s": None if from_cache is None else round(from_cache, 1),
            "merge_s": round(2 * checkpoint / rate, 1),
            "stages": stages,
        }
    }


def _min(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def markdown(r: dict) -> str:
    cut = f" (cut from {r['layers_in_config']}: PROBE_LAYERS)" if r["depth_cut"] else ""
    mem = "; ".join(
        f"GPU {m['gpu']} {m['name']}: allocated {m['allocated_gib']} GiB, reserved {m['reserved_gib']} GiB, "
        f"nvidia-smi {m['nvidia_smi_gib']} GiB of {m['card_gib']}"
        if "gpu" in m
        else f"CPU peak RSS {m['cpu_peak_rss_gib']} GiB"
        for m in r["memory"]
    )
    lora, train = r["lora"], r["train"]
    eta = r["eta_s"]
    products = (
        f" (NF4 products: {r.get('nf4_products', 'dequantize')}, "
        f"dequantised by {r.get('nf4_dequantizer', 'bitsandbytes')})"
        if r["quantization"] == "nf4"
        else ""
    )
    rows = f" in rows of ~{train['packed_row_tokens']} tokens" if train.get("packed_row_tokens") else ""
    lines = [
        f"# Probe: {r['run']} on {r['card']} ({r['date']})",
        "",
        f"Config {r['config']}: {r['layers']} layers{cut}, architecture from {r['architecture_from']}, "
        f"code: {r['code']}; moe_impl {r['moe_impl']}, quantization {r['quantization']}{products}; "
        f"LoRA r={lora['r']} on {len(lora['targets'])} target names ({lora['trainable']:,} trainable); "
        f"{r['samples_per_optimizer_step']} samples per optimizer step (micro-batch "
        f"{train['per_device_train_batch_size']} x {train['gradient_accumulation_steps']}, packing {train['packing']}"
        f"{rows}, pad to {train['pad_to_multiple_of']}, {train['optim']}, "
        f"expert stash {train['expert_stash_gib']} GiB). "
        f"Lengths: {r['lengths_from']}. "
        f"Random weights built in {r['init_s']} s.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| steady state (median of steps {r['warmup_steps'] + 1}-{r['steps']}) "
        f"| **{r['steady_s_per_step']} s per optimizer step** (mean {r['mean_s_per_step_after_warmup']} s) |",
        f"| warm-up (steps 1-{r['warmup_steps']}, beyond steady) "
        f"| {r['warmup_s']} s (first step {r['first_step_s']} s) |",
        *(
            [
                f"| CUDA graphs (train.cuda_graphs) | {g['replays']} micro-steps replayed from {g['graphs']} graphs, "
                f"{g['shapes']} shapes"
                + (f"; capture failed: {g['failed']}" if g["failed"] else "")
                + (f"; captured after a warm-up: {'; '.join(g['cold_failures'])}" if g["cold_failures"] else "")
                + " |"
            ]
            if (g := r.get("cuda_graphs"))
            else []
        ),
        f"| samples/s | **{r['samples_per_s']}** |",
        f"| real (non-pad) tokens/s | {r['tokens_per_s']:,} ({r['real_tokens_per_step']} per step) |",
        f"| MFU | {100 * r['mfu']:.1f} % of {r['gemm_tflops']} TFLOP/s ({r['gemm']} measured in this run; "
        f"6 x {r['active_params_per_token'] / 1e9:.2f} B active parameters per token) |",
        f"| ETA of the configured run | {eta / 60:.1f} min "
        f"({r['run_steps']} steps x {r['mean_s_per_step_after_warmup']} s "
        f"+ warm-up; the load: below){' at this depth' if r['depth_cut'] else ''} |",
        f"| peak memory | {mem} |",
        "| verdict (from the measured peak "
        + f"{r['peak_gib']} GiB"
        + ") | "
        + ", ".join(f"{k}: {v}" for k, v in r["verdict"].items())
        + " |",
        "",
        f"Step times (s): {', '.join(str(t) for t in r['step_s'])}. Loss per step: "
        f"{', '.join(str(v) for v in r.get('loss_per_step', []))}. Code {r['code_commit']}.",
    ]
    phases = r.get("steady_phases_s")
    if phases:
        clock = "on the GPU's timeline (CUDA events)" if r["device"] == "cuda" else "host time"
        lines += [
            "",
            f"Where a steady step's time goes (medians, s, {clock}): "
            f"before it (waiting for the host: the next batches fetched and collated, the first kernels queued) "
            f"{phases['before']}; micro-steps (forward, backward, clipping) {phases['micro_steps']}; "
            f"optimizer step {phases['optimizer']}; after it (scheduler, zero_grad) {phases['after']}.",
        ]
    b = r.get("baseline")
    if b:
        lines += [
            "",
            f"Baseline in the same run (PROBE_COMPARE): moe_impl {b['moe_impl']}, unpacked ({b['code']}): "
            f"{b['steady_s_per_step']} s per optimizer step, {b['samples_per_s']} samples/s, peak "
            f"{b['peak_gib']} GiB: the config is **{r['speedup_vs_baseline']}x** that baseline.",
        ]
    gen = r.get("generation")
    if not gen:
        lines += ["", "Generation: not measured (PROBE_GENERATION=0)."]
    else:
        b1, bb = gen["batch1"], gen["batched"]
        lines += [
            "",
            f"Generation (the config's LoRA attached, B non-zero; greedy, {gen['prompt_tokens']}-token "
            f"prompts, {gen['new_tokens']} new tokens, {gen['cache']} cache, "
            f"{gen['graphs_captured']} decode graph(s) captured):",
            "",
            "| measure | value |",
            "| --- | --- |",
            f"| batch 1 | **{r['gen_tokens_per_s_batch1']} tokens/s**, first token after "
            f"{r['gen_time_to_first_token_s']} s (warm-up {b1['warmup_s']} s) |",
            f"| batch {r['gen_batch_size']} (the eval batch size) | **{r['gen_tokens_per_s_batched']} tokens/s** "
            f"({bb['per_stream_tokens_per_s']} per stream), first token after {bb['ttft_s']} s |",
            f"| peak memory while generating | {gen['peak_reserved_gib']} GiB reserved |",
            f"| train's before/after samples | {gen['samples_s']} s ({gen['samples']}) |",
            f"| ETA of `make eval` | {r['gen_eval_eta_s'] / 60:.1f} min ({gen['eval_records']} records from "
            f"{gen['eval_records_from']} x {gen['eval_sides']} side(s) x up to {gen['eval_max_new_tokens']} "
            f"tokens, batches of {r['gen_batch_size']}){' at this depth' if r['depth_cut'] else ''} |",
        ]
        gp = gen.get("profile")
        if gp:
            lines += [
                "",
                f"Decode profile (batch 1, {gp['tokens']} tokens): {gp['kernels']} kernels "
                f"({gp['kernels_per_token']} per token), {gp['busy_ms']} ms GPU busy, dequantisation "
                f"{gp['dequantize_ms']} ms ({100 * gp['dequantize_share']:.0f} %).",
            ]
    ld = r.get("load")
    if ld:
        cache = ld["cache_bytes"] is not None
        rate = ld["read_bytes_per_s"] / 1e9
        lines += [
            "",
            f"Loading, the whole wait per stage (full depth; disk read {rate:.2f} GB/s "
            f"measured on {ld['read_measured_on']}; checkpoint {ld['checkpoint_bytes'] / 1e9:.0f} GB from "
            f"{ld['checkpoint_bytes_from']}"
            + (f", NF4 cache {ld['cache_bytes'] / 1e9:.0f} GB" if cache else "")
            + "):",
            "",
            "| stage | load from the checkpoint | load from the NF4 cache | then | whole wait (checkpoint / cache) |",
            "| --- | --- | --- | --- | --- |",
        ]
        then = {
            "train": "the epoch + before/after samples",
            "eval": "generation, base and adapter",
            "infer, chat, serve": "per answer (generation above)",
        }
        for stage, st in ld["stages"].items():
            lines.append(
                f"| {stage} | {_min(ld['from_checkpoint_s'])} | {_min(ld['from_cache_s'])} | "
                f"{then[stage]}: {_min(st['then_s'])} | {_min(st['from_checkpoint_s'])} / "
                f"{_min(st['from_cache_s'])} |"
            )
        lines.append(
            f"| merge (no GPU) | reads and writes the bf16 checkpoint: {_min(ld['merge_s'])} | - | - | "
            f"{_min(ld['merge_s'])} |"
        )
    p = r.get("profile")
    if p:
        lines += [
            "",
            f"Profile of one more step: {p['kernels']} kernels ({p['kernels_per_layer']} per layer), "
            f"{p['busy_ms']} ms of GPU busy = {100 * p['busy_fraction_of_steady']:.0f} % of the steady step; "
            f"dequantisation {p['dequantize_ms']} ms. Top kernels (ms, launches):",
            "",
        ]
        lines += [f"- {n}: {ms} ms x {c}" for n, ms, c in p["top"]]
        lines += [
            "",
            f"Host side of that step: {p['host_ms']} ms of operators' own CPU time (under the profiler); "
            "top (ms, calls):",
            "",
        ]
        lines += [f"- {n}: {ms} ms x {c}" for n, ms, c in p["host_top"]]
        if p.get("idle_by_segment_ms"):
            segments = ", ".join(f"{k} {v}" for k, v in p["idle_by_segment_ms"].items())
            largest = "; ".join(f"{ms} ({op})" for ms, op in p["idle_largest"])
            lines += [
                "",
                f"GPU idle in that step: {p['idle_ms']} ms in {p['idle_gaps']} gaps ({segments}, cut at the host's "
                "marks); largest gaps (ms, "
                f"host op): {largest}. Idle before these kernels (ms, gaps):",
                "",
            ]
            lines += [f"- {n}: {ms} ms x {c}" for n, ms, c in p["idle_before_kernel"]]
    return "\n".join(lines) + "\n"
