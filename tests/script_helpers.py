"""The command line a stage's script takes, as the Makefile passes it (scripts/<stage>.py)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def stage_args(
    config: Path | str,
    model: Path | str,
    out: Path | str | None = None,
    data: Path | str | None = None,
    sets: Iterable[str] = (),
) -> list[str]:
    """--config, --model-dir, then --output-dir and --data when given, then one --set per override."""
    args = ["--config", str(config), "--model-dir", str(model)]
    if out is not None:
        args += ["--output-dir", str(out)]
    if data is not None:
        args += ["--data", str(data)]
    return args + [a for s in sets for a in ("--set", s)]
