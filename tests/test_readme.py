"""The README stays true: every make target is in its table, its quick-start commands are what CI runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _make_targets() -> set[str]:
    help_text = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in help_text.splitlines() if line.strip()}


def test_every_make_target_is_in_the_readme_table_and_no_other():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `make ([a-z-]+)` \|", readme, flags=re.M))
    assert documented == _make_targets()


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = readme.split("## Quick start", 1)[1].split("##", 1)[0]
    assert "make demo" in quick_start
    assert "make test" in quick_start
    ci = [
        line
        for line in (REPO / ".ci/run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == ["make test"]


def test_readme_names_the_model_licence():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "Tencent Hunyuan Community License" in readme
    assert "never ships the weights" in readme


def test_the_quick_start_says_what_the_demos_answers_look_like():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    quick_start = " ".join(readme.split("## Quick start", 1)[1].split("##", 1)[0].split())
    assert "Expect nonsense answers" in quick_start
    assert "short fragments of the training data" in quick_start


def test_the_readme_says_make_test_installs_chromium_with_apt_as_root():
    """`make test` runs apt-get as root (scripts/install_test_deps.sh): a user must know before running it."""
    installer = (REPO / "scripts" / "install_test_deps.sh").read_text()
    assert "apt-get install" in installer
    assert "chromium" in installer
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    row = next(line for line in readme.splitlines() if line.startswith("| `make test` |"))
    assert "as root with apt-get" in row
    assert "`chromium`" in row


def test_the_speed_figures_ran_on_the_pinned_torch():
    """What we measure is what we pin: every measured table in Speed and Which GPUs names the lock's
    torch, and every probe result in bench/results ran on it."""
    import json

    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    (torch,) = re.findall(r"^torch==(\S+)", lock, flags=re.M)
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    measured = [
        " ".join(p.split())
        for section in ("## Speed", "## Which GPUs")
        for p in re.split(r"\n\s*\n", readme.split(section, 1)[1].split("\n## ", 1)[0])
        if re.search(r"\bMeasured\b", p)
    ]
    assert len(measured) >= 4, [p[:160] for p in measured if f"torch {torch}" not in p]
    assert all(f"torch {torch}" in p for p in measured), [p[:160] for p in measured if f"torch {torch}" not in p]
    ran_on = {
        json.loads(f.read_text())["versions"]["torch"].split("+")[0]
        for f in (REPO / "bench" / "results").rglob("probe-*.json")
    }
    assert ran_on == {torch}, ran_on
