"""What a training run shows in SwanLab, and the loss plot it leaves next to its outputs.

    train.py:  callbacks += tracking.callbacks(cfg, mode, stats, trainable, total, tokenizer)
               tracking.plot_loss(trainer.state.log_history, out / "loss.png")
    again:     python -m hunyuan_lora.tracking outputs/demo/log_history.json   # -> outputs/demo/loss.png
    dashboard: make watch [CONFIG=configs/demo.yaml]                          # scripts/watch.py

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
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .config import Config
from .errors import UserError
from .runtime import git_commit, package_versions

# The before/after generations run on the training process's model: greedy, short and few, so
# they add seconds on CPU and well under a minute to an A13B run.
SAMPLE_MAX_NEW_TOKENS = 48
SAMPLE_MAX_PROMPTS = 8
SAMPLES_KEY = "samples/generations"
GIB = 2**30
# What the Trainer logs once at the end: one point each under single_value/, as SwanLab's callback does.
SINGLE_VALUE_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")


# ---------------------------------------------------------------------------------------------
# hyperparameters: one flat mapping the dashboard's config table can show row by row


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


def swanlab_mode(cfg: Config) -> str:
    """auto: SWANLAB_MODE if set, else cloud with SWANLAB_API_KEY, else local (never a login prompt)."""
    if cfg.swanlab.mode != "auto":
        return cfg.swanlab.mode
    env = os.environ.get("SWANLAB_MODE")
    if env in ("cloud", "local", "disabled"):
        return env
    return "cloud" if os.environ.get("SWANLAB_API_KEY") else "local"


def callbacks(cfg: Config, mode: str, stats: dict, trainable: int, total: int, tokenizer) -> list:
    """SwanLab's callback (with our config) + throughput/memory + before/after samples; [] if disabled."""
    if mode == "disabled":
        return []
    if mode == "cloud":
        _check_cloud_login()
    return [
        _swanlab_callback(cfg, mode, run_config(cfg, stats, trainable, total)),
        Throughput(),
        SampleGenerations(cfg, tokenizer),
    ]


def _check_cloud_login() -> None:
    """Cloud mode needs a key now: without one SwanLab would prompt on a TTY or fail at train start."""
    from swanlab.error import KeyFileError
    from swanlab.package import get_key

    try:
        get_key()  # SWANLAB_API_KEY, else the key `swanlab login` saved
    except (KeyFileError, OSError) as e:  # OSError: no ~/.swanlab folder to hold a saved key
        raise UserError("swanlab.mode is 'cloud' but there is no SwanLab API key", where="swanlab.mode",
                        fix="export SWANLAB_API_KEY=<key from swanlab.cn settings> (or run `swanlab login`), "
                            "or log locally with SET=swanlab.mode=local") from e


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
            if swanlab.get_run() is None:
                swanlab.init(**self._swanlab_init)
            base = getattr(model, "get_base_model", lambda: model)()
            swanlab.config.update({
                "FRAMEWORK": "🤗transformers",  # as the stock setup() sets it
                "trainer_args": args.to_dict(),
                "model_config": base.config.to_dict() if getattr(base, "config", None) is not None else {},
            })

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            # As the stock on_log, except that only the train log of a step carries train/epoch and
            # train/global_step: the stock one adds them to eval logs too, and SwanLab then warns
            # "Step N on key train/epoch already exists, ignored" at every evaluation.
            if not self._initialized:
                self.setup(args, state, model)
            if not state.is_world_process_zero:
                return
            summary = {f"single_value/{k}": v for k, v in logs.items() if k in SINGLE_VALUE_KEYS}
            values = rewrite_logs({k: v for k, v in logs.items() if k not in SINGLE_VALUE_KEYS
                                   and (k != "epoch" or "loss" in logs)})
            if "loss" in logs:
                values["train/global_step"] = state.global_step
            if summary or values:
                self._swanlab.log({**summary, **values}, step=state.global_step)

    return ProjectSwanLabCallback(
        project=cfg.swanlab.project,
        experiment_name=cfg.swanlab.experiment or cfg.run.name,
        logdir=str(cfg.output_dir / "swanlog"),
        mode=mode,
        config=config,
    )


# ---------------------------------------------------------------------------------------------
# throughput and memory


class Throughput(TrainerCallback):
    """perf/samples_per_second and perf/tokens_per_second over the training steps since the last log.

    Counts what the model is really fed: a forward pre-hook sums the attention_mask of every
    training micro-batch (padding excluded), so tokens/s is independent of how batches are padded.
    Time is measured from step begin to step end, so evaluation and checkpoint saves between
    steps do not count against it.
    """

    def __init__(self):
        self._hook = None
        self._samples = 0
        self._tokens = None  # a device tensor: summing there avoids a host sync per micro-batch
        self._seconds = 0.0
        self._t_begin: float | None = None
        self._cuda = False

    def _count(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation and generation forwards are not training throughput
        mask = kwargs.get("attention_mask")  # (B, T), 0 on padding
        ids = kwargs.get("input_ids", args[0] if args else None)  # (B, T)
        positions = kwargs.get("position_ids")
        if mask is None and ids is None:
            return
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        tokens = real.sum()
        if positions is not None and real.shape[0] == 1:
            # train.packing: one (1, T) row of whole samples, positions restart per sample
            # (a padding block from train.pad_to_multiple_of restarts them too, but is masked)
            samples = ((positions == 0) & real).sum()
        else:
            samples = real.shape[0]
        self._tokens = tokens if self._tokens is None else self._tokens + tokens.to(self._tokens.device)
        self._samples = self._samples + samples  # an int, or a device tensor (packing)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._cuda = args.device.type == "cuda"
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count, with_kwargs=True)
        if self._cuda:
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)

    def on_step_begin(self, args, state, control, **kwargs):
        self._t_begin = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._cuda:
            torch.cuda.synchronize()  # CUDA runs ahead of Python: wait, or the step "took" no time
        if self._t_begin is not None:
            self._seconds += time.perf_counter() - self._t_begin
        self._t_begin = None

    def metrics(self) -> dict[str, float]:
        """The window's rates (and resets it); peak memory since train start, GiB per GPU."""
        out: dict[str, float] = {}
        samples = int(self._samples)  # the window's one host sync
        if self._seconds > 0 and samples:
            tokens = int(self._tokens.item()) if self._tokens is not None else 0
            out["perf/samples_per_second"] = round(samples / self._seconds, 3)
            out["perf/tokens_per_second"] = round(tokens / self._seconds, 1)
        self._samples, self._tokens, self._seconds = 0, None, 0.0
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
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


# ---------------------------------------------------------------------------------------------
# sample generations, before vs after


class SampleGenerations(TrainerCallback):
    """Greedy answers to infer.prompts from the base model at train start and the adapter at the end.

    The base answers come from the same PEFT model with its adapter switched off
    (`model.disable_adapter()`), so no second copy of the weights is ever loaded. Prompts go
    through prompt.ask and generation.reply: the same chat template and system prompt as `make infer`.
    """

    def __init__(self, cfg: Config, tokenizer):
        from dataclasses import replace

        self.cfg = replace(cfg, infer=replace(cfg.infer, do_sample=False,
                                              max_new_tokens=min(cfg.infer.max_new_tokens, SAMPLE_MAX_NEW_TOKENS)))
        self.tokenizer = tokenizer
        self.prompts = list(cfg.infer.prompts)[:SAMPLE_MAX_PROMPTS]
        self.before: list[str] = []
        self.after: list[str] = []

    def _answers(self, model) -> list[str]:
        from .generation import infer_sampling, reply
        from .prompt import ask, extract_answer

        was_training = model.training
        model.eval()  # no dropout; the model's forward also skips gradient checkpointing in eval
        try:
            return [extract_answer(reply(model, self.tokenizer, ask(p, self.cfg), thinking=self.cfg.infer.thinking,
                                         sampling=infer_sampling(self.cfg))) for p in self.prompts]
        finally:
            model.train(was_training)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if not (self.prompts and state.is_world_process_zero and model is not None):
            return
        with model.disable_adapter():
            self.before = self._answers(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not (self.before and state.is_world_process_zero and model is not None):
            return
        import swanlab

        self.after = self._answers(model)
        swanlab.log({SAMPLES_KEY: [swanlab.Text(text, caption=caption) for text, caption in self.panel()]},
                    step=state.global_step)

    def panel(self) -> list[tuple[str, str]]:
        """(text, caption) rows: per prompt the base model's answer, then the adapter's. The dashboard
        shows a caption | text table with a narrow caption column, so the caption starts with the side."""
        rows = []
        for prompt, before, after in zip(self.prompts, self.before, self.after):
            rows += [(before, f"before: {prompt}"), (after, f"after: {prompt}")]
        return rows


# ---------------------------------------------------------------------------------------------
# the loss plot


def plot_loss(log_history: str | Path | list[dict], png_path: str | Path) -> Path:
    """loss.png: train loss (per logging step) and eval loss against step, from trainer.state.log_history.

    Takes the list itself or a log_history.json. Writes an axes-only plot with a note when no loss
    was logged yet (fewer steps than train.logging_steps), so the end of a run never fails here.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend
    from matplotlib.ticker import MaxNLocator

    if not isinstance(log_history, list):
        log_history = json.loads(Path(log_history).read_text(encoding="utf-8"))
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    if train or evals:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no loss logged yet (fewer steps than train.logging_steps)",
                ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps, not 2.5
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.name + ".tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, png_path)
    return png_path


# ---------------------------------------------------------------------------------------------
# SwanLab's local store, read as swanboard reads it (for `make watch` and the tests)


def local_experiments(swanlog: str | Path) -> list[dict]:
    """The experiments in <swanlog>/runs.swanlab (SQLite): id, name, run_id, status, project."""
    import sqlite3

    db = Path(swanlog) / "runs.swanlab"
    if not db.is_file():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT e.id, e.name, e.run_id, e.status, p.name FROM experiment e JOIN project p ON p.id = e.project_id "
            "ORDER BY e.id").fetchall()
    finally:
        con.close()
    status = {0: "running", 1: "finished", -1: "crashed"}
    return [{"id": i, "name": n, "run_id": r, "status": status.get(s, str(s)), "project": p}
            for i, n, r, s, p in rows]


def read_tag(swanlog: str | Path, run_id: str, tag: str) -> list[dict]:
    """Every record of one logged key, by step: the tag table gives its folder under logs/."""
    import sqlite3

    swanlog = Path(swanlog)
    con = sqlite3.connect(f"file:{swanlog / 'runs.swanlab'}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT t.folder FROM tag t JOIN experiment e ON e.id = t.experiment_id "
                          "WHERE e.run_id = ? AND t.name = ?", (run_id, tag)).fetchone()
    finally:
        con.close()
    if row is None:
        return []
    folder = swanlog / run_id / "logs" / row[0]
    records = []
    for f in sorted(folder.glob("*.log")):  # swanboard: every *.log of the folder, then sort by index
        records += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(records, key=lambda r: int(r["index"]))


if __name__ == "__main__":
    # python -m hunyuan_lora.tracking LOG_HISTORY_JSON [PNG]   (default: loss.png next to it)
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m hunyuan_lora.tracking outputs/<run>/log_history.json [loss.png]")
    src = Path(sys.argv[1])
    print(plot_loss(src, sys.argv[2] if len(sys.argv) == 3 else src.with_name("loss.png")))
