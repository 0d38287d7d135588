"""Keys never reach console output, logs, the saved config, the manifest, SwanLab's store or the image.

One short training (scripts/train.py, 2 steps, SwanLab local) with fake keys planted in the
environment -- SWANLAB_API_KEY, HF_TOKEN, MODELSCOPE_API_TOKEN, ... -- and run from a git
checkout whose remote URL embeds a token, with HOME pointing into the test folder. Then every
byte of the run folder (checkpoints, adapter, resolved.yaml, manifest.json, log_history.json,
swanlog/: SwanLab's config, metadata, console capture), of HOME and of the captured stdout/stderr
is searched for each key and for its first 12 characters (a key cut short or wrapped still leaks).

With SWANLAB_API_KEY set, swanlab.mode auto would pick cloud (network): the run forces local.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from script_helpers import stage_args

from hunyuan_lora import config, data, runtime

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SAMPLE = REPO / "src" / "hunyuan_lora" / "assets" / "zhenhuan_sample.json"
SECRET_VARS = (
    "SWANLAB_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "MODELSCOPE_API_TOKEN",
    "GITHUB_TOKEN",
    "WANDB_API_KEY",
)


def fake_key(name: str) -> str:
    return f"fake{name.lower().replace('_', '')}{pysecrets.token_hex(12)}"


def leaks(keys: dict[str, str], *places: Path | str) -> list[str]:
    """'<name> in <file>' for every place (file, folder or captured text) holding a key or its prefix."""
    found = []
    for place in places:
        if isinstance(place, Path):
            files = [place] if place.is_file() else [p for p in place.rglob("*") if p.is_file()]
            blobs = [(str(p), p.read_bytes()) for p in files]
        else:
            blobs = [("captured output", place.encode())]
        for where, blob in blobs:
            for name, key in keys.items():
                if key[:12].encode() in blob:
                    found.append(f"{name} in {where}")
    return found


def git_checkout_with_token_remote(path: Path, token: str) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run(
        ["git", "remote", "add", "origin", f"https://ci-bot:{token}@github.com/acme/hunyuan-lora.git"],
        cwd=path,
        check=True,
    )
    return path


@pytest.fixture(scope="module")
def run(patched_stand_in, tmp_path_factory):
    root = tmp_path_factory.mktemp("secrets")
    keys = {name: fake_key(name) for name in SECRET_VARS}
    keys["git remote token"] = fake_key("ghp")
    out, home = root / "out", root / "home"
    home.mkdir()
    cwd = git_checkout_with_token_remote(root / "checkout", keys["git remote token"])
    data.run(config.load(DEMO, model_dir=str(patched_stand_in), output_dir=str(out), data=str(SAMPLE)))
    env = {**os.environ, **{n: keys[n] for n in SECRET_VARS}, "HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "train.py"),
            *stage_args(
                DEMO, patched_stand_in, out, SAMPLE, ["train.max_steps=2", "train.save_steps=1", "swanlab.mode=local"]
            ),
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"keys": keys, "out": out, "home": home, "stdout": proc.stdout, "stderr": proc.stderr}


def test_the_run_wrote_what_is_searched(run):
    out = run["out"]
    for name in (
        "resolved.yaml",
        "manifest.json",
        "log_history.json",
        "adapter/adapter_model.safetensors",
        "checkpoint-2/trainer_state.json",
        "checkpoint-2/training_args.bin",
    ):
        assert (out / name).is_file(), name
    swanlab_files = {p.name for p in (out / "swanlog").rglob("*") if p.is_file()}
    assert {"config.yaml", "swanlab-metadata.json"} <= swanlab_files  # SwanLab stored the config and metadata
    assert any(p.suffix == ".log" for p in (out / "swanlog").rglob("console/*")), "SwanLab captured the console"


def test_no_key_anywhere_in_the_run_home_or_output(run):
    assert leaks(run["keys"], run["out"], run["home"], run["stdout"], run["stderr"]) == []


def test_swanlab_records_the_remote_without_its_credential(run):
    metadata = next(run["out"].rglob("swanlab-metadata.json"))
    remote = json.loads(metadata.read_text())["git_remote"]
    assert remote == "https://github.com/acme/hunyuan-lora"  # recorded (SwanLab drops ".git"), masked
    assert "the git remote URL carries a credential" in run["stdout"]


def test_the_search_finds_a_planted_key(run, tmp_path):
    """The grep itself can fail: a key written into a copy of the run is found (full and cut short)."""
    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    key = run["keys"]["SWANLAB_API_KEY"]
    with open(next(copy.rglob("swanlab-metadata.json")), "a") as f:
        f.write(key[:14])
    assert leaks(run["keys"], copy) == [f"SWANLAB_API_KEY in {next(copy.rglob('swanlab-metadata.json'))}"]
    assert leaks(run["keys"], f"log: {key}") == ["SWANLAB_API_KEY in captured output"]


def test_without_the_mask_swanlab_would_store_the_token(tmp_path, monkeypatch):
    """What the mask prevents: SwanLab's metadata collector reads the remote from git itself."""
    from swanlab.data.run.metadata.runtime import get_remote_url

    token = fake_key("ghp")
    checkout = git_checkout_with_token_remote(tmp_path / "checkout", token)
    monkeypatch.chdir(checkout)
    for k in [k for k in os.environ if k.startswith("GIT_CONFIG_")]:
        monkeypatch.delenv(k)
    assert token in (get_remote_url() or "")
    assert runtime.mask_git_remote(apply=True) == "https://github.com/acme/hunyuan-lora.git"
    try:
        assert get_remote_url() == "https://github.com/acme/hunyuan-lora"
    finally:
        for k in [k for k in os.environ if k.startswith("GIT_CONFIG_")]:
            os.environ.pop(k)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("https://user:tok@github.com/a/b.git", "https://github.com/a/b.git"),
        ("https://tok@github.com/a/b.git", "https://github.com/a/b.git"),
        ("http://u:p@host:8080/a.git", "http://host:8080/a.git"),
        ("https://github.com/a/b.git", None),
        ("git@github.com:a/b.git", None),
        ("ssh://git@github.com/a/b.git", None),  # a user name, no secret
    ],
)
def test_credential_in_url_is_recognised(url, masked):
    assert runtime._strip_userinfo(url) == masked


# ---------------------------------------------------------------------------------------------
# the image


def test_image_bakes_no_key_and_the_build_context_keeps_key_files_out():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_container import dockerignore_excludes, secret_problems

    assert secret_problems((REPO / "Dockerfile").read_text()) == []
    ignore = (REPO / ".dockerignore").read_text()
    for path in (
        ".env",
        ".env.local",
        "outputs/demo/swanlog/run-1/files/swanlab-metadata.json",
        "outputs/demo/manifest.json",
        "swanlog/run-1/console/2026-01-01.log",
    ):
        assert dockerignore_excludes(ignore, path), path
    # `make docker-train` hands the key over by name, from the caller's environment, never by value
    makefile = (REPO / "Makefile").read_text()
    assert "-e SWANLAB_API_KEY" in makefile
    assert "SWANLAB_API_KEY=" not in makefile
