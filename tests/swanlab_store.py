"""Test helpers that read SwanLab's local store as swanboard does (the package only lists experiments)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path


def read_tag(swanlog: str | Path, run_id: str, tag: str) -> list[dict]:
    """Every record of one logged key, by step: the tag table gives its folder under logs/."""
    swanlog = Path(swanlog)
    con = sqlite3.connect(f"file:{swanlog / 'runs.swanlab'}?mode=ro", uri=True)
    try:
        row = con.execute(
            "SELECT t.folder FROM tag t JOIN experiment e ON e.id = t.experiment_id WHERE e.run_id = ? AND t.name = ?",
            (run_id, tag),
        ).fetchone()
    finally:
        con.close()
    if row is None:
        return []
    folder = swanlog / run_id / "logs" / row[0]
    records = []
    for f in sorted(folder.glob("*.log")):  # swanboard: every *.log of the folder, then sort by index
        records += [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sorted(records, key=lambda r: int(r["index"]))
