"""Writes a kill can never leave half done: everything goes to a temporary sibling, then one rename.

A later stage therefore sees either the previous complete artifact or the new complete one.
`make check` lists what killed runs leave behind (`.<name>-*` folders, `*.tmp`, `*.old`).
A published folder has the modes the user's umask gives new files (0755 / 0644 under umask 022).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
    os.replace(tmp, path)
    return path


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def publish_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place. Killed mid-swap, `<final>.old` is the last complete one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def honour_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain mkdir / open would have given.

    tempfile.mkdtemp makes 0700 folders and safetensors writes 0600 files whatever the umask, so a
    container running as another uid (or a colleague's account) could not read the outputs.
    """
    mask = current_umask()
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            executable = os.stat(path).st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling of `final` to write into; published as `final` when the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield tmp
        honour_umask(tmp)
        publish_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
