"""Ctrl-C, through the real entry points in subprocesses, as a terminal sends it (SIGINT to the group).

download   SIGINT while a shard is mid-transfer (tests/modelscope_server.py holds it open):
           one line on stderr, exit 130, no traceback, and the rerun completes the folder
train      SIGINT after the first logged step of the demo recipe on the stand-in: a checkpoint of
           that step is saved, the message says how to continue, the SwanLab experiment is marked
           crashed (not left running), and the rerun resumes from the checkpoint in a new
           experiment that names the earlier one; a SIGKILLed run's experiment is marked
           crashed by the next run; with two ranks (torchrun on the CPU), a signal to one stops both
           after the same step
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from modelscope_server import ModelScopeServer
from script_helpers import stage_args

from hunyuan_lora import config, data, tracking

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"
MODEL_ID = "Tencent-Hunyuan/Hunyuan-A13B-Instruct"
SHARD = "model-00001-of-00001.safetensors"
TIMEOUT = 300
USER_VARS = ("CONFIG", "MODEL_DIR", "DATA", "OUTPUT_DIR", "SET", "PROMPT", "STAND_IN_DIR", "EVAL")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {f"HL_{name}" for name in USER_VARS}}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


class Script:
    """scripts/<name> in its own process group (a terminal's foreground job), output to files."""

    def __init__(self, name: str, args: list[str], log: Path, env: dict[str, str], cwd: Path = REPO):
        self.stdout_path, self.stderr_path = log.with_suffix(".stdout"), log.with_suffix(".stderr")
        with open(self.stdout_path, "w") as so, open(self.stderr_path, "w") as se:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / "scripts" / name), *args],
                cwd=cwd,
                env=env,
                stdout=so,
                stderr=se,
                start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait_for(self, ready, what: str) -> None:
        deadline = time.time() + TIMEOUT
        while not ready():
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                raise AssertionError(f"no {what} ({self.proc.wait()}):\n{self.stdout[-2000:]}\n{self.stderr[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise AssertionError(f"still running {timeout} s after Ctrl-C:\n{self.stderr[-3000:]}") from None


# ---------------------------------------------------------------------------------------------
# download


@pytest.fixture
def model_to_serve(tmp_path) -> Path:
    """A small model folder: config with auto_map, code, tokenizer files, one 3 MiB shard + index."""
    d = tmp_path / "served"
    d.mkdir()
    files = {
        "config.json": json.dumps(
            {
                "model_type": "hunyuan",
                "auto_map": {
                    "AutoConfig": "configuration_hunyuan.HunYuanConfig",
                    "AutoModelForCausalLM": "hunyuan.HunYuanMoEV1ForCausalLM",
                },
            }
        ),
        "configuration_hunyuan.py": "class HunYuanConfig: pass\n",
        "hunyuan.py": "class HunYuanMoEV1ForCausalLM: pass\n",
        "tokenizer_config.json": "{}",
        "hy.tiktoken": "IQ== 0\n",
        "model.safetensors.index.json": json.dumps({"weight_map": {"model.norm.weight": SHARD}}),
    }
    for name, text in files.items():
        (d / name).write_text(text)
    (d / SHARD).write_bytes(random.Random(0).randbytes(3 << 20))
    return d


def download_env(tmp_path: Path, srv: ModelScopeServer) -> dict[str, str]:
    env = clean_env(
        HOME=str(tmp_path / "home"),
        MODELSCOPE_CACHE=str(tmp_path / "ms-cache"),
        MODELSCOPE_DOMAIN=srv.domain,
        REQUESTS_CA_BUNDLE=srv.ca_file,
        SSL_CERT_FILE=srv.ca_file,
        NO_PROXY="127.0.0.1,localhost",
    )
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    return env


def test_ctrl_c_during_download_prints_one_line_and_the_rerun_completes(model_to_serve, tmp_path):
    cache = tmp_path / "cache"
    args = ["--set", f"model.cache_dir={cache}", "--set", f"model.dir={cache / MODEL_ID}"]
    with ModelScopeServer(model_to_serve, model_id=MODEL_ID, stall_after={SHARD: 1 << 20}) as srv:
        run = Script("download.py", args, tmp_path / "download", download_env(tmp_path, srv), cwd=tmp_path)
        run.wait_for(lambda: any(r.body_bytes >= 1 << 20 for r in srv.file_requests(SHARD)), "shard mid-transfer")
        run.ctrl_c()
        rc = run.finish(timeout=30)
    assert rc == 128 + signal.SIGINT, run.stderr
    assert "Traceback" not in run.stderr
    assert "KeyboardInterrupt" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if "interrupted" in line]
    assert len(lines) == 1, run.stderr[-2000:]
    assert "make download" in lines[0], run.stderr[-2000:]
    assert not (cache / MODEL_ID / "download.json").exists()

    with ModelScopeServer(model_to_serve, model_id=MODEL_ID) as srv:
        rerun = Script("download.py", args, tmp_path / "rerun", download_env(tmp_path, srv), cwd=tmp_path)
        assert rerun.finish() == 0, rerun.stderr[-3000:]
    assert (cache / MODEL_ID / SHARD).read_bytes() == (model_to_serve / SHARD).read_bytes()
    assert (cache / MODEL_ID / "download.json").is_file()


def test_ctrl_c_where_no_stage_handles_it_is_one_line_not_a_traceback(tmp_path):
    """Every stage runs inside errors.exit_on_user_error: a Ctrl-C while, say, the weights load (before
    train's own handler is installed) ends with one line and exit 130, not a KeyboardInterrupt traceback."""
    code = (
        "import time\n"
        "from hunyuan_lora.errors import exit_on_user_error\n"
        "@exit_on_user_error\n"
        "def load():\n"
        "    print('loading', flush=True)\n"
        "    time.sleep(TIMEOUT)\n"
        "load()\n"
    ).replace("TIMEOUT", str(TIMEOUT))
    stdout, stderr = tmp_path / "out", tmp_path / "err"
    with open(stdout, "w") as so, open(stderr, "w") as se:
        proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=so, stderr=se, env=clean_env(), start_new_session=True
        )
    deadline = time.time() + TIMEOUT
    while "loading" not in stdout.read_text() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    err = stderr.read_text()
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted (Ctrl-C): nothing unfinished was published; run the same command again "
        "(`make train` continues from its newest complete checkpoint)"
    ]


# ---------------------------------------------------------------------------------------------
# train


MAX_STEPS = 8
TRAIN_SETTINGS = [
    f"train.max_steps={MAX_STEPS}",
    "train.logging_steps=1",
    "train.save_steps=100",
    "swanlab.mode=local",
    "run.seed=0",
    "train.resume=auto",
]
LOSS_LINE = re.compile(r"\{'loss': ([0-9.]+)")


def train(model: Path, out: Path, name: str) -> Script:
    args = stage_args(DEMO, model, out, SAMPLE, TRAIN_SETTINGS)
    return Script("train.py", args, out.parent / name, clean_env(SWANLAB_SAVE_DIR=str(out.parent / "swanlab-home")))


def experiments(out: Path) -> list[dict]:
    """The local store's experiments with their descriptions, oldest first."""
    import sqlite3

    con = sqlite3.connect(f"file:{out / 'swanlog' / 'runs.swanlab'}?mode=ro", uri=True)
    try:
        descriptions = dict(con.execute("SELECT run_id, description FROM experiment").fetchall())
    finally:
        con.close()
    return [{**e, "description": descriptions[e["run_id"]]} for e in tracking.local_experiments(out / "swanlog")]


@pytest.fixture(scope="module")
def interrupted(patched_stand_in, tmp_path_factory):
    """Ctrl-C mid-run; the rerun resumes and is SIGKILLed mid-run; a third run completes."""
    root = tmp_path_factory.mktemp("interrupts")
    model, out = root / "stand-in", root / "out"
    shutil.copytree(patched_stand_in, model)
    data.run(config.load(DEMO, model_dir=str(model), output_dir=str(out), data=str(SAMPLE)))
    result = {"out": out}

    first = train(model, out, "ctrl-c")
    first.wait_for(lambda: LOSS_LINE.search(first.stdout), "first logged loss")
    first.ctrl_c()
    result["ctrl_c"] = (first.finish(), first.stdout, first.stderr)
    result["after_ctrl_c"] = experiments(out)
    result["checkpoints"] = sorted(p.name for p in out.glob("checkpoint-*"))

    second = train(model, out, "resumed-then-killed")
    second.wait_for(lambda: LOSS_LINE.search(second.stdout), "first logged loss of the rerun")
    os.killpg(second.proc.pid, signal.SIGKILL)
    result["killed"] = (second.finish(), second.stdout, second.stderr)
    result["after_kill"] = experiments(out)

    third = train(model, out, "completes")
    result["third"] = (third.finish(), third.stdout, third.stderr)
    result["after_third"] = experiments(out)
    return result


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_continue(interrupted):
    rc, stdout, stderr = interrupted["ctrl_c"]
    out = interrupted["out"]
    assert rc == 1, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "KeyboardInterrupt" not in stderr
    assert "SIGINT received: saving a checkpoint after this step, then stopping" in stderr
    step = int(re.search(r"stopped by SIGINT at step (\d+)", stderr)[1])
    assert 1 <= step < MAX_STEPS
    assert f"the checkpoint is {out / f'checkpoint-{step}'}: rerun the same `make train`" in stderr
    assert interrupted["checkpoints"][0] == f"checkpoint-{step}"  # save_steps=100: only the Ctrl-C save
    state = json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["global_step"] == step
    assert not (out / "adapter").exists() or "adapter saved" not in stdout


def test_the_interrupted_experiment_is_marked_crashed_with_the_reason(interrupted):
    (exp,) = interrupted["after_ctrl_c"]
    assert exp["status"] == "crashed"
    runs = tracking.read_runs(interrupted["out"])
    assert runs[0]["run_id"] == exp["run_id"]
    assert runs[0]["first_step"] == 0


def test_the_rerun_resumes_from_the_ctrl_c_checkpoint_in_an_experiment_naming_the_first(interrupted):
    out = interrupted["out"]
    step = int(re.search(r"stopped by SIGINT at step (\d+)", interrupted["ctrl_c"][2])[1])
    _, stdout, _ = interrupted["killed"]
    assert f"resuming from {out / f'checkpoint-{step}'}\n" in stdout
    first, second = interrupted["after_kill"]
    assert f"resumed at step {step}: continues the experiment run {first['run_id']}" in second["description"]
    assert f"SwanLab: resumed at step {step}: continues the experiment run {first['run_id']}" in stdout
    config_yaml = (out / "swanlog" / second["run_id"] / "files" / "config.yaml").read_text()
    assert first["run_id"] in config_yaml
    assert "resumed_from_step" in config_yaml


def test_a_killed_run_is_marked_crashed_by_the_next_one(interrupted):
    rc, _, _ = interrupted["killed"]
    assert rc == -signal.SIGKILL
    assert [e["status"] for e in interrupted["after_kill"]] == ["crashed", "running"]  # nothing ran to close it
    rc, stdout, stderr = interrupted["third"]
    assert rc == 0, stderr[-3000:]
    killed = interrupted["after_kill"][1]
    assert f"experiment {killed['name']} ({killed['run_id']}) was still marked running" in stdout
    assert [e["status"] for e in interrupted["after_third"]] == ["crashed", "crashed", "finished"]
    manifest = json.loads((interrupted["out"] / "manifest.json").read_text())
    assert manifest["global_step"] == MAX_STEPS


def test_a_signal_to_one_of_two_ranks_stops_both_after_the_same_step(patched_stand_in, tmp_path):
    """Two DDP processes on the CPU (torchrun, gloo); SIGINT reaches rank 1 only. The ranks agree on the
    step to stop after (a rank stopping alone would leave the other waiting in a collective forever)
    and the checkpoint of that step is complete, with both ranks' RNG states."""
    import psutil

    model, out = tmp_path / "stand-in", tmp_path / "out"
    shutil.copytree(patched_stand_in, model)
    data.run(config.load(DEMO, model_dir=str(model), output_dir=str(out), data=str(SAMPLE)))
    with socket.socket() as sock:  # a free port for the ranks' rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [
        str(Path(sys.executable).with_name("torchrun")),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        str(REPO / "scripts" / "train.py"),
        *stage_args(
            DEMO,
            model,
            out,
            SAMPLE,
            [
                "train.max_steps=40",
                "train.logging_steps=1",
                "train.save_steps=100",
                "swanlab.mode=disabled",
                "train.resume=never",
            ],
        ),
    ]
    log = tmp_path / "ddp.log"
    with open(log, "w") as f:
        launcher = subprocess.Popen(
            args, cwd=REPO, env=clean_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.time() + TIMEOUT
        while "{'loss'" not in log.read_text(errors="replace"):
            assert launcher.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.time() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.05)
        (rank1,) = [
            p
            for p in psutil.Process(launcher.pid).children(recursive=True)
            if p.environ().get("LOCAL_RANK") == "1" and "train.py" in " ".join(p.cmdline())
        ]
        rank1.send_signal(signal.SIGINT)
        launcher.wait(timeout=120)  # a rank that stopped alone leaves the other waiting: no exit
    finally:
        if launcher.poll() is None:  # torchrun starts each rank in a session of its own
            for process in [*psutil.Process(launcher.pid).children(recursive=True), psutil.Process(launcher.pid)]:
                process.kill()
            launcher.wait()
    text = log.read_text(errors="replace")
    stops = re.findall(r"stopped by (SIGINT|a signal to another process) at step (\d+)", text)
    assert sorted(who for who, _ in stops) == ["SIGINT", "a signal to another process"], text[-3000:]
    (step,) = {int(s) for _, s in stops}
    assert 1 <= step < 40
    checkpoint = out / f"checkpoint-{step}"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == step
    assert (checkpoint / "rng_state_0.pth").is_file()
    assert (checkpoint / "rng_state_1.pth").is_file()
