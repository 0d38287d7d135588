"""The Trainer callbacks of a training run, and what they log to SwanLab.

    train.py:     callbacks = [SaveOnSignal(), *swanlab_callbacks(cfg, mode, stats, trainable, total, tokenizer)]
    training.py:  build_trainer adds CheckpointModes()
    probe.py:     BatchCounter (the same count of samples and real tokens as Throughput)

In SwanLab a run holds:
    config       the resolved config flattened to `section.key`, LoRA parameter counts (params.*),
                 dataset stats (dataset.*, from <output_dir>/data/stats.json), package versions
                 (versions.*); HF's TrainingArguments and the model's config.json as two entries
    train/*      loss, grad_norm, learning_rate, epoch per logging step (SwanLab's transformers callback)
    eval/*       loss, runtime, ... at each logging step when the dataset has an eval split
    single_value/*   the Trainer's end-of-run summary (train_runtime, train_samples_per_second, ...)
    perf/*       samples/s and non-pad tokens/s of the training steps since the last log; peak
                 GPU memory per device (GPU runs only)
    samples/generations   greedy answers to infer.prompts, logged at the last step: per prompt a row
                 "before: <prompt>" (base model, adapter disabled, generated at train start) and a row
                 "after: <prompt>" (the trained adapter)

A run stopped early (Ctrl-C, SIGTERM: a checkpoint is saved) is marked crashed with the reason,
since SwanLab's store knows only running / finished / crashed. swanlab 0.5.7 cannot reopen an
experiment, so a resumed run is a new one whose description and config name the earlier one
(tracking.py keeps the runs file and the local store).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .atomic import honour_umask
from .config import Config
from .estimate import GIB
from .runtime import git_commit, package_versions
from .tracking import close_stale_experiments, finish_crashed, record_experiment, resumed_from

# The before/after generations run on the training process's model: greedy, short and few, so
# they add seconds on CPU and well under a minute to an A13B run.
SAMPLE_MAX_NEW_TOKENS = 48
SAMPLE_MAX_PROMPTS = 8
SAMPLES_KEY = "samples/generations"
# What the Trainer logs once at the end: one point each under single_value/, as SwanLab's callback does.
SINGLE_VALUE_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


# ---------------------------------------------------------------------------------------------
# SwanLab: hyperparameters as one flat mapping the dashboard's config table can show row by row


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, (list, tuple)):
        # Lists of names read best as one cell; long lists (warnings) as their length.
        out[prefix] = ", ".join(map(str, value)) if len(value) <= 16 else f"{len(value)} items"
    elif isinstance(value, bool):
        out[prefix] = str(value).lower()  # SwanLab would store 0 / 1
    else:
        out[prefix] = value


def run_config(cfg: Config, stats: dict, trainable: int, total: int) -> dict[str, Any]:
    """The run's hyperparameters for SwanLab: config, parameter counts, dataset stats, versions."""
    out: dict[str, Any] = {}
    _flat("", cfg.to_dict(), out)
    out["lora.targets"] = ", ".join(cfg.lora.targets())  # what the preset resolves to
    out["params.trainable"] = trainable
    out["params.total"] = total
    out["params.trainable_percent"] = round(100 * trainable / total, 4) if total else 0.0
    stats = dict(stats)
    stats.pop("system_prompt", None)  # already data.system_prompt
    stats["warnings"] = len(stats.get("warnings") or [])
    _flat("dataset", stats, out)
    out["versions.python"] = sys.version.split()[0]
    out.update({f"versions.{name}": version for name, version in package_versions().items()})
    out["versions.git_commit"] = git_commit()
    out["config_file"] = cfg.source
    return out


def swanlab_callbacks(cfg: Config, mode: str, stats: dict, trainable: int, total: int, tokenizer) -> list:
    """SwanLab's callback (with our config) + throughput/memory + before/after samples; [] if disabled.
    Cloud mode: train's preflight has checked the login (tracking.check_swanlab), before the weights loaded."""
    if mode == "disabled":
        return []
    return [
        _swanlab_callback(cfg, mode, run_config(cfg, stats, trainable, total)),
        Throughput(),
        SampleGenerations(cfg, tokenizer),
    ]


def _swanlab_callback(cfg: Config, mode: str, config: dict):
    from swanlab.integration.transformers import SwanLabCallback, rewrite_logs

    class ProjectSwanLabCallback(SwanLabCallback):
        """SwanLab's callback, but its config stays readable.

        The stock setup() merges ~120 TrainingArguments and the model's ~60 config.json keys into the
        top level next to ours; here they are one entry each (trainer_args, model_config), so the
        config table starts with the run's own `section.key` rows.
        """

        def setup(self, args, state, model, **kwargs):
            self._initialized = True
            if not state.is_world_process_zero:
                return
            swanlab = self._swanlab
            resumed = {}
            if swanlab.get_run() is None:
                for line in close_stale_experiments(out):
                    print(line)
                init = dict(self._swanlab_init)
                if state.global_step:  # resumed from a checkpoint (the Trainer has loaded its state)
                    resumed = resumed_from(out, state.global_step)
                    init["description"] = resumed["continues"]
                    print(f"SwanLab: {resumed['continues']} (swanlab 0.5.7 cannot reopen an experiment)")
                record_experiment(out, swanlab.init(**init), mode, state.global_step)
            base = getattr(model, "get_base_model", lambda: model)()
            swanlab.config.update(
                {
                    "FRAMEWORK": "🤗transformers",  # as the stock setup() sets it
                    "trainer_args": args.to_dict(),
                    "model_config": base.config.to_dict() if getattr(base, "config", None) is not None else {},
                    **resumed,
                }
            )

        def on_train_end(self, args, state, control, **kwargs):
            super().on_train_end(args, state, control, **kwargs)
            if state.is_world_process_zero and state.global_step < state.max_steps:
                # stopped with a checkpoint (Ctrl-C, SIGTERM): "finished" would claim a complete run
                finish_crashed(
                    out,
                    f"stopped at step {state.global_step} of {state.max_steps} with a checkpoint; "
                    "`make train` continues it in a new experiment",
                )

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            # As the stock on_log, except that only the train log of a step carries train/epoch and
            # train/global_step: the stock one adds them to eval logs too, and SwanLab then warns
            # "Step N on key train/epoch already exists, ignored" at every evaluation.
            if not self._initialized:
                self.setup(args, state, model)
            if not state.is_world_process_zero:
                return
            summary = {f"single_value/{k}": v for k, v in logs.items() if k in SINGLE_VALUE_KEYS}
            values = rewrite_logs(
                {k: v for k, v in logs.items() if k not in SINGLE_VALUE_KEYS and (k != "epoch" or "loss" in logs)}
            )
            if "loss" in logs:
                values["train/global_step"] = state.global_step
            if summary or values:
                self._swanlab.log({**summary, **values}, step=state.global_step)

    out = cfg.output_dir
    return ProjectSwanLabCallback(
        project=cfg.swanlab.project,
        experiment_name=cfg.swanlab.experiment or cfg.run.name,
        logdir=str(cfg.output_dir / "swanlog"),
        mode=mode,
        config=config,
    )


# ---------------------------------------------------------------------------------------------
# throughput and memory


class BatchCounter:
    """Samples and real (non-pad) tokens of the training micro-batches a model is fed: a forward
    pre-hook sums the attention_mask of each (padding excluded; a packed row counts its samples by
    the position ids restarting at 0). The sums stay on the device: no host sync per micro-batch.
    Throughput (SwanLab's perf/*) and the probe's StepClock both count with it."""

    def __init__(self):
        self.samples = 0  # an int, or a device tensor (packing)
        self.tokens = 0  # a device tensor once something was counted
        self._hook = None
        self._model = None

    def attach(self, model) -> None:
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self.count, with_kwargs=True)
            # a step replayed from a CUDA graph runs no hook: step_graphs.count_batch calls the counters
            model.__dict__.setdefault("batch_counters", []).append(self)
            self._model = model

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
            self._model.__dict__["batch_counters"].remove(self)

    def count(self, module, args, kwargs) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation forwards are not training throughput
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph's capture: the replays are counted (step_graphs.count_batch)
        mask = kwargs.get("attention_mask")  # (B, T), 0 on padding
        ids = kwargs.get("input_ids", args[0] if args else None)  # (B, T)
        positions = kwargs.get("position_ids")
        if mask is None and ids is None:
            return
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        tokens = real.sum()
        # train.packing: rows of whole samples, positions restart per sample (a padding block from
        # train.pad_to_multiple_of restarts them too, but is masked); only packed batches carry positions
        packed = positions is not None
        samples = ((positions == 0) & real).sum() if packed else real.shape[0]
        self.tokens = tokens if isinstance(self.tokens, int) else self.tokens + tokens.to(self.tokens.device)
        self.samples = self.samples + samples

    def take(self) -> tuple[int, int]:
        """(samples, tokens) counted since the last take (one host sync), and start again from zero."""
        samples, tokens = self.take_on_device()
        return int(samples), int(tokens)

    def take_on_device(self) -> tuple:
        """take() without the sync: the sums as the device holds them (tensors, or ints where nothing was
        counted on it)."""
        counted = self.samples, self.tokens
        self.samples, self.tokens = 0, 0
        return counted


class Throughput(TrainerCallback):
    """perf/samples_per_second and perf/tokens_per_second over the training steps since the last log.

    Counts what the model is really fed (BatchCounter), so tokens/s is independent of how batches
    are padded. Time is measured from step begin to step end, so evaluation and checkpoint saves
    between steps do not count against it; on CUDA by events on the GPU's own timeline, read at the log
    (the one host sync of the window: a sync per step would make the GPU idle while the host queues the
    next step).
    """

    def __init__(self):
        self.counter = BatchCounter()
        self._seconds = 0.0
        self._t_begin: float | None = None
        self._cuda = False
        self._events: list[tuple] = []  # (begin, end) CUDA events of the window's steps

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._cuda = args.device.type == "cuda"
        if model is not None:
            self.counter.attach(model)
        if self._cuda:
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)

    def on_step_begin(self, args, state, control, **kwargs):
        if self._cuda:
            self._t_begin = torch.cuda.Event(enable_timing=True)
            self._t_begin.record()
        else:
            self._t_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._t_begin is None:
            return
        if self._cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._events.append((self._t_begin, end))
        else:
            self._seconds += time.perf_counter() - self._t_begin
        self._t_begin = None

    def metrics(self) -> dict[str, float]:
        """The window's rates (and resets it); peak memory since train start, GiB per GPU."""
        out: dict[str, float] = {}
        samples, tokens = self.counter.take()  # the window's one host sync
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(begin.elapsed_time(end) for begin, end in self._events) / 1e3
            self._events = []
        if self._seconds > 0 and samples:
            out["perf/samples_per_second"] = round(samples / self._seconds, 3)
            out["perf/tokens_per_second"] = round(tokens / self._seconds, 1)
        self._seconds = 0.0
        if self._cuda:
            for i in range(torch.cuda.device_count()):
                out[f"perf/gpu{i}_peak_memory_gib"] = round(torch.cuda.max_memory_allocated(i) / GIB, 2)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" not in (logs or {}):
            return  # eval logs and the final summary: the window belongs to the next train log
        values = self.metrics()
        if values and state.is_world_process_zero:
            import swanlab

            swanlab.log(values, step=state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.counter.detach()


# ---------------------------------------------------------------------------------------------
# sample generations, before vs after


class SampleGenerations(TrainerCallback):
    """Greedy answers to infer.prompts from the base model at train start and the adapter at the end.

    The base answers come from the same PEFT model with its adapter switched off
    (`model.disable_adapter()`), so no second copy of the weights is ever loaded. Prompts go
    through prompt.ask: the same chat template and system prompt as `make infer`; all of them are
    answered as one batch (generation.generate, in the training process's own thread).
    """

    def __init__(self, cfg: Config, tokenizer):
        from dataclasses import replace

        self.cfg = replace(
            cfg,
            infer=replace(
                cfg.infer, do_sample=False, max_new_tokens=min(cfg.infer.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)
            ),
        )
        self.tokenizer = tokenizer
        self.prompts = list(cfg.infer.prompts)[:SAMPLE_MAX_PROMPTS]
        self.before: list[str] = []
        self.after: list[str] = []

    def _answers(self, model) -> list[str]:
        from .generation import Completion, generate, infer_sampling
        from .prompt import ask, extract_answer, prompt_ids

        completions = [
            Completion(prompt_ids(self.tokenizer, ask(p, self.cfg), self.cfg.infer.thinking), infer_sampling(self.cfg))
            for p in self.prompts
        ]
        was_training = model.training
        model.eval()  # no dropout; the model's forward also skips gradient checkpointing in eval
        try:
            generate(model, self.tokenizer, completions)
        finally:
            model.train(was_training)
        return [extract_answer(c.text) for c in completions]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not (self.prompts and state.is_world_process_zero and model is not None):
            return
        with model.disable_adapter():
            self.before = self._answers(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not (self.before and state.is_world_process_zero and model is not None):
            return
        if state.global_step < state.max_steps:
            return  # stopped early with a checkpoint: the "after" answers come when the run completes
        import swanlab

        self.after = self._answers(model)
        swanlab.log(
            {SAMPLES_KEY: [swanlab.Text(text, caption=caption) for text, caption in self.panel()]},
            step=state.global_step,
        )

    def panel(self) -> list[tuple[str, str]]:
        """(text, caption) rows: per prompt the base model's answer, then the adapter's. The dashboard
        shows a caption | text table with a narrow caption column, so the caption starts with the side."""
        rows = []
        for prompt, before, after in zip(self.prompts, self.before, self.after):
            rows += [(before, f"before: {prompt}"), (after, f"after: {prompt}")]
        return rows


# ---------------------------------------------------------------------------------------------
# stopping and checkpoints


class SaveOnSignal(TrainerCallback):
    """Ctrl-C (SIGINT), `docker stop` and cloud pre-emption (SIGTERM): save a checkpoint after the
    current step, then stop; `make train` continues from it. A second Ctrl-C stops at once, unsaved.
    Installs its signal handlers when made."""

    received: str | None = None  # what stopped the run, once a signal arrived

    def __init__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # the user will not wait for the save
        # Flag first, and no print(): the handler runs inside whatever the main thread is doing,
        # and a print() landing inside another print() raises "reentrant call" (run lost, no save).
        self.received = signal.Signals(signum).name
        os.write(
            2,
            f"\n{self.received} received: saving a checkpoint after this step, then stopping "
            "(Ctrl-C again stops at once, without saving)\n".encode(),
        )

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if args.world_size > 1:
            # Every rank must stop after the same step (saving under ZeRO-3 is collective), and a
            # terminal's Ctrl-C reaches the ranks at slightly different moments.
            import torch.distributed as dist

            flag = torch.tensor([float(stop)], device=args.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            self.received = self.received or ("a signal to another process" if stop else None)
        if stop:
            control.should_save = True
            control.should_training_stop = True


class ResumedComplete(Exception):
    """The run resumed from a checkpoint at its last step: the Trainer has loaded its weights and state."""


class EndIfComplete(TrainerCallback):
    """A run resumed at its last step mid-epoch (train.max_steps) would train one step more: the Trainer
    checks max_steps only after a step. Raised once the checkpoint's weights and state are loaded and
    before any step, so the caller publishes the checkpoint as it is."""

    def on_train_begin(self, args, state, control, **kwargs):
        if 0 < state.max_steps <= state.global_step:
            raise ResumedComplete


class CheckpointModes(TrainerCallback):
    """Checkpoints get the user's umask: safetensors writes its files 0600 whatever the umask, so a
    container running as another uid could not resume from them."""

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_local_process_zero and checkpoint.is_dir():
            honour_umask(checkpoint)
