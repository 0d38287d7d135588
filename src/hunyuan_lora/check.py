"""Stage check: the preflight table, nothing loaded, nothing written; exit 2 on any problem.

    make check [CONFIG=configs/huanhuan.yaml] [MODEL_DIR=...] [LAUNCH=zero3 NPROC=8]

The rows and what each checks: preflight.py. `make train` runs the same preflight first.
"""

from __future__ import annotations

from .config import Config
from .preflight import Plan, preflight


def run(cfg: Config) -> Plan:
    plan = preflight(cfg, stage="check")
    print("preflight passed: nothing was loaded; `make train` runs the same checks first")
    return plan
