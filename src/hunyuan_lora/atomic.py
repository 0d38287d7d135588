"""Writes a kill can never leave half done, under names only the kit uses.

Everything goes to a temporary sibling, then one rename: a later stage sees either the previous
complete artifact or the new complete one. The names the kit makes beside what it writes:

    .<name>.tmp-XXXXXXXX       a folder or file being written; a killed run leaves it, nothing reads it
    .<name>.previous-XXXXXXXX  the previous <name> while the new one is renamed into place; a run
                               killed in between leaves the last complete <name> here
    <folder>/.hunyuan-lora     in every folder the kit publishes: the kit's to replace

XXXXXXXX is random, so the kit never renames or deletes a name it did not just create. A folder is
replaced only when it carries the kit's marker (or is empty); anything else in the way (a user's
folder, a file, a link) is refused in words, before the work and again at the rename, and left as
it is. `make check` lists what killed runs left (preflight.leftover_rows).
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

from .errors import UserError

MARKER = ".hunyuan-lora"
TEMP_INFIX = ".tmp-"
PREVIOUS_INFIX = ".previous-"
LEFTOVER_GLOBS = (f".*{TEMP_INFIX}*", f".*{PREVIOUS_INFIX}*")
MARKER_TEXT = (
    "Written by hunyuan-lora. The kit replaces this folder when it publishes a new one; a folder "
    "without this file is never replaced.\n"
)


def temp_file(path: Path) -> Path:
    """A new empty file beside `path`, under a name of the kit's (`.<name>.tmp-XXXXXXXX`)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_INFIX}", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a plain open would not have
    return Path(tmp)


def write_text(path: Path, text: str) -> Path:
    tmp = temp_file(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def aside_path(path: Path, stamp: str) -> Path:
    """`<stem>.<stamp><suffix>` beside `path` (`.1`, `.2`, ... added while that name is taken): where an
    earlier output is kept when a new one takes its place."""
    candidate, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while candidate.exists() or candidate.is_symlink():
        candidate, n = path.with_name(f"{path.stem}.{stamp}.{n}{path.suffix}"), n + 1
    return candidate


def check_writable(folder: Path, where: str | None = "run.output_dir") -> Path:
    """Refuse (UserError) a folder the kit cannot write in: it is a file, or it (or the nearest existing
    folder above it, where it would be created) is read-only. Returns that nearest existing folder.
    Writes a probe file and removes it: os.access misses read-only mounts and root on NFS."""
    anchor = folder
    while not anchor.exists() and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        what = (
            f"{folder} is a file, not a folder"
            if anchor == folder
            else f"{anchor} is a file, so the folder {folder} cannot be created"
        )
        raise UserError(what, where=where, fix="pass another OUTPUT_DIR, or move that file away")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write-test{TEMP_INFIX}", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(
            f"cannot write in {anchor} ({e.strerror})",
            where=where,
            fix="pass an OUTPUT_DIR on a writable disk, or fix the folder's permissions",
        ) from e
    return anchor


def check_replaceable(final: Path, marker: str = MARKER, where: str | None = None) -> None:
    """Refuse (UserError) when publishing a folder at `final` would destroy something the kit did not
    write: a file, a link, or a non-empty folder without `marker`. Changes nothing."""
    if not final.exists() and not final.is_symlink():
        return
    fix = (
        f"move or rename {final} yourself (the kit writes its output at that name), or give the run "
        "another output folder (OUTPUT_DIR=...)"
    )
    if final.is_symlink() or not final.is_dir():
        kind = "a link" if final.is_symlink() else "a file"
        raise UserError(
            f"{final} is {kind}, where the kit publishes a folder; nothing was changed", where=where, fix=fix
        )
    try:
        empty = not any(final.iterdir())
    except OSError as e:
        raise UserError(
            f"cannot read the folder {final} ({e.strerror})",
            where=where,
            fix="fix its permissions, or give the run another output folder (OUTPUT_DIR=...)",
        ) from e
    if not empty and not (final / marker).is_file():
        raise UserError(
            f"{final} is a folder the kit did not write (it has no {marker} file), where the kit "
            "publishes its output; nothing in it was changed",
            where=where,
            fix=fix + "; if it is the output of an older version of the kit, delete it",
        )


def publish_dir(tmp: Path, final: Path, marker: str = MARKER) -> None:
    """Swap a finished folder into place. Killed mid-swap, `.<final>.previous-*` is the last complete one."""
    check_replaceable(final, marker)
    if not final.exists() or not any(final.iterdir()):
        os.replace(tmp, final)  # a rename replaces an empty folder
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{final.name}{PREVIOUS_INFIX}", dir=final.parent))
    os.replace(final, aside)  # onto the empty folder mkdtemp just made: a name no one else uses
    os.replace(tmp, final)
    shutil.rmtree(aside)


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
def staging_dir(final: Path, marker: str = MARKER) -> Iterator[Path]:
    """A temporary sibling of `final` to write into; published as `final` when the block succeeds.

    `marker` is the file that makes a folder the kit's to replace; the block may write it itself
    (the stand-in's stand_in.json), else the kit's own is added."""
    check_replaceable(final, marker)  # refused before the work, not after it
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TEMP_INFIX}", dir=final.parent))
    try:
        yield tmp
        if not (tmp / marker).exists():
            (tmp / marker).write_text(MARKER_TEXT, encoding="utf-8")
        honour_umask(tmp)
        publish_dir(tmp, final, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
