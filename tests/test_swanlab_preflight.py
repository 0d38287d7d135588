"""SwanLab cloud problems found by the preflight, before any weights load, each with the `local` way out.

Nothing leaves 127.0.0.1: SWANLAB_API_HOST (swanlab 0.5.7's setting for the API server) points the
login at a closed port (no network), or at a small HTTP server here that answers as SwanLab's login
endpoint does (accepting or refusing the key) or as a proxy's HTML page would.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from script_helpers import stage_args

from hunyuan_lora import config, tracking
from hunyuan_lora.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GOOD_KEY = "A" * 10 + "b" * 10 + "7"  # 21 letters and digits: the format swanlab checks


@pytest.fixture
def cloud(monkeypatch, tmp_path):
    """A demo config in cloud mode with no key anywhere (no SWANLAB_API_KEY, no saved login)."""
    for var in ("SWANLAB_API_KEY", "SWANLAB_MODE", "SWANLAB_API_HOST", "SWANLAB_WEB_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SWANLAB_SAVE_DIR", str(tmp_path / "no-login"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return config.load(REPO / "configs/demo.yaml", output_dir=str(tmp_path / "out"), overrides=["swanlab.mode=cloud"])


class LoginServer:
    """POST /api/login/api_key answered with (status, body); records the authorization headers."""

    def __init__(self, status: int, body: bytes, content_type: str = "application/json"):
        self.keys: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                owner.keys.append((self.path, self.headers.get("authorization")))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/api"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: a connection there is refused


def assert_names_the_local_alternative(e: UserError) -> None:
    assert "SET=swanlab.mode=local" in e.paragraph()


def test_cloud_without_a_key(cloud):
    with pytest.raises(UserError, match="swanlab.mode is 'cloud' but there is no SwanLab API key") as e:
        tracking.check_swanlab(cloud)
    assert "export SWANLAB_API_KEY" in e.value.fix
    assert_names_the_local_alternative(e.value)


@pytest.mark.parametrize(("key", "problem"), [("abc123", "length must be 21"), ("A" * 20 + "-", "Invalid character")])
def test_a_malformed_key(cloud, monkeypatch, key, problem):
    monkeypatch.setenv("SWANLAB_API_KEY", key)
    with pytest.raises(UserError, match=f"SWANLAB_API_KEY\\) is malformed: .*{problem}") as e:
        tracking.check_swanlab(cloud)
    assert key not in e.value.paragraph()  # never echo a credential
    assert_names_the_local_alternative(e.value)


def test_no_network_to_the_cloud(cloud, monkeypatch):
    api = f"http://127.0.0.1:{closed_port()}/api"
    monkeypatch.setenv("SWANLAB_API_KEY", GOOD_KEY)
    monkeypatch.setenv("SWANLAB_API_HOST", api)
    with pytest.raises(UserError, match=f"cannot reach the SwanLab cloud at {api} \\(ConnectionError\\)") as e:
        tracking.check_swanlab(cloud)
    assert "HTTPS_PROXY" in e.value.fix
    assert_names_the_local_alternative(e.value)


def test_a_key_the_cloud_refuses(cloud, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", GOOD_KEY)
    with LoginServer(401, b'{"code": "UNAUTHORIZED"}') as srv:
        monkeypatch.setenv("SWANLAB_API_HOST", srv.api)
        with pytest.raises(UserError, match="refused the API key \\(SWANLAB_API_KEY\\): HTTP 401") as e:
            tracking.check_swanlab(cloud)
    assert srv.keys == [("/api/login/api_key", GOOD_KEY)]
    assert_names_the_local_alternative(e.value)


def test_a_proxy_page_instead_of_the_cloud(cloud, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", GOOD_KEY)
    with LoginServer(200, b"<html>please sign in to the hotel wifi</html>", "text/html") as srv:
        monkeypatch.setenv("SWANLAB_API_HOST", srv.api)
        with pytest.raises(UserError, match="did not answer the login as SwanLab does \\(HTTP 200\\)") as e:
            tracking.check_swanlab(cloud)
    assert_names_the_local_alternative(e.value)


def test_a_key_the_cloud_accepts(cloud, monkeypatch):
    monkeypatch.setenv("SWANLAB_API_KEY", GOOD_KEY)
    body = json.dumps({"sid": "s", "expiredAt": "2099-01-01", "userInfo": {"username": "zhen-huan"}}).encode()
    with LoginServer(200, body) as srv:
        monkeypatch.setenv("SWANLAB_API_HOST", srv.api)
        status, detail = tracking.check_swanlab(cloud)
    assert status == "ok"
    assert detail == f"cloud: {srv.api} accepted the key (SWANLAB_API_KEY) of user zhen-huan"
    assert not (Path(os.environ["SWANLAB_SAVE_DIR"]) / ".netrc").exists()  # the check saves no key


def test_local_and_disabled_need_no_login(cloud):
    import dataclasses

    local = dataclasses.replace(cloud, swanlab=dataclasses.replace(cloud.swanlab, mode="local"))
    assert tracking.check_swanlab(local) == (
        "ok",
        f"local: logged to {cloud.output_dir / 'swanlog'} (`make watch` shows it)",
    )
    off = dataclasses.replace(cloud, swanlab=dataclasses.replace(cloud.swanlab, mode="disabled"))
    assert tracking.check_swanlab(off)[0] == "skip"


# ---- through the real scripts: `make check` and train's preflight, before the weights load ------


@pytest.fixture(scope="module")
def run_folders(patched_stand_in, tmp_path_factory):
    """(model folder, output folder with the tokenized demo data)."""
    from hunyuan_lora import data

    out = tmp_path_factory.mktemp("swanlab-preflight") / "out"
    data.run(config.load(REPO / "configs/demo.yaml", model_dir=str(patched_stand_in), output_dir=str(out)))
    return patched_stand_in, out


def run_script(script: str, run_folders, tmp_path, **env: str) -> subprocess.CompletedProcess:
    model, out = run_folders
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HL_", "SWANLAB_")) and k.lower() not in ("https_proxy", "http_proxy", "all_proxy")
    }
    clean.update(SWANLAB_SAVE_DIR=str(tmp_path / "no-login"), NO_PROXY="127.0.0.1,localhost", **env)
    return subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / script),
            *stage_args(REPO / "configs/demo.yaml", model, out, sets=["swanlab.mode=cloud"]),
        ],
        cwd=REPO,
        env=clean,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("script", "env", "problem"),
    [
        ("check.py", {}, "swanlab.mode is 'cloud' but there is no SwanLab API key"),
        ("check.py", {"SWANLAB_API_KEY": "abc123"}, "is malformed"),
        ("train.py", {"SWANLAB_API_KEY": GOOD_KEY}, "cannot reach the SwanLab cloud at http://127.0.0.1:"),
    ],
)
def test_the_preflight_stops_before_the_weights_load(run_folders, tmp_path, script, env, problem):
    env.setdefault("SWANLAB_API_HOST", f"http://127.0.0.1:{closed_port()}/api")
    proc = run_script(script, run_folders, tmp_path, **env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(r"^  swanlab +FAIL ", proc.stdout, re.M), proc.stdout
    paragraph = " ".join(proc.stderr[proc.stderr.index("error: ") :].split())
    assert problem in paragraph
    assert "SET=swanlab.mode=local" in paragraph
    assert "Loading checkpoint shards" not in proc.stderr
    assert "trainable of" not in proc.stdout


def test_check_shows_the_accepted_login(run_folders, tmp_path):
    body = json.dumps({"sid": "s", "expiredAt": "2099-01-01", "userInfo": {"username": "zhen-huan"}}).encode()
    with LoginServer(200, body) as srv:
        proc = run_script("check.py", run_folders, tmp_path, SWANLAB_API_KEY=GOOD_KEY, SWANLAB_API_HOST=srv.api)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(
        rf"^  swanlab +ok +cloud: {re.escape(srv.api)} accepted the key \(SWANLAB_API_KEY\) of user "
        "zhen-huan$",
        proc.stdout,
        re.M,
    ), proc.stdout
