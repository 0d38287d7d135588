"""SwanLab for everyone who reads or checks it: the mode, the cloud login check, the runs file of an
output folder and SwanLab's local store. The Trainer callbacks that log a training run are in
callbacks.py, the loss plot in loss_plot.py.

    preflight: status, detail = tracking.check_swanlab(cfg)   # cloud: key present, well formed, accepted
    eval:      mode = tracking.swanlab_mode(cfg)
    dashboard: make watch [CONFIG=configs/demo.yaml]          # watch.py lists tracking.local_experiments

<output_dir>/swanlab_runs.json lists the experiments of the output folder (run id, link, process).
An experiment the local store still shows running whose process is gone (kill -9) is marked crashed
when the next run starts (close_stale_experiments).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from .atomic import write_json
from .config import Config
from .errors import UserError
from .runtime import is_main_process

RUNS_FILE = "swanlab_runs.json"  # in the output folder: the SwanLab experiments its runs started
LOGIN_TIMEOUT_S = 15
# SwanLab's local store (swanboard's experiment.status)
RUNNING, FINISHED, CRASHED = 0, 1, -1
LOCAL_ALTERNATIVE = (
    "or log locally with SET=swanlab.mode=local (the run is kept in <output_dir>/swanlog; `make watch` shows it)"
)


# ---------------------------------------------------------------------------------------------
# the mode and the cloud login


def swanlab_mode(cfg: Config) -> str:
    """auto: SWANLAB_MODE if set, else cloud with SWANLAB_API_KEY, else local (never a login prompt)."""
    if cfg.swanlab.mode != "auto":
        return cfg.swanlab.mode
    env = os.environ.get("SWANLAB_MODE")
    if env in ("cloud", "local", "disabled"):
        return env
    return "cloud" if os.environ.get("SWANLAB_API_KEY") else "local"


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
        raise UserError(
            "swanlab.mode is 'cloud' but there is no SwanLab API key",
            where="swanlab.mode",
            fix="export SWANLAB_API_KEY=<key from swanlab.cn settings> (or run `swanlab login`), " + LOCAL_ALTERNATIVE,
        ) from e
    try:
        APIKeyFormatError.check(key)
    except APIKeyFormatError as e:  # its message names the bad character or the length, never the key
        raise UserError(
            f"the SwanLab API key ({source}) is malformed: {e}",
            where="swanlab.mode",
            fix="copy the key again from swanlab.cn (settings: 21 letters and digits) into "
            f"SWANLAB_API_KEY or `swanlab login`, {LOCAL_ALTERNATIVE}",
        ) from e
    host = get_host_api()
    network = "check the network (a proxy: HTTPS_PROXY; another server: SWANLAB_API_HOST), "
    try:
        answer = login_request(key, host, timeout=LOGIN_TIMEOUT_S)  # what swanlab.init's login sends
    except requests.RequestException as e:
        raise UserError(
            f"cannot reach the SwanLab cloud at {host} ({type(e).__name__})",
            where="swanlab.mode",
            fix=network + LOCAL_ALTERNATIVE,
        ) from e
    if answer.status_code in (401, 403):
        raise UserError(
            f"the SwanLab cloud at {host} refused the API key ({source}): HTTP {answer.status_code}",
            where="swanlab.mode",
            fix="create a new key at swanlab.cn (settings) and export SWANLAB_API_KEY=<it>, " + LOCAL_ALTERNATIVE,
        )
    try:
        answer.raise_for_status()
        user = answer.json()["userInfo"]["username"]
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:  # a proxy's page, an outage
        raise UserError(
            f"the SwanLab cloud at {host} did not answer the login as SwanLab does (HTTP {answer.status_code})",
            where="swanlab.mode",
            fix=network + "or try again later, " + LOCAL_ALTERNATIVE,
        ) from e
    return f"cloud: {host} accepted the key ({source}) of user {user}"


def finish_crashed(out: Path, reason: str) -> None:
    """Close this process's SwanLab experiment as crashed, with the reason in its error log (none open:
    nothing to do). Left open, swanlab's exit handler would mark it finished."""
    import swanlab
    from swanlab.data.run import SwanLabRunState

    run = swanlab.get_run()
    if run is None:
        return
    run_id = run.public.run_id
    swanlab.finish(SwanLabRunState.CRASHED, error=reason)
    # swanlab 0.5.7 records the error, but its local store marks every finish() finished
    mark_local_experiments(out, {run_id}, CRASHED)


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
    entry = {
        "run_id": run.public.run_id,
        "mode": mode,
        "url": cloud.experiment_url if cloud.available else None,
        "first_step": step,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(Path(out) / RUNS_FILE, read_runs(out) + [entry])


def resumed_from(out: Path, step: int) -> dict[str, Any]:
    """The config entries (and description) that link a resumed run to the experiment it continues."""
    earlier = (read_runs(out) or [None])[-1]
    if earlier is None:
        return {"resumed_from_step": step, "continues": f"resumed at step {step} (no earlier experiment recorded)"}
    where = earlier["url"] or f"run {earlier['run_id']} in {Path(out) / 'swanlog'}"
    return {
        "resumed_from_step": step,
        "continues_run_id": earlier["run_id"],
        "continues": f"resumed at step {step}: continues the experiment {where}",
    }


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
            con.executemany(
                "UPDATE experiment SET status = ?, finish_time = ?, update_time = ? WHERE run_id = ?",
                [(status, now, now, run_id) for run_id in sorted(run_ids)],
            )
    finally:
        con.close()


def close_stale_experiments(out: Path) -> list[str]:
    """Mark crashed the experiments the local store shows running whose process is gone (kill -9, power
    loss: nothing ran to close them). Only one run trains in an output folder at a time, so any
    other is stale. Returns one line per experiment marked."""
    alive = {e.get("run_id") for e in read_runs(out) if _process_alive(e)}
    stale = [
        e for e in local_experiments(Path(out) / "swanlog") if e["status"] == "running" and e["run_id"] not in alive
    ]
    mark_local_experiments(out, {e["run_id"] for e in stale}, CRASHED)
    return [
        f"SwanLab: experiment {e['name']} ({e['run_id']}) was still marked running, but its process is gone: "
        "marked crashed"
        for e in stale
    ]


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
            "ORDER BY e.id"
        ).fetchall()
    finally:
        con.close()
    status = {RUNNING: "running", FINISHED: "finished", CRASHED: "crashed"}
    return [{"id": i, "name": n, "run_id": r, "status": status.get(s, str(s)), "project": p} for i, n, r, s, p in rows]
