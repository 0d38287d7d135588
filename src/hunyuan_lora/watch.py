"""Watch: serve the SwanLab dashboard (`swanlab watch`) on the run's <output_dir>/swanlog.

    make watch [CONFIG=configs/demo.yaml] [OUTPUT_DIR=...] [SET="swanlab.port=5093"]
    python -m hunyuan_lora watch --config configs/demo.yaml [--host 0.0.0.0] [--port 5093]

Host and port come from swanlab.host / swanlab.port (127.0.0.1:5092 by default; the container
sets 0.0.0.0); --host / --port override them. Runs in the foreground until Ctrl-C; the process
is the dashboard itself (no child), so its pid is the one to stop.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import sys

from . import tracking
from .config import Config
from .errors import UserError


def check_address(host: str, port: int) -> None:
    try:
        ipaddress.IPv4Address(host)  # swanboard takes IPv4 literals only (no "localhost", no IPv6)
    except ValueError as e:
        raise UserError(
            f"'{host}' is not an IPv4 address",
            where="swanlab.host / --host",
            fix="use 127.0.0.1 (this machine only) or 0.0.0.0 (all interfaces)",
        ) from e
    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range", where="swanlab.port / --port", fix="use 1-65535")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            what = "is in use" if e.errno == errno.EADDRINUSE else f"cannot be bound ({e.strerror})"
            raise UserError(
                f"{host}:{port} {what}",
                where="swanlab.port / --port",
                fix="stop the other dashboard, or pick another port: make watch SET=swanlab.port=5093",
            ) from e


def add_arguments(parser) -> None:
    parser.add_argument("--host", default=None, help="override swanlab.host (IPv4)")
    parser.add_argument("--port", type=int, default=None, help="override swanlab.port")


def run(cfg: Config, host: str | None = None, port: int | None = None) -> None:
    host = host or cfg.swanlab.host
    port = port if port is not None else cfg.swanlab.port

    swanlog = (cfg.output_dir / "swanlog").resolve()
    experiments = tracking.local_experiments(swanlog)
    if not experiments:
        raise UserError(
            f"no SwanLab logs in {swanlog} yet",
            where=f"run.output_dir={cfg.run.output_dir}",
            fix="run `make train` (or `make demo`) with the same CONFIG / OUTPUT_DIR first; cloud-mode "
            "runs (SWANLAB_API_KEY set) are on swanlab.cn, use swanlab.mode=local for a local copy",
        )
    check_address(host, port)

    shown = "127.0.0.1" if host == "0.0.0.0" else host
    url = f"http://{shown}:{port}"
    print(f"SwanLab dashboard for {swanlog}: {url}" + ("  (listening on all interfaces)" if host == "0.0.0.0" else ""))
    for e in experiments:
        print(f"  {url}/experiment/{e['id']}  {e['project']} / {e['name']}  ({e['status']}, {e['run_id']})")
    print("Ctrl-C stops it.", flush=True)

    from swanlab.cli import cli

    sys.exit(cli.main(["watch", str(swanlog), "--host", host, "--port", str(port)], prog_name="swanlab"))
