"""What a training run shows in SwanLab, and the loss plot it leaves next to its outputs.

    train.py:  callbacks += tracking.callbacks(cfg, mode, stats, trainable, total, tokenizer)
               tracking.plot_loss(trainer.state.log_history, out / "loss.png")
    again:     .venv/bin/python -m hunyuan_lora.tracking outputs/demo/log_history.json   # -> loss.png next to it
    dashboard: make watch [CONFIG=configs/demo.yaml]                          # scripts/watch.py
    preflight: status, detail = tracking.check_swanlab(cfg)   # cloud: key present, well formed, accepted

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
experiment, so a resumed run is a new one whose description and config name the earlier one;
<output_dir>/swanlab_runs.json lists the experiments of the output folder (run id, link, process).
An experiment the local store still shows running whose process is gone (kill -9) is marked crashed
when the next run starts.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .atomic import write_json
from .config import Config
from .errors import UserError
from .runtime import git_commit, is_main_process, package_versions

# The before/after generations run on the training process's model: greedy, short and few, so
# they add seconds on CPU and well under a minute to an A13B run.
SAMPLE_MAX_NEW_TOKENS = 48
SAMPLE_MAX_PROMPTS = 8
SAMPLES_KEY = "samples/generations"
GIB = 2**30
# What the Trainer logs once at the end: one point each under single_value/, as SwanLab's callback does.
SINGLE_VALUE_KEYS = ("train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss", "total_flos")
RUNS_FILE = "swanlab_runs.json"  # in the output folder: the SwanLab experiments its runs started
LOGIN_TIMEOUT_S = 15
# SwanLab's local store (swanboard's experiment.status)
RUNNING, FINISHED, CRASHED = 0, 1, -1
LOCAL_ALTERNATIVE = ("or log locally with SET=swanlab.mode=local (the run is kept in <output_dir>/swanlog; "
                     "`make watch` shows it)")


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
    """SwanLab's callback (with our config) + throughput/memory + before/after samples; [] if disabled.
    Cloud mode: train's preflight has checked the login (check_swanlab), before the weights loaded."""
    if mode == "disabled":
        return []
    return [
        _swanlab_callback(cfg, mode, run_config(cfg, stats, trainable, total)),
        Throughput(),
        SampleGenerations(cfg, tokenizer),
    ]


def check_swanlab(cfg: Config) -> tuple[str, str]:
    """The preflight's row: (status, detail). Cloud mode: a key, well formed, that the server accepts.

    Without this a missing key prompts (or fails) only when training starts, after the weights
    loaded, and a malformed key or an unreachable server ends in SwanLab's traceback there.
    """
    mode = swanlab_mode(cfg)
    if mode == "disabled":
        return "skip", "swanlab.mode disabled: nothing is logged (loss.png and log_history.json are still written)"
    if mode != "cloud":
        return "ok", f"{mode}: logged to {cfg.output_dir / 'swanlog'} (`make watch` shows it)"
    if not is_main_process():
        return "skip", "cloud: the main process logs in"
    return "ok", check_cloud_login()


def check_cloud_login() -> str:
    """A SwanLab API key, well formed, that the cloud accepts; a one-line detail, else UserError."""
    import requests
    from swanlab.api.auth.login import login_request
    from swanlab.error import APIKeyFormatError, KeyFileError
    from swanlab.package import get_host_api, get_key

    source = "SWANLAB_API_KEY" if os.environ.get("SWANLAB_API_KEY") is not None else "the key `swanlab login` saved"
    try:
        key = get_key()  # SWANLAB_API_KEY, else ~/.swanlab/.netrc
    except (KeyFileError, OSError) as e:  # OSError: no ~/.swanlab folder to hold a saved key
        raise UserError("swanlab.mode is 'cloud' but there is no SwanLab API key", where="swanlab.mode",
                        fix="export SWANLAB_API_KEY=<key from swanlab.cn settings> (or run `swanlab login`), "
                            + LOCAL_ALTERNATIVE) from e
    try:
        APIKeyFormatError.check(key)
    except APIKeyFormatError as e:  # its message names the bad character or the length, never the key
        raise UserError(f"the SwanLab API key ({source}) is malformed: {e}", where="swanlab.mode",
                        fix="copy the key again from swanlab.cn (settings: 21 letters and digits) into "
                            f"SWANLAB_API_KEY or `swanlab login`, {LOCAL_ALTERNATIVE}") from e
    host = get_host_api()
    network = "check the network (a proxy: HTTPS_PROXY; another server: SWANLAB_API_HOST), "
    try:
        answer = login_request(key, host, timeout=LOGIN_TIMEOUT_S)  # what swanlab.init's login sends
    except requests.RequestException as e:
        raise UserError(f"cannot reach the SwanLab cloud at {host} ({type(e).__name__})", where="swanlab.mode",
                        fix=network + LOCAL_ALTERNATIVE) from e
    if answer.status_code in (401, 403):
        raise UserError(f"the SwanLab cloud at {host} refused the API key ({source}): HTTP {answer.status_code}",
                        where="swanlab.mode", fix="create a new key at swanlab.cn (settings) and export "
                                                  "SWANLAB_API_KEY=<it>, " + LOCAL_ALTERNATIVE)
    try:
        answer.raise_for_status()
        user = answer.json()["userInfo"]["username"]
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:  # a proxy's page, an outage
        raise UserError(f"the SwanLab cloud at {host} did not answer the login as SwanLab does "
                        f"(HTTP {answer.status_code})", where="swanlab.mode",
                        fix=network + "or try again later, " + LOCAL_ALTERNATIVE) from e
    return f"cloud: {host} accepted the key ({source}) of user {user}"


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
            swanlab.config.update({
                "FRAMEWORK": "🤗transformers",  # as the stock setup() sets it
                "trainer_args": args.to_dict(),
                "model_config": base.config.to_dict() if getattr(base, "config", None) is not None else {},
                **resumed,
            })

        def on_train_end(self, args, state, control, **kwargs):
            super().on_train_end(args, state, control, **kwargs)
            run = self._swanlab.get_run()
            if state.is_world_process_zero and state.global_step < state.max_steps and run is not None:
                # stopped with a checkpoint (Ctrl-C, SIGTERM): "finished" would claim a complete run
                from swanlab.data.run import SwanLabRunState

                run_id = run.public.run_id
                self._swanlab.finish(SwanLabRunState.CRASHED,
                                     error=f"stopped at step {state.global_step} of {state.max_steps} with a "
                                           "checkpoint; `make train` continues it in a new experiment")
                # swanlab 0.5.7 records the error, but its local store marks every finish() finished
                mark_local_experiments(out, {run_id}, CRASHED)

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

    out = cfg.output_dir
    return ProjectSwanLabCallback(
        project=cfg.swanlab.project,
        experiment_name=cfg.swanlab.experiment or cfg.run.name,
        logdir=str(cfg.output_dir / "swanlog"),
        mode=mode,
        config=config,
    )


# ---------------------------------------------------------------------------------------------
# the experiments of one output folder: a resumed run names the earlier one, killed ones are closed


def read_runs(out: Path) -> list[dict]:
    """<out>/swanlab_runs.json: one entry per experiment a run in this folder started, oldest first."""
    try:
        runs = json.loads((Path(out) / RUNS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return runs if isinstance(runs, list) else []


def record_experiment(out: Path, run, mode: str, step: int) -> None:
    cloud = run.public.cloud
    entry = {"run_id": run.public.run_id, "mode": mode, "url": cloud.experiment_url if cloud.available else None,
             "first_step": step, "pid": os.getpid(), "host": socket.gethostname(),
             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(Path(out) / RUNS_FILE, read_runs(out) + [entry])


def resumed_from(out: Path, step: int) -> dict[str, Any]:
    """The config entries (and description) that link a resumed run to the experiment it continues."""
    earlier = (read_runs(out) or [None])[-1]
    if earlier is None:
        return {"resumed_from_step": step, "continues": f"resumed at step {step} (no earlier experiment recorded)"}
    where = earlier["url"] or f"run {earlier['run_id']} in {Path(out) / 'swanlog'}"
    return {"resumed_from_step": step, "continues_run_id": earlier["run_id"],
            "continues": f"resumed at step {step}: continues the experiment {where}"}


def _process_alive(entry: dict) -> bool:
    if entry.get("host") != socket.gethostname():
        return False  # another machine or container: it cannot be training in this folder now
    try:
        os.kill(int(entry["pid"]), 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True  # it exists, as another user's
    except (ProcessLookupError, KeyError, TypeError, ValueError):
        return False
    return True


def mark_local_experiments(out: Path, run_ids: set[str], status: int) -> None:
    """Set the status of these experiments in <out>/swanlog's local store (as swanboard's update_status)."""
    import sqlite3

    from swankit.env import create_time

    db = Path(out) / "swanlog" / "runs.swanlab"
    if not (run_ids and db.is_file()):
        return
    now = create_time()  # swanboard's time format
    con = sqlite3.connect(db, timeout=30)  # a `make watch` dashboard may be reading it
    try:
        with con:
            con.executemany("UPDATE experiment SET status = ?, finish_time = ?, update_time = ? WHERE run_id = ?",
                            [(status, now, now, run_id) for run_id in sorted(run_ids)])
    finally:
        con.close()


def close_stale_experiments(out: Path) -> list[str]:
    """Mark crashed the experiments the local store shows running whose process is gone (kill -9, power
    loss: nothing ran to close them). Only one run trains in an output folder at a time, so any
    other is stale. Returns one line per experiment marked."""
    alive = {e.get("run_id") for e in read_runs(out) if _process_alive(e)}
    stale = [e for e in local_experiments(Path(out) / "swanlog")
             if e["status"] == "running" and e["run_id"] not in alive]
    mark_local_experiments(out, {e["run_id"] for e in stale}, CRASHED)
    return [f"SwanLab: experiment {e['name']} ({e['run_id']}) was still marked running, but its process is gone: "
            "marked crashed" for e in stale]


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
        if state.global_step < state.max_steps:
            return  # stopped early with a checkpoint: the "after" answers come when the run completes
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
# SwanLab's local store, read as swanboard reads it (for `make watch`)


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
    status = {RUNNING: "running", FINISHED: "finished", CRASHED: "crashed"}
    return [{"id": i, "name": n, "run_id": r, "status": status.get(s, str(s)), "project": p}
            for i, n, r, s, p in rows]



if __name__ == "__main__":
    # python -m hunyuan_lora.tracking LOG_HISTORY_JSON [PNG]   (default: loss.png next to it)
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: .venv/bin/python -m hunyuan_lora.tracking outputs/<run>/log_history.json [loss.png]")
    src = Path(sys.argv[1])
    print(plot_loss(src, sys.argv[2] if len(sys.argv) == 3 else src.with_name("loss.png")))
