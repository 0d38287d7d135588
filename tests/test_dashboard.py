"""`make watch` in a real browser: scripts/watch.py serves the short run's swanlog, headless Chromium
(driven through chromium-driver by selenium) opens the experiment page, and the train/loss chart
must be drawn. CI installs the browser with `apt-get install -y chromium chromium-driver`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from test_tracking import REPO, demo_run

from hunyuan_lora import tracking

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
        reason=f"needs Debian's browser ({CHROMIUM}, {CHROMEDRIVER}): apt-get install -y chromium chromium-driver",
    ),
]

# Non-transparent pixels of the canvas under the chart titled arguments[0]; -1 while no such chart
# exists. The dashboard draws its line charts (G2Plot) on a 2D canvas inside a section.chart-container.
CHART_PIXELS_JS = """
const title = [...document.querySelectorAll('section.chart-container p')]
    .find(p => p.textContent.trim() === arguments[0]);
if (!title) return -1;
const canvas = title.closest('section').querySelector('canvas');
const ctx = canvas && canvas.width ? canvas.getContext('2d') : null;
if (!ctx) return 0;
const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
let drawn = 0;
for (let i = 3; i < data.length; i += 4) if (data[i]) drawn++;
return drawn;
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Waits, not timings: under `make test` two workers share the machine's two cores with the browser, so
# each bound is generous (a page that never draws still fails, only later).
WAIT_FACTOR = 3


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, patched_stand_in):
    """(base URL, run config) of `scripts/watch.py` on a free port; stopped by its pid afterwards."""
    cfg = demo_run(tmp_path_factory, patched_stand_in)
    port = _free_port()
    log = tmp_path_factory.mktemp("watch") / "watch.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [
                sys.executable,
                "scripts/watch.py",
                "--config",
                "configs/demo.yaml",
                "--model-dir",
                str(patched_stand_in),
                "--output-dir",
                str(cfg.output_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=REPO,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"

    def up():
        assert proc.poll() is None, f"watch.py exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(f"{url}/api/v1/project", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait_for(up, 60 * WAIT_FACTOR, f"the dashboard at {url}")
        yield url, cfg, log
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # watch.py is the server itself: its pid is the one to stop
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: selenium never runs its manager (which would download a driver).
    service = Service(CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def test_watch_prints_the_experiment_url(dashboard):
    url, cfg, log = dashboard
    (exp,) = tracking.local_experiments(cfg.output_dir / "swanlog")
    assert f"{url}/experiment/{exp['id']}" in log.read_text()


def test_experiment_page_draws_the_loss_chart(dashboard, browser, tmp_path):
    from selenium.webdriver.common.by import By

    url, cfg, _ = dashboard
    (exp,) = tracking.local_experiments(cfg.output_dir / "swanlog")
    browser.get(f"{url}/experiment/{exp['id']}")

    pixels = _wait_for(
        lambda: max(browser.execute_script(CHART_PIXELS_JS, "train/loss"), 0),
        60 * WAIT_FACTOR,
        "the train/loss chart to be drawn",
    )
    assert pixels > 500  # axes, labels and the curve, not a blank canvas
    for title in ("eval/loss", "perf/tokens_per_second"):
        _wait_for(
            lambda title=title: browser.execute_script(CHART_PIXELS_JS, title) > 0,
            30 * WAIT_FACTOR,
            f"the {title} chart",
        )
    # the before/after table: its rows load when the panel is on screen
    samples = browser.find_element(By.XPATH, "//p[normalize-space()='samples/generations']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", samples)
    prompt = cfg.infer.prompts[0]

    def page_text_once_the_rows_are_in() -> str:
        text = browser.find_element(By.TAG_NAME, "body").text
        return text if f"after: {prompt}" in text else ""

    body = _wait_for(page_text_once_the_rows_are_in, 30 * WAIT_FACTOR, "the sample generations table")
    assert cfg.run.name in body
    assert f"before: {prompt}" in body

    title = browser.find_element(
        By.XPATH, "//section[contains(@class, 'chart-container')]//p[normalize-space()='train/loss']"
    )
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", title)
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000
    keep = os.environ.get("DASHBOARD_SCREENSHOT")  # to look at it: DASHBOARD_SCREENSHOT=/tmp/d.png pytest ...
    if keep:
        shutil.copy(shot, keep)
