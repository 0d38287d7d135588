"""One run at a time in an output folder: a stage that writes there holds `<output>/.hunyuan-lora.lock`.

    with hold(cfg.output_dir, "train"):   # cli.main does this for the stages in WRITERS
        ...

The lock is flock(2) on that file, so the kernel releases it when the holder ends however it ends
(kill -9 and power loss included): a lock file left by a dead run never blocks the next one. The
file records the holder's pid, stage, host and start time, for the refusal message only.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import check_writable, current_umask
from .errors import UserError

LOCK_FILE = ".hunyuan-lora.lock"
# the stages that write into run.output_dir (chat appends only its own transcript; serve writes nothing)
WRITERS = ("dataset", "train", "infer", "merge", "eval", "probe")


def holder(lock: Path) -> str:
    """Who holds the lock, as recorded in it: `make train` (pid 1234 on host, since ...)."""
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return f"`make {info['stage']}` (pid {info['pid']} on {info['host']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run (it has not recorded its pid yet)"


@contextmanager
def hold(folder: Path, stage: str) -> Iterator[None]:
    """Hold the output folder's lock for the block; refuse (UserError, one paragraph) while another
    process holds it. The folder is checked to be writable first (created if missing)."""
    check_writable(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder} is in use by {holder(lock)}: two runs writing one output folder would undo "
                "each other's work",
                where="run.output_dir",
                fix="wait until it ends, or stop it; or give this run another output folder (OUTPUT_DIR=...)",
            ) from None
        except OSError as e:  # a file system without locks (some FUSE mounts)
            print(f"WARNING: cannot lock {lock} ({e.strerror}): nothing stops a second run in {folder}")
        os.ftruncate(fd, 0)
        os.write(
            fd,
            json.dumps(
                {
                    "stage": stage,
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
            ).encode(),
        )
        yield
    finally:
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:  # a refusal leaves no trace
            lock.unlink()
            folder.rmdir()
        os.close(fd)  # releases the lock
